"""LLaMA-3.2-Vision: what the family table's generic tests cannot see (the tanh gates' fold, Q-K pruning restricted to
the vision stack, the probe's images, and greedy generation from an image after a fresh-process reload)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_TABLE, build_tiny, image_inputs, model_output

from clover.errors import CloverError
from clover.factorize import split_heads
from clover.families import attention_sites, family_for, pruned_projections
from clover.io import save_pruned_model
from clover.models import LoadedModel, model_kind
from clover.prune import PruneConfig, prune_

ARCH = "mllama"
GATES = ("gate_attn", "cross_attn_attn_gate")  # the scalars after O; gate_ffn / the MLP gates stay as they are


def _gates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in GATES}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folding_the_tanh_gates_into_o_is_exact_and_saturates_them(dtype):
    model = build_tiny(ARCH).to(dtype)
    gates = _gates(model)
    assert len(gates) == 2 and all(g.abs().item() > 0.1 for g in gates.values())  # one gated vision, one cross layer
    outputs = {name.rsplit(".", 1)[0]: model.get_submodule(name.rsplit(".", 1)[0]) for name in gates}
    o_before = {layer: (m.self_attn if hasattr(m, "self_attn") else m.cross_attn).o_proj.weight.clone()
                for layer, m in outputs.items()}  # fmt: skip
    untouched = {n: p.clone() for n, p in model.named_parameters() if "o_proj" not in n and n not in gates}
    reference = model_output(model)
    family_for(model).fold_output_scales(model)
    # float32: the product tanh(g) · (O x) rounds differently from (tanh(g) O) x; bf16 weights: ~3 digits
    atol = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(model_output(model), reference, atol=atol, rtol=0)
    for name, gate in _gates(model).items():
        assert gate.dtype == dtype and torch.equal(gate.tanh(), torch.ones_like(gate))  # exactly 1 in its dtype
        layer = name.rsplit(".", 1)[0]
        attention = outputs[layer].self_attn if hasattr(outputs[layer], "self_attn") else outputs[layer].cross_attn
        torch.testing.assert_close(attention.o_proj.weight, o_before[layer] * gates[name].tanh(), atol=0, rtol=0)
    assert all(torch.equal(p, untouched[n]) for n, p in model.named_parameters() if n in untouched)


def _qk_products(site) -> list[torch.Tensor]:
    """Per head, W_q,h W_k,hᵀ (d_in × d_in) of a vision site (MHA, no biases), in float64."""
    (w_q, _), (w_k, _) = site.q.read(), site.k.read()
    q = split_heads(w_q.double(), None, site.num_heads)
    k = split_heads(w_k.double(), None, site.num_kv_heads)
    return [q[h] @ k[h].T for h in range(site.num_heads)]


def test_qk_pruning_restricted_to_the_vision_stack_keeps_the_top_singular_directions():
    model = build_tiny(ARCH).double()
    sites = attention_sites(model)
    assert {s.stack for s in sites} == {"vision", "decoder", "cross"}
    assert [s.qk_blocker is None for s in sites] == [s.stack == "vision" for s in sites]
    originals = {s.name: _qk_products(s) for s in sites if s.stack == "vision"}
    prune_(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.25, stacks=("vision",)))
    specs = model.config.clover["sites"]
    assert set(specs) == set(originals)  # the text stacks are left as they were
    for name, products in originals.items():
        spec = specs[name]
        assert spec["qk_dims"] == [spec["head_dim"] // 2] * spec["num_kv_heads"]
        rank = spec["qk_dims"][0]
        linears = pruned_projections(model.get_submodule(name), spec)
        q = split_heads(linears["q"].weight.T, None, spec["num_heads"])
        k = split_heads(linears["k"].weight.T, None, spec["num_kv_heads"])
        for h, product in enumerate(products):
            u, sigma, vh = torch.linalg.svd(product)
            torch.testing.assert_close(q[h] @ k[h].T, (u[:, :rank] * sigma[:rank]) @ vh[:rank], atol=1e-10, rtol=0)


def test_one_run_prunes_qk_in_the_vision_stack_and_vo_in_every_stack():
    model = build_tiny(ARCH).double()
    sites = attention_sites(model)
    originals = {s.name: _qk_products(s) for s in sites if s.stack == "vision"}
    report = prune_(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.25, qk_stacks=("vision",)))
    specs = model.config.clover["sites"]
    assert set(specs) == {s.name for s in sites}  # V-O everywhere
    for site in sites:
        spec = specs[site.name]
        full = [spec["head_dim"]] * spec["num_kv_heads"]
        assert spec["qk_dims"] == ([spec["head_dim"] // 2] * spec["num_kv_heads"] if site.stack == "vision" else full)
        assert sum(spec["vo_dims"]) < sum(full), site.name
    # shares count the sites where each pair was pruned: Q-K over the vision stack only
    assert report.qk_removed == pytest.approx(0.5) and report.vo_removed == pytest.approx(0.25, abs=0.02)
    for name, products in originals.items():  # the vision Q-K kept its top singular directions, as when alone
        spec = specs[name]
        linears = pruned_projections(model.get_submodule(name), spec)
        q = split_heads(linears["q"].weight.T, None, spec["num_heads"])
        k = split_heads(linears["k"].weight.T, None, spec["num_kv_heads"])
        rank = spec["qk_dims"][0]
        for h, product in enumerate(products):
            u, sigma, vh = torch.linalg.svd(product)
            torch.testing.assert_close(q[h] @ k[h].T, (u[:, :rank] * sigma[:rank]) @ vh[:rank], atol=1e-10, rtol=0)


def test_pair_stacks_are_checked():
    with pytest.raises(CloverError, match="no such attention stack"):
        prune_(build_tiny(ARCH), PruneConfig(qk_ratio=0.3, qk_stacks=("image",)))
    with pytest.raises(CloverError, match="Q-K is not pruned"):
        prune_(build_tiny(ARCH), PruneConfig(vo_ratio=0.3, qk_stacks=("vision",)))
    with pytest.raises(CloverError, match="vo_stacks is empty"):  # would prune nothing, or crash the global cut
        prune_(build_tiny(ARCH), PruneConfig(vo_ratio=0.3, vo_stacks=(), allocation="global"))
    with pytest.raises(CloverError, match="not among --stacks"):
        prune_(build_tiny(ARCH), PruneConfig(qk_ratio=0.3, qk_stacks=("vision",), stacks=("decoder",)))


def test_qk_pruning_of_the_text_stacks_is_refused_with_the_stack_where_it_works():
    with pytest.raises(CloverError, match=r"RoPE.*V-O pruning works.*exact in its vision stack.*--qk-stacks vision"):
        prune_(build_tiny(ARCH), PruneConfig(qk_ratio=0.3))
    with pytest.raises(CloverError, match="QK-norm"):
        prune_(build_tiny(ARCH), PruneConfig(qk_ratio=0.3, stacks=("vision", "cross")))


def test_probe_inputs_reach_every_attention_site():
    model = build_tiny(ARCH)
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    images = family_for(model).probe_inputs(model, ids, torch.Generator().manual_seed(1))
    assert int(ids[0, 0]) == model.config.image_token_index
    reached = set()
    handles = [s.module.register_forward_hook(lambda m, *_, n=s.name: reached.add(n)) for s in attention_sites(model)]
    with torch.no_grad():
        logits = model(input_ids=ids, **images).logits
    for handle in handles:
        handle.remove()
    assert reached == {s.name for s in attention_sites(model)} and torch.isfinite(logits).all()


def test_checkpoints_are_image_text_to_text_by_transformers_task_table(tmp_path):
    model = build_tiny(ARCH)
    model.save_pretrained(tmp_path / "dense")
    prune_(model, PruneConfig(vo_ratio=0.5))
    save_pruned_model(LoadedModel(model, None, "tiny", FAMILY_TABLE[ARCH].kind), tmp_path / "pruned")
    for folder in ("dense", "pruned"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert model_kind(config)[0] == "image-text-to-text", folder


GREEDY = """
def greedy_from_an_image(model):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 90, (1, 5), generator=generator)
    ids[:, 0] = model.config.image_token_index
    images = image_inputs(model.config, generator, batch=1, length=5)
    return model.generate(input_ids=ids, **images, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
"""  # run here and in a fresh process, which must not import clover (nor this file, which does)


@pytest.mark.parametrize(
    "config",
    [PruneConfig(vo_ratio=0.5), PruneConfig(qk_ratio=0.5, vo_ratio=0.5, stacks=("vision",)),
     PruneConfig(qk_ratio=0.5, vo_ratio=0.5, qk_stacks=("vision",))],
    ids=["vo-everywhere", "vision-qk-and-vo", "vision-qk-vo-everywhere"],
)  # fmt: skip
def test_a_pruned_checkpoint_generates_from_an_image_after_a_fresh_process_reload(config, tmp_path):
    model = build_tiny(ARCH)
    prune_(model, config)
    scope = {"torch": torch, "image_inputs": image_inputs}
    exec(GREEDY, scope)
    expected = scope["greedy_from_an_image"](model)
    out = tmp_path / "pruned"
    save_pruned_model(LoadedModel(model, None, "tiny", FAMILY_TABLE[ARCH].kind), out)
    script = (
        "import sys, torch, transformers as tf; sys.path.insert(0, 'tests'); from conftest import image_inputs\n"
        + GREEDY
        + f"m = tf.AutoModelForImageTextToText.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "assert 'clover' not in sys.modules, 'the checkpoint must not need clover'\n"
        "print(greedy_from_an_image(m).tolist())\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(root), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected.tolist()
    assert expected.shape == (1, 11)  # the 5 prompt tokens and 6 new ones: no early end that would hide a mismatch
