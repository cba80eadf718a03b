"""Two-stage training on a tiny random backbone and a small generated image folder."""

import functools
import json
from dataclasses import replace
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_backbones import tiny_backbone_config
from transformers import AutoModel, AutoModelForImageClassification, BitImageProcessor, pipeline

from protoquant_hf import ProtoQuantForImageClassification, ProtoQuantImageProcessor, load_image_dataset
from protoquant_hf.concepts import ConceptStats, FeatureCache, extract_features, prune_by_usage
from protoquant_hf.explain import ConceptGallery
from protoquant_hf.data import hold_out_validation, make_image_transform, native_image_size, with_image_size
from protoquant_hf import job as job_module
from protoquant_hf.job import stream_identity
from protoquant_hf.training import loop as loop_module
from protoquant_hf.modeling_protoquant import ProtoQuantModel
from protoquant_hf.training import (
    DataArguments,
    ModelArguments,
    ProtoQuantTrainingArguments,
    TrainingSummary,
    initialize_concepts,
    mix_batch,
    pooled_training_sample,
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
        top_k_per_class=None, sparsify_epochs=2, explain_test_images=0, hub_bundle=False,
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
    summary = train_protoquant(
        *run_args(image_folder, backbone_folder, output, top_k_per_class=2, explain_test_images=3, hub_bundle=True)
    )
    return output, summary


def test_pipeline_writes_a_loadable_folder(trained):
    output, summary = trained
    files = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "training_summary.json", "train_log.jsonl"} <= files
    assert "checkpoint" not in files and not list(output.parent.glob(".*incomplete"))
    assert TrainingSummary.load(output) == summary
    assert list(summary.phases) == ["init", "probe", "stage1", "prune", "stage2", "sparsify", "grounding", "gallery", "figures"]
    model = AutoModelForImageClassification.from_pretrained(output).eval()
    assert model.config.num_concepts == model.codebook.concepts.shape[0] == model.classifier.weight.shape[1]
    assert model.config.head_l1_lambda == summary.arguments["training"]["l1_lambda"]
    image = _pattern(1, np.random.default_rng(5))
    results = pipeline("image-classification", model=str(output))(image)
    assert {r["label"] for r in results} == {"horizontal", "vertical", "checker"}


def test_the_job_stores_the_gallery_and_draws_the_figures(trained):
    from protoquant_hf.explain import ConceptGallery

    output, summary = trained
    model = ProtoQuantForImageClassification.from_pretrained(output)
    gallery = ConceptGallery.load(output)
    gallery.check_matches(model)  # built for the final (sparsified) codebook
    assert gallery.num_concepts == model.config.num_concepts and summary.phases["gallery"].per_concept == 5
    assert summary.phases["gallery"].bytes == sum(p.stat().st_size for p in (output / "gallery").iterdir())
    files = summary.phases["figures"].files
    assert sum(name.startswith("figures/explanation_") for name in files) == 3  # one per class
    assert {"figures/overview.png", "figures/gallery_page_1.png"} <= set(files)
    assert all((output / name).stat().st_size > 10_000 for name in files if name.startswith("figures/"))
    assert sorted(p.name for p in (output / "examples").iterdir()) == ["1_checker.png", "2_horizontal.png", "3_vertical.png"]


def test_the_job_writes_the_hub_bundle(trained):
    from huggingface_hub import ModelCard

    from protoquant_hf.hub import REMOTE_CODE_FILES

    output, summary = trained
    bundle = output / "hub"
    assert {"README.md", "model.safetensors", "app.py", "gallery", "figures", "examples", *REMOTE_CODE_FILES} <= {p.name for p in bundle.iterdir()}
    card = ModelCard.load(bundle / "README.md")
    assert card.data.eval_results[0].metric_value == round(summary.accuracy, 4)


def _test_split(image_folder, output):
    processor = ProtoQuantImageProcessor.from_pretrained(output)
    dataset = load_image_dataset(str(image_folder))["test"].with_transform(make_image_transform(processor))
    batch = dataset[: len(dataset)]
    return batch["pixel_values"], batch["labels"]


def test_summary_figures_are_those_of_the_saved_model(trained, image_folder):
    """Every headline figure recomputed independently from the saved folder."""
    output, summary = trained
    model = ProtoQuantForImageClassification.from_pretrained(output).eval()
    pixels, labels = _test_split(image_folder, output)
    with torch.no_grad():
        features = model.forward_features(pixels)
        logits = model(feature_maps=features).logits
        probe_logits = model.original_head.classifier(features.mean(dim=(2, 3)))
    assert summary.accuracy == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert summary.linear_probe_accuracy == pytest.approx(float((probe_logits.argmax(-1) == labels).float().mean()))
    assert summary.num_concepts == model.config.num_concepts
    weight = torch.relu(model.classifier.weight.detach().double())
    nonzero, paper = (weight > 0).sum(dim=1), (weight > 0.1).sum(dim=1)
    per_class = summary.concepts_per_class
    assert per_class.nonzero_max == int(nonzero.max()) <= 2  # top-2 sparsification
    assert per_class.nonzero_mean == pytest.approx(float(nonzero.double().mean()))
    assert 1 <= per_class.mass95_max <= per_class.nonzero_max
    assert (per_class.paper_mean, per_class.paper_max) == (pytest.approx(float(paper.double().mean())), int(paper.max()))
    init, stage1 = summary.phases["init"], summary.phases["stage1"]
    assert init.usage.num_concepts == 8 and init.method == "class_kmeans"
    assert stage1.usage.num_concepts == 8 and stage1.epochs == 2
    removed = summary.phases["sparsify"].concepts_removed
    assert summary.num_concepts == summary.phases["prune"].num_concepts - removed


def test_grounding_is_that_of_the_final_concepts(trained, image_folder):
    output, summary = trained
    model = ProtoQuantForImageClassification.from_pretrained(output).eval()
    train = load_image_dataset(str(image_folder))["train"]
    processor = ProtoQuantImageProcessor.from_pretrained(output)
    batch = train.with_transform(make_image_transform(processor))[: len(train)]
    with torch.no_grad():
        vectors = model.forward_features(batch["pixel_values"]).flatten(2).transpose(1, 2).reshape(-1, 16)
    concepts = model.codebook.concepts.detach()
    eps = model.config.cosine_eps
    cosine = (concepts @ vectors.T) / ((concepts.norm(dim=1, keepdim=True) + eps) * (vectors.norm(dim=1) + eps))
    best = cosine.max(dim=1).values
    assert summary.grounding.mean == pytest.approx(float(best.mean()), abs=1e-4)
    assert summary.grounding.min == pytest.approx(float(best.min()), abs=1e-4)
    # Frozen concepts stay grounded: every concept is a k-means centroid of real feature vectors.
    assert summary.grounding.min > 0.5


def test_losses_decrease(trained):
    log = [json.loads(line) for line in (trained[0] / "train_log.jsonl").read_text().splitlines()]
    for stage in ("stage1", "stage2"):
        losses = [r["loss"] for r in log if r["stage"] == stage]
        assert len(losses) >= 2 and losses[-1] < losses[0], (stage, losses)


def test_sparsified_head_uses_at_most_k_concepts_per_class(trained):
    model = ProtoQuantForImageClassification.from_pretrained(trained[0])
    weight = model.classifier.weight.detach()
    assert ((weight > 0).sum(dim=1) <= 2).all()  # exact zeros (or negatives) everywhere else
    assert (weight > 0).any(dim=0).all()  # every remaining concept serves some class
    scores = torch.rand(4, model.config.num_concepts)
    out = model(concept_scores=scores, output_concept_contributions=True)
    torch.testing.assert_close(out.concept_contributions.sum(-1), out.logits)
    assert (out.concept_contributions[:, weight <= 0] == 0).all()


def _cache(model, image_folder, processor_size=SIZE, split="train"):
    dataset = load_image_dataset(str(image_folder))
    processor = with_image_size(
        BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}), processor_size
    )
    return extract_features(model, dataset[split], processor, make_image_transform(processor), split=split, dtype="float32")


def test_usage_based_pruning_on_real_features(image_folder, backbone_folder):
    model = ProtoQuantForImageClassification.from_backbone(str(backbone_folder), num_concepts=10, id2label={0: "a", 1: "b", 2: "c"})
    cache = _cache(model, image_folder)
    initialize_concepts(model, cache, "kmeans", kmeans_iterations=5)
    stats = ConceptStats.collect(model, cache)
    height, width = cache.shape[-2:]
    assert stats.usage.sum() == len(cache) * height * width
    kept_before = model.classifier.weight.detach().clone()
    history = prune_by_usage(model, lambda m: ConceptStats.collect(m, cache).usage, target_num_concepts=4, steps=2)
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
    np.testing.assert_array_equal(again.to_numpy(), first.to_numpy())
    resized = _cache(model, image_folder, processor_size=48)  # preprocessing changed
    assert resized.path != first.path and resized.shape[-1] != first.shape[-1]
    other = ProtoQuantForImageClassification.from_backbone(str(backbone_folder), num_concepts=4, id2label={0: "a", 1: "b", 2: "c"})
    with torch.no_grad():
        other.protoquant.backbone.embedder.embedder.convolution.weight.mul_(2)  # another backbone's weights
    assert _cache(other, image_folder).path != first.path


PROBE_MEMORY_SCRIPT = """
import re, threading, time, torch
from protoquant_hf.training.probe import fit_linear_probe
torch.set_num_threads(1)
anon = lambda: int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.02)
generator = torch.Generator().manual_seed(0)
labels = torch.randint(0, 10, (100_000,), generator=generator)
pooled = torch.randn(10, 32, generator=generator)[labels] + 2 * torch.rand(100_000, 32, generator=generator)
time.sleep(0.2)
before = peak[0] = anon()
threading.Thread(target=sample, daemon=True).start()
fit_linear_probe(pooled, labels, 10)
time.sleep(0.1)
print(peak[0] - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap behaviour, read from /proc")
def test_probe_fit_does_not_grow_the_heap():
    """L-BFGS frees (N, C) temporaries at every evaluation between small live tensors: without handing the free pages
    back, one fit on 100 000 rows grew the process by 65-180 MB (issue 12's memory bound)."""
    result = subprocess.run([sys.executable, "-c", PROBE_MEMORY_SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    growth_mb = int(result.stdout.split()[-1])
    assert growth_mb < 30, f"the probe fit grew the process's own memory by {growth_mb} MB"


def test_probe_sample_is_every_image_or_a_bounded_seeded_sample(image_folder, backbone_folder):
    model = ProtoQuantForImageClassification.from_backbone(str(backbone_folder), num_concepts=4, id2label={0: "a", 1: "b", 2: "c"})
    cache = _cache(model, image_folder)
    full, full_labels = pooled_training_sample(cache, max_rows=None)
    torch.testing.assert_close(full, cache.pooled(), rtol=0, atol=0)  # every image, in order: the unbounded probe input
    assert torch.equal(full_labels, torch.from_numpy(cache.labels))
    sample, labels = pooled_training_sample(cache, max_rows=5, seed=1)
    assert sample.shape == (5, full.shape[1])  # memory bounded by the sample, not by N
    matches = [int(((full - row).abs().sum(dim=1) == 0).nonzero()[0]) for row in sample]  # each a real image's features
    assert len(set(matches)) == 5 and torch.equal(labels, full_labels[matches])
    assert torch.equal(pooled_training_sample(cache, max_rows=5, seed=1)[0], sample)
    assert not torch.equal(pooled_training_sample(cache, max_rows=5, seed=2)[0], sample)


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
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        train_protoquant(*args, on_epoch_end=stop)
    first_segment = time.perf_counter() - started
    assert not interrupted.exists()  # no half-written output folder
    progress = json.loads((tmp_path / ".interrupted.incomplete" / "progress.json").read_text())
    assert (progress["phase"], progress["epoch"]) == ("stage2", 2)
    started = time.perf_counter()
    train_protoquant(*run_args(image_folder, backbone_folder, interrupted, resume=True, checkpoints_per_stage=checkpoints_per_stage))
    second_segment = time.perf_counter() - started
    resumed_summary = TrainingSummary.load(interrupted)
    assert resumed_summary.phases.keys() == TrainingSummary.load(reference).phases.keys()
    # Timings add up over both segments (the first ran up to its last checkpoint, just before the stop).
    assert resumed_summary.total_s > 0.7 * (first_segment + second_segment) > second_segment
    assert resumed_summary.total_s >= sum(phase.seconds for phase in resumed_summary.phases.values())
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


def test_without_image_size_the_job_trains_at_the_backbone_native_resolution(image_folder, backbone_folder, tmp_path):
    """No --image_size: the size the backbone's processor outputs (its center crop, 40 px here), in the model, the
    saved processor and the summary; an explicit size still wins."""
    native = tmp_path / "backbone40"
    shutil.copytree(backbone_folder, native)
    BitImageProcessor.from_pretrained(native, size={"shortest_edge": 48}, crop_size={"height": 40, "width": 40}).save_pretrained(native)
    data, model_args, training_args = run_args(image_folder, native, tmp_path / "native", stage1_epochs=1, stage2_epochs=1)
    summary = train_protoquant(replace(data, image_size=None), replace(model_args, backbone=str(native)), training_args)
    assert summary.dataset.image_size == 40 and summary.arguments["data"]["image_size"] == 40
    assert _final_model(tmp_path / "native").config.image_size == 40
    assert ProtoQuantImageProcessor.from_pretrained(tmp_path / "native").backbone.crop_size == {"height": 40, "width": 40}
    assert train_protoquant(data, replace(model_args, backbone=str(native)), replace(training_args, output_dir=str(tmp_path / "explicit"))).dataset.image_size == SIZE


def test_native_image_size_reads_the_processors_output_size():
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    assert native_image_size(BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})) == 224
    assert native_image_size(ViTImageProcessor(size={"height": 384, "width": 384})) == 384
    assert native_image_size(ConvNextImageProcessor(size={"shortest_edge": 288})) == 288
    assert native_image_size(ProtoQuantImageProcessor.wrap(ViTImageProcessor(size={"height": 96, "width": 96}))) == 96
    with pytest.raises(ValueError, match="pass --image_size"):
        native_image_size(ViTImageProcessor(size={"longest_edge": 512}))


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
        "--explain_test_images", "0", "--hub_bundle", "False",
    ]
    # Same global batch: 16 in one process, 2 x 8 in two.
    one = _launch([*common, "--batch_size", "16", "--output_dir", str(tmp_path / "one")], tmp_path, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch([*common, "--batch_size", "8", "--output_dir", str(tmp_path / "two")], tmp_path, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    summary_one = TrainingSummary.load(tmp_path / "one")
    summary_two = TrainingSummary.load(tmp_path / "two")
    assert summary_two.processes == 2 and summary_one.processes == 1
    one, two = summary_one.phases, summary_two.phases
    assert two["init"].usage == one["init"].usage and two["stage1"].usage == one["stage1"].usage
    for phase in ("probe", "stage1", "stage2"):
        assert abs(two[phase].accuracy - one[phase].accuracy) <= 0.005, phase
    assert two["grounding"].grounding.min == pytest.approx(one["grounding"].grounding.min, abs=1e-4)
    model_one = ProtoQuantForImageClassification.from_pretrained(tmp_path / "one")
    model_two = ProtoQuantForImageClassification.from_pretrained(tmp_path / "two")
    # Same updates (and learning-rate schedule) up to float summation order.
    torch.testing.assert_close(model_two.codebook.concepts, model_one.codebook.concepts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model_two.classifier.weight, model_one.classifier.weight, rtol=1e-3, atol=1e-3)
    # The gallery of two processes comes from their combined grounding pass: the patches one pass finds.
    entries = [FeatureCache.open(index.parent) for index in (tmp_path / "cache").rglob("index.json")]
    train_cache = next(entry for entry in entries if entry.meta["split"] == "train")
    gallery = ConceptGallery.load(tmp_path / "two")
    one_pass = ConceptStats.collect(model_two.eval(), train_cache, top_n=gallery.info["per_concept"])
    assert np.array_equal(gallery.rows, one_pass.top_rows.numpy()) and np.array_equal(gallery.cells, one_pass.top_cells.numpy())
    assert (gallery.rows >= 24).any()  # patches from the second process's half of the 48 images too


def test_augmented_training_runs_the_backbone_on_fresh_pixels(image_folder, backbone_folder, tmp_path, monkeypatch):
    calls = []
    original = ProtoQuantModel._backbone_forward

    def counting(self, pixel_values, **kwargs):
        calls.append(pixel_values.shape[0])
        return original(self, pixel_values, **kwargs)

    monkeypatch.setattr(ProtoQuantModel, "_backbone_forward", counting)
    data, model, training = run_args(image_folder, backbone_folder, tmp_path / "augmented", stage1_epochs=1, stage2_epochs=1)
    data.augment, data.cache_dir = True, str(tmp_path / "fresh-cache")  # fresh cache: extraction counted too
    summary = train_protoquant(data, model, training)
    extraction = 48 + 24  # both caches, each image once
    # every training epoch (one in each stage) ran the backbone over all 48 training images again
    assert sum(calls) == extraction + 2 * 48
    assert summary.arguments["data"]["augment"] is True


def test_an_epoch_order_is_split_over_processes_as_one_process_with_a_bigger_batch_would_read_it():
    from types import SimpleNamespace

    order = np.random.default_rng(5).permutation(23)
    one = loop_module.epoch_batches(23, 6, epoch=0, seed=0, accelerator=SimpleNamespace(num_processes=1, process_index=0), order=order)
    two = [loop_module.epoch_batches(23, 3, epoch=0, seed=0, accelerator=SimpleNamespace(num_processes=2, process_index=rank),
                                     order=order) for rank in (0, 1)]
    assert [b.tolist() for b in one][:3] == [order[i:i + 6].tolist() for i in (0, 6, 12)]  # the given order, not a new one
    assert len(one) == len(two[0]) == len(two[1]) == 4
    for step, batch in enumerate(one):
        assert sorted(batch.tolist()) == sorted(two[0][step].tolist() + two[1][step].tolist())
    with pytest.raises(ValueError, match="22 rows"):
        loop_module.epoch_batches(23, 6, 0, 0, SimpleNamespace(num_processes=1, process_index=0), order=order[:22])


def test_mix_batch_mixup_and_cutmix_oracles():
    inputs = torch.arange(4 * 2 * 4 * 4, dtype=torch.float32).reshape(4, 2, 4, 4)
    labels = torch.tensor([0, 1, 2, 0])

    def smoothed(which):
        return torch.nn.functional.one_hot(which, 3).float() * 0.9 + 0.1 / 3

    # Mixup: the expected lambda is the same draw from an identically seeded generator.
    expected_rng = np.random.default_rng(7)
    expected_rng.random()
    lam = expected_rng.beta(0.8, 0.8)
    mixed, targets = mix_batch(inputs, labels, 3, switch_prob=0.0, rng=np.random.default_rng(7))
    torch.testing.assert_close(mixed, lam * inputs + (1 - lam) * inputs.flip(0))
    torch.testing.assert_close(targets, lam * smoothed(labels) + (1 - lam) * smoothed(labels.flip(0)))
    # CutMix: one box comes from the flipped batch, the rest is untouched, targets follow the area.
    mixed, targets = mix_batch(inputs, labels, 3, switch_prob=1.0, rng=np.random.default_rng(3))
    from_flipped = (mixed == inputs.flip(0)) & (mixed != inputs)
    box = from_flipped[0, 0]
    assert box.any() and ((mixed == inputs) | from_flipped).all()
    area = float(box.float().mean())
    torch.testing.assert_close(targets, (1 - area) * smoothed(labels) + area * smoothed(labels.flip(0)))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))


def _final_model(output) -> ProtoQuantForImageClassification:
    return ProtoQuantForImageClassification.from_pretrained(output)


def test_training_options_change_what_they_say(image_folder, backbone_folder, tmp_path, monkeypatch):
    """--train_concepts (free: --grounding_radius -1), --shuffle_window_shards, --mixup, --prune_to, dead-concept
    removal and --backbone_feature_layer, each against the plain frozen-concept run with the same seed."""
    def run(name, model_kwargs=None, **training):
        training = {"train_concepts": False, **training}  # frozen concepts: the plain run's concepts are stage 1's
        data, model, training_args = run_args(image_folder, backbone_folder, tmp_path / name, **training)
        for key, value in (model_kwargs or {}).items():
            setattr(model, key, value)
        return train_protoquant(data, model, training_args), _final_model(tmp_path / name)

    plain_summary, plain = run("plain")
    assert plain_summary.phases["prune"].dead_removed == 0

    # Fine-tuned concepts move in stage 2; frozen ones are exactly the stage-1 concepts.
    tuned_summary, tuned = run("tuned", train_concepts=True, grounding_radius=-1, concept_lr=0.05)  # free fine-tuning
    assert tuned_summary.phases["stage1"].usage == plain_summary.phases["stage1"].usage  # same run up to stage 2
    assert not torch.allclose(tuned.codebook.concepts, plain.codebook.concepts)
    assert tuned_summary.grounding.mean < plain_summary.grounding.mean

    # Mixup trains the head on mixed feature maps with soft targets: another W from the same start.
    mixed_summary, mixed = run("mixup", mixup=True)
    torch.testing.assert_close(mixed.codebook.concepts, plain.codebook.concepts)
    assert not torch.allclose(mixed.classifier.weight, plain.classifier.weight)
    assert mixed_summary.arguments["training"]["mixup"] is True

    # Shard-window shuffling: every epoch reads the rows one whole shard at a time (a cache of 16-row shards here),
    # in another order than the full permutation, so another model.
    seen_orders = []
    original_batches = loop_module.epoch_batches

    def recording_batches(num_rows, batch_size, epoch, seed, accelerator, order=None):
        seen_orders.append(order)
        return original_batches(num_rows, batch_size, epoch, seed, accelerator, order)

    monkeypatch.setattr(loop_module, "epoch_batches", recording_batches)
    monkeypatch.setattr(job_module, "extract_features", functools.partial(job_module.extract_features, shard_size=16))
    data, model_args, training_args = run_args(image_folder, backbone_folder, tmp_path / "windowed", shuffle_window_shards=1)
    train_protoquant(replace(data, cache_dir=str(tmp_path / "cache16")), model_args, training_args)
    monkeypatch.undo()
    assert len(seen_orders) == 2 + 4  # every epoch of stages 1 and 2
    for order in seen_orders:
        assert sorted(order.tolist()) == list(range(48))
        assert all(len(set((order[start:start + 16] // 16).tolist())) == 1 for start in (0, 16, 32))  # shard by shard
    assert not torch.allclose(_final_model(tmp_path / "windowed").classifier.weight, plain.classifier.weight)

    # Usage-based pruning to 4 concepts in 4 rounds of one.
    pruned_summary, pruned = run("pruned", prune_to=4)
    prune = pruned_summary.phases["prune"]
    assert prune.num_concepts == 4 == pruned.config.num_concepts == pruned.classifier.weight.shape[1]
    assert [r.num_concepts for r in prune.usage_rounds] == [8, 7, 6, 5]

    # Orthogonal concepts on non-negative ReLU features: most are never selected, and are removed.
    dead_summary, dead = run("dead", concept_init="orthogonal")
    dead_after_stage1 = dead_summary.phases["stage1"].usage.dead_concepts
    assert dead_after_stage1 > 0
    assert dead_summary.phases["prune"].dead_removed == dead_after_stage1
    assert dead.config.num_concepts == 8 - dead_after_stage1

    # An earlier backbone stage: 8 channels instead of 16, saved in the config.
    layer_summary, layer = run("layer", model_kwargs={"backbone_feature_layer": 1})
    assert layer_summary.dataset.feature_map[0] == 8 == layer.codebook.concepts.shape[1]
    assert layer.config.backbone_feature_layer == 1


def test_validation_split_trains_on_the_rest_and_reports_the_held_out_part(image_folder, backbone_folder, tmp_path):
    """--validation_split: every accuracy is measured on held-out training images, never on the test split."""
    data, model, training = run_args(image_folder, backbone_folder, tmp_path / "val")
    data.validation_split = 0.25
    summary = train_protoquant(data, model, training)
    dataset = load_image_dataset(str(image_folder))
    held_out = hold_out_validation(dataset, 0.25)
    assert (summary.dataset.train_size, summary.dataset.test_size) == (len(held_out["train"]), len(held_out["test"]))
    assert summary.dataset.train_size + summary.dataset.test_size == len(dataset["train"])
    assert summary.dataset.test_split.startswith("validation")
    saved = _final_model(tmp_path / "val").eval()
    batch = held_out["test"].with_transform(make_image_transform(ProtoQuantImageProcessor.from_pretrained(tmp_path / "val")))
    batch = batch[: len(batch)]
    with torch.no_grad():
        predictions = saved(pixel_values=batch["pixel_values"]).logits.argmax(-1)
    assert summary.accuracy == pytest.approx(float((predictions == batch["labels"]).float().mean()))


def test_a_stream_and_a_dataset_object_train_the_same_model_as_the_folder(image_folder, backbone_folder, tmp_path):
    """--streaming (features extracted shard by shard from an IterableDataset; score table, gallery and figures read
    through the cache's row order) and a DatasetDict given in Python: the same seed gives the same model."""
    def run(name, **data_fields):
        data, model, training = run_args(image_folder, backbone_folder, tmp_path / name, gallery_per_concept=2, explain_test_images=2)
        for key, value in data_fields.items():
            setattr(data, key, value)
        return train_protoquant(data, model, training), _final_model(tmp_path / name)

    folder_summary, folder = run("folder")
    stream_summary, stream = run("stream", streaming=True)
    object_summary, given = run("object", dataset=load_image_dataset(str(image_folder)))
    for summary, model in ((stream_summary, stream), (object_summary, given)):
        torch.testing.assert_close(model.codebook.concepts, folder.codebook.concepts)
        torch.testing.assert_close(model.classifier.weight, folder.classifier.weight)
        assert summary.accuracy == folder_summary.accuracy
        assert (summary.dataset.train_size, summary.dataset.test_size) == (folder_summary.dataset.train_size, folder_summary.dataset.test_size)
    assert stream_summary.arguments["data"]["streaming"] is True
    assert object_summary.dataset.name.startswith("a DatasetDict given in Python")
    folder_gallery, stream_gallery = ConceptGallery.load(tmp_path / "folder"), ConceptGallery.load(tmp_path / "stream")
    assert np.array_equal(stream_gallery.rows, folder_gallery.rows)  # the stream's patches are the same training images'
    assert (tmp_path / "stream" / "examples").is_dir()
    # A cut stream is another stream: its first rows and info are the full stream's, its cache entry is not.
    cut_summary, _ = run("cut", streaming=True, max_samples_per_split=6)
    assert (cut_summary.dataset.train_size, cut_summary.dataset.test_size) == (6, 6)


def test_a_stream_object_is_never_mistaken_for_another():
    stream = load_image_dataset("synthetic-stream", streaming=True, synthetic_stream={"num_images": 20, "num_test_images": 10})
    by_name = DataArguments(dataset="synthetic-stream", streaming=True)
    assert stream_identity(by_name, stream["train"], "train") != stream_identity(replace(by_name, max_samples_per_split=5), stream["train"], "train")
    given = DataArguments(dataset=stream)
    assert stream_identity(given, stream["train"], "train") != stream_identity(given, stream["train"], "train")
    assert stream_identity(by_name, load_image_dataset("digits")["train"], "train") is None  # map-style: hashed instead


def test_streaming_refuses_augment_and_a_dataset_of_another_type():
    with pytest.raises(ValueError, match="--augment needs random access"):
        DataArguments(streaming=True, augment=True)
    with pytest.raises(TypeError, match="DatasetDict"):
        DataArguments(dataset=["not", "a", "dataset"])


def test_random_augment_is_seeded_and_keeps_size():
    import random

    from protoquant_hf.data import random_augment

    image = _pattern(2, np.random.default_rng(1))
    first = random_augment(image, random.Random(3))
    assert first.size == image.size and first.mode == image.mode
    assert np.array_equal(np.asarray(first), np.asarray(random_augment(image, random.Random(3))))
    assert any(not np.array_equal(np.asarray(random_augment(image, random.Random(s))), np.asarray(image)) for s in range(5))


def test_cli_output_is_one_bar_per_phase_and_a_table(image_folder, backbone_folder, tmp_path):
    common = [
        sys.executable, "-m", "protoquant_hf", "train", "--dataset", str(image_folder), "--backbone", str(backbone_folder),
        "--image_size", str(SIZE), "--num_concepts", "8", "--feature_dtype", "float32", "--stage1_epochs", "2",
        "--stage2_epochs", "3", "--top_k_per_class", "2", "--sparsify_epochs", "2", "--kmeans_iterations", "5",
        "--batch_size", "8", "--cache_dir", str(tmp_path / "cache"), "--checkpoints_per_stage", "3",
        "--explain_test_images", "0", "--hub_bundle", "False",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    shown = subprocess.run([*common, "--output_dir", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=600)
    assert shown.returncode == 0, shown.stderr[-3000:]
    # Internal checkpoints and reloads are silent; each training stage has one bar, epochs as steps.
    assert "Writing model shards" not in shown.stderr and "Loading weights" not in shown.stderr
    assert "LOAD REPORT" not in shown.stderr
    for stage, epochs in (("stage1", 2), ("stage2", 3), ("sparsify", 2)):
        assert f"{stage}: 100%" in shown.stderr and f"{epochs}/{epochs} [" in shown.stderr, stage
    assert "epoch 1/" not in shown.stderr  # no bar or line per epoch
    assert "ProtoQuant accuracy" in shown.stdout and "100% agreement" in shown.stdout
    quiet = subprocess.run(
        [*common, "--output_dir", str(tmp_path / "b"), "--disable_tqdm", "--log_level", "error"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "it/s" not in quiet.stderr and "epoch/s" not in quiet.stderr and "batch/s" not in quiet.stderr
    assert "ProtoQuant accuracy" in quiet.stdout


def test_the_imagenet_recipe_parses():
    """examples/train_imagenet.sh passes only options `protoquant train` has, with valid values."""
    import shlex

    from transformers import HfArgumentParser

    script = (REPO / "examples" / "train_imagenet.sh").read_text()
    command = script.split("examples/train_protoquant.py", 1)[1].split('"$@"', 1)[0].replace("\\\n", " ")
    argv = shlex.split(command.replace('"$CACHE"', "/tmp/cache").replace('"$OUTPUT"', "/tmp/out"))
    data, model, training = HfArgumentParser((DataArguments, ModelArguments, ProtoQuantTrainingArguments)).parse_args_into_dataclasses(args=argv)
    assert data.streaming and data.test_split == "validation" and data.image_size == 224
    assert model.backbone == "facebook/convnext-tiny-224" and training.mixed_precision == "bf16"


def test_a_stream_too_short_for_kmeans_is_one_clear_error(image_folder, backbone_folder, tmp_path):
    data, model, training = run_args(image_folder, backbone_folder, tmp_path / "short")
    data.streaming, data.max_samples_per_split, model.num_concepts = True, 2, 64
    with pytest.raises(ValueError, match="needs at least K|Lower --num_concepts"):
        train_protoquant(data, model, training)
    assert not (tmp_path / "short").exists()  # nothing written
