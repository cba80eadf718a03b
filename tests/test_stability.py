"""Stability (method §7.4) and purity (§7.3) metrics against oracles: formulas on hand numbers, a stub model whose
activation maps are set by hand (so every score is known in advance), and a tiny random ProtoQuant model for the
real model contract (gradients through a backbone, frozen weights, train/eval modes)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_backbones import tiny_backbone_config
from torch import nn

from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification
from protoquant_hf.explanation_protoquant import percentile_box, upsample_map
from protoquant_hf.metrics.purity import centre_trim, part_purity
from protoquant_hf.metrics.stability import (
    consistency,
    masked_pgd,
    noise_stability,
    pac,
    plc,
    prc,
    scaled_to_input,
    spatial_misalignment,
)

SIDE, GRID, CELL = 224, 7, 32  # the protocols' 224 px, a 7x7 map: PIP-Net's 32-px boxes are exactly the cells


def tiny_model(seed=0) -> ProtoQuantForImageClassification:
    """A random tiny ProtoQuant classifier (tests/test_explain.py's recipe): 32 px in, a 4x4 map, 6 concepts."""
    backbone_config, size = tiny_backbone_config("resnet")
    torch.manual_seed(seed)
    labels = {0: "a", 1: "b", 2: "c"}
    config = ProtoQuantConfig(backbone_config=backbone_config, num_concepts=6, image_size=size, id2label=labels)
    return ProtoQuantForImageClassification(config).eval()


class TableModel(nn.Module):
    """A stub with exactly the metrics' contract, whose answers are set by hand.

    Image i carries its index in channel 1 of its pixels and gets the maps `maps[i]` `(K, h, w)`, or `noisy_maps[i]`
    once channel 0 is no longer flat (noise was added), plus `shift[i, k]` · mean(channel 0) on every cell of
    concept k: a differentiable term on which the effect of PGD is known exactly. Logits: spatial max · ReLU(W)ᵀ.
    """

    def __init__(self, maps, weight, noisy_maps=None, shift=None):
        super().__init__()
        self.register_buffer("maps", maps)
        self.register_buffer("noisy_maps", maps if noisy_maps is None else noisy_maps)
        self.register_buffer("shift", torch.zeros(maps.shape[:2]) if shift is None else shift)
        self.classifier = nn.Linear(maps.shape[1], len(weight), bias=False)
        self.classifier.weight.data.copy_(weight)

    def forward(self, pixel_values, output_activation_maps=False):
        image = pixel_values[:, 1].mean(dim=(1, 2)).round().long()
        noisy = pixel_values[:, 0].flatten(1).std(dim=1) > 1e-3
        maps = torch.where(noisy[:, None, None, None], self.noisy_maps[image], self.maps[image])
        maps = maps + self.shift[image][:, :, None, None] * pixel_values[:, 0].mean(dim=(1, 2))[:, None, None, None]
        scores = maps.amax(dim=(-2, -1))
        return SimpleNamespace(logits=scores @ F.relu(self.classifier.weight).t(), concept_scores=scores,
                               activation_maps=maps if output_activation_maps else None)


def peaked_maps(peaks) -> torch.Tensor:
    """`(I, K, 7, 7)` maps, 0.1 everywhere but `score` at `cell`, from peaks[i][k] = (cell, score)."""
    maps = torch.full((len(peaks), len(peaks[0]), GRID, GRID), 0.1)
    for image, concepts in enumerate(peaks):
        for concept, ((row, col), score) in enumerate(concepts):
            maps[image, concept, row, col] = score
    return maps


def table_pixels(count: int) -> torch.Tensor:
    pixels = torch.zeros(count, 3, SIDE, SIDE)
    pixels[:, 1] = torch.arange(count, dtype=torch.float32)[:, None, None]
    return pixels


def at(cell) -> list[float]:
    """The keypoint [x, y] at the centre of a map cell."""
    row, col = cell
    return [col * CELL + CELL / 2, row * CELL + CELL / 2]


# ---- protocol (A): formulas, PGD, the benchmark -----------------------------------------------------------------


def test_misalignment_formulas_by_hand():
    np.testing.assert_allclose(pac([0.8, 0.5, 0.4], [0.2, 0.5, 0.5]), [75.0, 0.0, -25.0])
    scores_before = np.array([[0.9, 0.7, 0.8, 0.3], [0.5, 0.6, 0.1, 0.1]])
    scores_after = np.array([[0.5, 0.7, 0.8, 0.6], [0.4, 0.6, 0.1, 0.45]])
    foreign = np.array([[False, True, False, True], [False, True, False, True]])
    # Image 0: concepts 1 and 3 (foreign) now beat the target, concept 2 does too but is the class's own.
    # Image 1: concept 1 already did before.
    assert prc(scores_before, scores_after, np.array([0, 0]), foreign).tolist() == [2, 1]
    before = np.arange(100, dtype=np.float64).reshape(1, 10, 10)  # top 10 %: the last row
    after = before.copy()
    after[0, 9, 5:], after[0, 0, :5] = before[0, 0, :5], before[0, 9, 5:]  # half the top moves to the first row
    flat = np.zeros((1, 10, 10))
    assert plc(before, after)[0] == pytest.approx(100 * (1 - 5 / 15))
    assert plc(before, before)[0] == 0 and plc(flat, flat)[0] == 0 and plc(before, flat)[0] == 100
    assert scaled_to_input(10, (112, 448)) == (5, 20) and scaled_to_input(72, (224, 224)) == (72, 72)


def test_masked_pgd_keeps_the_frozen_pixels_stays_in_the_ball_and_lowers_the_target():
    model = tiny_model().train()  # the metric must switch to eval and back, per module
    before_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    assert any(flags.values()) and not all(flags.values())  # W trainable, the backbone frozen: both kinds restored
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    allowed = torch.ones(4, 1, 32, 32, dtype=torch.bool)
    allowed[:, :, 8:20, 4:24] = False
    with torch.no_grad():
        maps = model.eval()(pixels, output_activation_maps=True).activation_maps
    model.train()
    targets = maps.amax(dim=(-2, -1)).argmax(dim=1)
    adversarial = masked_pgd(model, pixels, targets, allowed, epsilon=0.05, step_size=0.01, iterations=10)
    change = adversarial - pixels
    assert torch.equal(adversarial[:, :, 8:20, 4:24], pixels[:, :, 8:20, 4:24])
    # Projected each step: 10 steps of 0.01 would reach 0.1; the ball stops them at 0.05.
    assert change.abs().max() <= 0.05 + 1e-6 and change.abs().max() >= 0.05 - 1e-6
    with torch.no_grad():
        after = model.eval()(adversarial, output_activation_maps=True).activation_maps
    rows = torch.arange(4)
    assert (after[rows, targets].amax(dim=(-2, -1)) < maps[rows, targets].amax(dim=(-2, -1))).all()
    model.train()
    masked_pgd(model, pixels, targets, allowed, iterations=2)
    assert model.training and not model.protoquant.backbone.training  # ProtoQuant keeps its backbone in eval
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before_state[name]), name
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == flags[name] and parameter.grad is None, name


def test_spatial_misalignment_matches_the_predicted_attack():
    # Class 0 owns concepts 0, 1; class 1 owns 2, 3. The attack can lower only concept 0 in image 0 (shift 1) and
    # concept 3 in image 1 (shift 0.5): PGD drives channel 0 to −ε on every allowed pixel, so a target drops by
    # shift · ε · (allowed share of the image), and nothing else moves.
    maps = peaked_maps([
        [((3, 3), 0.9), ((1, 1), 0.6), ((5, 1), 0.7), ((1, 5), 0.3)],   # label 0: target 0
        [((5, 5), 0.2), ((2, 2), 0.85), ((4, 0), 0.1), ((0, 6), 0.95)],  # label 1: target 3
    ])
    weight = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    shift = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0.5]])
    result = spatial_misalignment(TableModel(maps, weight, shift=shift), table_pixels(2), torch.tensor([0, 1]), batch_size=1)
    assert result.target_concepts.tolist() == [0, 3]
    expected_pac, expected_after = [], []
    for image, (concept, drop) in enumerate(((0, 1.0), (3, 0.5))):
        left, top, right, bottom = percentile_box(upsample_map(maps[image, concept].numpy(), (SIDE, SIDE), mode="bicubic"))
        box = (max(left - 10, 0), max(top - 10, 0), min(right + 10, SIDE), min(bottom + 10, SIDE))
        assert tuple(result.boxes[image]) == box
        allowed_share = 1 - (box[2] - box[0]) * (box[3] - box[1]) / SIDE**2
        activation = float(maps[image, concept].max())
        expected_after.append(activation - drop * 0.4 * allowed_share)
        expected_pac.append(100 * drop * 0.4 * allowed_share / activation)
    np.testing.assert_allclose(result.activation_after, expected_after, atol=1e-5)
    np.testing.assert_allclose(result.pac, expected_pac, atol=1e-3)
    # Image 0: foreign concept 2 (0.7) now beats the target (≈ 0.52), class concept 1 is not counted; image 1:
    # foreign concept 1 (0.85) beats it (≈ 0.76). Only image 0 loses its class (logit 0.82 < 1.0).
    assert result.prc.tolist() == [1, 1] and result.mean_prc == 1
    assert result.correct_before.tolist() == [True, True] and result.correct_after.tolist() == [False, True]
    assert (result.accuracy_before, result.accuracy_after, result.ac) == (100, 50, 50)
    assert result.plc.tolist() == [0, 0]  # a uniform shift moves no region
    assert result.mean_pac == pytest.approx(np.mean(expected_pac), abs=1e-3)
    assert result.settings["box_margin_pixels"] == (10, 10) and result.seconds > 0
    json.dumps(result.to_dict())


# ---- protocol (B): noise stability and consistency -------------------------------------------------------------


def test_noise_stability_scores_the_pairs_that_move():
    # top-1 concept per class: class 0 → concept 0, class 1 → concept 1. Under noise, image 3 (class 1) moves its
    # concept's peak off part 0; image 4 (class 0) keeps the peak but concept 2 overtakes its concept in presence.
    clean = [[((3, 3), 0.9), ((6, 0), 0.2), ((0, 6), 0.2)]] * 3 + [
        [((6, 6), 0.2), ((1, 1), 0.9), ((0, 6), 0.2)],
        [((3, 3), 0.9), ((6, 0), 0.2), ((0, 6), 0.5)],
    ]
    noisy = clean[:3] + [
        [((6, 6), 0.2), ((5, 5), 0.9), ((0, 6), 0.2)],
        [((3, 3), 0.9), ((6, 0), 0.2), ((0, 6), 0.95)],
    ]
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    model = TableModel(peaked_maps(clean), weight, noisy_maps=peaked_maps(noisy))
    parts = [[{"part": 0, "keypoint": at(cell)}] for cell in [(3, 3)] * 3 + [(1, 1), (3, 3)]]
    labels = torch.tensor([0, 0, 0, 1, 0])
    result = noise_stability(model, table_pixels(5), labels, top_k=1, parts=parts, num_parts=1, batch_size=2)
    assert result.location_unchanged.tolist() == [True, True, True, False, True]
    assert result.identity_unchanged.tolist() == [True, True, True, True, False]
    assert (result.location_stability, result.identity_stability) == (80, 80)
    # Per class first (Huang et al.): class 0 keeps all 4 part vectors, class 1 none → 50, not the pooled 80.
    assert result.part_stability == 50
    without_noise = noise_stability(model, table_pixels(5), labels, std=0.0, top_k=1, parts=parts, num_parts=1)
    assert (without_noise.location_stability, without_noise.identity_stability, without_noise.part_stability) == (100, 100, 100)
    json.dumps(result.to_dict())


def test_noise_stability_on_protoquant_is_exact_without_noise_and_seeded():
    model = tiny_model()
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    rng = np.random.default_rng(0)
    parts = [[{"part": j, "keypoint": rng.uniform(0, 32, 2).tolist()} for j in range(3)] for _ in range(6)]
    still = noise_stability(model, pixels, labels, std=0.0, top_k=3, parts=parts, num_parts=3)
    assert len(still.concepts) == 18
    assert (still.location_stability, still.identity_stability, still.part_stability) == (100, 100, 100)
    shaken = noise_stability(model, pixels, labels, std=2.0, top_k=3, batch_size=4)
    assert shaken.location_stability < 100 and shaken.part_stability is None
    again = noise_stability(model, pixels, labels, std=2.0, top_k=3, batch_size=5)  # the same noise, whatever the batches
    assert np.array_equal(again.location_unchanged, shaken.location_unchanged)


def parts_fixture():
    """20 images, classes 0 (0–9) and 1 (10–19), 3 parts, 6 concepts, and where each concept fires.

    Parts sit three or more cells apart (outside each other's 72-px Huang box); part 2 is not visible in 14–19.
    Concept 0 fires on part 0 everywhere; 1 at random cells away from every part; 2 (3) on part 1 in 8 (7) of
    class 1's images and elsewhere in the rest; 4 (the third concept of both classes by W) on part 2 where class 1
    shows it and on part 0 where it does not; 5 has no class weight (not relevant) but fires on part 0 with the top
    score.
    """
    rng = np.random.default_rng(0)
    maps, parts = [], []
    for image in range(20):
        cells = {0: (image % 7, 0), 1: ((image + 3) % 7, 3), 2: (image % 7, 6)}
        elsewhere = ((image + 3) % 7, 6)
        free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in cells.values()]
        class_one = image >= 10
        peaks = [
            (cells[0], 0.9),
            (free[rng.integers(len(free))], 0.9),
            (cells[1] if 10 <= image < 18 else elsewhere, 0.9) if class_one else (cells[1], 0.2),
            (cells[1] if 10 <= image < 17 else elsewhere, 0.9) if class_one else (elsewhere, 0.2),
            (cells[2] if image < 14 else cells[0], 0.95) if class_one else (elsewhere, 0.3),
            (cells[0], 0.99),
        ]
        maps.append(peaks)
        parts.append([{"part": j, "keypoint": at(cell)} for j, cell in cells.items() if j != 2 or image < 14])
    weight = torch.tensor([[1.0, 0.9, 0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.9, 0.4, 0.0]])
    labels = torch.tensor([0] * 10 + [1] * 10)
    return TableModel(peaked_maps(maps), weight), table_pixels(20), labels, parts


def test_consistency_of_concepts_that_do_and_do_not_track_a_part():
    model, pixels, labels, parts = parts_fixture()
    result = consistency(model, pixels, labels, parts, num_parts=3, top_k=2, batch_size=7)
    # top-2 by W: class 0 → concepts 0, 1 (not 4, its third), class 1 → 2, 3.
    assert result.classes.tolist() == [0, 0, 1, 1] and result.concepts.tolist() == [0, 1, 2, 3]
    assert result.consistent.tolist() == [True, False, True, False] and result.consistency == 50
    assert result.best_part[[0, 2, 3]].tolist() == [0, 1, 1]
    np.testing.assert_allclose(result.best_ratio[[0, 2, 3]], [1.0, 0.8, 0.7])  # 0.8 is consistent: ≥ threshold
    assert result.best_ratio[1] < 0.5
    # Class 1 shows part 2 in 4 images, and concept 4 has it in its box in all 4: the denominator is per part.
    # Classes have only 3 concepts with W > 0, so top_k=4 gives 3 each.
    result = consistency(model, pixels, labels, parts, num_parts=3, top_k=4)
    assert result.classes.tolist() == [0, 0, 0, 1, 1, 1] and result.concepts.tolist() == [0, 1, 4, 2, 3, 4]
    assert result.consistent.tolist() == [True, False, False, True, False, True]
    np.testing.assert_allclose(result.ratios[5], [0.6, 0.0, 1.0])


def test_part_purity_follows_the_pipnet_protocol():
    model, pixels, _, parts = parts_fixture()
    result = part_purity(model, pixels, parts, num_parts=3, batch_size=6)
    assert result.concepts.tolist() == [0, 1, 2, 3, 4] and result.num_concepts == 5  # concept 5 has no weight
    # The top 10 images of concepts 2–4 are class 1's (the class 0 images score lower, some of them on a part).
    assert sorted(result.top_images[2].tolist()) == list(range(10, 20))
    np.testing.assert_allclose(result.purity, [1.0, 0.0, 0.8, 0.7, 1.0])
    # Concept 4: part 2 in all 4 of its images that show part 2 (purest), part 0 in 6 of 10 (most often present).
    assert result.purest_part.tolist()[2:] == [1, 1, 2] and result.frequent_part[4] == 0
    np.testing.assert_allclose(result.frequent_part_purity, [1.0, 0.0, 0.8, 0.7, 0.6])
    assert result.hits[4].tolist() == [6, 0, 4] and result.visible[4].tolist() == [10, 10, 4]
    assert result.mean_purity == pytest.approx(0.7) and result.std_purity == pytest.approx(np.std([1, 0, 0.8, 0.7, 1]))
    assert result.mean_frequent_part_purity == pytest.approx(0.62) and result.num_part_related == 4
    json.dumps(result.to_dict())


def test_purity_ties_prefer_the_part_with_more_hits_and_big_boxes_are_trimmed():
    # Both images fire in cell (2, 2), box (64, 64, 96, 96); part 0 is there in image 0 only (1 of 1), part 1 in
    # both (2 of 2), in image 1 near the cell's corner.
    maps = peaked_maps([[((2, 2), 0.9)], [((2, 2), 0.8)]])
    parts = [[{"part": 0, "keypoint": at((2, 2))}, {"part": 1, "keypoint": at((2, 2))}], [{"part": 1, "keypoint": [66.0, 66.0]}]]
    model = TableModel(maps, torch.ones(1, 1))
    result = part_purity(model, table_pixels(2), parts, num_parts=2)
    assert result.purity.tolist() == [1.0] and result.purest_part.tolist() == [1]
    trimmed = part_purity(model, table_pixels(2), parts, num_parts=2, patch_size=16)  # (72, 72, 88, 88): no corner
    assert trimmed.hits.tolist() == [[1, 1]] and trimmed.purest_part.tolist() == [0]
    assert centre_trim((0, 10, 48, 42), 32) == (8, 10, 40, 42)
    assert centre_trim((5, 5, 20, 20), 32) == (5, 5, 20, 20)


# ---- the model contract -------------------------------------------------------------------------------------------


class NoMapsClassifier(nn.Module):
    """A plain classifier: no `output_activation_maps` keyword, counts its forwards."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(3, 2)
        self.calls = 0

    def forward(self, pixel_values):
        self.calls += 1
        return SimpleNamespace(logits=self.classifier(pixel_values.mean(dim=(2, 3))))


class MapsOnRequestIgnored(NoMapsClassifier):
    """Accepts any keyword and returns no maps (a ProtoQuant forward without `output_activation_maps` looks so)."""

    def forward(self, pixel_values, **kwargs):
        return SimpleNamespace(logits=super().forward(pixel_values).logits, activation_maps=None)


@pytest.mark.parametrize("model_class", [NoMapsClassifier, MapsOnRequestIgnored])
@pytest.mark.parametrize("metric", ["pgd", "misalignment", "noise", "consistency", "purity"])
def test_a_model_without_activation_maps_is_refused_before_any_work(model_class, metric):
    model, pixels, labels = model_class(), torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    parts = [[{"part": 0, "keypoint": [1.0, 1.0]}]] * 4
    calls = {
        "pgd": lambda: masked_pgd(model, pixels, labels, torch.ones(4, 1, 32, 32, dtype=torch.bool)),
        "misalignment": lambda: spatial_misalignment(model, pixels, labels),
        "noise": lambda: noise_stability(model, pixels, labels),
        "consistency": lambda: consistency(model, pixels, labels, parts, num_parts=1),
        "purity": lambda: part_purity(model, pixels, parts, num_parts=1),
    }
    with pytest.raises(ValueError, match=f"{model_class.__name__} cannot return activation maps.*output_activation_maps=True"):
        calls[metric]()
    assert model.calls <= 1  # at most the one probe image
