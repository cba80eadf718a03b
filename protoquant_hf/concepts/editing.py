"""The only functions that change a model's concepts or its concept→class weights W.

Training (initialisation, dead-concept removal, usage-based pruning, top-k sparsification) and model editing
all go through these, so the codebook, W and `config.num_concepts` always agree, and a parameter keeps its
device, dtype and `requires_grad` flag when it is replaced.

Physical removal changes the softmax normalisation of the remaining concepts (method §11.9): re-evaluate or
retrain afterwards. Zeroing weights (`keep_top_k_per_class`, `zero_weight`) changes nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .stats import UsageSummary


def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(old), requires_grad=old.requires_grad))


@torch.no_grad()
def set_concepts(model, concepts: torch.Tensor) -> None:
    """Replace the concept vectors `(K, D)` in place (same K and D), e.g. after k-means initialisation."""
    current = model.codebook.concepts
    if tuple(concepts.shape) != tuple(current.shape):
        raise ValueError(f"Expected concepts of shape {tuple(current.shape)}, got {tuple(concepts.shape)}.")
    current.copy_(concepts.to(current))


@torch.no_grad()
def prune_concepts(model, keep: torch.Tensor) -> None:
    """Keep only the concepts indexed by `keep` (indices or a boolean mask of length K): the codebook
    and the columns of W shrink together and `config.num_concepts` follows."""
    keep = torch.as_tensor(keep, device=model.classifier.weight.device)
    if keep.dtype == torch.bool:
        if keep.numel() != model.config.num_concepts:
            raise ValueError(f"A keep mask needs {model.config.num_concepts} entries, got {keep.numel()}.")
        keep = keep.nonzero().flatten()
    if keep.numel() == 0:
        raise ValueError("prune_concepts would remove every concept; keep at least one.")
    if keep.min() < 0 or keep.max() >= model.config.num_concepts:
        raise ValueError(f"Concept indices must be in [0, {model.config.num_concepts - 1}]; got {keep.tolist()}.")
    _replace_parameter(model.codebook, "concepts", model.codebook.concepts[keep.to(model.codebook.concepts.device)])
    _replace_parameter(model.classifier, "weight", model.classifier.weight[:, keep])
    model.config.num_concepts = int(keep.numel())


@torch.no_grad()
def keep_top_k_per_class(model, k: int) -> None:
    """Keep the k largest ReLU(W) entries of every class and set the rest to exactly 0 (§4.4).
    Zeroed weights stay 0 under further training: ReLU has zero gradient at 0."""
    weight = model.classifier.weight
    if not 1 <= k <= weight.shape[1]:
        raise ValueError(f"k must be in [1, {weight.shape[1]}], got {k}.")
    top = F.relu(weight).topk(k, dim=1).indices
    mask = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, top, True)
    weight.masked_fill_(~mask | (weight <= 0), 0.0)


@torch.no_grad()
def remove_unused_concepts(model) -> int:
    """Physically remove the concepts no class uses (ReLU(W) = 0 for every class). Returns how many."""
    used = (F.relu(model.classifier.weight) > 0).any(dim=0)
    removed = int((~used).sum())
    if removed:
        prune_concepts(model, used)
    return removed


@torch.no_grad()
def zero_weight(model, class_index: int, concept_index: int) -> None:
    """Remove one concept's evidence for one class (W[class, concept] = 0)."""
    weight = model.classifier.weight
    num_labels, num_concepts = weight.shape
    if not (0 <= class_index < num_labels and 0 <= concept_index < num_concepts):
        raise ValueError(
            f"class_index must be in [0, {num_labels - 1}] and concept_index in [0, {num_concepts - 1}]; "
            f"got ({class_index}, {concept_index})."
        )
    weight[class_index, concept_index] = 0.0


@torch.no_grad()
def prune_by_usage(
    model, usage_fn: Callable[[object], torch.Tensor], target_num_concepts: int, steps: int = 4
) -> list[UsageSummary]:
    """Drop the least-used concepts in `steps` rounds until `target_num_concepts` remain (§4.2).

    Usage is recounted between rounds (`usage_fn(model) -> (K,) counts`, global across processes),
    because removing a concept reassigns its locations to others.

    Returns:
        The usage summary before each round.
    """
    if not 1 <= target_num_concepts <= model.config.num_concepts:
        raise ValueError(
            f"target_num_concepts must be in [1, {model.config.num_concepts}], got {target_num_concepts}."
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    history = []
    for round_index in range(steps):
        current = model.config.num_concepts
        drop = math.ceil((current - target_num_concepts) / (steps - round_index))
        if drop <= 0:
            break
        usage = usage_fn(model)
        history.append(UsageSummary.from_counts(usage))
        order = torch.argsort(usage, descending=True, stable=True)
        prune_concepts(model, order[: current - drop].sort().values)
    return history


__all__ = [
    "keep_top_k_per_class",
    "prune_by_usage",
    "prune_concepts",
    "remove_unused_concepts",
    "set_concepts",
    "zero_weight",
]
