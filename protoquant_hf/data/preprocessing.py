"""Turn dataset images into the tensors a ProtoQuant model consumes.

Preprocessing belongs to the backbone, so it is delegated to the backbone's own transformers image processor
(resize, crop, rescale, normalise); this module only adds what processors get wrong or leave to the caller:

* **Colour modes.** Processors convert to RGB with a plain ``Image.convert("RGB")``, which clips 16-bit and float
  images to white and turns transparent pixels into whatever colour the encoder stored under them. :func:`to_rgb`
  rescales high-bit-depth images to 8 bits and composites transparency on white first.
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

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor

# Pillow modes holding more than 8 bits per pixel; `convert("L")` clips them instead of rescaling.
HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


def to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """Rescale a high-bit-depth grayscale image to 8 bits (mode ``L``); other images are returned unchanged.

    Rules: 16-bit modes (``I;16*``) map 0..65535 onto 0..255 (divide by 257, round). Mode ``I`` (32-bit integer,
    how Pillow and TIFF often hold 16-bit data) is read the same way, clipped to 0..65535. Mode ``F`` (32-bit float)
    is read as intensities in [0, 1], clipped.

    Args:
        image: Any PIL image.

    Returns:
        A mode ``L`` image for high-bit-depth inputs, otherwise ``image`` itself.
    """
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scaled = np.clip(values, 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(values, 0, 65535) / 257.0
    return PIL.Image.fromarray(np.rint(scaled).astype(np.uint8))


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL image to 8-bit RGB without clipping or inventing colours.

    * ``I;16`` / ``I`` / ``F``: rescaled to 8 bits first (see :func:`to_8bit`), then replicated to RGB.
    * Transparency (``RGBA``, ``LA``, ``PA``, palette or ``L``/``RGB`` images with a transparent colour):
      composited on **white**. Transparent pixels usually mark background (cut-out objects, icons); white gives
      them a uniform neutral background, whereas dropping alpha exposes whatever colour the encoder stored under
      them (often black or noise).
    * ``CMYK``, ``P``, ``L``, ``1``, ``YCbCr``: Pillow's conversion (CMYK without an ICC profile).

    Args:
        image: Any PIL image.

    Returns:
        A mode ``RGB`` image of the same size.
    """
    image = to_8bit(image)
    if image.has_transparency_data:
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def with_image_size(image_processor: BaseImageProcessor, image_size: int) -> BaseImageProcessor:
    """A copy of ``image_processor`` that outputs ``image_size`` x ``image_size`` pixel values, and says so.

    Its size fields name the resolution the model is trained and served at, because recipes read them (the official
    image-classification example trains at ``size["shortest_edge"]``): ``{"shortest_edge"}`` processors
    (``BitImageProcessor``, ``CLIPImageProcessor``, ``ConvNextImageProcessor``, …) resize the short side to
    ``image_size`` and, when they center-crop, crop ``image_size`` x ``image_size``; ``{"height", "width"}``
    processors (``ViTImageProcessor``, ``EfficientNetImageProcessor``) resize to the square.

    Args:
        image_processor: The backbone's transformers image processor.
        image_size: Side of the square output in pixels.

    Returns:
        A new processor of the same class; ``image_processor`` is not modified.
    """
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
        image_processor: The backbone's transformers image processor.
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

    rng = random.Random(augment_seed) if augment_seed is not None else None

    def transform(batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        images = [to_rgb(image) for image in batch[image_column]]
        if rng is not None:
            images = [random_augment(image, rng) for image in images]
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
    "random_augment",
    "to_8bit",
    "to_rgb",
    "with_image_size",
]
