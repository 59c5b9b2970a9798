"""Streaming: decompose and prune a checkpoint one layer at a time from disk to disk. The output equals the
in-memory path's for every family of the table, calibration moments collected layer by layer (or, for encoder-
decoders, with the weights read from disk module by module) equal those of the loaded model, memory stays near
one layer, and an interrupted run leaves nothing that looks complete."""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from conftest import FAMILY_TABLE, auto_class, build_tiny, model_output, qk_ratio

from clover.cli import main
from clover.decompose import decompose_
from clover.errors import CloverError
from clover.families import attention_sites
from clover.io import save_pruned_model
from clover.models import LoadedModel, load_model
from clover.prune import InputMoments, PruneConfig, prune_
from clover.streaming import (
    CheckpointReader,
    ShardWriter,
    layerwise_moments,
    stream_decompose,
    stream_prune,
    streamed_calibration_model,
    write_random_checkpoint,
)

TRANSFORMERS_ROWS = [arch for arch, row in FAMILY_TABLE.items() if row.library == "transformers"]
STREAMING = [arch for arch in TRANSFORMERS_ROWS if FAMILY_TABLE[arch].streams]
CONVERTED = [arch for arch in TRANSFORMERS_ROWS if not FAMILY_TABLE[arch].streams]


def _truncate(file) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _sharded(arch: str, path) -> torch.nn.Module:
    model = build_tiny(arch)
    model.save_pretrained(path, max_shard_size="100KB")  # several shards with their index, as large models come
    return model


@pytest.mark.parametrize("arch", STREAMING)
def test_streamed_decompose_equals_the_in_memory_one(arch, tmp_path):
    model = _sharded(arch, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
    (tmp_path / "out").mkdir()
    sites = stream_decompose(tmp_path / "model", tmp_path / "out")
    reference = copy.deepcopy(model)
    assert sites == len(decompose_(reference))
    # the files name each tensor as the input's did (GPT-NeoX's embed_out, Mllama's language_model.model.*)
    assert set(CheckpointReader(tmp_path / "out").files) == set(CheckpointReader(tmp_path / "model").files)
    streamed = auto_class(arch).from_pretrained(tmp_path / "out").eval().state_dict()
    assert list(streamed) == list(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(streamed[name], tensor, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("arch", STREAMING)
def test_streamed_prune_equals_the_in_memory_one(arch, tmp_path):
    model = _sharded(arch, tmp_path / "model")
    config = PruneConfig(qk_ratio=qk_ratio(arch, 0.25), vo_ratio=0.5, allocation="global")
    (tmp_path / "out").mkdir()
    report = stream_prune(tmp_path / "model", tmp_path / "out", config)
    reference = copy.deepcopy(model)
    expected = prune_(reference, config)
    assert report.sites == expected.sites
    assert (report.params_before, report.params_after) == (expected.params_before, expected.params_after)
    assert (report.kv_dims_per_token_before, report.kv_dims_per_token_after) == (
        expected.kv_dims_per_token_before,
        expected.kv_dims_per_token_after,
    )
    streamed = auto_class(arch, pruned=True).from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    torch.testing.assert_close(model_output(streamed), model_output(reference), atol=1e-5, rtol=0)
    save_pruned_model(LoadedModel(reference, None, "tiny", FAMILY_TABLE[arch].kind), tmp_path / "in-memory")
    assert set(CheckpointReader(tmp_path / "out").files) == set(CheckpointReader(tmp_path / "in-memory").files)


@pytest.mark.parametrize(("arch", "renamed"), [("bert", "with"), ("llama", "without")])
def test_files_named_with_or_without_the_base_prefix_keep_their_convention(arch, renamed, tmp_path):
    # transformers loads a BertModel from "bert.*" names (a head checkpoint's) and a LlamaForCausalLM from names
    # without "model.": every output tensor, pruned or copied through, follows the files' convention
    from safetensors.torch import load_file, save_file

    model = build_tiny(arch)
    model.save_pretrained(tmp_path / "model")
    weights, prefix = load_file(tmp_path / "model" / "model.safetensors"), f"{model.base_model_prefix}."
    if renamed == "with":
        weights = {prefix + name: tensor for name, tensor in weights.items()}
    else:
        weights = {name.removeprefix(prefix): tensor for name, tensor in weights.items()}
    save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    config = PruneConfig(qk_ratio=qk_ratio(arch, 0.25), vo_ratio=0.5)
    (tmp_path / "out").mkdir()
    stream_prune(tmp_path / "model", tmp_path / "out", config)
    names = set(CheckpointReader(tmp_path / "out").files)
    assert all(name.startswith(prefix) for name in names) == (renamed == "with")
    assert not any(name.startswith(prefix) for name in names) == (renamed == "without")
    reference = build_tiny(arch)
    prune_(reference, config)
    streamed = auto_class(arch, pruned=True).from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    torch.testing.assert_close(model_output(streamed), model_output(reference), atol=1e-5, rtol=0)


def test_a_single_file_beside_a_shard_index_is_read_as_from_pretrained_reads_it(tmp_path):
    sharded = _sharded("llama", tmp_path / "model")
    torch.manual_seed(1)
    single = build_tiny("llama")
    with torch.no_grad():
        for tensor in single.parameters():
            tensor.add_(0.01 * torch.randn_like(tensor))  # other weights in the single file than in the shards
    single.save_pretrained(tmp_path / "single")
    os.replace(tmp_path / "single" / "model.safetensors", tmp_path / "model" / "model.safetensors")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.lm_head.weight, single.lm_head.weight) and not torch.equal(
        loaded.lm_head.weight, sharded.lm_head.weight
    )
    (tmp_path / "out").mkdir()
    stream_decompose(tmp_path / "model", tmp_path / "out")
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(model_output(streamed), model_output(single), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", CONVERTED)
def test_checkpoints_transformers_converts_on_load_are_refused_in_one_line(arch, tmp_path):
    _sharded(arch, tmp_path / "model")
    with pytest.raises(CloverError, match="run without --stream") as error:
        stream_decompose(tmp_path / "model", tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch", ["llama", "whisper", "t5", "bert"])
def test_moments_with_weights_read_module_by_module_equal_the_loaded_models(arch, tmp_path):
    model = _sharded(arch, tmp_path / "model")
    expected = InputMoments.collect(model, model_output)
    streamed = InputMoments.collect(streamed_calibration_model(tmp_path / "model"), model_output)
    assert streamed.stats.keys() == expected.stats.keys()
    for name, (gram, total, count) in expected.stats.items():
        assert streamed.stats[name][2] == count
        torch.testing.assert_close(streamed.stats[name][0], gram, atol=1e-8, rtol=1e-9)
        torch.testing.assert_close(streamed.stats[name][1], total, atol=1e-8, rtol=1e-9)


def _drive(model: torch.nn.Module) -> None:
    """model_output's forward passes, for layerwise_moments: there the model stops after its last layer and
    returns None, which model_output cannot read its logits from."""
    try:
        model_output(model)
    except AttributeError as error:
        assert "'NoneType' object has no attribute" in str(error), error


@pytest.mark.parametrize("arch", STREAMING)
def test_moments_collected_layer_by_layer_equal_the_loaded_models(arch, tmp_path):
    model = _sharded(arch, tmp_path / "model")
    (tmp_path / "work").mkdir()
    written = layerwise_moments(tmp_path / "model", _drive, tmp_path / "work")
    if len({site.stack for site in attention_sites(model)}) > 1:  # an encoder and a decoder, two towers
        assert written is None and not any((tmp_path / "work").iterdir())
        return
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["moments.safetensors"]  # the layers' files merged
    expected = InputMoments.collect(model, model_output)
    layered = InputMoments.load(written, lazy=True)
    assert layered.stats.keys() == expected.stats.keys()
    for name, (gram, total, count) in expected.stats.items():
        layered_gram, layered_total, layered_count = layered.stats[name]
        assert layered_count == count
        # the same batches through the same layers: equal, but for DINOv2's layer scale folded into O on reading
        torch.testing.assert_close(layered_gram, gram, atol=1e-6 * float(gram.abs().max()), rtol=0, msg=name)
        torch.testing.assert_close(layered_total, total, atol=1e-6 * float(total.abs().max()), rtol=0, msg=name)


def _four_layers(arch: str) -> torch.nn.Module:
    """A 4-layer model of a table row ("t5-encoder": T5's encoder alone): from the third layer on, a layer's
    recorded arguments come from a recorder, not from the real layer before it."""
    config = FAMILY_TABLE["t5" if arch == "t5-encoder" else arch].config()
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, name):
            setattr(config, name, 4)
    if getattr(config, "layer_types", None):  # Gemma 3's sliding and full layers, alternating
        config.layer_types = (config.layer_types * 4)[:4]
    torch.manual_seed(0)
    model_class = tf.T5EncoderModel if arch == "t5-encoder" else getattr(tf, FAMILY_TABLE[arch].model)
    return model_class(config).eval()


def _drive_asking_for_a_cache(model: torch.nn.Module) -> None:
    """Two batches of token ids, with use_cache=True where the model takes it (layer by layer ignores it)."""
    import inspect

    generator = torch.Generator().manual_seed(0)
    cache = {"use_cache": True} if "use_cache" in inspect.signature(model.forward).parameters else {}
    for _ in range(2):
        model(input_ids=torch.randint(3, 100, (2, 12), generator=generator), **cache)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "falcon-alibi", "gpt2", "opt", "bert", "t5-encoder"])
def test_layers_past_the_second_get_the_arguments_their_own_forward_would(arch, tmp_path):
    model = _four_layers(arch)
    model.save_pretrained(tmp_path / "model", max_shard_size="100KB")
    (tmp_path / "work").mkdir()
    written = layerwise_moments(tmp_path / "model", _drive_asking_for_a_cache, tmp_path / "work")
    if arch == "t5-encoder":  # each layer hands the next its position bias too: module by module instead
        assert written is None
        return
    expected = InputMoments.collect(model, _drive_asking_for_a_cache)
    layered = InputMoments.load(written)
    assert layered.stats.keys() == expected.stats.keys()
    for name, (gram, _, count) in expected.stats.items():
        assert layered.stats[name][2] == count
        torch.testing.assert_close(layered.stats[name][0], gram, atol=1e-6 * float(gram.abs().max()), rtol=0, msg=name)


def test_lazy_moments_read_as_the_loaded_ones_on_any_device_and_keep_their_folder_while_used(tmp_path):
    import gc

    from clover.quality import _streamed_moments

    model = _sharded("llama", tmp_path / "model")
    moments = _streamed_moments(tmp_path / "model", _drive, None, torch.device("cpu"), False)  # no cache
    entry = next(iter(moments.stats.values()))
    folder = entry.path.parent
    moved = moments.to("cpu")
    del moments, entry
    gc.collect()
    assert folder.is_dir()  # the copy still reads it
    expected = InputMoments.collect(model, model_output)
    for name, (gram, _, count) in expected.stats.items():
        assert moved.stats[name][2] == count
        torch.testing.assert_close(moved.stats[name][0], gram, atol=0, rtol=0)
    del moved
    gc.collect()
    assert not folder.exists()


def test_cached_moments_read_lazily_survive_the_cache_being_cleared_and_go_with_the_run(tmp_path):
    import gc

    from clover.quality import _read_lazily

    model = build_tiny("llama")
    expected = InputMoments.collect(model, model_output)
    entry = tmp_path / "moments" / "0123456789abcdef01234567.safetensors"
    entry.parent.mkdir()
    expected.save(entry)
    moments = _read_lazily(entry, torch.device("cpu"))
    entry.unlink()  # `clover cache --clear` while the prune runs
    for name, (gram, _, count) in expected.stats.items():
        assert moments.stats[name][2] == count
        torch.testing.assert_close(moments.stats[name][0], gram, atol=0, rtol=0)
    del moments
    gc.collect()
    assert list(entry.parent.iterdir()) == []  # the run's second name for the file went with it


def test_a_calibration_that_fails_reading_its_data_says_so_once_and_leaves_no_folder(tmp_path, monkeypatch):
    import tempfile

    from clover.quality import _streamed_moments

    _sharded("llama", tmp_path / "model")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))
    (tmp_path / "temporary").mkdir()
    calls = []

    def missing_data(model):
        calls.append(model)
        raise FileNotFoundError(2, "No such file or directory", "/data/calibration/0001.jpg")

    with pytest.raises(FileNotFoundError):  # the error itself, not "cannot write the moments" and a second run
        _streamed_moments(tmp_path / "model", missing_data, None, torch.device("cpu"), False)
    assert len(calls) == 1 and list((tmp_path / "temporary").iterdir()) == []


def test_calibrated_streamed_prune_equals_the_in_memory_one(tmp_path):
    model = _sharded("llama", tmp_path / "model")
    (tmp_path / "work").mkdir()
    moments = InputMoments.load(layerwise_moments(tmp_path / "model", _drive, tmp_path / "work"), lazy=True)
    config = PruneConfig(vo_ratio=0.5, method="calibrated", allocation="layer")
    (tmp_path / "out").mkdir()
    stream_prune(tmp_path / "model", tmp_path / "out", config, input_moments=moments)
    reference = copy.deepcopy(model)
    prune_(reference, config, calibrate=model_output)
    streamed = auto_class("llama", pruned=True).from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    torch.testing.assert_close(model_output(streamed), model_output(reference), atol=1e-5, rtol=0)


def test_bf16_stays_bf16_and_compute_dtype_is_honoured(tmp_path):
    model = build_tiny("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    assert CheckpointReader(tmp_path / "model").dtype() == torch.bfloat16
    for compute in (torch.float64, torch.float32):
        out = tmp_path / f"out-{compute}"
        out.mkdir()
        stream_prune(tmp_path / "model", out, PruneConfig(vo_ratio=0.5), compute_dtype=compute)
        reader = CheckpointReader(out)
        assert {tensor.dtype for _, tensor in reader.read(list(reader.files))} == {torch.bfloat16}
    (tmp_path / "as-float32").mkdir()
    stream_decompose(tmp_path / "model", tmp_path / "as-float32", dtype=torch.float32)
    reader = CheckpointReader(tmp_path / "as-float32")
    assert {tensor.dtype for _, tensor in reader.read(list(reader.files))} == {torch.float32}
    assert json.loads((tmp_path / "as-float32" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("command", ["decompose", "prune"])
@pytest.mark.parametrize(("arch", "dtype"), [("llama", torch.bfloat16), ("t5", torch.float16)])
def test_each_tensor_comes_out_in_the_dtype_the_in_memory_path_writes(arch, dtype, command, tmp_path):
    """A bf16 Llama whose norms were kept in float32 by hand, and an fp16 T5 whose ``wo`` transformers keeps in
    float32 (``_keep_in_fp32_modules``): streamed and in-memory outputs agree tensor by tensor."""
    model = build_tiny(arch).to(dtype)
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if name.endswith("norm" if arch == "llama" else ".wo"):  # T5: wo stored in float32, as transformers keeps it
            module.float()
            with torch.no_grad():  # values float16 cannot hold: a round trip through it would show
                module.weight.add_(1e-3 * torch.rand(module.weight.shape, generator=generator))
    model.config.dtype = dtype  # what config.json then says the checkpoint is, whatever its float32 tensors
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    stored = CheckpointReader(tmp_path / "model")
    stored = dict(stored.read(list(stored.files)))
    config = PruneConfig(vo_ratio=0.5)
    (tmp_path / "streamed").mkdir()
    loaded = load_model(str(tmp_path / "model"), dtype=None)
    if command == "prune":
        stream_prune(tmp_path / "model", tmp_path / "streamed", config)
        prune_(loaded.model, config)
        save_pruned_model(loaded, tmp_path / "in-memory")
    else:
        stream_decompose(tmp_path / "model", tmp_path / "streamed")
        decompose_(loaded.model)
        loaded.model.save_pretrained(tmp_path / "in-memory")
    dtypes, tensors = {}, {}
    for output in ("streamed", "in-memory"):
        reader = CheckpointReader(tmp_path / output)
        tensors[output] = dict(reader.read(list(reader.files)))
        dtypes[output] = {name: tensor.dtype for name, tensor in tensors[output].items()}
    assert dtypes["streamed"] == dtypes["in-memory"]
    for name, tensor in tensors["in-memory"].items():
        torch.testing.assert_close(tensors["streamed"][name], tensor, atol=1e-6, rtol=0, msg=name)
        if name.endswith(".wo.weight"):  # read, kept and written in float32: never rounded to float16 on the way
            assert torch.equal(tensors["streamed"][name], stored[name]), name
    assert torch.float32 in dtypes["streamed"].values() if arch == "t5" else set(dtypes["streamed"].values()) == {dtype}


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("background", [True, False], ids=["background-writes", "inline-writes"])
def test_shard_writer_output_reads_back_with_safetensors(tmp_path, background, direct, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file

    import clover.streaming as streaming

    monkeypatch.setattr(streaming, "DIRECT_WRITES", direct)
    monkeypatch.setattr(streaming.OutputFile, "BLOCK", 8192)  # tensors span blocks, and blocks hold several

    tensors = {f"t{i}": torch.randn(64, 32 + i).to(dtype) for i, dtype in
               enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float64])}  # fmt: skip
    tensors["ids"], tensors["empty"] = torch.arange(7), torch.zeros(0, 3)
    with ShardWriter(tmp_path, shard_bytes=20_000, background=background) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / file))
        with safe_open(tmp_path / file, "pt") as shard:
            assert shard.metadata() == {"format": "pt"}  # as save_pretrained writes it
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def _direct_writes_failing_once(monkeypatch, errno_code: int, *, after_bytes: int) -> list[int]:
    """Direct writes of 8 kB blocks; the second block's write puts ``after_bytes`` out, then fails with errno_code."""
    import clover.streaming as streaming

    monkeypatch.setattr(streaming, "DIRECT_WRITES", True)
    monkeypatch.setattr(streaming.OutputFile, "BLOCK", 8192)
    write_all, calls = streaming.OutputFile._write_all, []

    def failing(self, data):
        calls.append(len(data))
        if len(calls) == 2:
            os.write(self.fd, data[:after_bytes])
            raise OSError(errno_code, os.strerror(errno_code))
        write_all(self, data)

    monkeypatch.setattr(streaming.OutputFile, "_write_all", failing)
    return calls


def test_a_direct_write_refused_mid_block_goes_on_through_the_page_cache_without_duplicating(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    calls = _direct_writes_failing_once(monkeypatch, errno.EINVAL, after_bytes=4096)  # half a block already out
    tensors = {"a": torch.randn(40, 100), "b": torch.arange(900)}
    with ShardWriter(tmp_path) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.close()
    assert len(calls) > 2, "the failure hit a block in the middle of the file"
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_a_full_disk_under_direct_writes_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    _sharded("llama", tmp_path / "model")
    capsys.readouterr()
    _direct_writes_failing_once(monkeypatch, errno.ENOSPC, after_bytes=0)
    arguments = ["decompose", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--stream", "--quiet"]
    assert main(arguments) == 1
    err = capsys.readouterr().err.strip()
    assert "No space left" in err and len(err.splitlines()) == 1, err  # the OSError, not a BufferError traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_cli_streams_decompose_and_prune_and_an_interrupted_run_leaves_nothing(tmp_path, capsys, monkeypatch):
    _sharded("llama", tmp_path / "model")
    out = tmp_path / "dec"
    assert main(["decompose", str(tmp_path / "model"), "--out", str(out), "--stream", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["streamed"] is True
    tf.AutoModelForCausalLM.from_pretrained(out)
    arguments = ["prune", str(tmp_path / "model"), "--vo-ratio", "0.5", "--stream", "--quiet", "--json"]
    assert main([*arguments, "--out", str(tmp_path / "pruned")]) == 0
    assert json.loads(capsys.readouterr().out)["parameters_after"] < sum(
        p.numel() for p in build_tiny("llama").parameters()
    )

    def fail(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "_flush", fail)
    assert main([*arguments, "--out", str(tmp_path / "full")]) == 1
    assert "No space left" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec", "model", "pruned"], "nothing half-written left"


def test_a_shard_write_failing_in_the_background_stops_the_run_in_one_line_and_leaves_nothing(
    tmp_path, capsys, monkeypatch
):
    import clover.streaming as streaming

    _sharded("llama", tmp_path / "model")
    capsys.readouterr()  # the save's own progress bar
    written = streaming._write_shard
    calls = []

    def second_write_fails(path, header, tensors):
        calls.append(path.name)
        if len(calls) == 2:  # after the first shard went through: the failure is in the writer thread mid-run
            raise OSError(28, "No space left on device")
        written(path, header, tensors)

    monkeypatch.setattr(streaming, "_write_shard", second_write_fails)
    arguments = ["decompose", str(tmp_path / "model"), "--stream", "--quiet", "--out", str(tmp_path / "full")]
    small_shards = {**streaming.stream_decompose.__kwdefaults__, "shard_bytes": 30_000}  # several shards
    monkeypatch.setattr(streaming.stream_decompose, "__kwdefaults__", small_shards)
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "No space left" in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert len(calls) >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "nothing half-written left"


@pytest.mark.parametrize("command", ["decompose", "prune"])
def test_streaming_refuses_non_finite_weights_of_a_later_layer_in_one_line(command, tmp_path, capsys):
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[-1].self_attn.v_proj.weight[0, 0] = float("nan")  # read only when that layer streams
    model.save_pretrained(tmp_path / "model", max_shard_size="100KB")
    capsys.readouterr()  # the save's own progress bar
    ratio = ["--vo-ratio", "0.5"] if command == "prune" else []
    out = tmp_path / "out"
    assert main([command, str(tmp_path / "model"), *ratio, "--out", str(out), "--stream", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layers.1.self_attn" in err and "NaN or Inf" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "nothing half-written left"


MEMORY_PROBE = """
import json, sys, torch
from clover.streaming import StreamedModel, stream_decompose, stream_prune
from clover.prune import PruneConfig

def status(field):  # kB figures the kernel keeps for this process
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

source, out, action = sys.argv[1:4]
StreamedModel(source)  # the runtime (transformers' modeling code, the model without weights) before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the resident size now: the imports' own peak is not counted
baseline = status("VmRSS")
shards = 32 * 2**20  # the writer holds at most two output shards: one being written, the next one filling
if action == "decompose":
    stream_decompose(source, out, shard_bytes=shards)
elif action == "prune":
    stream_prune(source, out, PruneConfig(vo_ratio=0.5), shard_bytes=shards)
else:  # calibrated: 16 sequences of 128 tokens, layer by layer, then the prune reading each layer's moments
    import pathlib
    from clover.prune import InputMoments
    from clover.streaming import layerwise_moments

    def calibrate(model):
        ids = torch.randint(0, 32000, (16, 128), generator=torch.Generator().manual_seed(0))
        for batch in ids.split(8):
            model(input_ids=batch, use_cache=False, logits_to_keep=1)

    work = pathlib.Path(out).parent / "moments"
    work.mkdir()
    moments = InputMoments.load(layerwise_moments(source, calibrate, work), lazy=True)
    config = PruneConfig(vo_ratio=0.5, method="calibrated")
    stream_prune(source, out, config, input_moments=moments, shard_bytes=shards)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""


@pytest.mark.parametrize("action", ["decompose", "prune", "calibrated prune"])
def test_peak_memory_is_about_one_layer_not_the_model(action, tmp_path):
    # 8 layers of width 1024 with a 32k vocabulary: 290 MB of bf16 weights in shards of 64 MB
    config = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                            num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    size = write_random_checkpoint(config, tmp_path / "model", shard_bytes=64 * 2**20)
    assert size > 250 * 2**20
    (tmp_path / "out").mkdir()
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(MEMORY_PROBE))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "out"), action],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    grown = figures["peak"] - figures["baseline"]
    # one layer is 22 MB in bf16 (its float64 factorization a few times that), an output shard 32 MB (and one
    # more while the previous is written), the embedding and head 62 MB each: the in-memory path holds the whole
    # model (and the float copy of it). Calibrated: the first pass reads the embedding (62 MB) as its forward
    # runs, then one layer, its moments (8 MB of float64) and the hidden states of the 16 sequences (4 MB)
    bound = 0.6 * size + 32 * 2**20 + (64 * 2**20 if action == "calibrated prune" else 0)
    assert grown < bound, f"peak grew by {grown / 2**20:.0f} MB for a {size / 2**20:.0f} MB checkpoint"


@pytest.mark.real
def test_calibrated_streamed_prune_of_a_real_model_scores_as_the_in_memory_one(tmp_path, capsys):
    # --recalibrate: each path computes its own moments
    arguments = ["prune", "smollm2-135m", "--method", "calibrated", "--vo-ratio", "0.5", "--calibration-samples", "2",
                 "--calibration-length", "64", "--recalibrate", "--quiet", "--json"]  # fmt: skip
    perplexities = []
    for out, stream in ((tmp_path / "streamed", "--stream"), (tmp_path / "in-memory", "--no-stream")):
        assert main([*arguments, stream, "--out", str(out)]) == 0
        capsys.readouterr()
        assert main(["eval", str(out), "--tokens", "512", "--json", "--quiet"]) == 0
        perplexities.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["wikitext2_test_ppl"])
    assert perplexities[0] == pytest.approx(perplexities[1], rel=1e-6)


@pytest.mark.real
@pytest.mark.parametrize("model", ["whisper-tiny.en", "dinov2-small"])
def test_calibrated_streamed_prune_of_speech_and_vision_reads_their_preprocessing_as_in_memory(model, tmp_path, capsys):
    # Whisper's feature extractor, DINOv2's saved image processor (224 pixels, not the config's 518): --stream
    # calibrates on the same inputs as the loaded model, so both write the same weights
    arguments = ["prune", model, "--method", "calibrated", "--vo-ratio", "0.5", "--calibration-samples", "2",
                 "--recalibrate", "--quiet"]  # fmt: skip
    for stream in ("--stream", "--no-stream"):
        assert main([*arguments, stream, "--out", str(tmp_path / stream)]) == 0
    capsys.readouterr()
    streamed, loaded = (CheckpointReader(tmp_path / stream) for stream in ("--stream", "--no-stream"))
    assert set(streamed.files) == set(loaded.files)
    expected = dict(loaded.read(list(loaded.files)))
    for name, tensor in streamed.read(list(streamed.files)):
        # float32 rounding apart: DINOv2's layer scale is folded into O as each layer is read, before its forward
        # (3.6e-5 of the tensor's largest value at most, layer 11's O); calibrated at 518 pixels: 2.3 relative
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(tensor, expected[name], atol=1e-4 * scale, rtol=0, msg=name)


def test_ctrl_c_again_while_the_writer_thread_finishes_still_waits_for_it(tmp_path, monkeypatch):
    import threading

    import clover.streaming as streaming

    release, written = threading.Event(), []

    def slow_write(path, header, tensors):
        release.wait(10)
        written.append(path.name)

    monkeypatch.setattr(streaming, "_write_shard", slow_write)
    writer = ShardWriter(tmp_path, shard_bytes=16)
    writer.add("a", torch.zeros(8))  # a full shard: handed to the writer thread, which is still writing it

    def interrupted_wait():  # the Ctrl-C that stopped the run is pressed again while the shard is waited for...
        raise KeyboardInterrupt

    join, calls = writer._writer.shutdown, []

    def interrupted_join(wait=True):
        calls.append(wait)
        if len(calls) == 1:  # ...and once more while the thread is joined
            raise KeyboardInterrupt
        release.set()  # the thread finishes only if it is waited for again
        join(wait=wait)

    monkeypatch.setattr(writer, "_wait", interrupted_wait)
    monkeypatch.setattr(writer._writer, "shutdown", interrupted_join)
    with pytest.raises(KeyboardInterrupt):
        writer.shutdown(raise_error=False)
    assert written == ["shard-00000.tmp"], "shutdown returned while the thread could still write into the directory"


def test_a_tower_without_an_auto_class_loads_stock_after_a_pruned_one_was_loaded_in_the_same_process(tmp_path):
    # transformers registers the pruned remote class for SiglipTextConfig; stock checkpoints still load as stock
    model = _sharded("siglip_text", tmp_path / "model")
    (tmp_path / "pruned").mkdir()
    stream_prune(tmp_path / "model", tmp_path / "pruned", PruneConfig(vo_ratio=0.5))
    auto_class("siglip_text", pruned=True).from_pretrained(tmp_path / "pruned", trust_remote_code=True)
    stock = auto_class("siglip_text").from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(model_output(stock), model_output(model), atol=0, rtol=0)
    with pytest.raises(ValueError, match="describes no pruned attention.*SiglipTextModel"):
        tf.AutoModel.from_pretrained(tmp_path / "model")  # the registered remote class: one clear line


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_tokenizer_option_writes_that_tokenizer_into_out_streamed_or_not(stream, tmp_path, capsys):
    """Weights saved without a tokenizer, --tokenizer naming the original's: decompose and prune write it beside
    the weights (eval then scores text), in memory and streamed alike; a directory without one is one line."""
    from test_finetune_cli import byte_tokenizer

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "weights")
    byte_tokenizer().save_pretrained(tmp_path / "tokenizer")
    settings = tmp_path / "tokenizer" / "tokenizer_config.json"  # as a from_pretrained-then-save leaves it
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "is_local": True, "local_files_only": True}))
    for command, extra in (("decompose", []), ("prune", ["--vo-ratio", "0.5"])):
        out = tmp_path / command
        arguments = [command, str(tmp_path / "weights"), *extra, "--tokenizer", str(tmp_path / "tokenizer")]
        assert main([*arguments, "--out", str(out), stream, "--quiet"]) == 0
        assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
        assert not {"is_local", "local_files_only"} & json.loads((out / "tokenizer_config.json").read_text()).keys()
        capsys.readouterr()
        assert main(["eval", str(out), "--tokens", "64", "--window", "32", "--json", "--quiet"]) == 0
        assert json.loads(capsys.readouterr().out)["wikitext2_test_ppl"] > 1
        refused = [command, str(tmp_path / "weights"), *extra, "--tokenizer", str(tmp_path / "weights")]
        assert main([*refused, "--out", str(tmp_path / "refused"), stream, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "no tokenizer there" in err and not (tmp_path / "refused").exists()
    # a damaged tokenizer beside the weights: refused before anything is written, as in memory
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "model.safetensors"):
        (damaged / name).write_bytes((tmp_path / "weights" / name).read_bytes())
    text = (tmp_path / "tokenizer" / "tokenizer.json").read_text()
    (damaged / "tokenizer.json").write_text(text[: len(text) // 2])
    for command, extra in (("decompose", []), ("prune", ["--vo-ratio", "0.5"])):
        capsys.readouterr()
        assert main([command, str(damaged), *extra, "--out", str(tmp_path / "refused"), stream, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "cannot read the tokenizer" in err and not (tmp_path / "refused").exists()


def test_a_large_checkpoint_that_cannot_stream_is_loaded_whole_with_a_note(tmp_path, capsys, monkeypatch):
    """Chosen by size, not asked for: pytorch_model.bin alone, or tensors transformers converts on load (MoE experts),
    load whole with a note saying why, rather than a refusal that tells the user to drop a --stream never given."""
    from clover import cli

    monkeypatch.setattr(cli, "STREAM_FRACTION", 0.0)  # every checkpoint is "large" now
    build_tiny("llama").save_pretrained(tmp_path / "bin")
    weights = tmp_path / "bin" / "model.safetensors"  # as older checkpoints come: pytorch_model.bin only
    reader = CheckpointReader(tmp_path / "bin")
    torch.save(dict(reader.read(list(reader.files))), tmp_path / "bin" / "pytorch_model.bin")
    weights.unlink()
    build_tiny(CONVERTED[0]).save_pretrained(tmp_path / "moe")
    model = build_tiny("llama")  # a pruned checkpoint: its own modeling code
    prune_(model, PruneConfig(vo_ratio=0.5))
    save_pruned_model(model, tmp_path / "pruned")
    assert cli._why_not_streamable(tmp_path / "pruned").startswith("it uses its own modeling code (auto_map)")
    for name in ("bin", "moe"):
        capsys.readouterr()
        arguments = ["prune", str(tmp_path / name), "--vo-ratio", "0.5", "--out", str(tmp_path / f"{name}-out")]
        assert main([*arguments, "--quiet"]) == 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "loading it whole" in err and "--stream" not in err, err
        assert ("but it holds no safetensors" if name == "bin" else "but transformers converts") in err, err
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "bin"), "--vo-ratio", "0.5", "--out", str(tmp_path / "x"), "--stream"]) == 2
    assert "run without --stream" in capsys.readouterr().err  # asked for: refused, in its words
    _truncate(tmp_path / "bin" / "config.json")  # damage is refused as such, not taken for "cannot stream"
    assert main(["prune", str(tmp_path / "bin"), "--vo-ratio", "0.5", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "loading it whole" not in err, err


@pytest.mark.parametrize("command", ["decompose", "prune"])
def test_streaming_never_writes_into_the_input(command, tmp_path, capsys):
    """A Whisper checkpoint without preprocessor_config.json: the output gets one (the ASR pipeline needs it),
    the input folder is left byte for byte as it was."""
    build_tiny("whisper").save_pretrained(tmp_path / "whisper")
    before = {p.name: p.read_bytes() for p in (tmp_path / "whisper").iterdir()}
    assert "preprocessor_config.json" not in before
    extra = ["--vo-ratio", "0.5"] if command == "prune" else []
    arguments = [command, str(tmp_path / "whisper"), *extra, "--out", str(tmp_path / "out"), "--stream", "--quiet"]
    assert main(arguments) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "whisper").iterdir()} == before
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
