"""One fine-tuning run end to end: load, wrap (CLOVER or a PEFT baseline), train, score, merge, save.

Every method trains through the same loop (:func:`clover.training.train`) on the same examples in the same
order; the options' defaults are the short-CPU-run recipe. Data and split: :mod:`clover.finetune_data`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clover import finetune_data as data
from clover.baselines import (
    CLOVER,
    METHODS,
    PEFT_TARGETS,
    RANKED,
    SCALED,
    WITH_DROPOUT,
    count_trainable,
    inner_model,
    merge,
    save_adapter,
    wrap_model,
)
from clover.decompose import refuse_non_finite_weights
from clover.errors import CloverError
from clover.evaluate import context_length
from clover.training import (
    CausalLMTask,
    MeanPoolClassifier,
    SST2Task,
    TrainResult,
    pad_token_id,
    sst2_accuracy,
    train,
)

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
    method: str = CLOVER
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
    tokenizer: str | None = None  # a directory to read the tokenizer from; None: the model's own

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
        if self.alpha is not None and not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha)):
            raise CloverError(f"--alpha {self.alpha} must be a finite number (or omit it: 2 x rank)")
        if self.alpha is not None and self.alpha <= 0:
            raise CloverError(f"--alpha {self.alpha} must be > 0: it scales the update (omit it: 2 x rank)")
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
        if self.method != CLOVER and self.targets is not None:
            if bad := [t for t in self.targets if t not in PEFT_TARGETS]:
                raise CloverError(f"--targets {bad} unknown for {self.method}; choose from {', '.join(PEFT_TARGETS)}")
        if self.eval_limit is not None and self.task == data.WIKITEXT:
            raise CloverError("--eval-limit applies to held-out rows; wikitext is scored on WikiText-2 test text")
        if self.eval_tasks is not None:
            if self.task in (data.SST2, data.WIKITEXT):
                raise CloverError(
                    "--eval-tasks applies to the commonsense tasks; sst2 and wikitext are scored on their own "
                    "held-out text"
                )
            for task in self.eval_tasks:
                if task not in data.COMMONSENSE:
                    raise CloverError(f"unknown eval task {task!r}: use some of {', '.join(data.COMMONSENSE)}")
        if not self.evaluate and (self.eval_base or self.eval_tasks is not None or self.eval_limit is not None):
            given = [flag for flag, value in (("--eval-base", self.eval_base), ("--eval-tasks", self.eval_tasks),
                     ("--eval-limit", self.eval_limit)) if value not in (False, None)]  # fmt: skip
            raise CloverError(f"{', '.join(given)} with --no-eval: nothing is scored; drop one or the other")

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


def wikitext2_test_perplexity(model: nn.Module, tokenizer: Any) -> dict[str, float]:
    """WikiText-2 test perplexity (first 4096 tokens, 512-token windows or the model's context, the model's dtype)."""
    from clover.evaluate import fitting_window, perplexity, wikitext2_text

    window = fitting_window(model, PERPLEXITY_WINDOW)  # a model with a shorter context: windows that fit it
    result = perplexity(model, tokenizer, wikitext2_text("test"), window=window, max_tokens=PERPLEXITY_TOKENS)
    return {"perplexity": round(result.ppl, 4), "tokens": result.tokens_scored, "window": result.window}


def average_accuracy(scores: dict[str, dict[str, float]]) -> float:
    """Unweighted mean of the per-task accuracies of a report's held-out scores."""
    return sum(s["acc"] for s in scores.values()) / len(scores)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _write_log(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def saved_weights_dtype(checkpoint: Path | None) -> torch.dtype | None:
    """The floating dtype a checkpoint directory's config.json says its weights were saved in, if it says one."""
    if checkpoint is None or not (checkpoint / "config.json").is_file():
        return None
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def run_finetune(
    model_name: str, options: FinetuneOptions, out: str | os.PathLike | None, *, overwrite: bool = False,
    progress: bool = True, log: Any = print,
) -> dict[str, Any]:  # fmt: skip
    """Load, wrap, train, (score), merge and save one run; returns the report (also written to DIR)."""
    from clover.families import pruned_site_specs
    from clover.io import atomic_directory, check_output_dir, save_loaded_model, write_pruned_model
    from clover.models import load_model

    options.validate()
    default = FinetuneOptions()
    ignored = {
        "--rank": options.method not in RANKED and options.rank is not None,
        "--alpha": options.method not in SCALED and options.alpha is not None,
        "--dropout": options.method not in WITH_DROPOUT and options.dropout != default.dropout,
        "--dropout-placement": options.method != CLOVER and options.dropout_placement != default.dropout_placement,
    }
    for flag in (flag for flag, unused in ignored.items() if unused):  # a note: scripts pass one set to every method
        print(f"clover: note: {flag} does not apply to --method {options.method}, so it is ignored", file=sys.stderr)
    if out is not None:
        check_output_dir(out, overwrite=overwrite, inputs=[model_name])  # never the model it trains
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    started = time.perf_counter()
    loaded = load_model(model_name, tokenizer=options.tokenizer)
    sst2 = options.task == data.SST2
    wanted = "encoder" if sst2 else "causal-lm"
    if loaded.kind != wanted:
        raise CloverError(
            f"--task {options.task} needs a{'n' if sst2 else ''} {wanted} model (e.g. "
            f"{'minilm-l6' if sst2 else 'smollm2-135m'}); {model_name} is {loaded.described}"
        )
    if loaded.tokenizer is None:
        raise CloverError(
            f"{model_name} has no tokenizer files; pass --tokenizer DIR (e.g. the original model's directory)"
        )
    refuse_non_finite_weights(loaded.model)  # every method: PiSSA's SVD would not converge, the rest train on nan
    model, tokenizer = loaded.model.to(options.torch_device), loaded.tokenizer
    limit = context_length(model)
    if limit is not None and options.max_length > limit:  # past it: IndexError, or RoPE silently extrapolating
        print(
            f"clover: note: --max-length {options.max_length} is longer than {model_name}'s context; examples are "
            f"cut to {limit} tokens",
            file=sys.stderr,
        )
        options = replace(options, max_length=limit)
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
            report["base_heldout"] = {"wikitext2_test": wikitext2_test_perplexity(model, tokenizer)}
        else:
            report["base_heldout"] = data.heldout_accuracy(
                model, tokenizer, eval_tasks, limit=options.eval_limit, batch_size=options.eval_batch_size,
                progress=progress,
            )  # fmt: skip
    wrap_options = {
        "targets": options.targets, "rank": options.rank, "alpha": options.alpha, "dropout": options.dropout,
        "dropout_placement": options.dropout_placement, "seed": options.seed,
    }  # fmt: skip
    if sst2:
        torch.manual_seed(options.seed)
        classifier = MeanPoolClassifier(model).to(options.torch_device)
        wrapped, info = wrap_model(model, options.method, **wrap_options)
        classifier.encoder = wrapped
        info["trainable"] += sum(p.numel() for p in classifier.head.parameters())
        info["all"] += sum(p.numel() for p in classifier.head.parameters())
    else:
        needed = options.steps * options.batch_size * options.grad_accum
        if text:
            stream = data.wikitext_examples(tokenizer, options.max_length, needed, options.seed)
        else:
            stream = data.training_examples(options.task, tokenizer, needed, options.seed)
        wrapped, info = wrap_model(model, options.method, **wrap_options)
    report["adapter"] = info
    log(
        f"trainable params: {info['trainable']:,d} || all params: {info['all']:,d} || "
        f"trainable%: {100 * info['trainable'] / info['all']:.4f}"
    )
    cuda = options.torch_device.type == "cuda"
    if cuda:  # RSS says little on a GPU: also report the device's peak allocation over training
        torch.cuda.reset_peak_memory_stats(options.torch_device)
    batching = {"batch_size": options.batch_size, "grad_accum": options.grad_accum, "max_length": options.max_length}
    if sst2:
        module, task = classifier, SST2Task(classifier, tokenizer, **batching, seed=options.seed)
    else:
        module, task = wrapped, CausalLMTask(inner_model(wrapped), stream, **batching, pad_id=pad_token_id(tokenizer))
    result: TrainResult = train(
        module, task, steps=options.steps, lr=options.lr, warmup=options.warmup, grad_clip=options.grad_clip,
        seed=options.seed, desc=f"finetune {options.method}", progress=progress,
    )  # fmt: skip
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
    # the output's hidden staging folder: the adapter goes in before the merge spends it, the rest after scoring
    staging_folder = nullcontext() if out is None else atomic_directory(out, overwrite=overwrite, inputs=[model_name])
    with torch.no_grad():
        with staging_folder as staging:
            if staging is not None:
                save_adapter(wrapped, staging / ADAPTER_DIR)
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
                    report["heldout"] = {"wikitext2_test": wikitext2_test_perplexity(merged, tokenizer)}
                else:
                    report["heldout"] = data.heldout_accuracy(
                        merged, tokenizer, eval_tasks, limit=options.eval_limit, batch_size=options.eval_batch_size,
                        progress=progress,
                    )  # fmt: skip
                if not text:
                    report["heldout_average_acc"] = round(average_accuracy(report["heldout"]), 4)
                if options.selection_rows:
                    report["selection"] = data.heldout_accuracy(
                        merged, tokenizer, selection_tasks, limit=options.selection_rows,
                        batch_size=options.eval_batch_size, offset=options.eval_limit, progress=progress,
                    )  # fmt: skip
                    report["selection_average_acc"] = round(average_accuracy(report["selection"]), 4)
                report["eval_seconds"] = round(time.perf_counter() - eval_started, 1)
            report["seconds"] = round(time.perf_counter() - started, 1)
            if staging is not None:
                # training runs in float32; the result is written back in the checkpoint's own dtype, as prune does
                saved_dtype = saved_weights_dtype(loaded.source)
                if saved_dtype is not None and saved_dtype != merged.dtype:
                    merged.to(saved_dtype)
                # the scores above are the float32 model's; the report says what the written weights are
                report["saved_dtype"] = str(merged.dtype).removeprefix("torch.")
                if report["pruned"]:  # a healed pruned model stays a pruned checkpoint (auto_map + code)
                    write_pruned_model(replace(loaded, model=merged), staging)
                else:
                    save_loaded_model(replace(loaded, model=merged), staging)  # tokenizer without loader arguments
                if sst2:
                    from safetensors.torch import save_file

                    state = {k: v.detach().contiguous() for k, v in classifier.head.state_dict().items()}
                    save_file(state, staging / HEAD_FILE)
                _write_log(result.log, staging / TRAIN_LOG)
                (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    report["log"] = result.log
    return report
