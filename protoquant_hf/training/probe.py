"""Step 0: the linear probe, the dense reference and (when the checkpoint head does not fit) the stage-1 head."""

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


__all__ = ["fit_linear_probe"]
