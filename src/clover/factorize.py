"""CLOVER's exact per-head factorization, on plain tensors.

Layout: every weight is in *math* layout, rows = input features, columns = output features, so a
projection computes ``x @ W + b``. Head h of a projection with head size d_h owns columns
``h*d_h:(h+1)*d_h``; in the output projection it owns rows ``h*d_h:(h+1)*d_h``.

A head pair acts only through the product ``A @ B.T`` with A (m × d_h), B (n × d_h):
Q-K: A = [W_q; b_q], B = [W_k; b_k] (bias as an extra input row, the input gets a trailing 1);
V-O: A = W_v, B = W_oᵀ. Any invertible T with A ← A T, B ← B T⁻ᵀ keeps the product, so we pick
the T that makes the columns orthogonal and sorted by singular value.

Under GQA a K (or V) head is shared by g query heads, so one T must serve the group: the shared head
is factored against its partners stacked along the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PairFactors",
    "QKFactors",
    "VOFactors",
    "factorize_pair",
    "factorize_qk",
    "factorize_vo",
    "whiten",
    "whitening_factor",
    "orthogonalize_heads",
    "head_singular_values",
    "triangular_factor",
    "product_singular_values",
    "split_heads",
    "merge_heads",
    "split_output_heads",
    "inverse_r",
    "qr_transform",
    "pair_transforms",
    "merge_output_heads",
]


@dataclass
class PairFactors:
    """New factors of a batch of head pairs: ``left @ right.T`` equals the input product."""

    left: Tensor  # (..., m, d_h) mutually orthogonal columns, column i has norm sqrt(σ_i)
    right: Tensor  # (..., n, d_h) same
    singular_values: Tensor  # (..., d_h), descending; zeros past the pair's rank


def whitening_factor(second_moment: Tensor, *, ridge: float = 1e-6) -> Tensor:
    """Lower-triangular L with L Lᵀ = C + ridge·mean(diag C)·I, for C = E[xᵀx] of a projection's input."""
    c = second_moment.to(torch.float64)
    c = c + ridge * c.diagonal().mean().clamp_min(1e-30) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.cholesky(c)


def whiten(factor: Tensor, whitening: Tensor | None, inverse: bool = False) -> Tensor:
    """Lᵀ F (or L⁻ᵀ F) on every block of rows of F; F may stack several blocks of L's size (GQA partners)."""
    if whitening is None:
        return factor
    size = whitening.shape[0]
    blocks = factor.reshape(*factor.shape[:-2], factor.shape[-2] // size, size, factor.shape[-1])
    # every block side by side as the columns of one matrix: L applied once. Broadcasting L over the heads
    # would copy it per head (32 heads at width 4096: 4.3 GB of float64)
    columns = blocks.movedim(-2, 0).reshape(size, -1)
    upper = whitening.to(factor.dtype).mT
    out = torch.linalg.solve_triangular(upper, columns, upper=True) if inverse else upper @ columns
    return out.reshape(size, *blocks.shape[:-2], blocks.shape[-1]).movedim(0, -2).reshape(factor.shape)


def factorize_pair(
    left: Tensor,
    right: Tensor,
    *,
    compute_dtype: torch.dtype = torch.float64,
    left_whitening: Tensor | None = None,
    right_whitening: Tensor | None = None,
) -> PairFactors:
    """Rewrite each pair (A, B) as (Q_a U √Σ, Q_b V √Σ), where A Bᵀ = Q_a (R_a R_bᵀ) Q_bᵀ and R_a R_bᵀ = U Σ Vᵀ.

    Costs two thin QRs and one d_h×d_h SVD per pair instead of an SVD of the m×n product.
    Leading dimensions are batch dimensions (heads). Returns tensors in ``compute_dtype``.
    With whitening factors L (``whitening_factor`` of each side's input second moment) the SVD is taken of
    L_aᵀ A Bᵀ L_b and mapped back, so the product stays exact while truncating the trailing dims now
    minimises the error on that input distribution rather than on the weights (calibrated CLOVER).
    """
    if left.shape[-1] != right.shape[-1] or left.shape[:-2] != right.shape[:-2]:
        raise ValueError(f"pair shapes do not match: {tuple(left.shape)} and {tuple(right.shape)}")
    head_dim = left.shape[-1]
    left = whiten(left.to(compute_dtype), left_whitening)
    right = whiten(right.to(compute_dtype), right_whitening)
    fast_a, fast_b = _cholesky_qr2(left), _cholesky_qr2(right)
    if fast_a is not None and fast_b is not None and bool(fast_a.good.all()) and bool(fast_b.good.all()):
        # Q_a = X₁ R₂⁻¹ (X₁ = A R₁⁻¹, the first pass), so Q_a U √Σ = X₁ (R₂⁻¹ U √Σ): matmuls only
        u, sigma, v_h = torch.linalg.svd(fast_a.r @ fast_b.r.mT, full_matrices=False)
        root = sigma.sqrt().unsqueeze(-2)
        left = fast_a.once @ torch.linalg.solve_triangular(fast_a.r_second, u * root, upper=True)
        right = fast_b.once @ torch.linalg.solve_triangular(fast_b.r_second, v_h.mT * root, upper=True)
    else:  # a rank-deficient or ill-conditioned block (fewer rows than d_h, dims zeroed in place): Householder
        q_a, r_a = torch.linalg.qr(left)
        q_b, r_b = torch.linalg.qr(right)
        u, sigma, v_h = torch.linalg.svd(r_a @ r_b.mT, full_matrices=False)
        root = sigma.sqrt().unsqueeze(-2)
        left, right = (q_a @ u) * root, (q_b @ v_h.mT) * root
    new_left = whiten(left, left_whitening, inverse=True)
    new_right = whiten(right, right_whitening, inverse=True)
    rank = sigma.shape[-1]
    if rank < head_dim:  # fewer input rows than head dims: the extra dims carry nothing
        pad = head_dim - rank
        new_left = torch.nn.functional.pad(new_left, (0, pad))
        new_right = torch.nn.functional.pad(new_right, (0, pad))
        sigma = torch.nn.functional.pad(sigma, (0, pad))
    return PairFactors(new_left, new_right, sigma)


def product_singular_values(left: Tensor, right: Tensor, *, compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """Singular values of the explicit product ``left @ right.T`` (the authors' full-SVD route), top d_h."""
    product = left.to(compute_dtype) @ right.to(compute_dtype).mT
    sigma = torch.linalg.svdvals(product)[..., : left.shape[-1]]
    return torch.nn.functional.pad(sigma, (0, left.shape[-1] - sigma.shape[-1]))


def orthogonalize_heads(weight: Tensor, *, compute_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Thin QR of each head's factor, (heads, m, d_h) -> orthonormal (heads, m, d_h) and R (heads, d_h, d_h).

    The form used where a rotation (RoPE) sits between Q and K and the pair cannot be merged.
    """
    return torch.linalg.qr(weight.to(compute_dtype))


# CholeskyQR2 accepts a block when its first pass left the columns this close to orthonormal (max |XᵀX - I|);
# below 1 the second pass restores orthogonality to rounding (Yamamoto et al., 2015), here with a wide margin.
_CHOLESKY_QR_TOLERANCE = 0.1


@dataclass
class _CholeskyQR2:
    """x = Q R per block, with Q = once R₂⁻¹ and R = R₂ R₁; ``good``: the blocks where Q is orthonormal to rounding."""

    once: Tensor  # x R₁⁻¹, the first pass's nearly orthonormal columns
    r_second: Tensor  # R₂, the second pass's factor (once = Q R₂)
    r: Tensor  # R₂ R₁
    good: Tensor  # bool per block


def _cholesky_qr2(x: Tensor) -> _CholeskyQR2 | None:
    """Each block's thin QR by CholeskyQR2 (Gram matrix and Cholesky, twice): matmuls, faster on a CPU than
    Householder QR at head shapes. ``good`` is False for the blocks where it does not hold (rank-deficient,
    condition number past ~1/√eps); None where no block can hold (fewer rows than columns)."""
    if x.shape[-2] < x.shape[-1]:  # rank-deficient by shape; Householder's R is (rows × d_h) there
        return None
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    r_first, info_first = torch.linalg.cholesky_ex(x.mT @ x, upper=True)
    once = x @ torch.linalg.solve_triangular(r_first, eye.expand_as(r_first), upper=True)
    gram = once.mT @ once
    r_second, info_second = torch.linalg.cholesky_ex(gram, upper=True)
    good = (info_first == 0) & (info_second == 0) & ((gram - eye).abs().amax(dim=(-2, -1)) < _CHOLESKY_QR_TOLERANCE)
    return _CholeskyQR2(once, r_second, r_second @ r_first, good)


def triangular_factor(weight: Tensor, *, compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """R of each head's thin QR, (heads, m, d_h) -> (heads, d_h, d_h): what the spectra and the small transforms
    need, without Q. CholeskyQR2 where a block is well-conditioned, Householder QR for the others; the same R as
    :func:`orthogonalize_heads`'s up to the sign of each row."""
    x = weight.to(compute_dtype)
    fast = _cholesky_qr2(x)
    if fast is None:
        return torch.linalg.qr(x)[1]
    if bool(fast.good.all()):
        return fast.r
    blocks = x.reshape(-1, *x.shape[-2:])
    r, bad = fast.r.reshape(-1, *fast.r.shape[-2:]).clone(), ~fast.good.reshape(-1)
    r[bad] = torch.linalg.qr(blocks[bad])[1]  # Householder for the failed blocks only
    return r.reshape(fast.r.shape)


def head_singular_values(weight: Tensor, *, compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """Singular values of each head's factor, (heads, m, d_h) -> (heads, d_h), descending. A spectrum only
    (Q-K-blocked sites' separate Q and K spectra, reported, never used to rewrite weights): in float64 from each
    head's d_h × d_h Gram matrix, one matmul, a third of a QR's, whose squaring costs accuracy only for σ below
    about 1e-8·σ_max; in a lower precision (MPS's float32) that would be 3e-4·σ_max, so from QR's R there."""
    x = weight.to(compute_dtype)
    if compute_dtype != torch.float64:
        return torch.linalg.svdvals(triangular_factor(x, compute_dtype=compute_dtype))
    eigenvalues = torch.linalg.eigvalsh(x.mT @ x)  # ascending
    return eigenvalues.clamp_min(0).sqrt().flip(-1)


# Directions of a block's R below this fraction of its largest singular value count as rank-deficient (e.g. dims
# a pruning zeroed in place): they get a zero column instead of noise amplified by 1/σ.
RANK_RTOL = 1e-8


def inverse_r(r: Tensor, *, rotate: bool = False) -> Tensor:
    """R⁻¹ per block (R upper-triangular, from QR); rank-deficient blocks (dims pruned in place) get R⁺.

    With ``rotate`` those blocks get R⁺U_R = VΣ⁺ instead, so that F = W X has orthonormal or zero columns.
    """
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device).expand_as(r)
    inverse = torch.linalg.solve_triangular(r, eye, upper=True)  # far cheaper than an SVD per block
    residual = (r @ inverse - eye).abs().amax(dim=(-2, -1))
    deficient = ~(residual < 1e-8)  # also catches inf/nan from a zero on the diagonal
    if deficient.any():
        u, sigma, v_h = torch.linalg.svd(r[deficient])
        sigma_plus = torch.where(sigma > RANK_RTOL * sigma[..., :1], 1 / sigma, 0)
        v_sigma_plus = v_h.mT * sigma_plus.unsqueeze(-2)
        inverse[deficient] = v_sigma_plus if rotate else v_sigma_plus @ u.mT
    return inverse


def qr_transform(heads: Tensor) -> Tensor:
    """Per block the small X with ``heads @ X`` orthonormal (or zero) columns: R⁺U_R of the block's QR."""
    return inverse_r(triangular_factor(heads), rotate=True)


def pair_transforms(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Small per-block X_a, X_b (d_h×d_h) with ``left @ X_a``, ``right @ X_b`` orthogonal factors of ``left @ right.T``
    ordered by singular value: the transforms behind :func:`factorize_pair`, kept so an adapter can store them."""
    r_a = triangular_factor(left)
    r_b = triangular_factor(right)
    u, _, v_h = torch.linalg.svd(r_a @ r_b.mT)
    return inverse_r(r_a) @ u, inverse_r(r_b) @ v_h.mT


def split_heads(weight: Tensor, bias: Tensor | None, num_heads: int) -> Tensor:
    """(d_in, n·d_h) weight and optional (n·d_h,) bias -> (n, d_in[+1], d_h), bias as the last row."""
    d_in, width = weight.shape
    head_dim = width // num_heads
    heads = weight.reshape(d_in, num_heads, head_dim).permute(1, 0, 2)
    if bias is None:
        return heads
    return torch.cat([heads, bias.reshape(num_heads, 1, head_dim).to(heads.dtype)], dim=1)


def merge_heads(heads: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`split_heads`."""
    num_heads, rows, head_dim = heads.shape
    weight_rows = heads[:, : rows - 1] if has_bias else heads
    weight = weight_rows.permute(1, 0, 2).reshape(-1, num_heads * head_dim)
    bias = heads[:, -1].reshape(num_heads * head_dim) if has_bias else None
    return weight, bias


def split_output_heads(w_o: Tensor, num_heads: int) -> Tensor:
    """(H·d_h, d_out) output projection -> (H, d_out, d_h): each head's rows W_o^h, transposed (a pair's right side)."""
    return w_o.reshape(num_heads, w_o.shape[0] // num_heads, -1).mT


def merge_output_heads(heads: Tensor) -> Tensor:
    """Inverse of :func:`split_output_heads`: (H, d_out, d_h) -> (H·d_h, d_out)."""
    return heads.mT.reshape(-1, heads.shape[1])


def _group_size(num_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot be grouped over {num_kv_heads} key/value heads")
    return num_heads // num_kv_heads


@dataclass
class QKFactors:
    """Rewritten Q and K projections (math layout) and the singular values per KV group."""

    w_q: Tensor
    b_q: Tensor | None
    w_k: Tensor
    b_k: Tensor | None
    singular_values: Tensor  # (num_kv_heads, d_h)


def factorize_qk(
    w_q: Tensor,
    w_k: Tensor,
    b_q: Tensor | None = None,
    b_k: Tensor | None = None,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    compute_dtype: torch.dtype = torch.float64,
    q_whitening: Tensor | None = None,
    k_whitening: Tensor | None = None,
) -> QKFactors:
    """Exact CLOVER rewrite of a Q-K pair with no rotation between Q and K.

    ``w_q``: (d_q, H·d_h); ``w_k``: (d_k, G·d_h). Biases enter as an augmented input row, so the
    new biases are the new last rows. Under GQA each K head is factored against its g query heads.
    """
    num_kv_heads = num_kv_heads or num_heads
    group = _group_size(num_heads, num_kv_heads)
    q_heads = split_heads(w_q.to(compute_dtype), b_q, num_heads)  # (H, m, d_h)
    k_heads = split_heads(w_k.to(compute_dtype), b_k, num_kv_heads)  # (G, n, d_h)
    rows, head_dim = q_heads.shape[1:]
    stacked_q = q_heads.reshape(num_kv_heads, group * rows, head_dim)
    factors = factorize_pair(
        k_heads, stacked_q, compute_dtype=compute_dtype, left_whitening=k_whitening, right_whitening=q_whitening
    )
    new_q, new_b_q = merge_heads(factors.right.reshape(num_heads, rows, head_dim), b_q is not None)
    new_k, new_b_k = merge_heads(factors.left, b_k is not None)
    return QKFactors(new_q, new_b_q, new_k, new_b_k, factors.singular_values)


@dataclass
class VOFactors:
    """Rewritten V and O projections (math layout) and the singular values per KV group."""

    w_v: Tensor
    b_v: Tensor | None
    w_o: Tensor
    b_o: Tensor | None
    singular_values: Tensor  # (num_kv_heads, d_h)


def fold_value_bias(w_o: Tensor, b_v: Tensor, b_o: Tensor, *, num_heads: int, num_kv_heads: int) -> Tensor:
    """O's bias after absorbing V's bias: b_o + Σ_h b_v^{kv(h)} W_o^h (softmax rows sum to 1)."""
    group = _group_size(num_heads, num_kv_heads)
    head_dim = w_o.shape[0] // num_heads
    per_query_head = b_v.reshape(num_kv_heads, head_dim).repeat_interleave(group, dim=0).reshape(-1)
    return b_o + per_query_head.to(w_o.dtype) @ w_o


def factorize_vo(
    w_v: Tensor,
    w_o: Tensor,
    b_v: Tensor | None = None,
    b_o: Tensor | None = None,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    fold_bias: bool = True,
    compute_dtype: torch.dtype = torch.float64,
    v_whitening: Tensor | None = None,
) -> VOFactors:
    """Exact CLOVER rewrite of a V-O pair.

    ``w_v``: (d_kv, G·d_h); ``w_o``: (H·d_h, d_out). With ``fold_bias`` and an O bias present, V's bias
    is folded into O's (returned b_v is zero), which takes it off the V path and the KV cache;
    otherwise it rides along as an augmented row of V.
    """
    num_kv_heads = num_kv_heads or num_heads
    group = _group_size(num_heads, num_kv_heads)
    w_v, w_o = w_v.to(compute_dtype), w_o.to(compute_dtype)
    b_o = None if b_o is None else b_o.to(compute_dtype)
    folded = b_v is not None and b_o is not None and fold_bias
    if folded:
        b_o = fold_value_bias(w_o, b_v.to(compute_dtype), b_o, num_heads=num_heads, num_kv_heads=num_kv_heads)
    v_heads = split_heads(w_v, None if folded or b_v is None else b_v.to(compute_dtype), num_kv_heads)
    head_dim = v_heads.shape[-1]
    o_heads = split_output_heads(w_o, num_heads)  # (H, d_out, d_h)
    d_out = o_heads.shape[1]
    factors = factorize_pair(
        v_heads,
        o_heads.reshape(num_kv_heads, group * d_out, head_dim),
        compute_dtype=compute_dtype,
        left_whitening=v_whitening,
    )
    new_v, new_b_v = merge_heads(factors.left, b_v is not None and not folded)
    new_o = merge_output_heads(factors.right.reshape(num_heads, d_out, head_dim))
    if folded:
        new_b_v = torch.zeros_like(b_v, dtype=compute_dtype)
    return VOFactors(new_v, new_b_v, new_o, b_o, factors.singular_values)
