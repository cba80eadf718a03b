"""The training objectives of both stages, shared by every front end (Accelerate loop, Trainer).

Each takes feature maps, so the same code serves pixels (features computed on the fly) and the
feature cache (features read from disk).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def l1_penalty(model) -> torch.Tensor:
    """Σ ReLU(W): the sparsity term on the concept→class weights (L1 on ReLU(W), not |W|; §3.7)."""
    return F.relu(model.classifier.weight).sum()


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


def head_loss(model, concept_scores: torch.Tensor, targets: torch.Tensor, l1_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 on concept scores: CE + λ·ΣReLU(W). Returns (loss, logits)."""
    logits = model.forward_head(concept_scores)
    return soft_cross_entropy(logits, targets) + l1_lambda * l1_penalty(model), logits


def stage2_loss(model, feature_maps: torch.Tensor, targets: torch.Tensor, l1_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 (§4.3) on feature maps: concept scores, then `head_loss`. Returns (loss, logits)."""
    return head_loss(model, model.forward_concepts(feature_maps).concept_scores, targets, l1_lambda)


def stage1_loss(model, feature_maps: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 (§4.1): CE of the frozen original head on quantized features + w·codebook MSE.
    Returns (loss, logits)."""
    quantized = model.forward_quantized(feature_maps)
    loss = soft_cross_entropy(quantized.logits, targets) + model.config.codebook_loss_weight * quantized.codebook_loss
    return loss, quantized.logits


__all__ = ["head_loss", "l1_penalty", "mix_batch", "soft_cross_entropy", "stage1_loss", "stage2_loss"]
