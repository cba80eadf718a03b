"""The feature cache under concurrency and damage: one builder, waiting readers, automatic rebuilds."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_backbones import tiny_backbone_config
from transformers import BitImageProcessor

from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification, load_image_dataset
from protoquant_hf.concepts import FeatureCache, extract_features
from protoquant_hf.data import make_image_transform

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def model_and_inputs(image_folder):
    backbone_config, _ = tiny_backbone_config("resnet")
    torch.manual_seed(0)
    model = ProtoQuantForImageClassification(
        ProtoQuantConfig(backbone_config=backbone_config, num_concepts=4, image_size=32, id2label={0: "a", 1: "b"})
    ).eval()
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    train = load_image_dataset(str(image_folder))["train"]
    return model, train, processor, make_image_transform(processor)


WORKER = """
import json, sys, time
sys.path.insert(0, {tests!r})
import torch
from test_cache import model_and_inputs
import protoquant_hf.concepts.cache as cache_module
from protoquant_hf.modeling_protoquant import ProtoQuantModel
from pathlib import Path

built = []
original_build = cache_module._build
def counting_build(*args, **kwargs):
    built.append(True)
    return original_build(*args, **kwargs)
cache_module._build = counting_build
original_forward = ProtoQuantModel.forward_features
def slow_forward(self, pixel_values):  # a long build, so the two runs overlap
    time.sleep(0.3)
    return original_forward(self, pixel_values)
ProtoQuantModel.forward_features = slow_forward

model, train, processor, transform = model_and_inputs(Path({images!r}))
while time.time() < {start}:  # start both builds at the same moment
    time.sleep(0.005)
cache = cache_module.extract_features(model, train, processor, transform, split="train", dtype="float32",
                                      batch_size=2, cache_dir={cache!r}, show_progress=False)
print(json.dumps({{"path": str(cache.path), "built": len(built), "sum": float(abs(cache.to_numpy()).sum())}}))
"""


def test_two_processes_on_one_empty_cache_share_one_build(image_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    start = time.time() + 8  # both workers import and build their model first
    script = WORKER.format(tests=str(TESTS), images=str(image_folder), cache=str(cache_dir), start=start)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(result["built"] for result in results) == [0, 1]  # one built, the other waited and read it
    assert results[0]["path"] == results[1]["path"]
    # ... and what both read is what a run alone computes.
    model, train, processor, transform = model_and_inputs(image_folder)
    alone = extract_features(model, train, processor, transform, split="train", dtype="float32", cache_dir=tmp_path / "alone")
    shared = FeatureCache.open(results[0]["path"])
    np.testing.assert_allclose(shared.to_numpy(), alone.to_numpy(), rtol=1e-6, atol=1e-6)
    assert np.array_equal(shared.labels, alone.labels)
    assert not list(cache_dir.glob(".*partial*"))  # no build folder left behind


@pytest.mark.parametrize("damage", ["truncate", "edit-index", "delete-labels"])
def test_damaged_entry_is_rebuilt_with_a_warning(image_folder, tmp_path, caplog, damage):
    model, train, processor, transform = model_and_inputs(image_folder)
    arguments = dict(split="train", dtype="float32", cache_dir=tmp_path, show_progress=False, shard_size=5)
    first = extract_features(model, train, processor, transform, **arguments)
    expected = first.to_numpy()
    path = first.path
    del first
    if damage == "truncate":
        features = path / "features-00001.npy"
        features.write_bytes(features.read_bytes()[: features.stat().st_size // 2])
    elif damage == "edit-index":
        index = json.loads((path / "index.json").read_text())
        index["num_rows"] += 1
        (path / "index.json").write_text(json.dumps(index))
    else:
        (path / "labels-00000.npy").unlink()
    with caplog.at_level("WARNING"):
        again = extract_features(model, train, processor, transform, **arguments)
    assert again.path == path
    assert str(path) in caplog.text and "Rebuilding" in caplog.text
    np.testing.assert_array_equal(again.to_numpy(), expected)


def test_interrupted_build_leaves_nothing_a_reader_would_use(image_folder, tmp_path, monkeypatch):
    model, train, processor, transform = model_and_inputs(image_folder)
    calls = []
    original = ProtoQuantForImageClassification.forward_features

    def failing(self, pixel_values):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, pixel_values)

    monkeypatch.setattr(ProtoQuantForImageClassification, "forward_features", failing)
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, train, processor, transform, split="train", dtype="float32", batch_size=2, cache_dir=tmp_path)
    # Only the lock and the hidden partial build (kept for resuming) remain: no entry a reader would open.
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    assert not list(tmp_path.rglob("index.json"))
