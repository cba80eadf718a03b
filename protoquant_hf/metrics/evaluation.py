"""Every metric of a model on a dataset, as `protoquant evaluate` runs them: one report, JSON + Markdown + a figure.

The size metrics read the concept-score table of the evaluation split (computed from its feature cache, shared with
training when the settings match); grounding comes from one `ConceptStats` pass over the training split; the
stability, consistency and purity metrics run on a fixed, evenly spaced subset of the evaluation images (they need
gradients or perturbed images through the backbone, so their cost is per image). A dataset's part annotations
(``parts`` column, keypoints in stored-image pixels) are mapped to model-input pixels with the processor's own
geometry (resize the shortest edge, centre crop).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..concepts import ConceptStats, concept_score_table, extract_features
from ..data import check_split, make_image_transform, part_names
from ..output_folder import check_destination, mark_complete, publish, work_folder, write_lock
from .purity import part_purity
from .size import explanation_size
from .stability import consistency, noise_stability, spatial_misalignment

DEFAULT_TOP_KS = (1, 2, 3, 5, 10, 20, 50)
REPORT_FILE = "evaluation.json"


@dataclass
class EvaluationSettings:
    """What `evaluate_model` measures, and how (defaults: the protocols' own settings, method §7.4)."""

    split: str = "test"
    top_ks: tuple[int, ...] = DEFAULT_TOP_KS
    grounding: bool = True
    stability: bool = False
    purity: bool = False
    stability_images: int = 100
    epsilon: float = 0.4
    step_size: float = 0.01
    iterations: int = 40
    noise_std: float = 0.2
    top_k_concepts: int = 10
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self):
        if self.stability_images < 1:
            raise ValueError(f"stability_images must be >= 1, got {self.stability_images}.")
        if self.iterations < 1 or self.epsilon < 0 or self.step_size <= 0 or self.noise_std < 0:
            raise ValueError("PGD needs iterations >= 1, epsilon >= 0 and step_size > 0; the noise std must be >= 0.")


@dataclass
class EvaluationReport:
    """One model on one dataset. Every field is plain Python (JSON-ready); per-image arrays are left out."""

    model: str
    dataset: str
    split: str
    num_images: int
    size: dict
    grounding: dict | None = None
    misalignment: dict | None = None
    noise: dict | None = None
    consistency: dict | None = None
    purity: dict | None = None
    settings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "EvaluationReport":
        return cls(**json.loads(text))

    def rows(self) -> list[tuple[str, str]]:
        """(metric, value) rows of the headline figures."""
        size = self.size

        def per_class(name: str) -> str:
            return f"mean {size[name + '_mean']:.1f}, min {size[name + '_min']}, max {size[name + '_max']}"

        rows = [("accuracy", f"{size['accuracy']:.4f}"), ("concepts K", str(size["num_concepts"]))]
        if "nonzero_size_mean" in size:  # reports written before the scale-invariant sizes have only the paper's
            rows += [("concepts per class (non-zero weights)", per_class("nonzero_size")),
                     ("concepts per class holding 95 % of the weight", per_class("mass95_size"))]
        rows += [
            ("local size, the paper's count (concepts per class with ReLU(W) > 0.1)", per_class("local_size")),
            ("global size (concepts with a class weight > 1e-3)", str(size["global_size"])),
            ("sparsity ratio (weights ≤ 1e-3)", f"{size['sparsity_ratio']:.3f}"),
            ("ANZ (concepts present per image, s > 1e-3)", f"{size['anz']:.1f}"),
            ("SimANZCC (concepts adding > 1e-3 to the prediction)", f"{size['sim_anz_cc']:.1f}"),
        ]
        if self.grounding:
            rows.append(("grounding (max cosine to a training feature)",
                         f"mean {self.grounding['mean']:.3f}, min {self.grounding['min']:.3f}"))
        if self.misalignment:
            m = self.misalignment
            rows += [("PAC (activation change under masked PGD, %)", f"{m['mean_pac']:.1f}"),
                     ("PRC (ranking change)", f"{m['mean_prc']:.2f}"),
                     ("PLC (location change, %)", f"{m['mean_plc']:.1f}"),
                     ("AC (accuracy change, points)", f"{m['ac']:.1f}")]
        if self.noise:
            rows += [("noise stability: top location unchanged (%)", f"{self.noise['location_stability']:.1f}"),
                     ("noise stability: identity unchanged (%)", f"{self.noise['identity_stability']:.1f}")]
            if self.noise.get("part_stability") is not None:
                rows.append(("noise stability: parts unchanged (Huang et al., %)", f"{self.noise['part_stability']:.1f}"))
        if self.consistency:
            rows.append(("consistency (Huang et al., % concepts)", f"{self.consistency['consistency']:.1f}"))
        if self.purity:
            p = self.purity
            rows += [("part purity (PIP-Net top-10)", f"{p['mean_purity']:.3f} ± {p['std_purity']:.3f}"),
                     ("part-related concepts (purity > 0.5)", f"{p['num_part_related']} of {p['num_concepts']}")]
        return rows

    def to_markdown(self) -> str:
        lines = [f"# Evaluation of {self.model}", "", f"On {self.dataset}, split {self.split} ({self.num_images} images).", "",
                 "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in self.rows()]
        curve = self.size.get("top_k_curve") or []
        if curve:
            lines += ["", "Accuracy when each class keeps only its top-k concepts (weights masked, no retraining):", "",
                      "| k | accuracy | concepts per class (non-zero weights) |", "|---|---|---|"]
            lines += [f"| {p['k']} | {p['accuracy']:.4f} | {p['mean_concepts_per_class']:.1f} |" for p in curve]
        return "\n".join(lines) + "\n"


def _scalars(result) -> dict:
    """A metric result's summary fields (per-image and per-concept arrays left out)."""
    return {name: value for name, value in result.to_dict().items() if not isinstance(value, list)}


def keypoints_to_input(parts: list[dict], image_size: tuple[int, int], side: int) -> list[dict]:
    """Part keypoints from stored-image pixels to model-input pixels: the processor scales the shortest edge to
    `side` and crops the centre `side` × `side`."""
    width, height = image_size
    scale = side / min(width, height)
    left, top = (width * scale - side) / 2, (height * scale - side) / 2
    mapped = []
    for part in parts:
        x, y = part["keypoint"][0] * scale - left, part["keypoint"][1] * scale - top
        if 0 <= x < side and 0 <= y < side:  # a part cropped away is not visible
            mapped.append({"part": int(part["part"]), "keypoint": [x, y]})
    return mapped


def evaluate_model(
    model,
    dataset,
    image_processor,
    settings: EvaluationSettings | None = None,
    *,
    model_name: str = "model",
    dataset_name: str = "dataset",
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> EvaluationReport:
    """All metrics of `model` on `dataset` (a DatasetDict with the model's classes).

    Args:
        model: a ProtoQuant classifier (or the free baseline: same outputs).
        dataset: ``load_image_dataset(...)`` output; ``parts`` annotations are needed for `settings.purity`.
        image_processor: the model's processor.
        settings: what to measure (`EvaluationSettings`).
    """
    settings = settings or EvaluationSettings()
    split = check_split(dataset, settings.split, model.config.id2label, "evaluate a model on data with its own classes")
    if model.config.num_concepts < 1:
        raise ValueError("The model has no concepts left: there is nothing to measure.")
    if settings.purity and "parts" not in split.column_names:
        raise ValueError(
            "--purity needs part annotations (a 'parts' column, e.g. load_image_dataset('synthetic-parts')); this "
            "dataset has none."
        )
    seconds = {}
    model.eval()
    model.use_fast_backbone()
    transform = make_image_transform(image_processor)
    extract = dict(cache_dir=cache_dir, show_progress=show_progress)

    tick = time.perf_counter()
    cache = extract_features(model, split, image_processor, transform, split=settings.split, **extract)
    scores = concept_score_table(model, cache, show_progress=show_progress)
    weight = model.classifier.weight.detach().cpu()
    ks = [k for k in settings.top_ks if k <= model.config.num_concepts]
    size = explanation_size(scores, weight, torch.from_numpy(cache.labels), ks=ks).to_dict()
    seconds["size"] = time.perf_counter() - tick

    grounding = None
    if settings.grounding and "train" in dataset:
        tick = time.perf_counter()
        train = extract_features(model, dataset["train"], image_processor, transform, split="train", **extract)
        summary = ConceptStats.collect(model, train, show_progress=show_progress).grounding_summary()
        grounding = asdict(summary)
        seconds["grounding"] = time.perf_counter() - tick

    report = EvaluationReport(
        model=model_name, dataset=dataset_name, split=settings.split, num_images=len(split), size=size,
        grounding=grounding, settings={**asdict(settings), "top_ks": list(settings.top_ks)}, seconds=seconds,
    )
    if not (settings.stability or settings.purity):
        return report

    rows = np.unique(np.linspace(0, len(split) - 1, min(settings.stability_images, len(split))).round().astype(int))
    subset = split.select(rows)
    batch = transform(subset[:])
    pixels, labels = batch["pixel_values"], batch["labels"]
    side = pixels.shape[-1]
    parts = num_parts = None
    if "parts" in subset.column_names:
        num_parts = len(part_names(subset))
        parts = [keypoints_to_input(p, image.size, side) for p, image in zip(subset["parts"], subset["image"])]
    common = dict(batch_size=settings.batch_size, show_progress=show_progress)
    if settings.stability:
        tick = time.perf_counter()
        report.misalignment = _scalars(spatial_misalignment(
            model, pixels, labels, epsilon=settings.epsilon, step_size=settings.step_size,
            iterations=settings.iterations, **common,
        ))
        seconds["misalignment"] = time.perf_counter() - tick
        tick = time.perf_counter()
        report.noise = _scalars(noise_stability(
            model, pixels, labels, std=settings.noise_std, top_k=settings.top_k_concepts, parts=parts,
            num_parts=num_parts, seed=settings.seed, **common,
        ))
        seconds["noise"] = time.perf_counter() - tick
    if settings.purity:
        tick = time.perf_counter()
        report.consistency = _scalars(consistency(
            model, pixels, labels, parts, num_parts, top_k=settings.top_k_concepts, **common
        ))
        report.purity = _scalars(part_purity(model, pixels, parts, num_parts, **common))
        seconds["purity"] = time.perf_counter() - tick
    report.settings["stability_image_count"] = len(rows)
    return report


def plot_top_k_curve(report: EvaluationReport, path: str | Path) -> Path:
    """Accuracy against the number of concepts each class keeps (ProtoQuant's top-k curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.size["top_k_curve"]
    figure, axis = plt.subplots(figsize=(5, 3.5), dpi=120)
    axis.plot([p["k"] for p in curve], [p["accuracy"] for p in curve], marker="o")
    axis.axhline(report.size["accuracy"], color="grey", linestyle="--", linewidth=1, label="full head")
    axis.set_xscale("log")
    axis.set_xlabel("concepts kept per class (top-k by weight)")
    axis.set_ylabel(f"accuracy ({report.split})")
    axis.set_title(f"{report.model} on {report.dataset}", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def _is_evaluation_folder(folder: Path) -> bool:
    return (folder / REPORT_FILE).is_file()


def evaluate_folder(
    model_folder: str | Path,
    dataset,
    settings: EvaluationSettings | None = None,
    *,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    max_samples: int | None = None,
    show_progress: bool = True,
    **dataset_kwargs,
) -> EvaluationReport:
    """Evaluate a saved model folder on a dataset (a name `load_image_dataset` accepts, or a DatasetDict); with
    `output_dir`, write ``evaluation.json``, ``evaluation.md`` and ``accuracy_vs_top_k.png`` into that new folder (or
    one this function wrote before, with `overwrite`). The destination is checked before any data is read."""
    from ..data import load_image_dataset
    from ..explain.model_folder import load_model_folder

    with write_lock(output_dir) if output_dir is not None else contextlib.nullcontext():
        if output_dir is not None:
            output_dir = check_destination(
                output_dir, overwrite=overwrite, replaceable=_is_evaluation_folder,
                kind="a folder written by `protoquant evaluate`", existing="an evaluation",
            )
        model, processor = load_model_folder(model_folder)
        dataset_name = dataset if isinstance(dataset, str) else "dataset"
        if isinstance(dataset, str):
            dataset = load_image_dataset(dataset, max_samples_per_split=max_samples, **dataset_kwargs)
        report = evaluate_model(
            model, dataset, processor, settings, model_name=str(model_folder), dataset_name=dataset_name,
            show_progress=show_progress,
        )
        if output_dir is not None:
            work = work_folder(output_dir)
            shutil.rmtree(work, ignore_errors=True)  # our own leftover of an interrupted call
            work.mkdir(parents=True)
            (work / REPORT_FILE).write_text(report.to_json())
            (work / "evaluation.md").write_text(report.to_markdown())
            if report.size.get("top_k_curve"):
                plot_top_k_curve(report, work / "accuracy_vs_top_k.png")
            mark_complete(work)
            publish(work, output_dir, _is_evaluation_folder)
        return report


__all__ = ["DEFAULT_TOP_KS", "EvaluationReport", "EvaluationSettings", "evaluate_model", "keypoints_to_input",
           "evaluate_folder", "plot_top_k_curve"]
