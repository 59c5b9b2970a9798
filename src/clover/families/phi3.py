"""Phi-3 (and Phi-4-mini): Q, K and V fused in one ``qkv_proj`` in blocks [Q: H·d | K: G·d | V: G·d], no biases,
GQA, output ``o_proj``. Partial RoPE: the first int(d · partial_rotary_factor) dims of each Q and K head are
rotated and the rest pass through, so the pass-through dims of each head form an exact Q-K product (prunable, and
with them the K cache); V-O is exact. With partial_rotary_factor 1.0 (Phi-3-mini) every dim is rotary: V-O only.
"""

from __future__ import annotations

from torch import nn

from ..modeling_clover import PrunedAttention
from .base import AttentionSite, Family, LinearProjection, LinearSlice


class CloverPhi3Attention(PrunedAttention):
    """Partial-RoPE self-attention with pruned pass-through Q-K dims and V-O dims; the rotary dims are kept whole."""

    def rotate(self, q, k, position_embeddings):
        """(B, L, H, r) and (B, L, G, r) rotary dims -> rotated: the hook each partial-RoPE family overrides."""
        from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

        cos, sin = position_embeddings  # (B, L, r): transformers' rotary embedding covers the rotary dims only
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)

    def project_qk(self, hidden_states, position_embeddings):
        """Packed (B, L, width) queries and keys, the first ``rotary_dims`` dims of every head rotated."""
        q_rot, q_rest = self.layout.split_rotary(self.q_proj(hidden_states), "q")
        k_rot, k_rest = self.layout.split_rotary(self.k_proj(hidden_states), "k")
        q_rot, k_rot = self.rotate(q_rot, k_rot, position_embeddings)
        return self.layout.join_rotary(q_rot, q_rest, "q"), self.layout.join_rotary(k_rot, k_rest, "k")

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        q, k = self.project_qk(hidden_states, position_embeddings)
        k = self.layout.cache_entry(k, "k")
        v = self.layout.cache_entry(self.v_proj(hidden_states), "v")
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = self._attend(q, k, v, attention_mask)
        return self.out_projection(out), weights


class Phi3(Family):
    name = "phi3"
    model_types = ("phi3",)
    examples = "Phi-3, Phi-4-mini"
    positional = "partial-rope"
    pruned_attention = CloverPhi3Attention
    caches = "V and K's pass-through dims"

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        config = getattr(model.config, "text_config", None) or model.config
        factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        sites = []
        for name, module in self.attention_modules(model, "qkv_proj", "o_proj"):
            heads, groups, d = config.num_attention_heads, module.num_key_value_heads, module.head_dim
            q_end, k_end = heads * d, (heads + groups) * d
            sites.append(
                self.site(
                    name=name,
                    stack="decoder",
                    layer_index=module.layer_idx,
                    module=module,
                    q=LinearSlice(module.qkv_proj, 0, q_end),
                    k=LinearSlice(module.qkv_proj, q_end, k_end),
                    v=LinearSlice(module.qkv_proj, k_end, k_end + groups * d),
                    o=LinearProjection(module.o_proj),
                    scaling=module.scaling,
                    dropout=float(module.attention_dropout),
                    is_causal=True,
                    num_heads=heads,
                    num_kv_heads=groups,
                    head_dim=d,
                    rotary_dims=int(d * factor),  # as transformers' Phi-3 rotary embedding sizes it
                )
            )
        return sites
