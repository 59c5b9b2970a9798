"""OPT: separate q/k/v/out_proj with biases, MHA, learned positions (offset 2) added at the input.

OPT multiplies the q_proj output (bias included) by head_dim^-0.5 and attends with scale 1; that is the same
function as attending with that scale, so the site's ``scaling`` carries it and Q-K stays exact. Both K and V
caches shrink.
"""

from __future__ import annotations

from torch import nn

from .base import AttentionSite, Family
from .gpt2 import CloverSelfAttention


class OPT(Family):
    name = "opt"
    model_types = ("opt",)
    examples = "OPT"
    output = "out_proj"
    pruned_attention = CloverSelfAttention

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in self.attention_modules(model, "out_proj", "q_proj"):
            sites.append(
                self.site(
                    name=name,
                    stack="decoder",
                    layer_index=module.layer_idx,
                    module=module,
                    **self.separate_projections(module),
                    scaling=module.scaling,
                    dropout=float(module.dropout),
                    is_causal=True,
                    num_heads=module.num_heads,
                    num_kv_heads=module.num_heads,
                    head_dim=module.head_dim,
                )
            )
        return sites
