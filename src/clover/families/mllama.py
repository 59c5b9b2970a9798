"""LLaMA-3.2-Vision (transformers' ``mllama``): a vision encoder, and a Llama text decoder with cross-attention layers.

Three kinds of attention site, each with its own facts:

* vision encoder self-attention, in the local ``transformer`` and the gated ``global_transformer`` stacks (stack
  "vision"): q/k/v/o without bias, MHA, learned position and tile embeddings added at the input, so Q-K and V-O
  are both exact; no cache. Its layers are numbered local first, then global.
* text self-attention (stack "decoder"): Llama's GQA with full RoPE between Q and K, so V-O only; the V cache
  shrinks.
* text cross-attention (stack "cross", at ``cross_attention_layers``): Q reads the text, K and V the projected
  vision states; per-head RMSNorms (``q_norm`` / ``k_norm``) sit between Q and K, so V-O only. The cache holds the
  vision K (normed, whole) and V (the kept dims) in the text layer's slot; later decoding steps read it back.

Q-K is exact only in the vision stack, so Q-K pruning is accepted when the pruning is restricted to it
(``PruneConfig(qk_stacks=("vision",))``, ``clover prune --qk-ratio ... --qk-stacks vision``, V-O in every stack
alongside) and refused, naming the text stacks, otherwise. The gated vision layers scale their attention output by
``tanh(gate_attn)`` and the text cross layers by ``tanh(cross_attn_attn_gate)``: scalars after O, folded into O
before any spectrum is read.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..modeling_clover import PrunedAttention
from .base import AttentionSite, Family, is_pruned_attention
from .gpt2 import CloverSelfAttention
from .llama import CloverLlamaAttention

# tanh of this is exactly 1.0 in float16, bfloat16, float32 and float64 (float64 needs about 19.1 or more)
_SATURATED_GATE = 32.0
_ROPE = "RoPE sits between Q and K (text self-attention)"
_QK_NORM = "QK-norm (q_norm / k_norm) sits between Q and K (text cross-attention)"


class CloverMllamaCrossAttention(PrunedAttention):
    """Text cross-attention with pruned V-O dims: Q from the text, K and V from the vision states, both normed per
    head (the kept q_norm / k_norm); the cache holds every K dim and the kept V dims of each vision token."""

    def forward(self, hidden_states, cross_attention_states=None, cache=None, attention_mask=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        batch, length, _ = hidden_states.shape
        query = self.q_norm(self.q_proj(hidden_states).view(batch, length, -1, self.head_dim)).flatten(2)
        if cross_attention_states is not None:
            # (B · images · tiles, patches, hidden) -> every vision token of a sample in one sequence
            key = self.k_proj(cross_attention_states).view(batch, -1, self.layout.num_kv_heads, self.head_dim)
            key = self.layout.cache_entry(self.k_norm(key).flatten(2), "k")
            value = self.v_proj(cross_attention_states).reshape(batch, -1, self.layout.v_width)
            value = self.layout.cache_entry(value, "v")
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        else:  # a later decoding step: the vision K/V cached on the first one (the text model skips it otherwise)
            key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        out, weights = self._attend(query, key, value, attention_mask)
        return self.o_proj(out), weights


class Mllama(Family):
    name = "mllama"
    model_types = ("mllama",)  # the text-only and vision-only configs load with no auto class: not claimed
    examples = "LLaMA-3.2-Vision (Mllama)"
    positional = "rope"  # the text self-attention; each site states its own blocker
    pruned_attention = CloverLlamaAttention  # the text self-attention; vision and cross sites name their own
    caches = "V (text self- and cross-attention; the vision encoder has no cache)"
    output_scales = True

    @property
    def qk_blocker(self) -> str | None:
        return "RoPE (self-attention) and QK-norm (cross-attention) sit between Q and K in the text stacks"

    def site(self, *, qk_blocker: str | None, **facts) -> AttentionSite:
        """A site with its own Q-K blocker: None in the vision stack, RoPE or QK-norm in the text stacks."""
        return AttentionSite(family=self, qk_blocker=qk_blocker, **facts)

    @torch.no_grad()
    def fold_output_scales(self, model: nn.Module) -> None:
        for layer in model.modules():
            for gate_name, attention_name in (("gate_attn", "self_attn"), ("cross_attn_attn_gate", "cross_attn")):
                gate = getattr(layer, gate_name, None)
                if not isinstance(gate, nn.Parameter):
                    continue
                output = getattr(layer, attention_name).o_proj
                scale = gate.tanh()  # in the gate's own dtype, as the layer computes it
                output.weight.mul_(scale.to(output.weight.dtype))
                if output.bias is not None:
                    output.bias.mul_(scale.to(output.bias.dtype))
                gate.fill_(_SATURATED_GATE)
                if not bool((gate.tanh() == 1).all()):
                    raise RuntimeError(f"tanh({_SATURATED_GATE}) is not 1 in {gate.dtype}; cannot fold {gate_name}")

    def probe_inputs(self, model: nn.Module, input_ids: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """One random image per sample, of the supported aspect ratio with the fewest tiles (the rest padding), that
        every text token attends to; the first token becomes the image token."""
        vision = model.config.vision_config
        ratios = [tuple(r) for r in vision.supported_aspect_ratios]
        ratio = min(ratios, key=lambda r: r[0] * r[1])
        batch, length = input_ids.shape
        size, tiles = vision.image_size, vision.max_num_tiles
        pixels = torch.randn(batch, 1, tiles, vision.num_channels, size, size, generator=generator)
        mask = (torch.arange(tiles) < ratio[0] * ratio[1]).long().expand(batch, 1, tiles)  # (B, images, tiles)
        input_ids[:, 0] = model.config.image_token_index
        return {
            "pixel_values": pixels.to(input_ids.device),
            "aspect_ratio_ids": torch.full((batch, 1), 1 + ratios.index(ratio), device=input_ids.device),  # 0: none
            "aspect_ratio_mask": mask.to(input_ids.device),
            "cross_attention_mask": mask[:, None].expand(batch, length, 1, tiles).to(input_ids.device),
        }

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            if hasattr(module, "global_transformer"):  # the vision encoder
                layers = [*module.transformer.layers, *module.global_transformer.layers]
                paths = [f"{prefix}transformer.layers.{i}" for i in range(len(module.transformer.layers))]
                paths += [
                    f"{prefix}global_transformer.layers.{i}" for i in range(len(module.global_transformer.layers))
                ]
                for index, (path, layer) in enumerate(zip(paths, layers, strict=True)):
                    if not is_pruned_attention(layer.self_attn):
                        sites.append(self._vision_site(f"{path}.self_attn", index, layer.self_attn))
            elif hasattr(module, "cross_attention_layers") and hasattr(module, "layers"):  # the text decoder
                for index, layer in enumerate(module.layers):
                    attention = layer.cross_attn if hasattr(layer, "cross_attn") else layer.self_attn
                    if not is_pruned_attention(attention):
                        sites.append(self._text_site(f"{prefix}layers.{index}", layer, attention))
        return sites

    def _vision_site(self, name: str, index: int, module: nn.Module) -> AttentionSite:
        return self.site(
            name=name,
            stack="vision",
            layer_index=index,
            module=module,
            **self.separate_projections(module),
            qk_blocker=None,
            scaling=module.scaling,
            dropout=0.0,  # the vision attention never drops probabilities
            is_causal=False,
            num_heads=module.num_heads,
            num_kv_heads=module.num_heads,
            head_dim=module.head_dim,
            cached=False,
            # a spec takes ``extra`` last: the site's own pruned attention overrides the family's (the text one)
            extra={"attention_class": CloverSelfAttention.__name__, "positional": "none"},
        )

    def _text_site(self, path: str, layer: nn.Module, module: nn.Module) -> AttentionSite:
        cross = hasattr(layer, "cross_attn")
        facts = {"qk_blocker": _ROPE}
        if cross:
            facts = {
                "qk_blocker": _QK_NORM,
                "q_reads_kv_input": False,  # Q reads the text, K and V the vision states
                # the site's own pruned attention and the norms it keeps override the family's (see _vision_site)
                "extra": {
                    "attention_class": CloverMllamaCrossAttention.__name__,
                    "kept": ["q_norm", "k_norm"],
                    "positional": "none",
                },
            }
        return self.site(
            name=f"{path}.{'cross_attn' if cross else 'self_attn'}",
            stack="cross" if cross else "decoder",
            layer_index=module.layer_idx,
            module=module,
            **self.separate_projections(module),
            scaling=module.scaling,
            dropout=float(module.dropout),
            is_causal=not cross,
            num_heads=module.num_heads,
            num_kv_heads=module.num_key_value_heads,
            head_dim=module.head_dim,
            **facts,
        )
