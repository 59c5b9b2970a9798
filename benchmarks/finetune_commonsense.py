"""Fine-tune SmolLM2-135M on the commonsense mix: CLOVER vs LoRA, DoRA, PiSSA, HiRA, PSOFT, OSF at matched budgets.

The fair-comparison rule of the method notes (section 6): every method sees the same examples in the same
order (the balanced mix of the 8 training parts, clover.finetune_data), the same steps, seeds and batch, and
the same loss masking (answer tokens only), and each gets its learning rate from the same small sweep. The
sweep is judged on held-out rows that are never reported (``selection_rows`` per task, the ones after the
reported ``eval_limit`` rows of the fixed held-out order), so the reported accuracy is not selected on.
Each PEFT method's rank is the one whose trainable count is closest to CLOVER's default recipe (PSOFT's
r x r matrices are capped by the 192-wide K/V projections, so it stays below).

Each run (and the zero-shot base model) runs in its own subprocess, so its peak RSS is its own; step time
and peak RSS are reported as ratios against LoRA measured in the same benchmark run. The small default
(3 seeds for CLOVER and LoRA, 1 for the others) takes about 90 minutes of a 2-core CPU on 1 torch thread
(2 threads on 2 cores shared with another job spin-wait and run 5x slower). ``--full`` is the configuration
for a GPU: 3 seeds for every method, all 8 tasks, 300 reported + 100 selection rows per task, 1000 steps
and a five-point sweep."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, machine, write_csv  # noqa: E402

MODEL = "smollm2-135m"
ALL_METHODS = ("clover", "lora", "dora", "pissa", "hira", "psoft", "osf")
SMALL = {
    "steps": 60,
    "batch_size": 8,
    "grad_accum": 1,
    "max_length": 128,
    "eval_tasks": ["piqa", "arc_easy", "boolq", "winogrande"],
    "eval_limit": 40,  # reported rows per task
    "selection_rows": 40,  # the next 40 held-out rows per task: learning rates are chosen on these only
    "seeds": {"clover": [0, 1, 2], "lora": [0, 1, 2]},  # every other method: seed 0
    "sweep": {m: [5e-4, 1e-3] for m in ALL_METHODS},
    # if the time budget allows: CLOVER with its dropout moved from the frozen path to the update (LoRA's
    # placement) at CLOVER's selected lr, an ablation
    "extra": [("clover-update-dropout", "clover", {"dropout_placement": "update"})],
    "threads": 1,
    "budget_minutes": 100,
}
FULL = {
    "steps": 1000,
    "batch_size": 16,
    "grad_accum": 1,
    "max_length": 256,
    "eval_tasks": ["boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"],
    "eval_limit": 300,
    "selection_rows": 100,
    "seeds": {m: [0, 1, 2] for m in ALL_METHODS},
    "sweep": {m: [1e-4, 3e-4, 5e-4, 1e-3, 2e-3] for m in ALL_METHODS},
    "extra": [("clover-update-dropout", "clover", {"dropout_placement": "update"})],
    "threads": None,
    "budget_minutes": None,
}


# ---------------------------------------------------------------- one run in a subprocess


def worker(spec: dict) -> None:
    """Child process: score the base model or train one run; print one RESULT line of JSON."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from clover import finetune_data as data
    from clover.finetune_run import FinetuneOptions, run_finetune
    from clover.training import peak_rss_kb

    options = FinetuneOptions(**spec["options"])
    if options.threads:
        torch.set_num_threads(options.threads)
    if spec["mode"] == "base":
        from clover.models import load_model

        started = time.perf_counter()
        loaded = load_model(MODEL)
        scores = data.heldout_accuracy(
            loaded.model.to(options.torch_device),
            loaded.tokenizer,
            options.eval_tasks,
            limit=options.eval_limit,
            batch_size=16,
        )
        report = {"heldout": scores, "eval_seconds": round(time.perf_counter() - started, 1)}
    else:
        report = run_finetune(MODEL, options, None, progress=False, log=lambda *_: None)
    report["process_peak_rss_mb"] = round(peak_rss_kb() / 1024, 1)
    print("RESULT " + json.dumps(report), flush=True)


def run_child(mode: str, options: dict) -> dict:
    """Run one worker and return its report (raises with its stderr tail on failure)."""
    spec = json.dumps({"mode": mode, "options": options})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if options.get("threads"):
        env["OMP_NUM_THREADS"] = str(options["threads"])
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(lines[-1].removeprefix("RESULT "))
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report


# ---------------------------------------------------------------- the benchmark


def _avg(scores: dict) -> float:
    return sum(s["acc"] for s in scores.values()) / len(scores)


def _tail_loss(log: list[dict], n: int = 5) -> float:
    return sum(r["loss"] for r in log[-n:]) / len(log[-n:])


def plot_losses(runs: list[dict], path: Path) -> None:
    """Answer-token training loss per step (thin) and its 5-step moving average (thick), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(runs):
        steps = [r["step"] for r in run["log"]]
        losses = [r["loss"] for r in run["log"]]
        smooth = [sum(losses[max(0, k - 4) : k + 1]) / len(losses[max(0, k - 4) : k + 1]) for k in range(len(losses))]
        color = f"C{i}"
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        label = f"{run['label']} lr {run['lr']:g} (seed {run['seed']}, {run['trainable']:,} trainable)"
        ax.plot(steps, smooth, color=color, linewidth=2, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token cross-entropy (nats)")
    ax.set_title(f"{MODEL} on the commonsense mix: training loss (same batches for every run)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the GPU configuration (3 seeds, 8 tasks, all methods)")
    parser.add_argument("--steps", type=int, help="override the optimizer steps")
    parser.add_argument("--eval-limit", type=int, help="override the held-out rows per task")
    parser.add_argument("--budget-minutes", type=float, help="skip the optional runs that would not fit")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="only these methods (no ablation)")
    parser.add_argument(
        "--eval-tasks", nargs="+", choices=[*FULL["eval_tasks"], "all"], help="held-out tasks to score ('all': all 8)"
    )
    parser.add_argument("--seeds", type=int, help="seeds per method (0..N-1) for every selected method")
    parser.add_argument("--lr", type=float, help="no sweep: train every method at this learning rate")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: 1 on the CPU config)")
    parser.add_argument("--name", default="finetune_commonsense", help="results file stem under results/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    config = dict(FULL if args.full else SMALL)
    for key in ("steps", "eval_limit", "budget_minutes", "threads"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.eval_tasks:
        config["eval_tasks"] = FULL["eval_tasks"] if "all" in args.eval_tasks else args.eval_tasks
    if args.methods:
        if not {"clover", "lora"} <= set(args.methods):
            parser.error("--methods must include clover and lora (counts are against CLOVER, costs against LoRA)")
        config["sweep"] = {m: config["sweep"][m] for m in args.methods}
        config["extra"] = []
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error("--seeds must be at least 1")
        config["seeds"] = {m: list(range(args.seeds)) for m in config["sweep"]}
    if args.lr is not None:
        if not args.lr > 0:
            parser.error("--lr must be positive")
        # a fixed learning rate (e.g. the one an earlier sweep selected): nothing is selected here
        config["sweep"] = {m: [args.lr] for m in config["sweep"]}
        config["selection_rows"] = 0
    header(f"fine-tuning {MODEL} on the commonsense mix: CLOVER vs PEFT baselines at matched trainable counts")
    started = time.perf_counter()
    common = {
        "task": "commonsense",
        "steps": config["steps"],
        "batch_size": config["batch_size"],
        "grad_accum": config["grad_accum"],
        "max_length": config["max_length"],
        "eval_tasks": config["eval_tasks"],
        "eval_limit": config["eval_limit"],
        "threads": config["threads"],
    }
    print(f"# config: {json.dumps({k: v for k, v in config.items() if k != 'sweep'})}")
    print(f"# sweep: {json.dumps(config['sweep'])}", flush=True)

    base = run_child("base", common)
    print(f"# base model scored in {base['wall_seconds']} s: average {_avg(base['heldout']):.3f}", flush=True)

    runs: list[dict] = []
    budget = config["budget_minutes"] * 60 if config["budget_minutes"] else None

    def train(method: str, lr: float, seed: int, optional: bool = False, label: str = "", **extra: object) -> None:
        label = label or method
        if optional and budget is not None and runs:
            expected = sum(r["wall_seconds"] for r in runs) / len(runs)
            if time.perf_counter() - started + expected > budget:
                print(f"# skipped {label} lr {lr:g} seed {seed}: would exceed the {budget / 60:.0f}-minute budget")
                return
        options = {**common, "method": method, "lr": lr, "seed": seed, **extra}
        options["selection_rows"] = config["selection_rows"] if seed == 0 else 0
        report = run_child("train", options)
        report.update(label=label, method=method, lr=lr, seed=seed, trainable=report["adapter"]["trainable"])
        runs.append(report)
        picked = f", selection rows {report['selection_average_acc']:.3f}" if "selection_average_acc" in report else ""
        print(
            f"# {label} lr {lr:g} seed {seed}: reported rows {report['heldout_average_acc']:.3f}{picked}, loss "
            f"{report['train']['first_loss']:.3f} -> {_tail_loss(report['log']):.3f}, "
            f"{report['train']['median_step_seconds']:.2f} s/step, {report['wall_seconds']} s",
            flush=True,
        )

    def selected_lr(label: str) -> float | None:
        """The swept lr with the best seed-0 accuracy on the selection rows (never the reported rows)."""
        if not config["selection_rows"]:
            return next((r["lr"] for r in runs if r["label"] == label), None)
        mine = [r for r in runs if r["label"] == label and "selection_average_acc" in r]
        return max(mine, key=lambda r: r["selection_average_acc"])["lr"] if mine else None

    sweep, seeds = config["sweep"], config["seeds"]
    # CLOVER and LoRA first (sweep, then their extra seeds): the comparison that must finish; then the others
    firsts = [m for m in ("clover", "lora") if m in sweep]
    for method in firsts:
        for lr in sweep[method]:
            train(method, lr, 0)
    for method in firsts:
        for seed in seeds.get(method, [0])[1:]:
            train(method, selected_lr(method), seed)
    for method in [m for m in sweep if m not in firsts]:
        for lr in sweep[method]:
            train(method, lr, 0, optional=True)
        if selected_lr(method) is not None:
            for seed in seeds.get(method, [0])[1:]:
                train(method, selected_lr(method), seed, optional=True)
    for label, method, extra in config["extra"]:
        for seed in seeds.get(method, [0]):
            train(method, selected_lr(method), seed, optional=True, label=label, **extra)

    # ratios against LoRA in this run (mean over LoRA runs: the batches are identical, only contention varies)
    lora = [r for r in runs if r["method"] == "lora" and r["label"] == "lora"]
    lora_step = sum(r["train"]["median_step_seconds"] for r in lora) / len(lora)
    lora_rss = sum(r["train"]["peak_rss_mb"] for r in lora) / len(lora)
    clover_count = next(r["trainable"] for r in runs if r["method"] == "clover")
    labels = list(dict.fromkeys(r["label"] for r in runs))
    selected = {label: selected_lr(label) for label in labels}
    selected.update({label: selected_lr(method) for label, method, _ in config["extra"]})
    tasks = config["eval_tasks"]
    rows = [
        {"run": "base (zero-shot)", "method": "none", "lr": "", "seed": "", "selected": "", "rank": "",
         "trainable": 0, "trainable_vs_clover": 0.0, "steps": 0,
         **{t: round(base["heldout"][t]["acc"], 4) for t in tasks}, "avg_acc": round(_avg(base["heldout"]), 4),
         "selection_avg_acc": "", "n_per_task": base["heldout"][tasks[0]]["n"], "first_loss": "", "final_loss": "",
         "median_step_s": "", "step_time_vs_lora": "", "peak_rss_mb": "", "peak_rss_vs_lora": "",
         "train_eval_wall_s": base["wall_seconds"]}
    ]  # fmt: skip
    for r in runs:
        rows.append(
            {"run": f"{r['label']} lr {r['lr']:g} seed {r['seed']}", "method": r["label"], "lr": r["lr"],
             "seed": r["seed"], "selected": r["lr"] == selected.get(r["label"]), "rank": r["adapter"].get("rank", ""),
             "trainable": r["trainable"], "trainable_vs_clover": round(r["trainable"] / clover_count, 4),
             "steps": r["train"]["steps"], **{t: round(r["heldout"][t]["acc"], 4) for t in tasks},
             "avg_acc": r["heldout_average_acc"], "selection_avg_acc": r.get("selection_average_acc", ""),
             "n_per_task": r["heldout"][tasks[0]]["n"],
             "first_loss": r["train"]["first_loss"], "final_loss": round(_tail_loss(r["log"]), 4),
             "median_step_s": r["train"]["median_step_seconds"],
             "step_time_vs_lora": round(r["train"]["median_step_seconds"] / lora_step, 3),
             "peak_rss_mb": r["train"]["peak_rss_mb"],
             "peak_rss_vs_lora": round(r["train"]["peak_rss_mb"] / lora_rss, 3),
             "train_eval_wall_s": r["wall_seconds"]}
        )  # fmt: skip
    csv_path = write_csv(f"{args.name}.csv", rows)
    png_path = RESULTS / ("finetune_loss.png" if args.name == "finetune_commonsense" else f"{args.name}_loss.png")
    plot_losses([r for r in runs if r["lr"] == selected.get(r["label"]) and r["seed"] == 0], png_path)

    n = rows[0]["n_per_task"]
    lines = [
        f"# {MODEL}, commonsense mix, {config['steps']} steps x batch {config['batch_size'] * config['grad_accum']}, "
        f"max length {config['max_length']}; held-out accuracy (lm-eval, zero-shot, acc) on {n} reported held-out "
        f"rows per task; "
        + (
            f"each method's lr chosen on {config['selection_rows']} other held-out rows per task"
            if config["selection_rows"]
            else f"learning rate fixed at {args.lr:g} (no sweep in this run)"
        ),
        "",
        "Each method at its selected learning rate (mean ± std over seeds where there are several):",
        "",
        "| method | lr | seeds | trainable | " + " | ".join(tasks) + " | avg | step time ÷ LoRA | peak RSS ÷ LoRA |",
        "|---|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---:|---:|",
    ]

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        return f"{mean:.3f} ± {std:.3f}"

    lines.append(
        "| base (zero-shot) | | | 0 | " + " | ".join(f"{rows[0][t]:.3f}" for t in tasks)
        + f" | {rows[0]['avg_acc']:.3f} | | |"
    )  # fmt: skip
    for label in list(dict.fromkeys(row["method"] for row in rows[1:])):
        chosen = [row for row in rows[1:] if row["method"] == label and row["selected"] is True]
        if not chosen:
            continue
        lines.append(
            f"| {label} | {chosen[0]['lr']:g} | {len(chosen)} | {chosen[0]['trainable']:,} | "
            + " | ".join(cell([row[t] for row in chosen]) for t in tasks)
            + f" | {cell([row['avg_acc'] for row in chosen])} "
            + f"| {cell([row['step_time_vs_lora'] for row in chosen])} "
            + f"| {cell([row['peak_rss_vs_lora'] for row in chosen])} |"
        )  # fmt: skip
    if config["selection_rows"]:
        lines += [
            "",
            "The learning-rate sweep (seed 0; selection rows decide, reported rows shown for reference):",
            "",
            "| method | lr | selection-rows avg | reported-rows avg | final loss |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in rows[1:]:
            if row["seed"] == 0 and row["selection_avg_acc"] != "":
                mark = " **(selected)**" if row["selected"] is True else ""
                lines.append(
                    f"| {row['method']}{mark} | {row['lr']:g} | {row['selection_avg_acc']:.3f} | {row['avg_acc']:.3f} "
                    f"| {row['final_loss']} |"
                )
    stderr_task = (0.25 / n) ** 0.5
    lines += [
        "",
        f"Binomial standard error at n={n}: about {stderr_task:.3f} per task and "
        f"{stderr_task / len(tasks) ** 0.5:.3f} on the {len(tasks)}-task average.",
        f"LoRA: median step {lora_step:.2f} s, training peak RSS {lora_rss:.0f} MB (ratios are against these).",
        f"CSV: benchmarks/results/{csv_path.name}; loss curves: benchmarks/results/{png_path.name}",
        f"machine: {machine()}; each run in its own process on {config['threads'] or 'default'} torch thread(s); "
        f"wall time {(time.perf_counter() - started) / 60:.1f} min",
    ]
    text = "\n".join(lines)
    print(text)
    (RESULTS / f"{args.name}.txt").write_text(
        f"reproduce: python {' '.join(sys.argv)}\n"
        + json.dumps({k: v for k, v in config.items()})
        + "\n\n"
        + text
        + "\n"
    )


if __name__ == "__main__":
    main()
