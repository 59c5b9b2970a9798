"""The core math on plain tensors: exactness, orthogonality, sorted singular values, GQA groups, biases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clover.factorize import (
    _cholesky_qr2,
    factorize_pair,
    factorize_qk,
    factorize_vo,
    orthogonalize_heads,
    product_singular_values,
    split_heads,
    triangular_factor,
)

# float64 inputs are rewritten to ~1e-12; float32 inputs are computed in float32 where requested
TOL = {torch.float64: {"atol": 1e-9, "rtol": 1e-9}, torch.float32: {"atol": 2e-4, "rtol": 2e-4}}


def _is_diagonal(gram: torch.Tensor, atol: float) -> bool:
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    return bool(off.abs().max() <= atol * max(1.0, gram.abs().max().item()))


@settings(max_examples=60, deadline=None)
@given(
    heads=st.integers(1, 4),
    rows_left=st.integers(1, 24),
    rows_right=st.integers(1, 24),
    head_dim=st.integers(1, 10),
    rank=st.integers(1, 10),
    compute=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_pair_is_exact_orthogonal_and_sorted(heads, rows_left, rows_right, head_dim, rank, compute, seed):
    generator = torch.Generator().manual_seed(seed)
    # rank-deficient factors too: A = X Y with inner dim `rank`
    rank = min(rank, head_dim)
    a = torch.randn(heads, rows_left, rank, generator=generator) @ torch.randn(
        heads, rank, head_dim, generator=generator
    )
    b = torch.randn(heads, rows_right, head_dim, generator=generator)
    a, b = a.double(), b.double()
    f = factorize_pair(a, b, compute_dtype=compute)
    tol = TOL[compute]
    torch.testing.assert_close(
        f.left.double() @ f.right.double().mT, a @ b.mT, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10
    )
    sigma = f.singular_values.double()
    assert (sigma[..., :-1] >= sigma[..., 1:] - 1e-9).all(), "singular values must be descending"
    assert _is_diagonal(f.left.double().mT @ f.left.double(), tol["atol"] * 10)
    assert _is_diagonal(f.right.double().mT @ f.right.double(), tol["atol"] * 10)
    # column i of each new factor has norm sqrt(σ_i)
    torch.testing.assert_close(f.left.double().norm(dim=-2) ** 2, sigma, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
    torch.testing.assert_close(sigma, product_singular_values(a, b), atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)


def _column_orthonormality_error(factor: torch.Tensor) -> float:
    """max |QᵀQ - I| of the factor's columns scaled to unit length (non-zero columns)."""
    q = factor / factor.norm(dim=-2, keepdim=True)
    return float((q.mT @ q - torch.eye(q.shape[-1], dtype=q.dtype)).abs().max())


@pytest.mark.parametrize("condition", [1.0, 1e4, 1e12])
def test_cholesky_route_matches_householder(condition):
    """The R that factorize_pair and the spectra use comes from CholeskyQR2 where a block is well-conditioned
    (matmuls) and from Householder QR where it is not (condition 1e12 > 1/√eps: two blocks of three): the same R
    up to the sign of each row, and the pair's factors exact, orthogonal to rounding either way."""
    generator = torch.Generator().manual_seed(0)
    rows, head_dim = 64, 8
    u = torch.linalg.qr(torch.randn(3, rows, head_dim, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(3, head_dim, head_dim, generator=generator, dtype=torch.float64))[0]
    sigma = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), head_dim, dtype=torch.float64)
    spread = torch.stack([torch.logspace(0, -1, head_dim, dtype=torch.float64), sigma, sigma.flip(0).sort().values])
    a = u * spread.unsqueeze(-2) @ v  # block 0 well-conditioned, blocks 1 and 2 of the given condition number
    b = torch.randn(3, 48, head_dim, generator=generator, dtype=torch.float64)
    fast = _cholesky_qr2(a)
    assert fast.good.tolist() == [True] + [condition < 1e6] * 2, "the route each block takes"
    r = triangular_factor(a)
    householder = orthogonalize_heads(a)[1]
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1) * torch.diagonal(householder, dim1=-2, dim2=-1))
    for block in range(3):  # R entries are at most 1 here; rounding grows with the block's condition number
        tolerance = 1e-13 * (1.0 if block == 0 else min(condition, 1e6))
        torch.testing.assert_close(r[block], householder[block] * signs[block].unsqueeze(-1), atol=tolerance, rtol=0)
    f = factorize_pair(a, b)
    torch.testing.assert_close(f.left @ f.right.mT, a @ b.mT, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(f.singular_values, product_singular_values(a, b), atol=1e-12, rtol=1e-9)
    assert _column_orthonormality_error(f.left) < 1e-12 and _column_orthonormality_error(f.right) < 1e-12


def _scores(x, w_q, b_q, w_k, b_k, heads, kv_heads):
    n, d_h = x.shape[0], w_q.shape[1] // heads
    q = (x @ w_q + (0 if b_q is None else b_q)).reshape(n, heads, d_h)
    k = (x @ w_k + (0 if b_k is None else b_k)).reshape(n, kv_heads, d_h).repeat_interleave(heads // kv_heads, 1)
    return torch.einsum("ihd,jhd->hij", q, k)


def _head_outputs(x, attn, w_v, b_v, w_o, b_o, heads, kv_heads):
    n, d_h = x.shape[0], w_o.shape[0] // heads
    v = (x @ w_v + (0 if b_v is None else b_v)).reshape(n, kv_heads, d_h).repeat_interleave(heads // kv_heads, 1)
    out = torch.einsum("hij,jhd->ihd", attn, v).reshape(n, heads * d_h) @ w_o
    return out + (0 if b_o is None else b_o)


@settings(max_examples=40, deadline=None)
@given(
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    d=st.integers(4, 20),
    head_dim=st.integers(1, 8),
    q_bias=st.booleans(),
    k_bias=st.booleans(),
    v_bias=st.booleans(),
    o_bias=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_qk_and_vo_keep_the_attention_function(
    kv_heads, group, d, head_dim, q_bias, k_bias, v_bias, o_bias, dtype, seed
):
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    w_q, w_k = rnd(d, heads * head_dim), rnd(d, kv_heads * head_dim)
    b_q = rnd(heads * head_dim) if q_bias else None
    b_k = rnd(kv_heads * head_dim) if k_bias else None
    w_v, w_o = rnd(d, kv_heads * head_dim), rnd(heads * head_dim, d)
    b_v = rnd(kv_heads * head_dim) if v_bias else None
    b_o = rnd(d) if o_bias else None
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    attn = torch.softmax(torch.randn(heads, 5, 5, generator=g, dtype=torch.float64), dim=-1)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    tol = {"atol": 1e-9, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}

    qk = factorize_qk(w_q, w_k, b_q, b_k, num_heads=heads, num_kv_heads=kv_heads)
    assert (qk.b_q is None) == (b_q is None) and (qk.b_k is None) == (b_k is None)
    torch.testing.assert_close(
        _scores(x, up(qk.w_q), up(qk.b_q), up(qk.w_k), up(qk.b_k), heads, kv_heads),
        _scores(x, up(w_q), up(b_q), up(w_k), up(b_k), heads, kv_heads),
        **tol,
    )
    assert qk.singular_values.shape == (kv_heads, head_dim)

    vo = factorize_vo(w_v, w_o, b_v, b_o, num_heads=heads, num_kv_heads=kv_heads)
    torch.testing.assert_close(
        _head_outputs(x, attn, up(vo.w_v), up(vo.b_v), up(vo.w_o), up(vo.b_o), heads, kv_heads),
        _head_outputs(x, attn, up(w_v), up(b_v), up(w_o), up(b_o), heads, kv_heads),
        **tol,
    )
    if v_bias and o_bias:  # folded into O: the V path (and the KV cache) carries no bias any more
        assert vo.b_v.abs().max() == 0


def test_gqa_singular_values_are_those_of_the_stacked_group_product():
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, d_h = 6, 2, 24, 4
    w_v, w_o = torch.randn(d, kv_heads * d_h, generator=g), torch.randn(heads * d_h, d, generator=g)
    vo = factorize_vo(w_v, w_o, num_heads=heads, num_kv_heads=kv_heads)
    for j in range(kv_heads):
        v_j = w_v[:, j * d_h : (j + 1) * d_h].double()
        partners = torch.cat([w_o[h * d_h : (h + 1) * d_h].double() for h in range(3 * j, 3 * j + 3)], dim=1)
        expected = torch.linalg.svdvals(v_j @ partners)[:d_h]  # d × (g·d) explicit product
        torch.testing.assert_close(vo.singular_values[j], expected, atol=1e-10, rtol=1e-10)


def test_split_heads_appends_bias_row():
    w, b = torch.arange(12.0).reshape(3, 4), torch.tensor([100.0, 101, 102, 103])
    heads = split_heads(w, b, 2)
    assert heads.shape == (2, 4, 2)
    torch.testing.assert_close(heads[1, :3], w[:, 2:])
    torch.testing.assert_close(heads[1, 3], b[2:])


def test_mismatched_pair_is_refused():
    with pytest.raises(ValueError, match="pair shapes"):
        factorize_pair(torch.randn(2, 5, 3), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="cannot be grouped"):
        factorize_vo(torch.randn(8, 8), torch.randn(12, 8), num_heads=3, num_kv_heads=2)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(4, 16), head_dim=st.integers(1, 4), group=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_whitened_factorization_is_exact_and_ranks_by_output_energy(rows, head_dim, group, seed):
    from clover.factorize import whitening_factor

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, rows, head_dim, generator=g, dtype=torch.float64)
    b = torch.randn(2, group * rows, head_dim, generator=g, dtype=torch.float64)
    x = torch.randn(50, rows, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, rows, dtype=torch.float64)
    whitening = whitening_factor(x.T @ x / 50, ridge=0.0)
    f = factorize_pair(a, b, left_whitening=whitening, right_whitening=whitening)
    torch.testing.assert_close(f.left @ f.right.mT, a @ b.mT, atol=1e-8, rtol=1e-8)
    # σ are those of the whitened product Lᵀ A Bᵀ L (blockwise on the stacked side)
    blocks = torch.block_diag(*[whitening] * group)
    expected = torch.linalg.svdvals(whitening.mT @ a @ b.mT @ blocks)[..., :head_dim]
    torch.testing.assert_close(f.singular_values, expected, atol=1e-8, rtol=1e-8)
