"""CLOVER fine-tuning: exact at init, only the small matrices train, exact merge, save/load, Trainer, DDP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import FAMILY_TABLE, TINY_ARCHS, VOCAB, build_tiny, image_inputs, model_output, unet_inputs
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from clover.errors import CloverError, UnsupportedModelError
from clover.families import LinearProjection, attention_sites
from clover.finetune import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CloverConfig,
    CloverConv1D,
    CloverLinear,
    CloverModel,
    _Injector,
    get_clover_model,
)

# float32 model; factors built in float64, stored in float32
ATOL = 1e-5


def _default_targets(arch: str) -> tuple[str, ...]:
    """The authors' recipe: Q-K and V-O pairs where Q-K is exact; else the QR of W_q, of W_v (of V-O without GQA),
    and the gated MLP's up_proj where there is one."""
    if FAMILY_TABLE[arch].qk_exact:
        return ("qk", "vo")
    model = build_tiny(arch)
    up = ("up",) if any(isinstance(getattr(m, "up_proj", None), nn.Linear) for m in model.modules()) else ()
    # KV heads read off the sites: not every config names them (Falcon's multi_query, GPT-NeoX)
    gqa = any(site.num_kv_heads < site.num_heads for site in attention_sites(model))
    return ("q", "v" if gqa else "vo", *up)


# the other form of every projection each family supports
OTHER_TARGETS = {
    arch: ("q", "k", "v") if row.qk_exact else ("q", "k", "vo", *_default_targets(arch)[2:])
    for arch, row in FAMILY_TABLE.items()
}
CASES = [(arch, None) for arch in TINY_ARCHS] + [(arch, OTHER_TARGETS[arch]) for arch in TINY_ARCHS]


def _inputs(model: nn.Module, seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    """A training batch for the model's family (labels where the model computes its own loss)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 10), generator=generator)
    config = model.config
    if isinstance(config, dict):  # a diffusers UNet: one denoising step
        return unet_inputs(config, generator, batch)
    if hasattr(config, "num_mel_bins"):  # speech encoder-decoder
        mels = torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions, generator=generator)
        return {"input_features": mels, "labels": ids[:, :8]}
    images = image_inputs(config, generator, batch, length=ids.shape[1])
    if images and not hasattr(config, "text_config"):  # an image encoder computes no loss
        return images
    if "cross_attention_mask" in images:  # image-text-to-text (Mllama): next-token loss on text that reads an image
        ids[:, 0] = config.image_token_index
        return {"input_ids": ids, **images, "labels": torch.cat([torch.full_like(ids[:, :1], -100), ids[:, 1:]], 1)}
    if images:  # a text-image model computes its contrastive loss over the batch's pairs
        return {"input_ids": ids, **images, "return_loss": True}
    if model.get_output_embeddings() is None:  # an encoder without a head computes no loss
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids, "labels": ids}


def _loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    output = model(**inputs)
    if getattr(output, "loss", None) is not None:
        return output.loss
    # BertModel and the image encoders have no head, a UNet predicts noise: regress onto a fixed random target
    prediction = output.sample if hasattr(output, "sample") else output.last_hidden_state
    target = torch.randn(prediction.shape, generator=torch.Generator().manual_seed(5))
    return (prediction - target).pow(2).mean()


def _train(clover: CloverModel, steps: int = 3, lr: float = 1e-2) -> None:
    torch.manual_seed(0)
    inputs = _inputs(clover)
    optimizer = torch.optim.AdamW([p for p in clover.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    clover.train()
    for _ in range(steps):
        _loss(clover, inputs).backward()
        optimizer.step()
        optimizer.zero_grad()
    clover.eval()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_default_targets_follow_the_authors_recipe(arch):
    clover = get_clover_model(build_tiny(arch))
    assert clover.clover_config.targets == _default_targets(arch)


@pytest.mark.parametrize(("arch", "targets"), CASES)
def test_wrapped_model_is_exact_at_init(arch, targets):
    model = build_tiny(arch)
    reference = model_output(model)
    count = _count(model)
    clover = CloverModel(model, CloverConfig(targets=targets))
    torch.testing.assert_close(model_output(clover), reference, atol=ATOL, rtol=0)
    trainable, total = clover.get_nb_trainable_parameters()
    assert total == count + trainable  # frozen factors replace the weights one for one


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gradients_reach_only_the_trainable_matrices(arch):
    clover = CloverModel(build_tiny(arch))
    clover.train()
    _loss(clover, _inputs(clover)).backward()
    trainable = {name for name, p in clover.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(".blocks") for name in trainable)
    for name, param in clover.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_few_adamw_steps_lower_the_loss(arch):
    clover = CloverModel(build_tiny(arch))
    inputs = _inputs(clover)
    with torch.no_grad():
        before = _loss(clover, inputs).item()
    _train(clover, steps=5)
    with torch.no_grad():
        after = _loss(clover, inputs).item()
    assert after < before - 1e-3


@pytest.mark.parametrize(("arch", "targets"), CASES)
def test_merge_gives_a_plain_model_with_the_trained_function(arch, targets, tmp_path):
    model = build_tiny(arch)
    original_class, count = type(model), _count(model)
    projection_types = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}  # Whisper freezes positions
    clover = CloverModel(model, CloverConfig(targets=targets))
    _train(clover)
    trained = model_output(clover)
    merged = clover.merge_and_unload()
    assert type(merged) is original_class and _count(merged) == count
    assert {name: type(m) for name, m in merged.named_modules() if isinstance(m, nn.Linear | Conv1D)} == (
        projection_types
    )
    assert not any(isinstance(m, CloverLinear | CloverConv1D) for m in merged.modules())
    assert {name: p.requires_grad for name, p in merged.named_parameters()} == requires_grad
    torch.testing.assert_close(model_output(merged), trained, atol=ATOL, rtol=0)
    merged.save_pretrained(tmp_path)
    reloaded = original_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(model_output(reloaded), model_output(merged), atol=0, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_adapter_save_and_load_round_trip(arch, tmp_path):
    clover = CloverModel(build_tiny(arch))
    _train(clover, steps=2)
    clover.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    # only small square matrices: trainable blocks and the transforms X that rebuild frozen factors from the base
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    for key, tensor in tensors.items():
        assert key.endswith((".blocks", ".transform")) and tensor.shape[-1] == tensor.shape[-2] <= 32, key
    assert sum(t.numel() for t in tensors.values()) < 0.2 * _count(clover)

    loaded = CloverModel.from_pretrained(build_tiny(arch), tmp_path)
    assert torch.equal(model_output(loaded), model_output(clover))
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode unless asked, as in PEFT
    trainable = CloverModel.from_pretrained(build_tiny(arch), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == clover.get_nb_trainable_parameters()


def test_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    clover = CloverModel(build_tiny("llama"))
    clover.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    before = (tmp_path / WEIGHTS_NAME).read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("clover.finetune.save_file", fail)
    _train(clover, steps=1)
    with pytest.raises(OSError, match="disk full"):
        clover.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before  # the old adapter is untouched
    monkeypatch.undo()
    clover.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() != before
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]  # no leftovers


@pytest.mark.parametrize("arch", ["llama", "gpt2", "whisper"])  # the Trainer bridge, not a per-family fact
def test_trainer_runs_three_steps(arch, tmp_path):
    clover = CloverModel(build_tiny(arch))
    initial = {name: p.detach().clone() for name, p in clover.named_parameters() if p.requires_grad}
    rows = []
    for seed in range(6):
        row = {key: value[0] for key, value in _inputs(clover, seed=seed, batch=1).items()}
        row["unused_column"] = torch.tensor(seed)  # dropped by Trainer only if it reads the base signature
        rows.append(row)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="steps",
        save_steps=3,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = tf.Trainer(model=clover, args=args, train_dataset=rows)
    result = trainer.train()
    assert trainer.state.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [not torch.equal(p, initial[name]) for name, p in clover.named_parameters() if p.requires_grad]
    assert all(changed)
    # the checkpoint (tied embeddings and all) restores the trained model exactly
    fresh = CloverModel(build_tiny(arch))
    fresh.load_state_dict(load_file(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert torch.equal(model_output(fresh), model_output(clover.eval()))


def test_two_process_ddp_matches_one_process(tmp_path):
    """2 processes × batch 2 (gloo DDP on CPU) vs 1 process × batch 4: merged weights within 1e-5."""
    script = Path(__file__).parent / "accelerate_train_script.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_DISABLE_RICH": "1"}
    # `--cpu` makes accelerate's launcher start one process; `--multi_gpu` selects torchrun, which on a machine
    # without GPUs runs DDP over gloo on the CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    runs = {
        "two": subprocess.Popen([*launch, str(script), str(tmp_path / "two.safetensors")], env=env, **_quiet()),
        "one": subprocess.Popen([sys.executable, str(script), str(tmp_path / "one.safetensors")], env=env, **_quiet()),
    }
    for name, process in runs.items():
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, f"{name}: {stderr.decode()[-3000:]}"
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    assert max((one[key] - two[key]).abs().max().item() for key in one) <= 1e-5
    assert any(not torch.equal(one[key], t) for key, t in build_tiny("llama").state_dict().items())  # it trained


def _quiet() -> dict:
    return {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}


def test_print_trainable_parameters_matches_peft_format(capsys):
    model = build_tiny("llama")  # hidden 64, 4 heads of 16, 2 KV heads, intermediate 128, 2 layers
    count = _count(model)
    clover = CloverModel(model)
    per_layer = 4 * 16 * 16 + 2 * 16 * 16 + (128 // 8) * 8 * 8  # q heads, v heads, up blocks of d_h/2
    assert clover.get_nb_trainable_parameters() == (2 * per_layer, count + 2 * per_layer)
    clover.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    total = count + 2 * per_layer
    assert line == (
        f"trainable params: {2 * per_layer:,d} || all params: {total:,d} || "
        f"trainable%: {100 * 2 * per_layer / total:.4f}"
    )
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line)


def test_generate_passes_through():
    model = build_tiny("llama")
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    clover = CloverModel(model)
    assert torch.equal(clover.generate(ids, max_new_tokens=4, do_sample=False), expected)


def test_bf16_frozen_factors_with_fp32_trainable_matrices():
    model = build_tiny("llama")
    reference = model_output(model)
    clover = CloverModel(model, CloverConfig(frozen_dtype="bfloat16"))
    layer = clover.clover_modules()["model.layers.0.self_attn.q_proj"]
    assert layer.frozen_weight.dtype == torch.bfloat16 and layer.blocks.dtype == torch.float32
    torch.testing.assert_close(model_output(clover), reference, atol=0.1, rtol=0)
    clover.train()
    _loss(clover, _inputs(clover)).backward()
    assert layer.blocks.grad.dtype == torch.float32
    assert clover.merge_and_unload().model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_dropout_placements():
    """ "update" drops only the path through S - S_init, so it is a no-op at init; "none" never drops."""
    inputs = _inputs(build_tiny("llama"))
    for placement, noisy_at_init in (("frozen_output", True), ("update", False), ("none", False)):
        clover = CloverModel(build_tiny("llama"), CloverConfig(dropout=0.5, dropout_placement=placement))
        with torch.no_grad():
            clean = _loss(clover, inputs)
            clover.train()
            torch.manual_seed(0)
            noisy = _loss(clover, inputs)
        assert (not torch.equal(clean, noisy)) == noisy_at_init, placement


@pytest.mark.parametrize("zeroed", [False, True], ids=["dense", "dims-zeroed-in-place"])
def test_pair_form_handles_gqa_stacking_and_pruned_head_width(zeroed):
    """The core wrapper reads the head width from the weights: r = 5 < d_h works, GQA groups stack, and
    dims a pruning zeroed in place (rank-deficient R) stay exact and finite."""
    torch.manual_seed(0)
    d, heads, kv_heads, r = 24, 4, 2, 5
    group = heads // kv_heads
    layers = nn.ModuleDict(
        {
            "q": nn.Linear(d, heads * r),
            "k": nn.Linear(d, kv_heads * r, bias=False),
            "v": nn.Linear(d, kv_heads * r, bias=False),
            "o": nn.Linear(heads * r, d),
        }
    ).double()
    if zeroed:
        with torch.no_grad():  # dim 1 of every head: Q-K columns, V columns and O rows
            for name in "qkv":
                layers[name].weight[1::r] = 0
            layers["q"].bias[1::r] = 0
            layers["o"].weight[:, 1::r] = 0
    injector = _Injector(layers, CloverConfig(dropout=0.0, trainable_dtype=torch.float64), None)
    pairs = {"num_heads": heads, "num_kv_heads": kv_heads}
    handles = {name: LinearProjection(layers[name]) for name in "qkvo"}
    new_k, new_q = injector.pair_form(handles["k"], handles["q"], partner_is_output=False, **pairs)
    new_v, new_o = injector.pair_form(handles["v"], handles["o"], partner_is_output=True, **pairs)
    assert new_k.blocks.shape == new_v.blocks.shape == (kv_heads, r, r)
    x, y = torch.randn(7, d, dtype=torch.float64), torch.randn(6, d, dtype=torch.float64)

    def scores(q, k):  # per query head: q_h(x) k_{kv(h)}(y)ᵀ
        keys = k(y).reshape(6, kv_heads, r).repeat_interleave(group, dim=1)
        return torch.einsum("xhr,yhr->hxy", q(x).reshape(7, heads, r), keys)

    def values(v, o):  # each position attending to itself: o(expand(v(x)))
        return o(v(x).reshape(7, kv_heads, r).repeat_interleave(group, dim=1).reshape(7, heads * r))

    assert all(torch.isfinite(p).all() for m in (new_q, new_k, new_v, new_o) for p in m.parameters())
    torch.testing.assert_close(scores(new_q, new_k), scores(layers["q"], layers["k"]), atol=1e-10, rtol=0)
    torch.testing.assert_close(values(new_v, new_o), values(layers["v"], layers["o"]), atol=1e-10, rtol=0)
    qr_v = injector.qr_form(handles["v"], kv_heads)  # QR form: frozen columns orthonormal, or zero where pruned
    norms = qr_v.frozen_weight.detach().norm(dim=1)
    assert torch.all(((norms - 1).abs() < 1e-10) | (norms < 1e-10)) and (norms < 1e-10).sum() == 2 * zeroed
    torch.testing.assert_close(qr_v(x), layers["v"](x), atol=1e-10, rtol=0)
    sigma = new_v.blocks.detach()
    torch.testing.assert_close(sigma, torch.diag_embed(torch.diagonal(sigma, dim1=-2, dim2=-1)), atol=1e-10, rtol=0)


def test_config_round_trips_through_json():
    config = CloverConfig(targets=["q", "vo"], dropout=0.1, frozen_dtype=torch.bfloat16)
    assert CloverConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"targets": ("qk", "xyz")}, "unknown CLOVER targets \\['xyz'\\]"),
        ({"targets": ()}, "unknown CLOVER targets"),
        ({"targets": ("qk", "q")}, "'qk' and 'q' both rewrite"),
        ({"targets": ("v", "v")}, "twice"),
        ({"dropout": 1.5}, "dropout=1.5 must be"),
        ({"dropout": "0.1"}, "dropout="),
        ({"dropout_placement": "side"}, "choose from frozen_output"),
        ({"trainable_dtype": "int8"}, "not a floating-point torch dtype"),
        ({"frozen_dtype": torch.int32}, "not a floating-point torch dtype"),
    ],
)
def test_bad_options_raise_clear_errors(options, match):
    with pytest.raises(CloverError, match=match):
        CloverConfig(**options)


def test_targets_that_do_not_apply_raise_clear_errors(tmp_path):
    with pytest.raises(CloverError, match="RoPE .* blocks the Q-K merge; train them separately with targets 'q'"):
        CloverModel(build_tiny("llama"), CloverConfig(targets=("qk",)))
    with pytest.raises(CloverError, match="gpt2 has no up_proj"):
        CloverModel(build_tiny("gpt2"), CloverConfig(targets=("qk", "up")))
    with pytest.raises(CloverError, match="QK-norm .* blocks the Q-K merge"):
        CloverModel(build_tiny("qwen3"), CloverConfig(targets=("qk",)))
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="no family for model_type 'bloom'"):
        CloverModel(bloom)
    clover = CloverModel(build_tiny("llama"))
    with pytest.raises(CloverError, match="already has CLOVER layers"):
        CloverModel(clover.model)

    clover.save_pretrained(tmp_path / "llama")
    with pytest.raises(CloverError, match="trained on a 'llama' model, not 'gpt2'"):
        CloverModel.from_pretrained(build_tiny("gpt2"), tmp_path / "llama")
    with pytest.raises(CloverError, match="saved transform has shape"):
        CloverModel.from_pretrained(build_tiny("llama-mha"), tmp_path / "llama")  # 4 KV heads, not 2
    config = build_tiny("llama").config
    config.num_hidden_layers = 1
    other = tf.LlamaForCausalLM(config).eval()
    reference = model_output(other)
    with pytest.raises(CloverError, match="transforms for modules this model does not wrap"):
        CloverModel.from_pretrained(other, tmp_path / "llama")  # found out after wrapping every layer
    # a failure half-way leaves the model as it was
    assert not any(isinstance(m, CloverLinear | CloverConv1D) for m in other.modules())
    assert all(p.requires_grad for p in other.parameters())
    assert torch.equal(model_output(other), reference)
    with pytest.raises(CloverError, match="has no CLOVER adapter"):
        CloverModel.from_pretrained(build_tiny("llama"), tmp_path / "missing")
