"""One plain PyTorch training loop for every fine-tuning method and task, and the tasks it trains.

The loop (:func:`train`): AdamW without weight decay, linear warm-up then linear decay, gradient clipping,
a stop with a clear error when the loss stops being finite. A task (:class:`TrainTask`) supplies each step's
micro-batches and the loss of one micro-batch: :class:`CausalLMTask` (cross-entropy on the answer tokens only,
for every method: the fair-comparison rule of the method notes, section 6) and :class:`SST2Task` (an encoder
with a linear head on mean-pooled embeddings). Data: :mod:`clover.finetune_data`.
"""

from __future__ import annotations

import math
import re
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from clover import finetune_data as data
from clover.errors import CloverError

Batch = dict[str, torch.Tensor]


# ---------------------------------------------------------------- memory


def peak_rss_kb() -> int:
    """Peak resident set size of this process since start or the last reset (kB)."""
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", text).group(1))
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Return freed heap to the OS and reset the kernel's peak-RSS counter (Linux); False where impossible."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What the loop measured."""

    log: list[dict[str, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # over training only where the counter could be reset
    peak_rss_scope: str = "process"


@dataclass
class StepBatches:
    """One optimizer step's micro-batches, already on the model's device."""

    batches: list[Batch]
    divisor: int  # the step's loss is the sum of the micro-batch losses divided by this
    columns: dict[str, int] = field(default_factory=dict)  # extra train-log columns, e.g. token counts


class TrainTask(Protocol):
    """What :func:`train` needs from a task."""

    def next_step(self) -> StepBatches:
        """The next optimizer step's micro-batches."""
        ...

    def loss(self, batch: Batch) -> torch.Tensor:
        """The loss of one micro-batch, before the step's divisor."""
        ...


def linear_schedule(warmup: int, total: int) -> Any:
    """LR factor per step: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def train(
    module: nn.Module,
    task: TrainTask,
    *,
    steps: int,
    lr: float,
    warmup: int,
    grad_clip: float = 1.0,
    seed: int = 0,
    desc: str = "finetune",
    progress: bool = True,
) -> TrainResult:
    """Run ``steps`` optimizer steps of the task's loss over the trainable parameters of ``module``."""
    from tqdm.auto import tqdm

    result = TrainResult(peak_rss_scope="training" if reset_peak_rss() else "process")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, steps))
    torch.manual_seed(seed)  # dropout draws the same masks for every method
    module.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        start = time.perf_counter()
        chosen = task.next_step()
        loss_sum = 0.0
        for batch in chosen.batches:
            loss = task.loss(batch)
            if not loss.requires_grad:  # every trained weight is cut off from the output (all V-O dims pruned)
                raise CloverError(
                    "no trainable parameter reaches the loss: the adapted layers have no effect on this model's "
                    "output (e.g. every V-O dim pruned); choose other --targets"
                )
            (loss / chosen.divisor).backward()
            loss_sum += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        current_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        mean = loss_sum / chosen.divisor
        if not math.isfinite(mean):
            raise CloverError(f"the loss became {mean} at step {step + 1}; lower --lr (now {lr})")
        result.log.append(
            {"step": step + 1, "loss": round(mean, 6), "lr": current_lr, "grad_norm": round(float(norm), 6),
             **chosen.columns, "seconds": round(seconds, 4)}
        )  # fmt: skip
        result.step_seconds.append(seconds)
        bar.set_postfix(loss=f"{mean:.4f}")
    module.eval()
    result.peak_rss_mb = peak_rss_kb() / 1024
    return result


# ---------------------------------------------------------------- causal LM: the loss on answer tokens only


def answer_loss(lm: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the answer tokens, their count); logits only where a label is set."""
    labels = batch["labels"][:, 1:]
    mask = labels != data.IGNORE_INDEX
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    head = lm.get_output_embeddings()
    if decoder is not None and decoder is not lm and head is not None:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = head(hidden.last_hidden_state[:, :-1][mask])
    else:  # a model without the decoder / head split: full logits
        out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[:, :-1][mask]
    return F.cross_entropy(logits.float(), labels[mask], reduction="sum"), int(mask.sum())


def micro_batches(examples: Sequence[data.Example], batch_size: int, max_length: int) -> list[list[data.Example]]:
    """Split one step's examples, sorted by length, into groups of at most batch_size with little padding.

    A new group starts when the current one is full or its padding would exceed both 16 tokens and a
    quarter of its real tokens. The step's gradient does not depend on the grouping: the loss is the mean
    over all answer tokens of the step.
    """

    def length(ex: data.Example) -> int:
        return min(max_length, len(ex.prompt_ids) + len(ex.answer_ids))

    groups: list[list[data.Example]] = []
    for ex in sorted(examples, key=length):
        group = groups[-1] if groups else []
        real = sum(map(length, group)) + length(ex)
        padding = (len(group) + 1) * length(ex) - real  # sorted: the new example is the longest
        if group and len(group) < batch_size and padding <= max(16, real / 4):
            group.append(ex)
        else:
            groups.append([ex])
    return groups


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked out either way)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _cycle(stream: list[data.Example]) -> Iterator[data.Example]:
    while True:
        yield from stream


class CausalLMTask:
    """Answer-token cross-entropy over an example stream (cycled), each step's examples micro-batched by length."""

    def __init__(
        self, lm: nn.Module, stream: list[data.Example], *, batch_size: int, grad_accum: int, max_length: int,
        pad_id: int,
    ):  # fmt: skip
        self.lm = lm  # the transformers model itself: adapter layers are injected in place
        self.device = next(lm.parameters()).device
        self.examples = _cycle(stream)
        self.batch_size, self.per_step, self.max_length, self.pad_id = (
            batch_size, batch_size * grad_accum, max_length, pad_id,
        )  # fmt: skip

    def next_step(self) -> StepBatches:
        """The next batch_size x grad_accum examples, in micro-batches; divisor: their answer tokens."""
        chosen = [next(self.examples) for _ in range(self.per_step)]
        batches = [
            {key: value.to(self.device) for key, value in data.collate(g, self.max_length, self.pad_id).items()}
            for g in micro_batches(chosen, self.batch_size, self.max_length)
        ]
        answer_tokens = sum(int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in batches)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        return StepBatches(batches, answer_tokens, {"answer_tokens": answer_tokens, "tokens": tokens})

    def loss(self, batch: Batch) -> torch.Tensor:
        """Summed cross-entropy over the batch's answer tokens."""
        return answer_loss(self.lm, batch)[0]


# ---------------------------------------------------------------- SST-2: an encoder with a linear head


class MeanPoolClassifier(nn.Module):
    """Attention-masked mean of the encoder's last hidden states, then a linear layer (2 classes)."""

    def __init__(self, encoder: nn.Module, classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        output = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        # an encoder saved with a task head (BertForMaskedLM) returns its logits first: its last hidden states still
        # come out as hidden_states[-1]
        hidden = getattr(output, "last_hidden_state", None)
        hidden = output.hidden_states[-1] if hidden is None else hidden
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))


def sst2_batches(
    tokenizer: Any, pairs: list[tuple[str, int]], batch_size: int, max_length: int, device: torch.device | None = None
) -> Iterator[Batch]:
    """Tokenized batches of (sentence, label) pairs, in order: input_ids, attention_mask, labels."""
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        enc = tokenizer(
            [s for s, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "labels": torch.tensor([y for _, y in chunk])}  # fmt: skip
        yield {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def sst2_accuracy(
    classifier: MeanPoolClassifier, tokenizer: Any, pairs: list[tuple[str, int]], max_length: int
) -> dict:
    """Accuracy of the classifier on (sentence, label) pairs: {"acc", "n"}."""
    classifier.eval()
    correct = 0
    for batch in sst2_batches(tokenizer, pairs, 32, max_length, next(classifier.parameters()).device):
        logits = classifier(batch["input_ids"], batch["attention_mask"])
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return {"acc": correct / len(pairs), "n": len(pairs)}


class SST2Task:
    """Cross-entropy of the classifier on the SST-2 training part, reshuffled by the seed at each pass."""

    def __init__(
        self, classifier: MeanPoolClassifier, tokenizer: Any, *, batch_size: int, grad_accum: int, max_length: int,
        seed: int = 0,
    ):  # fmt: skip
        self.classifier, self.tokenizer = classifier, tokenizer
        self.pairs = data.sst2_examples("train")
        self.device = next(classifier.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)  # its own: the data order ignores dropout's draws
        self.batch_size, self.grad_accum, self.max_length = batch_size, grad_accum, max_length
        self.order: list[int] = []

    def next_step(self) -> StepBatches:
        """grad_accum batches of batch_size pairs; divisor: grad_accum (each batch's loss is already a mean)."""
        batches = []
        for _ in range(self.grad_accum):
            while len(self.order) < self.batch_size:
                self.order += torch.randperm(len(self.pairs), generator=self.generator).tolist()
            chunk = [self.pairs[i] for i in self.order[: self.batch_size]]
            self.order = self.order[self.batch_size :]
            batches.append(next(sst2_batches(self.tokenizer, chunk, self.batch_size, self.max_length, self.device)))
        return StepBatches(batches, self.grad_accum)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy of the batch."""
        return F.cross_entropy(self.classifier(batch["input_ids"], batch["attention_mask"]), batch["labels"])
