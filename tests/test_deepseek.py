"""DeepSeek MLA: what the family table's generic tests cannot see (RoPE columns, the latent cache, the latent cut)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from conftest import FAMILY_TABLE, VOCAB, build_tiny, model_output

from clover.errors import UnsupportedModelError
from clover.families import attention_sites
from clover.families.deepseek import cut_latent_rank
from clover.prune import InputMoments, PruneConfig, prune_

ARCHS = [arch for arch, row in FAMILY_TABLE.items() if row.latent_cache]


def _calibrate(model: torch.nn.Module) -> None:
    """Calibration inputs (512 tokens), disjoint from ``model_output``'s."""
    ids = torch.randint(3, VOCAB, (16, 32), generator=torch.Generator().manual_seed(7))
    model(input_ids=ids)


def _with_random_norms(arch: str) -> torch.nn.Module:
    """A tiny model whose kv_a_layernorm weights are not all ones, so folding them is tested."""
    model = build_tiny(arch)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.self_attn.kv_a_layernorm.weight
            weight.copy_(0.5 + torch.rand(weight.shape, generator=generator))
    return model


def _plain_truncation(model: torch.nn.Module, rank: int) -> None:
    """Keep the first ``rank`` latent dims as they are (no rotation): the baseline the PCA cut must beat."""
    full = model.config.kv_lora_rank
    for layer in model.model.layers:
        attention = layer.self_attn
        down, up, norm = attention.kv_a_proj_with_mqa, attention.kv_b_proj, attention.kv_a_layernorm
        keep = torch.cat([torch.arange(rank), torch.arange(full, down.out_features)])
        down.weight = torch.nn.Parameter(down.weight.detach()[keep])
        if down.bias is not None:
            down.bias = torch.nn.Parameter(down.bias.detach()[keep])
        up.weight = torch.nn.Parameter(up.weight.detach()[:, :rank])
        norm.weight = torch.nn.Parameter(norm.weight.detach()[:rank])
        attention.kv_lora_rank = rank


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_attention_keeps_exactly_the_rope_columns_and_caches_the_latent(arch):
    model = build_tiny(arch)
    sites = attention_sites(model)
    originals = {}
    for site in sites:
        q = site.module.q_proj if site.module.q_lora_rank is None else site.module.q_b_proj
        heads, nope, rope = site.num_heads, site.module.qk_nope_head_dim, site.module.qk_rope_head_dim
        originals[site.name] = q.weight.detach().unflatten(0, (heads, nope + rope))[:, nope:].flatten(0, 1).clone()
    prune_(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.25))
    for site in sites:
        pruned = model.get_submodule(site.name)
        assert torch.equal(pruned.q_rope_proj.weight, originals[site.name])
        assert not hasattr(pruned, "q_b_proj")  # only the RoPE columns of the original Q projection are kept
        assert pruned.q_proj.out_features == site.num_heads * 8 and pruned.k_proj.out_features == site.num_heads * 8
    cache = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
    rank, rope = model.config.kv_lora_rank, model.config.qk_rope_head_dim
    assert all(l.keys.shape == (1, 1, 3, rank) and l.values.shape == (1, 1, 3, rope) for l in cache.layers)  # noqa: E741


def test_unequal_nope_and_value_widths_are_refused():
    config = FAMILY_TABLE["deepseek_v2"].config()
    config.v_head_dim = 8
    with pytest.raises(UnsupportedModelError, match="v_head_dim"):
        attention_sites(tf.DeepseekV2ForCausalLM(config))


def test_calibration_moments_of_q_are_taken_from_qs_own_input():
    model = build_tiny("deepseek_v2")
    moments = InputMoments.collect(model, _calibrate)
    for site in attention_sites(model):
        assert moments.stats[f"{site.name}|q"][0].shape[0] == site.q.read()[0].shape[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_rotation_at_full_rank_is_exact_and_reloads_with_stock_transformers(arch, tmp_path):
    model = _with_random_norms(arch)
    reference = model_output(model)
    energy = cut_latent_rank(model, model.config.kv_lora_rank, _calibrate)
    assert all(share == pytest.approx(1.0) for share in energy.values())
    torch.testing.assert_close(model_output(model), reference, atol=1e-4, rtol=0)
    model.save_pretrained(tmp_path)
    reloaded = getattr(tf, FAMILY_TABLE[arch].model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(model_output(reloaded), model_output(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_cut_reports_the_share_of_calibration_energy_it_keeps(arch):
    """Per layer, the energy cut_latent_rank returns is the share of Σ σ² of what kv_b_proj read on the
    calibration inputs (kv_a_layernorm's outputs, captured here independently) that its top ``rank`` axes hold."""
    model = _with_random_norms(arch)
    captured: dict[str, list[torch.Tensor]] = {}
    handles = [
        layer.self_attn.kv_a_layernorm.register_forward_hook(
            lambda module, args, out, name=f"model.layers.{i}.self_attn": captured.setdefault(name, []).append(
                out.detach().double().reshape(-1, out.shape[-1])
            )
        )
        for i, layer in enumerate(model.model.layers)
    ]
    _calibrate(model)
    for handle in handles:
        handle.remove()
    energy = cut_latent_rank(model, 24, _calibrate)
    assert sorted(energy) == sorted(captured)
    for name, outputs in captured.items():
        power = torch.linalg.svdvals(torch.cat(outputs)).pow(2)
        expected = float(power[:24].sum() / power.sum())
        assert 0.5 < expected < 1  # a real cut: some energy kept, some dropped
        assert energy[name] == pytest.approx(expected, rel=1e-5)  # float32 forward against float64 moments


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_cut_shrinks_the_cache_beats_plain_truncation_and_prunes_after(arch, tmp_path):
    model = _with_random_norms(arch)
    reference = model_output(model)
    baseline = copy.deepcopy(model)
    _plain_truncation(baseline, 24)
    cut_latent_rank(model, 24, _calibrate)
    error = float((model_output(model) - reference).pow(2).mean() / reference.pow(2).mean())
    plain = float((model_output(baseline) - reference).pow(2).mean() / reference.pow(2).mean())
    assert error < 0.5 * plain, (error, plain)  # measured: about 0.1 against 0.8-1.3 here
    cache = model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=True).past_key_values
    assert all(layer.keys.shape == (1, 1, 4, 24) for layer in cache.layers)
    model.save_pretrained(tmp_path)  # a stock checkpoint with kv_lora_rank = 24
    reloaded = getattr(tf, FAMILY_TABLE[arch].model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(model_output(reloaded), model_output(model), atol=1e-5, rtol=0)
    cut = model_output(model)
    prune_(model, PruneConfig())  # CLOVER's per-head pruning on top of the cut latent
    torch.testing.assert_close(model_output(model), cut, atol=1e-4, rtol=0)


def test_cli_latent_rank_shrinks_the_cache_reports_its_error_and_refuses_where_there_is_no_latent(
    tmp_path, capsys, monkeypatch
):
    """`clover prune --latent-rank`, alone (a stock checkpoint with a smaller kv_lora_rank) and before V-O pruning:
    the cache eval measures shrinks as reported, the reported output change is the probe's, and calibrated moments of
    the cut model are never cached under the checkpoint's key."""
    from test_finetune_cli import byte_tokenizer

    from clover.cli import main
    from clover.models import load_model
    from clover.quality import probe_output

    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))
    config = FAMILY_TABLE["deepseek_v2"].config()
    config.vocab_size, config.max_position_embeddings, config.initializer_range = 257, 256, 0.1
    torch.manual_seed(0)
    tf.DeepseekV2ForCausalLM(config).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    calibration = ["--calibration-samples", "4", "--calibration-length", "32", "--quiet", "--json"]

    def run(*arguments) -> dict:
        capsys.readouterr()
        assert main(["prune", str(tmp_path / "model"), *arguments, *calibration]) == 0
        return json.loads(capsys.readouterr().out)

    alone = run("--latent-rank", "16", "--out", str(tmp_path / "cut"))
    original = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert alone["parameters_before"] == sum(p.numel() for p in original.parameters()) > alone["parameters_after"]
    layers = config.num_hidden_layers
    assert alone["latent_cache_dims_per_token_before"] == layers * (32 + config.qk_rope_head_dim)
    assert alone["latent_cache_dims_per_token_after"] == layers * (16 + config.qk_rope_head_dim)
    cut = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "cut")  # stock transformers
    assert cut.config.kv_lora_rank == 16
    reference = probe_output(load_model(str(tmp_path / "model")))
    change = probe_output(load_model(str(tmp_path / "cut"))) - reference
    assert alone["latent_relative_output_change"] == pytest.approx(float(change.norm() / reference.norm()), rel=1e-4)
    assert 0.5 < alone["latent_energy_kept_min"] < 1

    both = run("--latent-rank", "16", "--vo-ratio", "0.25", "--method", "calibrated", "--out", str(tmp_path / "both"))
    assert (
        both["vo_removed"] == 0.25
        and both["latent_cache_dims_per_token_after"] == alone["latent_cache_dims_per_token_after"]
    )
    assert both["parameters_before"] == alone["parameters_before"]  # the checkpoint's, not the cut model's
    assert json.loads((tmp_path / "both" / "config.json").read_text())["clover"]["latent_rank"] == 16
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # the cut model's moments are not the checkpoint's
    pruned = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "both", trust_remote_code=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    cached = pruned(input_ids=ids, use_cache=True).past_key_values.layers
    original = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "model")(input_ids=ids, use_cache=True)
    assert sum(layer.keys.shape[-1] + layer.values.shape[-1] for layer in cached) < sum(
        layer.keys.shape[-1] + layer.values.shape[-1] for layer in original.past_key_values.layers
    )

    build_tiny("llama").save_pretrained(tmp_path / "llama")
    for arguments, words in (
        ([str(tmp_path / "llama"), "--latent-rank", "8"], "no latent shared by all heads"),
        ([str(tmp_path / "llama"), "--latent-rank", "8", "--stream"], "no latent shared by all heads"),
        ([str(tmp_path / "model"), "--latent-rank", "99"], "has 32 dims (kv_lora_rank)"),
        ([str(tmp_path / "model"), "--latent-rank", "0"], "≥ 1"),
        ([str(tmp_path / "model"), "--latent-rank", "8", "--stream"], "--no-stream"),
    ):
        capsys.readouterr()
        assert main(["prune", *arguments, "--out", str(tmp_path / "refused"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err
        assert not (tmp_path / "refused").exists()
