"""Calibrated V-O pruning curves through the streaming path (``clover prune --stream``), WikiText-2 perplexity.

Every prune reads the checkpoint one layer at a time and writes the pruned one the same way; calibration runs
with each module's weights read from disk just before its forward (the moments are cached after the first
ratio). Run on the largest real weights that ship (Qwen2.5-Coder-0.5B) next to SmolLM2-135M:

    .venv/bin/python benchmarks/streaming_curve.py [--models qwen2.5-coder-0.5b,smollm2-135m] [--ratios ...]

Writes benchmarks/results/streaming_curve.csv and streaming_curve.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import subprocess
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def clover(*arguments: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "clover.cli", *arguments, "--json", "--quiet"],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"clover {' '.join(arguments)}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen2.5-coder-0.5b,smollm2-135m")
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--tokens", type=int, default=4096, help="WikiText-2 test tokens scored (512-token windows)")
    parser.add_argument("--calibration-samples", type=int, default=32)
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        base = clover("eval", model, "--tokens", str(args.tokens))
        rows.append({"model": model, "vo_ratio": 0.0, "ppl": round(base["wikitext2_test_ppl"], 3),
                     "parameters": base["parameters"], "prune_s": 0.0})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        for ratio in args.ratios.split(","):
            with tempfile.TemporaryDirectory(prefix="clover-curve-") as work:
                out = str(pathlib.Path(work) / "pruned")
                start = time.perf_counter()
                clover("prune", model, "--stream", "--method", "calibrated", "--vo-ratio", ratio, "--out", out,
                       "--calibration-samples", str(args.calibration_samples))  # fmt: skip
                seconds = time.perf_counter() - start
                scored = clover("eval", out, "--tokens", str(args.tokens))
            rows.append({"model": model, "vo_ratio": float(ratio), "ppl": round(scored["wikitext2_test_ppl"], 3),
                         "parameters": scored["parameters"], "prune_s": round(seconds, 1)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "streaming_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(row["model"] for row in rows):
        points = [(row["vo_ratio"], row["ppl"]) for row in rows if row["model"] == model]
        ax.plot(*zip(*points, strict=True), marker="o", label=model)
    ax.set(xlabel="V-O dims removed (calibrated CLOVER, uniform, streamed)", ylabel="WikiText-2 test perplexity",
           yscale="log", title="Streaming prune: calibrated V-O")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "streaming_curve.png", dpi=120)
    print(f"wrote {RESULTS / 'streaming_curve.csv'} and streaming_curve.png")


if __name__ == "__main__":
    main()
