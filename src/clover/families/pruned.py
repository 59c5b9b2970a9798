"""Attention sites of a model pruned by clover (config.clover["sites"]), so the fine-tuning adapter can heal it.

The pruned modules are clover's own (``clover.modeling_clover`` and the family files, or their copies loaded with
trust_remote_code), so one description covers every family: packed q/k/v projections with the kept dims of each
head, and the output projection whose input rows follow them. Each spec says where its output projection lives and
whether Q-K is exact, so nothing here needs to know the family. Modules are found by the paths in the config, not
by class, because a checkpoint loaded with trust_remote_code defines its own copies of the classes.
"""

from __future__ import annotations

from torch import nn

from ..errors import CloverError
from ..modeling_clover import FORMAT_VERSION
from .base import AttentionSite, LinearProjection
from .registry import FAMILIES


def pruned_site_specs(model: nn.Module) -> dict[str, dict]:
    """{module path: site spec} of a clover-pruned model (format-1 specs upgraded); empty for any other model."""
    sites = dict((getattr(getattr(model, "config", None), "clover", None) or {}).get("sites") or {})
    return {path: upgrade_spec(spec) for path, spec in sites.items()}


def upgrade_spec(spec: dict) -> dict:
    """A site spec in the current format: format 1 named the family, the current one states its facts."""
    if "attention_class" in spec:
        return spec
    for family in FAMILIES:
        if spec.get("family") in family.legacy_names:
            facts = {
                "attention_class": family.pruned_attention.__name__,
                "output": family.output,
                "replace": family.replace,
                "kept": list(family.kept),
                "positional": family.positional,
                "qk_blocker": family.qk_blocker,
            }
            return {**{k: v for k, v in spec.items() if k != "family"}, **facts}
    raise CloverError(
        f"this pruned checkpoint names family {spec.get('family')!r}, which this clover does not know; "
        f"load it with the clover version that wrote it (format {FORMAT_VERSION} is current)"
    )


def upgrade_pruned_specs(model: nn.Module) -> None:
    """Rewrite ``config.clover`` of a pruned model in the current format (before saving it again)."""
    clover = getattr(model.config, "clover", None)
    if clover and clover.get("format") != FORMAT_VERSION:
        model.config.clover = {**clover, "format": FORMAT_VERSION, "sites": pruned_site_specs(model)}


def pruned_projections(module: nn.Module, spec: dict) -> dict[str, nn.Linear]:
    """The q, k, v, o linears of the pruned attention installed at site ``module``."""
    attention = module.get_submodule(spec["replace"]) if spec.get("replace") else module
    # a spec may name its q/k/v linears (a diffusers Attention keeps to_q, to_k, to_v); clover's own are *_proj
    names = spec.get("projections") or {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
    return {
        **{label: attention.get_submodule(names[label]) for label in "qkv"},
        "o": module.get_submodule(spec["output"]),
    }


def _stack(path: str) -> str:
    if "encoder_attn" in path:
        return "cross"
    return "encoder" if "encoder" in path.split(".") or ".encoder." in f".{path}." else "decoder"


def pruned_attention_sites(model: nn.Module, *, uniform: bool = False) -> list[AttentionSite]:
    """One AttentionSite per pruned attention, with the width of every head block.

    ``uniform``: refuse layers whose KV groups keep different dims (the CLOVER adapter trains one square
    matrix per head of a layer) or keep none at all; PEFT methods, which only need the linears, accept both.
    """
    sites = []
    for index, (path, spec) in enumerate(pruned_site_specs(model).items()):
        qk, vo = list(spec["qk_dims"]), list(spec["vo_dims"])
        if uniform and (len(set(qk)) > 1 or len(set(vo)) > 1):
            raise CloverError(
                f"{path} keeps different dims in different heads (global allocation or a threshold), and the "
                "CLOVER adapter trains one square matrix per head of a layer; prune with --allocation uniform or "
                "layer to heal with CLOVER, or heal this checkpoint with a PEFT method (--method lora)"
            )
        if uniform and 0 in qk + vo:
            raise CloverError(f"{path} has every Q-K or V-O dim of a head pruned: CLOVER has nothing to train there")
        group = spec["num_heads"] // spec["num_kv_heads"]
        module = model.get_submodule(path)
        projections = {label: LinearProjection(linear) for label, linear in pruned_projections(module, spec).items()}
        sites.append(
            AttentionSite(
                name=path,
                stack=spec.get("stack") or _stack(path),
                layer_index=spec.get("layer_idx") if spec.get("layer_idx") is not None else index,
                module=module,
                num_heads=spec["num_heads"],
                num_kv_heads=spec["num_kv_heads"],
                head_dim=spec["head_dim"],  # the original width: 'up' blocks are d_h / 2 of the unpruned model
                scaling=spec["scaling"],
                is_causal=spec["is_causal"],
                qk_blocker=spec.get("qk_blocker"),
                cached=spec.get("cached"),  # None (written before it was recorded): decided by the stack
                rotary_dims=spec.get("rotary_dims", 0),  # each Q-K block: [rotary dims | kept pass-through dims]
                dropout=spec.get("dropout", 0.0),
                output_dropout=spec.get("output_dropout", 0.0),
                block_widths={"q": [w for w in qk for _ in range(group)], "k": qk, "v": vo},
                **projections,
            )
        )
    return sites
