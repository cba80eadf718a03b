"""The only functions that change a model's concepts or its concept→class weights W.

Training (initialisation, dead-concept removal, usage-based pruning, top-k sparsification) and model editing
all go through these, so the codebook, W and `config.num_concepts` always agree, and a parameter keeps its
device, dtype and `requires_grad` flag when it is replaced.

Physical removal changes the softmax normalisation of the remaining concepts (method §11.9): re-evaluate or
retrain afterwards. Zeroing or rescaling weights (`keep_top_k_per_class`, `disable_concept`, `set_weight`, `scale_weight`)
changes nothing else.
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
def top_k_mask(weight: torch.Tensor, k: int) -> torch.Tensor:
    """`(C, K)` bool: the k largest positive ReLU(W) entries of every class (ties: lower concept index).
    The one definition of "top-k concepts per class", used by sparsification and the top-k metrics."""
    if not 1 <= k <= weight.shape[1]:
        raise ValueError(f"k must be in [1, {weight.shape[1]}], got {k}.")
    top = F.relu(weight).topk(k, dim=1).indices
    return torch.zeros_like(weight, dtype=torch.bool).scatter_(1, top, True) & (weight > 0)


@torch.no_grad()
def keep_top_k_per_class(model, k: int) -> None:
    """Keep the k largest ReLU(W) entries of every class and set the rest to exactly 0 (§4.4).
    Zeroed weights stay 0 under further training: ReLU has zero gradient at 0."""
    weight = model.classifier.weight
    weight.masked_fill_(~top_k_mask(weight, k), 0.0)


@torch.no_grad()
def remove_unused_concepts(model) -> int:
    """Physically remove the concepts no class uses (ReLU(W) = 0 for every class). Returns how many."""
    used = (F.relu(model.classifier.weight) > 0).any(dim=0)
    removed = int((~used).sum())
    if removed:
        prune_concepts(model, used)
    return removed


def _check_indices(model, concept_index: int, class_index: int | None = None) -> None:
    num_labels, num_concepts = model.classifier.weight.shape
    if num_concepts == 0:
        raise ValueError("The model has no concepts left to edit.")
    if not 0 <= concept_index < num_concepts:
        raise ValueError(f"concept_index must be in [0, {num_concepts - 1}] (the model has {num_concepts} concepts); got {concept_index}.")
    if class_index is not None and not 0 <= class_index < num_labels:
        raise ValueError(f"class_index must be in [0, {num_labels - 1}] (the model has {num_labels} classes); got {class_index}.")


@torch.no_grad()
def disable_concept(model, concept_index: int, class_index: int | None = None) -> None:
    """Remove a concept's evidence for every class (W[:, k] = 0), or for one class (W[c, k] = 0).

    The concept stays in the codebook, so every other concept's presence score is unchanged (method §6): each
    affected logit drops by exactly the concept's contribution, and nothing else moves."""
    _check_indices(model, concept_index, class_index)
    weight = model.classifier.weight
    if class_index is None:
        weight[:, concept_index] = 0.0
    else:
        weight[class_index, concept_index] = 0.0


@torch.no_grad()
def set_weight(model, class_index: int, concept_index: int, value: float) -> None:
    """Set the weight of one concept for one class (W[c, k] = value, value >= 0: the head uses ReLU(W), so a
    negative value would silently act as 0)."""
    _check_indices(model, concept_index, class_index)
    if not 0 <= value < math.inf:
        raise ValueError(f"A class-concept weight must be finite and >= 0 (the head uses ReLU(W)); got {value}.")
    model.classifier.weight[class_index, concept_index] = value


@torch.no_grad()
def scale_weight(model, concept_index: int, factor: float, class_index: int | None = None) -> None:
    """Multiply a concept's weight for every class (or for one class) by `factor` >= 0."""
    _check_indices(model, concept_index, class_index)
    if not 0 <= factor < math.inf:
        raise ValueError(f"The scale factor must be finite and >= 0; got {factor}.")
    weight = model.classifier.weight
    if class_index is None:
        weight[:, concept_index] *= factor
    else:
        weight[class_index, concept_index] *= factor


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
    "disable_concept",
    "keep_top_k_per_class",
    "prune_by_usage",
    "prune_concepts",
    "remove_unused_concepts",
    "scale_weight",
    "set_concepts",
    "set_weight",
    "top_k_mask",
]
