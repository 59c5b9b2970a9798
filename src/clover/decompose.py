"""Apply CLOVER's exact factorization to every attention site of a model, in place, one site at a time."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .factorize import factorize_qk, factorize_vo, head_singular_values, split_heads
from .families import AttentionSite, attention_sites, family_for


@dataclass
class SiteSpectrum:
    """Singular values of one attention site, per KV group (rows) and dim (columns, descending)."""

    name: str
    stack: str
    layer_index: int
    vo: Tensor
    qk: Tensor | None = None  # None where Q-K is blocked (RoPE, QK-norm); partial RoPE: the pass-through dims only
    q: Tensor | None = None  # Q-K-blocked sites (RoPE, QK-norm): singular values of each query head's W_q
    k: Tensor | None = None  # Q-K-blocked sites: same for each key head's W_k


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no entry is NaN or ±Inf. The smallest and largest entry say so (both propagate NaN) in one pass
    without a temporary, where ``isfinite(t).all()`` makes several passes and a mask: every layer of a 7B model
    is checked as it streams in."""
    if tensor.numel() == 0:
        return True
    smallest, largest = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(smallest) & torch.isfinite(largest))


def refuse_non_finite_weights(model: torch.nn.Module) -> None:
    """Refuse NaN or Inf anywhere in the weights in one line (every score would read nan, an SVD would not
    converge); buffers are not checked, some hold -inf masks on purpose."""
    from .errors import CloverError

    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and not tensor.is_meta and not all_finite(tensor):
            raise CloverError(f"{name}: the weights contain NaN or Inf; fix the checkpoint first")


def check_finite(site: AttentionSite) -> None:
    """Refuse a site whose Q, K, V or O weights or biases hold NaN or Inf (the SVD would spread them), or have no
    values yet (a model built on the meta device)."""
    from .errors import CloverError

    for label, projection in (("q", site.q), ("k", site.k), ("v", site.v), ("o", site.o)):
        for tensor in projection.read():
            if tensor is not None and tensor.is_meta:
                raise CloverError(
                    f"{site.name}: the {label} weights are on the meta device (no values); load the weights first"
                )
            if tensor is not None and not all_finite(tensor):
                raise CloverError(f"{site.name}: the {label} weights contain NaN or Inf; fix the checkpoint first")


def decompose_site(
    site: AttentionSite, *, compute_dtype: torch.dtype = torch.float64, write: bool = True, check: bool = True
) -> SiteSpectrum:
    """Factorize one site's V-O pair and (where no rotation intervenes) its Q-K pair; write back if asked.
    ``check=False`` where the caller has already refused non-finite weights (streaming checks each layer it reads)."""
    w_q, b_q = site.q.read()
    w_k, b_k = site.k.read()
    w_v, b_v = site.v.read()
    w_o, b_o = site.o.read()
    if check:
        check_finite(site)
    groups = {"num_heads": site.num_heads, "num_kv_heads": site.num_kv_heads, "compute_dtype": compute_dtype}
    vo = factorize_vo(w_v, w_o, b_v, b_o, **groups)
    spectrum = SiteSpectrum(site.name, site.stack, site.layer_index, vo=vo.singular_values.float())
    if site.qk_blocked:
        # no Q-K product to factorize (method section 4): W_q, W_k stay as they are; their spectra are reported
        for label, weight, bias, heads in (
            ("q", w_q, b_q, site.num_heads),
            ("k", w_k, b_k, site.num_kv_heads),
        ):
            heads_sigma = head_singular_values(split_heads(weight, bias, heads), compute_dtype=compute_dtype)
            setattr(spectrum, label, heads_sigma.float())
    else:
        # partial RoPE: only the pass-through dims meet through a fixed product; the rotary dims stay as they are
        q_part, k_part, _ = site.qk_pair()
        (w_q, b_q), (w_k, b_k) = q_part.read(), k_part.read()
        qk = factorize_qk(w_q, w_k, b_q, b_k, **groups)
        spectrum.qk = qk.singular_values.float()
        if write:
            q_part.write(qk.w_q.to(w_q.dtype), None if qk.b_q is None else qk.b_q.to(w_q.dtype))
            k_part.write(qk.w_k.to(w_k.dtype), None if qk.b_k is None else qk.b_k.to(w_k.dtype))
    if write:
        site.v.write(vo.w_v.to(w_v.dtype), None if vo.b_v is None else vo.b_v.to(w_v.dtype))
        site.o.write(vo.w_o.to(w_o.dtype), None if vo.b_o is None else vo.b_o.to(w_o.dtype))
    return spectrum


def _run(model: nn.Module, compute_dtype: torch.dtype, write: bool, progress: bool) -> list[SiteSpectrum]:
    sites = attention_sites(model)
    family = family_for(model)
    if family.output_scales:  # spectra of what reaches the residual stream (an exact rewrite; a copy if read-only)
        if not write:
            model = copy.deepcopy(model)
            sites = attention_sites(model)
        family.fold_output_scales(model)
    label = "factorizing attention" if write else "reading spectra"
    with torch.no_grad():
        return [
            decompose_site(site, compute_dtype=compute_dtype, write=write)
            for site in tqdm(sites, desc=label, unit="attn", disable=not progress)
        ]


def decompose_(
    model: nn.Module, *, compute_dtype: torch.dtype = torch.float64, progress: bool = False
) -> list[SiteSpectrum]:
    """Rewrite every attention site of ``model`` in place into CLOVER's orthogonal form; same function, same shapes.

    Returns the singular values of each site. Works site by site, so the peak extra memory is one
    attention block's weights in ``compute_dtype``.
    """
    return _run(model, compute_dtype, write=True, progress=progress)


def spectrum(
    model: nn.Module, *, compute_dtype: torch.dtype = torch.float64, progress: bool = False
) -> list[SiteSpectrum]:
    """Singular values of every attention site, leaving the model untouched."""
    return _run(model, compute_dtype, write=False, progress=progress)
