"""Whisper: encoder self-attention, decoder self-attention and decoder cross-attention (``encoder_attn``).

Biases on q, v and out_proj, none on k; learned/sinusoidal absolute positions, so every Q-K pair merges.
"""

from __future__ import annotations

from torch import nn

from .base import AttentionSite, LinearProjection, ModelAdapter, is_pruned_attention


class WhisperAdapter(ModelAdapter):
    family = "whisper"
    model_types = ("whisper",)
    examples = "Whisper"

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in model.named_modules():
            if is_pruned_attention(module) or not hasattr(module, "out_proj") or not hasattr(module, "q_proj"):
                continue
            parts = name.split(".")
            side = "encoder" if "encoder" in parts else "decoder"
            stack = "cross" if parts[-1] == "encoder_attn" else side
            sites.append(
                AttentionSite(
                    name=name,
                    stack=stack,
                    layer_index=int(parts[parts.index("layers") + 1]),
                    module=module,
                    q=LinearProjection(module.q_proj),
                    k=LinearProjection(module.k_proj),
                    v=LinearProjection(module.v_proj),
                    o=LinearProjection(module.out_proj),
                    scaling=module.scaling,
                    dropout=float(module.dropout),
                    is_causal=bool(module.is_causal),
                    num_heads=module.num_heads,
                    num_kv_heads=module.num_heads,
                    head_dim=module.head_dim,
                )
            )
        return sites
