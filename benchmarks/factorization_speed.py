"""QR route vs the authors' full SVD of each head's d×d product, on every attention layer, in the same run.

    .venv/bin/python benchmarks/factorization_speed.py [--models smollm2-135m whisper-base] [--repeats 3]
        [--widths llama2-7b llama3-8b]

For each attention site and pair (Q-K, V-O; GQA groups stacked as in clover.factorize), times
``factorize_qk`` / ``factorize_vo`` (thin QR of each factor + SVD of the small d_h×d_h matrix, float64)
against ``torch.linalg.svdvals`` of the explicit per-group product (float64), and reports the speed ratio
and the largest difference between the two sets of singular values. For RoPE models the Q-K product is
not what the model computes (the rotation sits in between); it is timed anyway as the same-size workload.

The QR is CholeskyQR2 (Gram matrix and Cholesky, twice: matmuls) wherever a block is well-conditioned, as
clover runs it; the column ``householder_route_s`` times the same functions forced onto LAPACK's Householder
QR, clover's fallback, so ``cholesky_speedup`` is what the Cholesky route buys. ``--widths`` adds one layer of
random weights at 7B width (Llama-2-7B: 4096 wide, 32 heads; Llama-3-8B: GQA 32/8), QR routes only (the full
SVD of 32 products of 4096 × 4096 takes minutes per layer on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from common import header, write_csv

import clover.factorize
from clover.factorize import factorize_qk, factorize_vo, product_singular_values, split_heads
from clover.families import attention_sites
from clover.models import load_model


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


@contextlib.contextmanager
def householder_only():
    """clover's factorization with every block sent down its Householder QR fallback (the route before CholeskyQR2)."""
    cholesky = clover.factorize._cholesky_qr2
    clover.factorize._cholesky_qr2 = lambda x: None  # "no block can take the fast route": two QRs, as before
    try:
        yield
    finally:
        clover.factorize._cholesky_qr2 = cholesky


WIDTHS = {"llama2-7b": (4096, 32, 32), "llama3-8b": (4096, 32, 8)}  # hidden size, heads, KV heads


def synthetic_layer(width: str, repeats: int) -> list[dict]:
    """One layer of random bf16 weights at 7B width: Q-K and V-O through both QR routes (float64)."""
    d, heads, groups = WIDTHS[width]
    head_dim = d // heads
    generator = torch.Generator().manual_seed(0)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator).mul_(0.02).to(torch.bfloat16)

    w_q, w_k, w_v, w_o = (
        weight(d, heads * head_dim),
        weight(d, groups * head_dim),
        weight(d, groups * head_dim),
        weight(d, d),
    )
    shapes = {"num_heads": heads, "num_kv_heads": groups}
    rows = []
    for pair, run in (("qk", lambda: factorize_qk(w_q, w_k, None, None, **shapes)),
                      ("vo", lambda: factorize_vo(w_v, w_o, **shapes))):  # fmt: skip
        seconds, factors = best_of(repeats, run)
        with householder_only():
            householder_s, reference = best_of(repeats, run)
        sigma, expected = factors.singular_values, reference.singular_values
        rows.append({
            "model": f"{width} (random, one layer)", "site": "layer", "pair": pair,
            "product_shape": f"{groups}x{d}x{d * heads // groups}", "qr_route_s": f"{seconds:.5f}",
            "householder_route_s": f"{householder_s:.5f}", "cholesky_speedup": f"{householder_s / seconds:.2f}",
            "max_rel_sigma_diff": f"{float((sigma - expected).abs().max() / expected.max()):.3e}",
        })  # fmt: skip
    return rows


def pair_operands(site, pair: str):
    """(left, right) per KV group as the authors would multiply them: shared head vs its stacked partners."""
    group = site.num_heads // site.num_kv_heads
    if pair == "qk":
        (w_q, b_q), (w_k, b_k) = site.q.read(), site.k.read()
        left = split_heads(w_k.double(), None if b_k is None else b_k.double(), site.num_kv_heads)
        q = split_heads(w_q.double(), None if b_q is None else b_q.double(), site.num_heads)
        right = q.reshape(site.num_kv_heads, group * q.shape[1], q.shape[2])
    else:
        (w_v, _), (w_o, _) = site.v.read(), site.o.read()
        left = split_heads(w_v.double(), None, site.num_kv_heads)
        o = w_o.double().reshape(site.num_heads, site.head_dim, -1).mT
        right = o.reshape(site.num_kv_heads, group * o.shape[1], o.shape[2])
    return left, right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["smollm2-135m", "whisper-base"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widths", nargs="*", default=list(WIDTHS), choices=list(WIDTHS))
    args = parser.parse_args()
    header("CLOVER factorization: QR + small SVD vs full SVD of the product")
    rows = []
    for name in args.models:
        model = load_model(name).model
        totals = {"qr": 0.0, "svd": 0.0, "householder": 0.0}
        worst = 0.0
        for site in attention_sites(model):
            for pair in ("qk", "vo"):
                shapes = {"num_heads": site.num_heads, "num_kv_heads": site.num_kv_heads}
                if pair == "qk":
                    (w_q, b_q), (w_k, b_k) = site.q.read(), site.k.read()

                    def run():
                        return factorize_qk(w_q, w_k, b_q, b_k, **shapes)
                else:
                    (w_v, _), (w_o, _) = site.v.read(), site.o.read()

                    def run():  # no bias here so both routes factor the very same product
                        return factorize_vo(w_v, w_o, **shapes)

                qr_s, factors = best_of(args.repeats, run)
                with householder_only():
                    householder_s, _ = best_of(args.repeats, run)
                left, right = pair_operands(site, pair)
                svd_s, reference = best_of(args.repeats, lambda: product_singular_values(left, right))
                diff = float((factors.singular_values - reference).abs().max())
                rel = diff / float(reference.max())
                worst = max(worst, rel)
                totals["qr"] += qr_s
                totals["svd"] += svd_s
                totals["householder"] += householder_s
                rows.append(
                    {
                        "model": name,
                        "site": site.name,
                        "pair": pair,
                        "product_shape": f"{left.shape[0]}x{left.shape[1]}x{right.shape[1]}",
                        "qr_route_s": f"{qr_s:.5f}",
                        "full_svd_s": f"{svd_s:.5f}",
                        "speedup": f"{svd_s / qr_s:.1f}",
                        "householder_route_s": f"{householder_s:.5f}",
                        "cholesky_speedup": f"{householder_s / qr_s:.2f}",
                        "max_abs_sigma_diff": f"{diff:.3e}",
                        "max_rel_sigma_diff": f"{rel:.3e}",
                    }
                )
        print(
            f"{name}: {len(attention_sites(model))} attention sites, QR route {totals['qr']:.3f} s, "
            f"full SVD {totals['svd']:.3f} s -> {totals['svd'] / totals['qr']:.1f}x faster; "
            f"largest singular-value difference {worst:.2e} (relative to σ_max); the same with Householder QR "
            f"{totals['householder']:.3f} s (CholeskyQR2 {totals['householder'] / totals['qr']:.2f}x faster)"
        )
    for width in args.widths:
        layer = synthetic_layer(width, args.repeats)
        rows += layer
        total, householder = (sum(float(r[k]) for r in layer) for k in ("qr_route_s", "householder_route_s"))
        print(f"{width}, one layer of random weights: Q-K + V-O {total:.2f} s (Householder QR {householder:.2f} s, "
              f"{householder / total:.2f}x)")  # fmt: skip
    path = write_csv("factorization_speed.csv", rows)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
