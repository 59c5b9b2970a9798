"""Model families: one file each, found here by discovery, so adding a family is one file (and one test row)."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import (
    AttentionSite,
    Conv1DSlice,
    Family,
    HeadColumns,
    LinearProjection,
    LinearSlice,
    Projection,
    is_pruned_attention,
)
from .pruned import pruned_attention_sites, pruned_projections, pruned_site_specs, upgrade_pruned_specs
from .registry import FAMILIES, checkpoint_family, family_for, family_of_type, supported_families

__all__ = [
    "FAMILIES",
    "AttentionSite",
    "Conv1DSlice",
    "Family",
    "HeadColumns",
    "LinearProjection",
    "LinearSlice",
    "Projection",
    "attention_sites",
    "checkpoint_family",
    "family_for",
    "family_of_type",
    "is_pruned_attention",
    "pruned_attention_sites",
    "pruned_projections",
    "pruned_site_specs",
    "supported_families",
    "upgrade_pruned_specs",
]


def attention_sites(model: nn.Module, *, allow_pruned: bool = False, uniform: bool = False) -> list[AttentionSite]:
    """All attention sites of a model, in module order; raises if the model has none we recognise.

    A model pruned by clover is refused unless ``allow_pruned`` (fine-tuning heals pruned models; decomposing
    or pruning again would need the original checkpoint); ``uniform`` then also refuses ragged pruned layers.
    """
    if pruned_site_specs(model):
        if allow_pruned:  # pruned sites, and any the pruning left as they were (e.g. Whisper's decoder)
            pruned = {site.name: site for site in pruned_attention_sites(model, uniform=uniform)}
            untouched = {site.name: site for site in family_for(model).attention_sites(model)}
            order = [name for name, _ in model.named_modules() if name in pruned or name in untouched]
            return [pruned.get(name) or untouched[name] for name in order]
        raise UnsupportedModelError(
            "this model is already pruned by clover; decompose or prune its original checkpoint instead "
            "(fine-tuning, e.g. healing with `clover finetune DIR --task wikitext`, does accept it)"
        )
    sites = family_for(model).attention_sites(model)
    if not sites:
        raise UnsupportedModelError(f"found no attention blocks in {type(model).__name__}")
    return sites
