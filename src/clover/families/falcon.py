"""Falcon: Q, K and V fused in one ``query_key_value`` Linear, output ``dense``, biases where ``bias=True``.

Three layouts of the fused rows (head width d = hidden / heads): ``multi_query`` (falcon-7b) is
[H query heads | 1 K | 1 V]; ``new_decoder_architecture`` (40b/180b) is, per KV group, [its queries | k | v];
otherwise each head is [q | k | v]. RoPE by default: V-O exact, Q-K not, the V cache shrinks. With ``alibi=True``
there is no RoPE and the ALiBi bias is additive and content-independent, so Q-K is exact too and both caches
shrink. transformers broadcasts the new architecture's K/V to every query head before caching them; the pruned
attention caches each KV group once, so there the cache also shrinks by heads / KV groups.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import AttentionSite, Family, LinearProjection, Projection
from .t5 import CloverBiasAttention


class LinearRows(Projection):
    """Output rows ``index`` (in that order) of an ``nn.Linear`` that fuses several projections, e.g. strided."""

    def __init__(self, linear: nn.Linear, index: list[int] | Tensor):
        self.linear = linear
        self.index = torch.as_tensor(index, dtype=torch.long)

    @property
    def input_module(self) -> nn.Module:
        return self.linear

    def owner(self) -> tuple[nn.Module, Tensor]:
        return self.linear, self.index

    @property
    def tag(self) -> str:
        return f"rows{int(self.index[0])}_{len(self.index)}"  # parts of one linear are disjoint: first row unique

    def read(self) -> tuple[Tensor, Tensor | None]:
        rows = self.index.to(self.linear.weight.device)
        bias = self.linear.bias
        return self.linear.weight.detach()[rows].T, None if bias is None else bias.detach()[rows]

    @torch.no_grad()
    def write(self, weight: Tensor, bias: Tensor | None) -> None:
        rows = self.index.to(self.linear.weight.device)
        self.linear.weight.index_copy_(0, rows, weight.T.to(self.linear.weight.dtype))
        if bias is not None:
            self.linear.bias.index_copy_(0, rows, bias.to(self.linear.bias.dtype))


def fused_rows(num_heads: int, num_kv_heads: int, head_dim: int, layout: str) -> dict[str, list[int]]:
    """The rows of ``query_key_value`` that hold Q (by query head), K and V (by KV group), in head order."""
    group = num_heads // num_kv_heads

    def block(b: int) -> list[int]:  # the rows of the b-th head-wide block
        return list(range(b * head_dim, (b + 1) * head_dim))

    if layout == "multi_query":  # [q_0 .. q_H-1 | k | v]
        return {
            "q": [row for h in range(num_heads) for row in block(h)],
            "k": block(num_heads),
            "v": block(num_heads + 1),
        }
    if layout == "grouped":  # per KV group j: [q_jg .. q_jg+g-1 | k_j | v_j]
        per_group = group + 2  # blocks per KV group
        q = [row for j in range(num_kv_heads) for i in range(group) for row in block(j * per_group + i)]
        k = [row for j in range(num_kv_heads) for row in block(j * per_group + group)]
        v = [row for j in range(num_kv_heads) for row in block(j * per_group + group + 1)]
        return {"q": q, "k": k, "v": v}
    # per head h: [q_h | k_h | v_h]
    return {label: [row for h in range(num_heads) for row in block(3 * h + i)] for i, label in enumerate("qkv")}


class CloverFalconAttention(CloverBiasAttention):
    """FalconAttention with pruned dims: V-O under RoPE (Q and K rotate, so they keep every dim), both under ALiBi.

    Reproduces transformers' SDPA path, Falcon's default: with ALiBi the model has already folded alibi / sqrt(d)
    into the (B, H, L, S) float mask, and the scores are scaled by 1 / sqrt(d) of the original head width.
    transformers' own eager path (``output_attentions=True``) disagrees with its SDPA path (under ALiBi it adds
    the bias twice), so compare a pruned Falcon against the original's SDPA outputs, not its eager ones.
    """

    def forward(
        self,
        hidden_states,
        alibi=None,
        attention_mask=None,
        position_ids=None,
        layer_past=None,
        use_cache=False,
        output_attentions=False,
        position_embeddings=None,
        **kwargs,
    ):
        cache = layer_past if layer_past is not None else kwargs.pop("cache", kwargs.pop("past_key_values", None))
        batch, length, _ = hidden_states.shape
        query, key = self.q_proj(hidden_states), self.k_proj(hidden_states)
        if not self.spec["alibi"]:
            from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

            q = query.view(batch, length, -1, self.head_dim).transpose(1, 2)
            k = key.view(batch, length, -1, self.head_dim).transpose(1, 2)
            cos, sin = position_embeddings
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            query = q.transpose(1, 2).reshape(batch, length, -1)
            key = k.transpose(1, 2).reshape(batch, length, -1)
        key = self.layout.cache_entry(key, "k")
        value = self.layout.cache_entry(self.v_proj(hidden_states), "v")
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        out, weights = self._attend_with_bias(query, key, value, attention_mask, bool(output_attentions))
        return self.dense(out), weights


class Falcon(Family):
    name = "falcon"
    model_types = ("falcon",)
    examples = "Falcon"
    positional = "rope"  # the default; an ALiBi model's sites say "bias" (and Q-K exact) for themselves
    output = "dense"
    pruned_attention = CloverFalconAttention
    caches = "V (RoPE); K and V (ALiBi); new_decoder_architecture: K and V also by heads / KV groups (cached per group)"

    def site(self, *, alibi: bool = False, **facts) -> AttentionSite:
        """A site of a RoPE model (Q-K blocked) or of an ALiBi model (Q-K exact: the bias is additive)."""
        positional = "bias" if alibi else self.positional
        facts["extra"] = {**facts.get("extra", {}), "alibi": alibi, "positional": positional}
        return AttentionSite(family=self, qk_blocker=None if alibi else self.qk_blocker, **facts)

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        config = model.config
        sites = []
        for name, module in self.attention_modules(model, "query_key_value"):
            heads, head_dim = module.num_heads, module.head_dim
            if config.new_decoder_architecture:
                layout, kv_heads = "grouped", config.num_kv_heads
            elif config.multi_query:
                layout, kv_heads = "multi_query", 1
            else:
                layout, kv_heads = "per_head", heads
            rows = fused_rows(heads, kv_heads, head_dim, layout)
            fused = module.query_key_value
            sites.append(
                self.site(
                    alibi=bool(config.alibi),
                    name=name,
                    stack="decoder",
                    layer_index=module.layer_idx,
                    module=module,
                    q=LinearRows(fused, rows["q"]),
                    k=LinearRows(fused, rows["k"]),
                    v=LinearRows(fused, rows["v"]),
                    o=LinearProjection(module.dense),
                    scaling=module.inv_norm_factor,
                    # transformers' SDPA path drops attention probabilities only under ALiBi
                    dropout=float(module.attention_dropout.p) if config.alibi else 0.0,
                    is_causal=True,
                    num_heads=heads,
                    num_kv_heads=kv_heads,
                    original_cached_heads=heads if config.new_decoder_architecture else None,
                    head_dim=head_dim,
                )
            )
        return sites
