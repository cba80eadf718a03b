"""Grounded concept fine-tuning (`--grounding_radius`): the projection, its shortlist, and tiny end-to-end runs."""

import math
from dataclasses import replace
import os
import subprocess
import sys

import pytest
import torch
from test_training import REPO, SIZE, backbone_folder, image_folder, run_args  # noqa: F401 (fixtures)

from protoquant_hf import ProtoQuantForImageClassification
from protoquant_hf.concepts import FeatureCache
from protoquant_hf.modeling_protoquant import cosine_similarity
from protoquant_hf.training import ProtoQuantTrainingArguments, TrainingSummary, train_protoquant
from protoquant_hf.training.arguments import DEFAULT_GROUNDING_RADIUS, NO_GROUNDING
from protoquant_hf.training.grounding import (
    GROUNDING_MARGIN,
    ConceptProjector,
    GroundedConcepts,
    nearest_bank_vectors,
    project_to_cap,
)


def _unit(vectors):
    return vectors / vectors.norm(dim=-1, keepdim=True)


def _cosines(concepts, bank):
    """`(K, N)` float64 cosines, the reference every check compares with."""
    return _unit(concepts.double()) @ _unit(bank.double()).T


def _model_grounding(concepts, bank, eps=1e-6):
    """Per concept, its highest cosine to a bank vector as the model computes it (float32, ε on the norms)."""
    return cosine_similarity(bank.T[None, :, :, None], concepts, eps)[0].amax(dim=0)


def _bank(num=300, dim=24, seed=0):
    """Positive vectors like ReLU feature maps (none zero)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(num, dim, generator=generator)) + 1e-3


def _at_cosine(center, cosine, generator):
    """A vector at exactly `cosine` to `center` (random direction around it), of norm 3."""
    center = _unit(center.double())
    other = torch.randn(center.shape, generator=generator, dtype=torch.float64)
    other = _unit(other - (other @ center) * center)
    return (3 * (cosine * center + math.sqrt(1 - cosine**2) * other)).float()


def test_projection_is_the_identity_inside_and_a_minimal_great_circle_move_outside():
    generator = torch.Generator().manual_seed(1)
    centers = _bank(6)
    cosines = (0.97, 0.9001, 0.5, -0.2, 0.1, 0.8)
    concepts = torch.stack([_at_cosine(center, cosine, generator) for center, cosine in zip(centers, cosines)])
    concepts[4] = -centers[4] * 2  # pointing exactly away: no great circle to follow
    projected = project_to_cap(concepts, centers, radius=0.9)
    inside = torch.tensor([True, True, False, False, False, False])
    assert torch.equal(projected[inside], concepts[inside])  # bit for bit
    moved, before, center = projected[~inside].double(), concepts[~inside].double(), _unit(centers[~inside].double())
    torch.testing.assert_close(moved.norm(dim=1), before.norm(dim=1), rtol=1e-6, atol=0)  # the norm is kept
    rotated = [0, 1, 3]  # the antipodal one (2) has no great circle
    reached = (_unit(moved) * center).sum(1)[rotated]
    torch.testing.assert_close(reached, torch.full((3,), 0.9, dtype=torch.float64), atol=1e-6, rtol=0)
    # Along the great circle toward the center: in the plane of the concept and its center, between them, and
    # exactly as far as the cap's edge (angle moved = angle to the center − arccos γ).
    for new, old, target in zip(_unit(moved)[rotated], _unit(before)[rotated], center[rotated]):
        basis = torch.stack([old, target], dim=1)
        coefficients = torch.linalg.lstsq(basis, new).solution
        torch.testing.assert_close(basis @ coefficients, new, atol=1e-6, rtol=0)
        assert (coefficients >= 0).all()
        moved_angle = torch.arccos((new @ old).clamp(-1, 1))
        assert float(moved_angle) == pytest.approx(float(torch.arccos(old @ target) - math.acos(0.9)), abs=1e-5)
    torch.testing.assert_close(_unit(moved[2]), center[2], atol=1e-6, rtol=0)  # the antipodal one: the center's direction


def test_nearest_bank_vectors_match_brute_force_across_chunks():
    bank = _bank(101).half()  # a float16 bank, as the default cache stores it
    concepts = torch.randn(9, 24, generator=torch.Generator().manual_seed(2))
    cosines, rows = nearest_bank_vectors(concepts, bank, k=5, chunk_size=7)  # chunks of 7: many merges
    expected = _cosines(concepts, bank.float()).topk(5, dim=1)
    assert torch.equal(rows, expected.indices)
    torch.testing.assert_close(cosines.double(), expected.values, atol=1e-5, rtol=0)


def test_radius_one_snaps_each_concept_to_its_nearest_bank_vector():
    bank = _bank()
    concepts = torch.randn(10, 24, generator=torch.Generator().manual_seed(3))
    nearest = _unit(bank[_cosines(concepts, bank).argmax(dim=1)])
    projector = ConceptProjector(bank, radius=1.0)
    for projected in (projector.step(concepts), projector.exact(concepts)):
        torch.testing.assert_close(projected, nearest * concepts.norm(dim=1, keepdim=True), atol=1e-6, rtol=1e-6)


def test_every_step_ends_inside_and_the_margin_makes_the_model_agree():
    bank = _bank()
    generator = torch.Generator().manual_seed(4)
    concepts = torch.randn(12, 24, generator=generator)
    projector = ConceptProjector(bank, radius=0.85, refresh_steps=3)
    for _ in range(7):  # random "optimiser steps", each followed by the projection
        concepts = projector.step(concepts + 0.3 * torch.randn(concepts.shape, generator=generator))
        assert (_model_grounding(concepts, bank) >= 0.85).all()
        assert (_cosines(concepts, bank).amax(dim=1) <= 0.85 + GROUNDING_MARGIN + 1e-6).any()  # moved ones sit at the edge
    assert torch.equal(projector.step(concepts), concepts)  # projected concepts count as inside: nothing moves again


def test_shortlist_refresh_schedule(monkeypatch):
    projector = ConceptProjector(_bank(), radius=0.9, refresh_steps=3)
    refreshed = []
    original = projector.refresh
    monkeypatch.setattr(projector, "refresh", lambda concepts: (refreshed.append(step), original(concepts)))
    concepts = torch.randn(4, 24)
    for step in range(8):
        if step == 5:
            projector.restart()  # a checkpoint after step 4: a resumed run starts here with no shortlist
        projector.step(concepts)
    assert refreshed == [0, 3, 5]


def test_the_final_exact_projection_searches_the_whole_bank():
    """Concepts that moved away from a stale shortlist: `step` still grounds them (toward the stale neighbour), the
    exact projection measures them against every bank vector."""
    bank = _bank()
    generator = torch.Generator().manual_seed(5)
    start = torch.stack([_at_cosine(bank[0], 0.95, generator), _at_cosine(bank[1], 0.95, generator)])
    projector = ConceptProjector(bank, radius=0.9, refresh_steps=1000, shortlist_size=1)
    projector.step(start)  # shortlists {bank[0]}, {bank[1]}, never refreshed again
    far = _cosines(bank[:2], bank).argmin(dim=1)  # for each, the bank vector least like its shortlisted one
    inside_far = _at_cosine(bank[far[0]], 0.95, generator)  # well inside another vector's cap
    outside_all = -start[1]  # outside every cap
    moved = torch.stack([inside_far, outside_all])
    assert (_cosines(moved, bank[:2]).diagonal() < 0.9).all()

    stale = projector.step(moved)
    assert not torch.equal(stale[0], inside_far)  # pulled toward its stale neighbour, although it was grounded
    exact = projector.exact(moved)
    assert torch.equal(exact[0], inside_far)  # the whole bank says it is inside: untouched
    nearest = _cosines(outside_all[None], bank).argmax()
    assert float(_cosines(exact[1:], bank[nearest][None])) == pytest.approx(0.9 + GROUNDING_MARGIN, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_concepts": True, "grounding_radius": 0.0}, r"--grounding_radius must be a cosine in \(0, 1\], or -1"),
        ({"train_concepts": True, "grounding_radius": 1.5}, r"--grounding_radius must be a cosine in \(0, 1\], or -1"),
        ({"train_concepts": True, "grounding_radius": -0.5}, r"--grounding_radius must be a cosine in \(0, 1\], or -1"),
        ({"train_concepts": True, "grounding_radius": float("nan")}, r"--grounding_radius must be a cosine in \(0, 1\]"),
        ({"train_concepts": False, "grounding_radius": 0.9}, "--train_concepts False freezes them"),
        ({"train_concepts": True, "grounding_radius": 0.9, "grounding_bank_size": 0}, "--grounding_bank_size must be >= 1"),
        ({"train_concepts": True, "grounding_radius": 0.9, "grounding_refresh_steps": 0}, "--grounding_refresh_steps must be >= 1"),
    ],
)
def test_bad_grounding_arguments_give_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProtoQuantTrainingArguments(**kwargs)


def test_the_free_baseline_takes_a_radius():
    assert ProtoQuantTrainingArguments(concept_training="free", grounding_radius=0.9).grounding_radius == 0.9


def test_grounded_fine_tuning_is_the_default_and_minus_one_turns_it_off():
    default = ProtoQuantTrainingArguments(output_dir="x")
    assert default.train_concepts and default.grounding_radius == DEFAULT_GROUNDING_RADIUS == 0.9 and default.grounds_concepts
    assert default.concept_lr == 1e-3 and default.stage2_epochs == default.sparsify_epochs == 60
    free = ProtoQuantTrainingArguments(output_dir="x", grounding_radius=NO_GROUNDING)
    assert free.train_concepts and not free.grounds_concepts
    frozen = ProtoQuantTrainingArguments(output_dir="x", train_concepts=False)
    assert frozen.grounding_radius is None and not frozen.grounds_concepts
    baseline = ProtoQuantTrainingArguments(output_dir="x", concept_training="free")  # the baseline stays unconstrained
    assert baseline.grounding_radius is None and not baseline.grounds_concepts
    assert replace(default, seed=1).grounding_radius == 0.9  # re-validated arguments keep the resolved radius


def _train_bank(output) -> torch.Tensor:
    """Every non-zero training feature vector of a run's cache (the tiny runs' bank is all of them)."""
    model = ProtoQuantForImageClassification.from_pretrained(output)
    entries = [FeatureCache.open(meta.parent) for meta in (output.parent / "cache").rglob("index.json")]
    cache = next(entry for entry in entries if entry.meta["split"] == "train")
    return cache.feature_vectors()[0], model


def test_grounded_fine_tuning_keeps_every_concept_grounded_after_every_step(image_folder, backbone_folder, tmp_path, monkeypatch):  # noqa: F811
    steps = []
    original = GroundedConcepts.after_step

    def recording(self):
        original(self)
        steps.append(self.model.codebook.concepts.detach().clone())

    monkeypatch.setattr(GroundedConcepts, "after_step", recording)
    data, model, training = run_args(
        image_folder, backbone_folder, tmp_path / "grounded", train_concepts=True, concept_lr=0.05, grounding_radius=0.9,
        grounding_refresh_steps=4, top_k_per_class=2, sparsify_epochs=2,
    )
    data.cache_dir = str(tmp_path / "cache")
    summary = train_protoquant(data, model, training)
    bank, final = _train_bank(tmp_path / "grounded")

    assert len(steps) == (4 + 2) * 6  # stage 2 and the sparsify retraining, 6 steps of 8 of the 48 images per epoch
    for concepts in steps:
        assert (_model_grounding(concepts, bank) >= 0.9).all()
    # The concepts keep training in the retraining after the top-k cut (the same concepts, fewer of them).
    sparsify = [concepts for concepts in steps if len(concepts) == final.config.num_concepts]
    assert len(sparsify) == 12 and not torch.allclose(sparsify[0], sparsify[-1])
    # The constraint binds (the learning rate pushes concepts out) and the model's own figure shows it.
    assert 0.9 <= summary.grounding.min <= 0.9 + 2 * GROUNDING_MARGIN
    final_grounding = _model_grounding(final.codebook.concepts.detach(), bank)
    assert float(final_grounding.min()) == pytest.approx(summary.grounding.min, abs=1e-6)
    assert summary.arguments["training"]["grounding_radius"] == 0.9


def test_a_resumed_grounded_run_ends_where_the_uninterrupted_one_does(image_folder, backbone_folder, tmp_path, monkeypatch):  # noqa: F811
    """The shortlists are not checkpointed: both runs recompute them at the checkpoint a resumed run starts from."""
    refreshed = []
    original = ConceptProjector.refresh
    monkeypatch.setattr(
        ConceptProjector, "refresh", lambda self, concepts: (refreshed.append(concepts.clone()), original(self, concepts))
    )
    grounded = {
        "train_concepts": True, "concept_lr": 0.05, "grounding_radius": 0.9, "grounding_refresh_steps": 5,
        "checkpoints_per_stage": 2,
    }
    train_protoquant(*run_args(image_folder, backbone_folder, tmp_path / "reference", **grounded))
    uninterrupted = list(refreshed)

    def stop(stage, epoch):
        if stage == "stage2" and epoch == 2:  # after epoch 3; the last checkpoint is after epoch 2 (step 12)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_protoquant(*run_args(image_folder, backbone_folder, tmp_path / "resumed", **grounded), on_epoch_end=stop)
    refreshed.clear()
    train_protoquant(*run_args(image_folder, backbone_folder, tmp_path / "resumed", resume=True, **grounded))
    # The resumed segment refreshes where the uninterrupted run did, from the same concepts.
    assert 0 < len(refreshed) < len(uninterrupted)
    for resumed_concepts, reference_concepts in zip(refreshed, uninterrupted[-len(refreshed) :]):
        torch.testing.assert_close(resumed_concepts, reference_concepts)
    reference = ProtoQuantForImageClassification.from_pretrained(tmp_path / "reference")
    resumed = ProtoQuantForImageClassification.from_pretrained(tmp_path / "resumed")
    torch.testing.assert_close(resumed.codebook.concepts, reference.codebook.concepts)
    torch.testing.assert_close(resumed.classifier.weight, reference.classifier.weight)


def test_radius_one_on_the_free_baseline_makes_every_prototype_a_training_vector(image_folder, backbone_folder, tmp_path):  # noqa: F811
    data, model, training = run_args(
        image_folder, backbone_folder, tmp_path / "free", concept_training="free", grounding_radius=1.0, concept_lr=0.05,
    )
    data.cache_dir = str(tmp_path / "cache")
    train_protoquant(data, model, training)
    bank, final = _train_bank(tmp_path / "free")
    concepts = final.codebook.concepts.detach()
    nearest = _unit(bank[_cosines(concepts, bank).argmax(dim=1)])
    torch.testing.assert_close(_unit(concepts), nearest, atol=1e-6, rtol=0)  # random starts, now real directions


def _launch(args: list[str], cwd, processes: int) -> subprocess.CompletedProcess:
    """The training script in 1 process or 2 (`accelerate launch`), importing this checkout's package."""
    launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"] if processes == 2 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [*launcher, str(REPO / "examples" / "train_protoquant.py"), *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=600, check=False,
    )


def test_two_processes_match_one_process(image_folder, backbone_folder, tmp_path):  # noqa: F811
    common = [
        "--dataset", str(image_folder), "--backbone", str(backbone_folder), "--image_size", str(SIZE),
        "--num_concepts", "8", "--feature_dtype", "float32", "--stage1_epochs", "1", "--stage2_epochs", "3",
        "--kmeans_iterations", "5", "--seed", "0", "--cache_dir", str(tmp_path / "cache"), "--top_k_per_class", "2",
        "--sparsify_epochs", "2", "--explain_test_images", "0", "--gallery_per_concept", "0", "--hub_bundle", "False",
        "--train_concepts", "--concept_lr", "0.05", "--grounding_radius", "0.9", "--grounding_refresh_steps", "2",
    ]
    one = _launch([*common, "--batch_size", "16", "--output_dir", str(tmp_path / "one")], tmp_path, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch([*common, "--batch_size", "8", "--output_dir", str(tmp_path / "two")], tmp_path, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    summary_one, summary_two = TrainingSummary.load(tmp_path / "one"), TrainingSummary.load(tmp_path / "two")
    assert (summary_one.processes, summary_two.processes) == (1, 2)
    assert summary_one.grounding.min >= 0.9 and summary_two.grounding.min >= 0.9
    model_one = ProtoQuantForImageClassification.from_pretrained(tmp_path / "one")
    model_two = ProtoQuantForImageClassification.from_pretrained(tmp_path / "two")
    assert model_two.config.num_concepts == model_one.config.num_concepts
    torch.testing.assert_close(model_two.codebook.concepts, model_one.codebook.concepts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model_two.classifier.weight, model_one.classifier.weight, rtol=1e-3, atol=1e-3)
