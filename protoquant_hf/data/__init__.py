"""Datasets and preprocessing: any image-classification source in, ``pixel_values`` / ``labels`` batches out.

``datasets.py`` loads bundled offline datasets, local folders and Hub datasets as one uniform ``DatasetDict``;
``preprocessing.py`` turns its images into model inputs with the backbone's own image processor.
"""

from .datasets import BUNDLED_DATASETS, MIN_IMAGE_SIZE, load_image_dataset
from .preprocessing import collate_fn, make_image_transform, random_augment, to_8bit, to_rgb, with_image_size

__all__ = [
    "BUNDLED_DATASETS",
    "MIN_IMAGE_SIZE",
    "collate_fn",
    "load_image_dataset",
    "make_image_transform",
    "random_augment",
    "to_8bit",
    "to_rgb",
    "with_image_size",
]
