"""T5 and mT5: encoder self-, decoder self- and decoder cross-attention (``SelfAttention``, ``EncDecAttention``).

q, k, v, o without bias; the head width ``d_kv`` is its own setting; no 1/sqrt(d) (the scale is 1). A learned
relative-position bias (``relative_attention_bias``, buckets -> one value per head) lives only in the first
layer of each stack, is added to the scores and handed on to the later layers. An additive, content-independent
bias keeps Q-K exact, so Q-K and V-O both prune and every K and V cache (self and cross) shrinks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_clover import HeadLayout, PrunedAttention, _recorded
from .base import AttentionSite, Family, LinearProjection


class CloverBiasAttention(PrunedAttention):
    """A pruned attention whose float mask holds a per-head additive bias (T5's relative positions, ALiBi).

    ``HeadLayout.attend`` broadcasts one mask over every head bucket, so a (B, H, L, S) mask fits only a layout
    whose KV groups all keep the same dims, without GQA. Elsewhere each bucket of heads attends here with the
    mask rows of its own heads (K and V repeated per query head; GQA with a per-head bias is rare).
    """

    def _bucket_heads(self) -> list[list[int]]:
        """The query heads of each ``layout.buckets`` entry, grouped the way HeadLayout groups them."""
        spec, group = self.spec, self.layout.group
        groups: dict[tuple[int, int], list[int]] = {}
        for j in range(spec["num_kv_heads"]):
            groups.setdefault((spec["qk_dims"][j], spec["vo_dims"][j]), []).append(j)
        return [[h for j in members for h in range(j * group, (j + 1) * group)] for members in groups.values()]

    def _attend_with_bias(self, query, key, value, mask, want_weights: bool):
        """(B, L, out_width) output and, if ``want_weights``, the (B, H, L, S) probabilities; mask may be per head."""
        layout = self.layout
        options = {
            "scaling": self.scaling,
            "is_causal": self.is_causal,
            "dropout": self.dropout_p if self.training else 0.0,
        }
        per_head = mask is not None and mask.dim() == 4 and mask.shape[1] > 1
        if not per_head or (layout.uniform and layout.group == 1):
            if want_weights:
                return layout.attend_eager(query, key, value, mask, **options)
            return layout.attend(query, key, value, mask, **options), None
        batch, q_len, _ = query.shape
        kv_len = key.shape[2]
        mask = mask[..., :kv_len]
        # both cache layouts -> (B, S, width) packed columns, which ``take`` indexes per bucket
        key = key[:, 0] if not layout.uniform else key.transpose(1, 2).reshape(batch, kv_len, -1)
        value = value[:, 0] if not layout.uniform else value.transpose(1, 2).reshape(batch, kv_len, -1)
        outputs, weights, order = [], [], []
        for b, ((dq, dv, groups), heads) in enumerate(zip(layout.buckets, self._bucket_heads(), strict=True)):
            count = len(heads)
            per_head_layout = HeadLayout(count, count, [dq] * count, [dv] * count)
            k = layout.take(key, f"k{b}").view(batch, kv_len, groups, dq).repeat_interleave(layout.group, dim=2)
            v = layout.take(value, f"v{b}").view(batch, kv_len, groups, dv).repeat_interleave(layout.group, dim=2)
            args = (layout.take(query, f"q{b}"), k.transpose(1, 2), v.transpose(1, 2), mask[:, heads])
            if want_weights:
                out, probabilities = per_head_layout.attend_eager(*args, **options)
                weights.append(probabilities)
            else:
                out = per_head_layout.attend(*args, **options)
            outputs.append(out)
            order += heads
        out = layout.take(torch.cat(outputs, dim=-1), "out")
        if not want_weights:
            return out, None
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return out, torch.cat(weights, dim=1)[:, inverse]


class CloverT5Attention(CloverBiasAttention):
    """T5Attention with pruned Q-K and V-O dims: the same position bias, reused across layers; kept dims cached."""

    def _relative_bias(self, q_len: int, kv_len: int, past, device):
        """(1, H, q_len, kv_len) learned bias by relative-position bucket, as the first layer of a stack computes it."""
        from transformers.models.t5.modeling_t5 import T5Attention

        facts = self.spec["relative_attention"]
        context = torch.arange(q_len, dtype=torch.long, device=device)[:, None] + past
        memory = torch.arange(kv_len, dtype=torch.long, device=device)[None, :]
        buckets = T5Attention._relative_position_bucket(
            memory - context,
            bidirectional=facts["bidirectional"],
            num_buckets=facts["num_buckets"],
            max_distance=facts["max_distance"],
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def _bias_mask(self, position_bias, mask, q_len: int, key):
        """The additive float mask SDPA gets in transformers' T5: position bias, with masked keys at the minimum."""
        lowest = torch.finfo(key.dtype).min
        if mask is None:
            if self.is_causal and q_len > 1:  # no mask means causal from the first key (a prompt, no cache)
                kv_len = key.shape[2]
                rows = torch.arange(q_len, device=key.device)[:, None]
                allowed = rows >= torch.arange(kv_len, device=key.device)[None, :]
                return torch.where(allowed, position_bias, lowest)
            return position_bias
        if mask.dtype == torch.bool:
            return torch.where(mask, position_bias, lowest)
        return position_bias + mask

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        from transformers.cache_utils import EncoderDecoderCache

        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("output_attentions", None)
        q_len = hidden_states.shape[1]
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        past = past.clone() if isinstance(past, torch.Tensor) else past  # a static cache updates it in place
        is_cross = key_value_states is not None
        query = self.q_proj(hidden_states)
        target, is_updated = cache, False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            target = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        source = key_value_states if is_cross else hidden_states
        if is_cross and cache is not None and is_updated:
            key, value = target.layers[self.layer_idx].keys, target.layers[self.layer_idx].values
        else:
            key = self.layout.cache_entry(self.k_proj(source), "k")
            value = self.layout.cache_entry(self.v_proj(source), "v")
            if cache is not None:
                key, value = target.update(key, value, self.layer_idx, kwargs=kwargs)
                if is_cross and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True
        if position_bias is None:  # the first layer of a stack: computed here and handed on by the stack
            kv_len = key.shape[2]
            if "relative_attention" in self.spec:
                position_bias = self._relative_bias(q_len, kv_len, past, query.device)
            else:
                shape = (1, self.spec["num_heads"], q_len, kv_len)
                position_bias = torch.zeros(shape, device=query.device, dtype=query.dtype)
        # transformers records T5's probabilities from the layer around this module (its last output), not here
        want_weights = _recorded("cross_attentions" if is_cross else "attentions") is not None
        bias_mask = self._bias_mask(position_bias, mask, q_len, key)
        out, weights = self._attend_with_bias(query, key, value, bias_mask, want_weights)
        return self.out_projection(out), position_bias, weights


class T5(Family):
    name = "t5"
    model_types = ("t5", "mt5")
    examples = "T5, mT5"
    positional = "bias"
    output = "o"
    pruned_attention = CloverT5Attention

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in self.attention_modules(model, "key_value_proj_dim"):
            parts = name.split(".")
            stack = "cross" if parts[-1] == "EncDecAttention" else "encoder" if "encoder" in parts else "decoder"
            extra = {"kept": []}
            if module.has_relative_attention_bias:  # the first layer of its stack owns the bias table
                extra = {
                    "kept": ["relative_attention_bias"],
                    "relative_attention": {
                        "num_buckets": module.relative_attention_num_buckets,
                        "max_distance": module.relative_attention_max_distance,
                        "bidirectional": not module.is_decoder,
                    },
                }
            sites.append(
                self.site(
                    name=name,
                    stack=stack,
                    layer_index=module.layer_idx,
                    module=module,
                    q=LinearProjection(module.q),
                    k=LinearProjection(module.k),
                    v=LinearProjection(module.v),
                    o=LinearProjection(module.o),
                    scaling=module.scaling,
                    dropout=float(module.dropout),
                    is_causal=bool(module.is_causal),
                    num_heads=module.n_heads,
                    num_kv_heads=module.n_heads,
                    head_dim=module.key_value_proj_dim,
                    extra=extra,
                )
            )
        return sites
