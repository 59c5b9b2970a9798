"""``clover finetune``: argument parsing over :func:`clover.finetune_run.run_finetune` (the library does the work)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from clover import finetune_data as data
from clover.baselines import METHODS
from clover.cli_common import DEVICE_HELP, OVERWRITE_HELP
from clover.finetune_run import ADAPTER_DIR, REPORT, TRAIN_LOG, FinetuneOptions, average_accuracy, run_finetune


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand (``set_defaults(func=cmd_finetune)``) to the CLI's subparsers."""
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
    p.add_argument(
        "--tokenizer", metavar="DIR", help="read the tokenizer from DIR (e.g. the original model's directory), for "
        "weights saved without one; it is written into --out"
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
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
        f"{'answer-token loss' if options.task not in (data.SST2, data.WIKITEXT) else 'loss'} "
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
            print(f"held-out accuracy, {label}: {cells}; average {average_accuracy(scores):.3f}")
    kind = "pruned checkpoint" if report["pruned"] else "merged model"
    print(
        f"wrote {args.out}: {kind} ({report['parameters_after']:,} parameters, as before: "
        f"{report['parameters_before']:,}), {ADAPTER_DIR}/, {TRAIN_LOG}, {REPORT}"
    )
    return 0
