"""BERT encoders (all-MiniLM-L6-v2): ``attention.self.{query,key,value}`` and ``attention.output.dense``."""

from __future__ import annotations

from torch import nn

from .base import AttentionSite, LinearProjection, ModelAdapter


class BertAdapter(ModelAdapter):
    family = "bert"
    model_types = ("bert",)
    examples = "BERT, all-MiniLM-L6-v2"

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in model.named_modules():
            if not (hasattr(module, "self") and hasattr(module, "output") and hasattr(module.self, "query")):
                continue
            inner = module.self
            sites.append(
                AttentionSite(
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
