""""This looks like that" for one image: the exact decomposition of a class logit into concept contributions, where
each concept was found in the image, and which training patches it stands for.

ProtoQuant has no bias, so a class logit is exactly Σ_k s_k · ReLU(W)_ck: every concept's contribution is its
presence score s_k (the spatial max of its activation map) times its non-negative class weight. `explain_outputs`
turns one forward's outputs into that decomposition, with, per top concept, its activation map at feature
resolution, the same map upsampled to the input (bilinear: an interpolation of a coarse map, not a finer
measurement), the peak cell and an image box for the peak:

* ``"patch"`` (token models, exact): the peak cell is one patch of the input, ``patch_size`` pixels square;
* ``"pipnet"`` (convnets, PIP-Net's rule, method §5.1): a 32-px box, cells ``round((side - 32) / (grid - 1))`` px
  apart, the last row and column snapped to the image border;
* ``"protopnet"`` (any model, ProtoPNet's rule): the box around the upsampled map's pixels at or above its 95th
  percentile.

`ConceptGallery` holds each concept's nearest training patches as small JPEG thumbnails in one safetensors file
(``gallery/patches.safetensors``) with a JSON index (``gallery/index.json``), stored beside the model weights, so an
explanation can show "looks like these training patches" without the training set.

Hub remote code: torch, numpy, PIL, transformers, safetensors and the standard library only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

BOX_RULES = ("patch", "pipnet", "protopnet")
PIPNET_PATCH_SIZE = 32  # PIP-Net's patch, at any input resolution
PROTOPNET_PERCENTILE = 95
GALLERY_DIR = "gallery"
GALLERY_FORMAT_VERSION = 1


# ---- where a concept is -------------------------------------------------------------------------------------


def default_box_rule(model) -> str:
    """``"patch"`` for token backbones (their grid is exact), ``"pipnet"`` for the others."""
    return "patch" if model.protoquant.backbone_kind == "tokens" else "pipnet"


def upsample_map(activation_map: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """A `(h, w)` map interpolated to `(H, W)` (align_corners=False), as float32: bilinear for explanations,
    `mode="bicubic"` where a protocol asks for it (ProtoPNet-style boxes in the stability benchmarks)."""
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"upsample_map supports the 'bilinear' and 'bicubic' modes; got {mode!r}.")
    tensor = torch.as_tensor(np.asarray(activation_map, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode=mode, align_corners=False)[0, 0].numpy()


def cell_box(
    cell: tuple[int, int], grid: tuple[int, int], image_size: tuple[int, int], rule: str, patch_size: int | None = None
) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) input-pixel box of feature cell (h, w) under the `"patch"` or `"pipnet"` rule."""
    (row, col), (rows, cols), (height, width) = cell, grid, image_size
    if rule == "patch":
        if not patch_size:
            raise ValueError('The "patch" box rule needs the backbone\'s patch size.')
        return col * patch_size, row * patch_size, (col + 1) * patch_size, (row + 1) * patch_size
    if rule != "pipnet":
        raise ValueError(f"cell_box supports the 'patch' and 'pipnet' rules; got {rule!r}.")

    def span(index: int, count: int, side: int) -> tuple[int, int]:
        patch = min(PIPNET_PATCH_SIZE, side)
        stride = round((side - patch) / (count - 1)) if count > 1 else 0
        start = side - patch if index == count - 1 else min(index * stride, side - patch)
        return start, start + patch

    left, right = span(col, cols, width)
    top, bottom = span(row, rows, height)
    return left, top, right, bottom


def percentile_box(upsampled: np.ndarray, percentile: float = PROTOPNET_PERCENTILE) -> tuple[int, int, int, int]:
    """ProtoPNet's box: around the pixels at or above the map's `percentile`-th percentile."""
    rows, cols = np.nonzero(upsampled >= np.percentile(upsampled, percentile))
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


# ---- the explanation of one image -------------------------------------------------------------------------------


@dataclass
class ConceptEvidence:
    """One concept's part in a class logit.

    Attributes:
        concept: the concept's index in the codebook.
        score: its presence score s_k in the image (the max of its activation map), in (0, 1).
        weight: ReLU(W)_ck, its weight for the explained class.
        contribution: score × weight, what it adds to the logit.
        share: contribution / logit.
        activation_map: `(h, w)` its activation map p_k at feature resolution.
        upsampled_map: `(H, W)` that map bilinearly interpolated to the model input.
        peak_cell: (h, w) the cell of the map's maximum.
        box: (left, top, right, bottom) the peak's box in model-input pixels, under `Explanation.box_rule`.
        similarity: the raw cosine between the concept and the feature vector at the peak.
    """

    concept: int
    score: float
    weight: float
    contribution: float
    share: float
    activation_map: np.ndarray
    upsampled_map: np.ndarray
    peak_cell: tuple[int, int]
    box: tuple[int, int, int, int]
    similarity: float


@dataclass
class Explanation:
    """Why the model gave one image's class its logit.

    Attributes:
        predicted_class / predicted_label: the model's prediction.
        target_class / target_label: the explained class (the prediction unless another was asked for).
        logit: the target class's logit as the sum of all concept contributions (float64; the model's float32
            logit agrees to rounding).
        probability: the target class's softmax probability.
        contributions: `(K,)` every concept's contribution to that logit; they sum to `logit`.
        concepts: the `top_k` concepts by contribution, largest first (only concepts with a positive contribution).
        rest: the contribution of all other concepts (logit = Σ top-k contributions + rest).
        image: `(H, W, 3)` uint8, the model input as an image (de-normalised pixel values).
        box_rule / upsampling: how boxes and upsampled maps were made.
    """

    predicted_class: int
    predicted_label: str
    target_class: int
    target_label: str
    logit: float
    probability: float
    contributions: np.ndarray
    concepts: list[ConceptEvidence]
    rest: float
    image: np.ndarray
    box_rule: str
    upsampling: str = "bilinear (align_corners=False) from the feature grid"
    gallery: dict[int, list[PIL.Image.Image]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain Python and NumPy: numbers, labels, and per concept its maps as arrays."""
        concepts = [dict(evidence.__dict__) for evidence in self.concepts]
        return {
            "predicted_class": self.predicted_class, "predicted_label": self.predicted_label,
            "target_class": self.target_class, "target_label": self.target_label,
            "logit": self.logit, "probability": self.probability, "rest": self.rest,
            "box_rule": self.box_rule, "upsampling": self.upsampling, "concepts": concepts,
        }


def pixels_to_image(pixel_values: torch.Tensor, image_mean, image_std) -> np.ndarray:
    """`(3, H, W)` normalised pixel values back to an `(H, W, 3)` uint8 image."""
    mean = torch.as_tensor(image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(image_std, dtype=torch.float32).view(-1, 1, 1)
    image = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def resolve_class(model, target) -> int | None:
    """A class index from an index or a label name (None: the prediction). A string is a label name first, then,
    if no label has that name and it is a number (as typed on a command line), an index."""
    if target is None:
        return None
    if isinstance(target, str):
        label2id = {label: index for index, label in model.config.id2label.items()}
        if target in label2id:
            return label2id[target]
        if not target.isdigit():
            raise ValueError(f"Unknown class {target!r}; the model's classes are {sorted(label2id)}.")
    if not 0 <= int(target) < model.config.num_labels:
        raise ValueError(f"Class index {target} out of range [0, {model.config.num_labels - 1}].")
    return int(target)


@torch.no_grad()
def explain_outputs(
    model,
    pixel_values: torch.Tensor,
    outputs,
    *,
    top_k: int = 3,
    target=None,
    box_rule: str | None = None,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
) -> list[Explanation]:
    """Explanations of a batch from the model's outputs (which need `activation_maps` and `similarity_maps`).

    Args:
        model: the ProtoQuant classifier that produced `outputs`.
        pixel_values: `(B, 3, H, W)` its inputs.
        top_k: concepts to detail per image (1 … K).
        target: the class to explain (index or label), the prediction when None.
        box_rule: "patch", "pipnet" or "protopnet"; the backbone's default (`default_box_rule`) when None.
        image_mean / image_std: the processor's normalisation, to show the input as an image.
    """
    num_concepts = model.config.num_concepts
    if not 1 <= top_k <= num_concepts:
        raise ValueError(f"top_k must be in [1, {num_concepts}] (the model has {num_concepts} concepts); got {top_k}.")
    box_rule = box_rule or default_box_rule(model)
    if box_rule not in BOX_RULES:
        raise ValueError(f"box_rule must be one of {BOX_RULES}; got {box_rule!r}.")
    target_class = resolve_class(model, target)
    weights = F.relu(model.classifier.weight.detach()).double().cpu()  # (C, K)
    scores = outputs.concept_scores.double().cpu()
    maps = outputs.activation_maps.float().cpu()
    similarity = outputs.similarity_maps.float().cpu()
    probabilities = outputs.logits.float().softmax(-1).cpu()
    height, width = pixel_values.shape[-2:]
    grid = tuple(maps.shape[-2:])
    patch = getattr(model.config.backbone_config, "patch_size", None)
    explanations = []
    for index in range(len(scores)):
        predicted = int(outputs.logits[index].argmax())
        explained = predicted if target_class is None else target_class
        contributions = (scores[index] * weights[explained]).numpy()
        logit = float(contributions.sum())
        # The top_k largest contributions; concepts that add nothing to this class are never "evidence".
        order = np.array([k for k in np.argsort(-contributions, kind="stable")[:top_k] if contributions[k] > 0], dtype=np.int64)
        concepts = []
        for concept in order.tolist():
            activation = maps[index, concept].numpy()
            row, col = np.unravel_index(int(activation.argmax()), activation.shape)
            upsampled = upsample_map(activation, (height, width))
            if box_rule == "protopnet":
                box = percentile_box(upsampled)
            else:
                box = cell_box((int(row), int(col)), grid, (height, width), box_rule, patch_size=patch)
            concepts.append(
                ConceptEvidence(
                    concept=concept,
                    score=float(scores[index, concept]),
                    weight=float(weights[explained, concept]),
                    contribution=float(contributions[concept]),
                    share=float(contributions[concept] / logit) if logit > 0 else 0.0,
                    activation_map=activation,
                    upsampled_map=upsampled,
                    peak_cell=(int(row), int(col)),
                    box=tuple(int(v) for v in box),
                    similarity=float(similarity[index, concept, row, col]),
                )
            )
        rest = float(contributions.sum() - contributions[order].sum())
        id2label = model.config.id2label
        explanations.append(
            Explanation(
                predicted_class=predicted, predicted_label=str(id2label[predicted]),
                target_class=explained, target_label=str(id2label[explained]),
                logit=logit, probability=float(probabilities[index, explained]),
                contributions=contributions, concepts=concepts, rest=rest,
                image=pixels_to_image(pixel_values[index], image_mean, image_std), box_rule=box_rule,
            )
        )
    return explanations


def render_explanation(explanation: Explanation, scale: int = 2) -> PIL.Image.Image:
    """A quick PIL picture of an explanation (no plotting library needed): the input, then per top concept its
    upsampled activation map over the input with the peak box, and its gallery patches when attached. The
    package's `protoquant_hf.explain.plot_explanation` draws the annotated figure."""
    image = PIL.Image.fromarray(explanation.image)
    width, height = image.size
    size = (width * scale, height * scale)
    thumbs = max((len(explanation.gallery.get(e.concept, [])) for e in explanation.concepts), default=0)
    canvas = PIL.Image.new("RGB", (size[0] * (2 + thumbs), size[1] * len(explanation.concepts)), "white")
    canvas.paste(image.resize(size, PIL.Image.NEAREST), (0, 0))
    from PIL import ImageDraw

    for row, evidence in enumerate(explanation.concepts):
        heat = np.asarray(evidence.upsampled_map, dtype=np.float32)
        heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
        colour = np.stack([heat, heat**2, 1 - heat], axis=-1) * 255  # blue (low) to yellow-red (high)
        overlay = (0.45 * explanation.image + 0.55 * colour).astype(np.uint8)
        tile = PIL.Image.fromarray(overlay).resize(size, PIL.Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        left, top, right, bottom = (value * scale for value in evidence.box)
        draw.rectangle([left, top, right - 1, bottom - 1], outline=(255, 255, 255), width=2)
        canvas.paste(tile, (size[0], row * size[1]))
        for column, patch in enumerate(explanation.gallery.get(evidence.concept, [])):
            canvas.paste(patch.resize(size, PIL.Image.BICUBIC), (size[0] * (2 + column), row * size[1]))
    return canvas


# ---- the gallery stored with the model -------------------------------------------------------------------------


def concepts_fingerprint(concepts: torch.Tensor) -> str:
    """Hash of the concept vectors: a gallery belongs to exactly one codebook."""
    return hashlib.sha256(concepts.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class ConceptGallery:
    """Each concept's nearest training patches, with where they came from.

    Attributes:
        thumbnails: per concept, its patches as PIL images (best match first).
        scores: `(K, n)` cosine similarity of each patch's feature vector to the concept (-inf: no patch).
        rows: `(K, n)` the training image (dataset row) of each patch.
        cells: `(K, n, 2)` its feature cell (h, w).
        boxes: `(K, n, 4)` its (left, top, right, bottom) box in model-input pixels.
        info: what it was built from: "concepts_sha256", "dataset", "box_rule", "image_size", "thumb_size".
    """

    thumbnails: list[list[PIL.Image.Image]]
    scores: np.ndarray
    rows: np.ndarray
    cells: np.ndarray
    boxes: np.ndarray
    info: dict

    @property
    def num_concepts(self) -> int:
        return len(self.thumbnails)

    def check_matches(self, model) -> None:
        """Refuse a gallery built for another codebook (other K or other concept vectors)."""
        if self.num_concepts != model.config.num_concepts:
            raise ValueError(
                f"This gallery has {self.num_concepts} concepts but the model has {model.config.num_concepts}: it was "
                "built for another codebook (pruned or edited since?). Rebuild it with `protoquant gallery`."
            )
        if self.info.get("concepts_sha256") != concepts_fingerprint(model.codebook.concepts):
            raise ValueError(
                "This gallery was built for other concept vectors than the model's (same K, different concepts). "
                "Rebuild it with `protoquant gallery`."
            )

    def select(self, keep, concepts: torch.Tensor) -> "ConceptGallery":
        """The gallery of the kept concepts (indices into this gallery) after a codebook was pruned to `concepts`:
        a kept concept's nearest patches do not depend on the other concepts, so they stay valid."""
        keep = [int(index) for index in keep]
        if len(keep) != len(concepts):
            raise ValueError(f"Kept {len(keep)} concepts but the pruned codebook has {len(concepts)}.")
        return ConceptGallery(
            thumbnails=[self.thumbnails[index] for index in keep], scores=self.scores[keep], rows=self.rows[keep],
            cells=self.cells[keep], boxes=self.boxes[keep],
            info={**self.info, "concepts_sha256": concepts_fingerprint(concepts)},
        )

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``gallery/patches.safetensors`` and ``gallery/index.json`` into `folder`."""
        from safetensors.torch import save_file

        target = Path(folder) / GALLERY_DIR
        target.mkdir(parents=True, exist_ok=True)
        encoded, offsets = [], [0]
        for patches in self.thumbnails:
            for patch in patches:
                buffer = io.BytesIO()
                patch.convert("RGB").save(buffer, format="JPEG", quality=90, subsampling=0)  # 4:4:4 keeps thin colours
                encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
                offsets.append(offsets[-1] + len(encoded[-1]))
        counts = [len(patches) for patches in self.thumbnails]
        tensors = {
            "jpeg": torch.from_numpy(np.concatenate(encoded) if encoded else np.zeros(0, np.uint8)),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "counts": torch.tensor(counts, dtype=torch.int64),
            "scores": torch.from_numpy(np.asarray(self.scores, dtype=np.float32)),
            "rows": torch.from_numpy(np.asarray(self.rows, dtype=np.int64)),
            "cells": torch.from_numpy(np.asarray(self.cells, dtype=np.int64)),
            "boxes": torch.from_numpy(np.asarray(self.boxes, dtype=np.int64)),
        }
        save_file(tensors, str(target / "patches.safetensors"))
        index = {"format": GALLERY_FORMAT_VERSION, "num_concepts": self.num_concepts, **self.info}
        (target / "index.json").write_text(json.dumps(index, indent=2))
        return target

    @classmethod
    def load(cls, folder_or_repo: str | os.PathLike) -> "ConceptGallery":
        """Load the gallery of a model folder or Hub repo. Raises FileNotFoundError (with the command that builds
        one) when it has none."""
        from safetensors.torch import load_file
        from transformers.utils import cached_file

        try:
            index_path = cached_file(str(folder_or_repo), f"{GALLERY_DIR}/index.json", _raise_exceptions_for_missing_entries=False)
            patches_path = cached_file(str(folder_or_repo), f"{GALLERY_DIR}/patches.safetensors", _raise_exceptions_for_missing_entries=False)
        except OSError:
            index_path = patches_path = None
        if not index_path or not patches_path:
            raise FileNotFoundError(
                f"{folder_or_repo} has no concept gallery ({GALLERY_DIR}/). Build one with "
                f"`protoquant gallery --model {folder_or_repo} --dataset <training data> --output_dir <new folder>`."
            )
        info = json.loads(Path(index_path).read_text())
        if info.get("format") != GALLERY_FORMAT_VERSION:
            raise ValueError(f"Gallery format {info.get('format')} is not supported (expected {GALLERY_FORMAT_VERSION}).")
        tensors = load_file(patches_path)
        data, offsets = tensors["jpeg"].numpy(), tensors["offsets"].tolist()
        thumbnails, position = [], 0
        for count in tensors["counts"].tolist():
            patches = []
            for _ in range(count):
                chunk = data[offsets[position] : offsets[position + 1]].tobytes()
                patches.append(PIL.Image.open(io.BytesIO(chunk)).convert("RGB"))
                position += 1
            thumbnails.append(patches)
        info.pop("format", None)
        info.pop("num_concepts", None)
        return cls(
            thumbnails=thumbnails, scores=tensors["scores"].numpy(), rows=tensors["rows"].numpy(),
            cells=tensors["cells"].numpy(), boxes=tensors["boxes"].numpy(), info=info,
        )


__all__ = [
    "BOX_RULES",
    "ConceptEvidence",
    "ConceptGallery",
    "Explanation",
    "cell_box",
    "concepts_fingerprint",
    "default_box_rule",
    "explain_outputs",
    "percentile_box",
    "pixels_to_image",
    "render_explanation",
    "resolve_class",
    "upsample_map",
]
