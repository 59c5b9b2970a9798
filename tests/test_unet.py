"""Stable Diffusion XL's UNet through diffusers: exact rewrite, pruning that keeps the softmax scale and per-head
widths (our attention processor), shrinking text K/V, save and reload (clover's loader, diffusers' AutoModel with
trust_remote_code in a fresh process, stock diffusers refused), healing after reload, and clover without diffusers.
The family-table tests (conftest.py, row "unet") cover the rest in float32; test_unet_cli.py the command line."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, model_output, unet_inputs

from clover.decompose import decompose_
from clover.errors import UnsupportedModelError
from clover.families import attention_sites, family_for
from clover.prune import PruneConfig, prune_

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="diffusers (the 'diffusion' extra) is not installed"
)
REPO = Path(__file__).resolve().parent.parent
CROSS = "down_blocks.1.attentions.0.transformer_blocks.1.attn2"  # one cross-attention site (4 heads of 16 dims)


def _unet(bias: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The table's tiny SDXL-like UNet; ``bias``: random q/k/v biases added (SDXL has none)."""
    model = build_tiny("unet")
    if bias:
        generator = torch.Generator().manual_seed(3)
        for module in model.modules():
            if hasattr(module, "to_q") and hasattr(module, "processor"):
                for linear in (module.to_q, module.to_k, module.to_v):
                    linear.bias = torch.nn.Parameter(0.1 * torch.randn(linear.out_features, generator=generator))
    return model.to(dtype)


def _step(model: torch.nn.Module, **overrides) -> torch.Tensor:
    """One denoising step's noise prediction on fixed inputs (``overrides`` replace some of them)."""
    inputs = unet_inputs(model.config, torch.Generator().manual_seed(1))
    inputs = {**inputs, **overrides}
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    inputs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in inputs["added_cond_kwargs"].items()}
    with torch.no_grad():
        return model(**inputs).sample


@needs_diffusers
def test_sites_are_self_and_cross_attention_with_the_original_scale():
    model = _unet()
    sites = attention_sites(model)
    assert family_for(model).name == "unet" and len(sites) == 16
    assert [s.stack for s in sites[:2]] == ["self", "cross"] and {s.stack for s in sites} == {"self", "cross"}
    for site in sites:
        assert (site.num_heads, site.head_dim, site.scaling, site.cached) == (4, 16, 0.25, False)
        assert site.q_reads_kv_input == (site.stack == "self")
        assert site.k.read()[0].shape[0] == (32 if site.stack == "cross" else 64)  # attn2's K reads the text states


@needs_diffusers
@pytest.mark.parametrize("bias", [False, True], ids=["sdxl", "qkv-bias"])
def test_decomposed_and_ratio_zero_unets_take_the_same_denoising_step(bias):
    model = _unet(bias, torch.float64)
    reference = _step(model)
    decompose_(model)
    torch.testing.assert_close(_step(model), reference, atol=1e-10, rtol=0)
    model = _unet(bias, torch.float64)
    prune_(model, PruneConfig(allocation="global"))
    torch.testing.assert_close(_step(model), reference, atol=1e-10, rtol=0)


def _truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * sigma[:rank]) @ vh[:rank]


@needs_diffusers
def test_pruned_attention_is_the_rank_r_truncation_at_the_original_scale():
    """Per head, softmax(x (W_q W_kᵀ)_r eᵀ / sqrt(16)) e (W_v W_o)_r with r = 8 kept dims; diffusers' own
    processor on the pruned module would attend at 1/sqrt(8), the kept width."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = _unet(dtype=torch.float64)
    attn = model.get_submodule(CROSS)
    w_q, w_k, w_v = (getattr(attn, name).weight.detach().T.clone() for name in ("to_q", "to_k", "to_v"))
    w_o, b_o = attn.to_out[0].weight.detach().T.clone(), attn.to_out[0].bias.detach().clone()
    prune_(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.5))
    spec = model.config.clover["sites"][CROSS]
    assert spec["qk_dims"] == spec["vo_dims"] == [8] * 4 and spec["scaling"] == 0.25
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 10, 64, generator=generator, dtype=torch.float64)
    text = torch.randn(2, 7, 32, generator=generator, dtype=torch.float64)

    def reference(scale: float) -> torch.Tensor:
        out = b_o.expand(2, 10, -1)
        for h in range(4):
            cols = slice(16 * h, 16 * (h + 1))
            qk = _truncated(w_q[:, cols] @ w_k[:, cols].T, 8)  # (64, 32): head h's logits form, rank 8
            vo = _truncated(w_v[:, cols] @ w_o[cols], 8)  # (32, 64)
            out = out + torch.softmax(x @ qk @ text.mT * scale, dim=-1) @ text @ vo
        return out

    with torch.no_grad():
        torch.testing.assert_close(attn(x, encoder_hidden_states=text), reference(16**-0.5), atol=1e-10, rtol=0)
        processor = attn.processor
        attn.processor = AttnProcessor2_0()  # past the guard that set_processor now is, to show what it prevents
        try:
            stock = attn(x, encoder_hidden_states=text)
        finally:
            attn.processor = processor
    torch.testing.assert_close(stock, reference(8**-0.5), atol=1e-10, rtol=0)
    assert (reference(8**-0.5) - reference(16**-0.5)).abs().max() > 1e-3  # the temperature it would change


@needs_diffusers
def test_text_key_and_value_shrink_to_the_kept_widths_and_masks_still_hide_tokens():
    model = _unet()
    text = unet_inputs(model.config, torch.Generator().manual_seed(1))["encoder_hidden_states"]
    before = sum(s.k.read()[0].shape[1] + s.v.read()[0].shape[1] for s in attention_sites(model) if s.stack == "cross")
    report = prune_(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.25, allocation="global"))
    after = 0
    for name, spec in model.config.clover["sites"].items():
        if spec["stack"] != "cross":
            continue
        attn = model.get_submodule(name)
        with torch.no_grad():
            key, value = attn.to_k(text), attn.to_v(text)  # what a pipeline computes once per prompt
        assert key.shape == (2, 7, sum(spec["qk_dims"])) and value.shape == (2, 7, sum(spec["vo_dims"]))
        after += key.shape[-1] + value.shape[-1]
    assert before == 8 * 2 * 64 and after < before
    assert report.kv_dims_per_token_before == report.kv_dims_per_token_after == 0  # no cache: not counted as one
    assert any(len(set(s["qk_dims"])) > 1 for s in model.config.clover["sites"].values())  # ragged heads
    # sample 1's last two text tokens are masked: the step equals the one on its first five tokens alone
    masked = _step(model)[1:]
    inputs = unet_inputs(model.config, torch.Generator().manual_seed(1), batch=2)
    alone = _step(model, encoder_hidden_states=inputs["encoder_hidden_states"][:, :5], encoder_attention_mask=None)
    torch.testing.assert_close(masked, alone[1:], atol=1e-5, rtol=0)


def _saved(tmp_path: Path, arch: str = "unet") -> tuple[torch.nn.Module, Path]:
    from clover.families.unet import save_pruned_unet

    model = build_tiny(arch)
    prune_(model, PruneConfig(qk_ratio=0.4, vo_ratio=0.3, allocation="global"))
    out = save_pruned_unet(model, tmp_path / "pruned")
    return model, out


@needs_diffusers
def test_saved_unet_reloads_identically_and_stock_diffusers_refuses_it(tmp_path):
    from diffusers import AutoModel, UNet2DConditionModel

    from clover.families.unet import load_pruned_unet

    model, out = _saved(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["clover"] == json.loads(
        json.dumps(model.config.clover)
    )
    assert config["auto_map"] == {"AutoModel": "modeling_clover.CloverUNet2DConditionModel"}
    assert {"diffusion_pytorch_model.safetensors", "modeling_clover.py"} <= {p.name for p in out.iterdir()}
    reloaded = load_pruned_unet(out)
    torch.testing.assert_close(model_output(reloaded), model_output(model), atol=0, rtol=0)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="expected shape"):  # its config builds the unpruned widths
        UNet2DConditionModel.from_pretrained(out)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModel.from_pretrained(str(out))


@needs_diffusers
@pytest.mark.parametrize("arch", ["unet"])  # the family-table row README's fresh-process column reads
def test_saved_unet_loads_with_diffusers_automodel_in_a_fresh_process_without_clover(arch, tmp_path):
    model, out = _saved(tmp_path, arch)
    source = (out / "modeling_clover.py").read_text()
    assert not re.search(r"^\s*(import|from) clover\b", source, re.M)
    script = (
        "import sys, torch; sys.path.insert(0, 'tests'); from conftest import model_output\n"
        "from diffusers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "assert 'clover' not in sys.modules, 'the checkpoint must not need clover'\n"
        "from diffusers.models.attention_processor import AttnProcessor2_0\n"
        "try:\n    m.set_attn_processor(AttnProcessor2_0())\n"
        "    raise SystemExit('the stock processor was installed')\n"
        "except ValueError as error:\n    assert 'cannot replace the CloverAttnProcessor' in str(error), error\n"
        f"torch.save(model_output(m), {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=str(REPO))
    reloaded = torch.load(tmp_path / "out.pt", weights_only=True)  # the refused replacement changed nothing
    torch.testing.assert_close(reloaded, model_output(model), atol=1e-6, rtol=0)


@needs_diffusers
def test_a_reloaded_pruned_unet_heals_and_saves_as_a_pruned_unet_again(tmp_path):
    from test_finetune import _train

    from clover.families.unet import load_pruned_unet, save_pruned_unet
    from clover.finetune import CloverModel

    model = _unet()
    prune_(model, PruneConfig(qk_ratio=0.25, vo_ratio=0.5))
    loaded = load_pruned_unet(save_pruned_unet(model, tmp_path / "pruned"))
    clover = CloverModel(loaded)
    torch.testing.assert_close(model_output(clover), model_output(model), atol=1e-5, rtol=0)
    _train(clover, steps=2)
    merged = clover.merge_and_unload()
    expected = model_output(merged)
    assert (expected - model_output(model)).abs().max() > 1e-4  # training changed the function
    healed = load_pruned_unet(save_pruned_unet(merged, tmp_path / "healed"))
    torch.testing.assert_close(model_output(healed), expected, atol=0, rtol=0)
    assert healed.config.clover == loaded.config.clover


@needs_diffusers
def test_diffusers_cannot_replace_a_pruned_attentions_processor(tmp_path):
    """set_attn_processor and its relatives would attend at 1/sqrt(kept dims): refused, the UNet left as it was,
    in memory, after a reload with clover and after a deep copy."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from clover.families.unet import load_pruned_unet

    model, out = _saved(tmp_path)
    expected = model_output(model)
    for unet in (model, load_pruned_unet(out), copy.deepcopy(model)):
        for method, argument in (
            ("set_attn_processor", AttnProcessor2_0()),
            ("set_attn_processor", AttnProcessor()),
            ("set_attention_slice", 1),  # installs SlicedAttnProcessor in every attention
            ("set_attention_slice", None),  # a pipeline's disable_attention_slicing: the default processor
        ):
            with pytest.raises(ValueError, match="cannot replace the CloverAttnProcessor"):
                getattr(unet, method)(argument)
        torch.testing.assert_close(model_output(unet), expected, atol=0, rtol=0)


@needs_diffusers
def test_unsupported_processors_are_refused_with_what_to_do():
    model = _unet()
    model.fuse_qkv_projections()
    with pytest.raises(UnsupportedModelError, match="unfuse_qkv_projections"):
        attention_sites(model)
    model.unfuse_qkv_projections()  # back to AttnProcessor2_0, which the sites reproduce
    assert len(attention_sites(model)) == 16


def test_clover_works_without_diffusers(tmp_path):
    script = (
        "import sys; sys.modules['diffusers'] = None  # as if not installed: importing it raises ImportError\n"
        "import torch, transformers as tf\n"
        "from clover.errors import CloverError\n"
        "from clover.families import family_for\n"
        "from clover.families.unet import load_pruned_unet\n"
        "from clover.prune import PruneConfig, prune_\n"
        "m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=16, n_positions=8, n_embd=16, n_layer=1, n_head=2))\n"
        "prune_(m, PruneConfig(vo_ratio=0.5))\n"
        "try:\n"
        "    load_pruned_unet(sys.argv[1])\n"
        "except CloverError as error:\n"
        "    assert 'diffusion' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('loaded without diffusers')\n"
    )
    config = {"_class_name": "UNet2DConditionModel", "clover": {"sites": {CROSS: {}}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=str(REPO))
