"""Datasets and preprocessing: any image-classification source in, ``pixel_values`` / ``labels`` batches out.

``datasets.py`` loads bundled offline datasets, local folders and Hub datasets as one uniform ``DatasetDict``;
``synthetic_parts.py`` generates its part-annotated synthetic dataset; ``synthetic_stream.py`` a seeded synthetic image
stream of any length; ``preprocessing.py`` turns images into model inputs with the backbone's own image processor.
With ``load_image_dataset(..., streaming=True)`` every source comes as a lazy ``IterableDatasetDict`` instead.
"""

from .datasets import BUNDLED_DATASETS, MIN_IMAGE_SIZE, check_split, hold_out_validation, load_image_dataset
from .preprocessing import collate_fn, make_image_transform, native_image_size, random_augment, to_8bit, to_rgb, with_image_size
from .synthetic_parts import SyntheticPartsConfig, generate_synthetic_parts, part_names
from .synthetic_stream import (
    SyntheticStreamConfig,
    generate_synthetic_stream,
    synthetic_stream,
    synthetic_stream_class_names,
    synthetic_stream_image,
)

__all__ = [
    "BUNDLED_DATASETS",
    "MIN_IMAGE_SIZE",
    "SyntheticPartsConfig",
    "SyntheticStreamConfig",
    "check_split",
    "collate_fn",
    "generate_synthetic_parts",
    "generate_synthetic_stream",
    "hold_out_validation",
    "load_image_dataset",
    "make_image_transform",
    "native_image_size",
    "part_names",
    "random_augment",
    "synthetic_stream",
    "synthetic_stream_class_names",
    "synthetic_stream_image",
    "to_8bit",
    "to_rgb",
    "with_image_size",
]
