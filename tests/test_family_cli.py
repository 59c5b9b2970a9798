"""Every family of the table through the command line, as a user's checkpoint saved without a tokenizer
(what ``save_pretrained`` of a model alone leaves): decompose verifies on token ids, prune writes a checkpoint that
eval reports on (parameters, and why the text metric was skipped), and calibration is one clear line."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_ARCHS, build_tiny, qk_ratio

from clover.cli import main


def _run(capsys, *arguments) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in arguments])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_saved_without_a_tokenizer_through_the_cli(arch, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))
    build_tiny(arch).save_pretrained(tmp_path / "model")
    code, out, err = _run(capsys, "decompose", tmp_path / "model", "--out", tmp_path / "dec", "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["max_abs_output_change"] < 1e-4  # exact, probed without a tokenizer

    ratios = ["--vo-ratio", "0.5", "--qk-ratio", str(qk_ratio(arch, 0.25))]
    code, out, err = _run(capsys, "prune", tmp_path / "model", *ratios, "--out", tmp_path / "pruned", "--quiet")
    assert code == 0, err
    code, out, err = _run(capsys, "eval", tmp_path / "pruned", "--json", "--quiet", "--tokens", "64")
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    unpruned = sum(p.numel() for p in build_tiny(arch).parameters())
    assert 0 < result["parameters"] < unpruned and "skipped" in result

    code, _, err = _run(capsys, "prune", tmp_path / "model", "--vo-ratio", "0.5", "--method", "calibrated",
                        "--out", tmp_path / "calibrated", "--quiet")  # fmt: skip
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("clover: error: "), err
    assert "--tokenizer DIR" in lines[0] and not (tmp_path / "calibrated").exists()
