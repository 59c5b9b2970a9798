"""BERT encoders (all-MiniLM-L6-v2): ``attention.self.{query,key,value}`` and ``attention.output.dense``.

Learned absolute positions at the input: Q-K and V-O exact, no cache. The site is the BertAttention; its
pruned attention replaces ``.self`` and the output projection ``.output.dense`` (with its LayerNorm) stays where
it is, resized.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..modeling_clover import PrunedAttention
from .base import AttentionSite, Family, LinearProjection


class CloverBertSelfAttention(PrunedAttention):
    """BERT self-attention with pruned Q-K and V-O dims; its output projection lives in BertSelfOutput.dense."""

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        q = self.q_proj(hidden_states)
        k = self.layout.cache_entry(self.k_proj(hidden_states), "k")
        v = self.layout.cache_entry(self.v_proj(hidden_states), "v")
        return self._attend(q, k, v, attention_mask)


class Bert(Family):
    name = "bert"
    model_types = ("bert",)
    examples = "BERT, all-MiniLM-L6-v2"
    output = "output.dense"
    replace = "self"
    pruned_attention = CloverBertSelfAttention
    legacy_names = ("bert",)
    caches = "no cache (encoder)"

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        if getattr(model.config, "is_decoder", False) or getattr(model.config, "add_cross_attention", False):
            # its pruned attention is the encoder's: no cache, no cross-attention input
            raise UnsupportedModelError(
                "BERT used as a decoder (is_decoder / add_cross_attention) is not supported; BERT encoders are"
            )
        sites = []
        for name, module in model.named_modules():
            if not (hasattr(module, "self") and hasattr(module, "output") and hasattr(module.self, "query")):
                continue
            inner = module.self
            sites.append(
                self.site(
                    name=name,
                    stack="encoder",
                    layer_index=inner.layer_idx if inner.layer_idx is not None else len(sites),
                    module=module,
                    q=LinearProjection(inner.query),
                    k=LinearProjection(inner.key),
                    v=LinearProjection(inner.value),
                    o=LinearProjection(module.output.dense),
                    scaling=inner.scaling,
                    dropout=float(inner.dropout.p),
                    is_causal=bool(inner.is_causal),
                    num_heads=inner.num_attention_heads,
                    num_kv_heads=inner.num_attention_heads,
                    head_dim=inner.attention_head_size,
                )
            )
        return sites
