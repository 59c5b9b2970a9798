"""Architecture adapters. Adding a family = one file here + one entry in ADAPTERS + one test parametrisation."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import AttentionSite, Conv1DSlice, LinearProjection, ModelAdapter, Projection
from .bert import BertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .pruned import pruned_attention_sites, pruned_projections, pruned_site_specs
from .whisper import WhisperAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (LlamaAdapter(), GPT2Adapter(), BertAdapter(), WhisperAdapter())

__all__ = [
    "ADAPTERS",
    "AttentionSite",
    "Conv1DSlice",
    "LinearProjection",
    "ModelAdapter",
    "Projection",
    "adapter_for",
    "attention_sites",
    "pruned_projections",
    "pruned_site_specs",
    "supported_families",
]


def supported_families() -> str:
    """Human-readable list of supported families and their config ``model_type`` values."""
    return "; ".join(f"{a.examples} (model_type {', '.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for a transformers model, by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(
        f"clover has no adapter for model_type {model_type!r}. Supported: {supported_families()}. "
        "Adding a family means one adapter file in clover/adapters/."
    )


def attention_sites(model: nn.Module, *, allow_pruned: bool = False, uniform: bool = False) -> list[AttentionSite]:
    """All attention sites of a model, in module order; raises if the model has none we recognise.

    A model pruned by clover is refused unless ``allow_pruned`` (fine-tuning heals pruned models; decomposing
    or pruning again would need the original checkpoint); ``uniform`` then also refuses ragged pruned layers.
    """
    if pruned_site_specs(model):
        if allow_pruned:  # pruned sites, and any the pruning left as they were (e.g. Whisper's decoder)
            pruned = {site.name: site for site in pruned_attention_sites(model, uniform=uniform)}
            untouched = {site.name: site for site in adapter_for(model).attention_sites(model)}
            order = [name for name, _ in model.named_modules() if name in pruned or name in untouched]
            return [pruned.get(name) or untouched[name] for name in order]
        raise UnsupportedModelError(
            "this model is already pruned by clover; decompose or prune its original checkpoint instead "
            "(fine-tuning, e.g. healing with `clover finetune DIR --task wikitext`, does accept it)"
        )
    sites = adapter_for(model).attention_sites(model)
    if not sites:
        raise UnsupportedModelError(f"found no attention blocks in {type(model).__name__}")
    return sites
