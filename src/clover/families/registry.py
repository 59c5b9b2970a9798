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
        for model_type in family.model_types + family.model_classes:
            if model_type in claimed:
                raise RuntimeError(f"model {model_type!r} is claimed by {claimed[model_type]} and {family.name}")
            claimed[model_type] = family.name
    return tuple(found.values())


FAMILIES: tuple[Family, ...] = _discover()


def supported_families() -> str:
    """Human-readable list of supported families and their config ``model_type`` values (or model classes)."""
    return "; ".join(
        f"{f.examples} (model_type {', '.join(f.model_types)})"
        if f.model_types
        else f"{f.examples} ({', '.join(f.model_classes)})"
        for f in FAMILIES
    )


def checkpoint_family(kind: str | None = None, *, model_class: str | None = None) -> Family | None:
    """The family that reads and writes its own checkpoints (``Family.checkpoint_kind``: a diffusers model) of this
    LoadedModel kind, or whose ``model_classes`` hold ``model_class`` (a diffusers config's ``_class_name``); None
    for transformers' kinds and classes no such family claims."""
    for family in FAMILIES:
        if family.checkpoint_kind is not None and (
            kind == family.checkpoint_kind or model_class in family.model_classes
        ):
            return family
    return None


def family_of_type(model_type: str) -> Family | None:
    """The family claiming a config's ``model_type``, or None (before any model is built)."""
    return next((family for family in FAMILIES if model_type in family.model_types), None)


def family_for(model: nn.Module) -> Family:
    """The family of a model: by ``config.model_type`` (transformers), else by its class name (diffusers)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    classes = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        if classes & set(family.model_classes):
            return family
    raise UnsupportedModelError(
        f"clover has no family for model_type {model_type!r}. Supported: {supported_families()}. "
        "Adding a family means one file in clover/families/."
    )
