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
