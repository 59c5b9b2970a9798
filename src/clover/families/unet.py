"""Stable Diffusion XL's UNet through diffusers (``UNet2DConditionModel``): ``attn1`` (self) and ``attn2`` (cross)
of every transformer block.

Every site is a diffusers ``Attention``: linears ``to_q``, ``to_k``, ``to_v`` (SDXL: no bias) and ``to_out[0]``
(a bias), ``heads`` heads of inner_dim / heads dims, scale dim_head^-0.5. attn2's K and V read the text encoder's
token states (``encoder_hidden_states``). No position term inside attention (positions come from the
convolutions) and no QK-norm: Q-K and V-O are exact in both. No KV cache; attn2's text K/V are the same at every
denoising step, so pruning attn2 shrinks them wherever they are computed or kept.

diffusers' default processor (``AttnProcessor2_0``) takes each head's width from the key tensor and calls SDPA
without the stored scale, so a pruned Q-K would silently change the softmax temperature, and unequal Q-K / V-O
widths would break its views. A pruned site therefore keeps its ``Attention`` module (diffusers' parameter names
and tooling stay), with packed projections of the kept widths and ``CloverAttnProcessor``, which attends head by
head with HeadLayout's widths and the original scale.

The command line reads, writes and probes UNet checkpoints through this family's checkpoint hooks (kind "unet"):
diffusers' from_pretrained (the Clover class where config.clover lists pruned sites), ``write_pruned_unet``, and
one seeded denoising step as the probe.

diffusers is an optional extra (``clover-attention[diffusion]``): it is imported only inside functions, so this
file, which the registry imports, loads without it.
"""

from __future__ import annotations

import inspect
import json
import os
import textwrap
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CloverError, UnsupportedModelError
from ..modeling_clover import (
    CONFIG_KEY,
    PRUNED_ATTENTION,
    HeadLayout,
    install_pruned_attention,
    zero_width_safe_linear,
)
from .base import AttentionSite, Family, LinearProjection

_PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v"}
# the processors whose computation the pruned one reproduces (any other may add inputs, e.g. IP-Adapter's)
_PLAIN_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
PROBE_SIDE = 16  # the CLI's probe latent is at most 16 x 16 (SDXL's: 128 x 128): cheap, halved by each down block
PROBE_TOKENS = 8  # text tokens of the probe's encoder_hidden_states
SDXL_TIME_IDS = 6  # original size, crop corner, target size: the ids SDXL's text_time conditioning embeds


class CloverAttnProcessor:
    """diffusers attention processor of a pruned ``Attention``: per-head kept widths and the original scale.

    The module keeps ``to_q``, ``to_k``, ``to_v`` (packed: each head's kept dims, head after head) and
    ``to_out``; everything around attention (spatial / group / cross norms, residual, output rescale) is computed
    as ``AttnProcessor2_0`` computes it. Holds no parameters. Copied by source into pruned checkpoints: it may use
    only torch, ``nn`` and the names of ``modeling_clover``.
    """

    def __init__(self, spec: dict):
        self.spec = spec
        self.scaling = float(spec["scaling"])  # the original model's, never recomputed from kept dims
        self.layout = HeadLayout(spec["num_heads"], spec["num_kv_heads"], spec["qk_dims"], spec["vo_dims"])

    @classmethod
    def pruned_from(cls, original: nn.Module, spec: dict) -> nn.Module:
        """``original`` with q, k, v resized to the kept widths (uninitialised) and this processor installed; the
        output projection ``to_out[0]`` is resized by ``install_pruned_attention``."""
        processor = cls(spec)
        layout = processor.layout
        for label, d_in, width in (("q", spec["d_q"], layout.q_width), ("k", spec["d_kv"], layout.k_width),
                                   ("v", spec["d_kv"], layout.v_width)):  # fmt: skip
            name = (spec.get("projections") or {}).get(label, f"to_{label}")
            old = original.get_submodule(name)
            new = zero_width_safe_linear(
                d_in, width, bias=spec["bias"][label], device=old.weight.device, dtype=old.weight.dtype
            )
            original.set_submodule(name, new.train(old.training))
        original.set_processor(processor)
        original.set_processor = PrunedProcessorGuard(original)  # an instance attribute: shadows the method
        return original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, kv_len, _ = source.shape
        if attention_mask is not None:
            shared = attention_mask.shape[0] < batch * attn.heads  # one mask for every head, which diffusers repeats
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            if shared:
                attention_mask = attention_mask[:, :1]
            elif not self.layout.uniform:
                raise ValueError(
                    "a per-head attention mask needs the same kept dims in every head; prune with uniform or layer "
                    "allocation"
                )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = self.layout.cache_entry(attn.to_k(encoder_hidden_states), "k")
        value = self.layout.cache_entry(attn.to_v(encoder_hidden_states), "v")
        # (B, L, Σ heads' V-O dims); diffusers' processors neither drop attention probabilities nor mask causally
        out = self.layout.attend(query, key, value, attention_mask, scaling=self.scaling, is_causal=False)
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PrunedProcessorGuard:
    """A pruned ``Attention``'s ``set_processor``: only another CloverAttnProcessor may replace its processor.

    diffusers' ``set_attn_processor``, ``set_attention_slice``, ``fuse_qkv_projections`` and
    ``enable_xformers_memory_efficient_attention`` all end in ``set_processor``, and each of their processors reads
    the head width from the key and attends at 1/sqrt(kept dims): a silently different UNet. Copied by source
    into pruned checkpoints, as CloverAttnProcessor is."""

    def __init__(self, attention: nn.Module):
        self.attention = attention

    def __call__(self, processor, *args, **kwargs) -> None:  # older diffusers pass _remove_lora=...
        if not isinstance(processor, CloverAttnProcessor):
            raise ValueError(
                f"{type(processor).__name__} cannot replace the CloverAttnProcessor of a pruned attention: it would "
                "attend with each head's pruned width as the softmax scale and change the UNet's output; keep the "
                "pruned UNet's processors (or use them on the unpruned UNet)"
            )
        self.attention.processor = processor


PRUNED_ATTENTION[CloverAttnProcessor.__name__] = CloverAttnProcessor


def pruned_diffusers_class(base_name: str) -> type:
    """``Clover<base_name>``: the diffusers model class whose ``from_config`` (which ``from_pretrained`` calls)
    installs the pruned sites its config lists, so a pruned checkpoint loads with its own shapes."""
    import diffusers

    defined = globals().get(f"Clover{base_name}")
    if defined is not None:
        return defined
    base = getattr(diffusers, base_name)

    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        # the clover spec and auto_map are no init arguments: kept out of diffusers' "will be ignored" warning
        settings = dict(config) if isinstance(config, dict) else config
        extra = {key: settings.pop(key) for key in (CONFIG_KEY, "auto_map") if key in (settings or {})}
        model, unused = super(pruned, cls).from_config(settings, return_unused_kwargs=True, **kwargs)
        sites = (extra.get(CONFIG_KEY) or {}).get("sites")
        if not sites:
            raise ValueError(f"this config lists no pruned sites ({CONFIG_KEY!r}); load it with {base_name}")
        model.register_to_config(**extra)
        install_pruned_attention(model, sites)
        return (model, unused) if return_unused_kwargs else model

    pruned = type(f"Clover{base_name}", (base,), {"from_config": classmethod(from_config), "__module__": __name__})
    globals()[pruned.__name__] = pruned
    return pruned


class UNet(Family):
    name = "unet"
    model_classes = ("UNet2DConditionModel",)
    examples = "Stable Diffusion XL UNet via diffusers"
    output = "to_out.0"
    pruned_attention = CloverAttnProcessor
    caches = "no cache (attn2's text K and V shrink)"
    checkpoint_kind = "unet"

    def load_checkpoint(self, path: Path, dtype: torch.dtype | None) -> tuple[nn.Module, dict[str, list]]:
        config = json.loads((path / "config.json").read_text())
        cls = _model_class(config, path / "config.json")
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        # diffusers warns that config.clover (a decomposed UNet's record) is no init argument; it keeps it all the same
        diffusers_logging.set_verbosity_error()
        try:
            model, info = cls.from_pretrained(path, torch_dtype=dtype, output_loading_info=True)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        return model.eval(), info

    def write_pruned_checkpoint(self, model: nn.Module, directory: Path) -> None:
        write_pruned_unet(model, directory)

    def probe_output(self, model: nn.Module) -> Tensor:
        """One denoising step's noise prediction on seeded inputs: latents of ``in_channels`` at most PROBE_SIDE
        square, timestep 500, PROBE_TOKENS random text token states, and SDXL's pooled text embedding and time ids
        where the config asks for them."""
        parameter = next(model.parameters())
        inputs = probe_inputs(model.config, torch.Generator().manual_seed(0))
        inputs = {
            key: value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)
            for key, value in inputs.items()
        }
        added = {key: inputs.pop(key) for key in ("text_embeds", "time_ids") if key in inputs}
        with torch.no_grad():
            return model(**inputs, added_cond_kwargs=added).sample.double().cpu()

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        from diffusers.models.attention_processor import Attention

        sites, counts = [], {}
        for name, module in model.named_modules():
            if not isinstance(module, Attention) or isinstance(module.processor, CloverAttnProcessor):
                continue
            _check_plain(name, module)
            stack = "cross" if module.is_cross_attention else "self"
            sites.append(
                self.site(
                    name=name,
                    stack=stack,
                    layer_index=counts.get(stack, 0),
                    module=module,
                    q=LinearProjection(module.to_q),
                    k=LinearProjection(module.to_k),
                    v=LinearProjection(module.to_v),
                    o=LinearProjection(module.to_out[0]),
                    scaling=_softmax_scale(module),
                    output_dropout=float(module.to_out[1].p),  # to_out[1], which stays in the module
                    num_heads=module.heads,
                    num_kv_heads=module.heads,
                    head_dim=module.to_q.out_features // module.heads,
                    q_reads_kv_input=not module.is_cross_attention,  # attn2's K/V read the text states
                    cached=False,
                    extra={"projections": dict(_PROJECTIONS)},
                )
            )
            counts[stack] = counts.get(stack, 0) + 1
        return sites


def probe_inputs(config: dict, generator: torch.Generator) -> dict[str, Tensor]:
    """The probe's inputs for a UNet2DConditionModel ``config`` (batch 1; text_embeds and time_ids flat beside
    the others); a conditioning the probe cannot invent (class labels, image embeddings) is refused."""
    unsupported = [
        f"{key}={config.get(key)!r}"
        for key, allowed in (("addition_embed_type", (None, "text", "text_time")), ("class_embed_type", (None,)),
                             ("num_class_embeddings", (None,)), ("encoder_hid_dim_type", (None, "text_proj")))
        if config.get(key) not in allowed
    ]  # fmt: skip
    widths = config["cross_attention_dim"]
    widths = set(widths) if isinstance(widths, (list, tuple)) else {widths}
    if len(widths) > 1:
        unsupported.append(f"cross_attention_dim={config['cross_attention_dim']!r}")
    if unsupported:
        raise CloverError(
            f"the command line's probe builds SDXL-like inputs (latents, timestep, text states, text_time ids); this "
            f"UNet needs other conditioning ({', '.join(unsupported)}); `clover decompose --no-verify` skips the "
            "probe, and Python's decompose_ / prune_ take any UNet"
        )
    size = config["sample_size"]
    height, width = (min(PROBE_SIDE, side) for side in (size if isinstance(size, (list, tuple)) else (size, size)))
    # encoder_hid_proj ("text_proj") maps text states of encoder_hid_dim to cross_attention_dim
    text_width = config.get("encoder_hid_dim") or widths.pop()
    inputs = {
        "sample": torch.randn(1, config["in_channels"], height, width, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, PROBE_TOKENS, text_width, generator=generator),
    }
    if config.get("addition_embed_type") == "text_time":
        # add_embedding reads [pooled text | each time id's embedding]; any split of its width runs: SDXL's six ids
        # (in pixels, 8 per latent pixel) and the pooled embedding the rest
        per_id, total = config["addition_time_embed_dim"], config["projection_class_embeddings_input_dim"]
        time_ids = min(SDXL_TIME_IDS, (total - 1) // per_id)
        inputs["text_embeds"] = torch.randn(1, total - time_ids * per_id, generator=generator)
        inputs["time_ids"] = torch.tensor([[8 * height, 8 * width, 0, 0, 8 * height, 8 * width][:time_ids]]).float()
    return inputs


def _softmax_scale(module: nn.Module) -> float:
    """The scale the module's processor attends with: AttnProcessor2_0 leaves it to SDPA, 1/sqrt(K's width per
    head), which is ``attn.scale`` whenever diffusers chose that processor (scale_qk); AttnProcessor uses
    ``attn.scale``."""
    if type(module.processor).__name__ == "AttnProcessor2_0":
        return (module.to_k.out_features // module.heads) ** -0.5
    return float(module.scale)


def _check_plain(name: str, module: nn.Module) -> None:
    """Refuse the diffusers Attention options whose computation CloverAttnProcessor does not reproduce."""
    processor = type(module.processor).__name__
    problem = None
    if processor not in _PLAIN_PROCESSORS:  # fused projections, IP-Adapter, xformers, LoRA-era processors...
        problem = (
            f"its attention processor is {processor}, not diffusers' plain one; call unet.unfuse_qkv_projections() "
            "(fused projections) or unet.set_default_attn_processor() first"
        )
    elif module.norm_q is not None or module.norm_k is not None:
        problem = "a QK-norm sits between Q and K"
    elif module.added_kv_proj_dim is not None or module.to_k is None:
        problem = "it has added K/V projections (add_k_proj / add_v_proj)"
    elif module.to_out is None or module.to_k.out_features != module.to_q.out_features:
        problem = "it has no output projection or fewer K/V heads than query heads"
    if problem:
        raise UnsupportedModelError(f"{name}: {problem}")


# ----------------------------------------------------------------------------------------------- checkpoints


def pruned_modeling_source(base_name: str) -> str:
    """The ``modeling_clover.py`` a pruned diffusers checkpoint carries: the self-contained base, the processor
    and the ``Clover<base_name>`` class (for diffusers' ``AutoModel`` with ``trust_remote_code``)."""
    from .. import modeling_clover

    parts = [Path(modeling_clover.__file__).read_text().rstrip()]
    for item in (CloverAttnProcessor, PrunedProcessorGuard, pruned_diffusers_class):
        parts.append(f"# {item.__name__}: from {__name__}\n" + textwrap.dedent(inspect.getsource(item)).rstrip())
    parts.append(f"PRUNED_ATTENTION[{CloverAttnProcessor.__name__!r}] = {CloverAttnProcessor.__name__}")
    parts.append(f"pruned_diffusers_class({base_name!r})")
    return "\n\n\n".join(parts) + "\n"


def save_pruned_unet(unet: nn.Module, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a pruned UNet atomically: diffusers' ``save_pretrained`` files (config.json with the per-head dims,
    safetensors) and ``modeling_clover.py``.

    The directory loads with ``load_pruned_unet(DIR)``, or without clover with diffusers'
    ``AutoModel.from_pretrained(DIR, trust_remote_code=True)``. Stock ``UNet2DConditionModel.from_pretrained``
    refuses it: the attention projections are narrower than its config builds them.
    """
    from ..io import atomic_directory

    _check_pruned(unet)  # before a staging directory exists
    with atomic_directory(out, overwrite=overwrite) as staging:
        write_pruned_unet(unet, staging)
    return Path(out)


def write_pruned_unet(unet: nn.Module, directory: Path) -> None:
    """The files of ``save_pruned_unet``, written into an existing (staging) directory."""
    from .pruned import upgrade_pruned_specs

    _check_pruned(unet)
    upgrade_pruned_specs(unet)
    base = next(c.__name__ for c in type(unet).__mro__ if not c.__name__.startswith("Clover"))
    unet.save_pretrained(directory, safe_serialization=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name=base, auto_map={"AutoModel": f"modeling_clover.Clover{base}"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / "modeling_clover.py").write_text(pruned_modeling_source(base))


def _check_pruned(unet: nn.Module) -> None:
    if not (unet.config.get(CONFIG_KEY) or {}).get("sites"):
        raise CloverError("this UNet is not pruned by clover; save it with save_pretrained (nothing changed shape)")


def load_pruned_unet(path: str | os.PathLike, **kwargs) -> nn.Module:
    """A UNet saved by ``save_pruned_unet``, with clover's own classes (no remote code runs); ``kwargs`` go to
    diffusers' ``from_pretrained`` (``torch_dtype``, ``device_map``...). Returned in eval mode."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CloverError(f"{path} has no config.json: pass a directory written by save_pruned_unet")
    config = json.loads(config_path.read_text())
    if not (config.get(CONFIG_KEY) or {}).get("sites"):
        raise CloverError(f"{config_path} lists no pruned sites: load it with diffusers' from_pretrained")
    return _model_class(config, config_path).from_pretrained(path, **kwargs).eval()


def _model_class(config: dict, config_path: Path) -> type:
    """The class that loads a UNet checkpoint's ``config``: diffusers' own, or its Clover subclass where the config
    lists pruned sites."""
    base = str(config.get("_class_name", "")).removeprefix("Clover")
    try:
        import diffusers

        return pruned_diffusers_class(base) if (config.get(CONFIG_KEY) or {}).get("sites") else getattr(diffusers, base)
    except ImportError:
        raise CloverError(
            f"{config_path} is a diffusers {base}, which needs diffusers: pip install 'clover-attention[diffusion]'"
        ) from None
    except AttributeError:
        raise CloverError(f"{config_path}: diffusers has no model class {base!r}") from None


__all__ = [
    "CloverAttnProcessor",
    "UNet",
    "load_pruned_unet",
    "probe_inputs",
    "pruned_diffusers_class",
    "save_pruned_unet",
    "write_pruned_unet",
]
