"""What a user sees around the real work: Ctrl-C at start-up, umask-respecting output modes, eval refusing NaN
weights and options that do not apply, and no stray library warnings on stderr."""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import build_tiny
from test_finetune_cli import byte_tokenizer

import clover.cli
from clover.cli import main
from clover.errors import CloverError
from clover.finetune import get_clover_model
from clover.io import atomic_directory


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    path = tmp_path / "llama"
    build_tiny("llama").save_pretrained(path)
    return path


def test_ctrl_c_while_the_parser_is_built_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted_parser():
        raise KeyboardInterrupt

    monkeypatch.setattr(clover.cli, "build_parser", interrupted_parser)
    assert main(["eval", "anything"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clover: interrupted") and "Traceback" not in err


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_committed_output_has_the_modes_of_a_plain_mkdir_and_open(tmp_path, umask_027):
    out = tmp_path / "out"
    with atomic_directory(out) as staging:
        secret = staging / "weights.bin"
        secret.write_bytes(b"x")
        secret.chmod(0o600)  # as some writers (tempfile) leave their files
        (staging / "nested").mkdir(mode=0o700)
        (staging / "nested" / "config.json").write_text("{}")
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "nested").stat().st_mode) == 0o750
    for path in (out / "weights.bin", out / "nested" / "config.json", out / ".clover-output.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


NAN_METHODS = ("clover", "lora", "pissa")  # an SVD of the weights, training on them, an SVD in PEFT


@pytest.mark.parametrize(
    "command",
    [["eval"], *(["finetune", "--task", "wikitext", "--steps", "1", "--no-eval", "--method", m] for m in NAN_METHODS)],
    ids=["eval", *(f"finetune-{m}" for m in NAN_METHODS)],
)
def test_nan_weights_are_refused_in_one_line(command, tmp_path, capsys):
    """Not an SVD failing to converge (CLOVER, PiSSA), nor "lower --lr" after training on nan (LoRA)."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    byte_tokenizer().save_pretrained(tmp_path / "nan")
    capsys.readouterr()  # transformers' saving bar
    out_dir = ["--out", str(tmp_path / "out")] if command[0] == "finetune" else []
    assert main([command[0], str(tmp_path / "nan"), *command[1:], *out_dir, "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert "nan" not in out.lower()
    assert err.count("\n") == 1 and "NaN or Inf" in err and "v_proj" in err, err
    assert not (tmp_path / "out").exists()


def test_the_clover_adapter_refuses_nan_weights_before_factorizing():
    model = build_tiny("gpt2")
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[0, 0] = float("inf")
    with pytest.raises(CloverError, match="h.1.attn.*NaN or Inf"):
        get_clover_model(model)


def test_eval_notes_that_sentences_does_not_apply_to_a_causal_lm(llama_dir, capsys):
    capsys.readouterr()  # transformers' saving bar
    assert main(["eval", str(llama_dir), "--sentences", "5", "--tokens", "16", "--window", "8", "--quiet"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "--sentences" in line]
    assert notes == [
        f"clover: note: --sentences applies to speech models (Whisper: spoken sentences scored); {llama_dir} is a "
        "causal LM, so it is ignored"
    ]


def test_eval_notes_that_tokens_beyond_the_split_scored_the_whole_split(tmp_path, monkeypatch, capsys):
    llama_dir = tmp_path / "llama"
    tf.LlamaForCausalLM(tf.LlamaConfig(**{**build_tiny("llama").config.to_dict(), "vocab_size": 257})).save_pretrained(
        llama_dir
    )
    byte_tokenizer().save_pretrained(llama_dir)
    split = tmp_path / "wikitext-2-raw-v1"
    split.mkdir()
    (split / "test.jsonl").write_text('{"text": " = A short split = "}\n{"text": "of a few words."}\n')
    monkeypatch.setenv("CLOVER_DATA_DIR", str(tmp_path))
    capsys.readouterr()  # transformers' saving bar
    assert main(["eval", str(llama_dir), "--tokens", "100000", "--window", "8", "--quiet", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert 2 <= report["ppl_split_tokens"] < 100_000 and report["ppl_tokens"] <= report["ppl_split_tokens"]
    notes = [line for line in err.splitlines() if "--tokens" in line]
    assert notes == [
        f"clover: note: --tokens 100000 is more than WikiText-2's test split holds ({report['ppl_split_tokens']} "
        "tokens with this tokenizer); scored all of it"
    ]
    assert main(["eval", str(llama_dir), "--tokens", "4", "--window", "8", "--quiet", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "ppl_split_tokens" not in json.loads(out) and "--tokens" not in err


def test_eval_says_nothing_about_sentences_left_at_its_default(llama_dir, capsys):
    capsys.readouterr()  # transformers' saving bar
    assert main(["eval", str(llama_dir), "--tokens", "16", "--window", "8", "--quiet"]) == 0
    assert "--sentences" not in capsys.readouterr().err


def test_pruning_heads_to_zero_width_prints_no_torch_warning(llama_dir, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["prune", str(llama_dir), "--vo-ratio", "0.9999", "--min-dims", "0", "--quiet",
                     "--out", str(tmp_path / "pruned")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert not [w for w in caught if "zero-element" in str(w.message)]


def test_saving_an_adapter_into_a_users_folder_keeps_the_modes_of_the_users_files(tmp_path, umask_027):
    from clover.finetune import get_clover_model

    folder = tmp_path / "mine"
    (folder / "private").mkdir(parents=True)
    folder.chmod(0o700)
    (folder / "private").chmod(0o700)
    notes = folder / "notes.txt"
    notes.write_text("mine")
    notes.chmod(0o600)
    get_clover_model(build_tiny("llama")).save_pretrained(folder)
    assert notes.read_text() == "mine"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE(notes.stat().st_mode) == 0o600  # a hard link of the user's file: chmod would change theirs
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.glob("*.safetensors")} == {0o640}


def test_ctrl_c_after_the_output_was_committed_says_it_is_complete(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def prune_then_interrupted(args):
        with atomic_directory(out) as staging:
            (staging / "config.json").write_text("{}")
        raise KeyboardInterrupt  # pressed while the report is printed

    monkeypatch.setattr(clover.cli, "cmd_prune", prune_then_interrupted)
    assert main(["prune", "anything", "--vo-ratio", "0.5", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err == f"clover: interrupted after {out} was written (complete); nothing else was written\n"
    assert (out / "config.json").read_text() == "{}"


def test_ctrl_c_while_finetune_scores_says_nothing_was_written_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    # the adapter is already saved (inside the output's staging folder) when scoring starts: it is not complete
    from test_finetune_cli import byte_tokenizer

    import clover.finetune_run

    model = tmp_path / "model"
    config = tf.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    capsys.readouterr()  # transformers' saving bar

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(clover.finetune_run, "wikitext2_test_perplexity", interrupted)
    out = tmp_path / "run"
    arguments = ["finetune", str(model), "--task", "wikitext", "--steps", "1", "--batch-size", "1", "--max-length",
                 "16", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(arguments) == 130
    assert capsys.readouterr().err == "clover: interrupted; nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("out", ["", "/proc/clover-out"], ids=["empty", "no-folder-can-be-made"])
def test_an_out_where_no_folder_can_be_made_is_refused_before_any_work(out, llama_dir, capsys, monkeypatch):
    import clover.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(clover.models, "load_model", never)
    capsys.readouterr()
    for command in (["prune", str(llama_dir), "--vo-ratio", "0.5"], ["decompose", str(llama_dir)]):
        assert main([*command, "--out", out, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("clover: error: --out") and err.count("\n") == 1, err


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_the_recorded_source_is_the_absolute_folder_so_eval_compares_from_anywhere(
    llama_dir, tmp_path, monkeypatch, stream
):
    monkeypatch.chdir(llama_dir.parent)
    assert main(["prune", "llama", "--vo-ratio", "0.5", "--out", "pruned", "--quiet", stream]) == 0
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    # eval reloads the source to compare against: "llama" would be another folder, or none, from elsewhere
    assert config["clover"]["source"] == str(llama_dir.resolve())


def test_a_reader_that_leaves_the_pipe_ends_the_command_quietly(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "CLOVER_CACHE": str(tmp_path)}
    run = subprocess.Popen([sys.executable, "-c", "import sys; from clover.cli import main; sys.exit(main(['cache']))"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    run.stdout.close()  # `clover cache | head -0`: gone before the first line
    assert run.wait(timeout=120) == 141  # as a tool stopped by SIGPIPE
    assert run.stderr.read().decode() == ""
