"""Healing after pruning (the paper's final pipeline): prune SmolLM2-135M's V-O dims, then train briefly on text.

For each ratio: ``clover prune smollm2-135m --vo-ratio R --method calibrated`` (uniform allocation), then
``clover finetune PRUNED --task wikitext`` with CLOVER (the authors' targets q, v, up; on the pruned model the
V blocks are the reduced per-head matrices) and with PEFT's LoRA on q, k, v at the rank whose trainable count
is closest to CLOVER's: the same WikiText-2 validation chunks in the same order, steps, batch, lr, seed and
dropout (0 by default for both: no sweep was run, both use the fine-tuning benchmark's lr 5e-4).
Quality is WikiText-2 test perplexity (first 4096 tokens, 512-token windows, float32) before and after; the
healed checkpoint is again a pruned checkpoint (same dims and parameter count). The unpruned model is
trained the same way as a control, so the gain of healing can be told apart from adapting to WikiText.
Every step runs through the ``clover`` command line, in its own process, as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, machine, write_csv  # noqa: E402

MODEL = "smollm2-135m"
CLOVER = str(Path(sys.executable).with_name("clover"))


def run(args: list[str], threads: int | None) -> dict:
    """Run one clover command with --json; return its report and wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    proc = subprocess.run([CLOVER, *args, "--json"], capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"clover {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report


def train_log(directory: Path) -> list[dict]:
    import csv

    with (directory / "train_log.csv").open() as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"])} for r in csv.DictReader(f)]


def plot(rows: list[dict], logs: dict[str, list[dict]], unpruned: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['vo_removed']:.0%} V-O\n{r['method']}" for r in rows]
    x = range(len(rows))
    left.bar([i - 0.2 for i in x], [r["ppl_before"] for r in rows], width=0.4, label="before healing", color="C3")
    left.bar([i + 0.2 for i in x], [r["ppl_after"] for r in rows], width=0.4, label="after healing", color="C2")
    left.axhline(unpruned, color="k", linestyle="--", linewidth=1, label=f"unpruned {unpruned:.2f}")
    left.axhline(1.1 * unpruned, color="k", linestyle=":", linewidth=1, label="unpruned + 10%")
    left.set_xticks(list(x), labels, fontsize=8)
    values = [r["ppl_before"] for r in rows] + [r["ppl_after"] for r in rows]
    if max(values) > 5 * min(values):
        left.set_yscale("log")
    left.set_ylabel("WikiText-2 test perplexity")
    left.set_title("perplexity before / after healing")
    left.legend(fontsize=8)
    for i, (label, log) in enumerate(logs.items()):
        losses = [r["loss"] for r in log]
        smooth = [sum(losses[max(0, k - 4) : k + 1]) / len(losses[max(0, k - 4) : k + 1]) for k in range(len(losses))]
        right.plot([r["step"] for r in log], smooth, color=f"C{i}", label=label)
    right.set_xlabel("optimizer step")
    right.set_ylabel("training loss, 5-step average (nats)")
    right.set_title("healing loss on WikiText-2 validation")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(f"{MODEL}: calibrated CLOVER V-O pruning, then healing (same steps and data)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5], help="shares of V-O dims removed")
    parser.add_argument("--methods", nargs="+", default=["clover", "lora"], help="healing methods")
    parser.add_argument("--steps", type=int, default=60, help="healing steps (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per WikiText chunk")
    parser.add_argument(
        "--work-dir", help="keep the pruned checkpoints here and reuse them on the next run (default: a temp dir)"
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="one lr for every method (no sweep)")
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="every method (default 0: CLOVER's dropout on the frozen path would also perturb the pruned model)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: share the CPU)")
    parser.add_argument("--no-control", action="store_true", help="skip training the unpruned model")
    parser.add_argument("--name", default="heal_pruned", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    header(f"healing {MODEL} after calibrated CLOVER V-O pruning: CLOVER vs LoRA, {args.steps} steps")
    started = time.perf_counter()
    train = ["--task", "wikitext", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--max-length", str(args.max_length), "--lr", str(args.lr), "--dropout", str(args.dropout), "--quiet",
             "--overwrite"]  # fmt: skip
    if args.threads:
        train += ["--threads", str(args.threads)]
    rows, logs = [], {}
    unpruned = None
    with tempfile.TemporaryDirectory(prefix="clover-heal-") as tmp:
        work = Path(args.work_dir or tmp)
        targets = [(0.0, MODEL)] if not args.no_control else []
        for ratio in args.ratios:
            out = work / f"pruned-{ratio:g}"
            if (out / "config.json").is_file():
                print(f"# reusing {out}", flush=True)
            else:
                report = run(["prune", MODEL, "--vo-ratio", str(ratio), "--method", "calibrated", "--out", str(out),
                              "--quiet"], args.threads)  # fmt: skip
                print(f"# pruned {ratio:.0%} of V-O dims in {report['wall_seconds']} s", flush=True)
            targets.append((ratio, str(out)))
        for ratio, source in targets:
            for method in args.methods if ratio else args.methods[:1]:
                out = work / f"healed-{ratio:g}-{method}"
                command = ["finetune", source, "--out", str(out), "--method", method, *train, "--eval-base"]
                report = run(command, args.threads)
                before = report["base_heldout"]["wikitext2_test"]["perplexity"]
                after = report["heldout"]["wikitext2_test"]["perplexity"]
                if ratio == 0:
                    unpruned = before
                label = f"{ratio:.0%} V-O removed, {method}" if ratio else f"unpruned (control), {method}"
                logs[label] = train_log(out)
                rows.append(
                    {"vo_removed": ratio, "method": method, "lr": args.lr, "steps": args.steps,
                     "trainable": report["adapter"]["trainable"], "rank": report["adapter"].get("rank", ""),
                     "parameters": report["parameters_after"], "ppl_before": before, "ppl_after": after,
                     "first_loss": report["train"]["first_loss"],
                     "final_loss": round(sum(r["loss"] for r in logs[label][-5:]) / 5, 4),
                     "median_step_s": report["train"]["median_step_seconds"], "wall_s": report["wall_seconds"]}
                )  # fmt: skip
                print(
                    f"# {label}: perplexity {before:.2f} -> {after:.2f} ({report['adapter']['trainable']:,} "
                    f"trainable, {report['wall_seconds']} s)",
                    flush=True,
                )
    unpruned = unpruned or float("nan")
    for row in rows:
        row["after_vs_unpruned"] = round(row["ppl_after"] / unpruned, 4)
    csv_path = write_csv(f"{args.name}.csv", rows)
    png_path = RESULTS / f"{args.name}.png"
    plot([r for r in rows if r["vo_removed"]], logs, unpruned, png_path)
    lines = [
        f"# {MODEL}: healing after calibrated CLOVER V-O pruning (uniform), {args.steps} steps x batch "
        f"{args.batch_size} x {args.max_length} tokens of WikiText-2 validation, lr {args.lr:g}, dropout "
        f"{args.dropout:g}, seed 0",
        f"# WikiText-2 test perplexity (4096 tokens, 512-token windows, float32); unpruned model: {unpruned:.2f}",
        "",
        "| V-O dims removed | healing | trainable | parameters | PPL before | PPL after | after ÷ unpruned |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        removed = f"{r['vo_removed']:.0%}" if r["vo_removed"] else "0% (control)"
        lines.append(
            f"| {removed} | {r['method']}{' r' + str(r['rank']) if r['rank'] != '' else ''} | {r['trainable']:,} "
            f"| {r['parameters']:,} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | {r['after_vs_unpruned']:.3f} |"
        )
    lines += [
        "",
        f"CSV: benchmarks/results/{csv_path.name}; plot: benchmarks/results/{png_path.name}",
        f"machine: {machine()}; {args.threads or 'default'} torch thread(s) per process; "
        f"wall time {(time.perf_counter() - started) / 60:.1f} min",
    ]
    text = "\n".join(lines)
    print(text)
    (RESULTS / f"{args.name}.txt").write_text(f"reproduce: python {' '.join(sys.argv)}\n\n{text}\n")


if __name__ == "__main__":
    main()
