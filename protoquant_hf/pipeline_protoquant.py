"""Pipelines for ProtoQuant models (Hub remote code: transformers, PIL and the standard library).

transformers' image-classification pipeline converts every image with ``Image.convert("RGB")`` before the image
processor sees it, which drops transparency onto whatever colours the file stored under it and clips 16-bit images
to white, so a model would be served on other pixels than it was trained on. `ProtoQuantImageClassificationPipeline`
is that pipeline with one difference: when the image processor is a ProtoQuant one, the image reaches it as opened
(EXIF orientation applied, nothing else), and the processor converts it exactly as training did. For every other
model it is the stock pipeline.

It takes the place of the stock implementation of the "image-classification" task when this package is imported,
and when a ProtoQuant folder's remote code is loaded while `transformers.pipelines` is in use, so
``pipeline("image-classification", model=folder)`` needs nothing new from its callers.
"""

from __future__ import annotations

import base64
import io
import os

import PIL.Image
import PIL.ImageOps
from transformers.pipelines.image_classification import ImageClassificationPipeline


def open_image(image, timeout: float | None = None) -> PIL.Image.Image:
    """transformers' `load_image` (paths, http(s) URLs, base64 strings, PIL images) without its final
    ``convert("RGB")``: the EXIF orientation is applied, the colour mode is kept."""
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            import httpx

            image = PIL.Image.open(io.BytesIO(httpx.get(image, timeout=timeout, follow_redirects=True).content))
        elif os.path.isfile(image):
            image = PIL.Image.open(image)
        else:
            data = image.split(",", 1)[1] if image.startswith("data:image/") else image
            try:
                image = PIL.Image.open(io.BytesIO(base64.decodebytes(data.encode())))
            except Exception as error:
                raise ValueError(
                    "Incorrect image source. Must be a valid URL starting with `http://` or `https://`, a valid path "
                    f"to an image file, or a base64 encoded string. Got {image[:80]!r}. Failed with {error}"
                ) from None
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(
            "Incorrect format used for image. Should be an url linking to an image, a base64 string, a local path, "
            f"or a PIL image; got {type(image).__name__}."
        )
    return PIL.ImageOps.exif_transpose(image)


class ProtoQuantImageClassificationPipeline(ImageClassificationPipeline):
    """The image-classification pipeline, handing ProtoQuant image processors the image as opened."""

    def preprocess(self, image, timeout=None):
        if not getattr(self.image_processor, "converts_like_protoquant_training", False) or not isinstance(
            image, (str, PIL.Image.Image)
        ):
            return super().preprocess(image, timeout=timeout)
        model_inputs = self.image_processor(images=open_image(image, timeout=timeout), return_tensors="pt")
        return model_inputs.to(self.dtype)


def use_protoquant_image_classification() -> None:
    """Make `ProtoQuantImageClassificationPipeline` the implementation of the "image-classification" task
    (stock behaviour for every model whose processor is not a ProtoQuant one)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.supported_tasks["image-classification"]["impl"] = ProtoQuantImageClassificationPipeline


__all__ = ["ProtoQuantImageClassificationPipeline", "open_image", "use_protoquant_image_classification"]
