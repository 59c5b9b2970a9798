"""What an architecture adapter tells the algorithms: where each attention's Q, K, V, O live."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


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
    scaling: float = 1.0  # the original softmax scale; pruning never recomputes it from the kept dims
    is_causal: bool = False
    rotary: bool = False  # RoPE (or QK-norm) acts between Q and K: no exact Q-K merge
    dropout: float = 0.0  # attention-probability dropout (training only); pruned modules keep it
    output_dropout: float = 0.0  # dropout the attention module itself applies to its output (GPT-2's resid_pdrop)
    # pruned sites: the width of every block, {"q": per query head, "k": per KV group, "v": per KV group}
    block_widths: dict[str, list[int]] | None = None


def is_pruned_attention(module: nn.Module) -> bool:
    """A pruned attention installed by clover (``modeling_clover``, or its trust_remote_code copy)."""
    return hasattr(module, "layout") and isinstance(getattr(module, "spec", None), dict)


class ModelAdapter:
    """Base class: a family lists its ``model_types`` and finds its attention sites."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    examples: str = ""

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        raise NotImplementedError
