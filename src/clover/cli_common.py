"""Help strings shared by the ``clover`` subcommands (``clover.cli`` and ``clover.cli_finetune``), kept apart so
neither command module has to import the other."""

from __future__ import annotations

OVERWRITE_HELP = "replace --out if clover wrote it (its files and nothing else); other folders are never replaced"

DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)"

MODEL_HELP = (
    "a short name (smollm2-135m, minilm-l6, whisper-tiny.en, whisper-base: real weights shipped in pip packages, "
    "converted once and cached under $CLOVER_CACHE or ~/.cache/clover) or a local checkpoint directory: transformers, "
    "or a diffusers UNet (its folder, or a pipeline's folder holding unet/)"
)

DTYPE_HELP = "weights dtype (default: the checkpoint's own, so a bf16 model is written back as bf16)"

STREAM_HELP = (
    "read and write the checkpoint one layer at a time (safetensors in, safetensors shards out): memory stays "
    "about one layer whatever the model's size. Chosen by itself when the weights exceed 40%% of this machine's "
    "memory; --no-stream keeps the whole model in memory"
)

COMPUTE_DTYPE_HELP = "precision of the QR/SVD (results are written back in the weights' dtype); default float64"


def singular_value(text: str) -> float:
    """argparse type of a threshold: a finite singular value ≥ 0 (argparse then names the flag typed)."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite singular value ≥ 0")
    return value
