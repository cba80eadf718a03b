"""Part purity of concepts (method §7.3): PIP-Net's top-k purity protocol (Nauta et al., "PIP-Net", CVPR 2023; run
by the official ProtoQuant code as `purity_benchmark/util/eval_cub_csv.py`), for any model with activation maps.

For every relevant concept (max class weight > `min_weight`), its top-10 images of the projection set by activation
(the spatial max of its map); in each, the arg-max cell's 32-px box under PIP-Net's rule (`cell_box(..., "pipnet")`:
cells ``round((side - 32) / (grid - 1))`` px apart, the last snapped to the border); per part, whether a keypoint
of that part lies in the box. The protocol records only visible parts, so a concept's purity for part j is the
share of its top images *showing part j* in which part j is in the box, and its purity is the best part's
(ties: the part with more hits). Keypoints are in model-input pixels (the caller rescales annotations, which is
the protocol's "rescale the box to the original image" done the other way round); the model contract, the box
and part conventions are those of `protoquant_hf.metrics.stability`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..explanation_protoquant import PIPNET_PATCH_SIZE, cell_box
from .stability import (
    MetricResult,
    batch_slices,
    check_model,
    check_parts,
    check_pixels,
    evaluating,
    maps_and_logits,
    parts_in_box,
    visible_parts,
)

PART_RELATED_PURITY = 0.5  # PIP-Net counts a concept with purity above 0.5 as part-related


@dataclass
class PurityResult(MetricResult):
    """PIP-Net's top-k part purity of the relevant concepts. Means and standard deviations (ddof 0) over concepts.

    Attributes:
        mean_purity / std_purity: purity of each concept's purest part.
        mean_frequent_part_purity / std_frequent_part_purity: purity of each concept's most often present part (the
            part with the most hits; ties: the purer, then the lower index).
        num_concepts: relevant concepts measured.
        num_part_related: those with purity > 0.5.
        concepts: `(M,)` the relevant concepts' indices.
        purity: `(M,)` each concept's purity (0 when none of its images shows any part).
        purest_part / frequent_part: `(M,)` the part each purity refers to (-1 when no part was visible).
        frequent_part_purity: `(M,)` the most often present part's purity.
        purity_per_part: `(M, P)` hits / visible (NaN where no top image shows the part).
        hits / visible: `(M, P)` over a concept's top images: how many have the part in the box / show the part.
        top_images: `(M, t)` each concept's top images (indices into `pixel_values`), most active first.
        top_scores: `(M, t)` their activations.
        settings: top_images, patch_size, min_weight.
    """

    mean_purity: float
    std_purity: float
    mean_frequent_part_purity: float
    std_frequent_part_purity: float
    num_concepts: int
    num_part_related: int
    concepts: np.ndarray
    purity: np.ndarray
    purest_part: np.ndarray
    frequent_part: np.ndarray
    frequent_part_purity: np.ndarray
    purity_per_part: np.ndarray
    hits: np.ndarray
    visible: np.ndarray
    top_images: np.ndarray
    top_scores: np.ndarray
    settings: dict = field(default_factory=dict)


def centre_trim(box: tuple[int, int, int, int], size: int) -> tuple[int, int, int, int]:
    """`box` cut to at most `size` px per side around its centre (PIP-Net: a larger box would catch more parts)."""
    left, top, right, bottom = box

    def trim(start: int, stop: int) -> tuple[int, int]:
        excess = stop - start - size
        return (start + excess // 2, start + excess // 2 + size) if excess > 0 else (start, stop)

    (left, right), (top, bottom) = trim(left, right), trim(top, bottom)
    return left, top, right, bottom


def _best_part(hits: np.ndarray, visible: np.ndarray, purity: np.ndarray, by_hits: bool) -> tuple[int, float]:
    """The part with the highest (purity, hits), or with `by_hits` the highest (hits, purity); ties: lower index."""
    candidates = np.flatnonzero(visible > 0)
    if not len(candidates):
        return -1, 0.0
    keys = [(hits[j], purity[j]) if by_hits else (purity[j], hits[j]) for j in candidates]
    best = int(candidates[max(range(len(candidates)), key=lambda i: (keys[i], -i))])
    return best, float(purity[best])


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    return (float(values.mean()), float(values.std())) if len(values) else (float("nan"), float("nan"))


def part_purity(
    model,
    pixel_values: torch.Tensor,
    parts: Sequence[Sequence[dict]],
    num_parts: int,
    top_images: int = 10,
    patch_size: int = PIPNET_PATCH_SIZE,
    min_weight: float = 1e-5,
    batch_size: int = 32,
    show_progress: bool = False,
) -> PurityResult:
    """PIP-Net's top-k part purity (method §7.3) on a projection set (un-cropped images in the protocol).

    Args:
        model: see `protoquant_hf.metrics.stability` (activation maps and `classifier.weight`).
        pixel_values: `(N, 3, H, W)` normalised model inputs of the projection set.
        parts: per image, its visible part keypoints `{"part": int, "keypoint": [x, y]}` in model-input pixels
            (merge CUB's left/right parts by giving both the same part id).
        num_parts: P, the number of part ids.
        top_images: images per concept (fewer when the set is smaller).
        patch_size: boxes larger than this are centre-trimmed to it (PIP-Net's 32 px).
        min_weight: a concept is relevant when its largest class weight exceeds this.

    Returns:
        [`PurityResult`].
    """
    check_pixels(pixel_values)
    count, _, height, width = pixel_values.shape
    check_parts(parts, count, num_parts)
    if top_images < 1:
        raise ValueError(f"top_images must be at least 1; got {top_images}.")
    with evaluating(model):
        weight = check_model(model, pixel_values)
        concepts = torch.nonzero(weight.max(dim=0).values > min_weight).flatten()
        # A running top-t per concept keeps memory at (M, t) whatever the set's size; the stable sort puts earlier
        # images first among equal scores, so the choice does not depend on batch_size.
        scores = torch.empty(len(concepts), 0)
        images = torch.empty(len(concepts), 0, dtype=torch.long)
        cells = torch.empty(len(concepts), 0, dtype=torch.long)
        for rows in batch_slices(count, batch_size, "Part purity", show_progress):
            maps = maps_and_logits(model, pixel_values[rows])[0][:, concepts]  # (B, M, h, w)
            grid = tuple(maps.shape[-2:])
            batch_scores, batch_cells = maps.flatten(2).max(dim=-1)  # (B, M)
            batch_images = torch.arange(rows.start, rows.stop).expand(len(concepts), -1)
            scores = torch.cat([scores, batch_scores.t()], dim=1)
            images = torch.cat([images, batch_images], dim=1)
            cells = torch.cat([cells, batch_cells.t()], dim=1)
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_images]
            scores, images, cells = scores.gather(1, order), images.gather(1, order), cells.gather(1, order)
    hits = np.zeros((len(concepts), num_parts), dtype=np.int64)
    visible = np.zeros((len(concepts), num_parts), dtype=np.int64)
    for index in range(len(concepts)):
        for image, cell in zip(images[index].tolist(), cells[index].tolist()):
            box = centre_trim(cell_box(divmod(cell, grid[1]), grid, (height, width), "pipnet"), patch_size)
            hits[index] += parts_in_box(parts[image], box, num_parts)
            visible[index] += visible_parts(parts[image], num_parts)
    with np.errstate(invalid="ignore", divide="ignore"):
        purity_per_part = np.where(visible > 0, hits / visible, np.nan)
    purest = [_best_part(h, v, p, by_hits=False) for h, v, p in zip(hits, visible, purity_per_part)]
    frequent = [_best_part(h, v, p, by_hits=True) for h, v, p in zip(hits, visible, purity_per_part)]
    purity = np.array([value for _, value in purest], dtype=np.float64)
    frequent_purity = np.array([value for _, value in frequent], dtype=np.float64)
    mean_purity, std_purity = _mean_std(purity)
    mean_frequent, std_frequent = _mean_std(frequent_purity)
    return PurityResult(
        mean_purity=mean_purity, std_purity=std_purity,
        mean_frequent_part_purity=mean_frequent, std_frequent_part_purity=std_frequent,
        num_concepts=len(concepts), num_part_related=int((purity > PART_RELATED_PURITY).sum()),
        concepts=concepts.numpy(), purity=purity,
        purest_part=np.array([part for part, _ in purest], dtype=np.int64),
        frequent_part=np.array([part for part, _ in frequent], dtype=np.int64),
        frequent_part_purity=frequent_purity, purity_per_part=purity_per_part, hits=hits, visible=visible,
        top_images=images.numpy(), top_scores=scores.numpy(),
        settings={"top_images": top_images, "patch_size": patch_size, "min_weight": min_weight},
    )


__all__ = ["PurityResult", "centre_trim", "part_purity"]
