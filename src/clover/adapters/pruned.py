"""Attention sites of a model pruned by clover (config.clover["sites"]), so the fine-tuning adapter can heal it.

The pruned modules are clover's own (``clover.modeling_clover``, or its copy loaded with trust_remote_code),
so one description covers every family: packed q/k/v projections with the kept dims of each head, and the
output projection whose input rows follow them. They are found by the module paths in the config, not by
class, because a checkpoint loaded with trust_remote_code defines its own copies of the classes.
"""

from __future__ import annotations

from torch import nn

from ..errors import CloverError
from .base import AttentionSite, LinearProjection

_OUTPUT_NAME = {"llama": "o_proj", "whisper": "out_proj", "gpt2": "c_proj"}


def pruned_site_specs(model: nn.Module) -> dict[str, dict]:
    """{module path: site spec} of a clover-pruned model; empty for any other model."""
    return dict((getattr(getattr(model, "config", None), "clover", None) or {}).get("sites") or {})


def pruned_projections(module: nn.Module, family: str) -> dict[str, nn.Linear]:
    """The q, k, v, o linears of the pruned attention installed at ``module`` (BERT: its BertAttention)."""
    if family == "bert":  # BertAttention keeps LayerNorm and dropout; the pruned part is .self, O is .output.dense
        attention = module.self
        return {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj, "o": module.output.dense}
    return {"q": module.q_proj, "k": module.k_proj, "v": module.v_proj, "o": getattr(module, _OUTPUT_NAME[family])}


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
        projections = {
            label: LinearProjection(linear) for label, linear in pruned_projections(module, spec["family"]).items()
        }
        sites.append(
            AttentionSite(
                name=path,
                stack=_stack(path),
                layer_index=spec.get("layer_idx") if spec.get("layer_idx") is not None else index,
                module=module,
                num_heads=spec["num_heads"],
                num_kv_heads=spec["num_kv_heads"],
                head_dim=spec["head_dim"],  # the original width: 'up' blocks are d_h / 2 of the unpruned model
                scaling=spec["scaling"],
                is_causal=spec["is_causal"],
                rotary=spec["family"] == "llama",
                dropout=spec.get("dropout", 0.0),
                output_dropout=spec.get("output_dropout", 0.0),
                block_widths={"q": [w for w in qk for _ in range(group)], "k": qk, "v": vo},
                **projections,
            )
        )
    return sites
