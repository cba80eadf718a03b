""""This looks like that": local explanations of any image, the codebook gallery, and figures people can read.

```python
>>> from protoquant_hf.explain import explain, plot_explanation
>>> explanation = explain(model, "cat.png")[0]          # model: a trained folder loaded with from_pretrained
>>> explanation.predicted_label, explanation.logit
>>> [(c.concept, c.score, c.weight, c.contribution, c.share) for c in explanation.concepts]
>>> plot_explanation(explanation, "cat_explained.png")
```

The numbers come from the model's own forward (`explanation_protoquant.explain_outputs`, shared with the
``concept-explanation`` pipeline), the gallery from one `ConceptStats` pass (`build_gallery`), and the figures
from `figures.py`. Nothing here recomputes what the model returned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..explanation_protoquant import ConceptEvidence, ConceptGallery, Explanation, explain_outputs
from ..pipeline_protoquant import open_image
from .figures import plot_class_sheet, plot_codebook_overview, plot_explanation, plot_gallery
from .gallery import build_gallery

logger = logging.getLogger(__name__)


def load_gallery(model_or_folder) -> ConceptGallery | None:
    """The gallery stored with a model (its folder or Hub repo), checked against the model's codebook when a model
    is given; None, with a warning naming the command that builds one, when there is none."""
    folder = getattr(model_or_folder, "name_or_path", model_or_folder)
    try:
        gallery = ConceptGallery.load(folder)
    except FileNotFoundError as error:
        logger.warning("%s Explanations are shown without training patches.", error)
        return None
    if hasattr(model_or_folder, "codebook"):
        gallery.check_matches(model_or_folder)
    return gallery


@torch.no_grad()
def explain(
    model,
    images,
    image_processor=None,
    *,
    top_k: int = 3,
    target=None,
    box_rule: str | None = None,
    gallery: ConceptGallery | str | None = "auto",
) -> list[Explanation]:
    """Explain the model's decision on one image or several.

    Args:
        model: a `ProtoQuantForImageClassification` (e.g. `AutoModelForImageClassification.from_pretrained(folder)`).
        images: a PIL image, a path or URL, or a list of them.
        image_processor: the model's processor; loaded from the model's folder when None.
        top_k: concepts to detail per image.
        target: explain this class (index or label) instead of the prediction.
        box_rule: "patch" (token models, exact), "pipnet" (convnets) or "protopnet"; the backbone's default when None.
        gallery: "auto" (the model folder's gallery, if any), a `ConceptGallery`, or None.

    Returns:
        One `Explanation` per image.
    """
    from transformers import AutoImageProcessor

    if image_processor is None:
        image_processor = AutoImageProcessor.from_pretrained(model.name_or_path)
    if gallery == "auto":
        gallery = load_gallery(model)
    elif gallery is not None:
        gallery.check_matches(model)
    batch = [images] if not isinstance(images, Sequence) or isinstance(images, str) else list(images)
    opened = [open_image(image) for image in batch]
    model.eval()
    parameter = next(model.parameters())
    pixel_values = image_processor(images=opened, return_tensors="pt")["pixel_values"].to(parameter.device)
    outputs = model(pixel_values, output_activation_maps=True, output_similarity_maps=True)
    explanations = explain_outputs(
        model, pixel_values, outputs, top_k=top_k, target=target, box_rule=box_rule,
        image_mean=image_processor.image_mean, image_std=image_processor.image_std,
    )
    if gallery is not None:
        for explanation in explanations:
            explanation.gallery = {e.concept: gallery.thumbnails[e.concept] for e in explanation.concepts}
    return explanations


def _file_label(label) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(label))[:40]


def write_figures(
    model,
    folder,
    *,
    stats,
    gallery: ConceptGallery | None = None,
    images=(),
    image_processor=None,
) -> list[str]:
    """The figures stored with a model, into `folder`/figures/: a local explanation per image in `images`, the
    codebook overview (from a `ConceptStats` pass), and with a gallery its first page and one sheet per class.

    Returns:
        The written files, relative to `folder`.
    """
    from pathlib import Path

    folder, files = Path(folder), []
    model.eval()
    if images:
        for number, explanation in enumerate(explain(model, list(images), image_processor, gallery=gallery)):
            name = f"figures/explanation_{number + 1}_{_file_label(explanation.predicted_label)}.png"
            plot_explanation(explanation, folder / name)
            files.append(name)
    plot_codebook_overview(model, stats, folder / "figures" / "overview.png")
    files.append("figures/overview.png")
    if gallery is not None:
        plot_gallery(gallery, usage=stats.usage.numpy(), path=folder / "figures" / "gallery_page_1.png")
        files.append("figures/gallery_page_1.png")
        for class_index, label in sorted(model.config.id2label.items()):
            if (model.classifier.weight[class_index] > 0).any():
                name = f"figures/class_{_file_label(label)}.png"
                plot_class_sheet(model, gallery, class_index, path=folder / name)
                files.append(name)
    return files


__all__ = [
    "ConceptEvidence",
    "ConceptGallery",
    "Explanation",
    "build_gallery",
    "explain",
    "load_gallery",
    "plot_class_sheet",
    "plot_codebook_overview",
    "plot_explanation",
    "plot_gallery",
    "write_figures",
]
