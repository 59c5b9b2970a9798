"""Whisper: encoder self-attention, decoder self-attention and decoder cross-attention (``encoder_attn``).

Biases on q, v and out_proj, none on k; learned/sinusoidal absolute positions, so every Q-K pair merges and
both K and V caches shrink (self and cross). Whisper scales q before the product and attends with scale 1.
"""

from __future__ import annotations

from torch import nn

from ..modeling_clover import PrunedAttention
from .base import AttentionSite, Family


class CloverSeq2SeqAttention(PrunedAttention):
    """Encoder self-, decoder self- and decoder cross-attention of an encoder-decoder, pruned Q-K and V-O dims."""

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        from transformers.cache_utils import EncoderDecoderCache

        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("output_attentions", None)
        is_cross = key_value_states is not None
        record = "cross_attentions" if is_cross else "attentions"  # the decoders' names for them
        # scale q before the product (as Whisper does) and attend with scale 1
        query = self.q_proj(hidden_states) * self.scaling
        is_updated = False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            if is_cross:
                cache.is_updated[self.layer_idx] = True
                cache = cache.cross_attention_cache
            else:
                cache = cache.self_attention_cache
        source = key_value_states if is_cross else hidden_states
        if is_cross and cache is not None and is_updated:
            k, v = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            k, v = self.layout.cache_entry(self.k_proj(source), "k"), self.layout.cache_entry(self.v_proj(source), "v")
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = self._attend(query, k, v, attention_mask, scaling=1.0, record=record)
        return self.out_projection(out), weights


class Whisper(Family):
    name = "whisper"
    model_types = ("whisper",)
    examples = "Whisper"
    output = "out_proj"
    pruned_attention = CloverSeq2SeqAttention
    legacy_names = ("whisper",)

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in self.attention_modules(model, "out_proj", "q_proj"):
            parts = name.split(".")
            side = "encoder" if "encoder" in parts else "decoder"
            stack = "cross" if parts[-1] == "encoder_attn" else side
            sites.append(
                self.site(
                    name=name,
                    stack=stack,
                    layer_index=int(parts[parts.index("layers") + 1]),
                    module=module,
                    **self.separate_projections(module),
                    scaling=module.scaling,
                    dropout=float(module.dropout),
                    is_causal=bool(module.is_causal),
                    num_heads=module.num_heads,
                    num_kv_heads=module.num_heads,
                    head_dim=module.head_dim,
                )
            )
        return sites
