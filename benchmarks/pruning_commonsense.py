"""Commonsense accuracy of pruned SmolLM2-135M (lm-evaluation-harness on the offline validation sets).

    .venv/bin/python benchmarks/pruning_commonsense.py [--ratios 0.25 0.5] [--limit 100]

V-O dims removed uniformly (RoPE forbids Q-K pruning) by plain CLOVER, calibrated CLOVER and the two vanilla
baselines; zero-shot accuracy (lm-eval 0.4, `acc`) on the first ``--limit`` rows of each task's validation
split, the same rows for every model, next to WikiText-2 test perplexity. Calibration: 128 x 512 tokens of
WikiText-2 validation, one set of input moments shared by every run.
"""

from __future__ import annotations

import argparse
import os
import time

from common import RESULTS, header, machine, write_csv

from clover.evaluate import lm_eval_accuracy
from clover.models import load_model
from clover.prune import InputMoments, PruneConfig, prune_
from clover.quality import calibration_callback, measure

MODEL = "smollm2-135m"
TASKS = ["piqa", "arc_easy", "boolq", "winogrande"]
METHODS = ("clover", "calibrated", "vanilla", "vanilla-activation")


def score(loaded, limit: int) -> dict:
    quality = measure(loaded)
    accuracy = lm_eval_accuracy(loaded.model, loaded.tokenizer, TASKS, limit=limit)
    row = {
        "wikitext2_test_ppl": round(quality["wikitext2_test_ppl"], 3),
        "kv_bytes_per_token": quality["kv_bytes_per_token"],
    }
    row.update({task: round(accuracy[task]["acc"], 4) for task in TASKS})
    row["avg_acc"] = round(sum(accuracy[t]["acc"] for t in TASKS) / len(TASKS), 4)
    row["n_per_task"] = accuracy[TASKS[0]]["n"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5], help="shares of V-O dims removed")
    parser.add_argument("--limit", type=int, default=100, help="rows per task (the first of each validation set)")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    header(f"commonsense accuracy of {MODEL} after V-O pruning (uniform allocation)")
    started = time.perf_counter()
    base = load_model(MODEL)
    rows = [{"method": "none", "vo_removed": 0.0, **score(base, args.limit)}]
    print(rows[-1], flush=True)
    moments = InputMoments.collect(base.model, calibration_callback(base, samples=128, seq_len=512))
    del base
    for ratio in args.ratios:
        for method in METHODS:
            loaded = load_model(MODEL)
            prune_(loaded.model, PruneConfig(vo_ratio=ratio, method=method), input_moments=moments)
            rows.append({"method": method, "vo_removed": ratio, **score(loaded, args.limit)})
            print(rows[-1], flush=True)
    csv_path = write_csv("pruning_commonsense.csv", rows)
    n = rows[0]["n_per_task"]
    lines = [
        f"# {MODEL}, V-O dims removed uniformly; zero-shot lm-eval accuracy on the first {n} validation rows per "
        "task; WikiText-2 test perplexity (4096 tokens, 512-token windows, fp32)",
        "",
        "| V-O removed | method | PPL | " + " | ".join(TASKS) + " | avg acc | KV bytes/token |",
        "|---:|---|---:|" + "---:|" * len(TASKS) + "---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vo_removed']:.0%} | {r['method']} | {r['wikitext2_test_ppl']:.2f} | "
            + " | ".join(f"{r[t]:.3f}" for t in TASKS)
            + f" | {r['avg_acc']:.3f} | {r['kv_bytes_per_token']:,} |"
        )
    stderr = (0.25 / n) ** 0.5
    lines += [
        "",
        f"Binomial standard error: about {stderr:.3f} per task, {stderr / len(TASKS) ** 0.5:.3f} on the average.",
        f"CSV: benchmarks/results/{csv_path.name}; machine: {machine()}; "
        f"wall time {(time.perf_counter() - started) / 60:.1f} min",
    ]
    text = "\n".join(lines)
    print(text)
    (RESULTS / "pruning_commonsense.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
