"""The ``clover`` command: thin argument parsing over the library; user mistakes exit with code 2 and one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROBE_TEXT = "Singular value decomposition rewrites every attention head as orthogonal vectors."

MODEL_HELP = (
    "a short name (smollm2-135m, minilm-l6, whisper-tiny.en, whisper-base: real weights shipped in pip packages, "
    "converted once and cached under $CLOVER_CACHE or ~/.cache/clover) or a local transformers checkpoint directory"
)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        name
    ]


def probe_output(loaded):
    """A fixed, cheap forward pass used to check that a rewrite kept the model's function."""
    import torch

    model = loaded.model
    with torch.no_grad():
        if loaded.kind == "speech-seq2seq":
            generator = torch.Generator().manual_seed(0)
            frames = 2 * model.config.max_source_positions
            features = torch.randn(1, model.config.num_mel_bins, frames, generator=generator).to(model.dtype)
            prompt = torch.tensor([loaded.decoder_prompt_ids or [model.config.decoder_start_token_id]])
            return model(input_features=features, decoder_input_ids=prompt).logits.double()
        batch = loaded.tokenizer(PROBE_TEXT, return_tensors="pt")
        output = model(**batch)
        return (output.logits if hasattr(output, "logits") else output.last_hidden_state).double()


def cmd_decompose(args: argparse.Namespace) -> int:
    from .decompose import decompose_
    from .io import atomic_directory, check_output_dir, save_loaded_model
    from .models import load_model

    check_output_dir(args.out, overwrite=args.overwrite)
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=_dtype(args.dtype))
    loaded_at = time.perf_counter()
    reference = probe_output(loaded) if args.verify else None
    spectra = decompose_(loaded.model, compute_dtype=_dtype(args.compute_dtype), progress=not args.quiet)
    factorized_at = time.perf_counter()
    loaded.model.config.clover = {"method": "decompose", "compute_dtype": args.compute_dtype}
    report = {"model": args.model, "out": str(args.out), "attention_sites": len(spectra)}
    if reference is not None:
        report["max_abs_output_change"] = float((probe_output(loaded) - reference).abs().max())
    with atomic_directory(args.out, overwrite=args.overwrite) as staging:
        save_loaded_model(loaded, staging)
    report.update(load_s=round(loaded_at - start, 2), factorize_s=round(factorized_at - loaded_at, 2))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"factorized {len(spectra)} attention blocks of {args.model} in {report['factorize_s']} s")
        if "max_abs_output_change" in report:
            print(f"largest change of the model's output on a probe input: {report['max_abs_output_change']:.3g}")
        print(f"wrote {args.out} (loads with transformers' from_pretrained)")
    return 0


def _summary_rows(spectra) -> list[dict]:
    rows = []
    for s in spectra:
        for pair in ("qk", "vo", "q", "k"):
            values = getattr(s, pair)
            if values is None:
                continue
            energy = (values**2).sum(-1, keepdim=True)
            # dims needed to hold 90% of each group's energy, averaged over groups
            dims90 = ((values**2).cumsum(-1) < 0.9 * energy).sum(-1).add(1).float().mean()
            rows.append(
                {
                    "site": s.name,
                    "stack": s.stack,
                    "layer": s.layer_index,
                    "pair": pair,
                    "sigma_max": float(values.max()),
                    "sigma_median": float(values.median()),
                    "sigma_min": float(values.min()),
                    "dims_for_90pct_energy": round(float(dims90), 1),
                    "head_dim": values.shape[-1],
                }
            )
    return rows


def cmd_spectrum(args: argparse.Namespace) -> int:
    from .decompose import spectrum
    from .models import load_model

    loaded = load_model(args.model)
    spectra = spectrum(loaded.model, progress=not args.quiet)
    rows = _summary_rows(spectra)
    if args.out:
        from .plots import plot_spectra

        plot_spectra(spectra, args.out, title=f"CLOVER singular values: {args.model}")
    if args.json:
        print(json.dumps({"model": args.model, "plot": args.out, "rows": rows}))
        return 0
    print(f"{'stack':8} {'layer':>5} {'pair':4} {'σ max':>9} {'σ median':>9} {'σ min':>10} {'dims@90%':>9}")
    for r in rows:
        print(
            f"{r['stack']:8} {r['layer']:>5} {r['pair']:4} {r['sigma_max']:9.3f} {r['sigma_median']:9.3f}"
            f" {r['sigma_min']:10.2e} {r['dims_for_90pct_energy']:>6}/{r['head_dim']}"
        )
    if any(r["pair"] == "q" for r in rows):
        print("(q / k rows: RoPE sits between Q and K, so those are each head's W_q / W_k spectra, not a Q-K product)")
    if args.out:
        print(f"plot written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clover",
        description="CLOVER (Cross-Layer Orthogonal Vectors): rewrite, inspect, prune and fine-tune transformer "
        "attention through the SVD of each head's Q-K and V-O products. Nothing is fetched from a model hub.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "decompose",
        help="rewrite attention into orthogonal, singular-value-ordered form (same function, same shapes)",
        description="Factorize every attention head's Q-K and V-O pair (thin QR of each factor + SVD of the small "
        "head_dim×head_dim product) and write a standard transformers checkpoint that from_pretrained loads. "
        "Where RoPE sits between Q and K (Llama, Qwen2, Mistral, SmolLM2) only V-O is rewritten: Q-K cannot be "
        "merged exactly across the rotation.",
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="directory to write (safetensors + config + tokenizer)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument(
        "--compute-dtype",
        default="float64",
        choices=["float64", "float32"],
        help="precision of the QR/SVD (results are written back in --dtype); default float64",
    )
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the before/after output check")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON report instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser(
        "spectrum",
        help="print per-layer singular-value summaries for Q-K and V-O, and plot them",
        description="Compute each head's Q-K and V-O singular values without changing the model; print one line "
        "per layer and pair (largest, median, smallest σ, and how many dims hold 90%% of the energy).",
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", help="PNG file for the plot (one panel per stack and pair, one line per layer)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_spectrum)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clover`` command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from .errors import CloverError

    try:
        return args.func(args)
    except CloverError as error:
        print(f"clover: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
