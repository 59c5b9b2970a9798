"""LLaMA-style decoders: Llama, SmolLM2, Mistral, Qwen2 (q/k/v biases). RoPE sits between Q and K."""

from __future__ import annotations

from torch import nn

from .base import AttentionSite, LinearProjection, ModelAdapter, is_pruned_attention


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    examples = "Llama, SmolLM2, Mistral, Qwen2"

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        config = model.config
        sites = []
        for name, module in model.named_modules():
            if is_pruned_attention(module) or not all(
                hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
            ):
                continue
            sites.append(
                AttentionSite(
                    name=name,
                    stack="decoder",
                    layer_index=module.layer_idx,
                    module=module,
                    q=LinearProjection(module.q_proj),
                    k=LinearProjection(module.k_proj),
                    v=LinearProjection(module.v_proj),
                    o=LinearProjection(module.o_proj),
                    scaling=module.scaling,
                    dropout=float(module.attention_dropout),
                    is_causal=True,
                    num_heads=config.num_attention_heads,
                    num_kv_heads=config.num_key_value_heads,
                    head_dim=module.head_dim,
                    rotary=True,
                )
            )
        return sites
