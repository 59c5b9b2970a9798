"""The contract between a model family and the algorithms.

A family file (one per family, in this package) states every fact of its family: where each attention's Q, K,
V and O live (``Projection`` read/write in math layout), heads and KV groups, the softmax scale, the positional
scheme between Q and K, QK-norm, where K and V come from, the submodules a pruned attention keeps, where its
output projection lives, and how its pruned attention computes (a ``PrunedAttention`` subclass in the same file).
The algorithms (decompose, prune, fine-tune) read these facts and never name a family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

# what sits between Q and K (additive biases keep Q-K exact); "partial-rope": its sites give ``rotary_dims``
POSITIONAL = ("none", "bias", "rope", "partial-rope")


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

    def owner(self) -> tuple[nn.Module, Tensor]:
        """The module that computes this projection, and which of its output features it is, in order."""
        raise NotImplementedError

    @property
    def tag(self) -> str:
        """A name for this part of its owner, unique among the parts a family defines (fine-tuning module names)."""
        raise NotImplementedError


class LinearProjection(Projection):
    """An ``nn.Linear`` (stores weight as (d_out, d_in))."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear

    @property
    def input_module(self) -> nn.Module:
        return self.linear

    def owner(self) -> tuple[nn.Module, Tensor]:
        return self.linear, torch.arange(self.linear.out_features)

    @property
    def tag(self) -> str:
        return "all"

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

    def owner(self) -> tuple[nn.Module, Tensor]:
        return self.conv, torch.arange(self.start, self.stop)

    @property
    def tag(self) -> str:
        return f"{self.start}_{self.stop}"

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

    def owner(self) -> tuple[nn.Module, Tensor]:
        return self.linear, torch.arange(self.start, self.stop)

    @property
    def tag(self) -> str:
        return f"{self.start}_{self.stop}"

    def read(self) -> tuple[Tensor, Tensor | None]:
        rows = slice(self.start, self.stop)
        bias = self.linear.bias
        return self.linear.weight.detach()[rows].T, None if bias is None else bias.detach()[rows]

    @torch.no_grad()
    def write(self, weight: Tensor, bias: Tensor | None) -> None:
        self.linear.weight[self.start : self.stop] = weight.T
        if bias is not None:
            self.linear.bias[self.start : self.stop] = bias


class HeadColumns(Projection):
    """Columns ``start:stop`` of every head of another projection whose heads are ``head_dim`` wide.

    The pass-through dims of partial-RoPE heads (Q-K is exact there), or one part of a projection fused per head
    (GPT-NeoX's ``query_key_value``, [q_h | k_h | v_h] per head): read and written in math layout like any other.
    """

    def __init__(self, inner: Projection, num_heads: int, head_dim: int, start: int, stop: int):
        self.inner, self.num_heads, self.head_dim, self.start, self.stop = inner, num_heads, head_dim, start, stop

    @property
    def input_module(self) -> nn.Module:
        return self.inner.input_module

    def owner(self) -> tuple[nn.Module, Tensor]:
        module, features = self.inner.owner()
        return module, self._select(features)

    @property
    def tag(self) -> str:
        return f"{self.inner.tag}_h{self.num_heads}_{self.start}_{self.stop}"

    def _select(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim))[..., self.start : self.stop].flatten(-2)

    def read(self) -> tuple[Tensor, Tensor | None]:
        weight, bias = self.inner.read()
        return self._select(weight), None if bias is None else self._select(bias)

    @torch.no_grad()
    def write(self, weight: Tensor, bias: Tensor | None) -> None:
        # contiguous copies: the slices below must be views of them, and nothing may write through the inner's aliases
        full, full_bias = (
            None if t is None else t.clone(memory_format=torch.contiguous_format) for t in self.inner.read()
        )
        heads = (self.num_heads, self.stop - self.start)
        full.unflatten(-1, (self.num_heads, self.head_dim))[..., self.start : self.stop] = weight.unflatten(-1, heads)
        if bias is not None:
            full_bias.unflatten(-1, (self.num_heads, self.head_dim))[..., self.start : self.stop] = bias.unflatten(
                -1, heads
            )
        self.inner.write(full, full_bias)


@dataclass
class AttentionSite:
    """One attention block of a model, described for the algorithms."""

    name: str  # module path, e.g. "model.layers.3.self_attn"
    stack: str  # "decoder", "encoder", "cross" (or a family's own: "vision", "self"): groups sites, ``--stacks``
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
    # partial RoPE: the first rotary_dims dims of every Q and K head are rotated, the rest pass through unrotated
    rotary_dims: int = 0
    # Q's projection reads the very input K and V read (self-attention), so one input moment serves both sides;
    # False where Q has its own input (cross-attention; MLA, whose K/V read the compressed latent); None: False in a
    # "cross" stack (K and V read the encoder's states), else True
    q_reads_kv_input: bool | None = None
    # K and V of this site live in a KV cache (what pruning's KV report counts); None: every stack but "encoder"
    cached: bool | None = None
    # K/V heads the original model caches per token, where it caches more than num_kv_heads (Falcon's new
    # architecture broadcasts each KV group to every query head before caching); None: num_kv_heads
    original_cached_heads: int | None = None

    def __post_init__(self) -> None:
        if self.cached is None:
            self.cached = self.stack != "encoder"
        if self.q_reads_kv_input is None:
            self.q_reads_kv_input = self.stack != "cross"

    @property
    def qk_blocked(self) -> bool:
        """No exact Q-K merge (RoPE, QK-norm...: ``qk_blocker`` says which): Q and K are only QR'd separately
        (fine-tuning), their spectra reported one by one, and never pruned."""
        return self.qk_blocker is not None

    def qk_pair(self) -> tuple[Projection, Projection, int]:
        """Q, K restricted to the dims where they meet through one fixed product, and their width per head.

        The whole heads, or under partial RoPE the pass-through dims after the rotary ones (whose Q-K product
        is exact per head). A pruned site's heads are as wide as they were kept (one width per layer here).
        """
        width = self.block_widths["k"][0] if self.block_widths is not None else self.head_dim
        if not self.rotary_dims:
            return self.q, self.k, width
        if self.block_widths is not None and len(set(self.block_widths["k"])) > 1:
            raise ValueError(f"{self.name}: ragged Q-K dims have no per-head view of the pass-through dims")
        q = HeadColumns(self.q, self.num_heads, width, self.rotary_dims, width)
        k = HeadColumns(self.k, self.num_kv_heads, width, self.rotary_dims, width)
        return q, k, width - self.rotary_dims


@dataclass(frozen=True)
class LatentCut:
    """What cutting a cache shared by all heads (MLA's latent) did: the share of the calibration energy each
    layer's latent kept (1 - its relative squared error), and the dims the cache holds per token, before and
    after, summed over the layers."""

    kept_energy: dict[str, float]
    cache_dims_per_token_before: int
    cache_dims_per_token_after: int


class Family:
    """The facts of one model family. Subclass it in one file per family; near relatives subclass each other."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    # models without a config.model_type (diffusers): matched on the class names of the model's type and its bases
    model_classes: ClassVar[tuple[str, ...]] = ()
    examples: ClassVar[str] = ""
    positional: ClassVar[str] = "none"  # one of POSITIONAL: what acts between Q and K
    qk_norm: ClassVar[bool] = False  # a norm on q and k (per head or over all heads) between the projections
    # the PrunedAttention subclass that computes a pruned site, or any class whose ``pruned_from(original, spec)``
    # prunes the original module in place (diffusers: an attention processor)
    pruned_attention: ClassVar[type | None] = None
    output: ClassVar[str] = "o_proj"  # the output projection, relative to the site module
    replace: ClassVar[str] = ""  # the submodule a pruned attention replaces, relative to the site ("" = itself)
    kept: ClassVar[tuple[str, ...]] = ()  # submodules a pruned attention takes over unchanged (QK-norms)
    legacy_names: ClassVar[tuple[str, ...]] = ()  # format-1 checkpoints named the family, not the class
    per_head_cache: ClassVar[bool] = True  # the KV cache holds per-head K/V (MLA caches a shared latent instead)
    caches: ClassVar[str] = "K and V"  # what a pruned model's KV cache shrinks on, for reports and README
    # scales or gates multiply some attention outputs after O (DINOv2's layer scale, mllama's tanh gates):
    # the family's fold_output_scales moves them into O
    output_scales: ClassVar[bool] = False
    # a family whose checkpoints transformers does not read (diffusers): the kind the CLI gives them (LoadedModel.kind),
    # and the checkpoint hooks below, which the CLI calls instead of transformers' loading and writing; None: the
    # kind comes from transformers' task tables
    checkpoint_kind: ClassVar[str | None] = None

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

    def fold_output_scales(self, model: nn.Module) -> None:
        """Fold every scale or gate that multiplies an attention's output after O into O's weight and bias, and
        set it to 1: an exact rewrite, after which O's singular values measure what reaches the residual stream
        (pruning ranks and allocates by them). Families with ``output_scales`` override it; others have none."""

    def probe_inputs(self, model: nn.Module, input_ids: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """What a forward pass on ``input_ids`` (B, L) needs besides them to reach every attention site: random
        images and their masks for a model whose text reads images (it may also set the image token in
        ``input_ids``); nothing for the others. Used where no processor is at hand (the CLI's probe)."""
        return {}

    def cut_latent(self, model: nn.Module, rank: int, calibrate: Callable[[nn.Module], None]) -> LatentCut:
        """Shrink the cache a family shares between all heads (a latent, which per-head pruning leaves as it is)
        to ``rank`` dims, calibrated by ``calibrate(model)``. Families whose cache holds per-head keys and values
        have none: per-head pruning shrinks theirs."""
        from ..errors import CloverError

        raise CloverError(self.no_latent_message)

    @property
    def no_latent_message(self) -> str:
        """Why --latent-rank does not apply to this family, as the one-line refusal."""
        return (
            f"--latent-rank: {self.examples} has no latent shared by all heads to cut (where it caches keys and "
            "values, it caches them per head: --qk-ratio / --vo-ratio shrink them)"
        )

    def load_checkpoint(self, path: Path, dtype: torch.dtype | None) -> tuple[nn.Module, dict[str, list]]:
        """A ``checkpoint_kind`` family's model read from a checkpoint directory (plain, decomposed or pruned by
        clover), in eval mode, in ``dtype`` (None: the loading library's default), and its loading info
        (``missing_keys``..., as ``from_pretrained(..., output_loading_info=True)`` gives it). Exceptions of the
        loading library (a damaged file) are left for the caller to report."""
        raise NotImplementedError(f"{self.name}: transformers reads this family's checkpoints")

    def write_pruned_checkpoint(self, model: nn.Module, directory: Path) -> None:
        """Write a ``checkpoint_kind`` family's pruned model into an existing (staging) directory, so that
        ``load_checkpoint`` reads it back."""
        raise NotImplementedError(f"{self.name}: clover.io writes this family's pruned checkpoints")

    def probe_output(self, model: nn.Module) -> Tensor:
        """A ``checkpoint_kind`` family's output on one fixed, seeded input, on the CPU in float64: what the CLI
        compares before and after a rewrite, and a pruned model against its original (the transformers kinds are
        probed on token ids, images or audio by the CLI itself)."""
        raise NotImplementedError(f"{self.name}: the CLI probes this family on token ids")

    @staticmethod
    def attention_modules(model: nn.Module, *parts: str) -> Iterator[tuple[str, nn.Module]]:
        """(path, module) of every module of ``model`` that has all of ``parts`` (the attribute names that mark
        the family's attention), in module order, skipping pruned attentions clover already installed."""
        for name, module in model.named_modules():
            if not is_pruned_attention(module) and all(hasattr(module, part) for part in parts):
                yield name, module

    def separate_projections(self, module: nn.Module) -> dict[str, Projection]:
        """q, k, v and o of an attention whose projections are separate linears ``q_proj``, ``k_proj``,
        ``v_proj`` and the family's ``output``: the ``q=..., o=...`` facts of :meth:`site`."""
        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": self.output}
        return {label: LinearProjection(module.get_submodule(name)) for label, name in names.items()}

    def site(self, **facts) -> AttentionSite:
        """An AttentionSite stamped with this family and its Q-K exactness."""
        blocker = self.qk_blocker
        if blocker is None and facts.get("rotary_dims", 0) >= facts["head_dim"]:  # "partial" RoPE on every dim
            blocker = "RoPE sits between Q and K (rotary on every dim of each head)"
        return AttentionSite(family=self, qk_blocker=blocker, **facts)


def is_pruned_attention(module: nn.Module) -> bool:
    """A pruned attention installed by clover (``modeling_clover``, or its trust_remote_code copy)."""
    return hasattr(module, "layout") and isinstance(getattr(module, "spec", None), dict)
