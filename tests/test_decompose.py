"""Every adapter: the factorized model computes the same function, with orthogonal, sorted per-head factors."""

from __future__ import annotations

import pytest
import torch
from conftest import auto_class, build_tiny, model_output

from clover.decompose import all_finite, decompose_, spectrum
from clover.errors import CloverError, UnsupportedModelError
from clover.factorize import product_singular_values, split_heads
from clover.families import attention_sites, family_for

# float32 model, factorized in float64 and written back in float32
OUTPUT_ATOL = 1e-4


def test_factorized_model_computes_the_same_function(tiny_arch):
    model = build_tiny(tiny_arch)
    reference = model_output(model)
    spectra = decompose_(model)
    assert len(spectra) == len(attention_sites(model))
    torch.testing.assert_close(model_output(model), reference, atol=OUTPUT_ATOL, rtol=0)


def test_decomposed_checkpoint_reloads_with_stock_transformers(tiny_arch, tmp_path):
    model = build_tiny(tiny_arch)
    decompose_(model)
    expected = model_output(model)
    model.save_pretrained(tmp_path)
    reloaded = auto_class(tiny_arch).from_pretrained(tmp_path).eval()  # no trust_remote_code: same classes, shapes
    assert type(reloaded) is type(model)
    torch.testing.assert_close(model_output(reloaded), expected, atol=1e-5, rtol=0)


def test_spectrum_leaves_the_model_untouched_and_matches_decompose(tiny_arch):
    model = build_tiny(tiny_arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    read = spectrum(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)
    written = decompose_(model)
    for a, b in zip(read, written, strict=True):
        torch.testing.assert_close(a.vo, b.vo, atol=1e-6, rtol=1e-6)


def _pair_heads(site):
    """Per-KV-group (left, right) factors as the model now stores them, augmented with biases (Q-K: under partial
    RoPE, the pass-through dims)."""
    q_part, k_part, _ = site.qk_pair()
    w_q, b_q = q_part.read()
    w_k, b_k = k_part.read()
    w_v, b_v = site.v.read()
    w_o, b_o = site.o.read()
    if b_o is not None:  # V's bias is folded into O's, so the V-O pair is W_v alone
        b_v = None
    group = site.num_heads // site.num_kv_heads
    q = split_heads(w_q.double(), None if b_q is None else b_q.double(), site.num_heads)
    k = split_heads(w_k.double(), None if b_k is None else b_k.double(), site.num_kv_heads)
    v = split_heads(w_v.double(), None if b_v is None else b_v.double(), site.num_kv_heads)
    o = w_o.double().reshape(site.num_heads, site.head_dim, -1).mT
    stack = lambda t: t.reshape(site.num_kv_heads, group * t.shape[1], t.shape[2])  # noqa: E731
    return {"qk": (k, stack(q)), "vo": (v, stack(o))}


def test_new_factors_are_orthogonal_with_sorted_exact_singular_values(tiny_arch):
    model = build_tiny(tiny_arch)
    family_for(model).fold_output_scales(model)  # decompose's spectra are those of O with its scales folded in
    original = {site.name: _pair_heads(site) for site in attention_sites(model)}
    spectra = {s.name: s for s in decompose_(model)}
    for site in attention_sites(model):
        pairs = _pair_heads(site)
        for label in ("qk", "vo"):
            sigma = getattr(spectra[site.name], label)
            if sigma is None:
                assert site.qk_blocked and label == "qk"
                continue
            left, right = pairs[label]
            assert (sigma[:, :-1] >= sigma[:, 1:]).all()
            explicit = product_singular_values(*original[site.name][label])
            torch.testing.assert_close(sigma.double(), explicit, atol=1e-5, rtol=1e-5)
            for factor in (left, right):  # columns orthogonal, norms sqrt(σ), up to float32 storage
                gram = factor.mT @ factor
                torch.testing.assert_close(gram, torch.diag_embed(sigma.double()), atol=1e-4, rtol=1e-4)


def test_rotary_sites_report_separate_q_and_k_spectra():
    model = build_tiny("llama")
    reference = {k: v.clone() for k, v in model.state_dict().items() if "q_proj" in k or "k_proj" in k}
    spectra = decompose_(model)
    for s in spectra:
        assert s.qk is None and s.q.shape == (4, 16) and s.k.shape == (2, 16)
        for label, heads in (("q", 4), ("k", 2)):  # each head's W (d, d_h): its singular values, descending
            weight = reference[f"{s.name}.{label}_proj.weight"].double().T.reshape(-1, heads, 16).transpose(0, 1)
            expected = torch.linalg.svdvals(weight).float()
            torch.testing.assert_close(getattr(s, label), expected, rtol=1e-5, atol=1e-6 * float(expected.max()))
    for key, value in reference.items():  # RoPE: Q and K keep their weights (separate-QR form)
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0)


def test_bfloat16_model_is_factorized_in_float64_and_written_back_in_bfloat16():
    model = build_tiny("gpt2").to(torch.bfloat16)
    reference = model_output(model).float()
    decompose_(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # bf16 storage rounds each weight to ~3 significant digits
    torch.testing.assert_close(model_output(model).float(), reference, atol=0.15, rtol=0.05)


def test_unsupported_model_names_the_supported_families():
    import transformers as tf

    config = tf.BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=2)
    with pytest.raises(UnsupportedModelError, match=r"'bloom'.*GPT-2.*Whisper"):
        decompose_(tf.BloomForCausalLM(config))


def test_non_finite_weights_are_refused():
    model = build_tiny("bert")
    with torch.no_grad():
        model.encoder.layer[1].attention.self.value.weight[0, 0] = float("nan")
    with pytest.raises(CloverError, match="NaN or Inf"):
        decompose_(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_sees_every_nan_and_inf(dtype):
    clean = torch.randn(64, 48).to(dtype)
    assert all_finite(clean) and all_finite(clean[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for position in (0, 1000, clean.numel() - 1):
            damaged = clean.clone().reshape(-1)
            damaged[position] = bad
            assert not all_finite(damaged.reshape(64, 48)), (bad, position)
