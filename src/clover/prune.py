"""Training-free pruning of attention dims by singular value (CLOVER), calibrated CLOVER, or the vanilla baseline.

Two passes, one attention site at a time, so the model is never held twice:
1. score every (site, KV group, dim): singular values of the (whitened) factorization, or the vanilla
   importance ‖q_i‖·‖k_i‖ / ‖v_i‖·‖o_i‖ of the original weights ("vanilla-activation": the RMS of the
   q_i, k_i, v_i activations on the calibration inputs in place of the weight-column norms, the authors'
   other baseline; O's input has no moments collected, so ‖o_i‖ stays a weight norm);
2. allocate how many dims each KV group keeps (uniform, per layer, global, or by threshold), then rebuild each
   site with only its kept dims and swap in a pruned attention module whose cache holds only those dims.

Scores of different layers are compared as they are (raw singular values, the paper's protocol): every Q-K
σ is in units of attention logits per unit of (normalised) input, every V-O σ in units of the residual
stream, so a threshold means the same thing in every layer. Calibrated scores are singular values of
L_aᵀ W L_b, i.e. the RMS size of each direction's contribution on the calibration inputs, which is the right
common currency when ranking dims across layers.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .decompose import check_finite
from .errors import CloverError
from .factorize import (
    factorize_qk,
    factorize_vo,
    fold_value_bias,
    split_heads,
    split_output_heads,
    whiten,
    whitening_factor,
)
from .families import AttentionSite, HeadColumns, Projection, attention_sites, family_for, pruned_projections
from .modeling_clover import CONFIG_KEY, FORMAT_VERSION, install_pruned_attention

METHODS = ("clover", "calibrated", "vanilla", "vanilla-activation")
VANILLA = ("vanilla", "vanilla-activation")  # original weights, dims dropped without any rotation
CALIBRATED = ("calibrated", "vanilla-activation")  # methods that read the inputs' second moments
ALLOCATIONS = ("uniform", "layer", "global")


@dataclass
class PruneConfig:
    """What to remove. Ratios are shares of all Q-K (or V-O) dims of the model, counted per KV group; under
    partial RoPE the Q-K share counts only the pass-through dims (the rotary dims are never pruned)."""

    qk_ratio: float = 0.0
    vo_ratio: float = 0.0
    qk_threshold: float | None = None  # remove every dim with σ ≤ threshold (the paper's Whisper criterion)
    vo_threshold: float | None = None
    method: str = "clover"
    allocation: str = "uniform"
    min_dims: int = 1  # per KV group and pair: no head is emptied unless the user sets 0
    ridge: float = 1e-4  # calibrated: relative ridge added to each input second moment before Cholesky
    stacks: tuple[str, ...] | None = None  # only these attention stacks (AttentionSite.stack names); None = all
    # one pair in fewer stacks than the other, e.g. Q-K in Mllama's vision encoder (exact there) and V-O everywhere;
    # None: ``stacks``
    qk_stacks: tuple[str, ...] | None = None
    vo_stacks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for option in ("stacks", "qk_stacks", "vo_stacks"):  # one stack named alone, as CloverConfig's targets
            if isinstance(getattr(self, option), str):
                setattr(self, option, (getattr(self, option),))
        for name in ("qk_ratio", "vo_ratio", "qk_threshold", "vo_threshold", "ridge", "min_dims"):
            value = getattr(self, name)
            if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a numpy or torch scalar (a sweep's)
                setattr(self, name, value.item())

    def validate(self) -> None:
        def number(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        for name in ("qk_ratio", "vo_ratio", "qk_threshold", "vo_threshold", "ridge", "min_dims"):
            value = getattr(self, name)
            optional = name.endswith("threshold") and value is None
            if not (optional or number(value)) or (name == "min_dims" and not isinstance(value, int)):
                kind = "a whole number" if name == "min_dims" else "a number"
                raise CloverError(f"{name.replace('_', ' ')} must be {kind}, got {value!r} ({type(value).__name__})")
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise CloverError(f"ridge must be a finite number ≥ 0 (relative, e.g. 1e-4), got {self.ridge}")
        if self.method not in METHODS:
            raise CloverError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise CloverError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        for name in ("qk_ratio", "vo_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value < 1.0):
                raise CloverError(f"{name.replace('_', ' ')} must be in [0, 1) (share of dims removed), got {value}")
        for name in ("qk_threshold", "vo_threshold"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise CloverError(f"{name.replace('_', ' ')} must be a finite singular value ≥ 0, got {value}")
        if (self.qk_threshold is not None and self.qk_ratio) or (self.vo_threshold is not None and self.vo_ratio):
            raise CloverError("give either a ratio or a threshold for each pair, not both")
        if self.min_dims < 0:
            raise CloverError(f"min dims must be ≥ 0, got {self.min_dims}")
        for option in ("stacks", "qk_stacks", "vo_stacks"):
            if getattr(self, option) is not None and len(getattr(self, option)) == 0:
                raise CloverError(f"{option} is empty: name at least one stack, or None for every stack")
        for pair, label in (("qk", "Q-K"), ("vo", "V-O")):
            own = getattr(self, f"{pair}_stacks")
            if own is not None and not self.prunes(pair):
                raise CloverError(f"--{pair}-stacks given but {label} is not pruned: add --{pair}-ratio or a threshold")
            if own is not None and self.stacks is not None and (outside := set(own) - set(self.stacks)):
                raise CloverError(
                    f"--{pair}-stacks {','.join(sorted(outside))}: not among --stacks {','.join(self.stacks)} (the "
                    "stacks pruned at all); drop --stacks or add them to it"
                )

    def prunes(self, pair: str) -> bool:
        return getattr(self, f"{pair}_ratio") > 0 or getattr(self, f"{pair}_threshold") is not None

    def prunes_in(self, pair: str, stack: str) -> bool:
        """Whether ``pair`` is pruned in attention stack ``stack``."""
        chosen = getattr(self, f"{pair}_stacks")
        chosen = self.stacks if chosen is None else chosen
        return self.prunes(pair) and (chosen is None or stack in chosen)


# ----------------------------------------------------------------------------------------------- allocation


def allocate_dims(
    scores: list[Tensor],
    *,
    allocation: str,
    ratio: float = 0.0,
    threshold: float | None = None,
    min_dims: int = 1,
) -> list[Tensor]:
    """Dims kept per KV group, for each site's (groups, d_h) score tensor; larger score = more important.

    ``uniform``: the same count everywhere (the same share of each site's head dim where head dims differ, as
    between Mllama's vision and text stacks). ``layer``: one count per site, removing whichever site's next
    trailing dims cost the least total squared score. ``global``: one cut over every (group, dim) of the
    model. A threshold removes every dim whose score is ≤ it. ``min_dims`` dims per group always survive.
    """
    ordered = [s.sort(dim=-1, descending=True).values for s in scores]
    head_dims = {s.shape[-1] for s in ordered}
    total = sum(s.numel() for s in ordered)
    floor = [min(min_dims, s.shape[-1]) for s in ordered]
    if threshold is not None:
        return [torch.maximum((s > threshold).sum(-1), torch.full_like(s[:, 0], f, dtype=torch.long)) for s, f in
                zip(ordered, floor, strict=True)]  # fmt: skip
    to_remove = round(ratio * total)
    if allocation == "uniform":
        keep = {d: max(d - round(ratio * d), min(min_dims, d)) for d in head_dims}
        return [torch.full((s.shape[0],), keep[s.shape[-1]], dtype=torch.long) for s in ordered]
    if allocation == "layer":
        # cost of dropping trailing dim t of site s (all its groups at once): Σ_groups σ², increasing in t
        candidates = []
        for index, s in enumerate(ordered):
            costs = (s**2).sum(0)
            for t in range(s.shape[-1] - 1, floor[index] - 1, -1):
                candidates.append((float(costs[t]), index, s.shape[0]))
        candidates.sort(key=lambda c: c[0])
        keep = [s.shape[-1] for s in ordered]
        removed = 0
        for _, index, groups in candidates:
            if removed >= to_remove:
                break
            keep[index] -= 1
            removed += groups
        _check_reachable(removed, to_remove, total)
        return [torch.full((s.shape[0],), k, dtype=torch.long) for s, k in zip(ordered, keep, strict=True)]
    # global: lowest scores over all groups and layers, beyond each group's floor
    pool = torch.cat([s[:, f:].reshape(-1) for s, f in zip(ordered, floor, strict=True)])
    _check_reachable(pool.numel(), to_remove, total)
    if to_remove == 0:
        return [torch.full((s.shape[0],), s.shape[-1], dtype=torch.long) for s in ordered]
    cut = pool.kthvalue(to_remove).values
    keep, removed = [], 0
    for s, f in zip(ordered, floor, strict=True):
        k = torch.maximum((s > cut).sum(-1), torch.full_like(s[:, 0], f, dtype=torch.long))
        keep.append(k)
        removed += int((s.shape[-1] - k).sum())
    # ties at the cut: give back (or take) dims in order so that exactly `to_remove` go
    surplus = removed - to_remove
    for k, s, f in zip(keep, ordered, floor, strict=True):
        for g in range(s.shape[0]):
            while surplus > 0 and k[g] < s.shape[-1] and s[g, k[g]] == cut:
                k[g] += 1
                surplus -= 1
            while surplus < 0 and k[g] > f and s[g, k[g] - 1] == cut:
                k[g] -= 1
                surplus += 1
    return keep


def _check_reachable(available: int, wanted: int, total: int) -> None:
    if available < wanted:
        raise CloverError(
            f"cannot remove {wanted} of {total} dims while keeping the per-group floor; "
            "lower the ratio or pass --min-dims 0"
        )


# ----------------------------------------------------------------------------------------------- calibration


class _StoredMoment:
    """One input's [Σ xᵀx, Σ x, count] in a file written by ``InputMoments.save``, read each time it is used."""

    def __init__(self, path: pathlib.Path, name: str, device: torch.device | str, keep: object = None):
        self.path, self.name, self.device = path, name, device
        self.keep = keep  # whatever holds the file in place while it is read

    def on(self, device: torch.device | str) -> _StoredMoment:
        return _StoredMoment(self.path, self.name, device, self.keep)

    def _read(self) -> list:
        with safetensors.safe_open(str(self.path), framework="pt", device=str(self.device)) as f:
            count = int(f.get_tensor(f"{self.name}|count")[0])
            if not count:
                return [None, None, 0]
            return [f.get_tensor(f"{self.name}|gram"), f.get_tensor(f"{self.name}|sum"), count]

    def __iter__(self) -> Iterator:
        return iter(self._read())

    def __getitem__(self, index):
        return self._read()[index]


def _refuse_non_finite(gram: Tensor, total: Tensor, site_name: str) -> None:
    if not (torch.isfinite(gram).all() and torch.isfinite(total).all()):
        raise CloverError(
            f"the calibration inputs of {site_name} are not finite (NaN or inf): a weight before it is not finite, "
            "or the activations overflow in this dtype; check the checkpoint, or calibrate in float32 (--dtype float32)"
        )


class InputMoments:
    """E[xᵀx], Σx and counts of the inputs that feed each site's Q side ("q") and K/V side ("k")."""

    def __init__(self, stats: dict[str, list]):
        self.stats = stats  # "<site name>|q" / "<site name>|k" -> [Σ xᵀx, Σ x, count]

    @classmethod
    def collect(cls, model: nn.Module, calibrate: Callable[[nn.Module], None]) -> InputMoments:
        """Run ``calibrate(model)`` once with forward pre-hooks on every site's projection inputs."""
        moments, handles = cls.watching(attention_sites(model))
        try:
            with torch.no_grad():
                calibrate(model)
        finally:
            for handle in handles:
                handle.remove()
        return moments

    @classmethod
    def watching(cls, sites: list[AttentionSite]) -> tuple[InputMoments, list]:
        """Moments that fill up while ``sites`` run, and the handles of the forward pre-hooks that fill them on
        the sites' projection inputs (remove them when done)."""
        per_module: dict[int, list] = {}
        keys: dict[str, int] = {}
        handles = []

        def watch(module: nn.Module) -> int:
            key = id(module)
            if key not in per_module:
                per_module[key] = [None, None, 0]

                def hook(_module, args, _entry=per_module[key]):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    gram, total = (x.T @ x).double(), x.sum(0).double()
                    _entry[0] = gram if _entry[0] is None else _entry[0] + gram
                    _entry[1] = total if _entry[1] is None else _entry[1] + total
                    _entry[2] += x.shape[0]

                handles.append(module.register_forward_pre_hook(hook))
            return key

        for site in sites:
            keys[f"{site.name}|k"] = watch(site.k.input_module)
            # self-attention: Q reads the very same input as K/V, so one moment serves both
            shared = site.q_reads_kv_input
            keys[f"{site.name}|q"] = keys[f"{site.name}|k"] if shared else watch(site.q.input_module)
        return cls({name: per_module[key] for name, key in keys.items()}), handles

    def to(self, device: torch.device | str) -> InputMoments:
        """The same moments on ``device`` (where the weights they whiten are); entries shared stay shared."""
        moved: dict[int, Any] = {}
        for entry in self.stats.values():
            if id(entry) not in moved:
                moved[id(entry)] = (
                    entry.on(device)
                    if isinstance(entry, _StoredMoment)
                    else [None if t is None else t.to(device) for t in entry[:2]] + [entry[2]]
                )
        return InputMoments({name: moved[id(entry)] for name, entry in self.stats.items()})

    def save(self, path: str | os.PathLike) -> None:
        """Write the moments as safetensors (float64; an entry shared by Q and K/V is stored once)."""
        tensors, aliases, seen = {}, {}, {}
        for name, entry in self.stats.items():
            if id(entry) in seen:
                aliases[name] = seen[id(entry)]
                continue
            seen[id(entry)] = name
            if entry[2]:
                tensors[f"{name}|gram"] = entry[0].contiguous().cpu()
                tensors[f"{name}|sum"] = entry[1].contiguous().cpu()
            tensors[f"{name}|count"] = torch.tensor([entry[2]], dtype=torch.int64)
        safetensors.torch.save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu", *, lazy: bool = False) -> InputMoments:
        """Read moments written by ``save`` onto ``device`` (the device of the weights they will whiten).
        ``lazy``: each site's moments are read from the file when they are used, not now (at Llama-2-7B width
        a model's d×d float64 moments are 4 GB): the file must stay until the moments are no longer used."""
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if "aliases" not in metadata:
                raise ValueError(f"{path} was not written by InputMoments.save")
            aliases = json.loads(metadata["aliases"])
            names = {key.rsplit("|", 1)[0] for key in f.keys()}
            stats = {}
            for name in names:
                if lazy:
                    stats[name] = _StoredMoment(pathlib.Path(path), name, device)
                    continue
                count = int(f.get_tensor(f"{name}|count")[0])
                gram = f.get_tensor(f"{name}|gram") if count else None
                total = f.get_tensor(f"{name}|sum") if count else None
                stats[name] = [gram, total, count]
        stats.update({name: stats[target] for name, target in aliases.items()})
        return cls(stats)

    def refuse_non_finite(self) -> None:
        """One CloverError naming the first site whose calibration inputs held NaN or inf: nothing can be whitened
        by them, and they are not worth caching."""
        for name, (gram, total, count) in self.stats.items():
            if count:
                _refuse_non_finite(gram, total, name.rpartition("|")[0])

    def whitening(self, site: AttentionSite, side: str, augmented: bool, ridge: float) -> Tensor:
        """Cholesky factor of the input second moment of Q's (side 'q') or K/V's (side 'k') projection."""
        gram, total, count = self.stats.get(f"{site.name}|{side}", (None, None, 0))
        if not count:
            raise CloverError(f"calibration never reached {site.name}; check the calibration data")
        _refuse_non_finite(gram, total, site.name)
        moment = gram / count
        if augmented:  # input [x, 1]: the bias row sees the mean and a constant 1
            mean = (total / count).unsqueeze(0)
            moment = torch.cat(
                [
                    torch.cat([moment, mean.T], 1),
                    torch.cat([mean, torch.ones(1, 1, dtype=moment.dtype, device=moment.device)], 1),
                ],
                0,
            )
        return whitening_factor(moment, ridge=ridge)


# ----------------------------------------------------------------------------------------------- per site


@dataclass
class _PairHeads:
    """One pair after (optional) rotation: per-head factors in math layout, and a score per KV-group dim."""

    left: Tensor  # (G, m, d_h): K heads (Q-K) or V heads (V-O), bias row last where augmented
    right: Tensor  # (H, n, d_h): Q heads (Q-K) or O heads transposed (V-O)
    scores: Tensor  # (G, d_h)
    left_bias: bool
    right_bias: bool
    extra: dict = field(default_factory=dict)


def _vanilla_scores(left: Tensor, right: Tensor, groups: int) -> Tensor:
    stacked = right.reshape(groups, -1, right.shape[-1])
    return left.norm(dim=1) * stacked.norm(dim=1)


def _site_pair(
    site: AttentionSite, pair: str, config: PruneConfig, moments: InputMoments | None, compute_dtype: torch.dtype
) -> _PairHeads:
    heads = {"num_heads": site.num_heads, "num_kv_heads": site.num_kv_heads, "compute_dtype": compute_dtype}
    if pair == "qk":
        q_part, k_part, _ = site.qk_pair()  # partial RoPE: the pass-through dims, scored and kept on their own
        (w_q, b_q), (w_k, b_k) = q_part.read(), k_part.read()
        if config.method in VANILLA:
            left = split_heads(w_k.to(compute_dtype), _opt(b_k, compute_dtype), site.num_kv_heads)
            right = split_heads(w_q.to(compute_dtype), _opt(b_q, compute_dtype), site.num_heads)
            scored_left, scored_right = left, right
            if config.method == "vanilla-activation":  # ‖L_kᵀ k_i‖ = RMS of activation k_i on the calibration inputs
                scored_left = whiten(left, moments.whitening(site, "k", b_k is not None, config.ridge))
                scored_right = whiten(right, moments.whitening(site, "q", b_q is not None, config.ridge))
            scores = _vanilla_scores(scored_left, scored_right, site.num_kv_heads)
            return _PairHeads(left, right, scores, b_k is not None, b_q is not None)
        whitening = {}
        if config.method == "calibrated":
            whitening = {
                "q_whitening": moments.whitening(site, "q", b_q is not None, config.ridge),
                "k_whitening": moments.whitening(site, "k", b_k is not None, config.ridge),
            }
        f = factorize_qk(w_q, w_k, b_q, b_k, **heads, **whitening)
        left = split_heads(f.w_k, f.b_k, site.num_kv_heads)
        right = split_heads(f.w_q, f.b_q, site.num_heads)
        return _PairHeads(left, right, f.singular_values, b_k is not None, b_q is not None)
    (w_v, b_v), (w_o, b_o) = site.v.read(), site.o.read()
    folded = b_v is not None and b_o is not None
    if config.method in VANILLA:
        w_v, w_o = w_v.to(compute_dtype), w_o.to(compute_dtype)
        new_b_o = _opt(b_o, compute_dtype)
        if folded:
            new_b_o = fold_value_bias(w_o, b_v.to(compute_dtype), new_b_o, num_heads=site.num_heads,
                                      num_kv_heads=site.num_kv_heads)  # fmt: skip
        left = split_heads(w_v, None if folded else _opt(b_v, compute_dtype), site.num_kv_heads)
        right = split_output_heads(w_o, site.num_heads)
        scored_left = left
        if config.method == "vanilla-activation":
            scored_left = whiten(left, moments.whitening(site, "k", b_v is not None and not folded, config.ridge))
        scores = _vanilla_scores(scored_left, right, site.num_kv_heads)
        return _PairHeads(left, right, scores, b_v is not None and not folded, False, {"b_o": new_b_o})
    whitening = {}
    if config.method == "calibrated":
        whitening = {"v_whitening": moments.whitening(site, "k", b_v is not None and not folded, config.ridge)}
    f = factorize_vo(w_v, w_o, b_v, b_o, **heads, **whitening)
    left = split_heads(f.w_v, None if folded else f.b_v, site.num_kv_heads)
    right = split_output_heads(f.w_o, site.num_heads)
    return _PairHeads(left, right, f.singular_values, b_v is not None and not folded, False, {"b_o": f.b_o})


def _opt(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _after_rotary(
    site: AttentionSite, projection: Projection, num_heads: int, kept: list[Tensor], dtype: torch.dtype
) -> list[Tensor]:
    """Each head's kept pass-through block (rows, k) behind its rotary dims (rows, r), taken unchanged."""
    weight, bias = HeadColumns(projection, num_heads, site.head_dim, 0, site.rotary_dims).read()
    rotary = split_heads(weight.to(dtype), _opt(bias, dtype), num_heads)
    return [torch.cat([rotary[h], block], dim=1) for h, block in enumerate(kept)]


def _kept_columns(pair: _PairHeads, keep: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Packed (left, right) with only the kept dims of each group, highest score first."""
    order = pair.scores.argsort(dim=-1, descending=True, stable=True)
    lefts, rights = [], []
    for j in range(pair.left.shape[0]):
        index = order[j, : int(keep[j])].sort().values
        lefts.append(pair.left[j][:, index])
        rights += [pair.right[h][:, index] for h in range(j * group, (j + 1) * group)]
    return lefts, rights


def _pack(heads: list[Tensor], has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """Per-head (rows, width_h) blocks -> packed math-layout weight (d_in, Σ width) and bias."""
    packed = torch.cat(heads, dim=1)
    return (packed[:-1], packed[-1]) if has_bias else (packed, None)


# ----------------------------------------------------------------------------------------------- entry point


@dataclass
class PruneReport:
    """What a pruning removed."""

    config: dict
    params_before: int
    params_after: int
    attention_params_before: int
    attention_params_after: int
    qk_removed: float  # share of Q-K dims removed (per KV group; under partial RoPE, of the pass-through dims)
    vo_removed: float
    kv_dims_per_token_before: int  # K + V dims self-attention caches per token, over every per-head cache
    kv_dims_per_token_after: int
    sites: dict
    # K + V dims cross-attention caches per source token (a Whisper frame, a T5 input token, an Mllama image tile
    # token), counted apart: they grow with the source, not with the tokens generated
    cross_kv_dims_per_source_token_before: int = 0
    cross_kv_dims_per_source_token_after: int = 0


def set_clover_record(model: nn.Module, record: dict) -> None:
    """Store ``record`` as the model's ``config.clover`` (what was done to it, and its source), which saving writes."""
    if hasattr(model, "register_to_config"):  # diffusers: a frozen config; only registered keys are saved
        model.register_to_config(**{CONFIG_KEY: record})
    else:
        setattr(model.config, CONFIG_KEY, record)


def check_prunable(model: nn.Module, config: PruneConfig, *, check_values: bool = True) -> list[AttentionSite]:
    """The sites ``config`` prunes; raises CloverError for bad options, RoPE Q-K requests, non-finite weights
    or an already pruned model. Cheap: call it before collecting calibration data. ``check_values=False``
    where the weights are not in memory yet (streaming: each unit is checked as it is read)."""
    return _prunable_sites(model, config, check_values)[0]


def _prunable_sites(
    model: nn.Module, config: PruneConfig, check_values: bool
) -> tuple[list[AttentionSite], list[AttentionSite]]:
    """``check_prunable``'s sites, and every attention site of the model (pruned or not)."""
    if not isinstance(config, PruneConfig):
        raise CloverError(f"config must be a clover.prune.PruneConfig, not {type(config).__name__}")
    config.validate()
    family = family_for(model)
    every_site = attention_sites(model)
    present = list(dict.fromkeys(s.stack for s in every_site))
    for option in ("stacks", "qk_stacks", "vo_stacks"):
        unknown = [name for name in getattr(config, option) or () if name not in present]
        if unknown:
            raise CloverError(
                f"--{option.replace('_', '-')} {','.join(unknown)}: {type(model).__name__} has no such attention "
                f"stack; its stacks are {', '.join(present)}"
            )
    sites = [s for s in every_site if config.prunes_in("qk", s.stack) or config.prunes_in("vo", s.stack)]
    # every dim of every head kept: a run that prunes nothing, silently. Heads of several widths (a UNet's 40, 80
    # and 160) are pruned where wider than --min-dims, so only the widest bounds it
    widths = sorted({s.head_dim for s in sites})
    if widths and config.min_dims >= widths[-1]:
        stated = f"head_dim {widths[0]}" if len(widths) == 1 else f"largest head_dim {widths[-1]}"
        raise CloverError(
            f"--min-dims {config.min_dims} keeps every dim of {type(model).__name__}'s heads ({stated}); "
            f"choose 0..{widths[-1] - 1}"
        )
    blocked = next((s for s in sites if s.qk_blocker and config.prunes_in("qk", s.stack)), None)
    if blocked is not None:
        # stacks where every site's Q-K is exact (Mllama's vision encoder): Q-K pruning restricted to them works
        exact = [name for name in present if not any(s.qk_blocker for s in every_site if s.stack == name)]
        elsewhere = (
            f" Q-K is exact in its {', '.join(exact)} stack: prune Q-K there with --qk-stacks {','.join(exact)} "
            "(V-O stays in the stacks --stacks / --vo-stacks choose)."
        )
        raise CloverError(
            f"Q-K pruning is refused for {family.examples}: {blocked.qk_blocker}, so there is no exact "
            "Q-K product to truncate. V-O pruning works there: use --vo-ratio (or --vo-threshold) only."
            + (elsewhere if exact else "")
        )
    if check_values:
        for site in sites:
            check_finite(site)
    return sites, every_site


class InMemory:
    """Where ``prune_`` finds the weights: all in memory, the model's own. ``clover.streaming`` supplies a
    reader that loads one layer at a time from disk and writes it out once rebuilt, with the same interface."""

    def __init__(self, model: nn.Module):
        family_for(model).fold_output_scales(model)  # exact; ranks O's dims by what reaches the residual stream

    def units(self, sites: list[AttentionSite], *, write: bool) -> Iterator[tuple[AbstractContextManager, list]]:
        """(context in which the sites' weights are readable, sites) pairs; ``write``: the sites get rebuilt."""
        yield nullcontext(), sites


def prune_(
    model: nn.Module,
    config: PruneConfig,
    *,
    calibrate: Callable[[nn.Module], None] | None = None,
    input_moments: InputMoments | None = None,
    compute_dtype: torch.dtype = torch.float64,
    progress: bool = False,
    weights: InMemory | None = None,
) -> PruneReport:
    """Prune ``model``'s attention in place and return what was removed.

    ``calibrate(model)`` runs forward passes over calibration inputs; ``method="calibrated"`` needs it, or
    ``input_moments`` collected once by ``InputMoments.collect`` (reusable across ratios of the same model).
    Raises CloverError, before touching the model, for bad options, RoPE Q-K requests, non-finite weights
    or an already pruned model.
    """
    # every site too: the KV report counts the caches of the stacks left as they are
    sites, every_site = _prunable_sites(model, config, check_values=weights is None)
    if config.method in CALIBRATED and calibrate is None and input_moments is None:
        raise CloverError(f"method {config.method!r} needs calibration data (a calibrate(model) callback)")
    weights = weights or InMemory(model)
    params_before = sum(p.numel() for p in model.parameters())
    attention_before = sum(p.numel() for s in sites for p in _site_params(s))

    moments = None
    if config.method in CALIBRATED:
        moments = input_moments or InputMoments.collect(model, calibrate)

    pairs = [p for p in ("qk", "vo") if config.prunes(p)]
    with torch.no_grad():
        scores = {p: [] for p in pairs}
        index = {p: {} for p in pairs}  # site name -> its position in scores[p]: the sites where p is pruned
        bar = tqdm(total=len(sites), desc="scoring dims", unit="attn", disable=not progress)
        for loaded, unit in weights.units(sites, write=False):
            with loaded:
                for site in unit:
                    for p in pairs:
                        if config.prunes_in(p, site.stack):
                            index[p][site.name] = len(scores[p])
                            scores[p].append(_site_pair(site, p, config, moments, compute_dtype).scores.float())
                    bar.update()
        bar.close()
        keep = {
            p: allocate_dims(scores[p], allocation=config.allocation, ratio=getattr(config, f"{p}_ratio"),
                             threshold=getattr(config, f"{p}_threshold"), min_dims=config.min_dims)
            for p in pairs
        }  # fmt: skip
        specs = {}
        bar = tqdm(total=len(sites), desc="pruning", unit="attn", disable=not progress)
        for loaded, unit in weights.units(sites, write=True):
            with loaded:
                for site in unit:
                    kept = {p: keep[p][index[p][site.name]] if site.name in index.get(p, {}) else None
                            for p in ("qk", "vo")}  # fmt: skip
                    specs[site.name] = _rebuild_site(model, site, config, moments, kept, compute_dtype)
                    bar.update()
        bar.close()

    # each pair's shares count the sites where it was pruned; Q-K's count the dims Q-K pruning can remove
    # (partial RoPE's rotary dims are neither total nor removed)
    qk_sites = [s for s in sites if config.prunes_in("qk", s.stack)]
    total_qk = sum(s.num_kv_heads * (s.head_dim - s.rotary_dims) for s in qk_sites)
    qk_dims = sum(sum(specs[s.name]["qk_dims"]) - s.num_kv_heads * s.rotary_dims for s in qk_sites)
    vo_sites = [s for s in sites if config.prunes_in("vo", s.stack)]
    total_vo = sum(s.num_kv_heads * s.head_dim for s in vo_sites)
    vo_dims = sum(sum(specs[s.name]["vo_dims"]) for s in vo_sites)
    # per-head caches only: an MLA cache holds a latent shared by all heads, which per-head pruning leaves as it is
    # of every site, pruned or not (a --stacks run leaves the others' caches as they were)
    cached = [s for s in every_site if s.cached and (s.family is None or s.family.per_head_cache)]

    def cached_dims(site: AttentionSite, after: bool) -> int:
        if after and site.name in specs:
            return sum(specs[site.name]["qk_dims"]) + sum(specs[site.name]["vo_dims"])
        return 2 * (site.original_cached_heads or site.num_kv_heads) * site.head_dim  # as the original caches

    def before_and_after(group: list[AttentionSite]) -> tuple[int, int]:
        return sum(cached_dims(s, False) for s in group), sum(cached_dims(s, True) for s in group)

    # self-attention caches grow with the tokens generated, cross-attention ones with the source
    kv_before, kv_after = before_and_after([s for s in cached if s.q_reads_kv_input])
    cross_before, cross_after = before_and_after([s for s in cached if not s.q_reads_kv_input])
    record = {
        "format": FORMAT_VERSION,
        "method": config.method,
        "allocation": config.allocation,
        "options": asdict(config),
        "sites": specs,
    }
    set_clover_record(model, record)
    attention_after = sum(
        p.numel()
        for name, spec in specs.items()
        for linear in pruned_projections(model.get_submodule(name), spec).values()
        for p in linear.parameters()
    )  # q, k, v, o as before pruning: kept submodules (QK-norms) are not attention projections
    return PruneReport(
        config=asdict(config),
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        attention_params_before=attention_before,
        attention_params_after=attention_after,
        qk_removed=1 - qk_dims / total_qk if total_qk else 0.0,
        vo_removed=1 - vo_dims / total_vo if total_vo else 0.0,
        kv_dims_per_token_before=kv_before,
        kv_dims_per_token_after=kv_after,
        sites={name: {"qk_dims": s["qk_dims"], "vo_dims": s["vo_dims"]} for name, s in specs.items()},
        cross_kv_dims_per_source_token_before=cross_before,
        cross_kv_dims_per_source_token_after=cross_after,
    )


def _site_params(site: AttentionSite) -> list[Tensor]:
    return [t for proj in (site.q, site.k, site.v, site.o) for t in proj.read() if t is not None]


def _rebuild_site(
    model: nn.Module,
    site: AttentionSite,
    config: PruneConfig,
    moments: InputMoments | None,
    kept: dict[str, Tensor | None],
    compute_dtype: torch.dtype,
) -> dict:
    """Swap one site for a pruned attention module holding only its kept dims; returns its config spec."""
    group = site.num_heads // site.num_kv_heads
    full = torch.full((site.num_kv_heads,), site.head_dim, dtype=torch.long)
    (w_q, b_q), (w_k, b_k), (w_o, b_o) = site.q.read(), site.k.read(), site.o.read()
    dtype, device = w_q.dtype, w_q.device
    if kept["qk"] is not None:
        qk = _site_pair(site, "qk", config, moments, compute_dtype)
        k_heads, q_heads = _kept_columns(qk, kept["qk"], group)
        if site.rotary_dims:  # each head: [its rotary dims, as they were | its kept pass-through dims]
            k_heads = _after_rotary(site, site.k, site.num_kv_heads, k_heads, compute_dtype)
            q_heads = _after_rotary(site, site.q, site.num_heads, q_heads, compute_dtype)
        new_k, new_b_k = _pack(k_heads, qk.left_bias)
        new_q, new_b_q = _pack(q_heads, qk.right_bias)
        qk_dims = kept["qk"] + site.rotary_dims
    else:  # Q-K untouched (not requested, or RoPE)
        new_q, new_b_q, new_k, new_b_k, qk_dims = w_q, b_q, w_k, b_k, full
    vo = _site_pair(site, "vo", config, moments, compute_dtype)
    vo_keep = kept["vo"] if kept["vo"] is not None else full
    v_heads, o_heads = _kept_columns(vo, vo_keep, group)
    new_v, new_b_v = _pack(v_heads, vo.left_bias)
    new_o = torch.cat([h.mT for h in o_heads], dim=0)  # (Σ widths, d_out)
    new_b_o = vo.extra["b_o"]
    family = site.family
    spec = {
        "attention_class": family.pruned_attention.__name__,
        "output": family.output,  # relative to the site module
        "replace": family.replace,  # the submodule the pruned attention replaces ("" = the site itself)
        "kept": list(family.kept),  # submodules taken over unchanged
        "positional": family.positional,
        "qk_blocker": site.qk_blocker,
        "stack": site.stack,
        "cached": site.cached,
        "layer_idx": site.layer_index,
        "num_heads": site.num_heads,
        "num_kv_heads": site.num_kv_heads,
        "head_dim": site.head_dim,
        "qk_dims": [int(x) for x in qk_dims],
        "vo_dims": [int(x) for x in vo_keep],
        "d_q": w_q.shape[0],
        "d_kv": w_k.shape[0],
        "d_out": w_o.shape[1],
        "bias": {"q": new_b_q is not None, "k": new_b_k is not None, "v": new_b_v is not None, "o": b_o is not None},
        "scaling": site.scaling,
        "is_causal": site.is_causal,
        "dropout": site.dropout,
        "output_dropout": site.output_dropout,
        "rotary_dims": site.rotary_dims,  # the first dims of each Q-K head block, which the forward rotates
        **site.extra,
    }
    install_pruned_attention(model, {site.name: spec})
    projections = pruned_projections(model.get_submodule(site.name), spec)
    for label, (weight, bias) in {
        "q": (new_q, new_b_q), "k": (new_k, new_b_k), "v": (new_v, new_b_v), "o": (new_o, new_b_o)
    }.items():  # fmt: skip
        linear = projections[label]
        linear.to(device=device, dtype=dtype)
        linear.weight.data = weight.T.to(device=device, dtype=dtype).contiguous()
        if bias is not None:
            linear.bias.data = bias.to(device=device, dtype=dtype).contiguous()
    return spec
