"""``clover finetune``: train CLOVER (or a PEFT baseline) on a fixed split of the eval data, score, merge, save.

One plain PyTorch loop serves every method (AdamW without weight decay, linear warm-up then linear decay,
gradient clipping at 1.0), on the same examples in the same order, with the loss masked to the answer
tokens for all of them: the fair-comparison rule of the method notes (section 6). Data and split:
:mod:`clover.finetune_data`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import re
import resource
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clover import finetune_data as data
from clover.errors import CloverError

# PEFT baselines; the last three exist in PEFT 0.21 (HiRA, PSOFT, OSF) and are only sketched on CPU
PEFT_METHODS = ("lora", "dora", "pissa", "hira", "psoft", "osf")
METHODS = ("clover", *PEFT_METHODS)
PEFT_TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
DEFAULT_PEFT_TARGETS = ("q", "k", "v")  # the authors' LoRA / DoRA baselines
TASK_CHOICES = (*data.COMMONSENSE, "commonsense", data.SST2, data.WIKITEXT)
PERPLEXITY_TOKENS, PERPLEXITY_WINDOW = 4096, 512  # WikiText-2 test, as in the pruning benchmarks
TRAIN_LOG = "train_log.csv"
REPORT = "finetune_report.json"
ADAPTER_DIR = "adapter"
HEAD_FILE = "classifier_head.safetensors"


@dataclass
class FinetuneOptions:
    """Everything that defines a run; defaults are the short-CPU-run recipe (lr 5e-4, see the method notes)."""

    task: str = "commonsense"
    method: str = "clover"
    targets: tuple[str, ...] | None = None  # None: CLOVER's recipe, or q,k,v for the PEFT baselines
    lr: float = 5e-4
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 128
    seed: int = 0
    dropout: float = 0.05
    dropout_placement: str = "frozen_output"  # CLOVER only
    rank: int | None = None  # PEFT methods; None: match CLOVER's default trainable count
    alpha: float | None = None  # LoRA family scaling numerator; None: 2 * rank (the authors' r 64 / alpha 128)
    warmup_steps: int | None = None  # None: 10% of the steps
    eval_tasks: tuple[str, ...] | None = None  # None: the training tasks
    eval_limit: int | None = None  # held-out rows scored per task; None: all
    selection_rows: int = 0  # also score this many held-out rows after the reported ones, to select hyperparameters
    eval_batch_size: int = 16
    eval_base: bool = False  # also score the untouched model first
    evaluate: bool = True
    grad_clip: float = 1.0
    threads: int | None = None  # torch CPU threads; None: torch's default
    device: str | None = None  # "cpu", "cuda", "cuda:1", ...; None: cuda when available, else cpu

    def validate(self) -> None:
        """Raise CloverError for a value that cannot work, with what to use instead."""
        if self.task not in TASK_CHOICES:
            raise CloverError(f"unknown --task {self.task!r}: use one of {', '.join(TASK_CHOICES)}")
        if self.method not in METHODS:
            raise CloverError(f"unknown --method {self.method!r}: use one of {', '.join(METHODS)}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise CloverError(f"--lr {self.lr} must be a number in (0, 1]; 5e-4 suits short CPU runs")
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CloverError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_length < 8:
            raise CloverError(f"--max-length {self.max_length} is too short; use at least 8 tokens (128 is typical)")
        if not 0 <= self.dropout < 1:
            raise CloverError(f"--dropout {self.dropout} must be in [0, 1)")
        if self.rank is not None and self.rank < 1:
            raise CloverError(f"--rank {self.rank} must be at least 1 (or omit it to match CLOVER's count)")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise CloverError(f"--eval-limit {self.eval_limit} must be at least 1 (omit it to score every row)")
        if self.selection_rows < 0:
            raise CloverError(f"--selection-rows {self.selection_rows} must be 0 (off) or more")
        if self.selection_rows and (
            self.eval_limit is None or self.task in (data.SST2, data.WIKITEXT) or not self.evaluate
        ):
            raise CloverError(
                "--selection-rows needs --eval-limit (its rows follow the reported ones), a commonsense task and "
                "the evaluation (no --no-eval)"
            )
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise CloverError(f"--warmup-steps {self.warmup_steps} must be in [0, --steps]")
        if self.method != "clover" and self.targets is not None:
            if bad := [t for t in self.targets if t not in PEFT_TARGETS]:
                raise CloverError(f"--targets {bad} unknown for {self.method}; choose from {', '.join(PEFT_TARGETS)}")
        if self.eval_tasks is not None:
            if self.task in (data.SST2, data.WIKITEXT):
                raise CloverError(
                    "--eval-tasks applies to the commonsense tasks; sst2 and wikitext are scored on their own "
                    "held-out text"
                )
            for task in self.eval_tasks:
                if task not in data.COMMONSENSE:
                    raise CloverError(f"unknown eval task {task!r}: use some of {', '.join(data.COMMONSENSE)}")

        from clover.models import resolve_device

        resolve_device(self.device)

    @property
    def torch_device(self) -> torch.device:
        """The device the run uses."""
        from clover.models import resolve_device

        return resolve_device(self.device)

    @property
    def warmup(self) -> int:
        """Warm-up steps actually used."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)


# ---------------------------------------------------------------- wrapping a model for one method


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def peft_target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full module paths of the q/k/v/o projections (via clover's adapters) and MLP linears named by targets."""
    from clover.adapters import LinearProjection, attention_sites

    names, paths = _module_names(model), []
    for site in attention_sites(model, allow_pruned=True):
        for label in ("q", "k", "v", "o"):
            if label in targets:
                projection = getattr(site, label)
                if not isinstance(projection, LinearProjection):
                    raise CloverError(
                        f"the PEFT baselines need separate {label} linears; {type(model).__name__} fuses them"
                    )
                paths.append(names[id(projection.linear)])
    for label in ("up", "gate", "down"):
        if label in targets:
            found = [name for name, m in model.named_modules() if name.endswith(f".{label}_proj")]
            if not found:
                raise CloverError(f"--targets {label}: {type(model).__name__} has no {label}_proj (LLaMA-style MLP)")
            paths += found
    return paths


def _peft_config(
    method: str, rank: int, alpha: float, dropout: float, modules: dict[str, int], init: bool = True
) -> Any:
    """The PEFT config of a baseline at a given rank; ``modules``: path -> min(weight shape).

    ``init=False`` skips the SVD initialisations (for counting parameters).
    """
    import peft

    if method in ("lora", "dora", "pissa"):
        init_weights: Any = ("pissa" if method == "pissa" else True) if init else False
        return peft.LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(modules),
            use_dora=method == "dora",
            init_lora_weights=init_weights,
        )
    if method == "hira":
        return peft.HiraConfig(r=rank, target_modules=list(modules), hira_dropout=dropout)
    if method == "psoft":
        return peft.PsoftConfig(r=rank, target_modules=list(modules), psoft_dropout=dropout, psoft_alpha=alpha)
    if method == "osf":
        # OSF trains the bottom singular directions: trainable rank = min(shape) - effective rank, per module
        pattern = {f"^{re.escape(name)}$": max(0, dims - rank) for name, dims in modules.items()}
        return peft.OSFConfig(target_modules=list(modules), rank_pattern=pattern, init_weights=init)
    raise CloverError(f"no PEFT config for method {method!r}")


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, shared tensors counted once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def _skeleton(model: nn.Module, **overrides: Any) -> nn.Module:
    """A model of the same class from (a copy of) its config, with ``overrides`` applied."""
    config = copy.deepcopy(model.config)
    for key, value in overrides.items():
        setattr(config, key, value)
    if "num_hidden_layers" in overrides and isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: overrides["num_hidden_layers"]]
    return type(model)(config)


def clover_trainable_count(model: nn.Module, options: FinetuneOptions) -> int:
    """Trainable parameters CLOVER would have on this model (from shapes: the real model stays untouched)."""
    from clover.finetune import CloverConfig, trainable_count

    return trainable_count(model, CloverConfig(targets=options.targets if options.method == "clover" else None))


def matching_rank(model: nn.Module, method: str, modules: dict[str, int], target: int) -> int:
    """The rank whose trainable count is closest to ``target`` (counts are at most quadratic in the rank)."""
    import peft

    def count(rank: int) -> int:
        with torch.device("meta"):  # shapes only: no memory, no SVD
            skeleton = _skeleton(model)
        wrapped = peft.get_peft_model(skeleton, _peft_config(method, rank, 2 * rank, 0.0, modules, False))
        return count_trainable(wrapped)[0]

    ranks = [1, 2, 3]
    counts = [count(r) for r in ranks]
    # c(r) = a r^2 + b r + c from three points, solved for c(r) = target
    a = (counts[2] - 2 * counts[1] + counts[0]) / 2
    b = counts[1] - counts[0] - 3 * a
    c = counts[0] - a - b
    if abs(a) < 1e-9:
        guess = (target - c) / b
    else:
        guess = (-b + math.sqrt(max(b * b - 4 * a * (c - target), 0.0))) / (2 * a)
    upper = min(modules.values())
    candidates = sorted({max(1, min(upper, r)) for r in (math.floor(guess), math.ceil(guess))})
    return min(candidates, key=lambda r: abs(a * r * r + b * r + c - target))


def wrap_model(model: nn.Module, options: FinetuneOptions) -> tuple[nn.Module, dict[str, Any]]:
    """Wrap ``model`` in place for the method: (CloverModel or PeftModel, description incl. trainable count)."""
    torch.manual_seed(options.seed)
    if options.method == "clover":
        from clover.finetune import CloverConfig, get_clover_model

        config = CloverConfig(
            targets=options.targets, dropout=options.dropout, dropout_placement=options.dropout_placement
        )
        wrapped = get_clover_model(model, config)
        info = {"targets": list(wrapped.clover_config.targets)}
    else:
        import peft

        targets = options.targets or DEFAULT_PEFT_TARGETS
        modules = {name: min(model.get_submodule(name).weight.shape) for name in peft_target_modules(model, targets)}
        rank = options.rank or matching_rank(model, options.method, modules, clover_trainable_count(model, options))
        # LoRA family: the authors' alpha = 2 r; PSOFT: PEFT's default scaling of 1 (alpha = r)
        alpha = options.alpha if options.alpha is not None else (1.0 if options.method == "psoft" else 2.0) * rank
        wrapped = peft.get_peft_model(model, _peft_config(options.method, rank, alpha, options.dropout, modules))
        info = {"targets": list(targets), "rank": rank, "alpha": alpha}
    info["trainable"], info["all"] = count_trainable(wrapped)
    return wrapped, info


def _inner_model(wrapped: nn.Module) -> nn.Module:
    """The transformers model inside a CloverModel or PeftModel (adapter layers injected in place)."""
    return wrapped.get_base_model()


def merge(wrapped: nn.Module) -> nn.Module:
    """Fold the trained adapter into a plain transformers model (same class and parameter count)."""
    return wrapped.merge_and_unload()


def save_adapter(wrapped: nn.Module, directory: Path) -> None:
    """Write the adapter alone (CLOVER's small matrices, or PEFT's adapter files) into directory."""
    wrapped.save_pretrained(directory)


# ---------------------------------------------------------------- the loss, on answer tokens only


def answer_loss(lm: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
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


def _cycle(stream: list[data.Example]) -> Iterator[data.Example]:
    while True:
        yield from stream


# ---------------------------------------------------------------- memory


def _peak_rss_kb() -> int:
    """Peak resident set size of this process since start or the last reset (kB)."""
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", text).group(1))
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
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


# ---------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What the loop measured."""

    log: list[dict[str, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # over training only where the counter could be reset
    peak_rss_scope: str = "process"


def train_causal_lm(
    wrapped: nn.Module, stream: list[data.Example], options: FinetuneOptions, pad_id: int, *, progress: bool = True
) -> TrainResult:
    """Run options.steps optimizer steps of answer-token cross-entropy over the example stream (cycled)."""
    from tqdm.auto import tqdm

    lm = _inner_model(wrapped)
    device = next(lm.parameters()).device
    result = TrainResult(peak_rss_scope="training" if _reset_peak_rss() else "process")
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    warmup, total = options.warmup, options.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    torch.manual_seed(options.seed)
    examples = _cycle(stream)
    per_step = options.batch_size * options.grad_accum
    wrapped.train()
    bar = tqdm(range(total), desc=f"finetune {options.method}", disable=not progress)
    for step in bar:
        start = time.perf_counter()
        chosen = [next(examples) for _ in range(per_step)]
        batches = [
            {key: value.to(device) for key, value in data.collate(g, options.max_length, pad_id).items()}
            for g in micro_batches(chosen, options.batch_size, options.max_length)
        ]
        answer_tokens = sum(int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in batches)
        loss_sum = 0.0
        for batch in batches:
            loss, _ = answer_loss(lm, batch)
            (loss / answer_tokens).backward()
            loss_sum += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        mean = loss_sum / answer_tokens
        if not math.isfinite(mean):
            raise CloverError(f"the loss became {mean} at step {step + 1}; lower --lr (now {options.lr})")
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        result.log.append(
            {"step": step + 1, "loss": round(mean, 6), "lr": lr, "grad_norm": round(float(norm), 6),
             "answer_tokens": answer_tokens, "tokens": tokens, "seconds": round(seconds, 4)}
        )  # fmt: skip
        result.step_seconds.append(seconds)
        bar.set_postfix(loss=f"{mean:.4f}")
    wrapped.eval()
    result.peak_rss_mb = _peak_rss_kb() / 1024
    return result


# ---------------------------------------------------------------- SST-2: an encoder with a linear head


class MeanPoolClassifier(nn.Module):
    """Attention-masked mean of the encoder's last hidden states, then a linear layer (2 classes)."""

    def __init__(self, encoder: nn.Module, classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))


def _sst2_batches(
    tokenizer: Any, pairs: list[tuple[str, int]], batch_size: int, max_length: int, device: torch.device | None = None
) -> Iterator[dict[str, torch.Tensor]]:
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
    for batch in _sst2_batches(tokenizer, pairs, 32, max_length, next(classifier.parameters()).device):
        logits = classifier(batch["input_ids"], batch["attention_mask"])
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return {"acc": correct / len(pairs), "n": len(pairs)}


def train_sst2(
    classifier: MeanPoolClassifier, tokenizer: Any, options: FinetuneOptions, *, progress: bool = True
) -> TrainResult:
    """Cross-entropy on the SST-2 training part: adapter and head train, the rest is frozen."""
    from tqdm.auto import tqdm

    pairs = data.sst2_examples("train")
    device = next(classifier.parameters()).device
    order = list(range(len(pairs)))
    generator = torch.Generator().manual_seed(options.seed)
    result = TrainResult(peak_rss_scope="training" if _reset_peak_rss() else "process")
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    warmup, total = options.warmup, options.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    torch.manual_seed(options.seed)
    stream: list[int] = []
    classifier.train()
    bar = tqdm(range(total), desc=f"finetune {options.method}", disable=not progress)
    for step in bar:
        start = time.perf_counter()
        loss_sum = 0.0
        for _ in range(options.grad_accum):
            while len(stream) < options.batch_size:
                stream += [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
            chunk, stream = [pairs[i] for i in stream[: options.batch_size]], stream[options.batch_size :]
            batch = next(_sst2_batches(tokenizer, chunk, options.batch_size, options.max_length, device))
            loss = F.cross_entropy(classifier(batch["input_ids"], batch["attention_mask"]), batch["labels"])
            (loss / options.grad_accum).backward()
            loss_sum += loss.item() / options.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        if not math.isfinite(loss_sum):
            raise CloverError(f"the loss became {loss_sum} at step {step + 1}; lower --lr (now {options.lr})")
        result.log.append({"step": step + 1, "loss": round(loss_sum, 6), "lr": lr, "grad_norm": round(float(norm), 6),
                           "seconds": round(seconds, 4)})  # fmt: skip
        result.step_seconds.append(seconds)
        bar.set_postfix(loss=f"{loss_sum:.4f}")
    classifier.eval()
    result.peak_rss_mb = _peak_rss_kb() / 1024
    return result


# ---------------------------------------------------------------- one run, end to end


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _write_log(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _test_perplexity(model: nn.Module, tokenizer: Any) -> dict[str, float]:
    """WikiText-2 test perplexity (first 4096 tokens, 512-token windows, the model's dtype)."""
    from clover.evaluate import perplexity, wikitext2_text

    result = perplexity(
        model, tokenizer, wikitext2_text("test"), window=PERPLEXITY_WINDOW, max_tokens=PERPLEXITY_TOKENS
    )
    return {"perplexity": round(result.ppl, 4), "tokens": result.tokens_scored, "window": result.window}


def _average(scores: dict[str, dict[str, float]]) -> float:
    return sum(s["acc"] for s in scores.values()) / len(scores)


def run_finetune(
    model_name: str, options: FinetuneOptions, out: str | os.PathLike | None, *, overwrite: bool = False,
    progress: bool = True, log: Any = print,
) -> dict[str, Any]:  # fmt: skip
    """Load, wrap, train, (score), merge and save one run; returns the report (also written to DIR)."""
    from clover.adapters import pruned_site_specs
    from clover.io import atomic_directory, check_output_dir, write_pruned_model
    from clover.models import load_model

    options.validate()
    if out is not None:
        check_output_dir(out, overwrite=overwrite)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    started = time.perf_counter()
    loaded = load_model(model_name)
    sst2 = options.task == data.SST2
    wanted = "encoder" if sst2 else "causal-lm"
    if loaded.kind != wanted:
        raise CloverError(
            f"--task {options.task} needs a{'n' if sst2 else ''} {wanted} model (e.g. "
            f"{'minilm-l6' if sst2 else 'smollm2-135m'}); {model_name} is a {loaded.kind} model"
        )
    if loaded.tokenizer is None:
        raise CloverError(f"{model_name} has no tokenizer files; save the tokenizer beside the checkpoint")
    model, tokenizer = loaded.model.to(options.torch_device), loaded.tokenizer
    params_before = count_trainable(model)[1]
    report: dict[str, Any] = {"model": model_name, "options": asdict(options), "out": None if out is None else str(out)}
    text = options.task == data.WIKITEXT
    report["pruned"] = bool(pruned_site_specs(model))
    eval_tasks = [] if sst2 or text else list(options.eval_tasks or data.commonsense_tasks(options.task))
    heldout_pairs = data.sst2_examples("heldout")[: options.eval_limit] if sst2 else []
    # selection rows follow the reported ones: tasks with no held-out rows left after --eval-limit sit it out
    selection_tasks = [t for t in eval_tasks if options.selection_rows and data.heldout_rows(t) > options.eval_limit]
    if options.selection_rows and not selection_tasks:
        raise CloverError(
            f"no eval task has held-out rows beyond --eval-limit {options.eval_limit}; lower --eval-limit "
            f"(held-out rows: {', '.join(f'{t} {data.heldout_rows(t)}' for t in eval_tasks)})"
        )
    if options.eval_base:
        if sst2:
            report["base_heldout"] = None  # a fresh head is untrained: no meaningful zero-shot number
        elif text:
            report["base_heldout"] = {"wikitext2_test": _test_perplexity(model, tokenizer)}
        else:
            report["base_heldout"] = data.heldout_accuracy(
                model, tokenizer, eval_tasks, limit=options.eval_limit, batch_size=options.eval_batch_size
            )
    if sst2:
        torch.manual_seed(options.seed)
        classifier = MeanPoolClassifier(model).to(options.torch_device)
        wrapped, info = wrap_model(model, options)
        classifier.encoder = wrapped
        info["trainable"] += sum(p.numel() for p in classifier.head.parameters())
        info["all"] += sum(p.numel() for p in classifier.head.parameters())
    else:
        needed = options.steps * options.batch_size * options.grad_accum
        if text:
            stream = data.wikitext_examples(tokenizer, options.max_length, needed, options.seed)
        else:
            stream = data.training_examples(options.task, tokenizer, needed, options.seed)
        wrapped, info = wrap_model(model, options)
    report["adapter"] = info
    log(
        f"trainable params: {info['trainable']:,d} || all params: {info['all']:,d} || "
        f"trainable%: {100 * info['trainable'] / info['all']:.4f}"
    )
    cuda = options.torch_device.type == "cuda"
    if cuda:  # RSS says little on a GPU: also report the device's peak allocation over training
        torch.cuda.reset_peak_memory_stats(options.torch_device)
    if sst2:
        result = train_sst2(classifier, tokenizer, options, progress=progress)
    else:
        result = train_causal_lm(wrapped, stream, options, _pad_id(tokenizer), progress=progress)
    steady = result.step_seconds[1:] or result.step_seconds
    report["train"] = {
        "steps": options.steps,
        "first_loss": result.log[0]["loss"],
        "final_loss": result.log[-1]["loss"],
        "median_step_seconds": round(_median(steady), 4),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "peak_rss_scope": result.peak_rss_scope,
    }
    if cuda:
        report["train"]["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(options.torch_device) / 2**20, 1)
    with torch.no_grad():
        with tempfile.TemporaryDirectory(prefix="clover-adapter-") as tmp:
            if out is not None:  # the adapter must be written before the merge spends it
                save_adapter(wrapped, Path(tmp) / ADAPTER_DIR)
            merged = merge(wrapped).eval()
            if sst2:
                classifier.encoder = merged
            report["parameters_before"], report["parameters_after"] = params_before, count_trainable(merged)[1]
            if options.evaluate:
                eval_started = time.perf_counter()
                if sst2:
                    report["heldout"] = {
                        "sst2": sst2_accuracy(classifier, tokenizer, heldout_pairs, options.max_length)
                    }
                elif text:
                    report["heldout"] = {"wikitext2_test": _test_perplexity(merged, tokenizer)}
                else:
                    report["heldout"] = data.heldout_accuracy(
                        merged, tokenizer, eval_tasks, limit=options.eval_limit, batch_size=options.eval_batch_size
                    )
                if not text:
                    report["heldout_average_acc"] = round(_average(report["heldout"]), 4)
                if options.selection_rows:
                    report["selection"] = data.heldout_accuracy(
                        merged, tokenizer, selection_tasks, limit=options.selection_rows,
                        batch_size=options.eval_batch_size, offset=options.eval_limit,
                    )  # fmt: skip
                    report["selection_average_acc"] = round(_average(report["selection"]), 4)
                report["eval_seconds"] = round(time.perf_counter() - eval_started, 1)
            report["seconds"] = round(time.perf_counter() - started, 1)
            if out is not None:
                with atomic_directory(out, overwrite=overwrite) as staging:
                    if report["pruned"]:  # a healed pruned model stays a pruned checkpoint (auto_map + code)
                        write_pruned_model(replace(loaded, model=merged), staging)
                    else:
                        merged.save_pretrained(staging)
                        tokenizer.save_pretrained(staging)
                    (Path(tmp) / ADAPTER_DIR).rename(staging / ADAPTER_DIR)
                    if sst2:
                        from safetensors.torch import save_file

                        state = {k: v.detach().contiguous() for k, v in classifier.head.state_dict().items()}
                        save_file(state, staging / HEAD_FILE)
                    _write_log(result.log, staging / TRAIN_LOG)
                    (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    report["log"] = result.log
    return report


# ---------------------------------------------------------------- command line


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand (``set_defaults(func=cmd_finetune)``) to the CLI's subparsers."""
    from clover.cli import DEVICE_HELP

    defaults = FinetuneOptions()
    p = subparsers.add_parser(
        "finetune",
        help="train CLOVER (or a PEFT baseline) on commonsense data, SST-2 or plain text (healing a pruned "
        "model), score, merge, save",
        description="Fine-tune on the training part of a fixed split of the offline validation data (clover."
        "finetune_data: held-out rows are never trained on), with the loss on the answer tokens only, for every "
        "method. Then score the held-out rows with lm-evaluation-harness (zero-shot, same prompts as training), "
        "merge the adapter into a plain transformers checkpoint with the original parameter count, and write "
        f"DIR (the merged model), DIR/{ADAPTER_DIR} (the adapter alone), DIR/{TRAIN_LOG} and DIR/{REPORT}. "
        "Healing: MODEL may be a checkpoint written by `clover prune` (uniform or layer allocation for CLOVER; "
        "any for PEFT methods); with --task wikitext it trains on WikiText-2 validation text, reports WikiText-2 "
        "test perplexity, and DIR is again a pruned checkpoint (same dims, loads with trust_remote_code).",
    )
    p.add_argument("model", help="smollm2-135m (commonsense tasks), minilm-l6 (sst2), or a local checkpoint directory")
    p.add_argument(
        "--task",
        required=True,
        metavar="TASK",
        help=f"one of {', '.join(data.COMMONSENSE)}; commonsense (a balanced mix of all 8); sst2 "
        "(encoder + linear head on mean-pooled embeddings); or wikitext (plain text, every token: healing a "
        "pruned model, scored by WikiText-2 test perplexity)",
    )
    p.add_argument("--out", required=True, help="directory to write (refused if it exists, unless --overwrite)")
    p.add_argument(
        "--method",
        default=defaults.method,
        choices=METHODS,
        help="clover (default); lora, dora, pissa: PEFT baselines (hira, psoft, osf: PEFT 0.21 extras)",
    )
    p.add_argument(
        "--targets",
        type=_csv_list,
        help="comma list. clover: of q,k,v,vo,qk,up (default: the authors' recipe, e.g. q,v,up on "
        "SmolLM2); PEFT methods: of q,k,v,o,up,gate,down (default q,k,v)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=defaults.lr,
        help="peak learning rate (default 5e-4: 1e-4, the authors', under-trains short runs)",
    )
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per micro-batch")
    p.add_argument(
        "--grad-accum",
        type=int,
        default=defaults.grad_accum,
        help="micro-batches per step; effective batch = batch-size x grad-accum (authors: 16)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help="tokens per example; longer prompts lose tokens from the left, answers stay whole",
    )
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 10%% of --steps)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="data order, dropout and LoRA init")
    p.add_argument(
        "--dropout",
        type=float,
        default=defaults.dropout,
        help="clover: on the frozen projection's output (the authors'); PEFT: lora_dropout",
    )
    p.add_argument(
        "--dropout-placement",
        default=defaults.dropout_placement,
        choices=["frozen_output", "update", "none"],
        help="clover only: where the dropout acts",
    )
    p.add_argument("--rank", type=int, help="PEFT methods: rank (default: the one matching CLOVER's trainable count)")
    p.add_argument("--alpha", type=float, help="LoRA family: lora_alpha (default 2 x rank; PSOFT: rank)")
    p.add_argument("--eval-tasks", type=_csv_list, help="held-out tasks to score (default: the training tasks)")
    p.add_argument("--eval-limit", type=int, help="held-out rows scored per task (default: all, up to 500)")
    p.add_argument(
        "--selection-rows",
        type=int,
        default=0,
        help="also score this many held-out rows after the --eval-limit reported ones (disjoint): pick the "
        "learning rate on these, report the others (tasks with no rows left after --eval-limit sit it out)",
    )
    p.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size, help="lm-eval batch size")
    p.add_argument("--eval-base", action="store_true", help="also score the untouched model first (reference)")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the held-out evaluation")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest when other jobs share the cores)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON report instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_finetune)
    return p


def options_from_args(args: argparse.Namespace) -> FinetuneOptions:
    """FinetuneOptions from parsed ``clover finetune`` arguments."""
    names = {f.name for f in FinetuneOptions.__dataclass_fields__.values()}
    return FinetuneOptions(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def cmd_finetune(args: argparse.Namespace) -> int:
    """Run ``clover finetune``; user mistakes raise CloverError."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    options = options_from_args(args)
    quiet = args.quiet or args.json
    report = run_finetune(
        args.model, options, args.out, overwrite=args.overwrite, progress=not args.quiet,
        log=(lambda *_: None) if quiet else print,
    )  # fmt: skip
    report.pop("log")
    if args.json:
        print(json.dumps(report))
        return 0
    train = report["train"]
    print(
        f"{options.method} on {options.task}: {options.steps} steps in {report['seconds']} s, "
        f"{'loss' if options.task == data.SST2 else 'answer-token loss'} "
        f"{train['first_loss']:.4f} -> {train['final_loss']:.4f}, {train['median_step_seconds']} s/step"
    )
    for label, key in (("base model", "base_heldout"), ("fine-tuned", "heldout"), ("selection rows", "selection")):
        scores = report.get(key)
        if scores and "wikitext2_test" in scores:
            result = scores["wikitext2_test"]
            print(f"WikiText-2 test perplexity, {label}: {result['perplexity']:.3f} ({result['tokens']} tokens, "
                  f"{result['window']}-token windows)")  # fmt: skip
        elif scores:
            cells = ", ".join(f"{task} {s['acc']:.3f} (n={s['n']})" for task, s in scores.items())
            print(f"held-out accuracy, {label}: {cells}; average {_average(scores):.3f}")
    kind = "pruned checkpoint" if report["pruned"] else "merged model"
    print(
        f"wrote {args.out}: {kind} ({report['parameters_after']:,} parameters, as before: "
        f"{report['parameters_before']:,}), {ADAPTER_DIR}/, {TRAIN_LOG}, {REPORT}"
    )
    return 0
