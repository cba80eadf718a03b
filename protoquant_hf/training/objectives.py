"""The training objectives of both stages, as the Accelerate loop calls them.

Both stages' losses live in the model's `forward` (so the stock `transformers.Trainer` trains with
them too); this module only adapts them to what a training source yields (pixels, cached feature
maps, a precomputed score table) and adds the soft-target cross-entropy of Mixup/CutMix.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with integer labels `(B,)` or soft targets `(B, C)` (mixup/cutmix)."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets)
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def mix_batch(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-mode Mixup or CutMix (method §4.1 defaults) on any `(B, C, H, W)` input.

    Applied to images, or to cached feature maps (then CutMix swaps feature-map cells). Returns the
    mixed inputs and soft targets `(B, num_classes)` with label smoothing.
    """
    off = label_smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=inputs.device)
    targets.scatter_(1, labels.unsqueeze(1), 1.0 - label_smoothing + off)
    flipped = inputs.flip(0)
    if rng.random() < switch_prob and cutmix_alpha > 0:
        lam = rng.beta(cutmix_alpha, cutmix_alpha)
        height, width = inputs.shape[-2:]
        cut_h, cut_w = int(round(height * np.sqrt(1 - lam))), int(round(width * np.sqrt(1 - lam)))
        top, left = rng.integers(0, height - cut_h + 1), rng.integers(0, width - cut_w + 1)
        inputs = inputs.clone()
        inputs[..., top : top + cut_h, left : left + cut_w] = flipped[..., top : top + cut_h, left : left + cut_w]
        lam = 1 - cut_h * cut_w / (height * width)
    elif mixup_alpha > 0:
        lam = rng.beta(mixup_alpha, mixup_alpha)
        inputs = inputs * lam + flipped * (1 - lam)
    else:
        return inputs, targets
    return inputs, targets * lam + targets.flip(0) * (1 - lam)


def model_objective(stage: str, input_name: str) -> Callable:
    """The training objective of one stage as `fn(model, inputs, targets) -> (loss, logits)`.

    The loss is the model's own (`forward(..., labels=..., stage=stage)`: CE + λ·ΣReLU(W) for the
    head, CE + w·MSE for the codebook), so the Accelerate loop, the Trainer and a user's own loop
    optimise the same thing. Only soft targets (Mixup/CutMix) replace the library's CE, by the soft
    cross-entropy on the model's logits plus its own sparsity term.

    Args:
        stage: `"head"` or `"codebook"`.
        input_name: what the training source yields: `"pixel_values"`, `"feature_maps"` or
            `"concept_scores"` (a precomputed score table, frozen concepts).
    """

    def objective(model, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if targets.ndim == 1:
            outputs = model(**{input_name: inputs}, labels=targets, stage=stage)
            return outputs.loss, outputs.logits
        if stage != "head":
            raise ValueError("Soft targets (Mixup/CutMix) are supported in the head stage only.")
        outputs = model(**{input_name: inputs}, stage=stage)
        loss = soft_cross_entropy(outputs.logits, targets)
        if outputs.sparsity_loss is not None:
            loss = loss + outputs.sparsity_loss
        return loss, outputs.logits

    return objective


__all__ = ["mix_batch", "model_objective", "soft_cross_entropy"]
