"""Convert a GGUF file into a safetensors checkpoint directory one tensor at a time, never holding the model.

transformers' own GGUF loader dequantises every tensor into one state dict, builds the model and loads it: the
whole model in float32, plus the dequantisation's scratch, is in memory at once. Here the model is built
without weights (on the meta device) only to learn transformers' GGUF -> transformers name map; each tensor is
then dequantised from the memory-mapped file, put through the same per-architecture processor transformers
applies (Llama's q/k row permutation reversed, Gemma's norm offset, ...), cast and handed to a ``ShardWriter``.
Peak memory is about one float32 tensor or one output shard, whichever is larger, besides what parsing the
file's metadata takes (gguf's reader, which transformers also uses for the config and the tokenizer, makes an
object per vocabulary entry: about 250 MB for a 49k vocabulary, 600 MB for 152k). The weights are bit for bit
those transformers' loader gives.
"""

from __future__ import annotations

import gc
import mmap
import os
import pathlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import CloverError
from .streaming import SHARD_BYTES, ShardWriter, _return_freed_memory

_DEQUANTIZE_ELEMENTS = 1 << 20  # rows are dequantised in chunks of about this many values (4 MiB of float32)


class _StoredTensor(NamedTuple):
    """Where one tensor lies in the GGUF file, as gguf's reader lays it out (blocks as rows of bytes)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    numel: int  # values once dequantised


def gguf_to_checkpoint(
    gguf_path: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = False,
) -> pathlib.Path:
    """Write the model in the GGUF file ``gguf_path`` into the (existing, empty) ``directory`` as transformers'
    ``save_pretrained`` would: safetensors shards in ``dtype``, config.json, generation_config.json and the
    tokenizer. Returns ``directory``. A conversion that fails leaves what it wrote: give it a staging directory
    (``clover.io.atomic_directory``)."""
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from .io import drop_loader_arguments

    path, directory = pathlib.Path(gguf_path), pathlib.Path(directory)
    if not path.is_file():
        raise CloverError(f"{path}: no such GGUF file")
    # the config, the tensor table and the tokenizer each parse the file's metadata into Python objects (hundreds
    # of MB for a large vocabulary), freed before the next step, so their peaks do not add up
    parsed_config = _parsed_config(path)
    _collect()
    architecture, stored = _tensor_table(path)
    _collect()
    config, model = _empty_model(parsed_config, path, dtype)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed_config)
    names = get_gguf_hf_weights_map(model, processor)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as error:
        raise CloverError(f"{path}: transformers cannot build the tokenizer of this GGUF file ({error})") from None
    tokenizer.save_pretrained(directory)
    drop_loader_arguments(directory)
    del tokenizer
    _collect()

    written: set[str] = set()
    tensors = tqdm(_mapped(path, stored), total=len(stored), desc="converting GGUF", unit="tensor",
                   disable=not progress)  # fmt: skip
    with ShardWriter(directory, dtype=dtype, shard_bytes=shard_bytes) as writer:
        for info, data in tensors:
            writer.reserve(info.numel * dtype.itemsize)  # the pending shard is handed off before this one is made
            made = _processed(info, data, processor, names)
            for name, tensor in made:
                if name in written:  # a processor that fills one tensor over several calls (MoE experts)
                    raise _merged(path, name, architecture)
                written.add(name)
                writer.add(name, tensor)
            data = made = tensor = None  # a tensor the writer has written is freed now, not after the next is made
            _return_freed_memory()
        _check_complete(model, written, path)
        writer.close()

    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(directory)
    if model.can_generate():  # what transformers gives a GGUF-loaded model: its generation defaults from the config
        GenerationConfig.from_model_config(config).save_pretrained(directory)
    return directory


def _merged(path: pathlib.Path, name: str, architecture: str) -> CloverError:
    return CloverError(
        f"{path}: transformers builds {name} from several GGUF tensors for a {architecture} model (experts merged "
        "into one tensor), which cannot be converted one tensor at a time; load this GGUF with transformers' "
        "from_pretrained(..., gguf_file=...) instead"
    )


def _collect() -> None:
    gc.collect()
    _return_freed_memory()


def _parsed_config(path: pathlib.Path) -> dict[str, Any]:
    """The config keys of the GGUF's metadata as transformers' GGUF loader parses them (what its processors read)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except (ValueError, KeyError) as error:  # an architecture transformers' GGUF loader does not know
        raise CloverError(f"{path}: {error}") from None


def _empty_model(config_dict: dict[str, Any], path: pathlib.Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """The config transformers builds from the GGUF's metadata, and its model with every parameter on meta."""
    import transformers
    from accelerate import init_empty_weights
    from transformers.models.auto import modeling_auto

    config = transformers.AutoConfig.for_model(**config_dict)
    named = getattr(config, "architectures", None) or []  # T5's encoder-only files name their class
    if named and hasattr(transformers, named[0]):
        model_class = getattr(transformers, named[0])
    elif config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        model_class = transformers.AutoModelForCausalLM
    elif config.model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        model_class = transformers.AutoModelForSeq2SeqLM
    else:
        raise CloverError(f"{path}: transformers has no language model class for model_type {config.model_type!r}")
    # buffers stay real: rotary frequencies and the like are computed at construction, not stored
    with init_empty_weights(include_buffers=False):
        build = model_class.from_config if hasattr(model_class, "from_config") else model_class._from_config
        model = build(config, dtype=dtype)
    return config, model


def _tensor_table(path: pathlib.Path) -> tuple[str, list[_StoredTensor]]:
    """The GGUF's general.architecture (the key of transformers' TENSOR_PROCESSORS) and where its tensors lie.
    gguf's reader is dropped again: it holds an object for every vocabulary entry and merge rule."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as error:
        raise CloverError(f"cannot read {path}: {error}; the file is damaged or truncated") from None
    architecture = read_field(reader, "general.architecture")
    if not architecture:
        raise CloverError(f"{path} has no general.architecture entry; it is not a model GGUF file")
    stored = [
        _StoredTensor(
            t.name, t.tensor_type, t.data.dtype, tuple(t.data.shape), int(t.data_offset), t.data.nbytes, t.n_elements
        )
        for t in reader.tensors
    ]
    return architecture[0], stored


def _mapped(path: pathlib.Path, stored: list[_StoredTensor]) -> Iterator[tuple[_StoredTensor, np.ndarray]]:
    """Each tensor's stored data, a view of the file mapped read-only. Once the next is asked for, the pages of the
    last are dropped from this process (the OS keeps them cached), so its resident size does not grow by the file's
    size as the tensors are read."""
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    for info in stored:
        count = info.nbytes // info.dtype.itemsize
        yield info, np.frombuffer(mapped, info.dtype, count, info.offset).reshape(info.shape)
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        if hasattr(mapped, "madvise"):  # Linux and macOS
            mapped.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)
    # the mapping closes when the last view of it is gone


def _processed(info: _StoredTensor, data: np.ndarray, processor: Any, names: dict[str, str]) -> list[tuple[str, Any]]:
    """(transformers name, float32 tensor) for one GGUF tensor, as transformers' loader makes it: dequantised, put
    through the architecture's processor (``TENSOR_PROCESSORS``), renamed by ``get_gguf_hf_weights_map``. Empty
    for a tensor the model does not hold."""
    # a processor that builds a tensor itself (GPT-2's head, MoE experts) puts it here instead of returning it
    placed: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
    result = processor.process(
        weights=_dequantized(data, info.tensor_type), name=info.name, tensor_key_mapping=names, parsed_parameters=placed
    )
    made = list(placed["tensors"].items())
    if result.name is not None and result.name in names:
        made.append((names[result.name], torch.from_numpy(np.ascontiguousarray(result.weights))))
    return made


def _dequantized(data: np.ndarray, tensor_type: Any) -> np.ndarray:
    """One stored GGUF tensor as a new float32 array, dequantised a chunk of rows at a time: gguf's ``dequantize``
    of a whole tensor holds every row group's result before joining them, twice the tensor. Blocks never span
    rows, so the values are the same."""
    from gguf import dequantize

    rows = data.reshape(-1, data.shape[-1]) if data.ndim else data.reshape(1, 1)
    step = max(1, _DEQUANTIZE_ELEMENTS // max(1, rows.shape[1]))
    first = dequantize(rows[:step], tensor_type)
    out = np.empty((rows.shape[0], first.shape[-1]), dtype=np.float32)
    out[: len(first)] = first
    for start in range(step, rows.shape[0], step):
        out[start : start + step] = dequantize(rows[start : start + step], tensor_type)
    return out.reshape(*data.shape[:-1], first.shape[-1]) if data.ndim else out.reshape(())


def _check_complete(model: Any, written: set[str], path: pathlib.Path) -> None:
    """Refuse a conversion that leaves a parameter of the model without weights (it would load as random)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(name for name, tensor in model.state_dict().items()
                     if tensor.device.type == "meta" and name not in written and name not in tied)  # fmt: skip
    if missing:
        raise CloverError(
            f"{path}: the GGUF holds no tensor for {missing[0]} ({len(missing)} of the model's weights in all); "
            "it is not a complete model of this architecture"
        )
