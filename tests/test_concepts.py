"""The concepts layer: ConceptStats against brute force, the editing operations, the typed summary."""

import math

import numpy as np
import pytest
import torch
from tiny_backbones import tiny_backbone_config

from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification
from protoquant_hf.concepts import (
    PAPER_WEIGHT_THRESHOLD,
    ConceptStats,
    FeatureCache,
    UsageSummary,
    concept_score_store,
    concept_score_table,
    concepts_for_weight_mass,
    concepts_per_class,
    disable_concept,
    keep_top_k_per_class,
    prune_by_usage,
    prune_concepts,
    remove_unused_concepts,
    set_concepts,
)
from protoquant_hf.training.summary import (
    CodebookResult,
    ConceptsPerClass,
    DatasetInfo,
    GroundingResult,
    HeadResult,
    ProbeResult,
    PruneResult,
    TrainingSummary,
)

HIDDEN = 16  # channels of the tiny ResNet's last stage


def tiny_model(num_concepts: int = 5, num_labels: int = 3) -> ProtoQuantForImageClassification:
    backbone_config, size = tiny_backbone_config("resnet")
    config = ProtoQuantConfig(
        backbone_config=backbone_config, num_concepts=num_concepts, image_size=size,
        id2label={i: str(i) for i in range(num_labels)},
    )
    torch.manual_seed(0)
    return ProtoQuantForImageClassification(config).eval()


def feature_cache(num_images: int = 7, height: int = 3, width: int = 2, seed: int = 0) -> FeatureCache:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_images, HIDDEN, height, width)).astype(np.float32)
    labels = np.arange(num_images) % 3
    return FeatureCache.from_arrays(features, labels, shard_size=3)  # reads span shards


def brute_force(model, cache: FeatureCache, top_n: int):
    """Every (concept, image, cell) cosine with the spec's formula, in float64, looped by hand."""
    concepts = model.codebook.concepts.detach().double().numpy()
    eps, tau = model.config.cosine_eps, model.config.temperature
    features = cache.to_numpy().astype(np.float64)
    num_images, _, height, width = features.shape
    num_concepts = len(concepts)
    cosines = np.zeros((num_concepts, num_images, height, width))
    for k in range(num_concepts):
        for n in range(num_images):
            for h in range(height):
                for w in range(width):
                    z = features[n, :, h, w]
                    cosines[k, n, h, w] = z @ concepts[k] / ((np.linalg.norm(z) + eps) * (np.linalg.norm(concepts[k]) + eps))
    usage = np.bincount(cosines.argmax(axis=0).ravel(), minlength=num_concepts)
    top = []
    for k in range(num_concepts):
        patches = sorted(
            ((cosines[k, n, h, w], n, h, w) for n in range(num_images) for h in range(height) for w in range(width)),
            key=lambda item: (-item[0], item[1]),
        )
        top.append(patches[:top_n])
    activations = np.exp(cosines / tau) / np.exp(cosines / tau).sum(axis=0, keepdims=True)
    scores = activations.max(axis=(2, 3)).T  # (N, K)
    presence = np.stack([scores[cache.labels == c].sum(axis=0) for c in range(3)])
    return usage, top, presence


@pytest.mark.parametrize("batch_size", [2, 64])
def test_concept_stats_equal_a_brute_force_pass(batch_size):
    model = tiny_model()
    cache = feature_cache()
    usage, top, presence = brute_force(model, cache, top_n=4)
    stats = ConceptStats.collect(model, cache, top_n=4, batch_size=batch_size)
    assert stats.usage.tolist() == usage.tolist()
    assert stats.usage.sum() == 7 * 3 * 2
    for k in range(5):
        np.testing.assert_allclose(stats.top_scores[k].numpy(), [item[0] for item in top[k]], atol=1e-5)
        assert stats.top_rows[k].tolist() == [item[1] for item in top[k]]
        assert stats.top_cells[k].tolist() == [[item[2], item[3]] for item in top[k]]
    # Grounding is the best cosine to any feature vector, per concept.
    np.testing.assert_allclose(stats.grounding.numpy(), [item[0][0] for item in top], atol=1e-5)
    summary = stats.grounding_summary()
    assert summary.min == pytest.approx(min(item[0][0] for item in top), abs=1e-5)
    assert summary.mean == pytest.approx(np.mean([item[0][0] for item in top]), abs=1e-5)
    np.testing.assert_allclose(stats.class_presence.numpy(), presence, rtol=1e-5)
    assert stats.class_counts.tolist() == [3, 2, 2]
    assert stats.feature_size == (3, 2)


def test_concept_stats_from_batches_and_row_subsets():
    model = tiny_model()
    cache = feature_cache()
    from_cache = ConceptStats.collect(model, cache, top_n=2)
    from_batches = ConceptStats.collect(model, cache.batches(3), top_n=2)
    assert torch.equal(from_batches.top_rows, from_cache.top_rows)
    torch.testing.assert_close(from_batches.top_scores, from_cache.top_scores)
    rows = np.array([5, 1, 6])
    subset = ConceptStats.collect(model, cache, top_n=2, indices=rows)
    assert set(subset.top_rows.flatten().tolist()) <= set(rows.tolist())  # rows are dataset rows
    assert subset.usage.sum() == 3 * 3 * 2
    # Fewer locations than top_n: the empty slots are marked.
    tiny = ConceptStats.collect(model, cache, top_n=10, indices=np.array([0]))
    assert (tiny.top_rows[:, 6:] == -1).all() and torch.isinf(tiny.top_scores[:, 6:]).all()
    with pytest.raises(ValueError, match="top_n"):
        ConceptStats.collect(model, cache, top_n=0)


def test_concept_score_store_holds_the_table_on_disk_in_shards(tmp_path):
    model = tiny_model()
    cache = feature_cache(num_images=7)
    store = concept_score_store(model, cache, tmp_path / "scores", batch_size=2, shard_size=3)
    table = concept_score_table(model, cache)
    assert store.shape == (7, 5) and list(store.store.row_counts) == [3, 3, 1]  # one 3-row shard in memory at a time
    rows = np.array([6, 0, 4, 4, 2])  # across shards, out of order
    scores, labels = store.read(rows)
    assert torch.equal(scores, table[rows])  # exactly the table's float32 values
    assert labels.tolist() == cache.labels[rows].tolist()
    assert FeatureCache.open(tmp_path / "scores").read(rows)[0].equal(scores)  # a real store on disk


def test_the_kmeans_sample_is_bounded_seeded_and_made_of_real_locations():
    cache = feature_cache(num_images=7)  # 7 images x 6 locations = 42 vectors, in shards of 3 images
    everything, labels = cache.feature_vectors()
    assert len(everything) == 42
    sample, sample_labels = cache.feature_vectors(max_vectors=5, seed=1, batch_size=2)
    assert sample.shape == (5, HIDDEN)  # the bound, however many locations there are
    rows = [int(((everything - vector).abs().sum(dim=1) == 0).nonzero()[0]) for vector in sample]
    assert len(set(rows)) == 5 and rows == sorted(rows) and torch.equal(sample_labels, labels[rows])  # distinct, in cache order
    assert torch.equal(cache.feature_vectors(max_vectors=5, seed=1)[0], sample)  # batch size does not matter
    assert not torch.equal(cache.feature_vectors(max_vectors=5, seed=2)[0], sample)


def test_usage_summary():
    summary = UsageSummary.from_counts(torch.tensor([0, 4, 0, 10, 2]))
    assert (summary.num_concepts, summary.dead_concepts, summary.usage_max) == (5, 2, 10)
    assert summary.dead_ratio == pytest.approx(0.4) and summary.usage_median_alive == 4.0


def test_keep_top_k_per_class_and_remove_unused():
    model = tiny_model(num_concepts=5, num_labels=2)
    weight = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.1], [0.3, 0.2, 0.9, -0.5, 0.0]])
    model.classifier.weight.data.copy_(weight)
    keep_top_k_per_class(model, 2)
    expected = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0], [0.3, 0.0, 0.9, 0.0, 0.0]])
    assert torch.equal(model.classifier.weight.detach(), expected)
    concepts = model.codebook.concepts.detach().clone()
    assert remove_unused_concepts(model) == 1  # only concept 4 has no positive weight left
    assert model.config.num_concepts == 4
    assert torch.equal(model.codebook.concepts.detach(), concepts[[0, 1, 2, 3]])
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        keep_top_k_per_class(model, 5)


def test_remove_unused_concepts_keeps_exactly_the_used_ones():
    model = tiny_model(num_concepts=5, num_labels=2)
    model.classifier.weight.data.copy_(torch.tensor([[0.0, 2.0, -1.0, 0.0, 0.0], [0.3, 0.0, 0.0, -0.5, 0.0]]))
    concepts = model.codebook.concepts.detach().clone()
    assert remove_unused_concepts(model) == 3
    assert model.config.num_concepts == 2 == model.codebook.concepts.shape[0] == model.classifier.weight.shape[1]
    assert torch.equal(model.codebook.concepts.detach(), concepts[[0, 1]])
    assert torch.equal(model.classifier.weight.detach(), torch.tensor([[0.0, 2.0], [0.3, 0.0]]))
    assert remove_unused_concepts(model) == 0


def test_disable_concept_and_set_concepts_validate():
    model = tiny_model()
    disable_concept(model, 3, class_index=1)
    assert model.classifier.weight[1, 3] == 0 and (model.classifier.weight[0] != 0).all()
    with pytest.raises(ValueError, match=r"concept_index must be in \[0, 4\]"):
        disable_concept(model, 5, class_index=0)
    with pytest.raises(ValueError, match="shape"):
        set_concepts(model, torch.zeros(4, HIDDEN))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        prune_concepts(model, torch.tensor([0, 7]))


def test_edits_keep_the_trainable_flags():
    model = tiny_model()
    model.set_trainable("head", train_concepts=True)
    prune_concepts(model, torch.tensor([1, 2]))
    assert model.codebook.concepts.requires_grad and model.classifier.weight.requires_grad
    model.set_trainable("head")
    prune_concepts(model, torch.tensor([0]))
    assert not model.codebook.concepts.requires_grad and model.classifier.weight.requires_grad


def test_prune_by_usage_drops_the_least_used_in_rounds():
    model = tiny_model(num_concepts=6)
    weight = model.classifier.weight.detach().clone()
    original = model.codebook.concepts.detach().clone()
    usage_of_original = torch.tensor([50, 3, 40, 1, 20, 2])

    def usage(m):  # each remaining concept keeps the usage of the original it is
        which = [int((original == row).all(dim=1).nonzero()) for row in m.codebook.concepts.detach()]
        return usage_of_original[which]

    history = prune_by_usage(model, usage, target_num_concepts=3, steps=2)
    assert len(history) == 2 and history[0].num_concepts == 6 and history[1].num_concepts == 4
    assert model.config.num_concepts == 3
    # Round 1 drops the two least used (3, 5); round 2 recounts on K = 4 and drops 1.
    assert torch.equal(model.classifier.weight.detach(), weight[:, [0, 2, 4]])
    with pytest.raises(ValueError, match="target_num_concepts"):
        prune_by_usage(model, usage, target_num_concepts=0)


STAGE2_PER_CLASS = ConceptsPerClass(nonzero_mean=4.5, nonzero_max=5, mass95_mean=3.5, mass95_max=4, paper_mean=3.0, paper_max=4)
SPARSE_PER_CLASS = ConceptsPerClass(nonzero_mean=2.0, nonzero_max=2, mass95_mean=1.5, mass95_max=2, paper_mean=2.0, paper_max=2)


def test_training_summary_round_trips():
    summary = TrainingSummary(
        dataset=DatasetInfo(name="d", classes=["a", "b"], train_size=10, test_size=4, image_size=32, feature_map=[16, 2, 2]),
        phases={
            "probe": ProbeResult(head="linear_probe", accuracy=0.9, seconds=1.5),
            "stage1": CodebookResult(accuracy=0.8, usage=UsageSummary(8, 1, 0.125, 30, 4.0), epochs=2),
            "prune": PruneResult(dead_removed=1, usage_rounds=[UsageSummary(7, 0, 0.0, 30, 5.0)], num_concepts=5),
            "stage2": HeadResult(accuracy=0.85, num_concepts=5, concepts_per_class=STAGE2_PER_CLASS, epochs=4),
            "sparsify": HeadResult(accuracy=0.81, num_concepts=4, concepts_per_class=SPARSE_PER_CLASS, epochs=2, concepts_removed=1),
            "grounding": GroundingResult(grounding=__import__("protoquant_hf").concepts.GroundingSummary(mean=0.9, min=0.7)),
        },
        total_s=12.0,
    )
    again = TrainingSummary.from_json(summary.to_json())
    assert again == summary
    assert isinstance(again.phases["prune"].usage_rounds[0], UsageSummary)
    assert again.accuracy == 0.81 and again.num_concepts == 4  # the final head is the sparsified one
    assert again.accuracy_vs_linear_probe == pytest.approx(0.9)
    assert again.concepts_per_class == SPARSE_PER_CLASS and again.grounding.min == 0.7
    del again.phases["sparsify"]
    assert again.accuracy == 0.85 and math.isclose(again.accuracy_vs_linear_probe, 0.85 / 0.9)


# --- how many concepts each class uses ---


def test_the_headline_counts_ignore_the_scale_of_w_and_the_papers_count_does_not():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 12, generator=generator, dtype=torch.float64) * 0.3
    weight[weight.abs() < 0.02] = 0.0  # exact zeros, as after sparsification
    scores = torch.rand(32, 12, generator=generator, dtype=torch.float64)
    nonzero, mass = concepts_per_class(weight), concepts_for_weight_mass(weight)
    paper = concepts_per_class(weight, PAPER_WEIGHT_THRESHOLD)
    assert (nonzero > 0).all() and (mass <= nonzero).all() and not torch.equal(paper, nonzero)
    for scale in (1e-3, 0.37, 3.0, 1e4):
        scaled = weight * scale
        # The same classifier: logits = s · ReLU(W)ᵀ only scale, so every prediction is the same ...
        assert torch.equal((scores @ scaled.relu().T).argmax(1), (scores @ weight.relu().T).argmax(1))
        # ... and the scale-invariant counts agree,
        assert torch.equal(concepts_per_class(scaled), nonzero)
        assert torch.equal(concepts_for_weight_mass(scaled), mass)
        assert ConceptsPerClass.from_weight(scaled).figures()[:2] == ConceptsPerClass.from_weight(weight).figures()[:2]
    # ... while the paper's ReLU(W) > 0.1 count shows any number wanted: none, or every non-zero weight.
    assert concepts_per_class(weight * 1e-3, PAPER_WEIGHT_THRESHOLD).sum() == 0
    assert torch.equal(concepts_per_class(weight * 1e4, PAPER_WEIGHT_THRESHOLD), nonzero)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_only_exact_zeros_and_negative_weights_are_left_out(dtype):
    weight = torch.tensor([[1e-30, 0.0, -0.5, -0.0, 2.0], [0.0, 0.0, 0.0, -1.0, 0.0]], dtype=dtype)
    assert concepts_per_class(weight).tolist() == [2, 0]  # 1e-30 counts; 0.0, -0.0 and -0.5 do not
    assert concepts_per_class(weight, PAPER_WEIGHT_THRESHOLD).tolist() == [1, 0]
    # float32(0.1) is slightly above 0.1: compared in float64, as the metrics compare, it counts.
    assert concepts_per_class(torch.tensor([[0.1, 0.2]]), 0.1).tolist() == [2]
    assert concepts_per_class(torch.tensor([[0.1, 0.2]], dtype=torch.float64), 0.1).tolist() == [1]
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        concepts_per_class(weight, -0.1)


def test_concepts_for_95_percent_of_the_weight_by_hand():
    weight = torch.tensor(
        [
            [5.0, 3.0, 1.0, 1.0, 0.0],  # total 10, target 9.5; cumulative 5, 8, 9, 10 → 4
            [0.2, 9.6, 0.2, 0.0, -3.0],  # sorted 9.6, 0.2, 0.2: 9.6 ≥ 9.5 → 1 (the negative weight is ReLU'd away)
            [95.0, 5.0, 0.0, 0.0, 0.0],  # target 95: reached exactly by the first → 1 (≥, not >)
            [0.0, 0.0, -1.0, 0.0, 0.0],  # no positive weight → 0
        ],
        dtype=torch.float64,
    )
    assert concepts_for_weight_mass(weight).tolist() == [4, 1, 1, 0]
    assert concepts_for_weight_mass(weight, mass=0.5).tolist() == [1, 1, 1, 0]
    assert torch.equal(concepts_for_weight_mass(weight, mass=1.0), concepts_per_class(weight))
    summary = ConceptsPerClass.from_weight(weight)
    assert (summary.mass95_mean, summary.mass95_max) == (1.5, 4)
    # 4, 3, 2 and 0 by both counts (every positive weight here is above 0.1)
    assert (summary.nonzero_mean, summary.nonzero_max, summary.paper_mean, summary.paper_max) == (2.25, 4, 2.25, 4)
    for mass in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"mass must be in \(0, 1\]"):
            concepts_for_weight_mass(weight, mass)
    with pytest.raises(ValueError, match="at least one concept"):
        concepts_per_class(torch.zeros(3, 0))


# A head result as training_summary.json held it before the scale-invariant counts (only the paper's count).
OLD_SUMMARY = """{
  "dataset": {"name": "animal-mnist", "classes": ["bear", "bird"], "train_size": 8000, "test_size": 2000,
              "image_size": 128, "feature_map": [1280, 4, 4], "test_split": "the dataset's test split"},
  "phases": {
    "probe": {"type": "ProbeResult", "seconds": 1.0, "head": "linear_probe", "accuracy": 0.978},
    "sparsify": {"type": "HeadResult", "seconds": 5.2, "accuracy": 0.9625, "num_concepts": 100,
                 "concepts_per_class": {"mean": 9.800000190734863, "max": 10, "threshold": 0.1},
                 "epochs": 100, "concepts_removed": 156}
  },
  "feature_extraction_s": 40.0, "total_s": 100.0, "processes": 1, "arguments": {}, "versions": {}
}"""


def test_an_old_summary_without_the_scale_invariant_counts_still_loads():
    from protoquant_hf.cli import format_summary

    summary = TrainingSummary.from_json(OLD_SUMMARY)
    per_class = summary.concepts_per_class
    assert per_class == ConceptsPerClass(paper_mean=9.800000190734863, paper_max=10, paper_threshold=0.1)
    assert per_class.nonzero_mean is None and per_class.mass95_max is None  # not measured then: not invented
    assert [figure[0] for figure in per_class.figures()] == ["paper_concepts_per_class"]
    table = format_summary(summary, "out")
    assert "concepts per class, the paper's count (ReLU(W) > 0.1)  mean 9.8, max 10" in table
    assert "non-zero" not in table
    assert TrainingSummary.from_json(summary.to_json()) == summary  # saved again under the new keys


def test_the_cli_table_leads_with_the_non_zero_count():
    from protoquant_hf.cli import format_summary

    summary = TrainingSummary(
        dataset=DatasetInfo(name="d", classes=["a", "b"], train_size=10, test_size=4, image_size=32, feature_map=[16, 2, 2]),
        phases={"sparsify": HeadResult(accuracy=0.81, num_concepts=4, concepts_per_class=SPARSE_PER_CLASS, epochs=2)},
    )
    lines = format_summary(summary, "out").splitlines()
    rows = [line.split("  mean ")[0].strip() for line in lines if "concepts per class" in line]
    assert rows == ["concepts per class (non-zero weights)", "concepts per class holding 95 % of the weight",
                    "concepts per class, the paper's count (ReLU(W) > 0.1)"]
    assert "mean 2.0, max 2" in lines[[i for i, line in enumerate(lines) if "non-zero" in line][0]]
    assert any("95 %" in line and "mean 1.5, max 2" in line for line in lines)
