"""A generated image dataset with part annotations, whose classes are *combinations* of parts.

A part type is one shape + colour + texture (``"red-circle"``, ``"cyan-striped-square"``, …; see
:data:`PART_TYPES`). Each class is a set of ``parts_per_class`` part types, and every image of a class shows exactly
those parts, once each, at random non-overlapping positions and sizes, on a noisy grey background. Part types are
shared between classes (with the defaults every part type belongs to two classes), so no single part identifies a
class: a classifier has to detect the combination. Since every part's position is recorded, the dataset can check
whether an interpretable model's concepts, and where they fire, land on the parts that decide the class, which
real datasets without part annotations cannot.

Annotation format: column ``parts`` holds, per image, a list with one dict per part (in drawing order)::

    {"part": int,                          # part type, a ClassLabel over the part type names (`part_names`)
     "keypoint": [x, y],                   # float32: centre of the part's shape
     "box": [left, top, right, bottom]}    # int32: tight bounds of the part's pixels, right / bottom exclusive

Coordinates are pixels of the stored image, in the frame where the image spans ``[0, width] x [0, height]`` and
pixel (column ``c``, row ``r``) covers ``[c, c + 1) x [r, r + 1)``, so ``pixels[top:bottom, left:right]`` crops a
part and the pixel under a keypoint is ``pixels[int(y), int(x)]``. For the hollow shapes (ring, frame) the keypoint
lies in the hole. Keypoint and box are the whole annotation, no per-pixel mask is stored because none is needed:
the background is exactly grey (equal R, G, B) and every part pixel is strongly coloured, so a part's pixels are
the coloured pixels of its box, and everything outside all boxes is background.

Generation is deterministic: the same :class:`SyntheticPartsConfig` gives byte-identical images and annotations
on every run (given the same numpy and Pillow), and its :meth:`~SyntheticPartsConfig.key` names the cached copy
that ``load_image_dataset("synthetic-parts", synthetic_parts=config)`` builds once and memory-maps afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value

from ..image_processing_protoquant import MIN_IMAGE_SIZE
from .config_fields import config_from_fields

#: Version of the drawing and annotation layout. It is part of the cache folder name: bump it whenever generated
#: images or annotations change for an unchanged config, so stale cached copies are rebuilt.
SYNTHETIC_PARTS_VERSION = 1

# Smallest part side, in pixels, at which the shapes (a star, a ring) are still told apart.
_MIN_PART_PIXELS = 5
# Least distance in pixels between the square footprints of two parts. Footprints 2 px apart leave at least one
# background pixel between the parts' tight boxes (a box can reach half a pixel past its footprint).
_GAP = 2
# Random positions tried per part before the image falls back to the jittered grid placement.
_PLACEMENT_TRIES = 50
# Brightness of the dark half of striped and checkered textures; even dark pixels stay clearly coloured.
_SHADE = 0.55
# Background: per-image grey level range, largest gradient across the image (grey levels), in 0-255 units.
_BACKGROUND_LEVELS = (90.0, 160.0)
_BACKGROUND_GRADIENT = 40.0


# --------------------------------------------------------------------------------------------------------------
# Part types
# --------------------------------------------------------------------------------------------------------------

# Shapes are masks over a part's footprint in coordinates u (right) and v (down), both in [-1, 1].


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star, one tip up, outer radius 1 and inner radius 0.45."""
    # Fold every point into the half-sector between a tip (angle 0) and the next inner corner (angle pi / 5), then
    # keep the points on the centre's side of the edge from the tip (1, 0) to that corner.
    angle = np.abs((np.arctan2(u, -v) + np.pi / 5) % (2 * np.pi / 5) - np.pi / 5)
    radius = np.hypot(u, v)
    x, y = radius * np.cos(angle), radius * np.sin(angle)
    edge_x, edge_y = 0.45 * np.cos(np.pi / 5) - 1, 0.45 * np.sin(np.pi / 5)
    return edge_x * y - edge_y * (x - 1) >= 0


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u**2 + v**2 <= 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 1,
    "triangle": lambda u, v: np.abs(u) <= (v + 1) / 2,  # apex up: image rows (v) grow downwards
    "cross": lambda u, v: np.minimum(np.abs(u), np.abs(v)) <= 0.33,
    "ring": lambda u, v: (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.55**2),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
    "star": _star,
    "hexagon": lambda u, v: (np.abs(v) <= 0.87) & (0.87 * np.abs(u) + 0.5 * np.abs(v) <= 0.87),
    "frame": lambda u, v: np.maximum(np.abs(u), np.abs(v)) >= 0.55,
}

# Textures: brightness factor per pixel of the footprint (about five stripes / checks across a part).
_TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "solid": lambda u, v: np.ones_like(u),
    "striped": lambda u, v: np.where(np.floor((u + v) * 2.5) % 2 == 0, 1.0, _SHADE),
    "checkered": lambda u, v: np.where((np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 0, 1.0, _SHADE),
}


@dataclass(frozen=True)
class PartType:
    """One kind of part: a shape, a colour (RGB, 0-255) and a texture; ``name`` reads e.g. ``"red-circle"``."""

    color_name: str
    color: tuple[int, int, int]
    shape: str
    texture: str = "solid"

    @property
    def name(self) -> str:
        texture = [] if self.texture == "solid" else [self.texture]
        return "-".join([self.color_name, *texture, self.shape])


#: Every part type the generator can draw; a config uses the first ``num_part_types``. Each has its own hue (over
#: 40 degrees apart among the first six, which the defaults use; over 18 among all twelve), so a part's colour
#: alone tells its type.
PART_TYPES: tuple[PartType, ...] = (
    PartType("red", (220, 40, 40), "circle"),
    PartType("blue", (40, 80, 220), "square"),
    PartType("green", (40, 170, 60), "triangle"),
    PartType("yellow", (230, 210, 40), "cross"),
    PartType("magenta", (210, 50, 200), "ring"),
    PartType("cyan", (40, 200, 210), "square", "striped"),
    PartType("orange", (240, 140, 30), "diamond"),
    PartType("purple", (130, 60, 200), "star"),
    PartType("lime", (150, 220, 40), "circle", "checkered"),
    PartType("pink", (240, 110, 160), "hexagon"),
    PartType("sky", (90, 170, 240), "frame"),
    PartType("mint", (60, 220, 160), "triangle", "striped"),
)


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)



@dataclass(frozen=True)
class SyntheticPartsConfig:
    """What to generate. Every field is part of :meth:`key`, so each config has its own cached copy.

    Args:
        num_classes: Number of classes; each is a distinct set of ``parts_per_class`` part types, so at most
            ``C(num_part_types, parts_per_class)``.
        parts_per_class: Parts in every image (one of each of its class's part types).
        num_part_types: How many of :data:`PART_TYPES` are used (at most ``len(PART_TYPES)``).
        image_size: Side of the square RGB images, in pixels.
        train_size: Images in the ``train`` split (classes balanced within one image).
        test_size: Images in the ``test`` split.
        seed: Seeds the class compositions and every image; other seeds give other classes and images.
        part_size: Smallest and largest side of a part's square footprint, as fractions of ``image_size``
            (default 14-20 px at 64 px). Each part's side is drawn uniformly from this range.
        background_noise: Standard deviation of the background's per-pixel grey noise, in 0-255 levels.
        color_jitter: Each part's colour is scaled per channel by a factor drawn from ``[1 - j, 1 + j]``.
    """

    num_classes: int = 6
    parts_per_class: int = 2
    num_part_types: int = 6
    image_size: int = 64
    train_size: int = 1200
    test_size: int = 300
    seed: int = 0
    part_size: tuple[float, float] = (14 / 64, 20 / 64)
    background_noise: float = 12.0
    color_jitter: float = 0.1

    def __post_init__(self):
        if isinstance(self.part_size, list):  # from JSON or a dict of fields
            object.__setattr__(self, "part_size", tuple(self.part_size))
        self._validate()
        # Numbers as floats, so equal configs (background_noise=12 and 12.0) have the same key.
        for name in ("background_noise", "color_jitter"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "part_size", tuple(float(fraction) for fraction in self.part_size))

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> SyntheticPartsConfig:
        """Build a config from a dict of its fields (missing ones take their defaults)."""
        return config_from_fields(cls, fields)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (``part_size`` as a list)."""
        fields = dataclasses.asdict(self)
        fields["part_size"] = list(self.part_size)
        return fields

    def key(self) -> str:
        """A short stable hash of all fields (12 hex digits), naming this config's cached copy."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def part_size_pixels(self) -> tuple[float, float]:
        """``part_size`` in pixels: the smallest and largest side of a part's footprint."""
        return self.part_size[0] * self.image_size, self.part_size[1] * self.image_size

    def _validate(self) -> None:
        for name in ("num_classes", "parts_per_class", "num_part_types", "image_size", "train_size", "test_size",
                     "seed"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
        for name in ("background_noise", "color_jitter"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")

        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: a classifier needs at least 2 classes.")
        if not 2 <= self.num_part_types <= len(PART_TYPES):
            raise ValueError(
                f"num_part_types={self.num_part_types} must be between 2 and {len(PART_TYPES)}, the number of "
                f"part types the generator draws (PART_TYPES)."
            )
        if not 1 <= self.parts_per_class <= self.num_part_types:
            raise ValueError(
                f"parts_per_class={self.parts_per_class} must be between 1 and num_part_types={self.num_part_types} "
                f"(a class uses each part type at most once)."
            )
        combinations = math.comb(self.num_part_types, self.parts_per_class)
        if self.num_classes > combinations:
            raise ValueError(
                f"num_classes={self.num_classes} is more than the {combinations} distinct combinations of "
                f"parts_per_class={self.parts_per_class} out of num_part_types={self.num_part_types} part types "
                f"(C({self.num_part_types}, {self.parts_per_class})); lower num_classes or raise num_part_types."
            )
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size={self.image_size} is below the {MIN_IMAGE_SIZE} px minimum image side.")
        for name in ("train_size", "test_size"):
            if getattr(self, name) < self.num_classes:
                raise ValueError(
                    f"{name}={getattr(self, name)} is smaller than num_classes={self.num_classes}: each split needs "
                    f"at least one image per class."
                )
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0.")
        if (
            not isinstance(self.part_size, tuple)
            or len(self.part_size) != 2
            or not all(_is_number(fraction) for fraction in self.part_size)
            or not 0 < self.part_size[0] <= self.part_size[1]
        ):
            raise ValueError(
                f"part_size={self.part_size!r} must be (smallest, largest) fractions of image_size with "
                f"0 < smallest <= largest, e.g. (0.22, 0.31)."
            )
        smallest, largest = self.part_size_pixels
        if smallest < _MIN_PART_PIXELS:
            raise ValueError(
                f"part_size[0]={self.part_size[0]:g} makes parts of {smallest:g} px at image_size={self.image_size}, "
                f"below the {_MIN_PART_PIXELS} px at which shapes can be told apart; raise part_size[0] to at least "
                f"{_MIN_PART_PIXELS / self.image_size:.3g} or raise image_size."
            )
        if largest + _GAP > self.image_size:
            raise ValueError(
                f"part_size[1]={self.part_size[1]:g} makes parts of up to {largest:g} px, too large for a "
                f"{self.image_size} px image with its {_GAP} px margin; lower part_size[1] to at most "
                f"{(self.image_size - _GAP) / self.image_size:.3g}."
            )
        if _grid_cells(largest, self.image_size) ** 2 < self.parts_per_class:
            raise ValueError(
                f"parts_per_class={self.parts_per_class} parts of up to {largest:g} px cannot be placed without "
                f"overlap in a {self.image_size} px image (at most {_grid_cells(largest, self.image_size) ** 2} are "
                f"guaranteed to fit); lower parts_per_class or part_size[1], or raise image_size."
            )
        if self.background_noise < 0:
            raise ValueError(f"background_noise={self.background_noise} must be >= 0 (a standard deviation).")
        if not 0 <= self.color_jitter <= 0.3:
            raise ValueError(
                f"color_jitter={self.color_jitter} must be between 0 and 0.3; more would blur the colours that tell "
                f"part types apart."
            )


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def _class_compositions(config: SyntheticPartsConfig, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Choose ``num_classes`` distinct sets of ``parts_per_class`` part types (sorted tuples, sorted list).

    Part types are shared so that none identifies a class: the choice maximises how many part types appear in at
    least two classes (``sum(min(count, 2))``), by a seeded greedy search with restarts. Each step takes the set
    covering the most still-needed part types, preferring rarely used ones (balance), ties broken by a shuffled
    order; a restart reshuffles. The defaults reach the bound, every part type in exactly two classes.
    """
    combinations = np.array(list(itertools.combinations(range(config.num_part_types), config.parts_per_class)))
    members = np.zeros((len(combinations), config.num_part_types), dtype=np.int64)
    np.put_along_axis(members, combinations, 1, axis=1)
    # sum(min(count, 2)) is at most 2 per part type, and at most parts_per_class per class.
    best_possible = min(2 * config.num_part_types, config.num_classes * config.parts_per_class)
    best, best_score = None, -1
    for _ in range(64):
        order = rng.permutation(len(combinations))
        candidates, counts, chosen = members[order], np.zeros(config.num_part_types, np.int64), []
        available = np.ones(len(order), dtype=bool)
        for _ in range(config.num_classes):
            needed = candidates @ (counts < 2)
            # Lexicographic (most needed part types, then least used ones); argmax takes the first in `order`.
            score = np.where(available, needed * (config.num_classes * config.parts_per_class + 1)
                             - candidates @ counts, np.iinfo(np.int64).min)  # fmt: skip
            pick = int(np.argmax(score))
            available[pick] = False
            counts += candidates[pick]
            chosen.append(order[pick])
        coverage = int(np.minimum(counts, 2).sum())
        if coverage > best_score:
            best, best_score = chosen, coverage
        if best_score == best_possible:
            break
    return sorted(tuple(int(part) for part in combinations[index]) for index in best)


def _grid_cells(largest: float, image_size: int) -> int:
    """Grid cells per side such that a part of side ``largest`` fits in any cell with ``_GAP`` px to spare."""
    return int(image_size // (largest + _GAP))


def _place_parts(sizes: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Centres ``(k, 2)`` (x, y in px) for parts with square footprints of side ``sizes`` ``(k,)``: inside the image
    and pairwise at least ``_GAP`` px apart.

    Uniform random positions, retried per part; if a part finds no free spot (crowded configs), the whole image is
    laid out on the jittered grid instead, which the config's validation guarantees has room.
    """
    centers: list[np.ndarray] = []
    for size in sizes:
        for _ in range(_PLACEMENT_TRIES):
            center = rng.uniform(size / 2, image_size - size / 2, size=2)
            # Two squares are apart iff they are apart along at least one axis.
            if all(np.max(np.abs(center - other) - (size + other_size) / 2) >= _GAP
                   for other, other_size in zip(centers, sizes)):  # fmt: skip
                centers.append(center)
                break
        else:
            return _grid_centers(sizes, image_size, rng)
    return np.array(centers)


def _grid_centers(sizes: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Centres ``(k, 2)``: each part in its own random cell of a square grid, at a random spot inside the cell that
    keeps ``_GAP / 2`` px from the cell's sides (hence ``_GAP`` px from any other part)."""
    cells = _grid_cells(float(sizes.max()), image_size)
    cell = image_size / cells
    row, column = np.divmod(rng.choice(cells * cells, size=len(sizes), replace=False), cells)
    slack = np.maximum(cell - sizes - _GAP, 0.0)[:, None]  # >= 0 by construction; max() absorbs rounding
    offsets = (sizes[:, None] + _GAP) / 2 + rng.uniform(0, 1, size=(len(sizes), 2)) * slack
    return np.stack([column, row], axis=1) * cell + offsets


def _draw_part(pixels: np.ndarray, part: PartType, center: np.ndarray, size: float, color: np.ndarray) -> list[int]:
    """Paint one part into ``pixels`` (H, W, 3 uint8, in place) and return its tight box [left, top, right, bottom].

    The footprint is the square of side ``size`` centred on ``center`` (x, y); the painted pixels are those whose
    centres fall inside the footprint and inside the shape.
    """
    cx, cy = center
    half = size / 2
    # Pixel c is painted only if its centre c + 0.5 lies in [cx - half, cx + half].
    left, right = math.ceil(cx - half - 0.5), math.floor(cx + half - 0.5) + 1
    top, bottom = math.ceil(cy - half - 0.5), math.floor(cy + half - 0.5) + 1
    u, v = np.meshgrid((np.arange(left, right) + 0.5 - cx) / half, (np.arange(top, bottom) + 0.5 - cy) / half)
    mask = _SHAPES[part.shape](u, v)
    shaded = np.rint(_TEXTURES[part.texture](u, v)[..., None] * color).astype(np.uint8)
    pixels[top:bottom, left:right][mask] = shaded[mask]
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [left + int(columns[0]), top + int(rows[0]), left + int(columns[-1]) + 1, top + int(rows[-1]) + 1]


def _png(pixels: np.ndarray) -> dict[str, Any]:
    """Encode ``pixels`` (H, W, 3 uint8) as the ``{"bytes", "path"}`` storage of a ``datasets.Image`` value."""
    buffer = io.BytesIO()
    # zlib's fastest level: encoding dominates generation, and the noisy backgrounds come out no larger than at
    # the default level 6 (about 5 kB per 64 px image).
    PIL.Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def _generate_split(
    config: SyntheticPartsConfig, classes: list[tuple[int, ...]], size: int, rng: np.random.Generator
) -> dict[str, list]:
    """The ``image`` / ``label`` / ``parts`` columns of one split of ``size`` images, classes balanced."""
    side = config.image_size
    labels = rng.permutation(np.arange(size) % len(classes))
    position = (np.arange(side) + 0.5) / side - 0.5  # pixel centres, in image widths from the middle
    smallest, largest = config.part_size_pixels
    images, parts = [], []
    for label in labels:
        # Grey level + a gentle gradient in a random direction + per-pixel noise, equal in R, G and B: the
        # background is exactly grey, so the parts are the only colour in an image.
        level = rng.uniform(*_BACKGROUND_LEVELS)
        angle, gradient = rng.uniform(0, 2 * np.pi), rng.uniform(0, _BACKGROUND_GRADIENT)
        grey = (
            level
            + gradient * (np.cos(angle) * position[None, :] + np.sin(angle) * position[:, None])
            + rng.normal(0, config.background_noise, size=(side, side))
        )
        pixels = np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)

        part_ids = rng.permutation(classes[label])
        sizes = rng.uniform(smallest, largest, size=len(part_ids))
        centers = _place_parts(sizes, side, rng)
        jitter = rng.uniform(1 - config.color_jitter, 1 + config.color_jitter, size=(len(part_ids), 3))
        annotations = []
        for part_id, center, part_size, factor in zip(part_ids, centers, sizes, jitter):
            part = PART_TYPES[part_id]
            color = np.clip(np.array(part.color) * factor, 0, 255)
            box = _draw_part(pixels, part, center, part_size, color)
            annotations.append({"part": int(part_id), "keypoint": [float(center[0]), float(center[1])], "box": box})
        images.append(_png(pixels))
        parts.append(annotations)
    return {"image": images, "label": labels.tolist(), "parts": parts}


def _features(class_names: list[str], part_type_names: list[str]) -> Features:
    """The columns of a synthetic-parts split: ``image``, ``label`` and the ``parts`` annotations (module docstring)."""
    return Features(
        {
            "image": Image(),
            "label": ClassLabel(names=class_names),
            "parts": List(
                {
                    "part": ClassLabel(names=part_type_names),
                    "keypoint": List(Value("float32"), length=2),
                    "box": List(Value("int32"), length=4),
                }
            ),
        }
    )


def generate_synthetic_parts(config: SyntheticPartsConfig | None = None) -> DatasetDict:
    """Generate the synthetic-parts dataset of ``config`` (defaults when ``None``), in memory.

    ``load_image_dataset("synthetic-parts", synthetic_parts=config)`` calls this once per config and caches the
    result; call it directly for a copy that is never written to disk. The default 1 500 images of 64 px take 1-2 s on
    2 CPU cores (most of it PNG encoding).

    Returns:
        A ``DatasetDict`` with ``train`` (``config.train_size`` images) and ``test`` (``config.test_size``), each
        with columns ``image`` (``datasets.Image``, PNG, RGB, ``image_size`` x ``image_size``), ``label``
        (``ClassLabel``, names like ``"red-circle+blue-square"``) and ``parts`` (a list of
        ``{"part", "keypoint", "box"}`` dicts per image, see the module docstring).
    """
    config = config or SyntheticPartsConfig()
    # Independent streams, so e.g. a larger train split leaves the classes and the test images unchanged.
    classes = _class_compositions(config, np.random.default_rng([config.seed, 0]))
    part_types = PART_TYPES[: config.num_part_types]
    features = _features(
        ["+".join(part_types[part].name for part in parts) for parts in classes], [part.name for part in part_types]
    )
    splits = {}
    for stream, (split, size) in enumerate((("train", config.train_size), ("test", config.test_size)), start=1):
        columns = _generate_split(config, classes, size, np.random.default_rng([config.seed, stream]))
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


def part_names(dataset: Dataset | DatasetDict) -> list[str]:
    """The part type names of a dataset with a ``parts`` column (``parts[i]["part"]`` indexes into them).

    Args:
        dataset: A split, or a ``DatasetDict`` (its splits share the features), e.g. from
            ``load_image_dataset("synthetic-parts")``.
    """
    split = next(iter(dataset.values())) if isinstance(dataset, DatasetDict) else dataset
    feature = split.features.get("parts")
    part = feature.feature.get("part") if isinstance(feature, List) and isinstance(feature.feature, dict) else None
    if not isinstance(part, ClassLabel):
        raise ValueError(
            f"The dataset has no part annotations (a 'parts' column listing {{'part': ClassLabel, ...}} dicts); its "
            f"columns are {split.column_names}. load_image_dataset('synthetic-parts') gives one that has."
        )
    return list(part.names)


__all__ = ["PART_TYPES", "PartType", "SyntheticPartsConfig", "generate_synthetic_parts", "part_names"]
