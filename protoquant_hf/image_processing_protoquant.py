"""The image processor a ProtoQuant model is trained and served with.

One conversion for training and serving: `ProtoQuantImageProcessor` applies the EXIF orientation, refuses images
below `min_image_size` pixels a side and runs every image through `to_rgb` (16-bit and float images rescaled,
transparency composited on white, CMYK / palette converted), then hands it to the backbone's own transformers image
processor (resize, crop, rescale, normalise). The training job's transforms call this same processor, and it is
saved with the model as Hub remote code; with the image-classification pipeline of `pipeline_protoquant.py` (which
hands it images unconverted), ``pipeline("image-classification", model=folder, trust_remote_code=True)`` converts
exactly as training did, also in a process without this package.

Self-contained (PIL, numpy, transformers and the standard library).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import transformers
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import is_torchvision_available

# Pillow modes holding more than 8 bits per pixel; `convert("L")` clips them instead of rescaling.
HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
# Smallest accepted image side in pixels, in training and at inference. The smallest bundled images (scikit-learn
# digits) are 8x8; anything smaller (1x1 thumbnails, broken exports) carries no parts for prototypes to match.
MIN_IMAGE_SIZE = 8


def to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """Rescale a high-bit-depth grayscale image to 8 bits (mode ``L``); other images are returned unchanged.

    Rules: 16-bit modes (``I;16*``) map 0..65535 onto 0..255 (divide by 257, round). Mode ``I`` (32-bit integer,
    how Pillow and TIFF often hold 16-bit data) is read the same way, clipped to 0..65535. Mode ``F`` (32-bit float)
    is read as intensities in [0, 1], clipped.
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
    """
    image = to_8bit(image)
    if image.has_transparency_data:
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def check_image_size(image: PIL.Image.Image, min_image_size: int = MIN_IMAGE_SIZE) -> None:
    """Refuse an image with a side below `min_image_size` pixels (the same rule in training and serving)."""
    if min(image.size) < min_image_size:
        raise ValueError(
            f"The image is {image.width}x{image.height} px; this model accepts images of at least "
            f"{min_image_size} px a side (the rule its training data followed). Use a larger image."
        )


def _processor_class(name: str) -> type:
    """A transformers image processor class by name; its PIL backend when torchvision is not installed (the
    default class would fall back to it anyway, with a warning at every load)."""
    if not is_torchvision_available() and hasattr(transformers, f"{name}Pil"):
        return getattr(transformers, f"{name}Pil")
    if name.endswith("Pil") and is_torchvision_available() and hasattr(transformers, name[: -len("Pil")]):
        return getattr(transformers, name[: -len("Pil")])
    if not hasattr(transformers, name):
        raise ValueError(f"Unknown image processor class {name!r} (not in transformers {transformers.__version__}).")
    return getattr(transformers, name)


class ProtoQuantImageProcessor(BaseImageProcessor):
    r"""The backbone's image processor behind ProtoQuant's image conversion and size rule.

    Args:
        backbone_processor (`dict`):
            The backbone's transformers image processor, as its `to_dict()` (it names its class under
            `image_processor_type`).
        min_image_size (`int`, *optional*, defaults to 8):
            Images with a side below this many pixels are refused with a clear error, as in training.

    `size`, `crop_size`, `image_mean`, `image_std` and `resample` read through to the backbone processor, so recipes
    that read `image_processor.size["shortest_edge"]` see the resolution the model was trained at.

    Example:

    ```python
    >>> processor = ProtoQuantImageProcessor.wrap(AutoImageProcessor.from_pretrained("google/vit-base-patch16-224"))
    >>> processor(images=PIL.Image.open("cutout.png"), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 224, 224])
    ```
    """

    model_input_names = ["pixel_values"]
    # Read by ProtoQuantImageClassificationPipeline: hand this processor the image as opened, unconverted.
    converts_like_protoquant_training = True

    def __init__(self, backbone_processor: dict | None = None, min_image_size: int = MIN_IMAGE_SIZE, **kwargs):
        super().__init__(**kwargs)
        if not backbone_processor or "image_processor_type" not in backbone_processor:
            raise ValueError(
                "ProtoQuantImageProcessor needs the backbone's image processor as a dict naming its class "
                "(`ProtoQuantImageProcessor.wrap(processor)` builds one)."
            )
        self.backbone_processor = dict(backbone_processor)
        self.min_image_size = int(min_image_size)
        self._backbone = None

    @classmethod
    def wrap(cls, image_processor: BaseImageProcessor, min_image_size: int = MIN_IMAGE_SIZE) -> "ProtoQuantImageProcessor":
        """A ProtoQuant processor around a backbone's image processor (returned unchanged if it already is one)."""
        if isinstance(image_processor, ProtoQuantImageProcessor):
            return image_processor
        return cls(backbone_processor=image_processor.to_dict(), min_image_size=min_image_size)

    @property
    def backbone(self) -> BaseImageProcessor:
        """The backbone's own image processor (built once from `backbone_processor`)."""
        if self._backbone is None:
            config = dict(self.backbone_processor)
            self._backbone = _processor_class(config.pop("image_processor_type")).from_dict(config)
        return self._backbone

    # What recipes read from a processor.
    size = property(lambda self: self.backbone.size)
    crop_size = property(lambda self: getattr(self.backbone, "crop_size", None))
    image_mean = property(lambda self: self.backbone.image_mean)
    image_std = property(lambda self: self.backbone.image_std)
    resample = property(lambda self: self.backbone.resample)

    def convert(self, image: Any) -> Any:
        """One image as training sees it: PIL images get their EXIF orientation (as transformers' `load_image`
        applies it), the size rule and `to_rgb`; arrays and tensors (already decoded pixels) pass unchanged."""
        if isinstance(image, PIL.Image.Image):
            image = PIL.ImageOps.exif_transpose(image)
            check_image_size(image, self.min_image_size)
            return to_rgb(image)
        return image

    def preprocess(self, images, **kwargs) -> BatchFeature:
        """Convert the images (see `convert`), then the backbone processor's resize / crop / normalise."""
        batch = images if isinstance(images, (list, tuple)) else [images]
        return self.backbone(images=[self.convert(image) for image in batch], **kwargs)

    def __call__(self, images, *args, **kwargs) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        # No "image_processor_type" / "auto_map" here: AutoImageProcessor then finds this class through the
        # model's config.json (its `auto_map`, or the package's registration). With them, transformers'
        # pipeline() would also infer a remote *video* processor from this file and prompt about running code.
        skipped = {"image_processor_type", "auto_map"}
        return {
            key: copy.deepcopy(value)
            for key, value in self.__dict__.items()
            if not key.startswith("_") and key not in skipped
        }


__all__ = ["HIGH_BIT_DEPTH_MODES", "MIN_IMAGE_SIZE", "ProtoQuantImageProcessor", "check_image_size", "to_8bit", "to_rgb"]
