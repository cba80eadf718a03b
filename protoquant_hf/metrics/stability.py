"""Stability of concept evidence under perturbation (method §7.4), for any model with activation maps.

Two protocols, both defined on bbox-cropped CUB at 224×224 in the literature:

* (A) spatial misalignment (Sacha et al. 2023, "Interpretability benchmark for evaluating spatial misalignment of
  prototypical parts explanations"; gmum/interpretability-benchmark, the submodule the official ProtoQuant code
  pins): `masked_pgd` attacks the image's top concept outside a frozen box around its peak; `spatial_misalignment`
  reports PAC, PRC, PLC and AC (the pure formulas `pac`, `prc`, `plc`).
* (B) Huang et al., ICCV 2023 ("Evaluation and improvement of interpretability for self-explainable part-prototype
  networks", EvalProtoPNet): `noise_stability` (Gaussian noise) and `consistency` (does a concept's peak box hold
  the same part across its class's images).

Model contract (ProtoQuant and any baseline head with the same outputs):

* ``model(pixel_values, output_activation_maps=True)`` returns an object with ``activation_maps`` `(B, K, h, w)` and
  ``logits`` `(B, C)`; a concept's activation in an image is the spatial max of its map (ProtoQuant's presence score);
* ``model.classifier.weight`` `(C, K)`: concept k belongs to class c when W[c, k] > 0 (every metric but `masked_pgd`);
* an ``nn.Module``: it is measured in eval mode with every parameter frozen, and both are restored afterwards.

Conventions: boxes are (left, top, right, bottom) in model-input pixels, right and bottom exclusive. ``parts`` holds,
per image, one ``{"part": int, "keypoint": [x, y]}`` per *visible* part keypoint, in model-input pixel coordinates
(the caller rescales dataset annotations); several keypoints may share a part id (CUB's left/right parts merged), and
such a part is in a box when any of its keypoints is. Sizes given "at 224 px" (box margin 10, box side 72) are scaled
by side / 224 on each axis: both protocols were defined at 224×224, so the box keeps the same share of the image at
any input size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from tqdm.auto import tqdm

from ..explanation_protoquant import percentile_box, upsample_map

REFERENCE_SIDE = 224  # the input side both protocols were defined at
TOP_REGION_QUANTILE = 0.9  # PLC compares the regions above the map's 0.9 quantile


# ---- results ----------------------------------------------------------------------------------------------------


@dataclass
class MetricResult:
    """Base of the metric results: `to_dict` gives plain Python (arrays as lists), ready for JSON."""

    def to_dict(self) -> dict:
        return {item.name: _plain(getattr(self, item.name)) for item in fields(self)}


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class SpatialMisalignmentResult(MetricResult):
    """Protocol (A): per image, the top concept attacked outside its frozen box. Lower is more stable.

    Attributes:
        mean_pac / mean_prc / mean_plc: the means over images of `pac`, `prc`, `plc`.
        accuracy_before / accuracy_after: top-1 accuracy (%) on the clean and the attacked images.
        ac: accuracy_before − accuracy_after, in percentage points.
        pac: `(N,)` 100 · (1 − a_after / a_before), a = the target concept's activation (spatial max of its map).
        prc: `(N,)` how many more concepts not of the true class out-activate the target after the attack.
        plc: `(N,)` 100 · (1 − IoU) of the target's top-10 % regions before and after.
        target_concepts: `(N,)` the attacked concept (highest activation in the clean image).
        activation_before / activation_after: `(N,)` its activation.
        correct_before / correct_after: `(N,)` whether the prediction was the label.
        boxes: `(N, 4)` the frozen box (margin included); only pixels outside it were perturbed.
        seconds: wall-clock time of the whole measurement.
        settings: the attack and box parameters used.
    """

    mean_pac: float
    mean_prc: float
    mean_plc: float
    accuracy_before: float
    accuracy_after: float
    ac: float
    pac: np.ndarray
    prc: np.ndarray
    plc: np.ndarray
    target_concepts: np.ndarray
    activation_before: np.ndarray
    activation_after: np.ndarray
    correct_before: np.ndarray
    correct_after: np.ndarray
    boxes: np.ndarray
    seconds: float
    settings: dict = field(default_factory=dict)


@dataclass
class NoiseStabilityResult(MetricResult):
    """Protocol (B), stability: per (concept, image) pair, does the concept's evidence survive Gaussian noise?
    The pairs are each image's true class's top-k concepts by W. Higher is more stable; all scores in %.

    Attributes:
        location_stability: share of pairs whose arg-max cell of the activation map is unchanged.
        identity_stability: share of pairs whose top-k presence is unchanged: the concept is among the image's
            `top_k` concepts by activation (all K concepts ranked) both with and without noise, or in neither.
        part_stability: Huang et al.'s score, when parts were given: share of pairs whose part vector (which parts
            lie in the box around the upsampled arg-max) is unchanged, averaged per class first, then over classes.
        images / classes / concepts: `(M,)` each pair's image, its true class and the concept.
        location_unchanged / identity_unchanged / parts_unchanged: `(M,)` per pair (parts: None without parts).
        settings: std, top_k, box size, seed.
    """

    location_stability: float
    identity_stability: float
    part_stability: float | None
    images: np.ndarray
    classes: np.ndarray
    concepts: np.ndarray
    location_unchanged: np.ndarray
    identity_unchanged: np.ndarray
    parts_unchanged: np.ndarray | None
    settings: dict = field(default_factory=dict)


@dataclass
class ConsistencyResult(MetricResult):
    """Protocol (B), consistency: per (class, concept) pair (the class's top-k concepts by W), how reliably the box
    around the concept's peak holds one part over the class's images. Higher is better.

    Attributes:
        consistency: % of pairs that are consistent.
        classes / concepts: `(M,)` each pair (classes without images in the set are left out).
        ratios: `(M, P)` per part: #images with the part in the box / #images where it is visible (NaN: never visible).
        best_part: `(M,)` the part with the highest ratio (-1 when no part was ever visible).
        best_ratio: `(M,)` that ratio (0 when no part was visible).
        consistent: `(M,)` best_ratio ≥ threshold.
        settings: top_k, box size, threshold.
    """

    consistency: float
    classes: np.ndarray
    concepts: np.ndarray
    ratios: np.ndarray
    best_part: np.ndarray
    best_ratio: np.ndarray
    consistent: np.ndarray
    settings: dict = field(default_factory=dict)


# ---- the model contract -----------------------------------------------------------------------------------------


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters inside the block (no parameter gradient can accumulate, and PGD builds no
    graph through the weights); every module's mode and every parameter's `requires_grad` are restored after."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


def activation_outputs(model, pixel_values: torch.Tensor):
    """``model(pixel_values, output_activation_maps=True)``, refusing outputs without `(B, K, h, w)` activation maps."""
    hint = (
        f"{type(model).__name__} cannot return activation maps: the stability and purity metrics need a model whose "
        "forward(pixel_values, output_activation_maps=True) returns `activation_maps` (B, K, h, w) and `logits` "
        "(B, C), like ProtoQuantForImageClassification."
    )
    try:
        outputs = model(pixel_values, output_activation_maps=True)
    except TypeError as error:  # a forward without the keyword
        raise ValueError(f"{hint} Its forward raised: {error}") from error
    maps = getattr(outputs, "activation_maps", None)
    if not isinstance(maps, torch.Tensor) or maps.ndim != 4 or getattr(outputs, "logits", None) is None:
        raise ValueError(hint)
    return outputs


def maps_and_logits(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One no-grad forward: (activation maps `(B, K, h, w)`, logits `(B, C)`), float32 on the CPU."""
    device, dtype = input_placement(model, pixel_values)
    with torch.no_grad():
        outputs = activation_outputs(model, pixel_values.to(device=device, dtype=dtype))
    return outputs.activation_maps.float().cpu(), outputs.logits.float().cpu()


def check_model(model, pixel_values: torch.Tensor, needs_classes: bool = True) -> torch.Tensor | None:
    """One image through the model before any work, so that an unsuitable model fails at once. Returns the
    concept→class weights W `(C, K)` (float32, CPU), or None when `needs_classes` is False."""
    num_concepts = maps_and_logits(model, pixel_values[:1])[0].shape[1]
    if not needs_classes:
        return None
    weight = getattr(getattr(model, "classifier", None), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != num_concepts:
        raise ValueError(
            f"{type(model).__name__} needs `classifier.weight` of shape (num_classes, {num_concepts}) (the concept→class "
            "weights W; concept k belongs to class c when W[c, k] > 0) to tell which concepts belong to which class."
        )
    return weight.detach().float().cpu()


def input_placement(model, pixel_values: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's parameters (of the pixels for a model without any)."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return pixel_values.device, pixel_values.dtype
    return parameter.device, parameter.dtype if parameter.is_floating_point() else pixel_values.dtype


def batch_slices(count: int, batch_size: int, desc: str, show_progress: bool) -> Iterator[slice]:
    """Consecutive mini-batches of `count` rows, with an optional tqdm bar."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    for start in tqdm(range(0, count, batch_size), desc=desc, disable=not show_progress, unit="batch"):
        yield slice(start, min(start + batch_size, count))


def check_pixels(pixel_values) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or not pixel_values.is_floating_point():
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a float tensor (N, 3, H, W) of normalised model inputs; got {got}.")
    if len(pixel_values) == 0:
        raise ValueError("pixel_values holds no image.")


def check_labels(labels, count: int, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (count,):
        raise ValueError(f"labels must be class indices of shape ({count},); got shape {tuple(labels.shape)}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must be class indices in [0, {num_classes - 1}]; got {int(labels.min())} … {int(labels.max())}."
        )
    return labels


def check_parts(parts, count: int, num_parts) -> None:
    if len(parts) != count:
        raise ValueError(f"parts must hold one list of keypoints per image ({count}); got {len(parts)}.")
    if not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"num_parts must be a positive int when parts are given; got {num_parts!r}.")
    for image_parts in parts:
        for entry in image_parts:
            if not 0 <= int(entry["part"]) < num_parts or len(entry["keypoint"]) != 2:
                raise ValueError(f"Each part must be {{'part': 0 … {num_parts - 1}, 'keypoint': [x, y]}}; got {entry!r}.")


# ---- boxes and parts --------------------------------------------------------------------------------------------


def scaled_to_input(pixels_at_reference: float, image_size: tuple[int, int]) -> tuple[int, int]:
    """A length given at 224 px as (rows, cols) at an input of `image_size` (H, W)."""
    height, width = image_size
    return round(pixels_at_reference * height / REFERENCE_SIDE), round(pixels_at_reference * width / REFERENCE_SIDE)


def enlarge_box(box: tuple[int, int, int, int], margin: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, ...]:
    """`box` grown by `margin` (rows, cols) on every side, clipped to the image."""
    (left, top, right, bottom), (rows, cols), (height, width) = box, margin, image_size
    return max(left - cols, 0), max(top - rows, 0), min(right + cols, width), min(bottom + rows, height)


def centred_box(centre: tuple[int, int], size: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The `size` (rows, cols) box centred on pixel `centre` (row, col), clipped to the image (Huang et al.: 72 px,
    half-size 36 at 224)."""
    (row, col), (rows, cols), (height, width) = centre, size, image_size
    left, top = col - cols // 2, row - rows // 2
    return max(left, 0), max(top, 0), min(left + cols, width), min(top + rows, height)


def parts_in_box(image_parts: Sequence[dict], box: tuple[int, int, int, int], num_parts: int) -> np.ndarray:
    """`(P,)` bool: which parts have a keypoint inside `box`."""
    left, top, right, bottom = box
    inside = np.zeros(num_parts, dtype=bool)
    for entry in image_parts:
        x, y = entry["keypoint"]
        if left <= x < right and top <= y < bottom:
            inside[int(entry["part"])] = True
    return inside


def visible_parts(image_parts: Sequence[dict], num_parts: int) -> np.ndarray:
    """`(P,)` bool: which parts the image shows (has a keypoint for)."""
    visible = np.zeros(num_parts, dtype=bool)
    visible[[int(entry["part"]) for entry in image_parts]] = True
    return visible


def peak_part_vectors(
    maps: np.ndarray, image_parts: Sequence[dict], num_parts: int, box_size: tuple[int, int], image_size, upsample: str
) -> np.ndarray:
    """`(k, P)` bool for one image's `(k, h, w)` maps: which parts lie in the `box_size` box centred on each map's
    upsampled arg-max (Huang et al.'s part vector)."""
    vectors = np.zeros((len(maps), num_parts), dtype=bool)
    for index, activation in enumerate(maps):
        upsampled = upsample_map(activation, image_size, mode=upsample)
        centre = np.unravel_index(int(upsampled.argmax()), upsampled.shape)
        vectors[index] = parts_in_box(image_parts, centred_box(centre, box_size, image_size), num_parts)
    return vectors


def class_concepts(weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's top-k concepts by W: (indices `(C, k)`, valid `(C, k)`); only concepts with W[c, k] > 0 are valid,
    so a class with fewer positive weights has fewer concepts. Ties keep the lower concept index (stable sort)."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1; got {top_k}.")
    values, indices = torch.sort(weight, dim=1, descending=True, stable=True)
    k = min(top_k, weight.shape[1])
    return indices[:, :k], values[:, :k] > 0


def top_k_membership(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """`(B, K)` bool: the `top_k` concepts of each image by activation (ties: the lower index)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


# ---- protocol (A): spatial misalignment ------------------------------------------------------------------------


def pac(activation_before: np.ndarray, activation_after: np.ndarray) -> np.ndarray:
    """Prototype activation change (%), per image: 100 · (1 − a_after / a_before)."""
    return 100.0 * (1.0 - np.asarray(activation_after, dtype=np.float64) / np.asarray(activation_before, dtype=np.float64))


def prc(scores_before: np.ndarray, scores_after: np.ndarray, targets: np.ndarray, foreign: np.ndarray) -> np.ndarray:
    """Prototype ranking change, per image: #foreign concepts out-activating the target after − before.

    Args:
        scores_before / scores_after: `(N, K)` every concept's activation (spatial max).
        targets: `(N,)` the attacked concept.
        foreign: `(N, K)` bool, concepts not of the image's true class.
    """
    rows = np.arange(len(targets))

    def outranking(scores):
        scores = np.asarray(scores, dtype=np.float64)
        return ((scores > scores[rows, targets][:, None]) & foreign).sum(axis=1)

    return outranking(scores_after) - outranking(scores_before)


def top_region(upsampled: np.ndarray, quantile: float = TOP_REGION_QUANTILE) -> np.ndarray:
    """`(N, H, W)` bool: the pixels of each upsampled map strictly above its `quantile`."""
    upsampled = np.asarray(upsampled, dtype=np.float64)
    return upsampled > np.quantile(upsampled, quantile, axis=(-2, -1), keepdims=True)


def plc(upsampled_before: np.ndarray, upsampled_after: np.ndarray, quantile: float = TOP_REGION_QUANTILE) -> np.ndarray:
    """Prototype location change (%), per image: 100 · (1 − IoU) of the top regions of `(N, H, W)` maps before and
    after; 0 where both regions are empty (a flat map)."""
    before, after = top_region(upsampled_before, quantile), top_region(upsampled_after, quantile)
    union = (before | after).sum(axis=(-2, -1))
    intersection = (before & after).sum(axis=(-2, -1))
    iou = np.divide(intersection, union, out=np.ones(len(union)), where=union > 0)
    return 100.0 * (1.0 - iou)


def _pgd_batch(model, pixels, concepts, allowed, epsilon: float, step_size: float, iterations: int) -> torch.Tensor:
    """Masked L∞ PGD on one batch already on the model's device (see `masked_pgd`)."""
    rows = torch.arange(len(pixels), device=pixels.device)
    adversarial = pixels.clone()
    for _ in range(iterations):
        adversarial.requires_grad_(True)
        with torch.enable_grad():
            maps = activation_outputs(model, adversarial).activation_maps
            # Images are independent (eval mode), so the gradient of the sum is each image's own gradient.
            activation = maps[rows, concepts].amax(dim=(-2, -1)).sum()
            (gradient,) = torch.autograd.grad(activation, adversarial)
        with torch.no_grad():
            stepped = adversarial - step_size * gradient.sign()  # descend: reduce the activation
            stepped = pixels + (stepped - pixels).clamp(-epsilon, epsilon)
            adversarial = torch.where(allowed, stepped, pixels)
    return adversarial.detach()


def masked_pgd(
    model,
    pixel_values: torch.Tensor,
    concepts: torch.Tensor,
    allowed_mask: torch.Tensor,
    epsilon: float = 0.4,
    step_size: float = 0.01,
    iterations: int = 40,
    batch_size: int = 32,
    show_progress: bool = False,
) -> torch.Tensor:
    """L∞ PGD that reduces one concept's activation per image, changing only allowed pixels (Sacha et al. 2023).

    Each of `iterations` steps moves the allowed pixels by −`step_size` · sign(∇ max_{h,w} p_k), projects onto the
    ε-ball around `pixel_values` and puts the frozen pixels back, so the result is x_adv · mask + x · (1 − mask)
    with ‖x_adv − x‖∞ ≤ ε, in normalised-pixel units (the benchmark's cleverhans settings: ε 0.4, step 0.01, 40
    steps). Deterministic: no random start, and no clipping to a valid pixel range (normalised inputs have none).
    The gradient is taken w.r.t. the input only; parameters are frozen for the run and restored after.

    Args:
        model: see the module docstring (activation maps; `classifier` not needed).
        pixel_values: `(N, 3, H, W)` normalised model inputs.
        concepts: `(N,)` the concept to attack in each image.
        allowed_mask: `(N, 1, H, W)` bool, True where pixels may change.

    Returns:
        `(N, 3, H, W)` the adversarial pixel values, on the CPU, in `pixel_values`' dtype.
    """
    check_pixels(pixel_values)
    count, _, height, width = pixel_values.shape
    concepts = torch.as_tensor(concepts).long().cpu()
    if concepts.shape != (count,):
        raise ValueError(f"concepts must hold one concept index per image, shape ({count},); got {tuple(concepts.shape)}.")
    if allowed_mask.shape != (count, 1, height, width) or allowed_mask.dtype != torch.bool:
        raise ValueError(f"allowed_mask must be a bool tensor of shape ({count}, 1, {height}, {width}); got "
                         f"{allowed_mask.dtype} {tuple(allowed_mask.shape)}.")
    with evaluating(model):
        check_model(model, pixel_values, needs_classes=False)
        device, dtype = input_placement(model, pixel_values)
        adversarial = []
        for rows in batch_slices(count, batch_size, "Masked PGD", show_progress):
            adversarial.append(_pgd_batch(
                model, pixel_values[rows].to(device=device, dtype=dtype), concepts[rows].to(device),
                allowed_mask[rows].to(device), epsilon, step_size, iterations,
            ).cpu())
    return torch.cat(adversarial).to(pixel_values.dtype)


def spatial_misalignment(
    model,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float = 0.4,
    step_size: float = 0.01,
    iterations: int = 40,
    box_percentile: float = 95,
    box_margin: float = 10,
    upsample: str = "bicubic",
    batch_size: int = 32,
    show_progress: bool = False,
) -> SpatialMisalignmentResult:
    """The spatial-misalignment benchmark (protocol A, method §7.4): PAC, PRC, PLC and AC.

    Per image: the target is the concept with the highest activation; its map, upsampled to the input (`upsample`,
    bicubic as in the benchmark), gives ProtoPNet's box around the pixels at or above the `box_percentile`-th
    percentile, enlarged by `box_margin` px at 224 (scaled by side / 224 per axis, see the module docstring). The
    pixels inside the box are frozen and `masked_pgd` attacks the target outside it. PLC compares the top-10 %
    regions of the bilinearly upsampled map (as the benchmark defines it), before and after.

    Args:
        model: see the module docstring.
        pixel_values: `(N, 3, H, W)` normalised model inputs.
        labels: `(N,)` true classes (the foreign concepts of PRC are those with W[label, k] ≤ 0).

    Returns:
        [`SpatialMisalignmentResult`].
    """
    started = time.perf_counter()
    check_pixels(pixel_values)
    count, _, height, width = pixel_values.shape
    image_size = (height, width)
    margin = scaled_to_input(box_margin, image_size)
    # Per-image values only, computed batch by batch: whole-set maps at input size would not fit in memory.
    results = {name: [] for name in ("targets", "boxes", "before", "after", "pac", "prc", "plc", "correct_before", "correct_after")}
    with evaluating(model):
        weight = check_model(model, pixel_values)
        labels = check_labels(labels, count, len(weight))
        device, dtype = input_placement(model, pixel_values)
        for rows in batch_slices(count, batch_size, "Spatial misalignment", show_progress):
            pixels = pixel_values[rows].to(device=device, dtype=dtype)
            maps, logits = maps_and_logits(model, pixels)
            targets = maps.amax(dim=(-2, -1)).argmax(dim=1)
            boxes = []
            for i, concept in enumerate(targets.tolist()):
                upsampled = upsample_map(maps[i, concept].numpy(), image_size, mode=upsample)
                boxes.append(enlarge_box(percentile_box(upsampled, box_percentile), margin, image_size))
            allowed = torch.ones(len(boxes), 1, height, width, dtype=torch.bool)
            for i, (left, top, right, bottom) in enumerate(boxes):
                allowed[i, :, top:bottom, left:right] = False
            attacked = _pgd_batch(model, pixels, targets.to(device), allowed.to(device), epsilon, step_size, iterations)
            attacked_maps, attacked_logits = maps_and_logits(model, attacked)
            in_batch = torch.arange(len(targets))
            scores_before, scores_after = maps.amax(dim=(-2, -1)), attacked_maps.amax(dim=(-2, -1))
            # Bilinear for PLC, as the benchmark defines it (its box is bicubic).
            regions = [np.stack([upsample_map(m.numpy(), image_size) for m in state[in_batch, targets]])
                       for state in (maps, attacked_maps)]
            results["targets"].append(targets.numpy())
            results["boxes"].append(np.array(boxes, dtype=np.int64))
            results["before"].append(scores_before[in_batch, targets].numpy())
            results["after"].append(scores_after[in_batch, targets].numpy())
            results["pac"].append(pac(results["before"][-1], results["after"][-1]))
            foreign = (weight[labels[rows]] <= 0).numpy()
            results["prc"].append(prc(scores_before.numpy(), scores_after.numpy(), targets.numpy(), foreign))
            results["plc"].append(plc(*regions))
            results["correct_before"].append((logits.argmax(dim=-1) == labels[rows]).numpy())
            results["correct_after"].append((attacked_logits.argmax(dim=-1) == labels[rows]).numpy())
    joined = {key: np.concatenate(parts) for key, parts in results.items()}
    accuracy_before = 100.0 * float(joined["correct_before"].mean())
    accuracy_after = 100.0 * float(joined["correct_after"].mean())
    return SpatialMisalignmentResult(
        mean_pac=float(joined["pac"].mean()), mean_prc=float(joined["prc"].mean()), mean_plc=float(joined["plc"].mean()),
        accuracy_before=accuracy_before, accuracy_after=accuracy_after, ac=accuracy_before - accuracy_after,
        pac=joined["pac"], prc=joined["prc"], plc=joined["plc"], target_concepts=joined["targets"],
        activation_before=joined["before"], activation_after=joined["after"],
        correct_before=joined["correct_before"], correct_after=joined["correct_after"], boxes=joined["boxes"],
        seconds=time.perf_counter() - started,
        settings={"epsilon": epsilon, "step_size": step_size, "iterations": iterations, "box_percentile": box_percentile,
                  "box_margin": box_margin, "box_margin_pixels": margin, "upsample": upsample},
    )


# ---- protocol (B): Huang et al. ------------------------------------------------------------------------------


def _box_size(box_size: int | None, image_size: tuple[int, int]) -> tuple[int, int]:
    """Huang et al.'s 72-px box scaled to the input when None, else `box_size` model-input pixels square."""
    return scaled_to_input(72, image_size) if box_size is None else (int(box_size), int(box_size))


def noise_stability(
    model,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    std: float = 0.2,
    top_k: int = 10,
    parts: Sequence[Sequence[dict]] | None = None,
    num_parts: int | None = None,
    box_size: int | None = None,
    upsample: str = "bicubic",
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = False,
) -> NoiseStabilityResult:
    """Stability under Gaussian noise (protocol B, Huang et al. 2023; method §7.4).

    The noise, std `std` in normalised-pixel units, is drawn once for the whole set from a generator seeded with
    `seed` (so the result does not depend on `batch_size`). Pairs are each image's true class's `top_k` concepts
    by W with W > 0. See [`NoiseStabilityResult`] for the three scores; `part_stability` needs `parts` and
    `num_parts`, and uses a `box_size` box (None: 72 px at 224, scaled) centred on the arg-max of the map upsampled
    with `upsample` (bicubic, as Huang et al.).

    Args:
        model: see the module docstring.
        pixel_values: `(N, 3, H, W)` normalised model inputs.
        labels: `(N,)` true classes.
        parts: per image, its visible part keypoints (see the module docstring), or None.
    """
    check_pixels(pixel_values)
    count, _, height, width = pixel_values.shape
    image_size = (height, width)
    if parts is not None:
        check_parts(parts, count, num_parts)
    size = _box_size(box_size, image_size)
    noise = std * torch.randn(pixel_values.shape, generator=torch.Generator().manual_seed(seed))
    pairs = {name: [] for name in ("images", "classes", "concepts", "location", "identity", "parts")}
    with evaluating(model):
        weight = check_model(model, pixel_values)
        labels = check_labels(labels, count, len(weight))
        indices, valid = class_concepts(weight, top_k)
        for rows in batch_slices(count, batch_size, "Noise stability", show_progress):
            clean = maps_and_logits(model, pixel_values[rows])[0]
            noisy = maps_and_logits(model, pixel_values[rows] + noise[rows])[0]
            present_clean = top_k_membership(clean.amax(dim=(-2, -1)), top_k)
            present_noisy = top_k_membership(noisy.amax(dim=(-2, -1)), top_k)
            for offset, image in enumerate(range(count)[rows]):
                label = int(labels[image])
                concepts = indices[label][valid[label]]
                pairs["images"].append(np.full(len(concepts), image))
                pairs["classes"].append(np.full(len(concepts), label))
                pairs["concepts"].append(concepts.numpy())
                cells_clean = clean[offset, concepts].flatten(1).argmax(dim=1)
                cells_noisy = noisy[offset, concepts].flatten(1).argmax(dim=1)
                pairs["location"].append((cells_clean == cells_noisy).numpy())
                pairs["identity"].append((present_clean[offset, concepts] == present_noisy[offset, concepts]).numpy())
                if parts is not None:
                    vectors = [
                        peak_part_vectors(state[offset, concepts].numpy(), parts[image], num_parts, size, image_size, upsample)
                        for state in (clean, noisy)
                    ]
                    pairs["parts"].append((vectors[0] == vectors[1]).all(axis=1))
    joined = {key: np.concatenate(values) if values else None for key, values in pairs.items()}
    if not len(joined["concepts"]):
        raise ValueError("No (concept, image) pair to measure: no true class of these images has a concept with W > 0.")
    part_stability = None
    if parts is not None:
        # Huang et al.: per class first, so that classes with many images do not dominate.
        per_class = [joined["parts"][joined["classes"] == label].mean() for label in np.unique(joined["classes"])]
        part_stability = 100.0 * float(np.mean(per_class))
    return NoiseStabilityResult(
        location_stability=100.0 * float(joined["location"].mean()),
        identity_stability=100.0 * float(joined["identity"].mean()),
        part_stability=part_stability,
        images=joined["images"], classes=joined["classes"], concepts=joined["concepts"],
        location_unchanged=joined["location"], identity_unchanged=joined["identity"], parts_unchanged=joined["parts"],
        settings={"std": std, "top_k": top_k, "box_size": list(size), "upsample": upsample, "seed": seed},
    )


def consistency(
    model,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    parts: Sequence[Sequence[dict]],
    num_parts: int,
    top_k: int = 10,
    box_size: int | None = None,
    threshold: float = 0.8,
    upsample: str = "bicubic",
    batch_size: int = 32,
    show_progress: bool = False,
) -> ConsistencyResult:
    """Consistency (protocol B, Huang et al. 2023; method §7.4).

    For each class and each of its `top_k` concepts by W (W > 0), over the class's images: per part, the share of
    the images showing the part in which it lies in the `box_size` box (None: 72 px at 224, scaled) centred on the
    arg-max of the concept's upsampled map. The pair is consistent when some part reaches `threshold`. A concept
    used by several classes is judged once per class, on that class's images.

    Args:
        model: see the module docstring.
        pixel_values: `(N, 3, H, W)` normalised model inputs.
        labels: `(N,)` true classes.
        parts: per image, its visible part keypoints (see the module docstring).
    """
    check_pixels(pixel_values)
    count, _, height, width = pixel_values.shape
    image_size = (height, width)
    check_parts(parts, count, num_parts)
    size = _box_size(box_size, image_size)
    with evaluating(model):
        weight = check_model(model, pixel_values)
        labels = check_labels(labels, count, len(weight))
        indices, valid = class_concepts(weight, top_k)
        hits = np.zeros((*indices.shape, num_parts), dtype=np.int64)  # (C, k, P)
        visible = np.zeros((len(weight), num_parts), dtype=np.int64)  # (C, P)
        for rows in batch_slices(count, batch_size, "Consistency", show_progress):
            maps = maps_and_logits(model, pixel_values[rows])[0]
            for offset, image in enumerate(range(count)[rows]):
                label = int(labels[image])
                concept_maps = maps[offset, indices[label]].numpy()
                hits[label] += peak_part_vectors(concept_maps, parts[image], num_parts, size, image_size, upsample)
                visible[label] += visible_parts(parts[image], num_parts)
    seen = np.bincount(labels.numpy(), minlength=len(weight)) > 0
    classes, slots = np.nonzero(valid.numpy() & seen[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(visible[classes] > 0, hits[classes, slots] / visible[classes], np.nan)
    any_visible = ~np.isnan(ratios).all(axis=1)
    best_part = np.where(any_visible, np.argmax(np.nan_to_num(ratios, nan=-1.0), axis=1), -1)
    best_ratio = np.where(any_visible, np.nan_to_num(ratios, nan=0.0).max(axis=1, initial=0.0), 0.0)
    consistent = best_ratio >= threshold
    return ConsistencyResult(
        consistency=100.0 * float(consistent.mean()) if len(consistent) else float("nan"),
        classes=classes, concepts=indices.numpy()[classes, slots], ratios=ratios,
        best_part=best_part, best_ratio=best_ratio, consistent=consistent,
        settings={"top_k": top_k, "box_size": list(size), "threshold": threshold, "upsample": upsample},
    )


__all__ = [
    "ConsistencyResult",
    "MetricResult",
    "NoiseStabilityResult",
    "SpatialMisalignmentResult",
    "consistency",
    "masked_pgd",
    "noise_stability",
    "pac",
    "plc",
    "prc",
    "spatial_misalignment",
]
