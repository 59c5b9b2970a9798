"""CLIP and SigLIP: a text tower and a vision tower (or one of them alone: ``*_text_model``, ``*_vision_model``),
each an encoder whose layers hold ``self_attn`` with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``, all with
biases.

Learned positions are added at the input, so Q-K and V-O are both exact; no cache. Sites are grouped by tower,
stack "text" or "vision" (``--stacks``), neither cached. CLIP's text tower is causal; SigLIP's is not.

SigLIP's vision tower ends in an attention pooling head (``head.attention``, a ``torch.nn.MultiheadAttention``
whose learned probe is the only query, with fused ``in_proj_weight``). Its Q-K and V-O are exact too, but it is one
attention with a single query per image, so clover leaves it as it is: not decomposed, pruned nor fine-tuned.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from .base import AttentionSite, Family, is_pruned_attention
from .vit import CloverEncoderAttention


class CLIP(Family):
    name = "clip"
    model_types = ("clip", "clip_text_model", "clip_vision_model")
    examples = "CLIP"
    output = "out_proj"
    pruned_attention = CloverEncoderAttention
    caches = "no cache (encoder)"
    text_causal: ClassVar[bool] = True  # CLIP's text tower attends causally

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for prefix, tower in model.named_modules():
            # a tower (text or vision, in a dual model or alone): embeddings, then an encoder of layers
            if not (hasattr(tower, "embeddings") and hasattr(getattr(tower, "encoder", None), "layers")):
                continue
            text = hasattr(tower.embeddings, "token_embedding")  # the vision tower embeds patches instead
            for index, layer in enumerate(tower.encoder.layers):
                module = layer.self_attn
                if is_pruned_attention(module):
                    continue
                sites.append(
                    self.site(
                        name=".".join(p for p in (prefix, "encoder.layers", str(index), "self_attn") if p),
                        stack="text" if text else "vision",
                        cached=False,
                        layer_index=index,
                        module=module,
                        **self.separate_projections(module),
                        scaling=module.scale,
                        dropout=float(module.dropout),
                        is_causal=text and self.text_causal,
                        num_heads=module.num_heads,
                        num_kv_heads=module.num_heads,
                        head_dim=module.head_dim,
                    )
                )
        return sites


class Siglip(CLIP):
    name = "siglip"
    model_types = ("siglip", "siglip_text_model", "siglip_vision_model")
    examples = "SigLIP"
    text_causal = False
