"""DeepSeek-V2 / V3: multi-head latent attention (MLA) with decoupled RoPE.

Per head h, queries are [q_nope_h | q_pe_h] from ``q_proj`` (or ``q_b_proj`` after ``q_a_proj`` and
``q_a_layernorm`` when q_lora_rank is set). Keys and values come from one normed latent c (``kv_a_proj_with_mqa``,
then ``kv_a_layernorm``): ``kv_b_proj`` maps c to [k_nope_h | v_h] per head, and one roped k_pe shared by every
head (also from ``kv_a_proj_with_mqa``) completes the keys. Scores are q_nope_h·k_nope_h + q_pe_h·k_pe.

The site is the no-RoPE part: Q = the nope columns of every head of the Q projection, K and V = the k_nope and
v rows of ``kv_b_proj``, O = ``o_proj``, H heads (MLA expands the latent to H heads, so H KV heads). The RoPE
term comes from projections outside the site and is only added to the scores, like an additive position bias,
so the site's Q-K product is exact per head and so is V-O: both factor and prune exactly.

Cache: transformers caches the normed latent (B, 1, T, kv_lora_rank) and the roped k_pe (B, 1, T, rope), shared
by all heads; the pruned attention caches the same. So per-head pruning shrinks weights and compute, never the
cache: only cutting the latent rank does (``cut_latent_rank``, approximate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import CloverError, UnsupportedModelError
from ..modeling_clover import HeadLayout, PrunedAttention
from .base import AttentionSite, Family, HeadColumns, LatentCut, LinearProjection, is_pruned_attention


class CloverDeepseekAttention(PrunedAttention):
    """MLA with pruned nope Q-K dims and V-O dims per head; the RoPE dims and the latent cache are kept whole.

    ``q_proj`` / ``k_proj`` / ``v_proj`` hold the kept nope-Q, nope-K and V dims (K and V read the normed
    latent); ``q_rope_proj`` holds only the RoPE columns of the original Q projection. Attention runs on
    per-head [q_pe | q_nope kept] against [k_pe | k_nope kept], whose dot products are exactly the MLA scores.
    """

    def __init__(self, spec: dict, layer_idx: int | None):
        super().__init__(spec, layer_idx)
        mla = spec["mla"]
        heads, rope = spec["num_heads"], mla["rope_dim"]
        self.q_rope_proj = nn.Linear(spec["d_q"], heads * rope, bias=False)
        # the scores' layout: each head's Q-K block is [its rope dims | its kept nope dims]
        self.score_layout = HeadLayout(
            heads, heads, [d + rope for d in spec["qk_dims"]], spec["vo_dims"], rotary_dims=rope
        )
        self.__dict__["_awaiting_q_source"] = True

    def __setattr__(self, name, value):
        # install_pruned_attention hands the original Q projection over as a kept submodule, right after __init__;
        # of it only the RoPE columns are needed, so they are copied into q_rope_proj (trained weights when pruning,
        # fresh ones when reloading, which the checkpoint's q_rope_proj then overwrites) and the rest is dropped.
        # Once only: later assignments to that name (a fine-tuning wrapper of the packed q_proj) are plain ones.
        if self.__dict__.get("_awaiting_q_source") and name == self.spec["mla"]["q_source"]:
            self.__dict__["_awaiting_q_source"] = False
            nope, rope = self.spec["head_dim"], self.spec["mla"]["rope_dim"]
            weight = value.weight.detach().unflatten(0, (self.spec["num_heads"], nope + rope))[:, nope:]
            self.q_rope_proj.weight = nn.Parameter(weight.flatten(0, 1).clone(), value.weight.requires_grad)
            return
        super().__setattr__(name, value)

    def rotate(self, q_pe, k_pe, position_embeddings):
        """(B, H, L, rope) queries and (B, 1, L, rope) keys, roped the way the checkpoint's model does it."""
        style = self.spec["mla"]["rope_style"]
        if style == "complex":  # DeepSeek-V2: adjacent pairs as complex numbers, position_embeddings = freqs_cis
            from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

            return apply_rotary_emb(q_pe, k_pe, position_embeddings.to(q_pe.device))
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

        cos, sin = position_embeddings
        rotate = v3.apply_rotary_pos_emb_interleave if style == "interleave" else v3.apply_rotary_pos_emb
        return rotate(q_pe, k_pe, cos, sin)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """Packed kept nope dims (..., Σ d_h) -> what ``join_rotary`` takes beside the rope dims."""
        layout = self.score_layout
        if layout.uniform:
            return x.unflatten(-1, (self.spec["num_heads"], layout.buckets[0][0] - layout.rotary_dims))
        return x

    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        batch, length, _ = hidden_states.shape
        mla, heads, layout = self.spec["mla"], self.spec["num_heads"], self.score_layout
        rank, rope = mla["kv_lora_rank"], mla["rope_dim"]
        q_in = hidden_states if mla["q_lora_rank"] is None else self.q_a_layernorm(self.q_a_proj(hidden_states))
        q_pe = self.q_rope_proj(q_in).view(batch, length, heads, rope).transpose(1, 2)  # (B, H, L, rope)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([rank, rope], dim=-1)
        latent = self.kv_a_layernorm(latent).view(batch, 1, length, rank)
        q_pe, k_pe = self.rotate(q_pe, k_pe.view(batch, 1, length, rope), position_embeddings)
        if cache is not None:  # as transformers' MLA: the normed latent and the shared roped k_pe
            latent, k_pe = cache.update(latent, k_pe, self.layer_idx, kwargs=kwargs)
        kv_len = latent.shape[2]
        latent = latent[:, 0]  # (B, T, rank)
        query = layout.join_rotary(q_pe.transpose(1, 2), self._heads(self.q_proj(q_in)), "q")
        k_pe = k_pe[:, 0, :, None].expand(batch, kv_len, heads, rope)
        key = layout.cache_entry(layout.join_rotary(k_pe, self._heads(self.k_proj(latent)), "k"), "k")
        value = layout.cache_entry(self.v_proj(latent), "v")
        out, weights = self._attend(query, key, value, attention_mask, layout=layout)
        return self.o_proj(out), weights


class Deepseek(Family):
    name = "deepseek"
    model_types = ("deepseek_v2", "deepseek_v3")
    examples = "DeepSeek-V2, DeepSeek-V2-Lite, DeepSeek-V3"
    # the decoupled RoPE term q_pe·k_pe comes from projections outside the site and is added to its scores
    positional = "bias"
    pruned_attention = CloverDeepseekAttention
    per_head_cache = False
    caches = "nothing (the MLA latent and k_pe, shared by all heads; `--latent-rank` shrinks the latent)"

    def cut_latent(self, model: nn.Module, rank: int, calibrate: Callable[[nn.Module], None]) -> LatentCut:
        config = model.config
        per_layer_before = config.kv_lora_rank + config.qk_rope_head_dim  # the latent and the one shared k_pe
        energy = cut_latent_rank(model, rank, calibrate)
        return LatentCut(energy, len(energy) * per_layer_before, len(energy) * (rank + config.qk_rope_head_dim))

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for name, module in self.attention_modules(model, "kv_b_proj"):
            heads, nope, rope = module.num_heads, module.qk_nope_head_dim, module.qk_rope_head_dim
            if nope != module.v_head_dim:
                raise UnsupportedModelError(
                    f"{name}: qk_nope_head_dim {nope} differs from v_head_dim {module.v_head_dim}; clover's sites "
                    "have one head width for Q-K and V-O, so this DeepSeek variant is not supported"
                )
            q_source = "q_proj" if module.q_lora_rank is None else "q_b_proj"
            q_inner = LinearProjection(getattr(module, q_source))
            kv = LinearProjection(module.kv_b_proj)
            kept = ["kv_a_proj_with_mqa", "kv_a_layernorm", q_source]  # q_source: its RoPE columns only
            if module.q_lora_rank is not None:
                kept += ["q_a_proj", "q_a_layernorm"]
            rope_style = "complex"
            if module.config.model_type != "deepseek_v2":
                rope_style = "interleave" if module.config.rope_interleave else "half"
            mla = {
                "q_source": q_source,
                "q_lora_rank": module.q_lora_rank,
                "kv_lora_rank": module.kv_lora_rank,
                "rope_dim": rope,
                "rope_style": rope_style,
            }
            sites.append(
                self.site(
                    name=name,
                    stack="decoder",
                    layer_index=module.layer_idx,
                    module=module,
                    q=HeadColumns(q_inner, heads, nope + rope, 0, nope),
                    k=HeadColumns(kv, heads, nope + nope, 0, nope),
                    v=HeadColumns(kv, heads, nope + nope, nope, nope + nope),
                    o=LinearProjection(module.o_proj),
                    scaling=module.scaling,  # (nope + rope)^-0.5, times yarn's mscale² where set
                    dropout=float(module.attention_dropout),
                    is_causal=True,
                    num_heads=heads,
                    num_kv_heads=heads,
                    head_dim=nope,
                    q_reads_kv_input=False,  # Q reads the hidden state (or q-LoRA), K and V the latent
                    extra={"kept": kept, "mla": mla},
                )
            )
        return sites


@torch.no_grad()
def cut_latent_rank(model: nn.Module, rank: int, calibrate: Callable[[nn.Module], None]) -> dict[str, float]:
    """Shrink every MLA layer's KV latent (and so its cache) to ``rank`` dims; returns each layer's kept energy.

    Per layer: fold ``kv_a_layernorm``'s weight into ``kv_b_proj``, rotate the latent onto the principal axes
    of its normed values on the calibration inputs (exact: RMSNorm commutes with rotations), then drop the
    trailing axes. Dropping is approximate: the norm then measures the kept dims only, which a constant
    (from the calibration energy) offsets on average but not token by token. The result is a stock DeepSeek
    model with ``kv_lora_rank = rank``. Run it before pruning (it needs the original attention modules).
    """
    attentions = {n: m for n, m in model.named_modules() if hasattr(m, "kv_b_proj") and not is_pruned_attention(m)}
    if not attentions or getattr(model.config, "clover", None):
        raise CloverError("cut_latent_rank needs an unpruned DeepSeek-V2/V3 model (cut the latent before pruning)")
    full = model.config.kv_lora_rank
    if not 0 < rank <= full:
        raise CloverError(f"latent rank must be in 1..{full} (the model's kv_lora_rank), got {rank}")
    moments: dict[str, list] = {}

    def hook(name: str):
        def collect(norm, args):
            x = args[0].detach().double()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)  # the norm, without γ
            x = x.reshape(-1, x.shape[-1])
            entry = moments.setdefault(name, [0.0, 0])
            entry[0] = entry[0] + x.T @ x
            entry[1] += x.shape[0]

        return collect

    handles = [m.kv_a_layernorm.register_forward_pre_hook(hook(n)) for n, m in attentions.items()]
    try:
        calibrate(model)
    finally:
        for handle in handles:
            handle.remove()
    energy = {}
    for name, attention in attentions.items():
        if name not in moments:
            raise CloverError(f"calibration never reached {name}; check the calibration data")
        norm, down, up = attention.kv_a_layernorm, attention.kv_a_proj_with_mqa, attention.kv_b_proj
        gram, count = moments[name]
        moment, gamma = gram / count, norm.weight.double()
        # principal axes of what kv_b_proj reads (γ ⊙ normed latent), so that γ's weighting counts
        eigenvalues, axes = torch.linalg.eigh(gamma[:, None] * moment * gamma)
        order = eigenvalues.argsort(descending=True)
        eigenvalues, rotation = eigenvalues[order], axes[:, order[:rank]]  # (full, rank) orthonormal columns
        energy[name] = float(eigenvalues[:rank].sum() / eigenvalues.sum())
        # rms over the kept dims is sqrt(full / rank · their share of Σ x̂²) of the rms over all, on average;
        # keeping every dim is a pure rotation, which needs no correction
        scale = float((torch.trace(rotation.T @ moment @ rotation) / rank).sqrt()) if rank < full else 1.0
        latent_rows = down.weight[:full].double()
        new_down = torch.cat([rotation.T @ latent_rows, down.weight[full:].double()])
        new_up = up.weight.double() * gamma @ rotation * scale
        dtype, device = down.weight.dtype, down.weight.device
        down.weight = nn.Parameter(new_down.to(dtype), down.weight.requires_grad)
        down.out_features = rank + (down.out_features - full)
        if down.bias is not None:
            bias = torch.cat([rotation.T @ down.bias[:full].double(), down.bias[full:].double()])
            down.bias = nn.Parameter(bias.to(dtype), down.bias.requires_grad)
        up.weight = nn.Parameter(new_up.to(dtype), up.weight.requires_grad)
        up.in_features = rank
        norm.weight = nn.Parameter(torch.ones(rank, dtype=norm.weight.dtype, device=device), norm.weight.requires_grad)
        attention.kv_lora_rank = rank
    model.config.kv_lora_rank = rank
    return energy
