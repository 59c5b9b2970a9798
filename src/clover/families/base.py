"""The contract between a model family and the algorithms.

A family file (one per family, in this package) states every fact of its family: where each attention's Q, K,
V and O live (``Projection`` read/write in math layout), heads and KV groups, the softmax scale, the positional
scheme between Q and K, QK-norm, where K and V come from, the submodules a pruned attention keeps, where its
output projection lives, and how its pruned attention computes (a ``PrunedAttention`` subclass in the same file).
The algorithms (decompose, prune, fine-tune) read these facts and never name a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

POSITIONAL = ("none", "bias", "rope", "partial-rope")  # what sits between Q and K (additive biases keep Q-K exact)


class Projection:
    """One projection, read and written in math layout: weight (d_in, d_out), ``y = x @ W + b``."""

    def read(self) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def write(self, weight: Tensor, bias: Tensor | None) -> None:
        raise NotImplementedError

    @property
    def input_module(self) -> nn.Module:
        """The module whose forward input is this projection's input (for calibration hooks)."""
        raise NotImplementedError


class LinearProjection(Projection):
    """An ``nn.Linear`` (stores weight as (d_out, d_in))."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear

    @property
    def input_module(self) -> nn.Module:
        return self.linear

    def read(self) -> tuple[Tensor, Tensor | None]:
        bias = self.linear.bias
        return self.linear.weight.detach().T, None if bias is None else bias.detach()

    @torch.no_grad()
    def write(self, weight: Tensor, bias: Tensor | None) -> None:
        self.linear.weight.copy_(weight.T)
        if bias is not None:
            self.linear.bias.copy_(bias)


class Conv1DSlice(Projection):
    """Output columns ``start:stop`` of a GPT-2 style Conv1D (stores weight as (d_in, d_out))."""

    def __init__(self, conv: nn.Module, start: int, stop: int):
        self.conv, self.start, self.stop = conv, start, stop

    @property
    def input_module(self) -> nn.Module:
        return self.conv

    def read(self) -> tuple[Tensor, Tensor | None]:
        cols = slice(self.start, self.stop)
        return self.conv.weight.detach()[:, cols], self.conv.bias.detach()[cols]

    @torch.no_grad()
    def write(self, weight: Tensor, bias: Tensor | None) -> None:
        self.conv.weight[:, self.start : self.stop] = weight
        if bias is not None:
            self.conv.bias[self.start : self.stop] = bias


class LinearSlice(Projection):
    """Output rows ``start:stop`` of an ``nn.Linear`` that fuses several projections in blocks (Phi-3's qkv_proj)."""

    def __init__(self, linear: nn.Linear, start: int, stop: int):
        self.linear, self.start, self.stop = linear, start, stop

    @property
    def input_module(self) -> nn.Module:
        return self.linear

    def read(self) -> tuple[Tensor, Tensor | None]:
        rows = slice(self.start, self.stop)
        bias = self.linear.bias
        return self.linear.weight.detach()[rows].T, None if bias is None else bias.detach()[rows]

    @torch.no_grad()
    def write(self, weight: Tensor, bias: Tensor | None) -> None:
        self.linear.weight[self.start : self.stop] = weight.T
        if bias is not None:
            self.linear.bias[self.start : self.stop] = bias


@dataclass
class AttentionSite:
    """One attention block of a model, described for the algorithms."""

    name: str  # module path, e.g. "model.layers.3.self_attn"
    stack: str  # "decoder", "encoder" or "cross": groups sites for reports and plots
    layer_index: int
    module: nn.Module
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    num_kv_heads: int
    head_dim: int
    family: Family | None = None  # the family that found it (None for sites read back from a pruned checkpoint)
    qk_blocker: str | None = None  # why Q and K do not meet through one fixed matrix; None: Q-K is exact
    scaling: float = 1.0  # the original softmax scale; pruning never recomputes it from the kept dims
    is_causal: bool = False
    dropout: float = 0.0  # attention-probability dropout (training only); pruned modules keep it
    output_dropout: float = 0.0  # dropout the attention module itself applies to its output (GPT-2's resid_pdrop)
    # pruned sites: the width of every block, {"q": per query head, "k": per KV group, "v": per KV group}
    block_widths: dict[str, list[int]] | None = None
    extra: dict = field(default_factory=dict)  # family-specific facts its pruned attention needs (into the spec)

    @property
    def rotary(self) -> bool:
        """No exact Q-K merge: the pair is only QR'd separately (fine-tuning) and never pruned."""
        return self.qk_blocker is not None


class Family:
    """The facts of one model family. Subclass it in one file per family; near relatives subclass each other."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    examples: ClassVar[str] = ""
    positional: ClassVar[str] = "none"  # one of POSITIONAL: what acts between Q and K
    qk_norm: ClassVar[bool] = False  # a norm on q and k (per head or over all heads) between the projections
    pruned_attention: ClassVar[type | None] = None  # the PrunedAttention subclass that computes a pruned site
    output: ClassVar[str] = "o_proj"  # the output projection, relative to the site module
    replace: ClassVar[str] = ""  # the submodule a pruned attention replaces, relative to the site ("" = itself)
    kept: ClassVar[tuple[str, ...]] = ()  # submodules a pruned attention takes over unchanged (QK-norms)
    legacy_names: ClassVar[tuple[str, ...]] = ()  # format-1 checkpoints named the family, not the class
    caches: ClassVar[str] = "K and V"  # what a pruned model's KV cache shrinks on, for reports and README

    @property
    def qk_blocker(self) -> str | None:
        """Why Q-K is not exact in this family, as a phrase for messages; None where it is."""
        if self.qk_norm:
            return "QK-norm (q_norm / k_norm) sits between Q and K"
        if self.positional == "rope":
            return "RoPE sits between Q and K"
        return None

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        """Every attention site of ``model``, in module order (pruned modules already installed are skipped)."""
        raise NotImplementedError

    def site(self, **facts) -> AttentionSite:
        """An AttentionSite stamped with this family and its Q-K exactness."""
        return AttentionSite(family=self, qk_blocker=self.qk_blocker, **facts)


def is_pruned_attention(module: nn.Module) -> bool:
    """A pruned attention installed by clover (``modeling_clover``, or its trust_remote_code copy)."""
    return hasattr(module, "layout") and isinstance(getattr(module, "spec", None), dict)
