"""A seeded synthetic image stream of any length: streaming tests and data-loading benchmarks without any files.

Every class is a coloured stripe pattern: class ``c`` of ``C`` has its own hue (``360 * c / C`` degrees) and its own
stripe orientation (golden-ratio spaced, so neighbouring hues never share an angle), and each image draws its own
stripe phase, frequency, small angle and brightness jitter and per-pixel noise. A linear probe on any backbone (or on
the raw pixels) learns the classes easily, so a training run on the stream shows whether the pipeline works.

**Determinism.** Image ``i`` of a split is a pure function of ``(seed, split, i)``: :func:`synthetic_stream_image`
computes it, and the stream yields exactly those images in order ``0, 1, 2, …`` whatever its length or number of
shards (a process reading some shards gets exactly those images of theirs). Classes are assigned in blocks of ``num_classes`` consecutive images, each block a
seeded permutation of all classes, so the first ``n`` images of a split hold every class ``floor(n / C)`` or
``ceil(n / C)`` times (balanced within one image).

**Shards.** The stream is a ``datasets.IterableDataset.from_generator`` with ``num_shards`` contiguous index ranges
(``gen_kwargs={"shard_ids": [...]}``), so ``datasets.distributed.split_dataset_by_node`` and ``DataLoader`` workers
split it by shard: each process generates only its own images, and together they generate every image once.

Images are stored as binary PPM bytes (Netpbm ``P6``: a one-line text header, then the raw RGB pixels), which any
image reader (Pillow, hence ``datasets.Image``) opens: lossless, and written with no encoder at all. PNG encoding
alone would cost about 200 us per 32 px image, most of the budget for streaming thousands of images per second.

``load_image_dataset("synthetic-stream", streaming=True, synthetic_stream=SyntheticStreamConfig(...))`` gives the
``train`` / ``test`` splits (the test split is split ``"test"`` of the same config: other images, same classes);
with ``streaming=False`` the same images are materialized in memory (for small sizes and comparisons).
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, IterableDataset, IterableDatasetDict

from ..image_processing_protoquant import MIN_IMAGE_SIZE
from .config_fields import config_from_fields

#: Version of the drawing. Bump it whenever the images of an unchanged config change.
SYNTHETIC_STREAM_VERSION = 1

_SPLITS = ("train", "test")
# Separate seed namespaces for per-image randomness and per-block class permutations.
_IMAGE_STREAM, _CLASS_STREAM = 0, 1
_GOLDEN = (math.sqrt(5) - 1) / 2
# Per-pixel noise: uniform in [-a, a] with a = 12 * sqrt(3), i.e. a standard deviation of 12 levels (0-255). Uniform,
# not Gaussian: drawing it costs a third as much, and for a texture the shape of the distribution does not matter.
_NOISE_HALF_WIDTH = np.float32(12.0 * math.sqrt(3))
_SATURATION = 0.85


@dataclass(frozen=True)
class SyntheticStreamConfig:
    """What ``load_image_dataset("synthetic-stream", synthetic_stream=...)`` generates.

    Args:
        num_images: Images in the ``train`` split (any length; nothing is stored when streaming).
        num_test_images: Images in the ``test`` split.
        num_classes: Number of classes (at least 2).
        image_size: Side of the square RGB images, in pixels.
        seed: Seeds the class order and every image (a non-negative integer).
        num_shards: Shards of each split's stream (``IterableDataset.n_shards``): the most processes or
            ``DataLoader`` workers that can read it in parallel.
    """

    num_images: int = 10_000
    num_test_images: int = 2_000
    num_classes: int = 10
    image_size: int = 32
    seed: int = 0
    num_shards: int = 8

    def __post_init__(self):
        _validate(
            num_images=self.num_images, num_test_images=self.num_test_images, num_classes=self.num_classes,
            image_size=self.image_size, seed=self.seed, num_shards=self.num_shards,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> SyntheticStreamConfig:
        """Build a config from a dict of its fields (missing ones take their defaults)."""
        return config_from_fields(cls, fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    minimums = {"num_images": 1, "num_test_images": 1, "num_classes": 2, "image_size": MIN_IMAGE_SIZE, "seed": 0,
                "num_shards": 1}  # fmt: skip
    for name, value in values.items():
        if value < minimums[name]:
            raise ValueError(f"{name}={value} must be at least {minimums[name]}.")


def _split_id(split: str) -> int:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")
    return _SPLITS.index(split)


# --------------------------------------------------------------------------------------------------------------
# Classes and images
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _class_styles(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: RGB colour in [0, 1] ``(C, 3)`` float32 and stripe angle in radians ``(C,)`` float32."""
    colours = [colorsys.hsv_to_rgb(c / num_classes, _SATURATION, 1.0) for c in range(num_classes)]
    angles = np.pi * ((np.arange(num_classes) * _GOLDEN) % 1.0)
    return np.asarray(colours, dtype=np.float32), angles.astype(np.float32)


def synthetic_stream_class_names(num_classes: int = 10) -> list[str]:
    """Class names in id order, ``"hue<degrees>-stripes<degrees>"``: what each class looks like."""
    _validate(num_classes=num_classes)
    _, angles = _class_styles(num_classes)
    return [f"hue{round(360 * c / num_classes):03d}-stripes{round(math.degrees(a)):03d}" for c, a in enumerate(angles)]


@functools.lru_cache(maxsize=16)
def _grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [0, 1): x ``(1, S)`` and y ``(S, 1)``, float32 (broadcast, not materialized)."""
    coords = ((np.arange(image_size, dtype=np.float32) + 0.5) / image_size)
    return coords[None, :], coords[:, None]


def _block_classes(block: int, num_classes: int, seed: int, split_id: int) -> np.ndarray:
    """Classes of images ``block * C … block * C + C - 1``: a seeded permutation of all classes."""
    return np.random.default_rng([seed, split_id, _CLASS_STREAM, block]).permutation(num_classes)


def _render(index: int, label: int, image_size: int, seed: int, split_id: int, num_classes: int) -> np.ndarray:
    """The pixels ``(S, S, 3)`` uint8 of image ``index`` of class ``label``."""
    rng = np.random.default_rng([seed, split_id, _IMAGE_STREAM, index])
    phase, frequency, angle_jitter, brightness = rng.random(4, dtype=np.float32)
    colours, angles = _class_styles(num_classes)
    # Angle jitter stays well inside the golden-ratio spacing of class angles (at least ~pi / (2 C)).
    angle = angles[label] + (angle_jitter - 0.5) * np.float32(np.pi / (4 * max(num_classes, 4)))
    x, y = _grid(image_size)
    projection = x * np.cos(angle) + y * np.sin(angle)  # (S, S)
    stripes = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi) * ((3 + frequency) * projection + phase))
    intensity = (0.6 + 0.4 * brightness) * (0.25 + 0.75 * stripes)  # (S, S) in [0.15, 1]
    pixels = (255 * intensity)[:, :, None] * colours[label]  # (S, S, 3)
    noise = rng.random(pixels.shape, dtype=np.float32)
    pixels += _NOISE_HALF_WIDTH * (2 * noise - 1)
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


def synthetic_stream_image(
    index: int, *, num_classes: int = 10, image_size: int = 32, seed: int = 0, split: Literal["train", "test"] = "train"
) -> tuple[np.ndarray, int]:
    """Image ``index`` of a synthetic stream: ``(pixels (S, S, 3) uint8, class id)``; a pure function of its args."""
    _validate(num_classes=num_classes, image_size=image_size, seed=seed)
    split_id = _split_id(split)
    label = int(_block_classes(index // num_classes, num_classes, seed, split_id)[index % num_classes])
    return _render(index, label, image_size, seed, split_id, num_classes), label


def _encode(pixels: np.ndarray) -> bytes:
    """Binary PPM of ``(H, W, 3)`` uint8 pixels: header ``P6 <width> <height> 255`` then the rows, top first."""
    height, width, _ = pixels.shape
    return b"P6 %d %d 255\n" % (width, height) + pixels.tobytes()


def _shard_range(shard: int, num_images: int, num_shards: int) -> range:
    """Contiguous index range of one shard; the shards of a stream tile ``range(num_images)`` in order."""
    return range(shard * num_images // num_shards, (shard + 1) * num_images // num_shards)


def _generate(
    shard_ids: list[int], num_images: int, num_shards: int, num_classes: int, image_size: int, seed: int, split_id: int
) -> Iterator[dict[str, Any]]:
    """Rows ``{"image": {"bytes", "path"}, "label"}`` of the given shards, in index order."""
    for shard in shard_ids:
        block, classes = None, None
        for index in _shard_range(shard, num_images, num_shards):
            if index // num_classes != block:  # one permutation per block of C images, not per image
                block = index // num_classes
                classes = _block_classes(block, num_classes, seed, split_id)
            label = int(classes[index % num_classes])
            pixels = _render(index, label, image_size, seed, split_id, num_classes)
            yield {"image": {"bytes": _encode(pixels), "path": None}, "label": label}


def _features(num_classes: int) -> Features:
    return Features({"image": Image(), "label": ClassLabel(names=synthetic_stream_class_names(num_classes))})


def synthetic_stream(
    num_images: int,
    *,
    num_classes: int = 10,
    image_size: int = 32,
    seed: int = 0,
    num_shards: int = 8,
    split: Literal["train", "test"] = "train",
) -> IterableDataset:
    """A stream of ``num_images`` seeded synthetic images (see the module docstring).

    Args:
        num_images: Length of the stream (any; images are generated while iterating, nothing is stored).
        num_classes: Number of classes; the ``label`` column is a ``ClassLabel`` of
            :func:`synthetic_stream_class_names`.
        image_size: Side of the square RGB images, in pixels.
        seed: Seeds the class order and every image.
        num_shards: ``n_shards`` of the stream: contiguous index ranges, split across processes / workers.
        split: ``"train"`` or ``"test"``: two independent image sequences with the same classes.

    Returns:
        A ``datasets.IterableDataset`` with columns ``image`` (``datasets.Image``, decoded to an RGB
        ``PIL.Image`` of ``image_size x image_size``) and ``label`` (``ClassLabel``).
    """
    _validate(num_images=num_images, num_classes=num_classes, image_size=image_size, seed=seed, num_shards=num_shards)
    gen_kwargs = {
        "shard_ids": list(range(num_shards)),  # a list: `datasets` splits it across shards
        "num_images": num_images, "num_shards": num_shards, "num_classes": num_classes, "image_size": image_size,
        "seed": seed, "split_id": _split_id(split),
    }  # fmt: skip
    stream = IterableDataset.from_generator(_generate, features=_features(num_classes), gen_kwargs=gen_kwargs, split=split)
    # What the stream is, in its public info: a stream cannot be hashed without reading it all, so the feature cache
    # tells streams apart by their description (two lengths of this stream share their first images).
    settings = {key: value for key, value in gen_kwargs.items() if key != "shard_ids"}
    stream.info.description = f"synthetic-stream v{SYNTHETIC_STREAM_VERSION} " + json.dumps(settings, sort_keys=True)
    return stream


def generate_synthetic_stream(
    config: SyntheticStreamConfig | Mapping[str, Any] | None = None, *, streaming: bool = True
) -> IterableDatasetDict | DatasetDict:
    """``train`` (``config.num_images``) and ``test`` (``config.num_test_images``) splits of one config.

    With ``streaming=False`` the same images (byte for byte, in the same order) are generated now and held in
    memory (3 KB per 32 px image): meant for small sizes, e.g. to compare map-style and streaming runs.
    """
    config = _as_config(config)
    sizes = {"train": config.num_images, "test": config.num_test_images}
    if streaming:
        return IterableDatasetDict(
            {
                split: synthetic_stream(
                    size, num_classes=config.num_classes, image_size=config.image_size, seed=config.seed,
                    num_shards=config.num_shards, split=split,
                )  # fmt: skip
                for split, size in sizes.items()
            }
        )
    features = _features(config.num_classes)
    splits = {}
    for split, size in sizes.items():
        rows = list(_generate([0], size, 1, config.num_classes, config.image_size, config.seed, _split_id(split)))
        columns = {"image": [row["image"] for row in rows], "label": [row["label"] for row in rows]}
        splits[split] = Dataset.from_dict(columns, features=features, split=split)
    return DatasetDict(splits)


def _as_config(config: SyntheticStreamConfig | Mapping[str, Any] | None) -> SyntheticStreamConfig:
    if config is None or isinstance(config, Mapping):
        return SyntheticStreamConfig.from_dict(config or {})
    if not isinstance(config, SyntheticStreamConfig):
        raise ValueError(
            f"synthetic_stream must be a SyntheticStreamConfig or a dict of its fields, got {type(config).__name__}."
        )
    return config


__all__ = [
    "SYNTHETIC_STREAM_VERSION",
    "SyntheticStreamConfig",
    "generate_synthetic_stream",
    "synthetic_stream",
    "synthetic_stream_class_names",
    "synthetic_stream_image",
]
