"""The command line on a diffusers UNet (the tiny SDXL-like one of the family table, saved with save_pretrained):
decompose verified on a seeded denoising step and reloaded by stock diffusers, prune by stack, a pipeline
directory read through its unet/ subfolder, eval against the recorded original, spectrum rows, and one-line
refusals (calibration data, --stream, a foreign --overwrite target, a damaged config, diffusers missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, model_output

pytest.importorskip("diffusers", reason="diffusers (the 'diffusion' extra) is not installed")

from clover.cli import main  # noqa: E402
from clover.decompose import decompose_  # noqa: E402
from clover.prune import PruneConfig, prune_  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CROSS = "down_blocks.1.attentions.0.transformer_blocks.1.attn2"  # 4 heads of 16 dims, K/V read 32-wide text states


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "unet"
    build_tiny("unet").save_pretrained(path)
    return path


def _run(capsys, *arguments) -> tuple[int, str, list[str]]:
    """Exit code, stdout and the non-empty stderr lines of one in-process ``clover`` command."""
    capsys.readouterr()
    code = main([str(a) for a in arguments])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, [line for line in err.splitlines() if line.strip()]


def _attention_parameters(model: torch.nn.Module) -> int:
    """q, k, v and to_out.0 of every attn1 / attn2, counted from the parameter names."""
    return sum(p.numel() for name, p in model.named_parameters() if ".attn1.to_" in name or ".attn2.to_" in name)


def test_decompose_is_exact_and_stock_diffusers_reloads_it(unet_dir, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "decomposed"
    code, stdout, err = _run(capsys, "decompose", unet_dir, "--out", out, "--json", "--quiet")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["attention_sites"] == 16 and report["relative_output_change"] < 1e-4  # float32 weights
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in out.iterdir()}
    reloaded = UNet2DConditionModel.from_pretrained(out).eval()  # stock diffusers: decompose keeps every shape
    expected = build_tiny("unet")
    original = model_output(expected)
    decompose_(expected)  # the same rewrite in Python
    torch.testing.assert_close(model_output(reloaded), model_output(expected), atol=1e-6, rtol=0)
    assert (model_output(reloaded) - original).norm() / original.norm() < 1e-4
    assert json.loads((out / "config.json").read_text())["clover"]["source"] == str(unet_dir)

    code, stdout, err = _run(capsys, "eval", out, "--json", "--quiet")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["kind"] == "unet" and result["relative_error_to_original"] < 1e-5


@pytest.mark.parametrize("stack", ["self", "cross"])
def test_prune_one_stack_narrows_only_its_modules(stack, unet_dir, tmp_path, capsys):
    from clover.families.unet import CloverAttnProcessor, load_pruned_unet

    out = tmp_path / "pruned"
    ratios = ("--qk-ratio", "0.5", "--vo-ratio", "0.25")
    code, stdout, err = _run(capsys, "prune", unet_dir, *ratios, "--stacks", stack, "--out", out, "--json", "--quiet")
    assert code == 0, err
    report = json.loads(stdout)
    pruned, original = load_pruned_unet(out), build_tiny("unet")
    assert {spec["stack"] for spec in pruned.config.clover["sites"].values()} == {stack}
    assert len(pruned.config.clover["sites"]) == 8 and pruned.config.clover["source"] == str(unet_dir)
    for name, module in pruned.named_modules():
        if not hasattr(module, "to_q") or not hasattr(module, "processor"):
            continue
        if ("cross" if module.is_cross_attention else "self") == stack:
            assert isinstance(module.processor, CloverAttnProcessor)
            assert (module.to_q.out_features, module.to_v.out_features) == (32, 48)  # 4 heads keep 8 / 12 dims
        else:  # the other stack's weights are the checkpoint's own
            kept = original.get_submodule(name)
            for label in ("to_q", "to_k", "to_v"):
                torch.testing.assert_close(getattr(module, label).weight, getattr(kept, label).weight, atol=0, rtol=0)
    expected = build_tiny("unet")
    prune_(expected, PruneConfig(qk_ratio=0.5, vo_ratio=0.25, stacks=(stack,)))
    torch.testing.assert_close(model_output(pruned), model_output(expected), atol=1e-6, rtol=0)

    code, stdout, err = _run(capsys, "eval", out, "--json", "--quiet")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["parameters"] == report["parameters_after"] == sum(p.numel() for p in pruned.parameters())
    removed = report["attention_parameters_before"] - report["attention_parameters_after"]
    assert result["attention_parameters"] == _attention_parameters(original) - removed
    assert 1e-4 < result["relative_error_to_original"] < 1  # a quarter of V-O, half of Q-K: changed, not broken


def test_a_pipeline_directory_is_read_through_its_unet_subfolder(unet_dir, tmp_path, capsys):
    pipeline = tmp_path / "sdxl"
    shutil.copytree(unet_dir, pipeline / "unet")
    (pipeline / "vae").mkdir()
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}  # fmt: skip
    (pipeline / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "pruned"
    code, _, err = _run(capsys, "prune", pipeline, "--vo-ratio", "0.5", "--out", out, "--quiet")
    assert code == 0 and len(err) == 1 and f"reading its UNet2DConditionModel in {pipeline / 'unet'}" in err[0], err
    assert json.loads((out / "config.json").read_text())["clover"]["source"] == str(pipeline)
    code, stdout, err = _run(capsys, "eval", out, "--json", "--quiet")  # the original: the pipeline's unet again
    assert code == 0, err
    assert 0 < json.loads(stdout)["relative_error_to_original"] < 1


def test_eval_of_a_plain_unet_reports_parameters_and_why_there_is_no_error(unet_dir, capsys):
    code, stdout, err = _run(capsys, "eval", unet_dir, "--json", "--quiet")
    assert code == 0, err
    result = json.loads(stdout)
    model = build_tiny("unet")
    assert result["parameters"] == sum(p.numel() for p in model.parameters()) == 1_327_972
    assert result["attention_parameters"] == _attention_parameters(model) == 230_400
    assert result["dtype"] == "float32" and "no original recorded" in result["skipped"]


def test_spectrum_rows_are_each_heads_singular_values(unet_dir, capsys):
    code, stdout, err = _run(capsys, "spectrum", unet_dir, "--json", "--quiet")
    assert code == 0, err
    rows = json.loads(stdout)["rows"]
    assert len(rows) == 32 and {r["stack"] for r in rows} == {"self", "cross"}
    attn = build_tiny("unet").get_submodule(CROSS)
    w_q, w_k, w_v = (getattr(attn, name).weight.detach().double() for name in ("to_q", "to_k", "to_v"))
    w_o = attn.to_out[0].weight.detach().double()  # nn.Linear layout (out, in): head h's rows / columns below
    heads = [slice(16 * h, 16 * (h + 1)) for h in range(4)]
    # each head's (64, 32) logits form and (32, 64) value-output map: rank 16, their 16 nonzero singular values
    qk = torch.stack([torch.linalg.svdvals(w_q[h].T @ w_k[h])[:16] for h in heads])
    vo = torch.stack([torch.linalg.svdvals(w_v[h].T @ w_o[:, h].T)[:16] for h in heads])
    for pair, values in (("qk", qk), ("vo", vo)):
        row = next(r for r in rows if r["site"] == CROSS and r["pair"] == pair)
        measured = torch.tensor([row["sigma_max"], row["sigma_min"]], dtype=torch.float64)
        torch.testing.assert_close(measured, torch.stack([values.max(), values.min()]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["calibrated", "vanilla-activation"])
def test_calibrated_methods_are_refused_in_one_line(method, unet_dir, tmp_path, capsys, monkeypatch):
    from clover import models

    def no_loading(*args, **kwargs):
        raise AssertionError("refused only after loading the UNet")

    monkeypatch.setattr(models, "load_model", no_loading)  # the refusal comes before the load
    out = tmp_path / "pruned"
    code, _, err = _run(capsys, "prune", unet_dir, "--vo-ratio", "0.5", "--method", method, "--out", out, "--quiet")
    assert code == 2 and len(err) == 1 and "calibrate(model) callback" in err[0], err
    assert not out.exists()


def test_stream_is_refused_and_never_chosen_for_a_unet(unet_dir, tmp_path, capsys, monkeypatch):
    from clover import cli
    from clover.families.unet import load_pruned_unet

    code, _, err = _run(capsys, "prune", unet_dir, "--vo-ratio", "0.5", "--stream", "--out", tmp_path / "a", "--quiet")
    assert code == 2 and len(err) == 1 and "drop --stream" in err[0], err
    monkeypatch.setattr(cli, "STREAM_FRACTION", 0.0)  # any transformers checkpoint would stream now
    code, _, err = _run(capsys, "prune", unet_dir, "--vo-ratio", "0.5", "--out", tmp_path / "b", "--quiet")
    assert code == 0 and not err, err
    assert len(load_pruned_unet(tmp_path / "b").config.clover["sites"]) == 16


def test_overwrite_replaces_only_a_unet_directory_clover_wrote(unet_dir, tmp_path, capsys):
    from clover.io import MARKER

    out = tmp_path / "pruned"
    arguments = ("prune", unet_dir, "--vo-ratio", "0.5", "--out", out, "--quiet", "--overwrite")
    assert _run(capsys, *arguments)[0] == 0
    (out / MARKER).unlink()  # as written before the marker existed: recognised by its file names and config.clover
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "modeling_clover.py",
    }
    assert _run(capsys, *arguments)[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, *arguments)
    assert code == 2 and len(err) == 1 and "holds files clover did not write" in err[0], err
    assert (out / "notes.txt").read_text() == "mine"


def test_damaged_unet_files_are_one_line_errors(unet_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(unet_dir, broken)
    config = (broken / "config.json").read_text()
    (broken / "config.json").write_text(config[: len(config) // 2])
    code, _, err = _run(capsys, "prune", broken, "--vo-ratio", "0.5", "--out", tmp_path / "out", "--quiet")
    assert code == 2 and len(err) == 1 and "is not valid JSON" in err[0], err
    settings = json.loads(config)
    (broken / "config.json").write_text(json.dumps({**settings, "cross_attention_dim": 48}))  # not these weights
    code, _, err = _run(capsys, "eval", broken, "--quiet")
    assert code == 2 and len(err) == 1 and "cannot load the checkpoint" in err[0] and "to_k.weight" in err[0], err
    (broken / "config.json").write_text(config)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = _run(capsys, "decompose", broken, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and len(err) == 1 and "cannot load the checkpoint" in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_checkpoints_dtype_is_kept_unless_one_is_asked_for(unet_dir, tmp_path):
    from clover.models import load_model

    build_tiny("unet").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert load_model(str(tmp_path / "bf16"), dtype=None).model.dtype == torch.bfloat16
    assert load_model(str(tmp_path / "bf16")).model.dtype == torch.float32


def test_without_diffusers_the_cli_says_which_extra_to_install(unet_dir):
    script = (
        "import sys; sys.modules['diffusers'] = None  # as if not installed: importing it raises ImportError\n"
        "from clover.cli import main\n"
        "sys.exit(main(['eval', sys.argv[1], '--quiet']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(unet_dir)], capture_output=True, text=True, cwd=REPO)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "pip install 'clover-attention[diffusion]'" in lines[0]
