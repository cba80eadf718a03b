"""Turn dataset images into the tensors a ProtoQuant model consumes.

Preprocessing belongs to the backbone, so it is delegated to the backbone's own transformers image processor
(resize, crop, rescale, normalise); this module only adds what processors get wrong or leave to the caller:

* **Colour modes and tiny images.** Processors convert to RGB with a plain ``Image.convert("RGB")``, which clips
  16-bit and float images to white and turns transparent pixels into whatever colour the encoder stored under them.
  Every transform here goes through :class:`~protoquant_hf.image_processing_protoquant.ProtoQuantImageProcessor`,
  which applies :func:`to_rgb` (high-bit-depth images rescaled, transparency on white) and the minimum-size rule
  first, and is the processor saved with the model, so pipelines convert exactly as training did.
* **Resolution.** ProtoQuant trains a head on a frozen backbone, often at a lower resolution than the backbone's
  default (fast CPU runs, 28 px source images). :func:`with_image_size` returns a copy of the processor set to one
  square size (its size fields say that size), so the same processor can be saved with the model and used by
  pipelines at inference time.
* **Laziness.** :func:`make_image_transform` builds a function for ``Dataset.set_transform`` /
  ``Dataset.with_transform``, so images are decoded and processed per batch and nothing is materialised twice.

Everything works with the PIL processor backends, i.e. without torchvision.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor

from ..image_processing_protoquant import HIGH_BIT_DEPTH_MODES, ProtoQuantImageProcessor, to_8bit, to_rgb


def native_image_size(image_processor: BaseImageProcessor) -> int:
    """The side of the square a backbone's image processor feeds it (its native resolution): the center crop when
    it crops, else its resize target (``{"height", "width"}`` or ``{"shortest_edge"}``).

    Raises:
        ValueError: the processor names no such size (e.g. only ``longest_edge``): pass an image size explicitly.
    """
    if isinstance(image_processor, ProtoQuantImageProcessor):
        return native_image_size(image_processor.backbone)
    config = image_processor.to_dict()
    crop, size = config.get("crop_size") or {}, config.get("size") or {}
    if config.get("do_center_crop") and crop.get("height"):
        return int(crop["height"])
    side = size.get("height") or size.get("shortest_edge")
    if not side:
        raise ValueError(
            f"Cannot tell the backbone's native resolution from its image processor (size {size}, crop_size {crop}): "
            "pass --image_size."
        )
    return int(side)


def with_image_size(image_processor: BaseImageProcessor, image_size: int) -> BaseImageProcessor:
    """A copy of ``image_processor`` that outputs ``image_size`` x ``image_size`` pixel values, and says so.

    Its size fields name the resolution the model is trained and served at, because recipes read them (the official
    image-classification example trains at ``size["shortest_edge"]``): ``{"shortest_edge"}`` processors
    (``BitImageProcessor``, ``CLIPImageProcessor``, ``ConvNextImageProcessor``, …) resize the short side to
    ``image_size`` and, when they center-crop, crop ``image_size`` x ``image_size``; ``{"height", "width"}``
    processors (``ViTImageProcessor``, ``EfficientNetImageProcessor``) resize to the square. A
    ``ProtoQuantImageProcessor`` keeps its conversion and resizes its backbone processor.

    Args:
        image_processor: The backbone's transformers image processor (or a ``ProtoQuantImageProcessor``).
        image_size: Side of the square output in pixels.

    Returns:
        A new processor of the same class; ``image_processor`` is not modified.
    """
    if isinstance(image_processor, ProtoQuantImageProcessor):
        resized = with_image_size(image_processor.backbone, image_size)
        return ProtoQuantImageProcessor(backbone_processor=resized.to_dict(), min_image_size=image_processor.min_image_size)
    config = image_processor.to_dict()
    size = config.get("size") or {}
    if size.get("shortest_edge") is not None:
        config["size"] = {"shortest_edge": image_size}
    else:
        config["size"] = {"height": image_size, "width": image_size}
    if config.get("do_center_crop") and config.get("crop_size"):
        config["crop_size"] = {"height": image_size, "width": image_size}
    return type(image_processor).from_dict(config)


def random_augment(image: PIL.Image.Image, rng: random.Random, min_scale: float = 0.6) -> PIL.Image.Image:
    """Training augmentation on a PIL image: a random crop covering ``min_scale``–100 % of the area
    (aspect ratio 3/4–4/3), resized back to the original size, then a horizontal flip with p = 0.5.

    Args:
        image: The input image (any size).
        rng: Source of randomness (seed it for reproducible runs).
        min_scale: Smallest crop area as a fraction of the image.

    Returns:
        An image of the same size and mode.
    """
    width, height = image.size
    area = width * height * rng.uniform(min_scale, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = max(1, min(width, round(math.sqrt(area * ratio))))
    crop_h = max(1, min(height, round(math.sqrt(area / ratio))))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = image.resize((width, height), PIL.Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    return image.transpose(PIL.Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def make_image_transform(
    image_processor: BaseImageProcessor,
    image_size: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    augment_seed: int | None = None,
) -> Callable[[dict[str, list[Any]]], dict[str, torch.Tensor]]:
    """Build a lazy batch transform for ``Dataset.set_transform`` / ``Dataset.with_transform``.

    Example:

    ```python
    >>> dataset = load_image_dataset("animal-mnist")
    >>> train = dataset["train"].with_transform(make_image_transform(processor, image_size=64))
    >>> train[0]["pixel_values"].shape
    torch.Size([3, 64, 64])
    ```

    With transformers' ``Trainer``, pass ``TrainingArguments(remove_unused_columns=False)`` (otherwise the image
    column is dropped before the transform sees it) and ``data_collator=collate_fn``.

    Args:
        image_processor: The backbone's transformers image processor, or the ``ProtoQuantImageProcessor`` saved
            with a model; either way images are converted by ``ProtoQuantImageProcessor``.
        image_size: Square output size in pixels; ``None`` keeps the processor's own size.
        image_column: Column holding PIL images.
        label_column: Column holding integer class ids; passed through as ``labels`` when present.
        augment_seed: When given, every image first goes through :func:`random_augment`, seeded with it
            (training-time augmentation); ``None`` (the default) is the deterministic evaluation transform.

    Returns:
        A function mapping a batch dict to ``{"pixel_values": FloatTensor (B, 3, S, S), "labels": LongTensor (B,)}``
        (``labels`` only when the batch has ``label_column``).
    """
    processor = with_image_size(image_processor, image_size) if image_size is not None else image_processor
    processor = ProtoQuantImageProcessor.wrap(processor)  # the conversion the saved model's processor applies
    rng = random.Random(augment_seed) if augment_seed is not None else None

    def transform(batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        images = batch[image_column]
        if rng is not None:
            images = [random_augment(processor.convert(image), rng) for image in images]
        outputs = {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"]}
        if label_column in batch:
            outputs["labels"] = torch.as_tensor(batch[label_column], dtype=torch.long)
        return outputs

    return transform


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into a batch, for ``torch.utils.data.DataLoader`` and ``Trainer``.

    Args:
        examples: Items of a dataset carrying :func:`make_image_transform`, each with ``pixel_values`` (3, S, S)
            and optionally ``labels``.

    Returns:
        ``{"pixel_values": (B, 3, S, S), "labels": LongTensor (B,)}`` (``labels`` only when the examples have them).
    """
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.as_tensor([int(example["labels"]) for example in examples], dtype=torch.long)
    return batch


__all__ = [
    "HIGH_BIT_DEPTH_MODES",
    "collate_fn",
    "make_image_transform",
    "native_image_size",
    "random_augment",
    "to_8bit",
    "to_rgb",
    "with_image_size",
]
