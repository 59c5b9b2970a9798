"""GPT-2: Q, K and V fused in one Conv1D (``c_attn``, blocks [Q | K | V]), output ``c_proj``; biases everywhere;
learned absolute positions added at the input, so Q-K and V-O are both exact and both K and V caches shrink."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..modeling_clover import PrunedAttention
from .base import AttentionSite, Conv1DSlice, Family


class CloverSelfAttention(PrunedAttention):
    """Self-attention with nothing between Q and K: pruned Q-K and V-O dims, a cache of the kept dims only."""

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        q = self.q_proj(hidden_states)
        k = self.layout.cache_entry(self.k_proj(hidden_states), "k")
        v = self.layout.cache_entry(self.v_proj(hidden_states), "v")
        if cache is not None:
            from transformers.cache_utils import EncoderDecoderCache

            target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            k, v = target.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = self._attend(q, k, v, attention_mask)
        return F.dropout(self.out_projection(out), self.output_dropout, self.training), weights


class GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    examples = "GPT-2"
    output = "c_proj"
    pruned_attention = CloverSelfAttention
    legacy_names = ("gpt2",)

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in model.named_modules():
            if not hasattr(module, "c_attn") or getattr(module, "is_cross_attention", False):
                continue
            d = module.embed_dim
            sites.append(
                self.site(
                    name=name,
                    stack="decoder",
                    layer_index=module.layer_idx,
                    module=module,
                    q=Conv1DSlice(module.c_attn, 0, d),
                    k=Conv1DSlice(module.c_attn, d, 2 * d),
                    v=Conv1DSlice(module.c_attn, 2 * d, 3 * d),
                    o=Conv1DSlice(module.c_proj, 0, d),
                    scaling=module.scaling,
                    dropout=float(module.attn_dropout.p),
                    output_dropout=float(module.resid_dropout.p),
                    is_causal=True,
                    num_heads=module.num_heads,
                    num_kv_heads=module.num_heads,
                    head_dim=module.head_dim,
                )
            )
        return sites
