"""Facts of the ViT-family files beyond the family table: DINOv2's layer scale folded into O (exact, and what
pruning ranks by), and CLIP / SigLIP towers used alone (their own model_types), with padding masks, stacks and the
SigLIP pooling head left as it is."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import _TEXT_TOWER, _VISION, build_tiny, model_output

from clover.decompose import decompose_
from clover.families import attention_sites, family_for, pruned_projections
from clover.prune import PruneConfig, prune_


def _layer_scales(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.layer_scale1.lambda1 for m in model.modules() if hasattr(m, "layer_scale1")]


@pytest.mark.parametrize("arch", ["dinov2", "dinov2-registers"])
def test_folding_dinov2_layer_scale_then_decomposing_keeps_the_output(arch):
    model = build_tiny(arch)
    scales = [s.detach().clone() for s in _layer_scales(model)]
    assert len(scales) == 2 and all((s - 1).abs().max() > 0.1 for s in scales)  # random, far from ones
    o_before = [tuple(t.clone() for t in site.o.read()) for site in attention_sites(model)]
    reference = model_output(model)
    family_for(model).fold_output_scales(model)
    for scale in _layer_scales(model):
        torch.testing.assert_close(scale, torch.ones_like(scale), atol=0, rtol=0)
    for site, scale, (weight, bias) in zip(attention_sites(model), scales, o_before, strict=True):
        folded_weight, folded_bias = site.o.read()  # math layout (d_in, d_out): lambda1 scales O's output columns
        torch.testing.assert_close(folded_weight, weight * scale, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(folded_bias, bias * scale, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(model_output(model), reference, atol=1e-5, rtol=0)
    decompose_(model)
    torch.testing.assert_close(model_output(model), reference, atol=1e-4, rtol=0)


def test_decompose_folds_dinov2_layer_scale_itself():
    model = build_tiny("dinov2")
    reference = model_output(model)
    decompose_(model)
    assert all(torch.equal(s, torch.ones_like(s)) for s in _layer_scales(model))
    torch.testing.assert_close(model_output(model), reference, atol=1e-4, rtol=0)


def test_pruning_dinov2_ranks_by_the_scaled_vo_product():
    """V-O ratio 0 stays exact with the fold, and at ratio 0.5 each head keeps the top singular directions of
    W_v W_o diag(lambda1), which differ from those of W_v W_o: the fold decides what is kept."""
    model = build_tiny("dinov2").double()
    exact = build_tiny("dinov2")
    reference = model_output(exact)
    prune_(exact, PruneConfig(qk_ratio=0.0, vo_ratio=0.0))
    torch.testing.assert_close(model_output(exact), reference, atol=1e-4, rtol=0)
    assert all(torch.equal(s, torch.ones_like(s)) for s in _layer_scales(exact))

    sites = attention_sites(model)
    products = {}  # per head: W_v,h W_o,h and lambda1, before pruning folds it
    for site, scale in zip(sites, _layer_scales(model), strict=True):
        (w_v, _), (w_o, _) = site.v.read(), site.o.read()
        d = site.head_dim
        heads = [w_v[:, h * d : (h + 1) * d] @ w_o[h * d : (h + 1) * d] for h in range(site.num_heads)]
        products[site.name] = (heads, scale.detach().clone())
    prune_(model, PruneConfig(vo_ratio=0.5))
    for site in sites:
        spec = model.config.clover["sites"][site.name]
        linears = pruned_projections(model.get_submodule(site.name), spec)
        v, o = linears["v"].weight.T, linears["o"].weight.T  # math layout: (d_in, kept), (kept, d_out)
        heads, scale = products[site.name]
        offset = 0
        for product, width in zip(heads, spec["vo_dims"], strict=True):
            got = v[:, offset : offset + width] @ o[offset : offset + width]
            offset += width
            torch.testing.assert_close(got, _truncated(product * scale, width), atol=1e-9, rtol=1e-9)
            # ranking the unscaled product, then scaling what it keeps, would keep other directions
            assert (got - _truncated(product, width) * scale).abs().max() > 1e-3


def _truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * sigma[:rank]) @ vh[:rank]


# (model class, config, inputs): each tower alone, as its own model_type
_PIXELS = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
_IDS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
_MASK = torch.ones_like(_IDS).index_fill_(1, torch.arange(7, 10), 0)  # padding at the end of every row
_TOWERS = {
    "clip_text_model": (tf.CLIPTextModel, lambda: tf.CLIPTextConfig(**_TEXT_TOWER), "text", True),
    "clip_vision_model": (tf.CLIPVisionModelWithProjection, lambda: tf.CLIPVisionConfig(**_VISION), "vision", False),
    "siglip_text_model": (tf.SiglipTextModel, lambda: tf.SiglipTextConfig(**_TEXT_TOWER), "text", False),
    "siglip_vision_model": (tf.SiglipVisionModel, lambda: tf.SiglipVisionConfig(**_VISION), "vision", False),
}


def _tower_output(model: torch.nn.Module, stack: str) -> torch.Tensor:
    inputs = {"input_ids": _IDS, "attention_mask": _MASK} if stack == "text" else {"pixel_values": _PIXELS}
    with torch.no_grad():
        output = model(**inputs)
    pooled = output.text_embeds if hasattr(output, "text_embeds") else getattr(output, "image_embeds", None)
    pooled = output.pooler_output if pooled is None else pooled
    hidden = output.last_hidden_state
    if stack == "text":  # padded positions differ by design; compare the real tokens
        hidden = hidden[:, :7]
    return torch.cat([hidden.flatten(1), pooled.flatten(1)], dim=1)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", list(_TOWERS))
def test_a_tower_alone_has_its_stack_and_prunes_exactly_at_ratio_zero(model_type, attention):
    cls, config, stack, causal = _TOWERS[model_type]
    config = config()
    config._attn_implementation = attention
    assert config.model_type == model_type
    torch.manual_seed(0)
    model = cls(config).eval()
    sites = attention_sites(model)
    assert [(s.stack, s.is_causal, s.cached, s.layer_index) for s in sites] == [
        (stack, causal, False, i) for i in (0, 1)
    ]
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.attention")}
    reference = _tower_output(model, stack)
    report = prune_(model, PruneConfig(qk_ratio=0.0, vo_ratio=0.0))
    assert report.kv_dims_per_token_before == 0  # no cache: nothing to count
    torch.testing.assert_close(_tower_output(model, stack), reference, atol=1e-4, rtol=0)
    for key, value in head.items():  # SigLIP's attention pooling head is left as it is
        assert torch.equal(model.state_dict()[key], value), key


def test_clip_text_tower_is_causal_and_siglip_text_tower_is_not():
    for arch, causal in (("clip", True), ("siglip", False)):
        sites = attention_sites(build_tiny(arch))
        assert [(s.stack, s.is_causal) for s in sites] == [("text", causal)] * 2 + [("vision", False)] * 2
