"""GPT-NeoX (Pythia): Q, K and V fused in one ``query_key_value`` viewed per head as [q_h | k_h | v_h], output
``dense``, biases everywhere, MHA. Partial RoPE (``rotary_pct``, 0.25 by default): the first quarter of each head's
dims is rotated and the rest pass through, so the pass-through dims of each head form an exact Q-K product
(prunable, and with them the K cache); V-O is exact.
"""

from __future__ import annotations

from torch import nn

from .base import AttentionSite, Family, HeadColumns, LinearProjection
from .phi3 import CloverPhi3Attention


class CloverGPTNeoXAttention(CloverPhi3Attention):
    """GPT-NeoX's calling convention (the cache comes as ``layer_past``) and its own rotary function."""

    def rotate(self, q, k, position_embeddings):
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, layer_past=None, position_embeddings=None, **kwargs):
        return super().forward(hidden_states, position_embeddings, attention_mask, cache=layer_past, **kwargs)


class GPTNeoX(Family):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    examples = "GPT-NeoX, Pythia"
    positional = "partial-rope"
    output = "dense"
    pruned_attention = CloverGPTNeoXAttention
    caches = "V and K's pass-through dims"

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        config = model.config
        sites = []
        for name, module in self.attention_modules(model, "query_key_value"):
            heads, d = config.num_attention_heads, module.head_size
            fused = LinearProjection(module.query_key_value)  # per head [q_h | k_h | v_h], 3·d wide
            sites.append(
                self.site(
                    name=name,
                    stack="decoder",
                    layer_index=module.layer_idx,
                    module=module,
                    q=HeadColumns(fused, heads, 3 * d, 0, d),
                    k=HeadColumns(fused, heads, 3 * d, d, 2 * d),
                    v=HeadColumns(fused, heads, 3 * d, 2 * d, 3 * d),
                    o=LinearProjection(module.dense),
                    scaling=module.scaling,
                    dropout=float(module.attention_dropout),
                    is_causal=True,
                    num_heads=heads,
                    num_kv_heads=heads,
                    head_dim=d,
                    rotary_dims=module.rotary_ndims,
                )
            )
        return sites
