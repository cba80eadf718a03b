"""Accuracy and explanation size of a ProtoQuant classifier, as pure functions of its tensors.

Everything here reads the presence scores s `(N, K)` (``outputs.concept_scores``) and the concept→class
weight W `(C, K)` (``model.classifier.weight``); logits are s · ReLU(W)ᵀ (method §3.7). Three families of
definitions coexist and are named after their source (method §7.2):

- **The headline, scale-invariant sizes** (this package): concepts per class with a non-zero weight
  (`nonzero_size`) and the fewest concepts holding 95 % of a class's weight (`weight_mass_size`). W and c·W
  (c > 0) make the same predictions, so a size that rescaling W changes is not a property of the classifier;
  these two are not changed by it. Both count with `protoquant_hf.concepts`, as training does.
- **ProtoQuant's own** (official code, ``analyze_local_size.py``): the paper's local size per class with
  ReLU(W) > 0.1 (`local_size`, a secondary figure: rescaling W moves it anywhere) and the top-k accuracy curve (§5.5).
- **PIP-Net benchmark** (official code, ``other_benchmarks/purity_benchmark/pipnet/test.py``): global size,
  sparsity ratio, ANZ and SimANZCC, all with the threshold 1e-3. That benchmark evaluates ProtoQuant through
  an adapter whose presence scores are floored (`pipnet_presence`).

Counts compare in float64 whatever the input dtype, so a threshold means the same number for float16,
float32 and float64 inputs (an entry stored as float32(0.1) is then slightly above 0.1). No function
modifies its inputs, and bad input raises one `ValueError` before any work.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..concepts.editing import top_k_mask
from ..concepts.stats import PAPER_WEIGHT_THRESHOLD, WEIGHT_MASS, concepts_for_weight_mass, concepts_per_class

PIPNET_THRESHOLD = 1e-3  # PIP-Net benchmark: global size, sparsity, ANZ, SimANZCC (method §7.2)
PIPNET_PRESENCE_FLOOR = 0.1  # PIP-Net adapter: presence scores below this are set to 0 (method §7.2)


# --- input checks: each returns the input as CPU float64 / int64 (the caller's own tensor when it already is one,
# so nothing below writes in place). Counting is cheap, and CPU float64 works for inputs on any device.


def _check_weight(weight) -> torch.Tensor:
    weight = torch.as_tensor(weight).detach()
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be the (num_classes, num_concepts) concept→class matrix; got shape {tuple(weight.shape)}."
        )
    if weight.shape[1] == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: the model has no concepts left.")
    if weight.shape[0] == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: the model has no classes.")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point; got dtype {weight.dtype}.")
    return weight.to("cpu", torch.float64)


def _check_scores(concept_scores, weight: torch.Tensor | None = None) -> torch.Tensor:
    concept_scores = torch.as_tensor(concept_scores).detach()
    if concept_scores.dim() in (1, 2) and concept_scores.shape[0] == 0:
        raise ValueError("concept_scores is empty: there are no images to evaluate.")
    if concept_scores.dim() != 2:
        raise ValueError(f"concept_scores must be (num_images, num_concepts); got shape {tuple(concept_scores.shape)}.")
    if concept_scores.shape[1] == 0:
        raise ValueError(f"concept_scores has shape {tuple(concept_scores.shape)}: the model has no concepts left.")
    if not concept_scores.is_floating_point():
        raise ValueError(f"concept_scores must be floating point; got dtype {concept_scores.dtype}.")
    if weight is not None and concept_scores.shape[1] != weight.shape[1]:
        raise ValueError(
            f"concept_scores has shape {tuple(concept_scores.shape)} and weight has shape {tuple(weight.shape)}: "
            "they must have the same number of concepts (their last dimension)."
        )
    return concept_scores.to("cpu", torch.float64)


def _check_class_indices(indices, name: str, num_images: int, num_classes: int | None) -> torch.Tensor:
    indices = torch.as_tensor(indices).detach()
    if indices.shape != (num_images,):
        raise ValueError(
            f"{name} must have shape ({num_images},), one class index per image; got shape {tuple(indices.shape)}."
        )
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices; got dtype {indices.dtype}.")
    if num_classes is not None and (indices.min() < 0 or indices.max() >= num_classes):
        raise ValueError(
            f"{name} must be class indices in [0, {num_classes - 1}]; got values from {int(indices.min())} to "
            f"{int(indices.max())}."
        )
    return indices.to("cpu", torch.long)


def _check_threshold(threshold: float) -> float:
    # A negative threshold would silently count every entry, zeros included.
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}.")
    return float(threshold)


def _check_ks(ks: Sequence[int], num_concepts: int) -> list[int]:
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty: give at least one k (concepts kept per class).")
    bad = [k for k in ks if not isinstance(k, numbers.Integral) or not 1 <= k <= num_concepts]
    if bad:
        raise ValueError(f"k must be an integer in [1, {num_concepts}] (the model's number of concepts); got {bad}.")
    return [int(k) for k in ks]


def _logits(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`(N, C)` s · ReLU(W)ᵀ, the model's head (method §3.7), on checked float64 tensors."""
    return scores @ F.relu(weight).t()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, top_k: int = 1) -> float:
    hits = (logits.topk(top_k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
    return float(hits.double().mean())


# --- accuracy ---


def accuracy(logits, labels, top_k: int = 1) -> float:
    """Fraction of images whose label is among the `top_k` highest logits (method §7.1 reports top-1 and top-5).

    Args:
        logits: `(N, C)` class scores, or `(N,)` predicted class indices (then only `top_k=1`).
        labels: `(N,)` class indices.
        top_k: how many of the highest-scoring classes may contain the label, in [1, C].

    Returns:
        The accuracy in [0, 1].
    """
    logits = torch.as_tensor(logits).detach()
    if logits.dim() not in (1, 2) or logits.shape[0] == 0:
        raise ValueError(
            f"logits must be non-empty, (num_images, num_classes) or (num_images,); got shape {tuple(logits.shape)}."
        )
    if logits.dim() == 1:
        predictions = _check_class_indices(logits, "predictions", logits.shape[0], None)
        if top_k != 1:
            raise ValueError(
                f"top_k={top_k} needs logits (num_images, num_classes); predicted class indices give top-1 only."
            )
        labels = _check_class_indices(labels, "labels", logits.shape[0], None)
        return float((predictions == labels).double().mean())
    num_classes = logits.shape[1]
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k must be in [1, {num_classes}] (the number of classes), got {top_k}.")
    labels = _check_class_indices(labels, "labels", logits.shape[0], num_classes)
    return _accuracy(logits.to("cpu", torch.float64), labels, top_k)


# --- sizes of the concept→class weights (the headline, ProtoQuant's own and PIP-Net's definitions) ---


@dataclass
class LocalSizeSummary:
    """A per-class size over classes (method §5.5: the class mean, plus min and max)."""

    mean: float
    min: int
    max: int

    @classmethod
    def from_sizes(cls, sizes: torch.Tensor) -> "LocalSizeSummary":
        return cls(mean=float(sizes.double().mean()), min=int(sizes.min()), max=int(sizes.max()))


def nonzero_size(weight) -> torch.Tensor:
    """`(C,)` per class, the number of concepts with a non-zero ReLU(W_ck): the headline size.

    Exact zeros only (after top-k sparsification, the concepts a class cannot use); scale-invariant.

    Args:
        weight: `(C, K)` concept→class weights (``model.classifier.weight``).
    """
    return concepts_per_class(_check_weight(weight))


def weight_mass_size(weight, mass: float = WEIGHT_MASS) -> torch.Tensor:
    """`(C,)` per class, the fewest concepts holding `mass` (95 %) of the class's total ReLU(W) weight.

    The size of a dense head, whose weights are rarely exactly 0; scale-invariant; 0 for a class with no positive
    weight. See `protoquant_hf.concepts.concepts_for_weight_mass`.

    Args:
        weight: `(C, K)` concept→class weights.
        mass: the share of the total weight to hold, in (0, 1].
    """
    return concepts_for_weight_mass(_check_weight(weight), mass)


def local_size(weight, threshold: float = PAPER_WEIGHT_THRESHOLD) -> torch.Tensor:
    """`(C,)` per class, the number of concepts with ReLU(W_ck) > threshold.

    ProtoQuant's own local size (official code, ``analyze_local_size.py``; method §5.5, §7.2), threshold 0.1: the
    paper's figure, kept for comparison with it. Not scale-invariant (c·W predicts the same and counts
    differently); `nonzero_size` is the headline.

    Args:
        weight: `(C, K)` concept→class weights (``model.classifier.weight``).
        threshold: strict lower bound on a weight that counts.
    """
    weight, threshold = _check_weight(weight), _check_threshold(threshold)
    return concepts_per_class(weight, threshold)


def local_size_summary(weight, threshold: float = PAPER_WEIGHT_THRESHOLD) -> LocalSizeSummary:
    """Mean, min and max over classes of `local_size(weight, threshold)` (the paper's local size by default)."""
    return LocalSizeSummary.from_sizes(local_size(weight, threshold))


def global_size(weight, threshold: float = PIPNET_THRESHOLD) -> int:
    """Number of concepts with ReLU(W_ck) > threshold for some class c.

    PIP-Net benchmark's global size (method §7.2), threshold 1e-3. ProtoQuant's own "unique prototypes
    used" is the same count with the local-size threshold 0.1.

    Args:
        weight: `(C, K)` concept→class weights.
        threshold: strict lower bound on a weight that counts.
    """
    weight, threshold = _check_weight(weight), _check_threshold(threshold)
    return int((F.relu(weight) > threshold).any(dim=0).sum())


def sparsity_ratio(weight, threshold: float = PIPNET_THRESHOLD) -> float:
    """Fraction of the C·K entries with ReLU(W_ck) ≤ threshold.

    PIP-Net benchmark's sparsity ratio (method §7.2), threshold 1e-3.

    Args:
        weight: `(C, K)` concept→class weights.
        threshold: largest weight that counts as zero (inclusive).
    """
    weight, threshold = _check_weight(weight), _check_threshold(threshold)
    return float((F.relu(weight) <= threshold).double().mean())


# --- sizes of the local explanations (PIP-Net's definitions) ---


def anz(concept_scores, threshold: float = PIPNET_THRESHOLD) -> float:
    """Mean over images of the number of concepts with s_k > threshold.

    PIP-Net benchmark's ANZ (method §7.2), threshold 1e-3. Under the PIP-Net protocol pass
    `pipnet_presence(concept_scores)`.

    Args:
        concept_scores: `(N, K)` presence scores s.
        threshold: strict lower bound on a score that counts.
    """
    scores, threshold = _check_scores(concept_scores), _check_threshold(threshold)
    return float((scores > threshold).sum(dim=1).double().mean())


def sim_anz_cc(concept_scores, weight, predictions=None, threshold: float = PIPNET_THRESHOLD) -> float:
    """Mean over images of the number of concepts with |s_k · ReLU(W)_ĉk| > threshold for the predicted class ĉ.

    PIP-Net benchmark's SimANZCC, its local explanation size (method §7.2), threshold 1e-3: how many
    concepts the explanation of the predicted class shows.

    Args:
        concept_scores: `(N, K)` presence scores s.
        weight: `(C, K)` concept→class weights.
        predictions: `(N,)` the class ĉ to explain per image; by default the argmax of s · ReLU(W)ᵀ.
        threshold: strict lower bound on a contribution that counts.
    """
    weight = _check_weight(weight)
    scores, threshold = _check_scores(concept_scores, weight), _check_threshold(threshold)
    if predictions is None:
        predictions = _logits(scores, weight).argmax(dim=1)
    else:
        predictions = _check_class_indices(predictions, "predictions", scores.shape[0], weight.shape[0])
    contributions = scores * F.relu(weight)[predictions]  # (N, K): the predicted class's row per image
    return float((contributions.abs() > threshold).sum(dim=1).double().mean())


def pipnet_presence(concept_scores, floor: float = PIPNET_PRESENCE_FLOOR) -> torch.Tensor:
    """`(N, K)` presence scores as the PIP-Net benchmark's adapter sees them: scores below `floor` set to 0.

    Use it to evaluate ANZ / SimANZCC under the PIP-Net protocol (method §7.2). That benchmark also shrinks
    every weight by 1e-3 and clamps at 0 **in place** before each test batch; this function (like every
    function here) never mutates its inputs, and it leaves the weights alone. Returns a new tensor in the
    input's dtype.

    Args:
        concept_scores: `(N, K)` presence scores s.
        floor: scores strictly below it become 0.
    """
    below = _check_scores(concept_scores) < floor  # compared in float64, like every threshold here
    concept_scores = torch.as_tensor(concept_scores)
    return concept_scores.masked_fill(below.to(concept_scores.device), 0.0)  # out of place: a new tensor


# --- the top-k curve (ProtoQuant's own, method §5.5) ---


class TopKPoint(NamedTuple):
    """One point of the top-k curve: k concepts kept per class, the accuracy, and the class mean of the concepts
    the masked W uses (by default its non-zero weights: at most k)."""

    k: int
    accuracy: float
    mean_concepts_per_class: float


def accuracy_vs_top_k(concept_scores, weight, labels, ks: Sequence[int], threshold: float = 0.0) -> list[TopKPoint]:
    """Accuracy when every class keeps only its k largest weights, for each k (method §5.5).

    W is masked with `top_k_mask(weight, k)` (the library's one definition of top-k concepts per class) and
    nothing else changes: no retraining and no concept removal, because removing a concept would change
    the softmax behind the other concepts' scores (method §6).

    Args:
        concept_scores: `(N, K)` presence scores s.
        weight: `(C, K)` concept→class weights.
        labels: `(N,)` class indices.
        ks: the k values, each in [1, K].
        threshold: a weight of the masked W counts in `mean_concepts_per_class` when above it: 0 counts the
            non-zero weights (the headline size), `PAPER_WEIGHT_THRESHOLD` gives the paper's local size.

    Returns:
        One `TopKPoint(k, accuracy, mean_concepts_per_class)` per k, in the order given;
        `mean_concepts_per_class` is the class mean of `local_size(masked W, threshold)`.
    """
    weight = _check_weight(weight)
    scores = _check_scores(concept_scores, weight)
    labels = _check_class_indices(labels, "labels", scores.shape[0], weight.shape[0])
    ks, threshold = _check_ks(ks, weight.shape[1]), _check_threshold(threshold)
    curve = []
    for k in ks:
        masked = weight * top_k_mask(weight, k)
        curve.append(
            TopKPoint(
                k=k,
                accuracy=_accuracy(_logits(scores, masked), labels),
                mean_concepts_per_class=float(local_size(masked, threshold).double().mean()),
            )
        )
    return curve


# --- everything in one summary ---


@dataclass
class ExplanationSize:
    """Accuracy and explanation size of a classifier over a set of images (method §7.1–7.2).

    Attributes:
        num_images / num_classes / num_concepts: N, C and K.
        accuracy: top-1 accuracy (None without labels).
        nonzero_size_mean / nonzero_size_min / nonzero_size_max: the headline size over classes, concepts with a
            non-zero weight (`nonzero_size`; scale-invariant).
        mass95_size_mean / mass95_size_min / mass95_size_max: the fewest concepts holding 95 % of each class's
            weight (`weight_mass_size`; scale-invariant, meaningful for dense heads).
        local_size_mean / local_size_min / local_size_max: the paper's local size over classes (ReLU(W) > 0.1), a
            secondary figure for comparison with the paper: rescaling W changes it.
        global_size: PIP-Net's global size (concepts with some class weight > 1e-3).
        sparsity_ratio: PIP-Net's fraction of weights ≤ 1e-3.
        anz: PIP-Net's ANZ (mean concepts per image with s_k > 1e-3).
        sim_anz_cc: PIP-Net's SimANZCC (mean concepts per image contributing > 1e-3 to the predicted class).
        top_k_curve: ProtoQuant's top-k curve for the requested k (empty when none were requested).
    """

    num_images: int
    num_classes: int
    num_concepts: int
    accuracy: float | None
    nonzero_size_mean: float
    nonzero_size_min: int
    nonzero_size_max: int
    mass95_size_mean: float
    mass95_size_min: int
    mass95_size_max: int
    local_size_mean: float
    local_size_min: int
    local_size_max: int
    global_size: int
    sparsity_ratio: float
    anz: float
    sim_anz_cc: float
    top_k_curve: list[TopKPoint] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain Python values (the top-k curve as a list of dicts), ready for JSON or `evaluate`."""
        summary = asdict(self)
        summary["top_k_curve"] = [point._asdict() for point in self.top_k_curve]
        return summary


def explanation_size(concept_scores, weight, labels=None, *, ks: Sequence[int] = ()) -> ExplanationSize:
    """Every size above, with the default thresholds, in one `ExplanationSize`.

    The scores are used as given (ProtoQuant's own protocol); pass `pipnet_presence(concept_scores)` for
    the PIP-Net benchmark's. SimANZCC explains the model's own prediction (argmax of s · ReLU(W)ᵀ).

    Args:
        concept_scores: `(N, K)` presence scores s.
        weight: `(C, K)` concept→class weights.
        labels: `(N,)` class indices, for the accuracy and the top-k curve.
        ks: the k values of the top-k curve (needs labels).
    """
    checked_weight = _check_weight(weight)
    scores = _check_scores(concept_scores, checked_weight)
    if labels is not None:
        labels = _check_class_indices(labels, "labels", scores.shape[0], checked_weight.shape[0])
    ks = list(ks)
    if ks and labels is None:
        raise ValueError("The top-k curve (ks) needs labels.")
    if ks:
        ks = _check_ks(ks, checked_weight.shape[1])
    nonzero = LocalSizeSummary.from_sizes(nonzero_size(checked_weight))
    mass95 = LocalSizeSummary.from_sizes(weight_mass_size(checked_weight))
    paper = local_size_summary(checked_weight)
    return ExplanationSize(
        num_images=scores.shape[0],
        num_classes=checked_weight.shape[0],
        num_concepts=checked_weight.shape[1],
        accuracy=None if labels is None else _accuracy(_logits(scores, checked_weight), labels),
        nonzero_size_mean=nonzero.mean,
        nonzero_size_min=nonzero.min,
        nonzero_size_max=nonzero.max,
        mass95_size_mean=mass95.mean,
        mass95_size_min=mass95.min,
        mass95_size_max=mass95.max,
        local_size_mean=paper.mean,
        local_size_min=paper.min,
        local_size_max=paper.max,
        global_size=global_size(checked_weight),
        sparsity_ratio=sparsity_ratio(checked_weight),
        anz=anz(scores),
        sim_anz_cc=sim_anz_cc(scores, checked_weight),
        top_k_curve=accuracy_vs_top_k(scores, checked_weight, labels, ks) if ks else [],
    )


__all__ = [
    "ExplanationSize",
    "LocalSizeSummary",
    "TopKPoint",
    "accuracy",
    "accuracy_vs_top_k",
    "anz",
    "explanation_size",
    "global_size",
    "local_size",
    "local_size_summary",
    "nonzero_size",
    "pipnet_presence",
    "sim_anz_cc",
    "sparsity_ratio",
    "weight_mass_size",
]
