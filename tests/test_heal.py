"""Healing: the CLOVER adapter on models pruned by clover, merged back into pruned checkpoints."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import FAMILY_TABLE, TINY_ARCHS, build_tiny, model_output, qk_ratio
from test_finetune import OTHER_TARGETS, _train
from test_finetune_cli import byte_tokenizer

from clover import finetune_data as data
from clover.cli_finetune import add_finetune_parser, cmd_finetune
from clover.errors import CloverError
from clover.families import attention_sites
from clover.finetune import CloverConfig, CloverModel, trainable_count
from clover.io import save_pruned_model, write_pruned_model
from clover.models import LoadedModel, load_model
from clover.prune import PruneConfig, prune_

ATOL = 1e-5  # float32 model, factors built in float64


def _pruned(arch: str, allocation: str = "uniform") -> torch.nn.Module:
    model = build_tiny(arch)
    if allocation == "layer":  # make the first attention of every stack far stronger, so its layer keeps more dims
        with torch.no_grad():
            for site in attention_sites(model):
                if site.layer_index == 0:
                    for projection in (site.q, site.v):
                        weight, bias = projection.read()
                        projection.write(5 * weight, None if bias is None else 5 * bias)
    prune_(model, PruneConfig(qk_ratio=qk_ratio(arch, 0.25), vo_ratio=0.5, allocation=allocation))
    if allocation == "layer":
        widths = {(s["layer_idx"], s["vo_dims"][0]) for s in model.config.clover["sites"].values()}
        assert len({w for _, w in widths}) > 1, "layers should keep different V-O dims"
    return model


def _byte_llama() -> torch.nn.Module:
    """A random 2-layer Llama (GQA 4/2) over the 257 ids of ``byte_tokenizer``, for CLI runs on text."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=256, pad_token_id=256, bos_token_id=256,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("allocation", ["uniform", "layer"])
@pytest.mark.parametrize("targets", [None, "other"], ids=["default-targets", "other-targets"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_adapter_on_a_pruned_model_is_exact_trains_and_merges_into_the_pruned_layout(arch, targets, allocation):
    model = _pruned(arch, allocation)
    specs = json.loads(json.dumps(model.config.clover))
    reference, count = model_output(model), _count(model)
    config = CloverConfig(targets=OTHER_TARGETS[arch] if targets else None)
    expected_trainable = trainable_count(model, config)
    clover = CloverModel(model, config)
    torch.testing.assert_close(model_output(clover), reference, atol=ATOL, rtol=0)
    assert clover.get_nb_trainable_parameters()[0] == expected_trainable
    _train(clover, steps=3)
    trained = model_output(clover)
    assert (trained - reference).abs().max() > 1e-3  # training changed the function
    merged = clover.merge_and_unload()
    assert _count(merged) == count and merged.config.clover == specs  # same pruned dims, same parameter count
    # the merge rounds each weight to float32 once more, an error that grows with the activations' scale (T5, whose
    # attention has no 1/sqrt(d): 1.3e-5 at outputs up to 3.7 on an Intel Xeon, 3.5e-6 of the scale)
    scale = max(1.0, float(trained.abs().max()))
    torch.testing.assert_close(model_output(merged), trained, atol=ATOL * scale, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_healed_model_saves_as_a_pruned_checkpoint_and_heals_again_after_reload(arch, tmp_path):
    model = _pruned(arch)
    kind = FAMILY_TABLE[arch].kind
    save_pruned_model(LoadedModel(model, None, "tiny", kind), tmp_path / "pruned")
    loaded = load_model(str(tmp_path / "pruned"))  # the checkpoint's own (trust_remote_code) classes
    assert type(loaded.model).__name__.startswith("Clover")
    clover = CloverModel(loaded.model)
    _train(clover, steps=2)
    merged = clover.merge_and_unload()
    expected = model_output(merged)
    (tmp_path / "healed").mkdir()
    write_pruned_model(LoadedModel(merged, None, "tiny", kind), tmp_path / "healed")
    healed = load_model(str(tmp_path / "healed")).model
    torch.testing.assert_close(model_output(healed), expected, atol=0, rtol=0)
    assert _count(healed) == _count(model) and healed.config.clover == model.config.clover


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_trainable_count_from_shapes_equals_the_wrapped_count(arch):
    for targets in (None, OTHER_TARGETS[arch]):
        model = build_tiny(arch)
        config = CloverConfig(targets=targets)
        assert trainable_count(model, config) == CloverModel(model, config).get_nb_trainable_parameters()[0]


def test_ragged_global_allocation_is_refused_with_what_to_do():
    model = build_tiny("gpt2")
    prune_(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.6, allocation="global"))
    assert any(len(set(s["vo_dims"])) > 1 for s in model.config.clover["sites"].values())
    reference = model_output(model)
    with pytest.raises(CloverError, match="allocation uniform or\n? layer.*--method lora"):
        CloverModel(model)
    torch.testing.assert_close(model_output(model), reference, atol=0, rtol=0)  # left untouched


def test_wikitext_examples_are_full_chunks_scored_on_every_token_but_the_first():
    tokenizer = byte_tokenizer()
    examples = data.wikitext_examples(tokenizer, max_length=64, count=5, seed=0)
    assert len(examples) == 5 and all(len(e.prompt_ids) == 1 and len(e.answer_ids) == 63 for e in examples)
    assert examples != data.wikitext_examples(tokenizer, max_length=64, count=5, seed=1)  # the seed shuffles
    batch = data.collate(examples, 64, pad_id=0)
    assert int((batch["labels"] != data.IGNORE_INDEX).sum()) == 5 * 63


@pytest.mark.parametrize("method", ["clover", "lora"])
def test_cli_heals_a_pruned_checkpoint_on_plain_text(tmp_path, capsys, method):
    model = _byte_llama()
    prune_(model, PruneConfig(vo_ratio=0.5))
    save_pruned_model(LoadedModel(model, byte_tokenizer(), "tiny", "causal-lm"), tmp_path / "pruned")
    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers())
    out = tmp_path / "healed"
    args = parser.parse_args(["finetune", str(tmp_path / "pruned"), "--out", str(out), "--task", "wikitext",
                              "--method", method, "--steps", "3", "--batch-size", "2", "--max-length", "64",
                              "--lr", "1e-2", "--eval-base", "--json"])  # fmt: skip
    assert cmd_finetune(args) == 0
    report = json.loads(capsys.readouterr().out)
    before, after = report["base_heldout"]["wikitext2_test"], report["heldout"]["wikitext2_test"]
    assert before["tokens"] == after["tokens"] > 0 and after["perplexity"] < before["perplexity"]
    assert report["pruned"] and report["parameters_after"] == report["parameters_before"] == _count(model)
    healed = load_model(str(out))
    assert healed.model.config.clover == model.config.clover and _count(healed.model) == _count(model)
    assert (out / "modeling_clover.py").is_file() and (out / "tokenizer.json").is_file()
    # the checkpoint holds the healed weights: its perplexity is the one reported after training
    from clover.finetune_run import wikitext2_test_perplexity

    assert wikitext2_test_perplexity(healed.model, healed.tokenizer) == after


def test_lora_heals_a_ragged_pruned_checkpoint_that_clover_refuses(tmp_path, capsys):
    model = _byte_llama()
    prune_(model, PruneConfig(vo_ratio=0.5, allocation="global"))
    vo_dims = [d for s in model.config.clover["sites"].values() for d in s["vo_dims"]]
    assert len(set(vo_dims)) > 1
    save_pruned_model(LoadedModel(model, byte_tokenizer(), "tiny", "causal-lm"), tmp_path / "pruned")
    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers())
    common = ["--task", "wikitext", "--steps", "2", "--batch-size", "2", "--max-length", "64", "--no-eval", "--json"]
    clover_args = parser.parse_args(["finetune", str(tmp_path / "pruned"), "--out", str(tmp_path / "c"), *common])
    with pytest.raises(CloverError, match="--method lora"):
        cmd_finetune(clover_args)
    assert not (tmp_path / "c").exists()
    lora_args = parser.parse_args(
        ["finetune", str(tmp_path / "pruned"), "--out", str(tmp_path / "l"), "--method", "lora", *common]
    )
    assert cmd_finetune(lora_args) == 0
    report = json.loads(capsys.readouterr().out)
    # LoRA matched to what CLOVER would train here: q 4 heads x 8² + up 64 x 4, per layer, plus V's ragged blocks
    expected = 2 * (4 * 64 + 64 * 4) + sum(d * d for d in vo_dims)
    assert report["adapter"]["rank"] >= 1 and abs(report["adapter"]["trainable"] - expected) < 0.2 * expected
    assert load_model(str(tmp_path / "l")).model.config.clover == model.config.clover


def test_cli_refuses_eval_tasks_for_plain_text(tmp_path):
    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers())
    args = parser.parse_args(["finetune", "x", "--out", str(tmp_path / "o"), "--task", "wikitext",
                              "--eval-tasks", "piqa"])  # fmt: skip
    with pytest.raises(CloverError, match="--eval-tasks applies to the commonsense tasks"):
        cmd_finetune(args)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stacks", [("encoder",), ("decoder", "cross")])
def test_partly_pruned_whisper_heals_every_attention(stacks):
    model = build_tiny("whisper")
    prune_(model, PruneConfig(qk_ratio=0.25, vo_ratio=0.5, stacks=stacks))
    reference, count = model_output(model), _count(model)
    expected_trainable = trainable_count(model)
    clover = CloverModel(model)
    torch.testing.assert_close(model_output(clover), reference, atol=ATOL, rtol=0)
    assert clover.get_nb_trainable_parameters()[0] == expected_trainable
    wrapped_sites = {name.rsplit(".", 1)[0] for name, m in clover.clover_modules().items() if m.blocks is not None}
    assert len(wrapped_sites) == 6  # 2 encoder, 2 decoder self, 2 cross: pruned and untouched alike
    _train(clover, steps=2)
    trained = model_output(clover)
    merged = clover.merge_and_unload()
    assert _count(merged) == count
    torch.testing.assert_close(model_output(merged), trained, atol=ATOL, rtol=0)


def test_selection_rows_are_disjoint_from_the_reported_rows_and_checked(tmp_path):
    import pyarrow as pa

    from clover.finetune_run import FinetuneOptions

    def first_column(offset):
        directory = tmp_path / f"o{offset}"
        data.write_heldout_tasks(directory, ["arc_easy"], offset=offset)
        table = pa.ipc.open_stream(pa.memory_map(str(directory / "arc_easy_heldout.arrow"))).read_all()
        return table.column(0).to_pylist()

    everything, after = first_column(0), first_column(40)
    assert after == everything[40:] and len(everything) == data.heldout_rows("arc_easy") == 190
    with pytest.raises(CloverError, match="arc_easy has only 190 held-out rows, none after row 190"):
        data.write_heldout_tasks(tmp_path / "x", ["arc_easy"], offset=190)
    with pytest.raises(CloverError, match="no --no-eval"):
        FinetuneOptions(eval_limit=10, selection_rows=10, evaluate=False).validate()
    with pytest.raises(CloverError, match="needs --eval-limit"):
        FinetuneOptions(selection_rows=10).validate()


def test_wikitext_chunks_longer_than_the_text_are_a_clear_error():
    with pytest.raises(CloverError, match="fewer than --max-length"):
        data.wikitext_examples(byte_tokenizer(), max_length=10**9, count=1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pruned_attention_keeps_the_original_dropout(arch):
    model = build_tiny(arch)
    expected = {site.name: (site.dropout, site.output_dropout) for site in attention_sites(model)}
    prune_(model, PruneConfig(vo_ratio=0.5))
    sites = model.config.clover["sites"]
    assert {name: (s["dropout"], s["output_dropout"]) for name, s in sites.items()} == expected
    if arch == "gpt2":
        assert expected[next(iter(expected))] == (0.1, 0.1)  # transformers' GPT-2 defaults, both kept
        model.train()
        torch.manual_seed(0)
        first = model_output(model)
        torch.manual_seed(1)
        assert (model_output(model) - first).abs().max() > 0  # dropout is active in training mode
        model.eval()
        torch.testing.assert_close(model_output(model), model_output(model), atol=0, rtol=0)
