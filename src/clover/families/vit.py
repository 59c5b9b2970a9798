"""ViT, DINOv2 and DINOv2 with registers: image encoders whose attention holds ``q_proj``, ``k_proj``, ``v_proj``
and ``o_proj``, all with biases (``qkv_bias``, default True).

Learned absolute positions are added at the input (DINOv2's register tokens are appended after them): nothing
sits between Q and K, so Q-K and V-O are both exact. No cache. DINOv2 (with or without registers) multiplies
the attention output per channel by ``layer_scale1.lambda1`` after O; ``fold_output_scales`` moves it into O's
rows and bias, so pruning ranks O's dims by what reaches the residual stream. ViT has no layer scale.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_clover import PrunedAttention
from .base import AttentionSite, Family


class CloverEncoderAttention(PrunedAttention):
    """Self-attention with nothing between Q and K and no cache (ViT, DINOv2, CLIP, SigLIP): pruned Q-K and V-O.

    Called as transformers calls these attentions, ``(hidden_states, attention_mask, **kwargs)``, and returns
    ``(output, attention probabilities or None)``. Causality comes from the spec (CLIP's text tower), so the
    caller's ``is_causal`` keyword is not needed.
    """

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        q = self.q_proj(hidden_states)
        k = self.layout.cache_entry(self.k_proj(hidden_states), "k")
        v = self.layout.cache_entry(self.v_proj(hidden_states), "v")
        out, weights = self._attend(q, k, v, attention_mask)
        return self.out_projection(out), weights


def layer_number(name: str) -> int:
    """The layer index in a module path: its last purely numeric part ("encoder.layer.3.attention" -> 3)."""
    return int(next(part for part in reversed(name.split(".")) if part.isdigit()))


class ViT(Family):
    name = "vit"
    model_types = ("vit",)
    examples = "ViT"
    pruned_attention = CloverEncoderAttention
    caches = "no cache (encoder)"

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in self.attention_modules(model, "q_proj", "k_proj", "v_proj", "o_proj"):
            sites.append(
                self.site(
                    name=name,
                    stack="encoder",
                    layer_index=layer_number(name),
                    module=module,
                    **self.separate_projections(module),
                    scaling=module.scaling,
                    dropout=float(module.attention_dropout),
                    num_heads=module.num_attention_heads,
                    num_kv_heads=module.num_attention_heads,
                    head_dim=module.head_dim,
                )
            )
        return sites


class Dinov2(ViT):
    name = "dinov2"
    model_types = ("dinov2", "dinov2_with_registers")
    examples = "DINOv2, DINOv2 with registers"
    output_scales = True

    @torch.no_grad()
    def fold_output_scales(self, model: nn.Module) -> None:
        """``layer_scale1.lambda1`` (per channel, after O) into O's rows and bias; lambda1 becomes ones."""
        for layer in model.modules():
            scale = getattr(getattr(layer, "layer_scale1", None), "lambda1", None)
            if scale is None or not hasattr(layer, "attention"):
                continue
            o_proj = layer.attention.o_proj
            o_proj.weight.mul_(scale.to(o_proj.weight.dtype)[:, None])
            if o_proj.bias is not None:
                o_proj.bias.mul_(scale.to(o_proj.bias.dtype))
            scale.fill_(1.0)
