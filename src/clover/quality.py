"""One quality report per model kind (the numbers `clover eval` prints and the benchmarks record), and the
calibration passes that calibrated CLOVER whitens with. Evaluation and calibration data never overlap:
WikiText-2 test vs validation, SST-2 sentences [0, n) vs [n, 2n), Harvard sentences 1-20 vs 21-40, and the
photographs of vision.SCORING_IMAGES vs vision.CALIBRATION_IMAGES."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pathlib
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from . import evaluate, vision
from .errors import CloverError, CloverWarning
from .families import Family, attention_sites, checkpoint_family
from .io import process_alive
from .models import LoadedModel, load_model, model_cache_dir
from .prune import InputMoments

SPEECH_EVAL_SENTENCES = 20
SPEECH_CALIBRATION_SENTENCES = 20  # Harvard sentences 21-40: after the evaluation ones, never scored


def parameter_count(model: nn.Module) -> int:
    """Parameters as stored (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def attention_parameter_count(model: nn.Module) -> int:
    """Parameters of the attention projections (q, k, v and o of every site, pruned or not; a fused one once)."""
    owners = {}
    for site in attention_sites(model, allow_pruned=True):
        for projection in (site.q, site.k, site.v, site.o):
            module = projection.owner()[0]
            owners[id(module)] = module
    return sum(p.numel() for module in owners.values() for p in module.parameters(recurse=False))


def reads_text_and_images(loaded: LoadedModel) -> bool:
    """A two-tower model that takes token ids and images together (CLIP, SigLIP): an encoder whose config holds a
    ``text_config`` and a ``vision_config`` with an image size."""
    config = loaded.model.config
    return (
        loaded.kind == "encoder"
        and hasattr(config, "text_config")
        and hasattr(getattr(config, "vision_config", None), "image_size")
    )


def probe_output(loaded: LoadedModel) -> torch.Tensor:
    """A fixed, cheap forward pass used to check that a rewrite kept the model's function.

    Its input is seeded random token ids within the vocabulary (random log-mel features for a speech encoder, the
    same ids as decoder input for a text encoder-decoder, one shipped photograph for an image encoder, ids and a
    random image for a text-image model), so it needs no tokenizer, and at most 16 tokens, so it fits any model's
    context. A family that reads its own checkpoints (a diffusers UNet) probes itself: one seeded denoising step."""
    from .evaluate import context_length, encoder_of
    from .families import family_for

    model = loaded.model
    own = checkpoint_family(loaded.kind)
    if own is not None:
        return own.probe_output(model)
    device = next(model.parameters()).device
    if reads_text_and_images(loaded):  # both towers' hidden states and the embeddings they compare
        text, image = model.config.text_config, model.config.vision_config
        generator = torch.Generator().manual_seed(0)
        tokens = min(16, getattr(text, "max_position_embeddings", None) or 16)
        ids = torch.randint(0, int(text.vocab_size), (1, tokens), generator=generator)
        pixels = torch.randn(1, image.num_channels, image.image_size, image.image_size, generator=generator)
        with torch.no_grad():
            output = model(input_ids=ids.to(device), pixel_values=pixels.to(device, model.dtype))
        towers = (output.text_model_output.last_hidden_state, output.vision_model_output.last_hidden_state)
        return torch.cat([t.flatten() for t in (*towers, output.text_embeds, output.image_embeds)]).double()
    if loaded.kind == "vision":
        with torch.no_grad():
            pixels = vision.pixel_values(loaded, vision.SCORING_IMAGES[:1]).to(device, model.dtype)
            return encoder_of(model)(pixel_values=pixels).last_hidden_state.double()
    generator = torch.Generator().manual_seed(0)
    if loaded.kind == "encoder" and model.main_input_name == "input_features":  # WhisperForAudioClassification
        frames = 2 * model.config.max_source_positions
        features = torch.randn(1, model.config.num_mel_bins, frames, generator=generator)
        with torch.no_grad():
            return model(input_features=features.to(device, model.dtype)).logits.double()
    tokens = min(16, context_length(model) or 16)
    vocab = model.config.get_text_config().vocab_size  # an image-text model's sits in its text_config
    ids = torch.randint(0, int(vocab), (1, tokens), generator=generator).to(device)
    if loaded.kind == "encoder" and isinstance(model.config.eos_token_id, int):
        ids[:, -1] = model.config.eos_token_id  # a sequence-classification head may pool at EOS (BART's needs one)
    images = family_for(model).probe_inputs(model, ids, generator)  # a model whose text reads images (Mllama)
    with torch.no_grad():
        if loaded.kind == "speech-seq2seq":
            frames = 2 * model.config.max_source_positions
            features = torch.randn(1, model.config.num_mel_bins, frames, generator=generator)
            return model(input_features=features.to(device, model.dtype), decoder_input_ids=ids).logits.double()
        decoder = {"decoder_input_ids": ids} if loaded.kind == "seq2seq-lm" else {}
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids), **decoder, **images)
        return (output.logits if hasattr(output, "logits") else output.last_hidden_state).double()


def source_name(loaded: LoadedModel) -> str | None:
    """The short name or path the (pruned / factorized) model came from, if recorded."""
    return (getattr(loaded.model.config, "clover", None) or {}).get("source") or None


def speech_set(first: int, count: int) -> tuple[list, list[str]]:
    """Synthesised Harvard sentences [first, first + count) and their texts (audio cached on disk)."""
    sentences = evaluate.harvard_sentences()[first : first + count]
    return evaluate.synthesize_speech(sentences, model_cache_dir() / "speech"), sentences


def _no_tokenizer(loaded: LoadedModel) -> str:
    return f"no tokenizer in {loaded.source or loaded.name}; pass --tokenizer DIR (e.g. the original model's directory)"


def measure(
    loaded: LoadedModel,
    *,
    tokens: int = 4096,
    window: int = 512,
    sentences: int = SPEECH_EVAL_SENTENCES,
    reference_embeddings: torch.Tensor | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Quality metric(s), parameter count and KV-cache bytes per token for any supported model kind.

    Without a tokenizer the text metric is left out and ``report["skipped"]`` says why; the parameter count and
    KV bytes (measured on fixed token ids) are still reported. Windows are cut to the model's context
    (``ppl_window`` is the one used)."""
    model = loaded.model
    report: dict[str, Any] = {"model": loaded.name, "kind": loaded.kind, "parameters": parameter_count(model)}
    limit = evaluate.context_length(model)
    own = checkpoint_family(loaded.kind)
    with torch.inference_mode():
        if own is not None or reads_text_and_images(loaded) or loaded.kind == "image-text-to-text":
            # no shipped data is scored for these yet (a UNet reads no text; CLIP and Mllama need paired text and
            # images): the output on fixed seeded inputs against the original's
            report.update(_probe_quality(loaded))
        elif loaded.kind == "causal-lm":
            if loaded.tokenizer is None:
                report["skipped"] = f"wikitext2_test_ppl: {_no_tokenizer(loaded)}"
            else:
                result = evaluate.perplexity(
                    model, loaded.tokenizer, evaluate.wikitext2_text("test"),
                    window=evaluate.fitting_window(model, window), max_tokens=tokens,
                    progress=progress,
                )  # fmt: skip
                report.update(wikitext2_test_ppl=result.ppl, ppl_tokens=result.tokens_scored, ppl_window=result.window)
                if result.text_tokens < tokens:  # the whole split was scored: say how much there was
                    report["ppl_split_tokens"] = result.text_tokens
            report["dtype"] = str(model.dtype).removeprefix("torch.")
            report["kv_bytes_per_token"] = evaluate.kv_cache_bytes_per_token(model, loaded.tokenizer)
        elif loaded.kind == "speech-seq2seq":
            if sentences > SPEECH_EVAL_SENTENCES:  # sentences 21-40 calibrate; scoring them would overlap
                raise CloverError(
                    f"--sentences {sentences}: Whisper is scored on at most {SPEECH_EVAL_SENTENCES} sentences "
                    f"(Harvard 1-{SPEECH_EVAL_SENTENCES}; the next {SPEECH_CALIBRATION_SENTENCES} are the "
                    "calibration set, which evaluation never uses)"
                )
            if loaded.tokenizer is None or loaded.decoder_prompt_ids is None:
                report["skipped"] = f"wer, decoder_loss: {_no_tokenizer(loaded)}"
            else:
                texts = evaluate.harvard_sentences()[:sentences]
                prompt = list(loaded.decoder_prompt_ids)
                # teacher forcing feeds prompt + " " + reference + <|endoftext|>: it must fit the decoder
                longest = max(len(loaded.tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in texts)
                if limit is not None and len(prompt) + longest + 1 > limit:
                    raise CloverError(
                        f"{loaded.name}: the decoder holds {limit} tokens but a reference transcript needs "
                        f"{len(prompt) + longest + 1} with its prompt; this model cannot be scored on them"
                    )
                audios, texts = speech_set(0, sentences)
                quality = evaluate.whisper_quality(
                    model, loaded.feature_extractor, loaded.tokenizer, prompt, audios, texts,
                    max_new_tokens=64 if limit is None else max(1, min(64, limit - len(prompt))),
                )  # fmt: skip
                report.update(
                    wer=quality.wer, decoder_loss=quality.decoder_loss, sentences=len(texts),
                    example_transcript=quality.transcripts[0],
                )  # fmt: skip
            cache = evaluate.encoder_decoder_cache_bytes(model, tokens=min(16, limit or 16))
            report.update(
                kv_bytes_per_token=cache.self_attention_per_token,
                cross_kv_bytes_per_frame=cache.cross_attention_per_frame,
            )
        elif loaded.kind == "seq2seq-lm":  # no translation or summarisation data ships: the probe, and the caches
            report.update(_probe_quality(loaded))
            cache = evaluate.encoder_decoder_cache_bytes(model, tokens=min(16, limit or 16))
            report.update(
                kv_bytes_per_token=cache.self_attention_per_token,
                cross_kv_bytes_per_source_token=cache.cross_attention_per_frame,
            )
        elif loaded.kind == "vision":
            report.update(_vision_quality(loaded, reference_embeddings))
        elif model.main_input_name != "input_ids":  # an audio encoder with a task head: no shipped data, the probe
            report.update(_probe_quality(loaded))
        elif loaded.tokenizer is None:
            report["skipped"] = f"similarity_to_original: {_no_tokenizer(loaded)}"
        else:
            texts = evaluate.similarity_sentences(256)
            max_length = min(256, limit or 256)  # longer sentences would index past BERT's position table
            embeddings = evaluate.sentence_embeddings(model, loaded.tokenizer, texts, max_length=max_length)
            original = _original(loaded, report, "similarity_to_original") if reference_embeddings is None else None
            if original is not None:
                reference_embeddings = evaluate.sentence_embeddings(
                    original.model, original.tokenizer or loaded.tokenizer, texts, max_length=max_length
                )
            if reference_embeddings is not None:
                report["similarity_to_original"] = evaluate.embedding_similarity(reference_embeddings, embeddings)
            report["sentences"] = len(texts)
    return report


def _original(loaded: LoadedModel, report: dict[str, Any], metric: str) -> LoadedModel | None:
    """The unpruned model ``loaded`` was pruned from, to compare against; None when none is recorded, or when it
    cannot be loaded any more (moved or deleted since: the report says so, and keeps what needs no original)."""
    if not source_name(loaded):
        return None
    try:
        # in the pruned model's dtype, so that the comparison measures the pruning, not bf16's rounding
        return load_model(source_name(loaded), dtype=loaded.model.dtype)
    except CloverError as error:
        report["skipped"] = f"{metric}: the original model cannot be loaded ({error})"
        return None


def _probe_quality(loaded: LoadedModel) -> dict[str, Any]:
    """Attention parameters, and the relative error (Frobenius) of the probe output (``probe_output``: fixed seeded
    inputs; a UNet's one seeded denoising step) against the recorded original's, where the checkpoint records one:
    the metric of the kinds no text or image data is scored for yet."""
    report: dict[str, Any] = {
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "attention_parameters": attention_parameter_count(loaded.model),
    }
    original = _original(loaded, report, "relative_error_to_original")
    if original is not None:
        reference = probe_output(original).cpu()
        error = (probe_output(loaded).cpu() - reference).norm() / reference.norm().clamp_min(1e-30)
        report["relative_error_to_original"] = float(error)
    elif "skipped" not in report:
        report["skipped"] = "relative_error_to_original: no original recorded (an unpruned model is the original)"
    return report


def _vision_quality(loaded: LoadedModel, reference: torch.Tensor | None) -> dict[str, Any]:
    """Cosine similarity of the CLS and mean patch features to the original model's on the scoring photographs
    (``reference``: vision.image_features of the original; loaded from the recorded source when None)."""
    features = vision.scoring_features(loaded)
    report: dict[str, Any] = {"images": len(features)}
    original = _original(loaded, report, "cls/patch similarity_to_original") if reference is None else None
    if original is not None:
        reference = vision.scoring_features(original)
    if reference is not None:
        report.update(vision.feature_similarity(reference, features))
    elif "skipped" not in report:
        report["skipped"] = "cls/patch similarity_to_original: no original recorded (an unpruned model is the original)"
    return report


def check_calibration_settings(samples: int, seq_len: int) -> None:
    """Refuse calibration sizes that cannot work (checked before any model is loaded)."""
    if samples < 1:
        raise CloverError(f"--calibration-samples {samples} must be at least 1 (held-out sequences; default 128)")
    if seq_len < 2:
        raise CloverError(f"--calibration-length {seq_len} must be at least 2 (tokens per sequence; default 512)")


def refuse_uncalibrated(family: Family | None) -> None:
    """Refuse calibration for a family that reads its own checkpoints (None: a transformers checkpoint, which
    calibrates on text, speech or photographs): it has no text, and clover ships no data of its inputs (a UNet's
    latents and prompts). The CLI asks this of the directory before loading the model."""
    if family is not None:
        raise CloverError(
            f"the command line has no calibration data for {family.examples} yet; use --method clover or vanilla, "
            "or clover.prune.prune_ with your own calibrate(model) callback"
        )


def calibration_samples(loaded: LoadedModel, samples: int) -> int:
    """How many of ``samples`` calibration items the shipped data holds for this kind: Whisper has 20 spoken
    sentences set apart for calibration, vision models the shipped photographs not scored; text has hundreds."""
    if loaded.kind == "speech-seq2seq":
        return min(samples, SPEECH_CALIBRATION_SENTENCES)
    if loaded.kind == "vision":
        return min(samples, len(vision.CALIBRATION_IMAGES))
    return samples


def calibration_length(loaded: LoadedModel, seq_len: int) -> int:
    """Tokens per calibration sequence of text: ``seq_len`` cut to the model's context (Whisper's calibration is
    whole transcripts: ``seq_len`` as given, unused). Raises the one-line CloverError of a checkpoint without a
    tokenizer, since calibration turns text into tokens. Vision models calibrate on whole images: unused."""
    if loaded.kind == "vision":
        return seq_len
    refuse_uncalibrated(checkpoint_family(loaded.kind))
    if loaded.tokenizer is None or (loaded.kind == "speech-seq2seq" and loaded.decoder_prompt_ids is None):
        raise CloverError(f"calibration needs a tokenizer: {_no_tokenizer(loaded)}")
    limit = evaluate.context_length(loaded.model) if loaded.kind != "speech-seq2seq" else None
    if limit is not None and limit < 2:
        raise CloverError(f"{loaded.name}'s context is {limit} token: too short for calibration sequences (at least "
                          "2 tokens); use --method clover or vanilla")  # fmt: skip
    return min(seq_len, limit) if limit is not None else seq_len


def calibration_callback(
    loaded: LoadedModel, *, samples: int = 128, seq_len: int = 512, progress: bool = False
) -> Callable[[nn.Module], None]:
    """A ``calibrate(model)`` for prune_: forward passes over held-out text / speech / photographs (the first
    ``samples`` of vision.CALIBRATION_IMAGES) of the model's kind.

    Sequences are cut to the model's context (see calibration_length); a model without a tokenizer is refused."""
    check_calibration_settings(samples, seq_len)
    if loaded.kind == "seq2seq-lm":
        raise CloverError(
            "the command line has no calibration data for text encoder-decoders (T5, BART, Marian) yet; use --method "
            "clover or vanilla, or clover.prune.prune_ with your own calibrate(model) callback"
        )
    if loaded.kind == "image-text-to-text":  # its vision and cross-attention sites need images with the text
        raise CloverError(
            "the command line has no calibration data for image-text-to-text models (LLaMA-3.2-Vision) yet; use "
            "--method clover or vanilla, or clover.prune.prune_ with your own calibrate(model) callback"
        )
    seq_len = calibration_length(loaded, seq_len)

    def batches(items, size: int):
        starts = range(0, len(items), size)
        for start in tqdm(starts, desc="calibration", unit="batch", disable=not progress, leave=False):
            yield start, items[start : start + size]

    def run(model: nn.Module) -> None:
        device = evaluate._model_device(model)
        if loaded.kind == "causal-lm":
            text = evaluate.wikitext2_text("validation")
            ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
            # like the perplexity windows: each starts with BOS where the tokenizer adds one (Gemma needs it)
            bos = loaded.tokenizer.bos_token_id if evaluate.adds_bos(loaded.tokenizer) else None
            step = seq_len - (bos is not None)
            windows = ids[: (len(ids) // step) * step].view(-1, step)[:samples]
            if bos is not None:
                windows = torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], dim=1)
            # the moments come from the attention inputs: skip the LM head's (B, T, vocab) logits, which for
            # Gemma's 262k vocabulary cost more than the whole model
            keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
            for _, batch in batches(windows, 8):
                model(input_ids=batch.to(device), use_cache=False, **keep)
        elif loaded.kind == "speech-seq2seq":
            audios, texts = speech_set(SPEECH_EVAL_SENTENCES, min(samples, SPEECH_CALIBRATION_SENTENCES))
            prompt = list(loaded.decoder_prompt_ids)
            for start, clips in batches(audios, 8):
                feats = loaded.feature_extractor(clips, sampling_rate=16000, return_tensors="pt").input_features
                rows = [
                    prompt + loaded.tokenizer(" " + t, add_special_tokens=False)["input_ids"]
                    for t in texts[start : start + 8]
                ]
                # equal lengths: no padding tokens in the statistics; at most the decoder's context
                width = min(evaluate.context_length(model) or 10**9, *(len(r) for r in rows))
                decoder_ids = torch.tensor([r[:width] for r in rows])
                model(input_features=feats.to(device, model.dtype), decoder_input_ids=decoder_ids.to(device))
        elif loaded.kind == "vision":
            pixels = vision.pixel_values(loaded, vision.CALIBRATION_IMAGES[:samples])
            for _, batch in batches(pixels, 8):
                model(pixel_values=batch.to(device, model.dtype))
        else:
            texts = evaluate.similarity_sentences(2 * samples)[samples:]
            for _, chunk in batches(texts, 32):
                batch = loaded.tokenizer(chunk, padding=False, truncation=True, max_length=seq_len)
                for row in batch["input_ids"]:  # one sentence at a time: no padding in the statistics
                    model(input_ids=torch.tensor([row], device=device))

    return run


# Bump when the calibration data or the statistics change, so stale cached moments are never reused.
CALIBRATION_VERSION = 1
_SMALL_FILE_BYTES = 50_000_000  # tokenizers, configs, remote code: hashed by content; weights by file identity


def calibration_fingerprint(loaded: LoadedModel, *, samples: int, seq_len: int) -> str | None:
    """A key for the moments of this checkpoint on this calibration set, or None if the weights have no file
    to identify them (a model built in memory). Small files (config, tokenizer, remote code) are hashed by
    content; weight files by name, size, inode, mtime and ctime (ctime changes whenever the file does, and
    cannot be set back by copying tools)."""
    if loaded.source is None:
        return None
    if loaded.kind == "speech-seq2seq":
        samples = min(samples, SPEECH_CALIBRATION_SENTENCES)  # what the callback really uses
    if loaded.kind == "vision":
        samples = min(samples, len(vision.CALIBRATION_IMAGES))
    files = []
    for path in sorted(p for p in loaded.source.iterdir() if p.is_file()):
        stat = path.stat()
        if path.suffix in (".safetensors", ".bin") or stat.st_size > _SMALL_FILE_BYTES:
            files.append((path.name, stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns))
        else:
            files.append((path.name, hashlib.sha256(path.read_bytes()).hexdigest()))
    if loaded.tokenizer_source is not None:  # a tokenizer from elsewhere (--tokenizer) decides the tokens too
        for path in sorted(p for p in loaded.tokenizer_source.iterdir() if p.is_file()):
            if path.suffix not in (".safetensors", ".bin") and path.stat().st_size <= _SMALL_FILE_BYTES:
                files.append((f"tokenizer/{path.name}", hashlib.sha256(path.read_bytes()).hexdigest()))
    identity = {
        "version": CALIBRATION_VERSION,
        "transformers": transformers.__version__,
        "source": str(loaded.source.resolve()),
        "files": files,
        "kind": loaded.kind,
        "dtype": str(loaded.model.dtype),
        "samples": samples,
        "seq_len": seq_len,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def calibration_moments(
    loaded: LoadedModel,
    *,
    samples: int = 128,
    seq_len: int = 512,
    refresh: bool = False,
    progress: bool = False,
    cache: bool = True,
    stream_from: pathlib.Path | None = None,
    device: torch.device | None = None,
) -> tuple[InputMoments, bool]:
    """Input moments of every attention site on the calibration set, and whether they came from the cache.

    Collecting them is the slow part of calibrated pruning (minutes on a CPU), and they depend only on the
    checkpoint and the calibration set, not on the ratio: they are kept under ``$CLOVER_CACHE/moments`` and
    reused by later prunes of the same, unchanged checkpoint (``refresh`` recomputes them). A cache that
    cannot be read or written is skipped with a warning: it never stops a prune. ``cache`` False: neither read
    nor written, for a model changed since it was loaded (its files no longer describe it).

    ``stream_from``: the checkpoint directory of a model larger than memory (``loaded.model`` its skeleton without
    weights), calibrated on ``device``: the moments are collected one layer at a time and read from their file as
    they are used."""
    key = calibration_fingerprint(loaded, samples=samples, seq_len=seq_len) if cache else None
    path = model_cache_dir() / "moments" / f"{key}.safetensors" if key else None
    if path is not None and path.parent.is_dir():
        try:  # what killed runs left (a layer-by-layer calibration's folder holds gigabytes), hit or miss, once
            remove_stale_temporaries(path.parent)
        except OSError:
            pass
    device = device or evaluate._model_device(loaded.model)
    if path is not None and path.is_file() and not refresh:
        try:
            if stream_from is None:
                return InputMoments.load(path, device), True
            return _read_lazily(path, device), True
        except Exception as error:  # a truncated or foreign file: recompute and replace it
            warnings.warn(
                f"ignoring unreadable cached calibration moments {path}: {error}", CloverWarning, stacklevel=2
            )
    callback = calibration_callback(loaded, samples=samples, seq_len=seq_len, progress=progress)
    if stream_from is not None:
        return _streamed_moments(stream_from, callback, path, device, progress, loaded.model.dtype), False
    moments = InputMoments.collect(loaded.model, callback)
    moments.refuse_non_finite()
    if path is not None:
        _store(moments, path)
    return moments, False


def _streamed_moments(
    source: pathlib.Path,
    callback: Callable[[nn.Module], None],
    path: pathlib.Path | None,
    device: torch.device,
    progress: bool,
    dtype: torch.dtype | None = None,
) -> InputMoments:
    """Moments collected one layer at a time into a work folder beside the cache entry ``path`` (linked into
    place once whole) or, without one, in the temporary folder; read back lazily from the work folder, which goes
    when they do. Where the layers are not one stack (encoder-decoders), or the moments cannot be written, the
    model runs module by module instead, its moments held in memory."""
    from .streaming import MomentsNotWritten, layerwise_moments, streamed_calibration_model

    work, path = _work_folder(path)
    try:
        written = layerwise_moments(source, callback, work, device=device, dtype=dtype, progress=progress)
    except MomentsNotWritten as failure:  # a full disk: the moments stay in memory instead
        warnings.warn(f"calibration moments held in memory: cannot write them to disk ({failure.error})",
                      CloverWarning, stacklevel=3)  # fmt: skip
        written = None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if written is None:
        shutil.rmtree(work, ignore_errors=True)
        moments = InputMoments.collect(streamed_calibration_model(source, device, dtype), callback)
        moments.refuse_non_finite()
        if path is not None:
            _store(moments, path)
        return moments
    if path is not None:
        try:  # a second name for the same file: clearing the cache cannot pull it from under this run
            os.link(written, work / "entry")
            os.replace(work / "entry", path)
        except OSError:
            try:  # a filesystem without hard links: the cache entry itself is read
                os.replace(written, path)
                written = path
            except OSError as error:
                warnings.warn(f"calibration moments not cached ({error}); the next prune will recompute them",
                              CloverWarning, stacklevel=3)  # fmt: skip
    return _kept_with(InputMoments.load(written, device, lazy=True), work)


def _read_lazily(path: pathlib.Path, device: torch.device) -> InputMoments:
    """Cached moments read one site at a time, through a second name for the file in a work folder of this run
    (so that clearing the cache cannot pull it away mid-prune); the cache entry itself where that fails."""
    work = None
    try:
        work = _folder_beside(path)
        os.link(path, work / "moments.safetensors")
    except OSError:  # a read-only cache, a filesystem without hard links
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        return InputMoments.load(path, device, lazy=True)
    try:
        return _kept_with(InputMoments.load(work / "moments.safetensors", device, lazy=True), work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _kept_with(moments: InputMoments, work: pathlib.Path) -> InputMoments:
    """``moments`` read from a file in ``work``, which is removed once neither they nor copies of them on another
    device are used."""
    owner = _Folder()
    weakref.finalize(owner, shutil.rmtree, work, True)
    for entry in moments.stats.values():
        entry.keep = owner
    return moments


class _Folder:
    """Keeps a temporary folder while anything refers to it."""


def _folder_beside(path: pathlib.Path) -> pathlib.Path:
    """A new folder of this run beside the cache entry ``path``, named as ``remove_stale_temporaries`` reads."""
    return pathlib.Path(tempfile.mkdtemp(prefix=f".{path.stem}.{os.getpid()}-", suffix=".tmp", dir=path.parent))


def _work_folder(path: pathlib.Path | None) -> tuple[pathlib.Path, pathlib.Path | None]:
    """A new folder for a layer-by-layer calibration, beside the cache entry ``path``, and ``path``; in the
    temporary folder, and None, where there is no cache entry or the cache cannot be written. Either is named
    so that a killed run's is removed by the next run."""
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return _folder_beside(path), path
        except OSError as error:
            warnings.warn(f"calibration moments not cached ({error}); the next prune will recompute them",
                          CloverWarning, stacklevel=4)  # fmt: skip
    remove_stale_temporaries(pathlib.Path(tempfile.gettempdir()), "clover-moments.*.tmp")
    return pathlib.Path(tempfile.mkdtemp(prefix=f"clover-moments.{os.getpid()}-", suffix=".tmp")), None


def _store(moments: InputMoments, path: pathlib.Path) -> None:
    """Write atomically (a reader never sees half a file); on any failure (a full disk, a read-only cache, the
    error types safetensors raises), warn and leave no temporary behind: a cache write never stops a prune."""
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.{os.getpid()}-", suffix=".tmp")
        os.close(handle)
        moments.save(staging)
        os.replace(staging, path)
        staging = None
    except Exception as error:
        warnings.warn(
            f"calibration moments not cached ({error}); the next prune will recompute them", CloverWarning, stacklevel=3
        )
    finally:
        if staging is not None:
            pathlib.Path(staging).unlink(missing_ok=True)


def remove_stale_temporaries(directory: pathlib.Path, pattern: str = ".*.tmp") -> None:
    """Delete the temporary files and folders (a layer-by-layer calibration's) that killed runs left in a cache
    folder (their process is gone)."""
    for entry in directory.glob(pattern):
        pid = entry.name.split(".")[-2].split("-")[0]  # .<key>.<pid>-<random>.tmp
        if pid.isdigit() and not process_alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
