"""GPT-2: Q, K and V fused in one Conv1D (``c_attn``), output ``c_proj``; biases everywhere; learned positions."""

from __future__ import annotations

from torch import nn

from .base import AttentionSite, Conv1DSlice, ModelAdapter


class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    examples = "GPT-2"

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in model.named_modules():
            if not hasattr(module, "c_attn") or getattr(module, "is_cross_attention", False):
                continue
            d = module.embed_dim
            sites.append(
                AttentionSite(
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
