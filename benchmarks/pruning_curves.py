"""Pruning curves on real models: CLOVER, calibrated CLOVER, vanilla (weights / activations), by allocation.

    .venv/bin/python benchmarks/pruning_curves.py [--models smollm2-135m whisper-base minilm-l6] [--full]

Quality metric per model: SmolLM2-135M and Gemma-3-270M V-O (RoPE, and Gemma's QK-norm, block Q-K),
WikiText-2 test perplexity (first 4096 tokens,
non-overlapping 512-token windows, fp32); Whisper-base, encoder and decoder (self + cross) pruned separately,
Q-K and V-O separately: WER and decoder loss on espeak-ng speech of Harvard sentences; all-MiniLM-L6-v2:
mean cosine similarity of sentence embeddings to the unpruned model on 256 SST-2 sentences; DINOv2-small: mean
cosine similarity of the CLS token and of the mean patch token to the unpruned model's on the 7 scoring
photographs that ship in clover/data/images (calibration: the other 5). "ratio" is the
share of the pair's dims removed (per KV group) in the pruned stack. The default grid fits a 2-core CPU in
about half an hour; --full runs every ratio 0.1..0.9 for every method x allocation and pair (SmolLM2 and
MiniLM: about 40 minutes on 2 cores; Whisper-base with --sentences 16: 324 runs for 3 methods in 69 minutes,
the measured results use ``--full --sentences 16 --methods clover calibrated vanilla`` and then
``--full --sentences 16 --methods vanilla-activation --allocations global --no-thresholds``).
Calibration (calibrated and vanilla-activation) uses the same input moments for every run of a model:
128 x 512 tokens of WikiText-2 validation, Harvard sentences 21-40, SST-2 sentences 256-511, or the 5
calibration photographs. DINOv2-small, the measured grid: ``--models dinov2-small --full --threads 1
--csv pruning_curves_full_dinov2.csv`` (216 runs; on a busy 2-core machine one torch thread is several times
faster than two for the per-head QR / SVD).

Also: the paper's headline protocol (global allocation, Q-K) on the MHA models (which vanilla ratio matches
CLOVER at 70%?), and the paper's Whisper thresholds (σ_QK ≤ 5e-3, σ_VO ≤ 6e-3) applied to Whisper-base.
"""

from __future__ import annotations

import argparse
import time

import matplotlib
import numpy as np
import torch
from common import RESULTS, header, write_csv

from clover import evaluate, vision
from clover.models import load_model
from clover.prune import InputMoments, PruneConfig, prune_
from clover.quality import calibration_callback, measure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRIC = {
    "causal-lm": "wikitext2_test_ppl",
    "speech-seq2seq": "wer",
    "encoder": "similarity_to_original",
    "vision": "cls_similarity_to_original",
}
HIGHER_IS_BETTER = ("similarity_to_original", "cls_similarity_to_original", "patch_similarity_to_original")
ALL_RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
METHODS = ("clover", "calibrated", "vanilla", "vanilla-activation")
ALLOCATIONS = ("uniform", "layer", "global")
ROPE_MODELS = ("smollm2-135m", "gemma3-270m")  # RoPE (and Gemma's QK-norm) between Q and K: V-O only


def grid(
    name: str, full: bool, allocations: tuple[str, ...] = ALLOCATIONS, methods: tuple[str, ...] = METHODS
) -> list[dict]:
    """(stack, pair, method, allocation, ratios) runs for one model; --full is the complete grid."""
    if full:
        pairs = ("vo",) if name in ROPE_MODELS else ("qk", "vo")
        stacks = [("encoder",), ("decoder", "cross")] if name == "whisper-base" else [None]
        return [dict(stacks=st, pair=p, method=m, allocation=a, ratios=ALL_RATIOS)
                for st in stacks for p in pairs for m in methods for a in allocations]  # fmt: skip
    runs = []
    if name == "smollm2-135m":
        for method in methods:
            runs.append(dict(stacks=None, pair="vo", method=method, allocation="uniform",
                             ratios=[0.1, 0.25, 0.5, 0.75, 0.9]))  # fmt: skip
        for method in [m for m in ("clover", "calibrated") if m in methods]:
            for allocation in ("layer", "global"):
                runs.append(dict(stacks=None, pair="vo", method=method, allocation=allocation, ratios=[0.25, 0.5]))
    elif name == "whisper-base":
        for stacks in (("encoder",), ("decoder", "cross")):
            for pair in ("qk", "vo"):
                ratios = [0.05, 0.1, 0.3, 0.5, 0.7] if pair == "qk" and stacks == ("encoder",) else [0.3, 0.7]
                for method in methods:
                    runs.append(dict(stacks=stacks, pair=pair, method=method, allocation="global", ratios=ratios))
    else:
        for pair in ("qk", "vo"):
            ratios = [0.05, 0.1, 0.3, 0.5, 0.7, 0.9] if pair == "qk" else [0.1, 0.3, 0.5, 0.7, 0.9]
            for method in methods:
                runs.append(dict(stacks=None, pair=pair, method=method, allocation="global", ratios=ratios))
            for method in [m for m in ("clover", "calibrated") if m in methods]:
                for allocation in ("uniform", "layer"):
                    runs.append(dict(stacks=None, pair=pair, method=method, allocation=allocation, ratios=[0.3, 0.7]))
    return runs


def evaluate_model(loaded, sentences: int, reference, tokens: int = 4096) -> dict:
    report = measure(loaded, sentences=sentences, reference_embeddings=reference, tokens=tokens)
    return {k: v for k, v in report.items() if isinstance(v, int | float)}


def run_model(
    name: str,
    full: bool,
    sentences: int,
    allocations: tuple[str, ...] = ALLOCATIONS,
    methods: tuple[str, ...] = METHODS,
    thresholds: bool = True,
    checkpoint=lambda rows: None,
    ratios: list[float] | None = None,
    tokens: int = 4096,
) -> list[dict]:
    """Every run of the grid for one model; ``checkpoint(rows)`` is called after each, so a long run keeps its
    partial results."""
    base = load_model(name)
    reference = None
    if base.kind == "encoder":
        reference = evaluate.sentence_embeddings(base.model, base.tokenizer, evaluate.similarity_sentences(256))
    elif base.kind == "vision":
        reference = vision.scoring_features(base)
    start = time.perf_counter()
    baseline = evaluate_model(base, sentences, reference, tokens)
    print(
        f"{name}: unpruned {METRIC[base.kind]} = {baseline[METRIC[base.kind]]:.4g} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    moments = InputMoments.collect(base.model, calibration_callback(base, samples=128, seq_len=512))
    rows = [{"model": name, "stack": "all", "pair": "-", "method": "none", "allocation": "-", "ratio": 0.0,
             "removed": 0.0, **baseline}]  # fmt: skip
    for run in grid(name, full, allocations, methods):
        for ratio in ratios or run["ratios"]:
            loaded = load_model(name)
            options = PruneConfig(method=run["method"], allocation=run["allocation"], stacks=run["stacks"],
                                  **{f"{run['pair']}_ratio": ratio})  # fmt: skip
            report = prune_(loaded.model, options, input_moments=moments)
            metrics = evaluate_model(loaded, sentences, reference, tokens)
            removed = report.qk_removed if run["pair"] == "qk" else report.vo_removed
            stack = "+".join(run["stacks"]) if run["stacks"] else "all"
            rows.append({"model": name, "stack": stack, "pair": run["pair"], "method": run["method"],
                         "allocation": run["allocation"], "ratio": ratio, "removed": round(removed, 4),
                         **metrics})  # fmt: skip
            print(f"  {stack:14} {run['pair']} {run['method']:18} {run['allocation']:7} {ratio:.2f}: "
                  f"{METRIC[loaded.kind]} = {metrics[METRIC[loaded.kind]]:.4g}", flush=True)  # fmt: skip
            checkpoint(rows)
    if name == "whisper-base" and thresholds:
        loaded = load_model(name)
        prune_(loaded.model, PruneConfig(qk_threshold=5e-3, vo_threshold=6e-3, allocation="global", min_dims=0))
        metrics = evaluate_model(loaded, sentences, reference)
        sites = loaded.model.config.clover["sites"].values()
        total = sum(s["num_kv_heads"] * s["head_dim"] for s in sites)
        qk_removed = 1 - sum(sum(s["qk_dims"]) for s in sites) / total
        vo_removed = 1 - sum(sum(s["vo_dims"]) for s in sites) / total
        rows.append({"model": name, "stack": "all", "pair": "qk+vo", "method": "clover", "allocation": "threshold",
                     "ratio": float("nan"), "removed": round((qk_removed + vo_removed) / 2, 4), **metrics,
                     "qk_removed": round(qk_removed, 4), "vo_removed": round(vo_removed, 4)})  # fmt: skip
        print(
            f"  paper thresholds: {100 * qk_removed:.2f}% Q-K, {100 * vo_removed:.2f}% V-O removed, "
            f"WER {metrics['wer']:.3f}"
        )
    print(f"{name}: {len(rows) - 1} pruned evaluations in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return rows


def headline(rows: list[dict]) -> list[str]:
    """Vanilla ratio whose quality equals CLOVER's at 70% of Q-K dims removed (global), by interpolation."""
    lines = []
    cases = sorted({(r["model"], r["stack"], metric) for r in rows if r["pair"] == "qk" and r["allocation"] == "global"
                    for metric in (METRIC_BY_MODEL[r["model"]], *EXTRA_METRICS.get(r["model"], ()))})  # fmt: skip
    for model, stack, metric in cases:

        def curve(method, model=model, stack=stack, metric=metric):
            pts = sorted((r["ratio"], r[metric]) for r in rows if r["model"] == model and
                         r["stack"] == stack and r["pair"] == "qk" and r["method"] == method
                         and r["allocation"] == "global")  # fmt: skip
            return np.array(pts)

        clover, vanilla = curve("clover"), curve("vanilla")
        if not len(clover) or 0.7 not in clover[:, 0]:
            continue
        target = clover[clover[:, 0] == 0.7][0, 1]
        values = vanilla[:, 1]
        worse = (values <= target) if metric in HIGHER_IS_BETTER else (values >= target)
        if not worse.any():
            match = "> 0.9"
        elif worse[0]:
            match = f"< {vanilla[0, 0]:.2f}"
        else:
            i = int(np.argmax(worse))
            x0, x1, y0, y1 = vanilla[i - 1, 0], vanilla[i, 0], values[i - 1], values[i]
            match = f"{x0 + (target - y0) * (x1 - x0) / (y1 - y0):.3f}"
        lines.append(f"| {model} {stack} | {metric} | CLOVER at 70%: {target:.4g} | vanilla ratio with "
                     f"the same quality: {match} | paper (GPT-2 XL): 70% ≈ 8% |")  # fmt: skip
    return lines


METRIC_BY_MODEL = {
    "smollm2-135m": "wikitext2_test_ppl",
    "gemma3-270m": "wikitext2_test_ppl",
    "whisper-base": "wer",
    "minilm-l6": "similarity_to_original",
    "dinov2-small": "cls_similarity_to_original",
}


# plotted in a second row of panels
EXTRA_METRICS = {"whisper-base": ("decoder_loss",), "dinov2-small": ("patch_similarity_to_original",)}


# "still fine": the quality budget for the largest-safe-ratio table
SAFE = {
    "wikitext2_test_ppl": ("perplexity within +50% of unpruned", lambda v, base: v <= 1.5 * base),
    "decoder_loss": ("decoder loss within +10% of unpruned", lambda v, base: v <= 1.1 * base),
    "similarity_to_original": ("similarity ≥ 0.99", lambda v, base: v >= 0.99),
    "cls_similarity_to_original": ("CLS similarity ≥ 0.95", lambda v, base: v >= 0.95),
}


def safe_ratios(rows: list[dict]) -> list[str]:
    """Per model, stack, pair and allocation: the largest ratio up to which every tested ratio stays within the
    quality budget (SAFE), for each method."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        metric = next(m for m in (*EXTRA_METRICS.get(model, ()), METRIC_BY_MODEL[model]) if m in SAFE)
        label, fine = SAFE[metric]
        base = next(r[metric] for r in rows if r["model"] == model and r["method"] == "none")
        methods = [m for m in METHODS if any(r["model"] == model and r["method"] == m for r in rows)]
        lines += ["", f"{model}: largest share of dims removed with {label} ({metric} {base:.4g})", "",
                  "| stack | pair | allocation | " + " | ".join(methods) + " |",
                  "|---|---|---|" + "---:|" * len(methods)]  # fmt: skip
        keys = sorted({(r["stack"], r["pair"], r["allocation"]) for r in rows if r["model"] == model
                       and r["method"] != "none" and r["allocation"] != "threshold"})  # fmt: skip
        for stack, pair, allocation in keys:
            cells = []
            for method in methods:
                pts = sorted((r["ratio"], r[metric]) for r in rows if r["model"] == model and r["stack"] == stack
                             and r["pair"] == pair and r["allocation"] == allocation and r["method"] == method
                             and metric in r)  # fmt: skip
                safe = 0.0
                for ratio, value in pts:
                    if not fine(value, base):
                        break
                    safe = ratio
                cells.append(f"{safe:.0%}" if pts else "")
            lines.append(f"| {stack} | {pair} | {allocation} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], model: str) -> None:
    metrics = (METRIC_BY_MODEL[model], *EXTRA_METRICS.get(model, ()))
    panels = sorted({(r["stack"], r["pair"]) for r in rows if r["model"] == model and r["method"] != "none"
                     and r["allocation"] != "threshold"})  # fmt: skip
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(5.2 * len(panels), 4 * len(metrics)), squeeze=False)
    styles = {"clover": "C0", "calibrated": "C2", "vanilla": "C3", "vanilla-activation": "C1"}
    dashes = {"uniform": "-", "layer": "--", "global": ":"}
    for row_axes, metric in zip(axes, metrics, strict=True):
        base = next(r[metric] for r in rows if r["model"] == model and r["method"] == "none")
        for ax, (stack, pair) in zip(row_axes, panels, strict=True):
            for method in styles:
                for allocation in dashes:
                    pts = sorted((r["removed"], r[metric]) for r in rows if r["model"] == model
                                 and r["stack"] == stack and r["pair"] == pair and r["method"] == method
                                 and r["allocation"] == allocation and metric in r)  # fmt: skip
                    if pts:
                        x, y = zip(*[(0.0, base), *pts], strict=True)
                        ax.plot(x, y, dashes[allocation], color=styles[method], marker="o", ms=3,
                                label=f"{method}, {allocation}")  # fmt: skip
            ax.axhline(base, color="k", lw=0.6, alpha=0.5)
            ax.set_title(f"{model}: {stack} {pair.upper().replace('QK', 'Q-K').replace('VO', 'V-O')}")
            ax.set_xlabel("share of dims removed")
            ax.set_ylabel(metric)
            if metric in ("wikitext2_test_ppl", "decoder_loss"):
                ax.set_yscale("log")
            if metric == "wer":
                ax.set_ylim(0, 1.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / f"pruning_{model}.png", dpi=100)
    plt.close(fig)


def _number(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def summarize() -> None:
    """Plots and markdown tables from every results/pruning_curves*.csv (several runs may share the work)."""
    import csv

    rows = []
    for path in sorted(RESULTS.glob("pruning_curves*.csv")):
        with path.open() as f:
            rows += [{k: _number(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    for model in dict.fromkeys(r["model"] for r in rows):
        plot(rows, model)
        keys = sorted({(r["stack"], r["pair"], r["allocation"]) for r in rows if r["model"] == model
                       and r["method"] != "none" and r["allocation"] != "threshold"})  # fmt: skip
        for metric in (METRIC_BY_MODEL[model], *EXTRA_METRICS.get(model, ())):
            base = next(r[metric] for r in rows if r["model"] == model and r["method"] == "none")
            print(f"\n{model}: {metric} (unpruned {base:.4g}); columns: share of the pair's dims removed")
            for stack, pair, allocation in keys:
                sel = [r for r in rows if r["model"] == model and (r["stack"], r["pair"], r["allocation"]) ==
                       (stack, pair, allocation) and r["method"] != "none"]  # fmt: skip
                ratios = sorted({r["ratio"] for r in sel})
                print(f"\n| {stack} {pair} {allocation} | " + " | ".join(f"{x:.0%}" for x in ratios) + " |")
                print("|---|" + "---|" * len(ratios))
                for method in METHODS:
                    values = {r["ratio"]: r[metric] for r in sel if r["method"] == method}
                    if values:
                        cells = [f"{values[x]:.4g}" if x in values else "" for x in ratios]
                        print(f"| {method} | " + " | ".join(cells) + " |")
        base = next(r[METRIC_BY_MODEL[model]] for r in rows if r["model"] == model and r["method"] == "none")
        for r in rows:
            if r["model"] == model and r.get("allocation") == "threshold":
                print(f"\npaper thresholds (σ_QK ≤ 5e-3, σ_VO ≤ 6e-3): {r['qk_removed']:.2%} of Q-K and "
                      f"{r['vo_removed']:.2%} of V-O dims removed, WER {r['wer']:.3f} "
                      f"(unpruned {base:.3f})")  # fmt: skip
    print("\n" + "\n".join(headline(rows)))
    print("\n".join(safe_ratios(rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6", "whisper-base"])
    parser.add_argument("--sentences", type=int, default=8, help="Whisper: spoken sentences per evaluation")
    parser.add_argument("--full", action="store_true", help="every ratio for every method x allocation")
    parser.add_argument(
        "--allocations", nargs="+", default=list(ALLOCATIONS), choices=ALLOCATIONS, help="--full: only these"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="only these methods")
    parser.add_argument("--ratios", nargs="+", type=float, help="only these ratios (default: the grid's)")
    parser.add_argument("--tokens", type=int, default=4096, help="causal LMs: WikiText-2 test tokens scored")
    parser.add_argument("--no-thresholds", action="store_true", help="skip the paper's Whisper thresholds")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--csv", default="pruning_curves.csv", help="file name under benchmarks/results/")
    parser.add_argument(
        "--summarize", action="store_true", help="no runs: plot and tabulate results/pruning_curves*.csv"
    )
    args = parser.parse_args()
    if args.summarize:
        summarize()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    header("CLOVER pruning curves")
    rows = []
    for name in args.models:
        done = list(rows)
        rows += run_model(name, args.full, args.sentences, tuple(args.allocations), tuple(args.methods),
                          not args.no_thresholds, lambda new, done=done: write_csv(args.csv, done + new),
                          args.ratios, args.tokens)  # fmt: skip
        write_csv(args.csv, rows)  # keep partial results if a later model fails
        plot(rows, name)
    print("\n".join(headline(rows)))


if __name__ == "__main__":
    main()
