"""The registry of families: every Family subclass defined in this package's modules, found by discovery."""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from ..errors import UnsupportedModelError
from .base import Family

_NOT_FAMILIES = ("base", "pruned", "registry")


def _discover() -> tuple[Family, ...]:
    """One instance of every concrete Family subclass defined in this package's modules, in module order."""
    found: dict[type, Family] = {}
    for info in sorted(pkgutil.iter_modules(importlib.import_module(__package__).__path__), key=lambda m: m.name):
        if info.name in _NOT_FAMILIES:
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Family) and value.__module__ == module.__name__:
                found[value] = value()
    claimed: dict[str, str] = {}
    for family in found.values():
        for model_type in family.model_types:
            if model_type in claimed:
                raise RuntimeError(f"model_type {model_type!r} is claimed by {claimed[model_type]} and {family.name}")
            claimed[model_type] = family.name
    return tuple(found.values())


FAMILIES: tuple[Family, ...] = _discover()


def supported_families() -> str:
    """Human-readable list of supported families and their config ``model_type`` values."""
    return "; ".join(f"{f.examples} (model_type {', '.join(f.model_types)})" for f in FAMILIES)


def family_for(model: nn.Module) -> Family:
    """The family of a transformers model, by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"clover has no family for model_type {model_type!r}. Supported: {supported_families()}. "
        "Adding a family means one file in clover/families/."
    )
