"""Atomic checkpoint writing: a directory appears complete or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CloverError

if TYPE_CHECKING:
    from torch import nn

MARKER = ".clover-output.json"  # written last into every directory clover commits: the files it wrote
# Files clover writes, for directories written before the marker existed (config.json must also carry "clover").
_LEGACY_NAMES = re.compile(
    r"(config|generation_config|preprocessor_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens"
    r"|vocab|merges|model\.safetensors\.index|adapter_config|clover_adapter)\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|adapter_model\.safetensors|modeling_clover\.py|vocab\.txt|merges\.txt|tokenizer\.model|chat_template\.jinja"
    r"|diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors(\.index\.json)?"  # a diffusers UNet's weights
    r"|train_log\.csv|(finetune_)?report\.json|adapter|clover_config\.json|clover_adapter\.safetensors"
    r"|classifier_head\.safetensors|\.clover-output\.json"
)
_LEGACY_ADAPTER_NAMES = re.compile(r"README\.md")  # PEFT writes one into the adapter folder it saves
_STAGING = re.compile(r"\.(?P<name>.+)\.(partial|old|probe)-(?P<pid>\d+)-\w+")


def _tree(path: Path) -> set[str]:
    """Every file and folder under ``path``, as paths relative to it (subfolders' contents included)."""
    return {entry.relative_to(path).as_posix() for entry in path.rglob("*")}


def _written_by_clover(path: Path) -> bool:
    """True if ``path`` holds exactly what a clover command committed there, and nothing the user added, at any
    depth (a note dropped into a finetune output's adapter/ folder counts)."""
    found = _tree(path) - {MARKER}
    marker = path / MARKER
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
            written = set(recorded.get("tree") or recorded["entries"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if "tree" not in recorded:  # a marker of the top-level names only: what lies deeper must be clover's kind
            return {e for e in found if "/" not in e} <= written and all(map(_legacy_name, found - written))
        return found <= written
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "clover" in config and all(map(_legacy_name, found))


def _legacy_name(entry: str) -> bool:
    """Whether a path under an output directory written before the marker listed every path is one clover
    writes there (by its name; README.md only inside a folder, where PEFT saves one with an adapter)."""
    folder, _, name = entry.rpartition("/")
    return bool(_LEGACY_NAMES.fullmatch(name) or (folder and _LEGACY_ADAPTER_NAMES.fullmatch(name)))


def check_output_dir(
    out: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = ()
) -> Path:
    """Refuse an output path that would lose the user's files; returns the resolved path.

    An existing non-empty directory is replaced only with ``overwrite`` and only if clover wrote it (its files and
    nothing else), and never when it is one of ``inputs`` or holds one of them."""
    if not str(out).strip():
        raise CloverError("--out is empty; give a directory path")
    path = Path(out).expanduser().resolve()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CloverError(f"--out {path}: {parent} is a file, not a directory; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CloverError(f"--out {path}: {parent} is not writable; choose another path")
            _probe_folder(path, parent)
            break
    if path.exists() and not path.is_dir():
        raise CloverError(f"--out {path} exists and is a file; give a directory path")
    for item in inputs:
        source = Path(item).expanduser()
        if source.exists() and (source.resolve() == path or path in source.resolve().parents):
            raise CloverError(f"--out {path} is the input model {item} or holds it; choose another path")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise CloverError(f"--out {path} already exists and is not empty; pass --overwrite or choose another path")
        if not _written_by_clover(path):
            raise CloverError(
                f"--out {path} holds files clover did not write; --overwrite only replaces clover's own output "
                "directories. Choose another path or move those files away"
            )
    return path


def _probe_folder(path: Path, parent: Path) -> None:
    """Create and remove a folder where the output's staging folder will go, so that a place no folder can be made
    in (a read-only mount, /proc) is refused before minutes of work, not after them."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-{os.getpid()}-", dir=parent))
    except OSError as error:
        raise CloverError(
            f"--out {path}: cannot create a folder in {parent} ({error.strerror}); choose another path"
        ) from None


def process_alive(pid: int) -> bool:
    """Whether a process of this pid exists (staging names carry the pid of the run that made them)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(final: Path) -> None:
    """Remove the staging and trash folders that a killed run on the same target left beside it."""
    if not final.parent.is_dir():
        return
    for entry in final.parent.glob(f".{glob.escape(final.name)}.*-*"):
        match = _STAGING.fullmatch(entry.name)
        if match and match["name"] == final.name and not process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    # flock on the parent directory itself: no lock file is left behind in the user's folder
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


# every directory this process has committed, in order: an interruption after a commit says what is complete
COMMITTED: list[Path] = []


@contextlib.contextmanager
def atomic_directory(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    carries_existing: bool = False,
) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out`` in one rename, on error it vanishes.

    The commit holds a lock on the parent and checks the target again, so a directory that another run wrote
    meanwhile is never replaced (unless ``overwrite``, and then only if clover wrote it). ``carries_existing``:
    the caller copies every file of an existing ``out`` into the staging directory (an adapter saved into a
    user's folder), so nothing is lost and the folder need not be clover's own; no marker is written."""
    final = Path(out).expanduser().resolve() if carries_existing else None
    final = final or check_output_dir(out, overwrite=overwrite, inputs=inputs)
    created = [folder for folder in (final.parent, *final.parent.parents) if not folder.exists()]
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield staging
        if not carries_existing:
            entries = sorted(entry.name for entry in staging.iterdir())
            record = {"entries": entries, "tree": sorted(_tree(staging))}
            (staging / MARKER).write_text(json.dumps(record) + "\n")
        _apply_umask_modes(staging, existing=final if carries_existing and final.is_dir() else None)
        with _directory_lock(final.parent):
            if final.exists() and any(final.iterdir()):
                if not overwrite:
                    raise CloverError(f"--out {final} was written by another run meanwhile; nothing was replaced")
                if not carries_existing:
                    check_output_dir(final, overwrite=True, inputs=inputs)
                trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
                final.rename(trash / final.name)
                staging.rename(final)
                _record_commit(final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                staging.rename(final)  # an empty directory at the target is replaced by the rename
                _record_commit(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created for its output (deepest first), where nothing else came into them."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another run, or the user, put something there), or already gone
            return


def _record_commit(final: Path) -> None:
    """Remember a committed directory, unless it sits inside a staging directory of this run (finetune's adapter):
    that one is complete only once its parent is committed, and it vanishes with it otherwise."""
    own_staging = (_STAGING.fullmatch(parent.name) for parent in final.parents)
    if not any(match and int(match["pid"]) == os.getpid() for match in own_staging):
        COMMITTED.append(final)


def _current_umask() -> int:
    try:  # Linux states it; setting it to read it would change it for every thread of the process meanwhile
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def _apply_umask_modes(staging: Path, *, existing: Path | None = None) -> None:
    """Give what clover wrote the modes a plain mkdir/open would have (mkdtemp and some writers use 0700/0600).

    ``existing``: the folder the staging directory replaces, whose files were linked or copied in (an adapter
    saved into a user's folder): those keep their modes (a hard link is the user's very file), and the folder
    keeps its own mode."""
    umask = _current_umask()
    directory_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    for root, _subdirectories, files in os.walk(staging):
        relative = Path(root).relative_to(staging)
        if existing is not None and (existing / relative).is_dir():
            os.chmod(root, (existing / relative).stat().st_mode & 0o7777)
        else:
            os.chmod(root, directory_mode)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or (existing is not None and os.path.lexists(existing / relative / name)):
                continue
            os.chmod(path, file_mode | (os.stat(path).st_mode & 0o111 & ~umask))  # keep executable bits


def save_loaded_model(loaded, directory: Path) -> None:
    """Write a model with its tokenizer (and Whisper feature extractor) as a standard transformers checkpoint.

    A Whisper model always gets a preprocessor_config.json (transformers' ASR pipeline needs one), and the
    tokenizer_config.json loses the loader arguments that ``from_pretrained`` recorded (drop_loader_arguments)."""
    loaded.model.save_pretrained(directory)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)
    extractor = loaded.feature_extractor
    if extractor is None and loaded.kind == "speech-seq2seq":
        from transformers import WhisperFeatureExtractor

        extractor = WhisperFeatureExtractor(feature_size=loaded.model.config.num_mel_bins)
    if extractor is not None:
        extractor.save_pretrained(directory)
    drop_loader_arguments(directory)


def drop_loader_arguments(directory: Path) -> None:
    """Remove from the saved tokenizer_config.json / preprocessor_config.json the arguments ``from_pretrained``
    recorded ("is_local", "local_files_only", ...): they describe how this process read the files."""
    loader_arguments = {
        "is_local", "local_files_only", "trust_remote_code", "cache_dir", "_commit_hash", "force_download", "token",
        "revision", "subfolder", "proxies", "use_auth_token", "resume_download", "user_agent", "_from_auto",
        "_from_pipeline",
    }  # fmt: skip
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        settings = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(settings, dict) and loader_arguments & settings.keys():
            kept = {key: value for key, value in settings.items() if key not in loader_arguments}
            path.write_text(json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


AUTO_CLASS = {
    "causal-lm": "AutoModelForCausalLM",
    "encoder": "AutoModel",
    "vision": "AutoModel",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "image-text-to-text": "AutoModelForImageTextToText",
}


def holds_bare_model(model: nn.Module) -> bool:
    """Whether ``model`` holds its model_type's bare model (AutoModel's class), so that AutoModel can read the bare
    model from its checkpoint: a head over it (BertForSequenceClassification's ``bert``), or the bare model's parts
    side by side (T5ForConditionalGeneration's shared, encoder and decoder); not T5EncoderModel (no decoder)."""
    import torch
    import transformers
    from transformers.models.auto import modeling_auto

    bare = modeling_auto.MODEL_MAPPING_NAMES.get(getattr(model.config, "model_type", None))
    bare_class = getattr(transformers, bare, None) if isinstance(bare, str) else None
    if bare_class is None:
        return False
    if isinstance(model, bare_class) or isinstance(getattr(model, model.base_model_prefix, None), bare_class):
        return True
    with torch.device("meta"):
        skeleton = bare_class(model.config)
    own = dict(model.named_children())
    return all(type(own.get(name)) is type(child) for name, child in skeleton.named_children())


def pruned_model_code(sites: dict[str, dict], model: nn.Module, kind: str) -> tuple[dict[str, str], str]:
    """The ``auto_map`` of a pruned checkpoint of ``model`` (a transformers class, or its ``Clover<name>``) and the
    ``modeling_clover.py`` it points at (the ``Clover<name>`` classes of every auto class it answers to)."""
    base = type(model).__name__.removeprefix("Clover")
    classes = pruned_auto_map(base, kind, has_base_model=holds_bare_model(model))
    auto_map = {auto: f"modeling_clover.Clover{name}" for auto, name in classes.items()}
    return auto_map, pruned_modeling_source(sites, list(dict.fromkeys(classes.values())))


def pruned_auto_map(base: str, kind: str, *, has_base_model: bool = True) -> dict[str, str]:
    """The auto classes a pruned checkpoint of transformers class ``base`` answers to, each with the transformers
    class its ``Clover<name>`` builds on: every auto class whose table maps the model_type to ``base`` (a
    BertForSequenceClassification loads with AutoModelForSequenceClassification), and AutoModel with the bare model
    (BertModel: the head's weights are skipped, as transformers does for a stock checkpoint with a head) where
    ``base`` holds one (``has_base_model``; T5EncoderModel holds no T5Model, whose decoder it lacks)."""
    import transformers
    from transformers.models.auto import modeling_auto

    model_type = getattr(getattr(getattr(transformers, base, None), "config_class", None), "model_type", None)
    tables = {
        name: getattr(modeling_auto, name)._model_mapping._model_mapping
        for name in sorted(dir(modeling_auto))
        if name.startswith("AutoModel") and hasattr(getattr(modeling_auto, name), "_model_mapping")
    }
    auto_map = {name: base for name, table in tables.items() if table.get(model_type) == base}
    if not auto_map:  # a class transformers lists under no auto class for its model_type
        auto_map = {AUTO_CLASS[kind]: base}
    bare = tables["AutoModel"].get(model_type)
    if has_base_model and "AutoModel" not in auto_map and isinstance(bare, str) and hasattr(transformers, bare):
        auto_map["AutoModel"] = bare
    return auto_map


def save_pruned_model(
    loaded, out: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = ()
) -> Path:
    """Write a pruned model atomically: safetensors, config with the per-head dims, and the modeling code.

    The directory loads with ``AutoModel*.from_pretrained(DIR, trust_remote_code=True)`` in a process that
    does not have clover installed: ``modeling_clover.py`` (torch + transformers only) is copied beside the weights.
    """
    loaded = _as_loaded(loaded)
    with atomic_directory(out, overwrite=overwrite, inputs=inputs) as staging:
        write_pruned_model(loaded, staging)
    return Path(out)


def _as_loaded(loaded):
    """A ``LoadedModel``, or a transformers model given alone (``prune_(model, ...)`` then save), wrapped as one."""
    from .models import LoadedModel, model_kind

    if isinstance(loaded, LoadedModel):
        return loaded
    config = getattr(loaded, "config", None)
    if not hasattr(config, "to_dict"):
        raise CloverError(
            f"save_pruned_model takes a clover.models.LoadedModel or a transformers model, not {type(loaded).__name__}"
        )
    return LoadedModel(loaded, None, type(loaded).__name__, model_kind(config.to_dict())[0])


def write_pruned_model(loaded, directory: Path) -> None:
    """The files of a pruned checkpoint, written into an existing (staging) directory."""
    import transformers

    from .families import checkpoint_family, pruned_site_specs, upgrade_pruned_specs

    model = loaded.model
    family = checkpoint_family(loaded.kind)
    if family is not None:  # a model transformers does not write (a diffusers UNet): its family's own files
        family.write_pruned_checkpoint(model, directory)
        return
    if not pruned_site_specs(model):  # its modeling code would refuse to build it: nothing to install
        raise CloverError(
            f"nothing of this {type(model).__name__} is pruned (prune_ it first, with a ratio or threshold > 0); "
            "an unpruned model is saved with save_pretrained and loads with stock transformers"
        )
    # a pruned checkpoint loaded back with trust_remote_code has the Clover class already (healed models)
    base = type(model).__name__.removeprefix("Clover")
    if not hasattr(transformers, base):
        raise CloverError(f"no pruned counterpart for {type(model).__name__}: transformers has no class {base}")
    clover_class = f"Clover{base}"
    upgrade_pruned_specs(model)
    had_map = "auto_map" in model.config.to_dict()
    previous = getattr(model.config, "auto_map", None)
    auto_map, source = pruned_model_code(pruned_site_specs(model), model, loaded.kind)
    model.config.auto_map = auto_map
    try:
        save_loaded_model(loaded, directory)
    finally:
        if had_map:
            model.config.auto_map = previous
        else:
            del model.config.auto_map  # the live model object is the plain class; only the files need the map
    (directory / "modeling_clover.py").write_text(source)
    _patch_architectures(directory / "config.json", clover_class)


def pruned_modeling_source(sites: dict[str, dict], base_names: list[str]) -> str:
    """The ``modeling_clover.py`` a pruned checkpoint carries: the self-contained base, the pruned attention
    classes its sites name (with their parents, from the family files), and its model class; nothing else."""
    import inspect
    import textwrap

    from . import families, modeling_clover  # noqa: F401  (importing the families registers their classes)
    from .modeling_clover import PRUNED_ATTENTION, PrunedAttention

    classes: list[type] = []
    for spec in sites.values():
        for cls in reversed(PRUNED_ATTENTION[spec["attention_class"]].__mro__):
            if issubclass(cls, PrunedAttention) and cls is not PrunedAttention and cls not in classes:
                classes.append(cls)
    parts = [Path(modeling_clover.__file__).read_text().rstrip()]
    for cls in classes:
        parts.append(f"# {cls.__name__}: from {cls.__module__}\n" + textwrap.dedent(inspect.getsource(cls)).rstrip())
    parts.append(f"define_model_classes({base_names!r})")
    return "\n\n\n".join(parts) + "\n"


def _patch_architectures(config_path: Path, clover_class: str) -> None:
    import json

    config = json.loads(config_path.read_text())
    config["architectures"] = [clover_class]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
