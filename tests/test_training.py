"""Two-stage training on a tiny random backbone and a small generated image folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_backbones import tiny_backbone_config
from transformers import AutoModel, AutoModelForImageClassification, BitImageProcessor, pipeline

from protoquant_hf import ProtoQuantForImageClassification, load_image_dataset
from protoquant_hf.data import make_image_transform, with_image_size
from protoquant_hf.training import (
    DataArguments,
    ModelArguments,
    ProtoQuantTrainingArguments,
    concept_usage,
    extract_features,
    initialize_concepts,
    prune_by_usage,
    spherical_kmeans,
    train_protoquant,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def _pattern(kind: int, rng: np.random.Generator) -> Image.Image:
    grid = np.indices((SIZE, SIZE))
    if kind == 0:
        base = (grid[0] // 4) % 2
    elif kind == 1:
        base = (grid[1] // 4) % 2
    else:
        base = ((grid[0] // 8 + grid[1] // 8) % 2)
    pixels = base[..., None] * rng.integers(150, 255, 3) + rng.integers(0, 40, (SIZE, SIZE, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("test", 8)):
        for kind, name in enumerate(("horizontal", "vertical", "checker")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _pattern(kind, rng).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("backbone")
    config, _ = tiny_backbone_config("resnet")
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return folder


def run_args(image_folder, backbone_folder, output_dir, **training):
    defaults = dict(
        output_dir=str(output_dir), batch_size=8, stage1_epochs=2, stage2_epochs=4, kmeans_iterations=5, seed=0,
        top_k_per_class=None, sparsify_epochs=2,
    )
    defaults.update(training)
    return (
        DataArguments(dataset=str(image_folder), image_size=SIZE, feature_dtype="float32"),
        ModelArguments(backbone=str(backbone_folder), num_concepts=8),
        ProtoQuantTrainingArguments(**defaults),
    )


@pytest.fixture(scope="module")
def trained(image_folder, backbone_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "run"
    summary = train_protoquant(*run_args(image_folder, backbone_folder, output, top_k_per_class=2))
    return output, summary


def test_pipeline_writes_a_loadable_folder(trained):
    output, summary = trained
    files = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "training_summary.json", "train_log.jsonl"} <= files
    assert "checkpoint" not in files and not list(output.parent.glob(".*incomplete"))
    assert json.loads((output / "training_summary.json").read_text())["results"] == summary["results"]
    model = AutoModelForImageClassification.from_pretrained(output).eval()
    assert model.config.num_concepts == model.codebook.concepts.shape[0] == model.classifier.weight.shape[1]
    image = _pattern(1, np.random.default_rng(5))
    results = pipeline("image-classification", model=str(output))(image)
    assert {r["label"] for r in results} == {"horizontal", "vertical", "checker"}


def test_summary_reports_every_stage(trained):
    results = trained[1]["results"]
    for key in ("linear_probe_accuracy", "stage1_accuracy", "stage2_accuracy", "sparsify_accuracy", "accuracy"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["init_usage"]["num_concepts"] == 8
    assert sum(1 for _ in range(results["init_usage"]["num_concepts"])) == 8
    assert results["concepts_per_class"]["max"] <= 2  # top-2 sparsification
    assert -1.0 <= results["grounding"]["grounding_min"] <= results["grounding"]["grounding_mean"] <= 1.0
    # Frozen concepts stay grounded: every concept is a k-means centroid of real feature vectors.
    assert results["grounding"]["grounding_min"] > 0.5


def test_losses_decrease(trained):
    log = [json.loads(line) for line in (trained[0] / "train_log.jsonl").read_text().splitlines()]
    for stage in ("stage1", "stage2"):
        losses = [r["loss"] for r in log if r["stage"] == stage]
        assert len(losses) >= 2 and losses[-1] < losses[0], (stage, losses)


def test_head_is_non_negative_after_training(trained):
    model = ProtoQuantForImageClassification.from_pretrained(trained[0])
    features = torch.relu(torch.randn(3, model.protoquant.hidden_size, 2, 2))
    assert (model.classify_features(features).logits >= 0).all()


def _cache(model, image_folder, processor_size=SIZE, split="train"):
    dataset = load_image_dataset(str(image_folder))
    processor = with_image_size(
        BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}), processor_size
    )
    return extract_features(model, dataset[split], processor, make_image_transform(processor), split=split, dtype="float32")


def test_usage_counting_and_pruning_shrink_codebook_and_head(image_folder, backbone_folder):
    model = ProtoQuantForImageClassification.from_backbone(str(backbone_folder), num_concepts=10, id2label={0: "a", 1: "b", 2: "c"})
    cache = _cache(model, image_folder)
    initialize_concepts(model, cache, "kmeans", kmeans_iterations=5)
    usage = concept_usage(model, cache)
    height, width = cache.features.shape[-2:]
    assert usage.sum() == len(cache) * height * width
    kept_before = model.classifier.weight.detach().clone()
    history = prune_by_usage(model, lambda m: concept_usage(m, cache), target_num_concepts=4, steps=2)
    assert len(history) == 2 and model.config.num_concepts == 4
    assert model.codebook.concepts.shape[0] == 4 and model.classifier.weight.shape == (3, 4)
    # surviving columns of W are columns of the original W
    for column in model.classifier.weight.T:
        assert any(torch.equal(column, original) for original in kept_before.T)


def test_cache_reused_and_invalidated(image_folder, backbone_folder):
    model = ProtoQuantForImageClassification.from_backbone(str(backbone_folder), num_concepts=4, id2label={0: "a", 1: "b", 2: "c"})
    first = _cache(model, image_folder)
    again = _cache(model, image_folder)
    assert again.path == first.path
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(first.features))
    resized = _cache(model, image_folder, processor_size=48)  # preprocessing changed
    assert resized.path != first.path and resized.features.shape[-1] != first.features.shape[-1]
    other = ProtoQuantForImageClassification.from_backbone(str(backbone_folder), num_concepts=4, id2label={0: "a", 1: "b", 2: "c"})
    with torch.no_grad():
        other.protoquant.backbone.embedder.embedder.convolution.weight.mul_(2)  # another backbone's weights
    assert _cache(other, image_folder).path != first.path


def test_kmeans_needs_enough_vectors():
    with pytest.raises(ValueError, match="at least K=50"):
        spherical_kmeans(torch.randn(20, 4), 50)


@pytest.mark.parametrize("checkpoints_per_stage, stop_after_epoch", [(10, 1), (2, 2)])
def test_resume_after_interruption_reaches_same_state(image_folder, backbone_folder, tmp_path, checkpoints_per_stage, stop_after_epoch):
    reference = tmp_path / "reference"
    train_protoquant(*run_args(image_folder, backbone_folder, reference))

    interrupted = tmp_path / "interrupted"

    def stop(stage, epoch):
        if stage == "stage2" and epoch == stop_after_epoch:
            raise KeyboardInterrupt

    # With 2 checkpoints per 4-epoch stage, the run stops after epoch 3 but resumes from epoch 2.
    args = run_args(image_folder, backbone_folder, interrupted, checkpoints_per_stage=checkpoints_per_stage)
    with pytest.raises(KeyboardInterrupt):
        train_protoquant(*args, on_epoch_end=stop)
    assert not interrupted.exists()  # no half-written output folder
    progress = json.loads((tmp_path / ".interrupted.incomplete" / "progress.json").read_text())
    assert (progress["phase"], progress["epoch"]) == ("stage2", 2)
    train_protoquant(*run_args(image_folder, backbone_folder, interrupted, resume=True, checkpoints_per_stage=checkpoints_per_stage))
    expected = ProtoQuantForImageClassification.from_pretrained(reference)
    resumed = ProtoQuantForImageClassification.from_pretrained(interrupted)
    torch.testing.assert_close(resumed.classifier.weight, expected.classifier.weight)
    torch.testing.assert_close(resumed.codebook.concepts, expected.codebook.concepts)


def test_bad_inputs_leave_no_output(image_folder, backbone_folder, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="bundled"):
        train_protoquant(*run_args(tmp_path / "no-such-dataset", backbone_folder, output))
    data, model, training = run_args(image_folder, backbone_folder, output)
    model.num_concepts = 5000
    with pytest.raises(ValueError, match="K=5000 concepts needs at least K"):
        train_protoquant(data, model, training)
    assert not output.exists() and not (tmp_path / ".out.incomplete").exists()
    with pytest.raises(ValueError, match="l1_lambda"):
        ProtoQuantTrainingArguments(l1_lambda=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        ModelArguments(temperature=0.0)

    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a protoquant training run"):
        train_protoquant(*run_args(image_folder, backbone_folder, user_folder))
    assert (user_folder / "notes.txt").read_text() == "keep me"


def test_previous_run_needs_overwrite(trained, image_folder, backbone_folder):
    with pytest.raises(ValueError, match="previous training run"):
        train_protoquant(*run_args(image_folder, backbone_folder, trained[0]))


def test_cli_help_explains_options():
    result = subprocess.run(
        [sys.executable, "-m", "protoquant_hf", "train", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0
    assert "--num_concepts" in result.stdout and "k-means" in result.stdout and "--l1_lambda" in result.stdout


def _launch(args: list[str], cwd: Path, processes: int) -> subprocess.CompletedProcess:
    launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"] if processes == 2 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [*launcher, str(REPO / "examples" / "train_protoquant.py"), *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=600,
    )


def test_two_processes_match_one_process(image_folder, backbone_folder, tmp_path):
    common = [
        "--dataset", str(image_folder), "--backbone", str(backbone_folder), "--image_size", str(SIZE),
        "--num_concepts", "8", "--feature_dtype", "float32", "--stage1_epochs", "2", "--stage2_epochs", "3",
        "--kmeans_iterations", "5", "--seed", "0", "--cache_dir", str(tmp_path / "cache"), "--top_k_per_class", "0",
    ]
    # Same global batch: 16 in one process, 2 x 8 in two.
    one = _launch([*common, "--batch_size", "16", "--output_dir", str(tmp_path / "one")], tmp_path, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch([*common, "--batch_size", "8", "--output_dir", str(tmp_path / "two")], tmp_path, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    summary_one = json.loads((tmp_path / "one" / "training_summary.json").read_text())
    summary_two = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert summary_two["processes"] == 2 and summary_one["processes"] == 1
    for key in ("init_usage", "stage1_usage"):
        assert summary_two["results"][key] == summary_one["results"][key], key
    for key in ("linear_probe_accuracy", "stage1_accuracy", "stage2_accuracy"):
        assert abs(summary_two["results"][key] - summary_one["results"][key]) <= 0.005, key
    model_one = ProtoQuantForImageClassification.from_pretrained(tmp_path / "one")
    model_two = ProtoQuantForImageClassification.from_pretrained(tmp_path / "two")
    # Same updates (and learning-rate schedule) up to float summation order.
    torch.testing.assert_close(model_two.codebook.concepts, model_one.codebook.concepts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model_two.classifier.weight, model_one.classifier.weight, rtol=1e-3, atol=1e-3)


def test_augmented_training_runs_the_backbone_on_fresh_pixels(image_folder, backbone_folder, tmp_path, monkeypatch):
    import protoquant_hf.training.pipeline as pipeline_module

    calls = []
    original = pipeline_module.fast_feature_fn

    def counting_feature_fn(model):
        compute = original(model)

        def wrapped(pixels):
            calls.append(pixels.shape[0])
            return compute(pixels)

        return wrapped

    monkeypatch.setattr(pipeline_module, "fast_feature_fn", counting_feature_fn)
    data, model, training = run_args(image_folder, backbone_folder, tmp_path / "augmented", stage1_epochs=1, stage2_epochs=1)
    data.augment, data.cache_dir = True, str(tmp_path / "fresh-cache")  # fresh cache: extraction counted too
    summary = train_protoquant(data, model, training)
    extraction = 48 + 24 + 2  # both caches (+ one probe image each)
    # every training epoch (one in each stage) ran the backbone over all 48 training images again
    assert sum(calls) == extraction + 2 * 48
    assert summary["arguments"]["data"]["augment"] is True
    assert 0.0 <= summary["results"]["accuracy"] <= 1.0


def test_random_augment_is_seeded_and_keeps_size():
    import random

    from protoquant_hf.data import random_augment

    image = _pattern(2, np.random.default_rng(1))
    first = random_augment(image, random.Random(3))
    assert first.size == image.size and first.mode == image.mode
    assert np.array_equal(np.asarray(first), np.asarray(random_augment(image, random.Random(3))))
    assert any(not np.array_equal(np.asarray(random_augment(image, random.Random(s))), np.asarray(image)) for s in range(5))
