"""The codebook gallery: each concept's nearest training patches, found in one streaming pass and stored with the
model.

`ConceptStats.collect` keeps a running top-n of (row, cell, cosine) per concept over the training feature maps
(bounded memory at any dataset size); the patches are then cut out of the processed training images, each image
processed once, under the backbone's box rule, and kept as small thumbnails.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import PIL.Image
import torch
from datasets import IterableDataset
from torch.utils.data import DataLoader

from ..concepts import ConceptStats, FeatureCache
from ..data import collate_fn, make_image_transform
from ..explanation_protoquant import ConceptGallery, cell_box, concepts_fingerprint, default_box_rule, pixels_to_image


def _feature_batches(model, dataset, transform, batch_size: int):
    parameter = next(model.parameters())
    loader = DataLoader(dataset.with_transform(transform), batch_size=batch_size, collate_fn=collate_fn)
    with torch.no_grad():
        for batch in loader:
            yield model.forward_features(batch["pixel_values"].to(parameter.device)), batch["labels"]


def _examples_at(dataset, rows: list[int], features: FeatureCache | None) -> Iterator[tuple[int, dict]]:
    """(row, example) for the sorted `rows`: by index in a map-style dataset; a stream is read once, in the cache's
    row order, only up to the last row wanted."""
    if not isinstance(dataset, IterableDataset):
        yield from ((row, dataset[row]) for row in rows)
        return
    if features is None:
        raise ValueError("A gallery of a streamed split needs its feature cache (features=...), which fixes the row order.")
    wanted = iter(rows)
    target = next(wanted, None)
    for row, example in enumerate(features.examples_in_row_order(dataset)):
        if target is None:
            return
        if row == target:
            yield row, example
            target = next(wanted, None)


def build_gallery(
    model,
    dataset,
    image_processor,
    *,
    per_concept: int = 5,
    thumb_size: int = 32,
    features: FeatureCache | None = None,
    stats: ConceptStats | None = None,
    box_rule: str | None = None,
    batch_size: int = 64,
    dataset_name: str | None = None,
    show_progress: bool = True,
) -> tuple[ConceptGallery, ConceptStats]:
    """Find every concept's `per_concept` nearest training patches and cut them out.

    Args:
        model: the trained ProtoQuant classifier.
        dataset: the training split (an ``image`` and a ``label`` column), in the row order of `features`.
        image_processor: the model's processor (the patches are cut from what the model saw).
        per_concept: patches kept per concept.
        thumb_size: side of the stored thumbnails in pixels.
        features: the split's feature cache, if there is one (saves running the backbone again).
        stats: the `ConceptStats` of this model over this split with ``top_n=per_concept``, if the caller has
            collected them already (the pass over the split is then skipped).
        box_rule: "patch" or "pipnet" (cell-based rules); the backbone's default when None.
        batch_size: images per backbone forward when no cache is given.
        dataset_name: recorded in the gallery's index.

    Returns:
        (the gallery, the `ConceptStats` of the pass: usage, grounding, per-class presence).
    """
    if per_concept < 1:
        raise ValueError(f"per_concept must be >= 1, got {per_concept}.")
    box_rule = box_rule or default_box_rule(model)
    if box_rule not in ("patch", "pipnet"):
        raise ValueError(f"The gallery cuts patches at feature cells: box_rule must be 'patch' or 'pipnet', got {box_rule!r}.")
    model.eval()
    transform = make_image_transform(image_processor)
    if stats is None:
        source = features if features is not None else _feature_batches(model, dataset, transform, batch_size)
        stats = ConceptStats.collect(model, source, top_n=per_concept, show_progress=show_progress)
    elif stats.top_rows.shape != (model.config.num_concepts, per_concept):
        raise ValueError(
            f"The given stats keep {stats.top_rows.shape[1]} patches for {stats.top_rows.shape[0]} concepts; the "
            f"gallery needs {per_concept} for each of the model's {model.config.num_concepts} (collect them with "
            f"top_n={per_concept})."
        )

    rows, cells = stats.top_rows.numpy(), stats.top_cells.numpy()
    wanted = defaultdict(list)  # dataset row -> [(concept, slot)]
    for concept, slot in zip(*np.nonzero(rows >= 0)):
        wanted[int(rows[concept, slot])].append((int(concept), int(slot)))
    num_concepts = rows.shape[0]
    thumbnails: list[list] = [[None] * int((rows[k] >= 0).sum()) for k in range(num_concepts)]
    boxes = np.full((num_concepts, per_concept, 4), -1, dtype=np.int64)
    patch_size = getattr(model.config.backbone_config, "patch_size", None)
    image_size = None
    for row, example in _examples_at(dataset, sorted(wanted), features):
        pixels = transform({"image": [example["image"]]})["pixel_values"][0]
        image = PIL.Image.fromarray(pixels_to_image(pixels, image_processor.image_mean, image_processor.image_std))
        image_size = (image.height, image.width)
        for concept, slot in wanted[row]:
            box = cell_box(tuple(cells[concept, slot]), stats.feature_size, image_size, box_rule, patch_size=patch_size)
            boxes[concept, slot] = box
            thumbnails[concept][slot] = image.crop(box).resize((thumb_size, thumb_size), PIL.Image.BICUBIC)
    info = {
        "concepts_sha256": concepts_fingerprint(model.codebook.concepts),
        "dataset": dataset_name,
        "box_rule": box_rule,
        "image_size": list(image_size) if image_size else None,
        "thumb_size": thumb_size,
        "per_concept": per_concept,
    }
    gallery = ConceptGallery(
        thumbnails=thumbnails, scores=stats.top_scores.numpy(), rows=rows, cells=cells, boxes=boxes, info=info
    )
    return gallery, stats


__all__ = ["build_gallery"]
