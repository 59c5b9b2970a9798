"""Nothing of the user's is lost, and faults (full disk, read-only folders, Ctrl-C, kills, concurrent runs) end in
one line: --overwrite only replaces clover's own output, staging never looks complete and is cleaned next time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file

from clover.cli import main
from clover.errors import CloverError
from clover.io import MARKER, atomic_directory

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def gpt2_dir(tmp_path) -> Path:
    path = tmp_path / "models" / "tiny-gpt2"
    build_tiny("gpt2").save_pretrained(path)
    return path


@pytest.fixture
def llama_with_tokenizer(tmp_path) -> Path:
    from test_finetune_cli import byte_tokenizer
    from test_heal import _byte_llama

    path = tmp_path / "llama"
    _byte_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def prune(model: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--vo-ratio", "0.5", "--out", str(out), "--quiet", *extra]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- --overwrite never loses the user's files


def test_overwrite_refuses_a_folder_of_other_files_and_the_working_directory(gpt2_dir, tmp_path, capsys, monkeypatch):
    user = tmp_path / "work"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "a.txt").write_text("mine")
    (user / "config.json").write_text("{}")  # looks a bit like a checkpoint, but clover never wrote it
    before = snapshot(user)
    assert main(prune(gpt2_dir, user, "--overwrite")) == 2
    assert "clover did not write" in one_line(capsys)
    monkeypatch.chdir(user)
    assert main(prune(gpt2_dir, Path("."), "--overwrite")) == 2
    one_line(capsys)
    assert snapshot(user) == before


def test_overwrite_never_replaces_the_input_or_a_folder_holding_it(gpt2_dir, tmp_path, capsys):
    sibling = gpt2_dir.parent / "other-model"
    build_tiny("bert").save_pretrained(sibling)
    capsys.readouterr()
    before = snapshot(gpt2_dir.parent)
    for out in (gpt2_dir, gpt2_dir.parent):
        assert main(prune(gpt2_dir, out, "--overwrite")) == 2
        assert "input model" in one_line(capsys)
    # a pruned checkpoint is clover's own, but still never the input of the same run
    pruned = tmp_path / "pruned"
    assert main(prune(gpt2_dir, pruned)) == 0
    assert main(prune(pruned, pruned, "--overwrite")) == 2
    assert "input model" in one_line(capsys)
    assert snapshot(gpt2_dir.parent) == before


def test_overwrite_replaces_clovers_own_output_but_not_once_the_user_adds_a_file(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune(gpt2_dir, out)) == 0
    written = json.loads((out / MARKER).read_text())["entries"]
    assert "model.safetensors" in written and "config.json" in written
    assert main(prune(gpt2_dir, out, "--overwrite", "--allocation", "layer")) == 0
    assert json.loads((out / "config.json").read_text())["clover"]["allocation"] == "layer"
    (out / "my-notes.txt").write_text("mine")
    assert main(prune(gpt2_dir, out, "--overwrite")) == 2
    assert "clover did not write" in one_line(capsys)
    assert (out / "my-notes.txt").read_text() == "mine"


@pytest.mark.parametrize("method", ["clover", "lora"])
@pytest.mark.parametrize("marker", ["tree", "top-level names only", "none"])
def test_overwrite_refuses_a_clover_output_once_the_user_adds_a_file_in_a_subfolder(marker, method, tmp_path):
    """A finetune output holds adapter/ (as CLOVER's or PEFT's save_pretrained writes it): clover's own output is
    replaceable whatever marker the folder has (the current one lists every path, older ones the top-level names,
    the oldest none), but not once a note is dropped into adapter/."""
    from clover.baselines import wrap_model
    from clover.io import check_output_dir

    out = tmp_path / "finetuned"
    wrapped, _ = wrap_model(build_tiny("llama"), method)
    with atomic_directory(out) as staging:
        (staging / "config.json").write_text(json.dumps({"clover": {"method": method}}))
        (staging / "train_log.csv").write_text("step,loss\n")
        wrapped.save_pretrained(staging / "adapter")
    recorded = json.loads((out / MARKER).read_text())
    assert any(entry.startswith("adapter/") for entry in recorded["tree"])
    if marker == "top-level names only":
        (out / MARKER).write_text(json.dumps({"entries": recorded["entries"]}))
    elif marker == "none":
        (out / MARKER).unlink()
    assert check_output_dir(out, overwrite=True) == out.resolve()  # clover's own: replaceable
    (out / "adapter" / "NOTES.txt").write_text("mine")
    with pytest.raises(CloverError, match="clover did not write"):
        check_output_dir(out, overwrite=True)
    assert (out / "adapter" / "NOTES.txt").read_text() == "mine"


def test_legacy_clover_output_without_marker_is_replaceable(gpt2_dir, tmp_path):
    out = tmp_path / "old"
    assert main(prune(gpt2_dir, out)) == 0
    (out / MARKER).unlink()  # as written before the marker existed: recognised by config.clover and file names
    assert main(prune(gpt2_dir, out, "--overwrite")) == 0


# ---------------------------------------------------------------- concurrent writers


def test_a_target_written_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CloverError, match="another run meanwhile"):
        with atomic_directory(out) as first_staging:
            with atomic_directory(out) as second_staging:  # both checked the target before either wrote
                (second_staging / "config.json").write_text('{"winner": "second"}')
            (first_staging / "config.json").write_text('{"winner": "first"}')
    assert json.loads((out / "config.json").read_text()) == {"winner": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the loser's staging is gone


def test_two_concurrent_prune_processes_one_wins_the_other_says_so(gpt2_dir, tmp_path):
    out = tmp_path / "out"
    driver = textwrap.dedent(
        f"""
        import sys, time, clover.io
        real = clover.io.write_pruned_model
        def slow(loaded, directory):
            real(loaded, directory)
            time.sleep(3)  # both runs are now past their start-time check, with staging written
        clover.io.write_pruned_model = slow
        from clover.cli import main
        sys.exit(main(["prune", {str(gpt2_dir)!r}, "--vo-ratio", "0.5", "--out", {str(out)!r}, "--quiet"]))
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    runs = [subprocess.Popen([sys.executable, "-c", driver], env=env, stderr=subprocess.PIPE, text=True)]
    time.sleep(0.5)
    runs.append(subprocess.Popen([sys.executable, "-c", driver], env=env, stderr=subprocess.PIPE, text=True))
    results = [(run.wait(timeout=120), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another run meanwhile" in loser and "Traceback" not in loser
    assert (out / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["models", "out"]


# ---------------------------------------------------------------- Ctrl-C, kills


def _interruptible(model: Path, out: Path, marker: Path) -> str:
    return textwrap.dedent(
        f"""
        import pathlib, signal, sys, time, clover.io
        # Ctrl-C as in a terminal: a job started in the background (``cmd &``, as CI scripts may) inherits SIGINT
        # ignored, and Python then installs no KeyboardInterrupt handler
        signal.signal(signal.SIGINT, signal.default_int_handler)
        real = clover.io.write_pruned_model
        def slow(loaded, directory):
            real(loaded, directory)
            pathlib.Path({str(marker)!r}).write_text(str(directory))
            time.sleep(60)  # mid-write: the staging directory holds a checkpoint
        clover.io.write_pruned_model = slow
        from clover.cli import main
        sys.exit(main(["prune", {str(model)!r}, "--vo-ratio", "0.5", "--out", {str(out)!r}, "--quiet"]))
        """
    )


def _start_and_wait(driver: str, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    run = subprocess.Popen([sys.executable, "-c", driver], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), run.stderr.read() if run.poll() is not None else "timed out"
    return run


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_mid_write_is_one_line_and_leaves_nothing(gpt2_dir, tmp_path, sig, code):
    out, marker = tmp_path / "out", tmp_path / "staging-written"
    run = _start_and_wait(_interruptible(gpt2_dir, out, marker), marker)
    run.send_signal(sig)
    assert run.wait(timeout=60) == code
    err = run.stderr.read().strip()
    assert err.count("\n") == 0 and "nothing was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "staging-written"]


def test_what_a_killed_run_leaves_is_cleaned_by_the_next_run(gpt2_dir, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "staging-written"
    run = _start_and_wait(_interruptible(gpt2_dir, out, marker), marker)
    run.kill()
    run.wait(timeout=60)
    left = Path(marker.read_text())
    assert left.is_dir() and not out.exists()  # a hidden .out.partial-PID-* folder, never the target itself
    assert main(prune(gpt2_dir, out)) == 0
    assert not left.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["models", "out", "staging-written"]


def test_a_killed_runs_probe_folder_is_cleaned_and_a_live_runs_kept(tmp_path):
    from clover.io import remove_stale_staging

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".out.probe-{dead.pid}-a1b2", tmp_path / f".out.probe-{os.getpid()}-c3d4"
    other = tmp_path / f".other.probe-{dead.pid}-e5f6"  # another target's: not this run's to clean
    for folder in (stale, live, other):
        folder.mkdir()
    remove_stale_staging(tmp_path / "out")
    assert not stale.exists() and live.exists() and other.exists()


def test_a_killed_runs_temporary_in_the_moments_cache_is_cleaned(tmp_path):
    from clover.quality import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".abc.{dead.pid}-x1y2.tmp"
    mine = tmp_path / f".abc.{os.getpid()}-x1y2.tmp"
    stale.write_bytes(b"half"), mine.write_bytes(b"half")
    stale_folder = tmp_path / f".abc.{dead.pid}-z3.tmp"  # a layer-by-layer calibration's work folder
    (stale_folder / "layer-0.safetensors").parent.mkdir()
    (stale_folder / "layer-0.safetensors").write_bytes(b"half")
    remove_stale_temporaries(tmp_path)
    assert not stale.exists() and not stale_folder.exists() and mine.exists()


# ---------------------------------------------------------------- full disk, read-only, odd --out


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs where the tests run as root (writes there really fail with ENOSPC), else skipped."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode:
        pytest.skip("a small tmpfs needs root")
    filler = mount / ".filler"
    try:  # fill it: later writes fail however small they are
        with filler.open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_full_disk_under_out_is_one_line_and_leaves_nothing(gpt2_dir, full_disk, capsys):
    assert main(prune(gpt2_dir, full_disk / "out")) == 1
    err = one_line(capsys)
    assert "No space left on device" in err and "nothing was written" in err
    assert [p.name for p in full_disk.iterdir()] == [".filler"]


def test_a_streamed_calibration_caches_its_moments_and_leaves_no_work_folder(
    llama_with_tokenizer, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))
    calibration = ["--method", "calibrated", "--calibration-samples", "2", "--calibration-length", "32", "--json"]
    outputs = []
    for run in ("first", "second"):
        assert main(prune(llama_with_tokenizer, tmp_path / run, *calibration, "--stream")) == 0
        outputs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        (entry,) = (tmp_path / "cache" / "moments").iterdir()  # the entry alone: the work folder went with the run
        assert entry.suffix == ".safetensors"
    assert [o["calibration_moments"] for o in outputs] == ["computed", "cached"]
    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_calibration_inputs_made_non_finite_by_an_mlp_are_one_line_and_never_cached(
    llama_with_tokenizer, tmp_path, monkeypatch, capsys, stream
):
    from test_heal import _byte_llama

    model = _byte_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")  # not attention: the next layer's inputs
    model.save_pretrained(llama_with_tokenizer)
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))
    calibration = ["--method", "calibrated", "--calibration-samples", "2", "--calibration-length", "32", stream]
    capsys.readouterr()
    assert main(prune(llama_with_tokenizer, tmp_path / "out", *calibration)) == 2
    assert "calibration inputs of model.layers.1.self_attn are not finite" in one_line(capsys)
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").glob("moments/*"))


def test_stream_and_no_stream_calibrate_in_the_dtype_asked_for_and_prune_alike(
    llama_with_tokenizer, tmp_path, monkeypatch, capsys
):
    from test_heal import _byte_llama

    _byte_llama().to(torch.bfloat16).save_pretrained(llama_with_tokenizer)
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))
    calibration = ["--method", "calibrated", "--calibration-samples", "2", "--calibration-length", "32",
                   "--dtype", "float32", "--recalibrate"]  # fmt: skip
    for stream in ("--stream", "--no-stream"):
        assert main(prune(llama_with_tokenizer, tmp_path / stream, *calibration, stream)) == 0
    streamed, loaded = (load_file(tmp_path / stream / "model.safetensors") for stream in ("--stream", "--no-stream"))
    assert streamed.keys() == loaded.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(streamed[name], tensor, atol=1e-6, rtol=0, msg=name)


def _notes(capsys, stream: str) -> list[str]:
    """The notes of a calibrated prune whose moments cannot be written: one line each, and streaming's first says
    the layer-by-layer calibration fell back to holding the moments in memory."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and all(line.startswith("clover: note: ") for line in err.splitlines()), err
    notes = err.splitlines()
    if stream == "--stream":
        assert notes.pop(0).startswith("clover: note: calibration moments held in memory: cannot write them")
    return notes


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_a_cache_that_cannot_be_written_never_stops_a_calibrated_prune(
    llama_with_tokenizer, tmp_path, monkeypatch, capsys, stream
):
    from safetensors import SafetensorError

    from clover.prune import InputMoments

    def fail(self, path):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(InputMoments, "save", fail)
    calibration = ["--method", "calibrated", "--calibration-samples", "2", "--calibration-length", "32", stream]
    capsys.readouterr()
    assert main(prune(llama_with_tokenizer, tmp_path / "out", *calibration)) == 0
    (note,) = _notes(capsys, stream)
    assert note.startswith("clover: note: calibration moments not cached")  # not Python's two lines
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert list((tmp_path / "cache" / "moments").iterdir()) == []  # no temporary left behind


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_full_moments_cache_disk_never_stops_a_calibrated_prune(
    llama_with_tokenizer, full_disk, tmp_path, monkeypatch, capsys, stream
):
    monkeypatch.setenv("CLOVER_CACHE", str(full_disk))
    calibration = ["--method", "calibrated", "--calibration-samples", "2", "--calibration-length", "32", stream]
    capsys.readouterr()
    assert main(prune(llama_with_tokenizer, tmp_path / "out", *calibration)) == 0
    (note,) = _notes(capsys, stream)
    assert note.startswith("clover: note: calibration moments not cached")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not list(full_disk.glob("moments/*"))  # no work folder or temporary left behind


def test_out_below_a_file_or_in_a_read_only_folder_is_one_line(gpt2_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    assert main(prune(gpt2_dir, tmp_path / "a-file" / "out")) == 2
    assert "is a file" in one_line(capsys)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root ignores permission bits
    assert main(prune(gpt2_dir, tmp_path / "ro" / "out")) == 2
    assert "not writable" in one_line(capsys)


def test_spectrum_out_names_the_file_it_wrote_and_refuses_unknown_formats(gpt2_dir, tmp_path, capsys):
    assert main(["spectrum", str(gpt2_dir), "--out", str(tmp_path / "plot"), "--quiet"]) == 0
    assert f"plot written to {tmp_path / 'plot.png'}" in capsys.readouterr().out
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    assert main(["spectrum", str(gpt2_dir), "--out", str(tmp_path / "plot.xyz"), "--quiet"]) == 2
    assert "unsupported image format" in one_line(capsys)
    assert main(["spectrum", str(gpt2_dir), "--out", str(tmp_path), "--quiet"]) == 2
    assert "is a directory" in one_line(capsys)
    (tmp_path / "figure.png").mkdir()  # --out figure writes figure.png, here a folder: refused before any work
    assert main(["spectrum", str(gpt2_dir), "--out", str(tmp_path / "figure"), "--overwrite", "--quiet"]) == 2
    assert "figure.png is a directory" in one_line(capsys)


def test_spectrum_never_replaces_an_existing_file_unless_told(gpt2_dir, tmp_path, capsys):
    mine = tmp_path / "mine.png"
    mine.write_text("precious")
    assert main(["spectrum", str(gpt2_dir), "--out", str(mine), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in one_line(capsys) and mine.read_text() == "precious"
    assert main(["spectrum", str(gpt2_dir), "--out", str(mine), "--quiet", "--overwrite"]) == 0
    assert mine.read_bytes().startswith(b"\x89PNG")
    assert not list(tmp_path.glob(".mine*"))  # no partial file beside it


# ---------------------------------------------------------------- cache command, dtype


def test_cache_lists_sizes_and_clears_only_what_clover_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path))
    key = "0123456789abcdef01234567"
    (tmp_path / "moments").mkdir()
    (tmp_path / "moments" / f"{key}.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "moments" / f".{key}.4242-ab_c1.tmp").write_bytes(b"\0" * 10)  # a killed run's temporary
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / "moments" / f".{key}.{dead.pid}-z9.tmp"  # and a killed layer-by-layer calibration's folder
    killed.mkdir()
    (killed / "layer-0.safetensors").write_bytes(b"\0" * 20)
    running = tmp_path / "moments" / f".{key}.{os.getpid()}-y8.tmp"  # a running prune's, reading its moments
    running.mkdir()
    os.link(tmp_path / "moments" / f"{key}.safetensors", running / "moments.safetensors")  # counted once
    (tmp_path / "models" / "smollm2-135m" / "v3").mkdir(parents=True)
    (tmp_path / "models" / "smollm2-135m" / "v3" / "config.json").write_text("{}")
    (tmp_path / "models" / "gemma3-270m" / "v3").mkdir(parents=True)  # a short name's folder holding a user file
    (tmp_path / "models" / "gemma3-270m" / "v3" / "config.json").write_text("{}")
    (tmp_path / "models" / "gemma3-270m" / "notes.txt").write_text("mine")
    # a user's own files put inside clover's folders: neither counted nor cleared
    (tmp_path / "models" / "my-vit").mkdir()
    (tmp_path / "models" / "my-vit" / "model.safetensors").write_bytes(b"\0" * 500)
    (tmp_path / "models" / "README.txt").write_text("mine")
    (tmp_path / "unrelated.txt").write_text("not clover's")
    assert main(["cache", "--json"]) == 0
    rows = {row["cache"]: row for row in json.loads(capsys.readouterr().out)["caches"]}
    assert {kind: row["bytes"] for kind, row in rows.items()} == {"models": 4, "moments": 1030, "speech": 0}
    assert rows["models"]["entries"] == 2
    assert main(["cache", "--clear", "all"]) == 0
    err = capsys.readouterr().err
    assert "left 3 entries clover did not write" in err and "left 1 in use by a running clover" in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "models", "models/README.txt", "models/gemma3-270m", "models/gemma3-270m/notes.txt", "models/my-vit",
        "models/my-vit/model.safetensors", "moments", f"moments/{running.name}",
        f"moments/{running.name}/moments.safetensors", "unrelated.txt",
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_input_dtype_is_kept_by_default(tmp_path, capsys, dtype):
    from safetensors import safe_open

    path = tmp_path / "half"
    build_tiny("llama").to(dtype).save_pretrained(path)
    out = tmp_path / "out"
    assert main(prune(path, out)) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {dtype}
    float32_bytes = 4 * sum(p.numel() for p in build_tiny("llama").parameters())
    assert (out / "model.safetensors").stat().st_size < 0.6 * float32_bytes


def test_whisper_eval_never_scores_the_calibration_sentences(tmp_path, capsys):
    path = tmp_path / "whisper"
    build_tiny("whisper").save_pretrained(path)
    capsys.readouterr()
    assert main(["eval", str(path), "--sentences", "21", "--quiet"]) == 2
    assert "calibration set" in one_line(capsys)


def test_eval_reports_the_kv_bytes_of_the_models_own_dtype(llama_with_tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    half = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(llama_with_tokenizer).to(torch.bfloat16).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (llama_with_tokenizer / name).exists():
            (half / name).write_bytes((llama_with_tokenizer / name).read_bytes())
    reports = {}
    for label, path in (("fp32", llama_with_tokenizer), ("bf16", half)):
        capsys.readouterr()
        assert main(["eval", str(path), "--tokens", "64", "--window", "32", "--json", "--quiet"]) == 0
        reports[label] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reports["bf16"]["dtype"] == "bfloat16"
    assert reports["bf16"]["kv_bytes_per_token"] == pytest.approx(reports["fp32"]["kv_bytes_per_token"] / 2)


def test_calibration_samples_beyond_the_shipped_data_are_counted_as_used(tmp_path, capsys, monkeypatch):
    """Whisper has 20 spoken sentences set apart for calibration and vision models 5 photographs: more asked
    for is calibrated on all of them, and the CLI says so (a note, as for --calibration-length)."""
    from clover.models import LoadedModel
    from clover.quality import SPEECH_CALIBRATION_SENTENCES, calibration_samples
    from clover.vision import CALIBRATION_IMAGES

    def kind(name: str) -> LoadedModel:
        return LoadedModel(None, None, "tiny", name)

    assert calibration_samples(kind("speech-seq2seq"), 50) == SPEECH_CALIBRATION_SENTENCES == 20
    assert calibration_samples(kind("speech-seq2seq"), 7) == 7
    assert calibration_samples(kind("vision"), 128) == len(CALIBRATION_IMAGES)
    assert calibration_samples(kind("causal-lm"), 128) == 128
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))
    build_tiny("dinov2").save_pretrained(tmp_path / "dinov2")
    capsys.readouterr()
    arguments = ["prune", str(tmp_path / "dinov2"), "--vo-ratio", "0.5", "--method", "calibrated", "--quiet"]
    assert main([*arguments, "--calibration-samples", "128", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--calibration-samples 128" in err and f"all {len(CALIBRATION_IMAGES)}" in err


def test_a_failed_run_removes_the_folders_it_created_for_out_and_only_those(tmp_path):
    from clover.io import atomic_directory

    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError), atomic_directory(out) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("the work failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and list((tmp_path / "kept").iterdir()) == []
    # a folder that something else wrote into meanwhile stays
    with pytest.raises(RuntimeError), atomic_directory(out) as staging:
        (tmp_path / "kept" / "new" / "theirs.txt").write_text("x")
        raise RuntimeError("the work failed")
    assert [p.name for p in (tmp_path / "kept" / "new").iterdir()] == ["theirs.txt"]
