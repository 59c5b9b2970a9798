"""Atomic checkpoint writing: a directory appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import CloverError


def check_output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse to clobber a non-empty directory unless asked; returns the resolved path."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise CloverError(f"--out {path} exists and is a file; give a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CloverError(f"--out {path} already exists and is not empty; pass --overwrite or choose another path")
    return path


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out`` in one rename, on error it vanishes."""
    final = check_output_dir(out, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(trash)
            staging.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_loaded_model(loaded, directory: Path) -> None:
    """Write a model with its tokenizer (and Whisper feature extractor) as a standard transformers checkpoint."""
    loaded.model.save_pretrained(directory)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)
    if loaded.feature_extractor is not None:
        loaded.feature_extractor.save_pretrained(directory)


AUTO_CLASS = {
    "causal-lm": "AutoModelForCausalLM",
    "encoder": "AutoModel",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
}


def save_pruned_model(loaded, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a pruned model atomically: safetensors, config with the per-head dims, and the modeling code.

    The directory loads with ``AutoModel*.from_pretrained(DIR, trust_remote_code=True)`` in a process that
    does not have clover installed: ``modeling_clover.py`` (torch + transformers only) is copied beside the weights.
    """
    with atomic_directory(out, overwrite=overwrite) as staging:
        write_pruned_model(loaded, staging)
    return Path(out)


def write_pruned_model(loaded, directory: Path) -> None:
    """The files of a pruned checkpoint, written into an existing (staging) directory."""
    from . import modeling_clover

    model = loaded.model
    base = type(model).__name__
    # a pruned checkpoint loaded back with trust_remote_code already has the Clover class (healed models)
    clover_class = base if base.startswith("Clover") else f"Clover{base}"
    if not hasattr(modeling_clover, clover_class):
        raise CloverError(f"no pruned counterpart for {base}; pruned checkpoints support {_pruned_bases()}")
    had_map = "auto_map" in model.config.to_dict()
    previous = getattr(model.config, "auto_map", None)
    model.config.auto_map = {AUTO_CLASS[loaded.kind]: f"modeling_clover.{clover_class}"}
    try:
        save_loaded_model(loaded, directory)
    finally:
        if had_map:
            model.config.auto_map = previous
        else:
            del model.config.auto_map  # the live model object is the plain class; only the files need the map
    shutil.copyfile(modeling_clover.__file__, directory / "modeling_clover.py")
    _patch_architectures(directory / "config.json", clover_class)


def _pruned_bases() -> str:
    from . import modeling_clover

    return ", ".join(n.removeprefix("Clover") for n in dir(modeling_clover) if n.startswith("Clover") and "For" in n)


def _patch_architectures(config_path: Path, clover_class: str) -> None:
    import json

    config = json.loads(config_path.read_text())
    config["architectures"] = [clover_class]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
