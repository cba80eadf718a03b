"""protoquant_hf.metrics: hand-computed oracle fixtures, a real tiny model, the offline evaluate modules."""

import sys
from pathlib import Path

import evaluate
import pytest
import torch
from sklearn.metrics import accuracy_score
from test_concepts import tiny_model

from protoquant_hf.metrics import (
    ExplanationSize,
    TopKPoint,
    accuracy,
    accuracy_vs_top_k,
    anz,
    available_metrics,
    evaluate_module_path,
    explanation_size,
    global_size,
    load_metric,
    local_size,
    local_size_summary,
    nonzero_size,
    pipnet_presence,
    sim_anz_cc,
    sparsity_ratio,
    weight_mass_size,
)

# --- the oracle: C = 2 classes, K = 3 concepts, N = 3 images, in float64 so that the ties below are exact ---
#
#   W = [[ 0.001, 0.6, 0.1 ],      ReLU(W) = [[0.001, 0.6, 0.1],
#        [-0.5,   0.4, 0.3 ]]                 [0,     0.4, 0.3]]
#
# non-zero size (ReLU(W) > 0):   class 0 → {0.001, 0.6, 0.1} = 3, class 1 → {0.4, 0.3} = 2 (ReLU(−0.5) = 0)
# 95 % of the weight:            class 0: 0.95 × 0.701 = 0.666, cumulative 0.6, 0.7 → 2; class 1: 0.665; 0.4, 0.7 → 2
# the paper's local size (> 0.1): class 0 → {0.6} = 1 (0.1 is a tie, not counted), class 1 → {0.4, 0.3} = 2
# global size (> 1e-3):          concept 0 peaks at 0.001 (a tie) → not counted; concepts 1, 2 → 2
# sparsity (ReLU(W) ≤ 1e-3):     0.001 (tie, counted) and ReLU(-0.5) = 0 → 2 of 6 = 1/3
#
#   s = [[0.9,    0.002, 0.5  ],   logits s · ReLU(W)ᵀ:
#        [0.0005, 0.2,   0.8  ],     image 0: 0.0009 + 0.0012 + 0.05 = 0.0521  vs  0.0008 + 0.15 = 0.1508 → 1
#        [0.3,    0.7,   0.001]]     image 1: 0.0000005 + 0.12 + 0.08 = 0.2000005  vs  0.08 + 0.24 = 0.32 → 1
#                                    image 2: 0.0003 + 0.42 + 0.0001 = 0.4204  vs  0.28 + 0.0003 = 0.2803 → 0
#   (forgetting ReLU: image 0's class 1 gets 0.9 · −0.5 = −0.45 and image 0 flips to class 0)
#
# ANZ (s_k > 1e-3):              image 0 → 3, image 1 → 2 (0.0005 no), image 2 → 2 (0.001 is a tie) → 7/3
# SimANZCC (|s_k · ReLU(W)_ĉk| > 1e-3, predicted ĉ = [1, 1, 0]):
#                                image 0, row 1: [0, 0.0008, 0.15] → 1
#                                image 1, row 1: [0, 0.08, 0.24] → 2
#                                image 2, row 0: [0.0003, 0.42, 0.0001] → 1                        → 4/3
#   (the other class's row gives 2 + 2 + 1 = 5/3; forgetting ReLU counts |0.9 · −0.5| too: 5/3)
#
# top-k curve, labels [1, 1, 0] (full model: 3/3 correct):
#   k = 1: rows keep [0, 0.6, 0] and [0, 0.4, 0] → class 0 wins every image → [0, 0, 0]: 1/3;
#          non-zero sizes 1, 1 → 1.0
#          (masking the wrong axis, the top class per concept, keeps [0.001, 0.6, 0] and [0, 0, 0.3] → 3/3)
#   k = 2: rows keep [0, 0.6, 0.1] and [0, 0.4, 0.3] → [1, 1, 0]: 3/3; non-zero sizes 2, 2 → 2.0
#          (the paper's > 0.1 count: 1, 2 → 1.5)
#   k = 3: W unmasked → 3/3; non-zero sizes 3, 2 → 2.5 (the paper's: 1.5)
WEIGHT = torch.tensor([[0.001, 0.6, 0.1], [-0.5, 0.4, 0.3]], dtype=torch.float64)
SCORES = torch.tensor([[0.9, 0.002, 0.5], [0.0005, 0.2, 0.8], [0.3, 0.7, 0.001]], dtype=torch.float64)
LABELS = torch.tensor([1, 1, 0])
CURVE = [TopKPoint(1, 1 / 3, 1.0), TopKPoint(2, 1.0, 2.0), TopKPoint(3, 1.0, 2.5)]


def test_local_size_counts_strictly_above_threshold_per_class():
    assert local_size(WEIGHT).tolist() == [1, 2]
    assert local_size(WEIGHT, threshold=0.05).tolist() == [2, 2]  # the 0.1 entry counts once below it
    summary = local_size_summary(WEIGHT)
    assert (summary.mean, summary.min, summary.max) == (1.5, 1, 2)


def test_the_headline_sizes_count_non_zero_weights_and_95_percent_of_the_weight():
    assert nonzero_size(WEIGHT).tolist() == [3, 2]
    assert weight_mass_size(WEIGHT).tolist() == [2, 2]
    assert weight_mass_size(WEIGHT, mass=0.5).tolist() == [1, 1]  # 0.6 ≥ 0.3505; 0.4 ≥ 0.35


def test_explanation_size_headline_ignores_the_scale_of_w_the_papers_local_size_does_not():
    full = explanation_size(SCORES, WEIGHT, LABELS).to_dict()
    headline = [f"{name}_size_{stat}" for name in ("nonzero", "mass95") for stat in ("mean", "min", "max")]
    for scale in (1e-2, 7.0, 200.0):
        scaled = explanation_size(SCORES, WEIGHT * scale, LABELS).to_dict()
        assert scaled["accuracy"] == full["accuracy"]  # the same classifier
        assert {key: scaled[key] for key in headline} == {key: full[key] for key in headline}
    assert explanation_size(SCORES, WEIGHT * 1e-2).local_size_mean == 0.0  # the paper's count: anything wanted
    assert explanation_size(SCORES, WEIGHT * 200.0).local_size_mean == 2.5  # = the non-zero size


def test_global_size_and_sparsity_ratio():
    assert global_size(WEIGHT) == 2
    assert global_size(WEIGHT, threshold=0.0) == 3  # concept 0's 0.001 is then used
    assert sparsity_ratio(WEIGHT) == pytest.approx(1 / 3)
    assert sparsity_ratio(WEIGHT, threshold=0.0) == pytest.approx(1 / 6)  # only ReLU(−0.5) = 0 left


def test_anz_counts_concepts_present_per_image():
    assert anz(SCORES) == pytest.approx(7 / 3)
    assert anz(SCORES, threshold=0.3) == pytest.approx(4 / 3)  # 0.9, 0.5 | 0.8 | 0.7 (0.3 is a tie)


def test_sim_anz_cc_uses_the_predicted_class_row_after_relu():
    assert sim_anz_cc(SCORES, WEIGHT) == pytest.approx(4 / 3)
    # Explaining class 0 for every image: rows 0 → 2 (0.0009 no; 0.0012, 0.05) + 2 + 1.
    assert sim_anz_cc(SCORES, WEIGHT, predictions=torch.tensor([0, 0, 0])) == pytest.approx(5 / 3)


def test_accuracy_top_k_on_hand_logits():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    labels = torch.tensor([1, 1, 0, 0])
    # top-1 hits images 0, 3; top-2 adds image 1 ({0, 1}); image 2's label is its lowest logit.
    assert accuracy(logits, labels) == 0.5
    assert accuracy(logits, labels, top_k=2) == 0.75
    assert accuracy(logits, labels, top_k=3) == 1.0
    assert accuracy(logits.argmax(dim=1), labels) == 0.5  # predicted class ids
    assert accuracy(SCORES @ WEIGHT.relu().t(), LABELS) == 1.0


def test_accuracy_vs_top_k_masks_each_class_row():
    assert accuracy_vs_top_k(SCORES, WEIGHT, LABELS, [1, 2, 3]) == pytest.approx(CURVE)
    paper = accuracy_vs_top_k(SCORES, WEIGHT, LABELS, [1, 2, 3], threshold=0.1)
    assert [point.mean_concepts_per_class for point in paper] == [1.0, 1.5, 1.5]
    assert [point.k for point in accuracy_vs_top_k(SCORES, WEIGHT, LABELS, [3, 1])] == [3, 1]


def test_pipnet_presence_floors_scores_below_point_one():
    scores = torch.tensor([[0.05, 0.1, 0.5], [0.099, 0.2, 0.0]], dtype=torch.float64)
    assert pipnet_presence(scores).tolist() == [[0.0, 0.1, 0.5], [0.0, 0.2, 0.0]]  # 0.1 itself stays
    assert scores[0, 0] == 0.05  # a new tensor: the input is untouched
    assert pipnet_presence(scores.half()).dtype == torch.float16


def test_explanation_size_gathers_everything():
    summary = explanation_size(SCORES, WEIGHT, LABELS, ks=[1, 2, 3])
    assert isinstance(summary, ExplanationSize)
    assert summary.to_dict() == pytest.approx(
        {
            "num_images": 3, "num_classes": 2, "num_concepts": 3, "accuracy": 1.0,
            "nonzero_size_mean": 2.5, "nonzero_size_min": 2, "nonzero_size_max": 3,
            "mass95_size_mean": 2.0, "mass95_size_min": 2, "mass95_size_max": 2,
            "local_size_mean": 1.5, "local_size_min": 1, "local_size_max": 2,
            "global_size": 2, "sparsity_ratio": 1 / 3, "anz": 7 / 3, "sim_anz_cc": 4 / 3,
            "top_k_curve": [point._asdict() for point in CURVE],
        }
    )
    unlabelled = explanation_size(SCORES, WEIGHT)
    assert unlabelled.accuracy is None and unlabelled.top_k_curve == []


def test_no_function_mutates_its_inputs():
    weight = torch.nn.Parameter(WEIGHT.clone())
    scores, labels = SCORES.clone(), LABELS.clone()
    explanation_size(scores, weight, labels, ks=[1, 2])
    accuracy_vs_top_k(scores, weight, labels, [1])
    sim_anz_cc(scores, weight, predictions=labels)
    pipnet_presence(scores)
    assert torch.equal(weight.detach(), WEIGHT) and torch.equal(scores, SCORES) and torch.equal(labels, LABELS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dtypes_give_the_same_counts(dtype):
    # Values that float16 represents exactly, so every dtype holds the same numbers.
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(20, 6, generator=generator).half() ** 3
    weight = (torch.randn(4, 6, generator=generator) * 0.2).half()
    labels = torch.randint(0, 4, (20,), generator=generator)
    expected = explanation_size(scores.double(), weight.double(), labels, ks=[1, 3, 6]).to_dict()
    assert explanation_size(scores.to(dtype), weight.to(dtype), labels, ks=[1, 3, 6]).to_dict() == expected


@torch.no_grad()
def test_top_k_at_k_equal_to_num_concepts_is_the_model_accuracy():
    model = tiny_model(num_concepts=5, num_labels=3)
    model.classifier.weight[0, :2] = -1.0  # negative weights are masked by top-k and by the model's ReLU alike
    concept_scores = model(feature_maps=torch.randn(16, 16, 3, 2)).concept_scores
    logits = model(concept_scores=concept_scores).logits
    labels = logits.argmax(dim=1)
    labels[::3] = (labels[::3] + 1) % 3  # some wrong, so the accuracy is neither 0 nor 1
    full = accuracy(logits, labels)
    assert 0 < full < 1
    (point,) = accuracy_vs_top_k(concept_scores, model.classifier.weight, labels, [5])
    assert point.accuracy == full
    assert explanation_size(concept_scores, model.classifier.weight, labels).accuracy == full


# --- the offline evaluate modules ---


@pytest.fixture(scope="module")
def metric_cache(tmp_path_factory):
    """Keep evaluate's copies of the module scripts and its arrow files out of the user's caches."""
    cache = tmp_path_factory.mktemp("evaluate")
    if "evaluate_modules" in sys.modules:  # this process already imports evaluate's modules from another cache
        yield cache
        return
    previous = evaluate.config.HF_MODULES_CACHE
    evaluate.config.HF_MODULES_CACHE = cache / "modules"
    yield cache
    evaluate.config.HF_MODULES_CACHE = previous
    # Forget the temporary package, so that a later evaluate.load imports from the user's cache again.
    for name in [name for name in sys.modules if name.split(".")[0] == "evaluate_modules"]:
        del sys.modules[name]
    if str(cache / "modules") in sys.path:
        sys.path.remove(str(cache / "modules"))


def test_module_paths_are_the_shipped_folders():
    assert {"accuracy", "explanation_size"} <= set(available_metrics())
    folder = Path(evaluate_module_path("accuracy"))
    assert (folder / "accuracy.py").is_file() and folder.parent.name == "evaluate_modules"
    with pytest.raises(ValueError, match=r"Unknown metric 'acc'; the shipped metrics are: accuracy, .*explanation_size"):
        load_metric("acc")


def test_accuracy_module_matches_the_function_and_the_hub_definition(metric_cache):
    metric = load_metric("accuracy", cache_dir=str(metric_cache))
    assert metric.name == "accuracy"
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    labels = [1, 1, 0, 0]
    predictions = logits.argmax(dim=1).tolist()
    result = metric.compute(predictions=predictions, references=labels)
    # The Hub module returns sklearn's accuracy_score of the class ids.
    assert result == {"accuracy": accuracy(logits, torch.tensor(labels))}
    assert result == {"accuracy": accuracy_score(labels, predictions)}
    assert metric.compute(predictions=logits.tolist(), references=labels, top_k=2) == {"accuracy": 0.75}


def test_explanation_size_module_returns_what_the_function_returns(metric_cache):
    metric = load_metric("explanation_size", cache_dir=str(metric_cache))
    assert metric.name == "explanation_size"
    expected = explanation_size(SCORES, WEIGHT, LABELS, ks=[1, 2, 3]).to_dict()
    result = metric.compute(concept_scores=SCORES.tolist(), references=LABELS.tolist(), weight=WEIGHT, ks=[1, 2, 3])
    assert result == expected
    assert (result["nonzero_size_mean"], result["mass95_size_mean"], result["local_size_mean"]) == (2.5, 2.0, 1.5)
    # Streamed in batches of tensors, with the model's float32 parameter as the weight.
    scores, weight = SCORES.float(), torch.nn.Parameter(WEIGHT.float())
    metric.add_batch(concept_scores=scores[:2], references=LABELS[:2])
    metric.add_batch(concept_scores=scores[2:], references=LABELS[2:])
    assert metric.compute(weight=weight) == explanation_size(scores, weight, LABELS).to_dict()
    # Without references: no accuracy.
    assert metric.compute(concept_scores=SCORES, weight=WEIGHT) == explanation_size(SCORES, WEIGHT).to_dict()


def test_explanation_size_module_rejects_partial_references_and_a_missing_weight(metric_cache):
    metric = load_metric("explanation_size", cache_dir=str(metric_cache))
    metric.add_batch(concept_scores=SCORES[:2], references=LABELS[:2])
    metric.add_batch(concept_scores=SCORES[2:])
    with pytest.raises(ValueError, match="references for every image or for none"):
        metric.compute(weight=WEIGHT)
    with pytest.raises(ValueError, match=r"weight=model\.classifier\.weight"):
        metric.compute(concept_scores=SCORES)


# --- bad input: one clear ValueError before any work ---


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: explanation_size(SCORES[:, :0], WEIGHT[:, :0]), "the model has no concepts left"),
        (lambda: local_size(torch.zeros(2, 0)), r"weight has shape \(2, 0\): the model has no concepts left"),
        (lambda: global_size(torch.zeros(3)), r"weight must be the \(num_classes, num_concepts\)"),
        (lambda: sim_anz_cc(SCORES, torch.ones(2, 4)),
         r"concept_scores has shape \(3, 3\) and weight has shape \(2, 4\)"),
        (lambda: anz(torch.empty(0, 3)), "concept_scores is empty"),
        (lambda: anz(torch.ones(3, 3, dtype=torch.long)), "concept_scores must be floating point"),
        (lambda: explanation_size(SCORES, WEIGHT, torch.tensor([0, 2, 1])),
         r"labels must be class indices in \[0, 1\]; got values from 0 to 2"),
        (lambda: explanation_size(SCORES, WEIGHT, torch.tensor([0, 1])), r"labels must have shape \(3,\)"),
        (lambda: explanation_size(SCORES, WEIGHT, ks=[1]), "top-k curve .* needs labels"),
        (lambda: sim_anz_cc(SCORES, WEIGHT, predictions=torch.tensor([0, 1, -1])),
         r"predictions must be class indices in \[0, 1\]"),
        (lambda: accuracy_vs_top_k(SCORES, WEIGHT, LABELS, [0]), r"k must be an integer in \[1, 3\].*got \[0\]"),
        (lambda: accuracy_vs_top_k(SCORES, WEIGHT, LABELS, [1, 4]), r"k must be an integer in \[1, 3\].*got \[4\]"),
        (lambda: accuracy_vs_top_k(SCORES, WEIGHT, LABELS, []), "ks is empty"),
        (lambda: accuracy(SCORES, LABELS, top_k=4), r"top_k must be in \[1, 3\]"),
        (lambda: accuracy(torch.empty(0, 3), torch.empty(0, dtype=torch.long)), "logits must be non-empty"),
        (lambda: accuracy(torch.tensor([0, 1, 1]), LABELS, top_k=2), "predicted class indices give top-1 only"),
        (lambda: accuracy(SCORES, LABELS.double()), "labels must be integer class indices"),
        (lambda: local_size(WEIGHT, threshold=-0.1), "threshold must be >= 0"),
    ],
)
def test_bad_input_raises_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
