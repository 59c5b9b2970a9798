"""GPT-J: separate q/k/v/out_proj without biases, MHA. Partial RoPE (``rotary_dim``, 64 of 256 dims in GPT-J-6B)
in interleaved pairs (``rotate_every_two``): the first rotary_dim dims of each head are rotated and the rest pass
through, so the pass-through dims of each head form an exact Q-K product (prunable, and with them the K cache);
V-O is exact. Without ``rotary_dim`` every dim is rotary: V-O only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import AttentionSite, Family
from .phi3 import CloverPhi3Attention


class CloverGPTJAttention(CloverPhi3Attention):
    """GPT-J's rotary function (on (B, L, heads, r), as GPT-J applies it) and its dropout after ``out_proj``."""

    def rotate(self, q, k, position_embeddings):
        from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

        sin, cos = position_embeddings  # GPT-J's order: (sin, cos), each (B, L, r / 2)
        return apply_rotary_pos_emb(q, sin, cos), apply_rotary_pos_emb(k, sin, cos)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        out, weights = super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        return F.dropout(out, self.output_dropout, self.training), weights


class GPTJ(Family):
    name = "gptj"
    model_types = ("gptj",)
    examples = "GPT-J"
    positional = "partial-rope"
    output = "out_proj"
    pruned_attention = CloverGPTJAttention
    caches = "V and K's pass-through dims"

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in self.attention_modules(model, "out_proj", "rotary_dim"):
            d = module.head_dim
            sites.append(
                self.site(
                    name=name,
                    stack="decoder",
                    layer_index=module.layer_idx,
                    module=module,
                    **self.separate_projections(module),
                    scaling=module.scaling,
                    dropout=float(module.attention_dropout),
                    output_dropout=float(module.resid_dropout.p),
                    is_causal=True,
                    num_heads=module.num_attention_heads,
                    num_kv_heads=module.num_attention_heads,
                    head_dim=d,
                    rotary_dims=min(module.rotary_dim or d, d),  # None: rotary on every dim
                )
            )
        return sites
