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

import logging

import PIL.Image
import PIL.ImageOps
from transformers import Pipeline
from transformers.pipelines.image_classification import ImageClassificationPipeline

from .explanation_protoquant import ConceptGallery, explain_outputs, render_explanation

logger = logging.getLogger(__name__)
CONCEPT_EXPLANATION_TASK = "concept-explanation"


def open_image(image, timeout: float | None = None) -> PIL.Image.Image:
    """transformers' `load_image` (paths, http(s) URLs, base64 strings, PIL images) without its final
    ``convert("RGB")``: the EXIF orientation is applied, the colour mode is kept."""
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            import httpx

            image = PIL.Image.open(io.BytesIO(httpx.get(image, timeout=timeout, follow_redirects=True).content))
        elif os.path.isfile(image):
            try:
                image = PIL.Image.open(image)
            except PIL.UnidentifiedImageError:
                raise ValueError(f"{image} is not an image file Pillow can read.") from None
        elif not image.startswith("data:image/") and (os.sep in image or os.path.splitext(image)[1]):
            raise FileNotFoundError(f"No such image file: {image}")
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


class ConceptExplanationPipeline(Pipeline):
    """"This looks like that" for images: ``pipeline("concept-explanation", model=folder)``.

    Each result is a dict: the predicted (or requested) class, its probability and logit, the top concepts with
    presence score, weight, contribution and share of the logit (the contributions of all concepts sum to the
    logit), their activation maps at feature resolution and upsampled, peak cells and boxes, and, when the model
    folder has a gallery, each concept's nearest training patches.

    Call arguments: ``top_concepts`` (default 3), ``target`` (a class index or label to explain instead of the
    prediction), ``box_rule`` ("patch", "pipnet", "protopnet"), ``gallery`` (attach gallery patches, default
    True), ``figure`` (add a PIL picture under "figure", default False), ``timeout`` (for URLs).
    """

    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_processor = False

    def _sanitize_parameters(self, top_concepts=None, target=None, box_rule=None, gallery=None, figure=None, timeout=None):
        preprocess = {} if timeout is None else {"timeout": timeout}
        postprocess = {
            key: value
            for key, value in (("top_concepts", top_concepts), ("target", target), ("box_rule", box_rule),
                               ("gallery", gallery), ("figure", figure))
            if value is not None
        }
        return preprocess, {}, postprocess

    def preprocess(self, image, timeout=None):
        model_inputs = self.image_processor(images=open_image(image, timeout=timeout), return_tensors="pt")
        return model_inputs.to(self.dtype)

    def _forward(self, model_inputs):
        outputs = self.model(**model_inputs, output_activation_maps=True, output_similarity_maps=True)
        return {"pixel_values": model_inputs["pixel_values"], "outputs": outputs}

    def _gallery(self) -> ConceptGallery | None:
        if not hasattr(self, "_loaded_gallery"):
            try:
                self._loaded_gallery = ConceptGallery.load(self.model.name_or_path)
            except FileNotFoundError as error:
                logger.warning("%s Explanations are shown without training patches.", error)
                self._loaded_gallery = None
            if self._loaded_gallery is not None:
                self._loaded_gallery.check_matches(self.model)
        return self._loaded_gallery

    def postprocess(self, model_outputs, top_concepts=3, target=None, box_rule=None, gallery=True, figure=False):
        processor = self.image_processor
        explanation = explain_outputs(
            self.model, model_outputs["pixel_values"], model_outputs["outputs"], top_k=top_concepts, target=target,
            box_rule=box_rule, image_mean=processor.image_mean, image_std=processor.image_std,
        )[0]
        concept_gallery = self._gallery() if gallery else None
        if concept_gallery is not None:
            explanation.gallery = {e.concept: concept_gallery.thumbnails[e.concept] for e in explanation.concepts}
        result = explanation.to_dict()
        result["gallery"] = explanation.gallery
        result["explanation"] = explanation
        if figure:
            result["figure"] = render_explanation(explanation)
        return result


def register_pipelines() -> None:
    """Make `ProtoQuantImageClassificationPipeline` the implementation of the "image-classification" task (stock
    behaviour for every model whose processor is not a ProtoQuant one) and register "concept-explanation"."""
    from transformers import AutoModelForImageClassification
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.supported_tasks["image-classification"]["impl"] = ProtoQuantImageClassificationPipeline
    entry = {"impl": ConceptExplanationPipeline, "pt": (AutoModelForImageClassification,), "type": "image"}
    PIPELINE_REGISTRY.supported_tasks[CONCEPT_EXPLANATION_TASK] = entry
    ConceptExplanationPipeline._registered_impl = {CONCEPT_EXPLANATION_TASK: entry}


__all__ = [
    "ConceptExplanationPipeline",
    "ProtoQuantImageClassificationPipeline",
    "CONCEPT_EXPLANATION_TASK",
    "open_image",
    "register_pipelines",
]
