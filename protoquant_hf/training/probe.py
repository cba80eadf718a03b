"""Step 0: the linear probe, the dense reference and (when the checkpoint head does not fit) the stage-1 head."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..memory import release_free_heap


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
        # Every evaluation frees (N, C)-sized temporaries between L-BFGS's small history tensors: without handing the
        # freed pages back the heap grew by 140-180 MB over one fit on 100 000 rows (the job's largest transient).
        release_free_heap()
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(pooled), labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.requires_grad_(False)


def pooled_training_sample(cache, max_rows: int | None, seed: int = 0, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Global-average-pooled features `(n, D)` and labels `(n,)` of every cached training image, or of a seeded sample of
    `max_rows` images (sorted rows: sequential reads) when there are more.

    The probe's L-BFGS needs its whole input in memory at every iteration, so the sample bounds its memory at
    `max_rows × D` floats however large the dataset is (200 000 × 1280 ≈ 1 GB); smaller datasets use every image.
    """
    rows = np.arange(len(cache))
    if max_rows is not None and len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_rows, replace=False))
    return cache.pooled(batch_size, indices=rows), torch.from_numpy(cache.labels[rows])


__all__ = ["fit_linear_probe", "pooled_training_sample"]
