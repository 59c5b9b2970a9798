"""Singular-value fine-tuning (method section 6): frozen orthonormal factors, small trainable matrices, exact merge.

Why this is not registered with PEFT: ``peft.register_peft_method`` accepts only names that already exist in
PEFT's ``PeftType`` enum (anything else raises "Unknown PEFT type"), so adding CLOVER there means patching
PEFT itself. Instead the API here has PEFT's shape: a config dataclass, ``get_clover_model(model, config)``,
``print_trainable_parameters()``, ``save_pretrained`` / ``CloverModel.from_pretrained(base, dir)`` and
``merge_and_unload()``, so the usual PeftModel calls (and transformers' Trainer) work on a CloverModel, and
the merged model is a plain transformers model that needs neither library.

The two forms (math layout, ``y = x @ W + b``; one block = one head, or one d_h/2 slice of ``up_proj``):
- QR form (targets "q", "k", "v", "up"): ``W_blk = F R``; F (orthonormal) frozen, R trainable.
- SVD form of a pair (targets "qk", "vo"): ``A Bᵀ = F_a diag(σ) F_bᵀ``, A the shared side (K or V, one KV
  head), B its g partners stacked (Q heads, or O heads transposed); the trainable S (init diag(σ)) sits on
  the shared side, ``F_b`` is written into the partner projection and frozen.
Under partial RoPE (Phi-3, GPT-NeoX, GPT-J) "qk" is the SVD form of each head's pass-through dims, the exact
part of the product; the rotary dims stay frozen as they are.
Biases ride along as an augmented input row ``[x, 1] @ [W; b]`` (the frozen factor's last row is a frozen
bias of the frozen output), so S adapts them too and merging gives ``W' = F S, b' = f S`` exactly. V's bias
is not folded into O's here: the fold relies on attention rows summing to 1, which attention dropout breaks.
Every frozen factor is ``W_base @ X`` for a small per-block X, so a saved adapter holds only X and S.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import __version__
from .decompose import refuse_non_finite_weights
from .errors import CloverError
from .factorize import (
    merge_heads,
    merge_output_heads,
    pair_transforms,
    qr_transform,
    split_heads,
    split_output_heads,
)
from .families import AttentionSite, Conv1DSlice, LinearProjection, Projection, attention_sites
from .io import atomic_directory

__all__ = [
    "CONFIG_NAME",
    "DROPOUT_PLACEMENTS",
    "TARGETS",
    "WEIGHTS_NAME",
    "CloverConfig",
    "CloverConv1D",
    "CloverLinear",
    "CloverLinearParts",
    "CloverModel",
    "get_clover_model",
    "resolve_targets",
    "trainable_count",
]

TARGETS = ("qk", "q", "k", "v", "vo", "up")
DROPOUT_PLACEMENTS = ("frozen_output", "update", "none")
CONFIG_NAME = "clover_config.json"
WEIGHTS_NAME = "clover_adapter.safetensors"
_CONFLICTS = (("qk", "q"), ("qk", "k"), ("vo", "v"))


def _as_dtype(value: torch.dtype | str, label: str) -> torch.dtype:
    """A floating torch dtype from a dtype or its name ("float32", "torch.bfloat16")."""
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CloverError(
            f"{label}={value!r} is not a floating-point torch dtype; use e.g. torch.float32 or 'bfloat16'"
        )
    return dtype


@dataclass
class CloverConfig:
    """What to train and how; the defaults reproduce the authors' recipe (method section 6).

    ``targets``: any of "qk", "q", "k", "v", "vo", "up" (see the module docstring). ``None`` resolves per
    model (:func:`resolve_targets`): RoPE models ("q", "vo", "up"), under GQA ("q", "v", "up") as the authors
    do (QR of each KV head's W_v, O untouched); models without RoPE, or with partial RoPE, ("qk", "vo").
    ``dropout_placement``: "frozen_output" (the authors': on the frozen projection's output, before S, so on
    the whole path; for "qk" and "vo" that is the K and V path), "update" (only on the path through
    S - S_init, like LoRA's side branch; a no-op at init) or "none".
    Weight decay on S pulls it toward zero, not toward the pretrained weights: train with weight_decay=0.
    """

    targets: tuple[str, ...] | None = None
    dropout: float = 0.05
    dropout_placement: str = "frozen_output"
    trainable_dtype: torch.dtype | str = torch.float32
    frozen_dtype: torch.dtype | str | None = None  # None: each projection's own dtype

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if self.targets is not None:
            self.targets = tuple(self.targets)
            unknown = [t for t in self.targets if t not in TARGETS]
            if unknown or not self.targets:
                raise CloverError(f"unknown CLOVER targets {unknown or '(empty)'}; choose from {', '.join(TARGETS)}")
            if len(set(self.targets)) != len(self.targets):
                raise CloverError(f"targets {self.targets} name a target twice")
            for a, b in _CONFLICTS:
                if a in self.targets and b in self.targets:
                    raise CloverError(f"targets '{a}' and '{b}' both rewrite the same projection; keep one of them")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise CloverError(f"dropout={self.dropout!r} must be a number in [0, 1)")
        if self.dropout_placement not in DROPOUT_PLACEMENTS:
            raise CloverError(
                f"dropout_placement={self.dropout_placement!r}; choose from {', '.join(DROPOUT_PLACEMENTS)}"
            )
        self.trainable_dtype = _as_dtype(self.trainable_dtype, "trainable_dtype")
        if self.frozen_dtype is not None:
            self.frozen_dtype = _as_dtype(self.frozen_dtype, "frozen_dtype")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (dtypes as names)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["targets"] = None if self.targets is None else list(self.targets)
        for key in ("trainable_dtype", "frozen_dtype"):
            data[key] = None if data[key] is None else str(data[key]).removeprefix("torch.")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CloverConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (an adapter from a newer clover)."""
        names = {f.name for f in fields(cls)}
        if extra := sorted(set(data) - names):
            raise CloverError(f"adapter config has unknown fields {extra}; upgrade clover (this is {__version__})")
        return cls(**data)


def _blockwise(h: Tensor, blocks: Tensor) -> Tensor:
    """(..., n, w) @ (n, w, v) per block -> (..., n, v)."""
    return torch.einsum("...nw,nwv->...nv", h, blocks)


class CloverLinear(nn.Module):
    """``y = concat_blocks(dropout(x @ F + f) @ S_blk)``: frozen factor F (bias row f), trainable blocks S.

    Without ``blocks`` it is a frozen (rewritten) linear: a pair's partner or an untouched slice. The block
    width is read from ``blocks``, never from the model config, so pruned heads (width r < d_h) work as is.
    ``transform`` (n, w, w), float64, is the small X with F = W_base @ X per block ("output" side) or, for an
    output projection, rows_blk = Xᵀ @ W_base rows ("input" side); it is what save_pretrained stores.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        blocks: Tensor | None = None,
        transform: Tensor | None = None,
        transform_side: str = "output",
        dropout: float = 0.0,
        dropout_placement: str = "frozen_output",
        trainable_dtype: torch.dtype = torch.float32,
        frozen_dtype: torch.dtype = torch.float32,
        base_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = weight.shape  # math layout in, nn.Linear layout stored
        self.frozen_weight = nn.Parameter(weight.T.to(frozen_dtype).contiguous(), requires_grad=False)
        frozen_bias = None if bias is None else nn.Parameter(bias.to(frozen_dtype).clone(), requires_grad=False)
        self.register_parameter("frozen_bias", frozen_bias)
        self.register_parameter("blocks", None if blocks is None else nn.Parameter(blocks.to(trainable_dtype)))
        self.dropout_placement = dropout_placement
        if blocks is not None and dropout_placement == "update":
            self.register_buffer("initial_blocks", blocks.to(trainable_dtype).clone(), persistent=False)
        use_dropout = blocks is not None and dropout_placement != "none" and dropout > 0
        self.dropout = nn.Dropout(dropout) if use_dropout else nn.Identity()
        # a plain attribute, not a buffer: model.to(bfloat16) must not round it, and only save_pretrained reads it
        self.transform = None if transform is None else transform.detach().to("cpu", torch.float64)
        self.transform_side = transform_side
        self.base_dtype = base_dtype
        self.linear_class: type[nn.Linear] = nn.Linear  # what to_linear rebuilds: the replaced module's class

    def forward(self, x: Tensor) -> Tensor:
        frozen = nn.functional.linear(x.to(self.frozen_weight.dtype), self.frozen_weight, self.frozen_bias)
        if self.blocks is None:
            return frozen.to(x.dtype)
        h = frozen.to(self.blocks.dtype).unflatten(-1, self.blocks.shape[:2])
        if self.dropout_placement == "update":
            out = _blockwise(h, self.initial_blocks) + _blockwise(self.dropout(h), self.blocks - self.initial_blocks)
        else:
            out = _blockwise(self.dropout(h), self.blocks)
        return out.flatten(-2).to(x.dtype)

    @torch.no_grad()
    def merged_weight(self) -> tuple[Tensor, Tensor | None]:
        """The (d_in, d_out) weight and bias this module computes, in float64 (math layout)."""
        weight = self.frozen_weight.double().T
        bias = None if self.frozen_bias is None else self.frozen_bias.double()
        if self.blocks is not None:
            blocks = self.blocks.double()
            weight = _blockwise(weight.unflatten(-1, blocks.shape[:2]), blocks).flatten(-2)
            if bias is not None:
                bias = _blockwise(bias.unflatten(-1, blocks.shape[:2]), blocks).flatten(-2)
        return weight, bias

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (trained blocks folded in)."""
        weight, bias = self.merged_weight()
        device = self.frozen_weight.device
        shape = (self.in_features, self.out_features)
        linear = nn.utils.skip_init(
            self.linear_class, *shape, bias=bias is not None, device=device, dtype=self.base_dtype
        )
        linear.weight.copy_(weight.T)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear

    def extra_repr(self) -> str:
        blocks = "frozen" if self.blocks is None else f"blocks={tuple(self.blocks.shape)}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {blocks}"


class CloverConv1D(nn.Module):
    """Replaces a GPT-2 ``Conv1D`` whose output columns are split into parts (fused c_attn -> q | k | v)."""

    def __init__(self, parts: dict[tuple[int, int], CloverLinear], base_dtype: torch.dtype):
        super().__init__()
        spans = sorted(parts)
        self.nf, self.nx = spans[-1][1], parts[spans[0]].in_features
        self.parts = nn.ModuleDict({f"{start}_{stop}": parts[(start, stop)] for start, stop in spans})
        self.base_dtype = base_dtype

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([part(x) for part in self.parts.values()], dim=-1)

    @torch.no_grad()
    def to_conv1d(self) -> nn.Module:
        """A plain transformers ``Conv1D`` computing the same function."""
        from transformers.pytorch_utils import Conv1D

        merged = [part.merged_weight() for part in self.parts.values()]
        conv = Conv1D(self.nf, self.nx)
        conv.weight.copy_(torch.cat([w for w, _ in merged], dim=1))
        conv.bias.copy_(torch.cat([b for _, b in merged]))
        return conv.to(device=next(iter(self.parts.values())).frozen_weight.device, dtype=self.base_dtype)


class CloverLinearParts(nn.Module):
    """Replaces an ``nn.Linear`` whose output features several projections share (Phi-3's fused qkv_proj, GPT-NeoX's
    per-head [q_h | k_h | v_h], or the rotary and pass-through dims of partial-RoPE heads): one part per projection."""

    def __init__(
        self, parts: dict[str, tuple[Tensor, CloverLinear]], base_dtype: torch.dtype, linear_class: type = nn.Linear
    ):
        super().__init__()
        self.linear_class = linear_class  # Falcon's FalconLinear stays a FalconLinear when merged
        self.parts = nn.ModuleDict({tag: module for tag, (_, module) in parts.items()})
        features = torch.cat([index for index, _ in parts.values()])
        first = next(iter(self.parts.values()))
        # output feature i of the linear is feature order[i] of the parts' outputs concatenated
        self.register_buffer("order", features.argsort().to(first.frozen_weight.device), persistent=False)
        self.in_features, self.out_features = first.in_features, len(features)
        self.base_dtype = base_dtype

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([part(x) for part in self.parts.values()], dim=-1).index_select(-1, self.order)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (trained blocks folded in)."""
        merged = [part.merged_weight() for part in self.parts.values()]
        weight = torch.cat([w for w, _ in merged], dim=1)[:, self.order]
        has_bias = merged[0][1] is not None
        device = next(iter(self.parts.values())).frozen_weight.device
        linear = nn.utils.skip_init(
            self.linear_class, self.in_features, self.out_features, bias=has_bias, device=device, dtype=self.base_dtype
        )
        linear.weight.copy_(weight.T)
        if has_bias:
            linear.bias.copy_(torch.cat([b for _, b in merged])[self.order])
        return linear


def _read_heads(projection: Projection, num_blocks: int, label: str) -> tuple[Tensor, Tensor | None, torch.dtype]:
    """(blocks, d_in[+1], w) float64 with the bias as last row, the raw bias, and the projection's dtype."""
    weight, bias = projection.read()
    if weight.shape[1] % num_blocks:
        raise CloverError(
            f"{label}: {weight.shape[1]} output features do not split into {num_blocks} blocks of the head width; "
            "leave this layer out of --targets (e.g. --targets q,v)"
        )
    heads = split_heads(weight.double(), None if bias is None else bias.double(), num_blocks)
    if heads.shape[1] < heads.shape[2]:
        raise CloverError(f"{label}: blocks of width {heads.shape[2]} exceed the {heads.shape[1]} input rows")
    return heads, bias, weight.dtype


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


class _Injector:
    """Builds the wrapped modules of one model, from fresh factorizations or from stored transforms."""

    def __init__(self, model: nn.Module, config: CloverConfig, transforms: dict[str, Tensor] | None):
        self.model, self.config, self.transforms = model, config, transforms
        self.names = _module_names(model)
        self.used: set[str] = set()
        self.replaced: list[tuple[str, nn.Module]] = []  # (path, original module), to undo a failed injection

    def path(self, projection: Projection) -> str:
        if isinstance(projection, LinearProjection):
            return self.names[id(projection.linear)]
        if isinstance(projection, Conv1DSlice):
            return f"{self.names[id(projection.conv)]}.parts.{projection.start}_{projection.stop}"
        owner, _ = projection.owner()
        if isinstance(owner, nn.Linear):  # a part of a linear: fused projections, or some dims of each head
            return f"{self.names[id(owner)]}.parts.{projection.tag}"
        raise CloverError(f"clover cannot wrap a {type(projection).__name__}; add a branch in finetune._Injector")

    def stored(self, path: str, shape: tuple[int, ...]) -> Tensor | None:
        """The saved transform for ``path`` (None when building fresh)."""
        if self.transforms is None:
            return None
        if path not in self.transforms:
            raise CloverError(f"the adapter has no transform for {path}: it was saved from another model or targets")
        stored = self.transforms[path]
        if tuple(stored.shape) != shape:
            raise CloverError(f"{path}: saved transform has shape {tuple(stored.shape)}, this model needs {shape}")
        self.used.add(path)
        return stored.double()

    def module(self, weight: Tensor, bias: Tensor | None, base_dtype: torch.dtype, **kwargs: Any) -> CloverLinear:
        config = self.config
        return CloverLinear(
            weight,
            bias,
            dropout=config.dropout,
            dropout_placement=config.dropout_placement,
            trainable_dtype=config.trainable_dtype,
            frozen_dtype=config.frozen_dtype or base_dtype,
            base_dtype=base_dtype,
            **kwargs,
        )

    def qr_form(self, projection: Projection, num_blocks: int) -> CloverLinear:
        """Per block ``W_blk = F R``: F = W_blk R⁺ frozen, R trainable."""
        path = self.path(projection)
        heads, bias, dtype = _read_heads(projection, num_blocks, path)
        width = heads.shape[-1]
        transform = self.stored(path, (num_blocks, width, width))
        if transform is None:
            transform = qr_transform(heads)
        factor = heads @ transform
        initial = factor.mT @ heads  # = R (F orthonormal, F R = W_blk); the same formula on reload
        weight, new_bias = merge_heads(factor, bias is not None)
        return self.module(weight, new_bias, dtype, blocks=initial, transform=transform)

    def pair_form(
        self, shared: Projection, partner: Projection, *, num_heads: int, num_kv_heads: int, partner_is_output: bool
    ) -> tuple[CloverLinear, CloverLinear]:
        """SVD form of a Q-K (partner = Q) or V-O (partner = O) pair; S trainable on the shared K/V side."""
        shared_path, partner_path = self.path(shared), self.path(partner)
        a, a_bias, a_dtype = _read_heads(shared, num_kv_heads, shared_path)  # (G, m, w)
        width, group = a.shape[-1], num_heads // num_kv_heads
        if partner_is_output:
            w_o, b_o = partner.read()
            if w_o.shape[0] != num_heads * width:
                raise CloverError(f"{partner_path}: {w_o.shape[0]} input features, expected {num_heads}×{width}")
            partner_dtype = w_o.dtype
            b_heads = split_output_heads(w_o.double(), num_heads)  # (H, d_out, w): W_o^hᵀ
        else:
            b_heads, b_bias, partner_dtype = _read_heads(partner, num_heads, partner_path)
            if b_heads.shape[-1] != width:
                raise CloverError(f"{partner_path}: head width {b_heads.shape[-1]}, {shared_path} has {width}")
        stacked = b_heads.reshape(num_kv_heads, group * b_heads.shape[1], width)
        x_a = self.stored(shared_path, (num_kv_heads, width, width))
        x_partner = self.stored(partner_path, (num_heads, width, width))
        if x_a is None:
            x_a, x_b = pair_transforms(a, stacked)
            x_partner = x_b.repeat_interleave(group, dim=0)
        else:
            x_b = x_partner[::group]
        f_a, f_b = a @ x_a, stacked @ x_b
        initial = (f_a.mT @ a) @ (stacked.mT @ f_b)  # diag(σ) up to rounding: F_a S F_bᵀ = A Bᵀ
        weight, bias = merge_heads(f_a, a_bias is not None)
        shared_module = self.module(weight, bias, a_dtype, blocks=initial, transform=x_a)
        if partner_is_output:
            rows = merge_output_heads(split_output_heads(w_o.double(), num_heads) @ x_partner)  # Xᵀ W_o^h per head
            partner_module = self.module(rows, b_o, partner_dtype, transform=x_partner, transform_side="input")
        else:
            weight, bias = merge_heads(b_heads @ x_partner, b_bias is not None)
            partner_module = self.module(weight, bias, partner_dtype, transform=x_partner)
        return shared_module, partner_module

    def site_modules(self, site: AttentionSite, targets: tuple[str, ...]) -> list[tuple[Projection, CloverLinear]]:
        heads = {"num_heads": site.num_heads, "num_kv_heads": site.num_kv_heads}
        wrapped: list[tuple[Projection, CloverLinear]] = []
        if "qk" in targets:  # partial RoPE: the pass-through dims; the rotary dims stay frozen as they are
            q_part, k_part, _ = site.qk_pair()
            k, q = self.pair_form(k_part, q_part, partner_is_output=False, **heads)
            wrapped += [(k_part, k), (q_part, q)]
        for label, count in (("q", site.num_heads), ("k", site.num_kv_heads), ("v", site.num_kv_heads)):
            if label in targets:
                projection = getattr(site, label)
                wrapped.append((projection, self.qr_form(projection, count)))
        if "vo" in targets:
            v, o = self.pair_form(site.v, site.o, partner_is_output=True, **heads)
            wrapped += [(site.v, v), (site.o, o)]
        return wrapped

    @torch.no_grad()
    def install(self, wrapped: list[tuple[Projection, CloverLinear]]) -> None:
        """Swap the new modules into the model; slices of one Conv1D become one CloverConv1D, parts of one
        Linear one CloverLinearParts (its untouched features a frozen part)."""
        convs: dict[int, tuple[nn.Module, dict[tuple[int, int], CloverLinear]]] = {}
        linears: dict[int, tuple[nn.Linear, dict[str, tuple[Tensor, CloverLinear]]]] = {}
        for projection, module in wrapped:
            if isinstance(projection, Conv1DSlice):
                convs.setdefault(id(projection.conv), (projection.conv, {}))[1][(projection.start, projection.stop)] = (
                    module
                )
            elif isinstance(projection, LinearProjection):
                module.linear_class = type(projection.linear)
                self.replace(self.path(projection), module.train(projection.linear.training))
            else:
                owner, features = projection.owner()
                linears.setdefault(id(owner), (owner, {}))[1][projection.tag] = (features, module)
        for linear, parts in linears.values():
            taken = torch.zeros(linear.out_features, dtype=torch.bool)
            for features, _ in parts.values():
                taken[features] = True
            if not taken.all():
                rest = (~taken).nonzero().squeeze(-1)
                bias = None if linear.bias is None else linear.bias.detach()[rest]
                parts["rest"] = (rest, self.module(linear.weight.detach()[rest].T, bias, linear.weight.dtype))
            parted = CloverLinearParts(parts, linear.weight.dtype, type(linear))
            self.replace(self.names[id(linear)], parted.train(linear.training))
        for conv, parts in convs.values():
            start = 0
            for span in [*sorted(parts), (conv.nf, conv.nf)]:  # untouched column ranges stay frozen parts
                if span[0] > start:
                    cols = slice(start, span[0])
                    parts[(start, span[0])] = self.module(
                        conv.weight[:, cols].detach(), conv.bias[cols].detach(), conv.weight.dtype
                    )
                start = span[1]
            self.replace(self.names[id(conv)], CloverConv1D(parts, conv.weight.dtype).train(conv.training))

    def replace(self, path: str, module: nn.Module) -> None:
        self.replaced.append((path, self.model.get_submodule(path)))
        self.model.set_submodule(path, module)

    def undo(self) -> None:
        """Put the original modules back (after an error half-way through)."""
        for path, original in reversed(self.replaced):
            self.model.set_submodule(path, original)
        self.replaced.clear()


def _up_projections(model: nn.Module) -> list[nn.Linear]:
    """The MLPs' ``up_proj`` linears (LLaMA-family gated MLPs), in module order."""
    return [m.up_proj for m in model.modules() if isinstance(getattr(m, "up_proj", None), nn.Linear)]


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def resolve_targets(model: nn.Module, config: CloverConfig) -> tuple[str, ...]:
    """The targets that CloverModel trains on ``model``: the config's (checked) or the authors' recipe."""
    sites = attention_sites(model, allow_pruned=True)
    qk_blocked = any(site.qk_blocked for site in sites)
    has_up = bool(_up_projections(model))
    if config.targets is None:
        if not qk_blocked:
            return ("qk", "vo")
        gqa = any(site.num_kv_heads < site.num_heads for site in sites)
        return ("q", "v" if gqa else "vo") + (("up",) if has_up else ())
    if "qk" in config.targets and qk_blocked:
        blocker = next(site.qk_blocker for site in sites if site.qk_blocker)
        raise CloverError(
            f"target 'qk' needs Q and K to act through one fixed product, but in {_model_type(model)} {blocker}, "
            "which blocks the Q-K merge; train them separately with targets 'q' and/or 'k' "
            "(per-head QR, exact whatever sits between them)"
        )
    if "up" in config.targets and not has_up:
        raise CloverError(
            f"target 'up' trains the blocks of a gated MLP's up_proj (LLaMA family), and {_model_type(model)} "
            "has no up_proj; remove 'up' from targets"
        )
    return config.targets


def trainable_count(model: nn.Module, config: CloverConfig | None = None) -> int:
    """Trainable parameters ``get_clover_model(model, config)`` would create, from shapes alone (no factorization).

    For a pruned layer whose heads keep different dims (which CLOVER refuses) it is the count CLOVER would have
    with one square matrix per head block: the budget PEFT baselines are matched to.
    """
    config = config or CloverConfig()
    targets = resolve_targets(model, config)
    sites = attention_sites(model, allow_pruned=True)
    total = 0
    for site in sites:
        counts = {"q": site.num_heads, "k": site.num_kv_heads, "v": site.num_kv_heads}
        for target in targets:
            side = {"qk": "k", "vo": "v"}.get(target, target)
            if side not in counts:
                continue
            rotary = site.rotary_dims if target == "qk" else 0  # 'qk' trains the pass-through dims only
            if site.block_widths is not None:
                total += sum((w - rotary) ** 2 for w in site.block_widths[side])
            else:
                width = getattr(site, side).read()[0].shape[1] // counts[side]
                total += counts[side] * (width - rotary) ** 2
    if "up" in targets:
        head_dim = sites[0].head_dim
        if head_dim % 2:
            raise CloverError(f"target 'up' cuts up_proj into blocks of d_h/2, and d_h = {head_dim} is odd")
        total += sum(up.out_features * (head_dim // 2) for up in _up_projections(model))
    return total


class CloverModel(nn.Module):
    """A transformers model with CLOVER layers: only the small matrices train; PEFT-shaped API."""

    def __init__(
        self, model: nn.Module, config: CloverConfig | None = None, *, _transforms: dict[str, Tensor] | None = None
    ):
        super().__init__()
        if any(isinstance(m, CloverLinear | CloverConv1D) for m in model.modules()):
            raise CloverError("the model already has CLOVER layers; call merge_and_unload() before wrapping it again")
        if any(parameter.is_meta for parameter in model.parameters()):
            raise CloverError("the model's weights are on the meta device (no values); load the weights first")
        config = CloverConfig() if config is None else config
        if not isinstance(config, CloverConfig):
            raise CloverError(f"config must be a clover.finetune.CloverConfig, not {type(config).__name__}")
        targets = resolve_targets(model, config)
        self.clover_config = replace(config, targets=targets)
        refuse_non_finite_weights(model)  # one line here, not an SVD failing to converge below
        sites = attention_sites(model, allow_pruned=True, uniform=True)
        head_dim = sites[0].head_dim
        if "up" in targets and head_dim % 2:
            raise CloverError(f"target 'up' cuts up_proj into blocks of d_h/2, and d_h = {head_dim} is odd")
        self._base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        injector = _Injector(model, self.clover_config, _transforms)
        try:
            with torch.no_grad():
                for site in sites:
                    injector.install(injector.site_modules(site, targets))
                for up in _up_projections(model) if "up" in targets else []:
                    projection = LinearProjection(up)
                    blocks = up.out_features // (head_dim // 2)
                    injector.install([(projection, injector.qr_form(projection, blocks))])
            if _transforms is not None and (unused := sorted(set(_transforms) - injector.used)):
                raise CloverError(f"the adapter has transforms for modules this model does not wrap: {unused[:3]}")
        except BaseException:  # leave the caller's model as it was
            injector.undo()
            for name, param in model.named_parameters():
                param.requires_grad_(self._base_requires_grad[name])
            raise
        self.model = model
        # safetensors refuses tensors that share memory, so Trainer's checkpoints of a tied model would fail:
        # state_dict() drops the second name of a tied weight and load_state_dict() restores it.
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self.register_load_state_dict_pre_hook(_restore_tied_aliases)
        # Trainer keeps only the batch keys named in inspect.signature(model.forward): show it the base model's.
        self.forward = functools.update_wrapper(functools.partial(type(self).forward, self), model.forward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward (returns its output, with ``loss`` when labels are given)."""
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``."""
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Forward missing attributes (config, device, generation_config...) to the wrapped model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not set yet: no recursion
                raise
            return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with CLOVER layers in it)."""
        return self.model

    def clover_modules(self) -> dict[str, CloverLinear]:
        """Every CLOVER layer by module path in the wrapped model (trained ones and frozen partners)."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, CloverLinear)}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counted as PEFT does."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the counts in PEFT's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold the trained matrices into plain Linear/Conv1D layers; returns the transformers model.

        Same class and parameter count as the original, same function as this adapter model (Q/K or V/O
        weights may differ from the original by the pair's internal rotation). This CloverModel is spent.
        """
        model = self.model
        for name, module in list(model.named_modules()):
            if isinstance(module, CloverConv1D):
                model.set_submodule(name, module.to_conv1d())
            elif isinstance(module, CloverLinearParts):
                model.set_submodule(name, module.to_linear())
        for name, module in list(model.named_modules()):
            if isinstance(module, CloverLinear):
                model.set_submodule(name, module.to_linear())
        for name, param in model.named_parameters():
            param.requires_grad_(self._base_requires_grad.get(name, True))
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *, is_main_process: bool = True) -> None:
        """Write the adapter (small matrices, safetensors, plus a JSON config) atomically; other files stay."""
        if not is_main_process:
            return
        tensors: dict[str, Tensor] = {}
        for name, module in self.clover_modules().items():
            if module.transform is not None:
                tensors[f"{name}.transform"] = module.transform.contiguous()
            if module.blocks is not None:
                tensors[f"{name}.blocks"] = module.blocks.detach().cpu().contiguous()
        meta = {
            "clover_version": __version__,
            "config": self.clover_config.to_dict(),
            "base_model": {
                "model_type": _model_type(self.model),
                "class": type(self.model).__name__,
                "name_or_path": getattr(getattr(self.model, "config", None), "name_or_path", None),
            },
        }
        final = Path(save_directory)
        with atomic_directory(final, overwrite=True, carries_existing=True) as staging:
            if final.is_dir():  # keep whatever else lives there (tokenizer, notes): hard links, no copying
                for entry in final.iterdir():
                    if entry.name not in (CONFIG_NAME, WEIGHTS_NAME):
                        _link_or_copy(entry, staging / entry.name)
            save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt", "clover_version": __version__})
            (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | os.PathLike, *, is_trainable: bool = False
    ) -> CloverModel:
        """Rebuild a saved adapter on a fresh base model; ``is_trainable=False`` (as in PEFT) freezes it."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise CloverError(f"{directory} has no CLOVER adapter ({CONFIG_NAME} and {WEIGHTS_NAME})")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        expected, actual = meta["base_model"]["model_type"], _model_type(model)
        if expected != actual:
            raise CloverError(f"this adapter was trained on a {expected!r} model, not {actual!r}")
        with safe_open(directory / WEIGHTS_NAME, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        transforms = {k.removesuffix(".transform"): v for k, v in tensors.items() if k.endswith(".transform")}
        blocks = {k.removesuffix(".blocks"): v for k, v in tensors.items() if k.endswith(".blocks")}
        clover = cls(model, CloverConfig.from_dict(meta["config"]), _transforms=transforms)
        trained = {name: m for name, m in clover.clover_modules().items() if m.blocks is not None}
        if set(trained) != set(blocks):
            missing, extra = sorted(set(trained) - set(blocks)), sorted(set(blocks) - set(trained))
            raise CloverError(f"adapter blocks do not match this model: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, module in trained.items():
                if blocks[name].shape != module.blocks.shape:
                    raise CloverError(
                        f"{name}: saved blocks {tuple(blocks[name].shape)}, model has {tuple(module.blocks.shape)}"
                    )
                module.blocks.copy_(blocks[name])
                module.blocks.requires_grad_(is_trainable)
        return clover


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """Second and later names of a shared parameter (tied embeddings) -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _drop_tied_aliases(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
    for alias in _tied_aliases(module):
        state_dict.pop(prefix + alias, None)


def _restore_tied_aliases(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    for alias, name in _tied_aliases(module).items():
        if prefix + alias not in state_dict and prefix + name in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + name]


def _link_or_copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(source, target)


def _link_or_copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def get_clover_model(model: nn.Module, config: CloverConfig | None = None) -> CloverModel:
    """Wrap ``model`` in place with CLOVER layers (like ``peft.get_peft_model``)."""
    return CloverModel(model, config)
