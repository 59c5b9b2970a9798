"""The ``clover`` command: thin argument parsing over the library; user mistakes exit with code 2 and one line."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import time
import warnings
from typing import NoReturn

from .cli_common import (
    COMPUTE_DTYPE_HELP,
    DEVICE_HELP,
    DTYPE_HELP,
    MODEL_HELP,
    OVERWRITE_HELP,
    STREAM_HELP,
    singular_value,
)


def _dtype(name: str | None):
    import torch

    if name is None or name == "auto":
        return None
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        name
    ]


STREAM_FRACTION = 0.4  # stream by default when the weights take more than this share of physical memory


def _weights_bytes(directory) -> int:
    return sum(path.stat().st_size for pattern in ("*.safetensors", "*.bin") for path in directory.glob(pattern))


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return None


def _streaming_source(args: argparse.Namespace):
    """The checkpoint directory to stream from, or None to load the model into memory (``--stream`` /
    ``--no-stream``, else by the weights' size against this machine's memory)."""
    from .errors import CloverError
    from .models import checkpoint_directory, directory_family

    if args.stream is False:
        return None
    directory = checkpoint_directory(args.model)
    if directory_family(directory) is not None:  # a diffusers model: the streaming path reads transformers layers
        if args.stream:
            raise CloverError(
                f"--stream reads transformers checkpoints layer by layer; {args.model} is a diffusers model, which "
                "clover loads whole: drop --stream"
            )
        return None
    if args.stream is None:
        memory = _physical_memory()
        size = _weights_bytes(directory)
        if memory is None or size <= STREAM_FRACTION * memory:
            return None
        large = f"the weights ({size / 2**30:.1f} GiB) exceed {STREAM_FRACTION:.0%} of this machine's memory " \
                f"({memory / 2**30:.1f} GiB)"  # fmt: skip
        if (reason := _why_not_streamable(directory)) is not None:
            print(f"clover: note: {large}, but {reason}; loading it whole", file=sys.stderr)
            return None
        print(f"clover: note: {large}: streaming one layer at a time (--no-stream to load it whole)", file=sys.stderr)
    return directory


def _why_not_streamable(directory) -> str | None:
    """Why the streaming path would refuse this checkpoint (pytorch_model.bin only, tensors transformers converts
    on load, its own modeling code), as a phrase; None where it streams. Builds the model on the meta device only."""
    from .errors import NotStreamableError
    from .streaming import StreamedModel

    try:
        StreamedModel(directory)  # a damaged checkpoint is refused here as it would be loaded whole
    except NotStreamableError as error:
        return error.reason
    return None


def _stream_decompose(args: argparse.Namespace, source) -> int:
    from .io import atomic_directory
    from .models import resolve_device, tokenizer_directory
    from .streaming import stream_decompose

    device = resolve_device(args.device)
    tokenizer = None if args.tokenizer is None else tokenizer_directory(args.tokenizer)  # before minutes of work
    start = time.perf_counter()
    with atomic_directory(args.out, overwrite=args.overwrite, inputs=[args.model]) as staging:
        sites = stream_decompose(
            source, staging, compute_dtype=_dtype(args.compute_dtype), dtype=_dtype(args.dtype), device=device,
            progress=not args.quiet, tokenizer=tokenizer,
        )  # fmt: skip
    elapsed = time.perf_counter() - start
    report = {"model": args.model, "out": str(args.out), "attention_sites": sites, "streamed": True,
              "seconds": round(elapsed, 2)}  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        print(f"factorized {sites} attention blocks of {args.model}, streamed layer by layer, in {elapsed:.1f} s")
        print(f"wrote {args.out} (loads with from_pretrained; streaming skips the output probe)")
    return 0


def cmd_decompose(args: argparse.Namespace) -> int:
    from .decompose import decompose_
    from .io import atomic_directory, check_output_dir, save_loaded_model
    from .models import load_model, recorded_source
    from .prune import set_clover_record
    from .quality import probe_output

    check_output_dir(args.out, overwrite=args.overwrite, inputs=[args.model])
    source = _streaming_source(args)
    if source is not None:
        return _stream_decompose(args, source)
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=_dtype(args.dtype), tokenizer=args.tokenizer)
    loaded_at = time.perf_counter()
    if args.device is not None:
        from .models import resolve_device

        loaded.model.to(resolve_device(args.device))
    reference = probe_output(loaded).cpu() if args.verify else None  # compared after the model moves to the cpu
    spectra = decompose_(loaded.model, compute_dtype=_dtype(args.compute_dtype), progress=not args.quiet)
    factorized_at = time.perf_counter()
    loaded.model.to("cpu")
    record = {"method": "decompose", "compute_dtype": args.compute_dtype, "source": recorded_source(args.model)}
    set_clover_record(loaded.model, record)
    report = {"model": args.model, "out": str(args.out), "attention_sites": len(spectra)}
    if reference is not None:
        change = probe_output(loaded) - reference
        report["max_abs_output_change"] = float(change.abs().max())
        report["relative_output_change"] = float(change.norm() / reference.norm().clamp_min(1e-30))
    with atomic_directory(args.out, overwrite=args.overwrite, inputs=[args.model]) as staging:
        save_loaded_model(loaded, staging)
    report.update(load_s=round(loaded_at - start, 2), factorize_s=round(factorized_at - loaded_at, 2))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"factorized {len(spectra)} attention blocks of {args.model} in {report['factorize_s']} s")
        if "max_abs_output_change" in report:
            print(f"largest change of the model's output on a probe input: {report['max_abs_output_change']:.3g}")
        from .families import checkpoint_family

        library = "diffusers" if checkpoint_family(loaded.kind) is not None else "transformers"
        print(f"wrote {args.out} (loads with {library}' from_pretrained)")
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
    from .errors import CloverError
    from .models import load_model

    if args.out is not None and not args.out.strip():
        raise CloverError("--out is empty: name the plot file (e.g. --out spectrum.png), or leave --out out")
    plot_path = _plot_path(args.out, overwrite=args.overwrite) if args.out else None  # refused before the work
    loaded = load_model(args.model)
    spectra = spectrum(loaded.model, progress=not args.quiet)
    rows = _summary_rows(spectra)
    if plot_path is not None:
        from .plots import plot_spectra

        args.out = str(plot_spectra(spectra, plot_path, title=f"CLOVER singular values: {args.model}"))
    if args.json:
        print(json.dumps({"model": args.model, "plot": args.out, "rows": rows}))
        return 0
    print(f"{'stack':8} {'layer':>5} {'pair':4} {'σ max':>9} {'σ median':>9} {'σ min':>10} {'dims@90%':>9}")
    for r in rows:
        print(
            f"{r['stack']:8} {r['layer']:>5} {r['pair']:4} {r['sigma_max']:9.3g} {r['sigma_median']:9.3g}"
            f" {r['sigma_min']:10.2e} {r['dims_for_90pct_energy']:>6}/{r['head_dim']}"
        )
    if any(r["pair"] == "q" for r in rows):
        print("(q / k rows: RoPE sits between Q and K, so those are each head's W_q / W_k spectra, not a Q-K product)")
    if args.out:
        print(f"plot written to {args.out}")
    return 0


PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def _plot_path(out: str, *, overwrite: bool = False) -> os.PathLike:
    """The file a plot goes to: --out as given, with .png added when it names no image format; an existing file
    is replaced only with ``overwrite``."""
    from pathlib import Path

    from .errors import CloverError

    given = path = Path(out).expanduser()
    suffix = path.suffix.lower().lstrip(".")
    if not suffix:
        path = path.with_name(path.name + ".png")
    elif suffix not in PLOT_FORMATS:
        raise CloverError(f"--out {out}: unsupported image format .{suffix}; use one of .{', .'.join(PLOT_FORMATS)}")
    for candidate in dict.fromkeys((given, path)):  # --out X writes X.png: a folder of either name is refused
        if candidate.is_dir():
            raise CloverError(f"--out {candidate} is a directory; give a file name, such as {given}-spectrum.png")
    if path.exists() and not overwrite:
        raise CloverError(f"--out {path} already exists; pass --overwrite to replace it, or choose another name")
    for parent in path.resolve().parents:
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise CloverError(f"--out {out}: cannot write into {parent}; choose another path")
            break
    return path


def _stacks(option: str | None, flag: str = "--stacks") -> tuple[str, ...] | None:
    """``--stacks encoder,cross`` -> ("encoder", "cross"); None (every stack) when not given."""
    if option is None:
        return None
    names = tuple(dict.fromkeys(name.strip() for name in option.split(",") if name.strip()))
    if not names:
        from .errors import CloverError

        raise CloverError(f"{flag} {option!r} names no stack; give a comma list such as encoder,cross")
    return names


def cmd_prune(args: argparse.Namespace) -> int:
    from .errors import CloverError
    from .io import check_output_dir, save_pruned_model
    from .models import directory_family, load_model, recorded_source, resolve_device
    from .prune import CALIBRATED, PruneConfig, check_prunable, prune_, set_clover_record
    from .quality import (
        calibration_length,
        calibration_moments,
        calibration_samples,
        check_calibration_settings,
        reads_text_and_images,
        refuse_uncalibrated,
    )

    qk_threshold = args.qk_threshold if args.qk_threshold is not None else args.threshold
    vo_threshold = args.vo_threshold if args.vo_threshold is not None else args.threshold
    config = PruneConfig(
        qk_ratio=args.qk_ratio, vo_ratio=args.vo_ratio, qk_threshold=qk_threshold, vo_threshold=vo_threshold,
        method=args.method, allocation=args.allocation, min_dims=args.min_dims, stacks=_stacks(args.stacks),
        qk_stacks=_stacks(args.qk_stacks, "--qk-stacks"), vo_stacks=_stacks(args.vo_stacks, "--vo-stacks"),
    )  # fmt: skip
    config.validate()
    prunes_heads = config.prunes("qk") or config.prunes("vo")
    if not prunes_heads and args.latent_rank is None:
        raise CloverError(
            "nothing to prune: give --qk-ratio and/or --vo-ratio in (0, 1), --threshold, or --latent-rank N"
        )
    if args.latent_rank is not None:
        _check_latent_rank(args)  # before streaming is chosen and minutes of loading
    check_calibration_settings(args.calibration_samples, args.calibration_length)
    check_output_dir(args.out, overwrite=args.overwrite, inputs=[args.model])
    if args.method in CALIBRATED:  # a UNet's refusal comes before minutes of loading it
        refuse_uncalibrated(directory_family(pathlib.Path(args.model).expanduser()))
    device = resolve_device(args.device)
    if device.type == "mps" and args.latent_rank is not None:
        raise CloverError("--device mps: MPS lacks float64, which --latent-rank's PCA needs; cut it on cpu or cuda")
    if device.type == "mps" and args.compute_dtype == "float64":
        raise CloverError("--device mps: MPS lacks float64; add --compute-dtype float32, or prune on cpu or cuda")
    source = _streaming_source(args)
    if source is not None and args.latent_rank is not None:
        raise CloverError(
            "--latent-rank runs calibration through the whole model in memory; add --no-stream (or cut the latent "
            "first, then prune the result with --stream)"
        )
    if source is not None:
        return _stream_prune(args, config, source, device)
    loaded = load_model(args.model, dtype=_dtype(args.dtype), tokenizer=args.tokenizer)
    loaded.model.to(device)  # factorization, calibration and pruning all run where the weights are
    if prunes_heads:
        check_prunable(loaded.model, config)  # refusals (--min-dims that keeps every dim too) before calibration
    start = time.perf_counter()
    latent = _cut_latent(args, loaded) if args.latent_rank is not None else None
    if not prunes_heads:
        return _save_latent_cut(args, loaded, latent, time.perf_counter() - start)
    moments, moments_cached, seq_len = None, False, None
    if args.method in CALIBRATED:
        if reads_text_and_images(loaded):
            raise CloverError(
                "the command line has no calibration data for text-image models (CLIP, SigLIP) yet; use --method "
                "clover or vanilla, or clover.prune.prune_ with your own calibrate(model) callback"
            )
        seq_len = calibration_length(loaded, args.calibration_length)  # raises first if there is no tokenizer
        if (available := calibration_samples(loaded, args.calibration_samples)) < args.calibration_samples:
            print(
                f"clover: note: --calibration-samples {args.calibration_samples} is more than clover ships for "
                f"{loaded.described}; calibrating on all {available}",
                file=sys.stderr,
            )
        if seq_len < args.calibration_length:
            print(
                f"clover: note: --calibration-length {args.calibration_length} is longer than the model's context; "
                f"calibrating on sequences of {seq_len} tokens",
                file=sys.stderr,
            )
        moments, moments_cached = calibration_moments(
            loaded,
            samples=args.calibration_samples,
            seq_len=seq_len,
            refresh=args.recalibrate,
            progress=not args.quiet,
            cache=latent is None,  # the cut model is not the checkpoint its files (the cache key) describe
        )
    report = prune_(
        loaded.model, config, input_moments=moments, compute_dtype=_dtype(args.compute_dtype), progress=not args.quiet
    )
    elapsed = time.perf_counter() - start
    record = {**loaded.model.config.clover, "source": recorded_source(args.model)}
    if latent is not None:
        record["latent_rank"] = args.latent_rank
    set_clover_record(loaded.model, record)
    loaded.model.to("cpu")
    save_pruned_model(loaded, args.out, overwrite=args.overwrite, inputs=[args.model])
    return _prune_summary(args, report, elapsed, moments, moments_cached, seq_len, latent)


def _check_latent_rank(args: argparse.Namespace) -> None:
    """Refuse --latent-rank from config.json alone: below 1, above the model's latent, or a family without one."""
    from .errors import CloverError
    from .families import family_of_type
    from .models import _read_config, checkpoint_directory

    if args.latent_rank < 1:
        raise CloverError(f"--latent-rank must be a number of latent dims ≥ 1, got {args.latent_rank}")
    config = _read_config(checkpoint_directory(args.model))
    family = family_of_type(str(config.get("model_type")))
    if family is None or family.per_head_cache:
        raise CloverError(family.no_latent_message if family else f"--latent-rank: {args.model} has no latent cache")
    full = config.get("kv_lora_rank")
    if isinstance(full, int) and not args.latent_rank <= full:
        raise CloverError(f"--latent-rank {args.latent_rank}: the model's latent has {full} dims (kv_lora_rank)")


def _cut_latent(args: argparse.Namespace, loaded) -> dict:
    """Cut the cache a family shares between all heads (MLA's latent) to --latent-rank dims, calibrated on the
    held-out text; the change of the probe output is its error, reported."""
    from .families import family_for
    from .quality import (
        attention_parameter_count,
        calibration_callback,
        calibration_length,
        parameter_count,
        probe_output,
    )

    def calibrate(model) -> None:  # built on first use: a family without a latent refuses before any of it
        seq_len = calibration_length(loaded, args.calibration_length)
        calibration_callback(loaded, samples=args.calibration_samples, seq_len=seq_len, progress=not args.quiet)(model)

    reference = probe_output(loaded)
    before = {"parameters_before": parameter_count(loaded.model),
              "attention_parameters_before": attention_parameter_count(loaded.model)}  # fmt: skip
    cut = family_for(loaded.model).cut_latent(loaded.model, args.latent_rank, calibrate)
    change = probe_output(loaded) - reference
    return {
        **before,  # the checkpoint's counts: pruning after the cut counts from the cut model
        "latent_rank": args.latent_rank,
        "latent_energy_kept_min": round(min(cut.kept_energy.values()), 6),
        "latent_relative_output_change": float(change.norm() / reference.norm().clamp_min(1e-30)),
        "latent_cache_dims_per_token_before": cut.cache_dims_per_token_before,
        "latent_cache_dims_per_token_after": cut.cache_dims_per_token_after,
    }


def _latent_line(latent: dict) -> str:
    return (
        f"latent cache cut to {latent['latent_rank']} dims: cache dims per token "
        f"{latent['latent_cache_dims_per_token_before']} -> {latent['latent_cache_dims_per_token_after']}; "
        f"calibration energy kept ≥ {100 * latent['latent_energy_kept_min']:.1f}% in every layer; probe output "
        f"changed by {100 * latent['latent_relative_output_change']:.2f}% (relative; the cut is approximate)"
    )


def _save_latent_cut(args: argparse.Namespace, loaded, latent: dict, elapsed: float) -> int:
    """Only the latent was cut: the result is a stock checkpoint of the same family (a smaller kv_lora_rank)."""
    from .io import atomic_directory, save_loaded_model
    from .models import recorded_source
    from .quality import parameter_count

    parameters = parameter_count(loaded.model)  # after the cut, which narrowed two linears per layer
    loaded.model.to("cpu")
    loaded.model.config.clover_latent_cut = {"latent_rank": args.latent_rank, "source": recorded_source(args.model)}
    with atomic_directory(args.out, overwrite=args.overwrite, inputs=[args.model]) as staging:
        save_loaded_model(loaded, staging)
    summary = {"model": args.model, "out": str(args.out), "seconds": round(elapsed, 2), **latent,
               "parameters_after": parameters}  # fmt: skip
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"cut {args.model}'s latent cache in {elapsed:.1f} s")
    print(_latent_line(latent))
    print(f"wrote {args.out}: transformers' AutoModel*.from_pretrained(DIR) or clover eval {args.out}")
    return 0


def _stream_prune(args: argparse.Namespace, config, source, device) -> int:
    """``clover prune`` one layer at a time: calibration runs every batch through one layer before it reads the
    next (encoder-decoders: each module's weights read from disk just before its forward); scoring and the
    rewrite each read every layer once."""
    from .io import atomic_directory
    from .models import tokenizer_directory, with_preprocessing
    from .prune import CALIBRATED
    from .quality import calibration_length, calibration_moments
    from .streaming import StreamedModel, stream_prune

    start = time.perf_counter()
    moments, moments_cached, seq_len = None, False, None
    tokenizer_dir = None if args.tokenizer is None else tokenizer_directory(args.tokenizer)
    if args.method in CALIBRATED:
        # without weights (the calibration reads them), in the dtype the in-memory path would calibrate in
        model = StreamedModel(source, device=device, dtype=_dtype(args.dtype)).model
        loaded = with_preprocessing(model, source, args.model, _kind_of(model), tokenizer_dir)
        seq_len = calibration_length(loaded, args.calibration_length)
        moments, moments_cached = calibration_moments(
            loaded, samples=args.calibration_samples, seq_len=seq_len, refresh=args.recalibrate,
            progress=not args.quiet, stream_from=source, device=device,
        )  # fmt: skip
        moments = moments.to(device)
        del model, loaded
    with atomic_directory(args.out, overwrite=args.overwrite, inputs=[args.model]) as staging:
        report = stream_prune(
            source, staging, config, input_moments=moments, compute_dtype=_dtype(args.compute_dtype),
            dtype=_dtype(args.dtype), device=device, progress=not args.quiet, tokenizer=tokenizer_dir,
        )  # fmt: skip
    return _prune_summary(args, report, time.perf_counter() - start, moments, moments_cached, seq_len)


def _kind_of(model) -> str:
    from .models import model_kind

    return model_kind(model.config.to_dict())[0]


def _prune_summary(args, report, elapsed, moments, moments_cached, seq_len, latent: dict | None = None) -> int:
    summary = {
        "model": args.model,
        "out": str(args.out),
        "seconds": round(elapsed, 2),
        "calibration_moments": None if moments is None else ("cached" if moments_cached else "computed"),
        "calibration_length": seq_len,
        "qk_removed": round(report.qk_removed, 4),
        "vo_removed": round(report.vo_removed, 4),
        "parameters_before": report.params_before,
        "parameters_after": report.params_after,
        "attention_parameters_before": report.attention_params_before,
        "attention_parameters_after": report.attention_params_after,
        "kv_dims_per_token_before": report.kv_dims_per_token_before,
        "kv_dims_per_token_after": report.kv_dims_per_token_after,
        "cross_kv_dims_per_source_token_before": report.cross_kv_dims_per_source_token_before,
        "cross_kv_dims_per_source_token_after": report.cross_kv_dims_per_source_token_after,
        **(latent or {}),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    allocated = args.allocation if args.qk_ratio or args.vo_ratio else "σ threshold"  # no share to allocate
    print(
        f"pruned {args.model} ({args.method}, {allocated}) in {elapsed:.1f} s: "
        f"{100 * report.qk_removed:.1f}% of Q-K dims and {100 * report.vo_removed:.1f}% of V-O dims removed"
        + (" (calibration moments from the cache)" if moments_cached else "")
    )
    attn_before, attn_after = summary["attention_parameters_before"], report.attention_params_after
    print(
        f"parameters {summary['parameters_before']:,} -> {report.params_after:,} "
        f"(attention {attn_before:,} -> {attn_after:,}, -{100 * (1 - attn_after / attn_before):.1f}%)"
    )
    if report.kv_dims_per_token_before:
        print(f"KV cache dims per token {report.kv_dims_per_token_before} -> {report.kv_dims_per_token_after}")
    if report.cross_kv_dims_per_source_token_before:
        print(
            f"cross-attention KV cache dims per source token {report.cross_kv_dims_per_source_token_before} -> "
            f"{report.cross_kv_dims_per_source_token_after}"
        )
    if latent is not None:
        print(_latent_line(latent))
    print(f"wrote {args.out}: {_pruned_loader(args.out)} or clover eval {args.out}")
    return 0


def _pruned_loader(out: str) -> str:
    """How to load the pruned checkpoint in ``out`` without clover, from what its config.json says."""
    from .models import model_kind

    try:
        config = json.loads((pathlib.Path(out) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    config = config if isinstance(config, dict) else {}
    auto_class = model_kind(config)[1].__name__ if config.get("auto_map") else "AutoModel*"
    library = "diffusers" if "_class_name" in config else "transformers"  # diffusers configs name their class
    return f"{library}' {auto_class}.from_pretrained(DIR, trust_remote_code=True)"


def cmd_eval(args: argparse.Namespace) -> int:
    from .decompose import refuse_non_finite_weights
    from .errors import CloverError
    from .models import load_model, resolve_device
    from .quality import SPEECH_EVAL_SENTENCES, measure

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    # numbers are checked before minutes of loading; each message gives the valid range
    if args.tokens < 2:
        raise CloverError(f"--tokens {args.tokens} must be at least 2 (WikiText-2 tokens scored; default 4096)")
    given_window = args.window is not None
    args.window = 512 if args.window is None else args.window
    if args.window < 2:
        raise CloverError(f"--window {args.window} must be at least 2 (tokens per scored window; default 512)")
    if args.sentences is not None and args.sentences < 1:
        raise CloverError(f"--sentences {args.sentences} must be in 1..20 (Whisper: spoken sentences scored)")
    if args.limit is not None and args.limit < 1:
        raise CloverError(f"--limit {args.limit} must be at least 1 (omit it to score every row)")
    if tasks:
        from .finetune_data import COMMONSENSE

        if unknown := [t for t in tasks if t not in COMMONSENSE]:
            raise CloverError(f"unknown --tasks {unknown}: choose from {', '.join(COMMONSENSE)}")
    device = resolve_device(args.device)
    loaded = load_model(args.model, dtype=_dtype(args.dtype), tokenizer=args.tokenizer)
    loaded.model.to(device)
    if tasks and loaded.kind != "causal-lm":
        raise CloverError(f"--tasks scores causal LMs with lm-evaluation-harness; {args.model} is {loaded.described}")
    if tasks and loaded.tokenizer is None:
        raise CloverError(f"--tasks needs a tokenizer and {args.model} has none; pass --tokenizer DIR")
    if args.sentences is not None and loaded.kind != "speech-seq2seq":  # a note, not an error: scripts pass one
        print(  # set of eval options to every model they score, like --window beyond a model's context
            f"clover: note: --sentences applies to speech models (Whisper: spoken sentences scored); "
            f"{args.model} is {loaded.described}, so it is ignored",
            file=sys.stderr,
        )
    refuse_non_finite_weights(loaded.model)  # as prune and decompose do: every score would read nan
    report = measure(
        loaded,
        tokens=args.tokens,
        window=args.window,
        sentences=SPEECH_EVAL_SENTENCES if args.sentences is None else args.sentences,
        progress=not args.quiet,
    )
    if report.get("ppl_window", args.window) < args.window:
        print(
            f"clover: note: {'--window' if given_window else 'the default window'} {args.window} is longer than "
            f"the model's context; scored in windows of "
            f"{report['ppl_window']} tokens",
            file=sys.stderr,
        )
    if "ppl_split_tokens" in report:
        print(
            f"clover: note: --tokens {args.tokens} is more than WikiText-2's test split holds "
            f"({report['ppl_split_tokens']:,} tokens with this tokenizer); scored all of it",
            file=sys.stderr,
        )
    if tasks:
        import os

        from .evaluate import lm_eval_accuracy

        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        scores = lm_eval_accuracy(loaded.model, loaded.tokenizer, tasks, limit=args.limit, progress=not args.quiet)
        for task, entry in scores.items():
            report[f"{task}_acc"], report[f"{task}_acc_norm"] = entry["acc"], entry.get("acc_norm")
            report[f"{task}_n"] = entry["n"]
        report["commonsense_avg_acc"] = sum(e["acc"] for e in scores.values()) / len(scores)
    if args.json:
        print(json.dumps(report))
        return 0
    for key, value in report.items():
        print(f"{key:26} {_report_value(key, value)}")
    return 0


def _report_value(key: str, value) -> str:
    """A report value as text: counts (and whole byte sizes) with thousands separators, other numbers to 4
    decimals."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or ("bytes" in key and value.is_integer()):
        return f"{int(value):,}"
    return f"{value:,.4f}"


CACHE_KINDS = {
    "models": "short-named models converted from their pip packages",
    "moments": "calibration moments (input second moments per checkpoint and calibration set)",
    "speech": "synthesised Harvard-sentence audio for the Whisper evaluation",
}


def _tree_bytes(path, seen: set) -> int:
    """Bytes of the files under ``path`` (or of ``path``), each file counted once however many names it has (a
    running calibration links its moments into the cache)."""
    total = 0
    for f in [path] if path.is_file() else path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            stat = f.stat()
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total


def cmd_cache(args: argparse.Namespace) -> int:
    import shutil

    from .errors import CloverError
    from .models import model_cache_dir

    root = model_cache_dir()
    if root.exists() and not root.is_dir():
        raise CloverError(f"the cache folder {root} is a file, not a folder: point $CLOVER_CACHE at a folder")
    chosen = list(CACHE_KINDS) if args.clear == "all" else [args.clear] if args.clear else list(CACHE_KINDS)
    rows, kept = [], []
    for kind in chosen:
        folder = root / kind
        entries = _clover_cache_entries(kind, folder)
        seen: set = set()
        rows.append({"cache": kind, "path": str(folder), "entries": len(entries),
                     "bytes": sum(_tree_bytes(e, seen) for e in entries)})  # fmt: skip
        if args.clear:
            in_use = [e for e in entries if _in_use(e)]
            try:  # only what clover wrote: a file or folder of yours put there stays; a running prune's stays too
                for entry in [e for e in entries if e not in in_use]:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            except OSError as error:
                raise CloverError(f"could not clear {folder}: {error.strerror or error}") from None
            for parent in {entry.parent for entry in entries if entry.parent != folder}:
                if not any(parent.iterdir()):  # a short name's folder that held only clover's versions
                    parent.rmdir()
            if in_use:
                print(f"clover: note: left {len(in_use)} in use by a running clover ({in_use[0]})", file=sys.stderr)
            kept += [str(e) for e in sorted(folder.rglob("*")) if (e.is_file() or (e.is_dir() and not any(e.iterdir())))
                     and not any(e == u or u in e.parents for u in in_use)]  # fmt: skip
    if kept:
        print(f"clover: note: left {len(kept)} entries clover did not write ({', '.join(kept[:3])})", file=sys.stderr)
    if args.json:
        print(json.dumps({"root": str(root), "cleared": bool(args.clear), "caches": rows}))
        return 0
    print(f"clover cache: {root} ($CLOVER_CACHE moves it)")
    for row in rows:
        action = "cleared" if args.clear else f"{row['entries']:>4} entries"
        print(f"  {row['cache']:8} {row['bytes'] / 1e6:10.1f} MB  {action:13} {CACHE_KINDS[row['cache']]}")
    return 0


def _clover_cache_entries(kind: str, folder: pathlib.Path) -> list[pathlib.Path]:
    """The entries of a cache that clover wrote: a converted model's version folders (``models/<short name>/v3``,
    or a killed conversion's staging beside one), a moments or speech file named by its key (24 hex digits), or a
    killed run's temporary file (or a layer-by-layer calibration's folder) beside one. Anything else, even inside a
    short name's folder, is the user's."""
    import re

    from .models import SHORT_NAMES

    if not folder.is_dir():
        return []
    if kind == "models":
        names = [d for d in sorted(folder.iterdir()) if d.name in SHORT_NAMES and d.is_dir() and not d.is_symlink()]
        return [v for d in names for v in sorted(d.iterdir()) if re.fullmatch(r"\.?v[0-9]+(\..+)?", v.name)]
    named = (
        e
        for e in sorted(folder.iterdir())
        if re.fullmatch(r"\.?[0-9a-f]{24}(\.safetensors|\.npy|\.[0-9]+-\w+\.tmp)", e.name)
    )
    return [e for e in named if e.is_file() or (e.is_dir() and not e.is_symlink() and e.name.endswith(".tmp"))]


def _in_use(entry: pathlib.Path) -> bool:
    """A running process's temporary (``.<key>.<pid>-<random>.tmp``): a prune reads its moments from there."""
    from .io import process_alive

    pid = entry.name.split(".")[-2].split("-")[0] if entry.name.endswith(".tmp") else ""
    return pid.isdigit() and process_alive(int(pid))


class OneLineParser(argparse.ArgumentParser):
    """A mistyped option is one line, like every other user mistake: the usage block is what --help is for."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="clover",
        description="CLOVER (Cross-Layer Orthogonal Vectors): rewrite, inspect, prune and fine-tune transformer "
        "attention through the SVD of each head's Q-K and V-O products. Nothing is fetched from a model hub.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "decompose",
        help="rewrite attention into orthogonal, singular-value-ordered form (same function, same shapes)",
        description="Factorize every attention head's Q-K and V-O pair (thin QR of each factor + SVD of the small "
        "head_dim×head_dim product) and write a standard transformers checkpoint that from_pretrained loads (a "
        "diffusers UNet: a diffusers one, verified on one seeded denoising step). Where RoPE sits between Q and K "
        "(Llama, Qwen2, Mistral, SmolLM2) only V-O is rewritten: Q-K cannot be merged exactly across the rotation.",
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="directory to write (safetensors + config + tokenizer)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument(
        "--compute-dtype",
        default="float64",
        choices=["float64", "float32"],
        help=COMPUTE_DTYPE_HELP,
    )
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the before/after output check")
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="write the tokenizer of DIR (e.g. the original model's directory) into --out, for weights saved "
        "without one (the check runs on token ids and needs none)",
    )
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, help=STREAM_HELP)
    p.add_argument("--device", help=DEVICE_HELP + "; with --stream each layer moves there and back")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--json", action="store_true", help="print a JSON report instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser(
        "spectrum",
        help="print per-layer singular-value summaries for Q-K and V-O, and plot them",
        description="Compute each head's Q-K and V-O singular values without changing the model; print one line "
        "per layer and pair (largest, median, smallest σ, and how many dims hold 90% of the energy).",
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument(
        "--out",
        help="image file for the plot (.png, .pdf, .svg, .jpg; .png is added to a name without one): one panel per "
        "stack and pair, one line per layer",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the --out image if it exists")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser(
        "prune",
        help="remove the attention dims with the smallest singular values (no training)",
        description="Prune Q-K and/or V-O dims by singular value and write a checkpoint whose KV cache and "
        "parameters really shrink; it loads with AutoModel*.from_pretrained(DIR, trust_remote_code=True) (a "
        "diffusers UNet: diffusers' AutoModel, or clover.families.unet.load_pruned_unet). Ratios are shares of all "
        "dims of the model (per KV group). Q-K pruning is refused where RoPE sits between Q and K (Llama family): "
        "use --vo-ratio there.",
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="directory to write (refused if it exists, unless --overwrite)")
    p.add_argument("--qk-ratio", type=float, default=0.0, help="share of Q-K dims to remove, in [0, 1)")
    p.add_argument("--vo-ratio", type=float, default=0.0, help="share of V-O dims to remove, in [0, 1)")
    p.add_argument(
        "--threshold",
        type=singular_value,
        help="remove every dim whose singular value is ≤ T (both pairs; overrides ratios)",
    )
    p.add_argument("--qk-threshold", type=singular_value, help="threshold for Q-K only (paper, Whisper: 5e-3)")
    p.add_argument("--vo-threshold", type=singular_value, help="threshold for V-O only (paper, Whisper: 6e-3)")
    p.add_argument(
        "--method",
        default="clover",
        choices=["clover", "calibrated", "vanilla", "vanilla-activation"],
        help="clover: SVD of the weights (default); calibrated: SVD after whitening with the inputs' second moment "
        "on held-out data (minimises output error); vanilla: drop original head dims by ‖q_i‖·‖k_i‖ of the "
        "weights (baseline); vanilla-activation: the same by the RMS of the q_i, k_i, v_i activations on the "
        "calibration data (the authors' other baseline)",
    )
    p.add_argument(
        "--allocation",
        default="uniform",
        choices=["uniform", "layer", "global"],
        help="uniform: same count in every head (default); layer: one count per layer from the spectra; "
        "global: one singular-value cut over the whole model (the paper's protocol)",
    )
    p.add_argument(
        "--stacks",
        metavar="LIST",
        help="prune only these attention stacks, a comma list (default: all). Decoders: decoder. Encoders "
        "(BERT, ViT, DINOv2): encoder. Whisper, T5, BART: encoder, decoder (self-attention) and cross (the "
        "decoder's attention to the encoder). CLIP, SigLIP: text, vision. LLaMA-3.2-Vision: vision (image "
        "encoder), decoder (text self-attention), cross (text-to-image). SDXL UNet: self (attn1), cross (attn2). "
        "`clover spectrum MODEL` lists a model's stacks",
    )
    for pair, example in (("qk", "vision"), ("vo", "encoder,cross")):
        p.add_argument(
            f"--{pair}-stacks",
            metavar="LIST",
            help=f"prune {pair.upper()[0]}-{pair.upper()[1]} only in these stacks (default: --stacks), e.g. "
            f"--{pair}-stacks {example}; with the other pair elsewhere, one run does both (LLaMA-3.2-Vision: "
            "--qk-stacks vision for Q-K, exact only there, and V-O in every stack)",
        )
    p.add_argument(
        "--min-dims",
        type=int,
        default=1,
        help="dims every KV group keeps, 0..head_dim-1 (0 lets a head be emptied)",
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=128,
        help="calibrated, vanilla-activation: sequences of held-out text (at least 1)",
    )
    p.add_argument(
        "--calibration-length",
        type=int,
        default=512,
        help="calibrated, vanilla-activation: tokens per sequence (at least 2; cut to the model's context)",
    )
    p.add_argument(
        "--latent-rank",
        type=int,
        metavar="N",
        help="models whose KV cache is one latent shared by all heads (DeepSeek-V2/V3's MLA, which per-head "
        "pruning leaves as it is): cut the latent to N of its kv_lora_rank dims, so the cache shrinks. A PCA of the "
        "latent on the calibration text (exact) drops the trailing dims (approximate: the probe output's change is "
        "reported). Alone, or before --qk-ratio / --vo-ratio; needs a tokenizer and the model in memory",
    )
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="recompute the calibration moments instead of reusing those cached for this unchanged checkpoint "
        "(they are kept under $CLOVER_CACHE/moments, keyed by the weight files and the calibration settings)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="read the tokenizer (and Whisper's decoder prompt) from DIR, e.g. the original model's directory, "
        "for weights saved without one",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--compute-dtype", default="float64", choices=["float64", "float32"], help=COMPUTE_DTYPE_HELP)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, help=STREAM_HELP)
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "eval",
        help="quality, parameter count and KV-cache bytes per token of a model or pruned checkpoint",
        description="Causal LMs: WikiText-2 test perplexity (non-overlapping windows). Whisper: WER and decoder "
        "loss on espeak-ng speech of Harvard sentences. Encoders: cosine similarity of sentence embeddings "
        "to the original model's (SST-2 sentences). Diffusers UNets: attention parameters and the relative error "
        "of one seeded denoising step against the original's. Always: parameters and, where there is a KV cache, "
        "its bytes per token, measured from the cache object.",
    )
    p.add_argument("model", help=MODEL_HELP + ", including pruned ones")
    p.add_argument("--tokens", type=int, default=4096, help="causal LM: tokens of WikiText-2 test scored (≥ 2)")
    p.add_argument("--window", type=int, help="causal LM: window length (default 512; ≥ 2; cut to the model's context)")
    p.add_argument("--sentences", type=int, help="Whisper: number of spoken sentences (default and max 20)")
    p.add_argument(
        "--tasks",
        help="causal LM: also zero-shot accuracy with lm-evaluation-harness on the offline copies, comma list of "
        "boolq, piqa, social_iqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa (validation splits)",
    )
    p.add_argument("--limit", type=int, help="--tasks: rows per task (default: all)")
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="read the tokenizer (and Whisper's decoder prompt) from DIR, e.g. the original model's directory, "
        "for weights saved without one",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "cache",
        help="list clover's caches (converted models, calibration moments, speech) with their sizes, or clear them",
        description="clover keeps converted models, calibration moments and synthesised speech under $CLOVER_CACHE "
        "(default ~/.cache/clover). Without options: list each cache and its size. Everything there can be "
        "recomputed: clearing only costs time on the next run.",
    )
    p.add_argument("--clear", choices=[*CACHE_KINDS, "all"], help="delete one cache, or all of them")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=cmd_cache)

    from .cli_finetune import add_finetune_parser

    add_finetune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clover`` command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:  # Ctrl-C while the parser and the libraries are imported (seconds) is said in one line too
        args = build_parser().parse_args(argv)
        from safetensors import SafetensorError
        from transformers.utils import logging as hf_logging

        from .errors import CloverError
    except KeyboardInterrupt:
        print("clover: interrupted; nothing was written", file=sys.stderr)
        return 130
    except SystemExit as done:  # --help, or a mistyped option (said in one line): a code, as every other outcome
        return done.code if isinstance(done.code, int) else 2

    from .io import COMMITTED

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if getattr(args, "quiet", False):  # transformers' own bars too (loading weights, GGUF conversion)
        hf_logging.disable_progress_bar()
    previous_term = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    previous_int = signal.getsignal(signal.SIGINT) if _main_thread() else None
    committed_before = len(COMMITTED)
    show_warning = warnings.showwarning
    warnings.showwarning = _notes_for_clover_warnings(show_warning)

    def stopped(how: str) -> str:
        # staging directories are removed on the way out (io.atomic_directory); a committed one is complete
        written = [str(path) for path in COMMITTED[committed_before:]]
        if written:
            return f"clover: {how} after {', '.join(written)} was written (complete); nothing else was written"
        return f"clover: {how}; nothing was written"

    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that left (`| head`) is met here, not in Python's flush at exit
        if argv is None and _main_thread():  # the command's work is done: Ctrl-C while Python exits changes nothing
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return code
    except CloverError as error:
        print(f"clover: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `clover ... | head`: the reader left, as with any tool; staging is already removed
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        if previous_int is not None:  # a Ctrl-C more while clover winds down would print a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(stopped("interrupted"), file=sys.stderr)
        return 130
    except Terminated:
        print(stopped("terminated"), file=sys.stderr)
        return 143
    except (OSError, SafetensorError) as error:  # a full disk, a read-only folder: said in one line
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        reason = getattr(error, "strerror", None) or error
        print(stopped(f"error: {reason}{where}"), file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = show_warning
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        if previous_int is not None and argv is not None:  # called from Python: its own Ctrl-C handling back
            signal.signal(signal.SIGINT, previous_int)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _notes_for_clover_warnings(show_warning):
    """warnings.showwarning that prints clover's own warnings as one ``clover: note:`` line (not Python's two
    lines with a source line) and leaves every other library's warnings as they are."""
    from .errors import CloverWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CloverWarning):
            print(f"clover: note: {message}", file=sys.stderr)
        else:
            show_warning(message, category, filename, lineno, file, line)

    return show


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit, after the reader of a pipe left, raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that staging directories are cleaned up on the way out."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
