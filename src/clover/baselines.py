"""Wrapping a model for one fine-tuning method: CLOVER or a PEFT baseline at a matched trainable count.

The PEFT baselines (LoRA, DoRA, PiSSA, and PEFT 0.21's HiRA, PSOFT, OSF) target the q/k/v/o projections that
clover's family files find, and the LLaMA-style MLP linears; by default their rank is the one whose
trainable count is closest to CLOVER's on the same model (the fair-comparison rule of the method notes).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clover.errors import CloverError

# PEFT 0.21 asks transformers 5 the deprecated name on every wrap and save: a warning users can do nothing about
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

CLOVER = "clover"
# PEFT baselines; the last three exist in PEFT 0.21 (HiRA, PSOFT, OSF) and are only sketched on CPU
PEFT_METHODS = ("lora", "dora", "pissa", "hira", "psoft", "osf")
METHODS = (CLOVER, *PEFT_METHODS)
# the methods each option reaches (peft_config below): a note tells a user who passes it to another
RANKED = PEFT_METHODS
SCALED = ("lora", "dora", "pissa", "psoft")  # --alpha
WITH_DROPOUT = (CLOVER, "lora", "dora", "pissa", "hira", "psoft")  # OSF has no dropout
PEFT_TARGETS = ("q", "k", "v", "o", "up", "gate", "down")
DEFAULT_PEFT_TARGETS = ("q", "k", "v")  # the authors' LoRA / DoRA baselines


def peft_target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full module paths of the q/k/v/o projections (via clover's family files) and MLP linears named by targets."""
    from clover.families import LinearProjection, attention_sites

    names = {id(module): name for name, module in model.named_modules()}
    paths = []
    for site in attention_sites(model, allow_pruned=True):
        for label in ("q", "k", "v", "o"):
            if label in targets:
                projection = getattr(site, label)
                if not isinstance(projection, LinearProjection):
                    raise CloverError(
                        f"the PEFT baselines need separate {label} linears; {type(model).__name__} fuses them"
                    )
                paths.append(names[id(projection.linear)])
    for label in ("up", "gate", "down"):
        if label in targets:
            found = [name for name, m in model.named_modules() if name.endswith(f".{label}_proj")]
            if not found:
                raise CloverError(f"--targets {label}: {type(model).__name__} has no {label}_proj (LLaMA-style MLP)")
            paths += found
    return paths


def peft_config(
    method: str, rank: int, alpha: float, dropout: float, modules: dict[str, int], init: bool = True
) -> Any:
    """The PEFT config of a baseline at a given rank; ``modules``: path -> min(weight shape).

    ``init=False`` skips the SVD initialisations (for counting parameters).
    """
    import peft

    if method in ("lora", "dora", "pissa"):
        init_weights: Any = ("pissa" if method == "pissa" else True) if init else False
        return peft.LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(modules),
            use_dora=method == "dora",
            init_lora_weights=init_weights,
        )
    if method == "hira":
        return peft.HiraConfig(r=rank, target_modules=list(modules), hira_dropout=dropout)
    if method == "psoft":
        return peft.PsoftConfig(r=rank, target_modules=list(modules), psoft_dropout=dropout, psoft_alpha=alpha)
    if method == "osf":
        # OSF trains the bottom singular directions: trainable rank = min(shape) - effective rank, per module
        pattern = {f"^{re.escape(name)}$": max(0, dims - rank) for name, dims in modules.items()}
        return peft.OSFConfig(target_modules=list(modules), rank_pattern=pattern, init_weights=init)
    raise CloverError(f"no PEFT config for method {method!r}")


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, shared tensors counted once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def _skeleton(model: nn.Module, **overrides: Any) -> nn.Module:
    """A model of the same class from (a copy of) its config, with ``overrides`` applied."""
    config = copy.deepcopy(model.config)
    for key, value in overrides.items():
        setattr(config, key, value)
    if "num_hidden_layers" in overrides and isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: overrides["num_hidden_layers"]]
    return type(model)(config)


def clover_trainable_count(model: nn.Module, targets: Sequence[str] | None = None) -> int:
    """Trainable parameters CLOVER would have on this model (from shapes: the real model stays untouched)."""
    from clover.finetune import CloverConfig, trainable_count

    return trainable_count(model, CloverConfig(targets=targets))


def matching_rank(model: nn.Module, method: str, modules: dict[str, int], target: int) -> int:
    """The rank whose trainable count is closest to ``target`` (counts are at most quadratic in the rank)."""
    import peft

    def count(rank: int) -> int:
        with torch.device("meta"):  # shapes only: no memory, no SVD
            skeleton = _skeleton(model)
        wrapped = peft.get_peft_model(skeleton, peft_config(method, rank, 2 * rank, 0.0, modules, False))
        return count_trainable(wrapped)[0]

    ranks = [1, 2, 3]
    counts = [count(r) for r in ranks]
    # c(r) = a r^2 + b r + c from three points, solved for c(r) = target
    a = (counts[2] - 2 * counts[1] + counts[0]) / 2
    b = counts[1] - counts[0] - 3 * a
    c = counts[0] - a - b
    if abs(a) < 1e-9:
        guess = (target - c) / b
    else:
        guess = (-b + math.sqrt(max(b * b - 4 * a * (c - target), 0.0))) / (2 * a)
    upper = min(modules.values())
    candidates = sorted({max(1, min(upper, r)) for r in (math.floor(guess), math.ceil(guess))})
    return min(candidates, key=lambda r: abs(a * r * r + b * r + c - target))


def wrap_model(
    model: nn.Module,
    method: str,
    *,
    targets: Sequence[str] | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float = 0.05,
    dropout_placement: str = "frozen_output",
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """Wrap ``model`` in place for the method: (CloverModel or PeftModel, description incl. trainable count).

    ``targets=None``: CLOVER's recipe, or q,k,v for the PEFT baselines; ``rank=None``: the rank matching CLOVER's
    default trainable count; ``alpha=None``: 2 x rank for the LoRA family (the authors' r 64 / alpha 128).
    ``dropout_placement`` applies to CLOVER only.
    """
    torch.manual_seed(seed)
    if method == CLOVER:
        from clover.finetune import CloverConfig, get_clover_model

        config = CloverConfig(targets=targets, dropout=dropout, dropout_placement=dropout_placement)
        wrapped = get_clover_model(model, config)
        info: dict[str, Any] = {"targets": list(wrapped.clover_config.targets)}
    elif method in PEFT_METHODS:
        import peft

        targets = targets or DEFAULT_PEFT_TARGETS
        modules = {name: min(model.get_submodule(name).weight.shape) for name in peft_target_modules(model, targets)}
        # a layer pruned to 0 features bounds no rank (an adapter on it is empty at any rank)
        narrowest = min(((n, w) for n, w in modules.items() if w > 0), key=lambda item: item[1], default=None)
        if rank and narrowest is not None and rank > narrowest[1]:  # past a layer's width a rank adds nothing
            raise CloverError(
                f"--rank {rank} exceeds the narrowest target layer ({narrowest[0]}: {narrowest[1]} features); "
                f"use at most {narrowest[1]}, or omit it to match CLOVER's trainable count"
            )
        rank = rank or matching_rank(model, method, modules, clover_trainable_count(model))
        # LoRA family: the authors' alpha = 2 r; PSOFT: PEFT's default scaling of 1 (alpha = r)
        alpha = alpha if alpha is not None else (1.0 if method == "psoft" else 2.0) * rank
        wrapped = peft.get_peft_model(model, peft_config(method, rank, alpha, dropout, modules))
        info = {"targets": list(targets), "rank": rank, "alpha": alpha}
    else:
        raise CloverError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    info["trainable"], info["all"] = count_trainable(wrapped)
    return wrapped, info


def inner_model(wrapped: nn.Module) -> nn.Module:
    """The transformers model inside a CloverModel or PeftModel (adapter layers injected in place)."""
    return wrapped.get_base_model()


def merge(wrapped: nn.Module) -> nn.Module:
    """Fold the trained adapter into a plain transformers model (same class and parameter count)."""
    return wrapped.merge_and_unload()


def save_adapter(wrapped: nn.Module, directory: Path) -> None:
    """Write the adapter alone (CLOVER's small matrices, or PEFT's adapter files) into directory."""
    wrapped.save_pretrained(directory)
