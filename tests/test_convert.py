"""Conversions that never hold the model (GGUF by clover.convert, CTranslate2 Whisper by clover.models) write
exactly the weights transformers' in-memory loaders make, and stay far below the model's size in memory."""

from __future__ import annotations

import json
import pathlib
import re
import struct
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperForConditionalGeneration
from transformers.convert_slow_tokenizer import bytes_to_unicode

from clover import models
from clover.convert import gguf_to_checkpoint
from clover.errors import CloverError

Q8_0, Q4_0, F16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F16
EXACT = dict(rtol=0, atol=0)  # the converter runs the same dequantisation and processors: bit-identical
SENTENCE = "the theory of the thing"


def _tokenizer_metadata(writer: gguf.GGUFWriter, scores: bool = False) -> int:
    """A byte-level BPE (GPT-2's 256 byte symbols, three merges) and an end-of-text token; returns the vocab size."""
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    if scores:
        writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    return len(tokens)


def write_llama_gguf(
    path: pathlib.Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 128
) -> pathlib.Path:
    """A random Llama GGUF as llama.cpp lays one out: Q8_0 / Q4_0 / F16 matrices, F32 norms, tied output."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    vocab = _tokenizer_metadata(writer)

    def matrix(name: str, rows: int, cols: int, qtype: gguf.GGMLQuantizationType = Q8_0) -> None:
        values = rng.normal(0.0, 0.1, (rows, cols)).astype(np.float32)
        writer.add_tensor(name, gguf.quantize(values, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1 + rng.normal(0.0, 0.1, hidden)).astype(np.float32))

    kv = kv_heads * hidden // heads
    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)  # stored row-permuted for llama.cpp's RoPE
        matrix(f"blk.{i}.attn_k.weight", kv, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv, hidden, Q4_0)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn, F16)
    norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_conversion_equals_transformers_load(tmp_path, dtype):
    source = write_llama_gguf(tmp_path / "tiny.gguf")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name, dtype=dtype)
    out = tmp_path / "out"
    out.mkdir()
    gguf_to_checkpoint(source, out, dtype=dtype, shard_bytes=2**16)  # small shards: several, and their index

    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 2 + 2 * 9
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "generation_config.json").is_file()
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    expected, got = reference.state_dict(), converted.state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **EXACT, msg=name)
    ids = torch.tensor([[0, 5, 17, 200, 258, 3, 99]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, **EXACT)
    original = AutoTokenizer.from_pretrained(tmp_path, gguf_file=source.name)
    assert AutoTokenizer.from_pretrained(out)(SENTENCE).input_ids == original(SENTENCE).input_ids


def test_gguf_experts_merged_from_several_tensors_are_refused(tmp_path):
    """transformers fills Qwen2-MoE's gate_up_proj from two GGUF tensors: one tensor at a time cannot."""
    rng = np.random.default_rng(0)
    hidden, kv, ffn, experts = 32, 16, 16, 4
    writer = gguf.GGUFWriter(str(tmp_path / "moe.gguf"), "qwen2moe")
    for add, value in [("context_length", 64), ("embedding_length", hidden), ("block_count", 1),
                       ("feed_forward_length", ffn), ("head_count", 4), ("head_count_kv", 2),
                       ("layer_norm_rms_eps", 1e-5), ("expert_count", experts), ("expert_used_count", 2),
                       ("expert_feed_forward_length", ffn), ("expert_shared_feed_forward_length", ffn)]:  # fmt: skip
        getattr(writer, f"add_{add}")(value)
    vocab = _tokenizer_metadata(writer, scores=True)
    shapes = {
        "token_embd.weight": (vocab, hidden), "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv, hidden),
        "blk.0.attn_v.weight": (kv, hidden),
        "blk.0.attn_q.bias": (hidden,), "blk.0.attn_k.bias": (kv,), "blk.0.attn_v.bias": (kv,),
        "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate_inp.weight": (experts, hidden),
        "blk.0.ffn_gate_exps.weight": (experts, ffn, hidden), "blk.0.ffn_up_exps.weight": (experts, ffn, hidden),
        "blk.0.ffn_down_exps.weight": (experts, hidden, ffn), "output_norm.weight": (hidden,),
    }  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.normal(0.0, 0.1, shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CloverError, match=r"builds model\.layers\.0\.mlp\.experts\.gate_up_proj from several GGUF"):
        gguf_to_checkpoint(tmp_path / "moe.gguf", tmp_path, dtype=torch.float32)


_PEAK_SCRIPT = textwrap.dedent("""
    import json, pathlib, sys, torch
    from clover.convert import gguf_to_checkpoint
    tiny, big, scratch = map(pathlib.Path, sys.argv[1:4])
    # a first conversion loads every module the second needs: what is measured is data, not code
    (scratch / "warm").mkdir()
    gguf_to_checkpoint(tiny, scratch / "warm", dtype=torch.float32)

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current resident size
    start = status("VmRSS")
    (scratch / "out").mkdir()
    gguf_to_checkpoint(big, scratch / "out", dtype=torch.float32, shard_bytes=16 * 2**20)
    print(json.dumps({"start": start, "peak": status("VmHWM")}))
""")


@pytest.mark.skipif(not pathlib.Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_gguf_conversion_peak_memory_stays_far_below_the_model(tmp_path):
    """A 61M-parameter model (244 MB in float32) converts within about its largest tensor (17 MB) plus one 16 MiB
    shard (measured: 33 MiB); the in-memory loader holds all 244 MB and more."""
    tiny = write_llama_gguf(tmp_path / "tiny.gguf")
    big = write_llama_gguf(tmp_path / "big.gguf", hidden=1024, layers=4, heads=16, kv_heads=4, ffn=4096)
    float32_bytes = 4 * (4 * (2 * 1024 * 1024 + 2 * 256 * 1024 + 3 * 4096 * 1024 + 2 * 1024) + 260 * 1024 + 1024)
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tiny), str(big), str(tmp_path)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    grown = memory["peak"] - memory["start"]
    print(f"peak grew by {grown / 2**20:.0f} MiB converting a {float32_bytes / 2**20:.0f} MiB (float32) model")
    assert grown < 0.3 * float32_bytes
    weight_map = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(weight_map) == 2 + 4 * 9 and len(set(weight_map.values())) >= float32_bytes // (16 * 2**20)


# ---------------------------------------------------------------- real checkpoints


def _roots(name: str) -> list[pathlib.Path]:
    spec = models.SHORT_NAMES[name]
    try:
        return models._package_roots(name, spec)
    except models.MissingModelPackageError:
        pytest.skip(f"{name}: model package not installed (bash scripts/setup.sh)")


@pytest.mark.real
def test_smollm2_gguf_conversion_equals_transformers_load(tmp_path):
    source = models._find(_roots("smollm2-135m")[0], "*.gguf")
    gguf_to_checkpoint(source, tmp_path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    expected, got = reference.state_dict(), converted.state_dict()
    assert got.keys() == expected.keys()
    # the first and last layers (q/k carry the reversed RoPE permutation), the embedding and the final norm
    for name in [n for n in expected if re.match(r"model\.(layers\.(0|29)\.|embed_tokens|norm)", n)]:
        torch.testing.assert_close(got[name], expected[name], **EXACT, msg=name)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, **EXACT)


def _ct2_reference(data: bytes) -> dict[str, np.ndarray]:
    """The CTranslate2 model.bin parser as it was before streaming (the whole file in memory), for reference."""
    dtypes, pos, weights = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}, 0, {}

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def text() -> str:
        nonlocal pos
        n = take("H")
        pos += n
        return data[pos - n : pos - 1].decode()

    assert take("I") == 6
    text(), take("I")
    for _ in range(take("I")):
        name, shape = text(), []
        shape = [take("I") for _ in range(take("B"))]
        dtype, nbytes = dtypes[take("B")], take("I")
        weights[name] = np.frombuffer(data, dtype, nbytes // np.dtype(dtype).itemsize, pos).reshape(shape or [-1])
        pos += nbytes
    for _ in range(take("I")):
        alias = text()
        weights[alias] = weights[text()]
    return weights


def _ct2_reference_state_dict(w: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Whisper's weights from CT2's, as the in-memory converter built them."""
    d = w["encoder/conv1/weight"].shape[0]
    sd = {"model.encoder.embed_positions.weight": w["encoder/position_encodings/encodings"],
          "model.decoder.embed_positions.weight": w["decoder/position_encodings/encodings"],
          "model.decoder.embed_tokens.weight": w["decoder/embeddings/weight"]}  # fmt: skip

    def linear(dst, src, weight="weight", bias="bias"):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = w[f"{src}/{weight}"], w[f"{src}/{bias}"]

    def fused(dst, src, names):
        for i, name in enumerate(names):
            sd[f"{dst}.{name}.weight"] = w[f"{src}/weight"][i * d : (i + 1) * d]
            if name != "k_proj":
                sd[f"{dst}.{name}.bias"] = w[f"{src}/bias"][i * d : (i + 1) * d]

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    for side in ("encoder", "decoder"):
        linear(f"model.{side}.layer_norm", f"{side}/layer_norm", "gamma", "beta")
        for i in range(len({k.split("/")[1] for k in w if re.match(rf"{side}/layer_\d+/", k)})):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            fused(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            linear(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm", "gamma", "beta")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            linear(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm", "gamma", "beta")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                fused(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                linear(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm", "gamma", "beta")
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in sd.items()}


@pytest.mark.real
@pytest.mark.parametrize(("name", "chunks"), [("whisper-tiny.en", ["model.bin"]),
                                              ("whisper-base", ["model.bin.part1", "model.bin.part2"])])  # fmt: skip
def test_ct2_whisper_streamed_equals_in_memory_conversion(tmp_path, monkeypatch, name, chunks):
    roots = _roots(name)
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path))
    directory = models.checkpoint_directory(name)
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # the joined scratch file is gone
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    data = b"".join(models._find(root, chunk).read_bytes() for root, chunk in zip(roots, chunks, strict=True))
    expected, got = _ct2_reference_state_dict(_ct2_reference(data)), load_file(directory / "model.safetensors")
    assert got.keys() == expected.keys()  # the output head is tied to the embedding, stored once
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **EXACT, msg=key)

    loaded = models.load_model(str(directory))
    reference = WhisperForConditionalGeneration(loaded.model.config).eval()
    reference.load_state_dict(expected, strict=False)
    features = torch.randn(1, loaded.model.config.num_mel_bins, 3000, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([loaded.decoder_prompt_ids])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(features, decoder_input_ids=prompt).logits,
            reference(features, decoder_input_ids=prompt).logits,
            **EXACT,
        )
