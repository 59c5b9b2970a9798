"""Decompose and prune checkpoints larger than memory: one layer's tensors at a time, from disk to disk.

The model is built without weights (every parameter on the meta device). For each layer that holds attention
sites, its tensors are read from the checkpoint's safetensors files (one read call per tensor), the
layer is rewritten by the same code as the in-memory path (``decompose_site``, ``prune_``), written into the
output shards and dropped again. Every other tensor (embeddings, norms, the head) is copied through one at a
time. Peak memory is about two layers (the next one is read in a background thread while this one is rewritten;
or the largest other tensor) plus two output shards (one written in a background thread, past the page cache,
while the next fills), whatever the model's size; the output keeps the checkpoint's dtype unless asked otherwise.

Calibration (``calibrated``, ``vanilla-activation``) runs layer by layer where every attention site sits in one
list of layers (``layerwise_moments``): every batch goes through one layer, read once, before the next is read,
and each layer's moments go to disk as it finishes, so neither the weights nor the moments of the whole model are
ever in memory. Elsewhere (an encoder and a decoder, two towers) the model runs under accelerate's disk offload,
each module's weights read just before its forward (``streamed_calibration_model``). Either way the moments are
those of the in-memory path.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import mmap
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from .errors import CloverError, NotStreamableError
from .families import AttentionSite, attention_sites, family_for

# files of a checkpoint besides its weights that an output keeps (tokenizer, generation and processor settings)
_SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "preprocessor_config.json",
    "chat_template.jinja", "chat_template.json", "normalizer.json", "spiece.model",
)  # fmt: skip
_TOKENIZER_SIDE_FILES = tuple(f for f in _SIDE_FILES if f not in ("generation_config.json", "preprocessor_config.json"))
SHARD_BYTES = 512 * 2**20  # output shard size: the writer holds at most two (one on its way to the disk)


class CheckpointReader:
    """The tensors of a safetensors checkpoint directory (one file, or shards listed in their index)."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self._headers: dict[pathlib.Path, tuple[dict, int]] = {}
        index = directory / "model.safetensors.index.json"
        if (directory / "model.safetensors").is_file():  # before an index beside it, as from_pretrained chooses
            path = directory / "model.safetensors"
            self.files = dict.fromkeys(self.header(path)[0], path)
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise CloverError(f"{index} is damaged ({error}); restore it or save the model again") from None
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            reason = "it holds no safetensors weights (model.safetensors, or shards with their index)"
            raise NotStreamableError(f"{directory}: streaming reads safetensors checkpoints; {reason}: run without "
                                     "--stream", reason)  # fmt: skip
        missing = sorted({path.name for path in self.files.values() if not path.is_file()})
        if missing:
            raise CloverError(f"{directory}: the index lists {', '.join(missing[:3])}, which is missing")

    def header(self, path: pathlib.Path) -> tuple[dict, int]:
        """``path``'s header and where its data starts (see ``_safetensors_header``), read and checked once."""
        if path not in self._headers:
            with open(path, "rb") as f:
                self._headers[path] = _safetensors_header(path, f)
        return self._headers[path]

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for each name, one file opened at a time.

        Each tensor is read into memory of its own with one read call: through safe_open's memory map, whose
        pages fault in as they are touched, a Llama-3-8B-shaped decompose took 94 s instead of 84 s (measured on
        this project's 2-core machine)."""
        by_file: dict[pathlib.Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for path, file_names in by_file.items():
            header, data_start = self.header(path)
            with open(path, "rb") as f:
                for name in file_names:
                    yield name, _read_tensor(path, f, data_start, header.get(name), name)

    def dtype(self) -> torch.dtype:
        """The floating dtype holding most of the checkpoint's bytes (the dtype it was saved in). Reads every
        file's header, so a damaged or truncated file is refused here, before anything is written."""
        sizes: dict[torch.dtype, int] = {}
        for path in dict.fromkeys(self.files.values()):
            for entry in self.header(path)[0].values():
                dtype = _DTYPES_BY_NAME.get(entry.get("dtype"))
                if dtype is not None and dtype.is_floating_point:
                    sizes[dtype] = sizes.get(dtype, 0) + _numel(entry["shape"]) * dtype.itemsize
        return max(sizes, key=sizes.get) if sizes else torch.float32


def _config_dtype(config: dict) -> torch.dtype | None:
    """config.json's dtype (``torch_dtype`` in older files) when it names a floating dtype."""
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _held_dtype(name: str, dtype: torch.dtype | None, float32_names: re.Pattern | None) -> torch.dtype | None:
    """The dtype a floating tensor called ``name`` is held and written in: float32 where transformers keeps it so
    (``float32_names``), else ``dtype`` (None: as stored)."""
    return torch.float32 if float32_names is not None and float32_names.search(name) else dtype


def _float32_names(model: torch.nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """The tensors transformers loads in float32 whatever the requested ``dtype`` (``_keep_in_fp32_modules``
    at float16, ``_keep_in_fp32_modules_strict`` at float16 and bfloat16), as the pattern its loader searches
    each name with."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    return re.compile("|".join(f"(?:{key.replace('*', '.*')})" for key in plan)) if plan else None


_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _safetensors_header(path: pathlib.Path, f) -> tuple[dict, int]:
    """A safetensors file's header ({name: {dtype, shape, data_offsets}}, without ``__metadata__``) and where its
    data starts; a header that does not parse, or data the file is too short to hold, is refused."""
    file_size = os.fstat(f.fileno()).st_size
    size = int.from_bytes(f.read(8), "little")
    if size > file_size - 8:  # e.g. a Git LFS pointer saved in place of the shard
        raise CloverError(f"cannot read {path}: it is not a safetensors file, or it is damaged or truncated")
    try:
        header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
        header.pop("__metadata__", None)
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as error:
        raise CloverError(f"cannot read {path}: {error}; the file is damaged or truncated") from None
    if 8 + size + end > file_size:
        raise CloverError(f"cannot read {path}: the file ends before its tensors do; it is damaged or truncated")
    return header, 8 + size


def _read_tensor(path: pathlib.Path, f, data_start: int, entry: dict | None, name: str) -> torch.Tensor:
    """Tensor ``name`` of an open safetensors file, read into its own memory (the file's little-endian bytes as
    they are: on a big-endian machine, safe_open reads it)."""
    if entry is None:
        raise CloverError(f"{path} holds no {name}, which its index lists; the checkpoint is damaged")
    dtype = _DTYPES_BY_NAME.get(entry.get("dtype"))
    if dtype is None:
        raise CloverError(f"{path}: {name} is stored as {entry.get('dtype')}, which --stream does not read; run "
                          "without --stream")  # fmt: skip
    if sys.byteorder == "big":
        with safe_open(str(path), framework="pt") as mapped:
            return mapped.get_tensor(name).clone()
    begin, end = entry["data_offsets"]
    if end - begin != _numel(entry["shape"]) * dtype.itemsize:
        raise CloverError(f"{path}: {name}'s shape and byte range disagree; the file is damaged")
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(data_start + begin)
    if f.readinto(memoryview(buffer.numpy())) != end - begin:
        raise CloverError(f"cannot read {name} from {path}: the file ends early; it is damaged or truncated")
    return buffer.view(dtype).reshape(entry["shape"])


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class ShardWriter:
    """Writes tensors into safetensors shards of about ``shard_bytes`` each, then their index.

    Each shard is written straight from the tensors' memory: safetensors' own ``save_file`` first copies
    every tensor of the file into bytes, which would double the writer's peak. The writing runs in a
    background thread while the caller makes the next tensors (writes to a disk slower than the page cache
    stall, and the stall overlaps the math instead of adding to it); one shard is written at a time, so the
    writer holds at most the shard being written and the one being filled. Use it as a context manager: on
    leaving, a write under way is waited for, so nothing writes into the directory after an error."""

    def __init__(
        self,
        directory: pathlib.Path,
        *,
        dtype: torch.dtype | None = None,
        float32_names: re.Pattern | None = None,
        shard_bytes: int = SHARD_BYTES,
        background: bool = True,
    ):
        self.directory, self.dtype, self.shard_bytes = pathlib.Path(directory), dtype, shard_bytes
        self.float32_names = float32_names
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clover-write") if background else None
        self._in_flight: Future | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown(raise_error=exc_info[0] is None)

    def shutdown(self, *, raise_error: bool = True) -> None:
        """Wait for the shard being written; with ``raise_error`` False (the caller is already failing) its
        own error is dropped."""
        try:
            self._wait()
        except Exception:
            if raise_error:
                raise
        finally:
            if self._writer is not None:
                _join_through_interrupts(self._writer)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point() and (held := _held_dtype(name, self.dtype, self.float32_names)) is not None:
            tensor = tensor.to(held)
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        if self.pending_bytes >= self.shard_bytes:  # written now, not held while the caller makes the next tensor
            self._flush()

    def reserve(self, size: int) -> None:
        """Write the pending shard now if a tensor of ``size`` bytes will not fit in it, so that tensor is made
        after the shard is handed off rather than beside it (the shards come out the same)."""
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0  # as save_pretrained writes: some loaders check it
        for name, tensor in self.pending.items():
            size = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}  # fmt: skip
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        path = self.directory / f"shard-{len(self.shards):05d}.tmp"
        tensors = self.pending
        self.shards.append(list(tensors))
        self.total_bytes += offset
        self.pending, self.pending_bytes = {}, 0
        self._wait()  # one shard in flight: a disk slower than the math holds back the caller, not its memory
        if self._writer is None:
            _write_shard(path, encoded, tensors)
        else:
            self._in_flight = self._writer.submit(_write_shard, path, encoded, tensors)

    def _wait(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def close(self) -> None:
        """Name the shards as transformers does and write the index (a single shard: model.safetensors)."""
        if self.pending or not self.shards:
            self._flush()
        self._wait()
        count = len(self.shards)
        if count == 1:
            os.replace(self.directory / "shard-00000.tmp", self.directory / "model.safetensors")
            return
        weight_map = {}
        for number, names in enumerate(self.shards):
            final = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"shard-{number:05d}.tmp", self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _join_through_interrupts(executor: ThreadPoolExecutor) -> None:
    """Wait for the writer thread even through another Ctrl-C (then raised after it): the caller removes the
    output directory next, and a thread still writing into it would leave a file behind."""
    interrupted = False
    while True:
        try:
            executor.shutdown(wait=True)
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def _write_shard(path: pathlib.Path, encoded_header: bytes, tensors: dict[str, torch.Tensor]) -> None:
    """Write one shard; each tensor is let go of once written (``tensors`` is the writer's, emptied here)."""
    with OutputFile(path) as f:
        f.write(
            torch.frombuffer(bytearray(len(encoded_header).to_bytes(8, "little") + encoded_header), dtype=torch.uint8)
        )
        for name in list(tensors):
            tensor = tensors.pop(name)
            if tensor.numel():
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8))
            del tensor
    _return_freed_memory()


# $CLOVER_DIRECT_WRITES=0 writes shards through the page cache (for comparing; direct writes are the default)
DIRECT_WRITES = os.environ.get("CLOVER_DIRECT_WRITES", "1") != "0"


class OutputFile:
    """A file written past the page cache (O_DIRECT, through an aligned block buffer) where the OS and the
    filesystem allow it, else as a plain file. Copying gigabytes into the page cache costs the kernel more than
    the disk does: 5 GB took 38 s buffered (32 s of it system time) and 4.4 s direct on this project's VM, and the
    written shards are not read again soon."""

    BLOCK = 8 * 2**20
    ALIGN = 4096  # offsets and lengths of direct writes: a multiple of any disk's logical block size

    def __init__(self, path: pathlib.Path):
        self.path, self.size, self.used, self.flushed = path, 0, 0, 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0) if DIRECT_WRITES else 0
        self.fd = -1
        if direct:
            try:
                self.fd = os.open(path, flags | direct, 0o666)
            except OSError:  # e.g. tmpfs refuses O_DIRECT
                self.fd = -1
        self.direct = self.fd >= 0
        if not self.direct:
            self.fd = os.open(path, flags, 0o666)
            return
        try:
            self.buffer = mmap.mmap(-1, self.BLOCK)  # page-aligned, as direct writes need
        except BaseException:
            os.close(self.fd)
            raise
        self.staged = torch.frombuffer(self.buffer, dtype=torch.uint8)

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if exc_info[0] is None:
                self._finish()
        finally:
            os.close(self.fd)
            if self.direct:
                del self.staged
                try:
                    self.buffer.close()
                except BufferError:  # a failed write's traceback still holds a view: freed with it instead
                    pass

    def write(self, data: torch.Tensor) -> None:
        """Append ``data`` (uint8, one dimension)."""
        self.size += data.numel()
        if not self.direct:
            self._write_all(memoryview(data.numpy()))
            return
        position = 0
        while position < data.numel():
            count = min(self.BLOCK - self.used, data.numel() - position)
            self.staged[self.used : self.used + count].copy_(data[position : position + count])
            self.used += count
            position += count
            if self.used == self.BLOCK:
                self._write_staged(self.BLOCK)

    def _write_staged(self, length: int) -> None:
        try:
            self._write_all(memoryview(self.buffer)[:length])
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            # a filesystem that opens with O_DIRECT but refuses the write: the rest goes through the page cache
            import fcntl

            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            os.lseek(self.fd, self.flushed, os.SEEK_SET)  # the block again from its start, had part of it gone out
            self._write_all(memoryview(self.buffer)[:length])
        self.flushed += length
        self.used = 0

    def _finish(self) -> None:
        if self.direct and self.used:
            padded = -(-self.used // self.ALIGN) * self.ALIGN  # direct writes are whole blocks: pad, then cut
            self.staged[self.used : padded].zero_()
            self._write_staged(padded)
            os.ftruncate(self.fd, self.size)

    def _write_all(self, data: memoryview) -> None:
        position = 0
        while position < len(data):
            position += os.write(self.fd, data[position:])


def _return_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS. glibc keeps large freed blocks in its heap for
    reuse, so without this the resident size creeps up layer after layer; elsewhere this does nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _unit_of(site_name: str) -> str:
    """The layer holding a site: its path up to the first index into a list of layers ("model.layers.3")."""
    parts = site_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return site_name


class StreamedModel:
    """A checkpoint directory opened for streaming: the model without weights, and the files to read them from.

    ``units`` is the ``prune_`` weights interface (``clover.prune.InMemory``): it loads one layer, lets the
    algorithm rewrite it, writes it into ``writer`` and frees it again.
    """

    def __init__(
        self, directory: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ):
        from accelerate import init_empty_weights
        from huggingface_hub.errors import StrictDataclassError  # a config field that fails its validator
        from transformers import AutoConfig

        from .models import _one_line, _read_config, model_kind, transformers_errors_only

        self.directory = pathlib.Path(directory)
        config_dict = _read_config(self.directory)
        if config_dict.get("auto_map"):
            reason = "it uses its own modeling code (auto_map), e.g. a pruned checkpoint"
            raise NotStreamableError(f"{directory}: {reason}: stream only checkpoints of a transformers family", reason)
        self.reader = CheckpointReader(self.directory)
        self.kind, auto_class = model_kind(config_dict)
        # the layers are read into the output's dtype when it differs (bf16 in, float32 out: the rewrite is made in
        # float32, not rounded to bf16 first); otherwise the one from_pretrained's dtype="auto" picks (config.json's,
        # else the weights'), so the output's dtypes are the in-memory path's tensor by tensor
        stored = self.reader.dtype()  # reads every header: a damaged file is refused before anything is written
        self.dtype = dtype or _config_dtype(config_dict) or stored
        self.device = torch.device(device)
        try:
            # transformers' config warnings (token ids outside a tiny vocabulary) stay off the terminal, as when the
            # in-memory path loads the same checkpoint
            with transformers_errors_only():
                config = AutoConfig.from_pretrained(self.directory)
            # buffers stay real: rotary frequencies and the like are computed at construction, not stored
            with init_empty_weights(include_buffers=False), transformers_errors_only():
                build = getattr(auto_class, "from_config", None) or auto_class._from_config  # an auto or model class
                self.model = build(config, dtype=self.dtype)
        except (ValueError, KeyError, TypeError, AttributeError, StrictDataclassError) as error:
            raise CloverError(
                f"cannot build the model of {self.directory / 'config.json'}: {_one_line(error)}; fix config.json"
            ) from None
        self.float32_names = _float32_names(self.model, self.dtype)
        self.model.tie_weights()  # a head that shares the embedding is one parameter, as in the loaded model
        self.model.eval()
        self._compute_unsaved()
        self.family = family_for(self.model)
        self.writer: ShardWriter | None = None
        self.written: set[str] = set()
        self._names = list(self.model.state_dict())
        self.stored = self._model_names()  # the model's name of each stored tensor -> its name in the files
        self._check_names()

    def _compute_unsaved(self) -> None:
        """Make the tensors save_pretrained leaves out because the model computes them (Marian's sinusoidal
        positions), as from_pretrained does: they are small, and calibration runs through them."""
        for name in getattr(self.model, "_keys_to_ignore_on_save", None) or ():
            module_name, _, attr = name.rpartition(".")
            try:
                module = self.model.get_submodule(module_name)
            except AttributeError:
                continue
            if getattr(module, attr, None) is not None and getattr(module, attr).device.type == "meta":
                module.to_empty(device="cpu", recurse=False)
                with torch.no_grad():
                    self.model._init_weights(module)

    def _model_names(self) -> dict[str, str]:
        """Map the files' tensor names to the model's through transformers' own renames for this class (what
        from_pretrained applies: legacy layouts such as ViT's ``attention.attention.query``). A stored tensor
        that transformers converts on load (Mixtral's per-expert weights fused into one) cannot be read one
        layer at a time: refused."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(self.model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = dict.fromkeys(self._names, True)
        names = {}
        for stored in self.reader.files:
            name, converted = rename_source_key(
                stored, renamings, converters, base_model_prefix=self.model.base_model_prefix, meta_state_dict=meta
            )
            if converted is not None:
                reason = (
                    f"transformers converts {stored} on load (it merges or splits stored tensors for "
                    f"{type(self.model).__name__}), which cannot be read one layer at a time"
                )
                raise NotStreamableError(f"{self.directory}: {reason}: run without --stream", reason)
            names[name] = stored
        return names

    def saved_name(self, name: str) -> str:
        """The name a tensor of the model is written under: the one it had in the files, so that the output's names
        are the input's (GPT-NeoX's ``embed_out``, ViT's ``attention.attention.query``), as save_pretrained writes
        them in memory; a tensor the files did not have (a pruned attention's) by transformers' reverse renames."""
        if name in self.stored:
            return self.stored[name]
        from transformers.core_model_loading import revert_weight_conversion

        reverted = list(revert_weight_conversion(self.model, {name: torch.empty(0)}))
        reverted = reverted[0] if len(reverted) == 1 else name
        if self._stored_prefix is not None:  # the files' convention, not a mix: "bert.encoder…" beside "bert.pooler…"
            drop, add = self._stored_prefix
            reverted = add + reverted.removeprefix(drop) if reverted.startswith(drop) else reverted
        return reverted

    @functools.cached_property
    def _stored_prefix(self) -> tuple[str, str] | None:
        """(model prefix, stored prefix) where the files name the tensors with or without the base model's prefix
        unlike the model (a ``BertModel`` saved as ``bert.*``, a ``LlamaForCausalLM`` without ``model.``)."""
        prefix = getattr(self.model, "base_model_prefix", "")
        if not prefix:
            return None
        for name, stored in self.stored.items():
            if stored == f"{prefix}.{name}":
                return "", f"{prefix}."
            if name == f"{prefix}.{stored}":
                return f"{prefix}.", ""
        return None

    def _read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(model name, tensor) for each of the model's names, read from the files."""
        by_stored = {self.stored[name]: name for name in names}
        # map holds no tensor between items, where a generator's loop variable would hold one during the next read
        return map(lambda item: (by_stored[item[0]], item[1]), self.reader.read(list(by_stored)))

    def _check_names(self) -> None:
        """Every tensor the model needs is stored, with the shape the config implies (read from the files' headers,
        so a checkpoint that does not fit is refused before anything is written)."""
        from .models import _refuse_missing, unused_tensors

        for name in unused_tensors(self.directory, [n for n in self.stored if n not in self._names], self.model):
            del self.stored[name]  # not copied through: the in-memory path drops them on load too
        stored = set(self.stored)
        # tied weights (an output head sharing the embedding) are absent from the files by design
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        missing = [name for name in self._names if name not in stored and name not in tied and self._is_meta(name)]
        _refuse_missing(self.directory, missing)  # as the in-memory path says it
        shapes = {name: tensor.shape for name, tensor in self.model.state_dict().items()}
        for name, stored_name in self.stored.items():
            path = self.reader.files[stored_name]
            entry = self.reader.header(path)[0].get(stored_name)
            if entry is not None and name in shapes and list(entry["shape"]) != list(shapes[name]):
                raise CloverError(
                    f"{path}: tensor {stored_name} has shape {entry['shape']} in the weights but config.json implies "
                    f"{list(shapes[name])}; the config does not belong to these weights"
                )

    def _as_model_dtype(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the dtype the loaded model holds it in: float32 where transformers keeps it so (the
        writer writes it so too: read in the model's dtype, it would be rounded on the way), else the model's."""
        return tensor.to(_held_dtype(name, self.dtype, self.float32_names)) if tensor.is_floating_point() else tensor

    def _is_meta(self, name: str) -> bool:
        module_name, _, attr = name.rpartition(".")
        tensor = getattr(self.model.get_submodule(module_name), attr)
        return tensor is not None and tensor.device.type == "meta"

    def sites(self) -> list[AttentionSite]:
        return attention_sites(self.model)

    def _unit_names(self, unit: str) -> list[str]:
        return [name for name in self.stored if name.startswith(unit + ".")]

    def _read_unit(self, unit: str) -> list[tuple[str, torch.Tensor]]:
        return list(self._read(self._unit_names(unit)))

    @contextmanager
    def loaded(
        self, unit: str, sites: list[AttentionSite], *, write: bool, prefetched: Future | None = None
    ) -> Iterator[None]:
        """Read one layer's tensors into the model (or take them from ``prefetched``, a read already under way);
        on exit write the (rewritten) layer if asked, and free it."""
        from accelerate.utils import set_module_tensor_to_device

        from .decompose import check_finite

        prefix = unit + "."
        names = self._unit_names(unit)
        tensors = prefetched.result() if prefetched is not None else list(self._read(names))
        for name, tensor in tensors:
            value = self._as_model_dtype(name, tensor)  # its own dtype: accelerate would cast to the meta model's
            set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=value.dtype)
        tensors.clear()  # the model holds them now; the future holds this very list, so it lets go of them too
        module = self.model.get_submodule(unit)
        try:
            self.family.fold_output_scales(module)  # only this layer is real: the others are meta, untouched
            for site in sites:
                check_finite(site)
            yield
            if write:
                for name, tensor in module.state_dict().items():
                    self.writer.add(self.saved_name(prefix + name), tensor)
                self.written.update(names)
        finally:
            module.to("meta")  # frees the layer
            for site in sites:  # and the attentions pruning swapped out, which the sites still refer to
                site.module.to("meta")
            _return_freed_memory()

    def units(self, sites: list[AttentionSite], *, write: bool) -> Iterator[tuple[Any, list[AttentionSite]]]:
        """One layer after another. The next layer's tensors are read in a background thread while this one is
        rewritten (file reads and the factorization's matmuls both release the GIL), so reading overlaps the
        math, for one more layer in memory."""
        groups: dict[str, list[AttentionSite]] = {}
        for site in sites:
            groups.setdefault(_unit_of(site.name), []).append(site)
        units = list(groups.items())
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clover-read") as reader:
            ahead = reader.submit(self._read_unit, units[0][0]) if units else None
            for i, (unit, unit_sites) in enumerate(units):
                current, ahead = ahead, reader.submit(self._read_unit, units[i + 1][0]) if i + 1 < len(units) else None
                yield self.loaded(unit, unit_sites, write=write, prefetched=current), unit_sites

    def shard_writer(self, directory: pathlib.Path, shard_bytes: int) -> ShardWriter:
        """A writer of this model's output: every floating tensor in the model's dtype, except those transformers
        keeps in float32 at that dtype (T5's ``wo`` in float16), as ``from_pretrained`` and ``save_pretrained``
        would leave them."""
        return ShardWriter(directory, dtype=self.dtype, float32_names=self.float32_names, shard_bytes=shard_bytes)

    def copy_rest(self, progress: bool = False) -> None:
        """Copy every tensor no rewritten layer holds, one at a time, into the writer."""
        rest = [name for name in self.stored if name not in self.written]
        with tqdm(total=len(rest), desc="copying", unit="tensor", disable=not progress) as bar:
            for name, tensor in self._read(rest):
                self.writer.add(self.saved_name(name), tensor)
                del tensor  # freed before the next one is read
                bar.update()

    def copy_side_files(self, directory: pathlib.Path, tokenizer: pathlib.Path | None = None) -> None:
        """The checkpoint's other files (configs, tokenizer) into the output ``directory``; where ``tokenizer``
        names a directory (the --tokenizer of weights saved without one), its tokenizer files instead of the
        checkpoint's, as the in-memory path writes the tokenizer it loaded."""
        from .io import drop_loader_arguments

        for name in _SIDE_FILES:
            if (self.directory / name).is_file() and not (tokenizer is not None and name in _TOKENIZER_SIDE_FILES):
                shutil.copy2(self.directory / name, directory / name)
        for name in _TOKENIZER_SIDE_FILES if tokenizer is not None else ():
            if (tokenizer / name).is_file():
                shutil.copy2(tokenizer / name, directory / name)
        drop_loader_arguments(directory)  # as the in-memory path's save: how some process once read the files
        if self.kind == "speech-seq2seq" and not (directory / "preprocessor_config.json").exists():
            from .models import whisper_feature_extractor

            # as the in-memory path writes it: transformers' ASR pipeline needs one
            whisper_feature_extractor(self.directory, self.model.config).save_pretrained(directory)

    def check_tokenizer(self, tokenizer: pathlib.Path | None = None) -> None:
        """Refuse a damaged tokenizer (the checkpoint's, or ``tokenizer``'s) in one line before anything is
        written, as loading the model in memory does, rather than copy it beside the weights. Reads only."""
        from .models import _load_tokenizer

        _load_tokenizer(tokenizer if tokenizer is not None else self.directory, self.kind, self.model.config, {})


def stream_decompose(
    source: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    compute_dtype: torch.dtype = torch.float64,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    shard_bytes: int = SHARD_BYTES,
    tokenizer: pathlib.Path | None = None,
) -> int:
    """Write CLOVER's exact orthogonal rewrite of the checkpoint ``source`` into the (staging) ``directory``,
    one layer at a time. Returns the number of attention sites rewritten."""
    from .decompose import decompose_site
    from .models import recorded_source

    directory = pathlib.Path(directory)
    streamed = StreamedModel(source, device=device, dtype=dtype)
    streamed.check_tokenizer(tokenizer)
    sites = streamed.sites()
    with streamed.shard_writer(directory, shard_bytes) as streamed.writer, torch.no_grad():
        bar = tqdm(total=len(sites), desc="factorizing attention", unit="attn", disable=not progress)
        for loaded, unit in streamed.units(sites, write=True):
            with loaded:
                for site in unit:
                    decompose_site(site, compute_dtype=compute_dtype, write=True, check=False)  # loaded() checked
                    bar.update()
        bar.close()
        streamed.copy_rest(progress)
        streamed.writer.close()
    config = json.loads((streamed.directory / "config.json").read_text(encoding="utf-8"))
    config["clover"] = {"method": "decompose", "compute_dtype": str(compute_dtype).removeprefix("torch."),
                        "source": recorded_source(source), "streamed": True}  # fmt: skip
    config["dtype"] = str(streamed.dtype).removeprefix("torch.")  # as save_pretrained of the loaded model writes
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    streamed.copy_side_files(directory, tokenizer)
    return len(sites)


def stream_prune(
    source: str | os.PathLike,
    directory: str | os.PathLike,
    config,
    *,
    input_moments=None,
    compute_dtype: torch.dtype = torch.float64,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    shard_bytes: int = SHARD_BYTES,
    tokenizer: pathlib.Path | None = None,
):
    """Prune the checkpoint ``source`` into the (staging) ``directory`` one layer at a time: scores in a first
    pass over the layers, the rewrite in a second. Returns the ``PruneReport``."""
    from .io import pruned_model_code
    from .modeling_clover import CONFIG_KEY
    from .models import recorded_source
    from .prune import prune_

    directory = pathlib.Path(directory)
    streamed = StreamedModel(source, device=device, dtype=dtype)
    streamed.check_tokenizer(tokenizer)
    with streamed.shard_writer(directory, shard_bytes) as streamed.writer:
        report = prune_(
            streamed.model, config, input_moments=input_moments, compute_dtype=compute_dtype, progress=progress,
            weights=streamed,
        )  # fmt: skip
        streamed.copy_rest(progress)
        streamed.writer.close()
    written = json.loads((streamed.directory / "config.json").read_text(encoding="utf-8"))
    base = type(streamed.model).__name__
    specs = getattr(streamed.model.config, CONFIG_KEY)
    written[CONFIG_KEY] = {**specs, "source": recorded_source(source), "streamed": True}
    written["auto_map"], modeling_code = pruned_model_code(specs["sites"], streamed.model, streamed.kind)
    written["architectures"] = [f"Clover{base}"]
    written["dtype"] = str(streamed.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    (directory / "modeling_clover.py").write_text(modeling_code)
    streamed.copy_side_files(directory, tokenizer)
    return report


def streamed_calibration_model(
    source: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """The checkpoint's model with every module's weights read from its files only while it runs (accelerate's
    disk offload over the safetensors themselves: nothing is copied), for collecting calibration moments."""
    return _offloaded(StreamedModel(source, device=device, dtype=dtype))


def _offloaded(streamed: StreamedModel) -> nn.Module:
    """``streamed``'s model under accelerate's disk offload hooks, reading from the checkpoint's own files."""
    from accelerate import dispatch_model

    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    index = {
        key: {
            "safetensors_file": str(streamed.reader.files[stored]),
            "weight_name": stored,
            "dtype": name.get(streamed.dtype, "float32"),
        }  # fmt: skip
        for key, stored in streamed.stored.items()
    }
    for tied, source_key in (getattr(streamed.model, "all_tied_weights_keys", None) or {}).items():
        if tied not in index and source_key in index:
            index[tied] = index[source_key]
    # accelerate warns that the weights are on the meta device, which is the point here
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    return dispatch_model(
        streamed.model, device_map={"": "disk"}, main_device=str(streamed.device), offload_index=index,
        offload_buffers=False, force_hooks=True,
    )  # fmt: skip


class _NotOneStack(Exception):
    """The layers do not hand on their hidden states as a tensor (or a tuple led by one): calibrate otherwise."""


class _PastTheLastLayer(Exception):
    """The calibration inputs of every layer are recorded: what follows the layers (a head) need not run."""


class MomentsNotWritten(Exception):
    """A layer's calibration moments could not be written to disk (a full or read-only disk)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class _Recorder(nn.Module):
    """Stands in for a layer while the calibration inputs are captured: records the arguments besides the hidden
    states that each forward gives it (masks, positions: the same whatever the states are) and hands the hidden
    states on unchanged, so the model runs to its end with only its first layer's weights."""

    def __init__(self, layer: nn.Module, calls: list, shape: dict, hidden: list | None, last: bool):
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: accelerate's hooks and .to() must not reach it
        self.calls, self.shape, self.hidden, self.last = calls, shape, hidden, last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the model's loop reads the layer's attributes (Gemma 3's attention_type)
            return getattr(self.__dict__["layer"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((args[1:], kwargs, bool(args)))
        if self.hidden is not None:
            self.hidden.append(hidden)
        if self.last:
            raise _PastTheLastLayer
        return (hidden,) + (None,) * self.shape["extra"] if self.shape["tuple"] else hidden


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs, positional = call
    output = layer(hidden, *args, **kwargs) if positional else layer(*args, hidden_states=hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _one_stack(model: nn.Module, sites: list[AttentionSite]) -> str | None:
    """The name of the list of layers that holds every site, or None where they sit in several (an encoder and
    a decoder, two towers) or outside one."""
    stacks = {_unit_of(site.name).rpartition(".")[0] for site in sites}
    if len(stacks) != 1 or any(_unit_of(site.name) == site.name for site in sites):
        return None
    (name,) = stacks
    return name if isinstance(model.get_submodule(name), nn.ModuleList) else None


def layerwise_moments(
    source: str | os.PathLike,
    calibrate: Callable[[nn.Module], None],
    directory: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> pathlib.Path | None:
    """The input moments of every attention site of the checkpoint ``source`` on ``calibrate(model)``'s forward
    passes, one layer in memory at a time, written to ``directory``/moments.safetensors (``InputMoments.save``'s
    format); returns that file, or None where the sites do not all sit in one list of layers (then use
    ``streamed_calibration_model``).

    A first pass runs ``calibrate`` with the first layer loaded and every other one replaced by a recorder of its
    arguments (embeddings and the rest read by accelerate's disk offload); then each layer in turn is read once,
    runs every batch's hidden states (kept in memory, one set) and is dropped, its moments written to a file of
    its own. The model stops after its last layer: ``calibrate`` gets None from each call, and must only drive
    the model."""
    from .prune import InputMoments

    directory = pathlib.Path(directory)
    streamed = StreamedModel(source, device=device, dtype=dtype)
    sites = streamed.sites()
    stack_name = _one_stack(streamed.model, sites)
    if stack_name is None:
        return None
    stack = streamed.model.get_submodule(stack_name)
    layers = list(stack)
    by_unit: dict[str, list[AttentionSite]] = {}
    for site in sites:
        by_unit.setdefault(_unit_of(site.name), []).append(site)
    calls: list[list | None] = [[] for _ in layers]
    shape: dict = {}
    hidden: list[torch.Tensor] = []
    for j, layer in enumerate(layers):
        stack[j] = _Recorder(layer, calls[j], shape, hidden if j == 1 else None, last=j == len(layers) - 1)
    model = _offloaded(streamed)  # before the layers return: each is read once, below, not at every forward
    forward = model.forward
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a cache shared by the recorded calls would keep every layer's K and V

    @functools.wraps(forward)
    def up_to_the_last_layer(*args, **kwargs):  # the head's weights are never read
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        try:
            return forward(*args, **kwargs)
        except _PastTheLastLayer:
            return None

    model.forward = up_to_the_last_layer

    def learn_shape(_module, _args, output) -> None:
        is_tuple = isinstance(output, tuple)
        if not isinstance(output[0] if is_tuple and output else output, torch.Tensor):
            raise _NotOneStack
        if is_tuple and any(isinstance(extra, torch.Tensor) for extra in output[1:]):
            raise _NotOneStack  # the next layer may take more of it than the hidden states (T5's position bias)
        shape.update(tuple=is_tuple, extra=len(output) - 1 if is_tuple else 0)
        if len(layers) == 1:
            raise _PastTheLastLayer

    parts = []
    with tqdm(total=len(layers), desc="calibrating layers", unit="layer", disable=not progress) as bar:
        for j, layer in enumerate(layers):
            stack[j] = layer
            unit = f"{stack_name}.{j}"
            with streamed.loaded(unit, by_unit.get(unit, []), write=False), torch.no_grad():
                moments, handles = InputMoments.watching(by_unit.get(unit, []))
                try:
                    if j == 0:
                        handles.append(layer.register_forward_hook(learn_shape))
                        try:
                            calibrate(model)
                        except _NotOneStack:
                            return None
                    else:
                        for b, call in enumerate(calls[j]):
                            hidden[b] = _run_layer(layer, hidden[b], call)
                finally:
                    for handle in handles:
                        handle.remove()
            calls[j] = None  # the masks and positions only this layer used
            moments.refuse_non_finite()  # one line, and nothing cached
            if by_unit.get(unit):
                parts.append(directory / f"layer-{j}.safetensors")
                try:
                    moments.save(parts[-1])
                except (OSError, SafetensorError) as error:
                    raise MomentsNotWritten(error) from error
            del moments
            bar.update()
    hidden.clear()
    _return_freed_memory()
    target = directory / "moments.safetensors"
    try:
        _concatenate_safetensors(parts, target)
    except (OSError, SafetensorError) as error:
        raise MomentsNotWritten(error) from error
    return target


def _concatenate_safetensors(parts: list[pathlib.Path], target: pathlib.Path) -> None:
    """One safetensors file holding every tensor of ``parts`` (distinct names), their data copied through in
    chunks, each part deleted once copied (the disk holds the moments about once); the metadata's "aliases" maps
    are merged, as ``InputMoments.save`` writes them."""
    header: dict = {}
    aliases: dict = {}
    segments = []
    offset = 0
    for part in parts:
        with safe_open(str(part), framework="pt") as mapped:
            aliases.update(json.loads((mapped.metadata() or {}).get("aliases", "{}")))
        with open(part, "rb") as f:
            entries, data_start = _safetensors_header(part, f)
        length = max((entry["data_offsets"][1] for entry in entries.values()), default=0)
        for name, entry in entries.items():
            begin, end = entry["data_offsets"]
            header[name] = {**entry, "data_offsets": [offset + begin, offset + end]}
        segments.append((part, data_start))
        offset += length
    header["__metadata__"] = {"aliases": json.dumps(aliases)}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # as safetensors aligns the data
    with open(target, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for part, data_start in segments:
            with open(part, "rb") as f:
                f.seek(data_start)
                shutil.copyfileobj(f, out)
            part.unlink()


def write_random_checkpoint(
    config,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = SHARD_BYTES,
    seed: int = 0,
) -> int:
    """Write a checkpoint of random weights for ``config`` (a transformers config) tensor by tensor, never
    holding the model: matrices N(0, 0.02²), norm weights 1, biases 0, as save_pretrained would name them.
    For trying and benchmarking the streaming path at any size. Returns the bytes written."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    generator = torch.Generator().manual_seed(seed)
    with ShardWriter(directory, shard_bytes=shard_bytes) as writer:
        for name, param in model.named_parameters(remove_duplicate=True):
            if name in tied:
                continue
            if param.dim() >= 2:
                tensor = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
                tensor = tensor.to(dtype)
            else:
                tensor = (torch.zeros if name.endswith("bias") else torch.ones)(param.shape, dtype=dtype)
            writer.add(name, tensor)
            del tensor
        writer.close()
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    return writer.total_bytes
