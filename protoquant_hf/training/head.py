"""Step 0 (the linear probe) and the post-training sparsification of the concept→class head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fit_linear_probe(
    pooled: torch.Tensor, labels: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-4, max_iter: int = 200
) -> nn.Linear:
    """Fit a linear classifier on pooled frozen features (N, D) with L-BFGS (deterministic).

    It becomes the frozen stage-1 head when the backbone checkpoint's own head does not fit the
    dataset, and its accuracy is the dense reference every report compares ProtoQuant against.
    """
    probe = nn.Linear(pooled.shape[1], num_classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    pooled, labels = pooled.float(), labels.long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(pooled), labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.requires_grad_(False)


def concepts_per_class(model, threshold: float = 0.1) -> torch.Tensor:
    """Number of concepts with ReLU(W) > threshold, per class (C,)."""
    return (F.relu(model.classifier.weight.detach()) > threshold).sum(dim=1)


@torch.no_grad()
def limit_concepts_per_class(model, k: int) -> None:
    """Keep the k largest ReLU(W) entries of every class and set the rest to exactly 0 (§4.4).
    Zeroed weights stay 0 under further training: ReLU has zero gradient at 0."""
    weight = model.classifier.weight
    if not 1 <= k <= weight.shape[1]:
        raise ValueError(f"k must be in [1, {weight.shape[1]}], got {k}.")
    top = F.relu(weight).topk(k, dim=1).indices
    mask = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, top, True)
    weight.masked_fill_(~mask | (weight <= 0), 0.0)


@torch.no_grad()
def prune_unused_concepts(model) -> int:
    """Physically remove concepts no class uses (ReLU(W) = 0 for every class). Returns how many."""
    used = (F.relu(model.classifier.weight) > 0).any(dim=0)
    removed = int((~used).sum())
    if removed:
        model.prune_concepts(used)
    return removed


__all__ = ["concepts_per_class", "fit_linear_probe", "limit_concepts_per_class", "prune_unused_concepts"]
