"""Pruned checkpoints describe themselves (format 2), and checkpoints of the previous format keep working.

``tests/data/format1-llama`` was written by clover before the families redesign (format 1: each site spec named
its family, and the modeling file defined every supported class); ``expected_logits.pt`` are its logits then.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import build_tiny, model_output

from clover.errors import CloverError
from clover.finetune import CloverModel
from clover.io import save_pruned_model, write_pruned_model
from clover.modeling_clover import FORMAT_VERSION
from clover.models import LoadedModel, load_model
from clover.prune import PruneConfig, prune_

FIXTURE = Path(__file__).resolve().parent / "data" / "format1-llama"
IDS = torch.arange(3, 15).reshape(1, 12)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_format1_checkpoint_loads_heals_and_is_rewritten_in_the_current_format(tmp_path):
    source = tmp_path / "old"
    shutil.copytree(FIXTURE, source)
    loaded = load_model(str(source))  # its own (format-1) modeling file, through trust_remote_code
    # the same weights; the logits were saved on another CPU, whose float32 kernels round differently (seen: 6e-7)
    expected_then = torch.load(FIXTURE / "expected_logits.pt")
    torch.testing.assert_close(_logits(loaded.model), expected_then, atol=1e-5, rtol=0)
    clover = CloverModel(loaded.model)  # reads the format-1 specs, upgraded in memory
    torch.testing.assert_close(_logits(clover), _logits(loaded.model), atol=1e-5, rtol=0)
    merged = clover.merge_and_unload()
    expected = _logits(merged)
    (tmp_path / "new").mkdir()
    write_pruned_model(LoadedModel(merged, None, "tiny", "causal-lm"), tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["clover"]["format"] == FORMAT_VERSION
    spec = config["clover"]["sites"]["model.layers.0.self_attn"]
    assert "family" not in spec and spec["attention_class"] == "CloverLlamaAttention" and spec["output"] == "o_proj"
    torch.testing.assert_close(_logits(load_model(str(tmp_path / "new")).model), expected, atol=0, rtol=0)


def test_the_modeling_file_defines_only_what_the_checkpoint_needs(tmp_path):
    model = build_tiny("qwen3")
    prune_(model, PruneConfig(vo_ratio=0.5))
    save_pruned_model(LoadedModel(model, None, "tiny", "causal-lm"), tmp_path / "p")
    source = (tmp_path / "p" / "modeling_clover.py").read_text()
    # Qwen3's attention and its parent, its LM class and bare model; no other family's attention or model class
    assert "class CloverQwen3Attention(CloverLlamaAttention)" in source and "class CloverLlamaAttention(" in source
    assert "define_model_classes(['Qwen3ForCausalLM', 'Qwen3Model'])" in source  # the LM and its bare model
    for other in ("CloverSeq2SeqAttention", "CloverBertSelfAttention", "CloverSelfAttention(", "GPT2", "Whisper"):
        assert other not in source
    # it runs with torch and transformers alone
    script = (
        f"import sys, runpy; ns = runpy.run_path({str(tmp_path / 'p' / 'modeling_clover.py')!r}); "
        "assert 'CloverQwen3ForCausalLM' in ns and 'clover' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_an_unknown_attention_class_is_a_clear_error(tmp_path):
    model = build_tiny("gpt2")
    prune_(model, PruneConfig(vo_ratio=0.5))
    save_pruned_model(LoadedModel(model, None, "tiny", "causal-lm"), tmp_path / "p")
    config_path = tmp_path / "p" / "config.json"
    config = json.loads(config_path.read_text())
    for spec in config["clover"]["sites"].values():
        spec["attention_class"] = "CloverFutureAttention"
    config_path.write_text(json.dumps(config))
    from clover.errors import CloverError

    try:
        load_model(str(tmp_path / "p"))
    except CloverError as error:
        assert "CloverFutureAttention" in str(error) and "clover version that wrote it" in str(error)
    else:
        raise AssertionError("loading a checkpoint with an unknown attention class must fail clearly")


def test_save_pruned_model_takes_a_bare_model_and_refuses_one_with_nothing_pruned(tmp_path):
    model = build_tiny("gpt2")
    with pytest.raises(CloverError, match="nothing of this GPT2LMHeadModel is pruned"):
        save_pruned_model(model, tmp_path / "unpruned")
    prune_(model, PruneConfig())  # ratios of 0: nothing removed, nothing recorded
    with pytest.raises(CloverError, match="is pruned"):
        save_pruned_model(model, tmp_path / "unpruned")
    assert list(tmp_path.iterdir()) == []  # not even a staging folder
    with pytest.raises(CloverError, match="a clover.models.LoadedModel or a transformers model, not dict"):
        save_pruned_model({"model": model}, tmp_path / "dict")
    prune_(model, PruneConfig(vo_ratio=0.5))
    save_pruned_model(model, tmp_path / "pruned")  # the model alone, without a LoadedModel around it
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    torch.testing.assert_close(model_output(reloaded), model_output(model.eval()), atol=0, rtol=0)
