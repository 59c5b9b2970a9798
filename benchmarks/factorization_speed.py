"""QR route vs the authors' full SVD of each head's d×d product, on every attention layer, in the same run.

    .venv/bin/python benchmarks/factorization_speed.py [--models smollm2-135m whisper-base] [--repeats 3]

For each attention site and pair (Q-K, V-O; GQA groups stacked as in clover.factorize), times
``factorize_qk`` / ``factorize_vo`` (thin QR of each factor + SVD of the small d_h×d_h matrix, float64)
against ``torch.linalg.svdvals`` of the explicit per-group product (float64), and reports the speed ratio
and the largest difference between the two sets of singular values. For RoPE models the Q-K product is
not what the model computes (the rotation sits in between); it is timed anyway as the same-size workload.
"""

from __future__ import annotations

import argparse
import time

from common import header, write_csv

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
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "whisper-base"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    header("CLOVER factorization: QR + small SVD vs full SVD of the product")
    rows = []
    for name in args.models:
        model = load_model(name).model
        totals = {"qr": 0.0, "svd": 0.0}
        worst = 0.0
        for site in attention_sites(model):
            for pair in ("qk", "vo"):
                if pair == "qk":
                    (w_q, b_q), (w_k, b_k) = site.q.read(), site.k.read()
                    qr_s, factors = best_of(
                        args.repeats,
                        lambda: factorize_qk(
                            w_q, w_k, b_q, b_k, num_heads=site.num_heads, num_kv_heads=site.num_kv_heads
                        ),
                    )
                else:
                    (w_v, _), (w_o, _) = site.v.read(), site.o.read()
                    # no bias here so both routes factor the very same product
                    qr_s, factors = best_of(
                        args.repeats,
                        lambda: factorize_vo(w_v, w_o, num_heads=site.num_heads, num_kv_heads=site.num_kv_heads),
                    )
                left, right = pair_operands(site, pair)
                svd_s, reference = best_of(args.repeats, lambda: product_singular_values(left, right))
                diff = float((factors.singular_values - reference).abs().max())
                rel = diff / float(reference.max())
                worst = max(worst, rel)
                totals["qr"] += qr_s
                totals["svd"] += svd_s
                rows.append(
                    {
                        "model": name,
                        "site": site.name,
                        "pair": pair,
                        "product_shape": f"{left.shape[0]}x{left.shape[1]}x{right.shape[1]}",
                        "qr_route_s": f"{qr_s:.5f}",
                        "full_svd_s": f"{svd_s:.5f}",
                        "speedup": f"{svd_s / qr_s:.1f}",
                        "max_abs_sigma_diff": f"{diff:.3e}",
                        "max_rel_sigma_diff": f"{rel:.3e}",
                    }
                )
        print(
            f"{name}: {len(attention_sites(model))} attention sites, QR route {totals['qr']:.3f} s, "
            f"full SVD {totals['svd']:.3f} s -> {totals['svd'] / totals['qr']:.1f}x faster; "
            f"largest singular-value difference {worst:.2e} (relative to σ_max)"
        )
    path = write_csv("factorization_speed.csv", rows)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
