"""Explanations for a saved model folder, as `protoquant explain` and `protoquant gallery` run them.

A user's model folder is never changed without an explicit request: `add_gallery` writes a new folder (a copy of
the model with its gallery and figures, built hidden and renamed into place when complete) unless `in_place=True`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoImageProcessor, AutoModelForImageClassification

from ..data import check_split, load_image_dataset
from ..backbones import quiet_transformers
from ..output_folder import check_destination, is_complete, mark_complete, publish, work_folder, write_lock
from . import explain, load_gallery, write_figures
from .figures import plot_explanation
from .gallery import build_gallery


def is_model_folder(folder: Path) -> bool:
    """Whether `folder` holds a ProtoQuant model (a config.json with model_type 'protoquant')."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "protoquant"
    except (OSError, ValueError):
        return False


def _is_explanation_folder(folder: Path) -> bool:
    return (folder / "explanations.json").is_file()


def load_model_folder(folder: str | Path):
    """(model, image processor) of a ProtoQuant folder, with one clear error when it is not one."""
    folder = Path(folder)
    if not is_model_folder(folder):
        raise ValueError(f"{folder} is not a ProtoQuant model folder (no config.json with model_type 'protoquant').")
    with quiet_transformers():
        model = AutoModelForImageClassification.from_pretrained(folder).eval()
    return model, AutoImageProcessor.from_pretrained(folder)


def explain_to_folder(
    images: list[str],
    model_folder: str | Path,
    output_dir: str | Path,
    *,
    top_k: int = 3,
    target=None,
    box_rule: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Explain images with a model folder: one figure per image and ``explanations.json`` with the numbers, in a
    new folder (or one written earlier by this function, with `overwrite`)."""
    with write_lock(output_dir):  # one process at a time writes a folder
        output_dir = check_destination(
            output_dir, overwrite=overwrite, replaceable=_is_explanation_folder,
            kind="a folder written by `protoquant explain`", existing="explanations",
        )
        model, processor = load_model_folder(model_folder)
        explanations = explain(model, images, processor, top_k=top_k, target=target, box_rule=box_rule)
        work = work_folder(output_dir)
        shutil.rmtree(work, ignore_errors=True)  # our own leftover of an interrupted call
        work.mkdir(parents=True)
        records = []
        for number, (image, explanation) in enumerate(zip(images, explanations), start=1):
            name = f"{number:03d}_{Path(str(image)).stem[:40]}.png"
            plot_explanation(explanation, work / name)
            record = explanation.to_dict()
            for concept in record["concepts"]:
                concept["activation_map"] = concept["activation_map"].tolist()
                concept.pop("upsampled_map")
            records.append({"image": str(image), "figure": name, **record})
        (work / "explanations.json").write_text(json.dumps(records, indent=2))
        mark_complete(work)
        publish(work, output_dir, _is_explanation_folder)
        return [output_dir / record["figure"] for record in records]


def add_gallery(
    model_folder: str | Path,
    dataset: str,
    *,
    output_dir: str | Path | None = None,
    in_place: bool = False,
    overwrite: bool = False,
    per_concept: int = 5,
    thumb_size: int = 32,
    split: str = "train",
    max_samples: int | None = None,
    show_progress: bool = True,
    **dataset_kwargs,
) -> Path:
    """Build the gallery of a model folder from its training data, with the figures that show it.

    Args:
        model_folder: a trained ProtoQuant folder.
        dataset: the data the gallery's patches come from (usually the training set), any name
            `load_image_dataset` accepts; its classes must be the model's.
        output_dir: a new folder: a copy of the model with ``gallery/`` and ``figures/`` added.
        in_place: add (or replace) ``gallery/`` and ``figures/`` in `model_folder` itself instead.
        per_concept / thumb_size: patches per concept and their side in pixels.
        split / max_samples: which split, and at most how many of its images (stratified).

    Returns:
        The folder that now holds the gallery.
    """
    model_folder = Path(model_folder)
    if (output_dir is None) == (not in_place):
        raise ValueError(
            "Pass --output_dir NEW_FOLDER (a copy of the model with its gallery) or --in_place (add the gallery to "
            f"{model_folder} itself): a model folder is never changed without being asked."
        )
    with write_lock(model_folder if in_place else output_dir):  # one process at a time writes a folder
        if output_dir is not None:
            if Path(output_dir).resolve() == model_folder.resolve():
                raise ValueError("--output_dir is the model folder itself; pass --in_place to add the gallery there.")
            output_dir = check_destination(
                output_dir, overwrite=overwrite, replaceable=is_model_folder, kind="a ProtoQuant model folder",
                existing="a model folder",
            )
        model, processor = load_model_folder(model_folder)
        data = load_image_dataset(dataset, max_samples_per_split=max_samples, **dataset_kwargs)
        part = check_split(data, split, model.config.id2label, "the gallery must come from the data the model was trained on")
        model.use_fast_backbone()
        gallery, stats = build_gallery(
            model, part, processor, per_concept=per_concept, thumb_size=thumb_size, dataset_name=str(dataset),
            show_progress=show_progress,
        )
        if in_place:
            shutil.rmtree(model_folder / "gallery", ignore_errors=True)
            gallery.save(model_folder)
            write_figures(model, model_folder, stats=stats, gallery=gallery)
            return model_folder
        work = work_folder(output_dir)
        if not is_complete(work):
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(model_folder, work, ignore=shutil.ignore_patterns("gallery", "figures"))
            gallery.save(work)
            write_figures(model, work, stats=stats, gallery=gallery)
            mark_complete(work)
        publish(work, output_dir, is_model_folder)
        return output_dir


__all__ = ["add_gallery", "explain_to_folder", "is_model_folder", "load_gallery", "load_model_folder"]
