"""The command line: decompose writes a checkpoint that plain from_pretrained loads; errors exit with code 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny, model_output

from clover.cli import main


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = build_tiny("gpt2")
    path = tmp_path / "tiny-gpt2"
    model.save_pretrained(path)
    return path, model


def test_decompose_writes_a_checkpoint_that_from_pretrained_loads(tiny_checkpoint, tmp_path, capsys):
    import transformers as tf

    path, model = tiny_checkpoint
    out = tmp_path / "out"
    assert main(["decompose", str(path), "--out", str(out), "--json", "--quiet", "--no-verify"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attention_sites"] == 2
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(model_output(reloaded), model_output(model), atol=1e-4, rtol=0)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no staging directory left behind"


def test_decompose_refuses_to_overwrite_and_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["decompose", str(path), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["spectrum", "no-such-model", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "smollm2-135m" in err


def test_spectrum_prints_rows_and_draws_a_plot(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    plot = tmp_path / "spectrum.png"
    assert main(["spectrum", str(path), "--out", str(plot), "--json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {(r["layer"], r["pair"]) for r in rows} == {(0, "qk"), (0, "vo"), (1, "qk"), (1, "vo")}
    assert all(r["sigma_max"] >= r["sigma_median"] >= r["sigma_min"] >= 0 for r in rows)
    assert plot.stat().st_size > 10_000


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["decompose", "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--dtype", "--compute-dtype", "--no-verify", "--overwrite", "--json", "--quiet"):
        assert option in text


def test_prune_writes_a_smaller_checkpoint_and_reports_json(tiny_checkpoint, tmp_path, capsys):
    path, model = tiny_checkpoint
    out = tmp_path / "pruned"
    code = main(["prune", str(path), "--qk-ratio", "0.5", "--vo-ratio", "0.25", "--allocation", "global",
                 "--out", str(out), "--json", "--quiet"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["qk_removed"] == 0.5 and report["vo_removed"] == 0.25
    assert report["parameters_after"] < report["parameters_before"]
    assert (out / "modeling_clover.py").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--vo-ratio", "1.5"], "[0, 1)"),
        (["--qk-ratio", "-0.2"], "[0, 1)"),
        (["--threshold", "nan"], "finite"),
        ([], "nothing to prune"),
    ],
)
def test_prune_user_mistakes_exit_2_and_write_nothing(tiny_checkpoint, tmp_path, capsys, arguments, message):
    path, _ = tiny_checkpoint
    out = tmp_path / "never"
    assert main(["prune", str(path), "--out", str(out), "--quiet", *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_prune_refuses_rope_qk_and_points_to_vo(tmp_path, capsys):
    from conftest import build_tiny

    path = tmp_path / "llama"
    build_tiny("llama").save_pretrained(path)
    assert main(["prune", str(path), "--qk-ratio", "0.3", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--vo-ratio" in capsys.readouterr().err
