"""Figures of explanations, the codebook gallery, per-class sheets and the codebook overview (matplotlib, no
pyplot: figures are built and saved directly, so nothing depends on a display or a global backend).

One visual language everywhere: a concept keeps its colour from `CONCEPT_COLOURS` within a figure, activation maps
use `HEATMAP` over a greyed input, boxes are drawn in the concept's colour, and every heatmap states that it is an
interpolation of the model's coarse feature grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..concepts import concepts_per_class

HEATMAP = "inferno"
CONCEPT_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#9a6324", "#469990")
OTHER_COLOUR = "#bbbbbb"
DPI = 120


def _finish(figure: Figure, path: str | Path | None) -> Figure:
    FigureCanvasAgg(figure)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return figure


def _image_axis(axis, image, title: str | None = None, fontsize: int = 8) -> None:
    axis.imshow(image, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=fontsize)


def _box(axis, box, colour: str, width: float = 2.0) -> None:
    left, top, right, bottom = box
    axis.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor=colour, linewidth=width))


def plot_explanation(explanation, path: str | Path | None = None) -> Figure:
    """The local explanation of one image: the input with the top concepts' boxes; per concept its activation map
    over the input with its box, its nearest training patches (when the model has a gallery) and
    ``score × weight = contribution (share of the logit)``; and the logit split into its contributions."""
    concepts = explanation.concepts
    if not concepts:
        raise ValueError(f"No concept contributes to class {explanation.target_label!r} in this image: nothing to draw.")
    patches = max((len(explanation.gallery.get(e.concept, [])) for e in concepts), default=0)
    columns = 2 + patches + 2  # input | heatmap | patches | text (2 wide)
    figure = Figure(figsize=(1.35 * columns, 1.35 * (len(concepts) + 1.2)))
    grid = figure.add_gridspec(len(concepts) + 1, columns, height_ratios=[1] * len(concepts) + [0.45], hspace=0.35, wspace=0.08)
    headline = (
        f"predicted: {explanation.predicted_label} (p = {explanation.probability:.2f})"
        if explanation.target_class == explanation.predicted_class
        else f"explaining {explanation.target_label} (p = {explanation.probability:.2f}); predicted {explanation.predicted_label}"
    )
    figure.suptitle(f"{headline}   ·   logit {explanation.logit:.3f}", fontsize=10, y=1.0)
    input_axis = figure.add_subplot(grid[: len(concepts), 0])
    _image_axis(input_axis, explanation.image, "input\n(as the model saw it)")
    grey = explanation.image.mean(axis=2, keepdims=True).repeat(3, axis=2).astype(np.uint8)
    for row, evidence in enumerate(concepts):
        colour = CONCEPT_COLOURS[row % len(CONCEPT_COLOURS)]
        _box(input_axis, evidence.box, colour)
        heat_axis = figure.add_subplot(grid[row, 1])
        _image_axis(heat_axis, grey)
        heat_axis.imshow(evidence.upsampled_map, cmap=HEATMAP, alpha=0.6, interpolation="bilinear")
        _box(heat_axis, evidence.box, colour)
        heat_axis.set_title(f"concept #{evidence.concept}", color=colour, fontsize=8, fontweight="bold")
        for column, patch in enumerate(explanation.gallery.get(evidence.concept, [])):
            _image_axis(figure.add_subplot(grid[row, 2 + column]), patch, "looks like" if column == 0 and row == 0 else None)
        text_axis = figure.add_subplot(grid[row, 2 + patches :])
        text_axis.axis("off")
        text_axis.text(
            0.02, 0.5,
            f"concept #{evidence.concept}\n{evidence.score:.3f} × {evidence.weight:.3f}\n= {evidence.contribution:.3f}"
            f"  ({evidence.share:.0%} of the logit)",
            fontsize=8, va="center", color=colour,
        )
    bar_axis = figure.add_subplot(grid[len(concepts), :])
    start = 0.0
    for row, evidence in enumerate(concepts):
        bar_axis.barh(0, evidence.contribution, left=start, color=CONCEPT_COLOURS[row % len(CONCEPT_COLOURS)], edgecolor="white")
        start += evidence.contribution
    bar_axis.barh(0, explanation.rest, left=start, color=OTHER_COLOUR, edgecolor="white")
    others = len(explanation.contributions) - len(concepts)
    bar_axis.set_xlim(0, max(explanation.logit, 1e-9))
    bar_axis.set_yticks([])
    bar_axis.set_xlabel(
        f"logit = sum of concept contributions (coloured: top {len(concepts)}; grey: the other {others} concepts, "
        f"{explanation.rest:.3f})", fontsize=8,
    )
    bar_axis.tick_params(labelsize=7)
    figure.text(
        0.01, -0.02,
        f"Heatmaps: activation maps on the {explanation.concepts[0].activation_map.shape[0]}×"
        f"{explanation.concepts[0].activation_map.shape[1]} feature grid, {explanation.upsampling}. "
        f"Boxes: the {explanation.box_rule!r} rule.",
        fontsize=7, color="#555555",
    )
    return _finish(figure, path)


def plot_gallery(gallery, concepts=None, usage=None, page: int = 0, per_page: int = 16, path: str | Path | None = None) -> Figure:
    """A page of the codebook gallery: one row per concept (most used first when `usage` is given), its nearest
    training patches left to right."""
    order = list(concepts) if concepts is not None else (
        list(np.argsort(-np.asarray(usage), kind="stable")) if usage is not None else list(range(gallery.num_concepts))
    )
    shown = order[page * per_page : (page + 1) * per_page]
    if not shown:
        raise ValueError(f"Page {page} is empty: the gallery has {len(order)} concepts, {per_page} per page.")
    patches = max(len(gallery.thumbnails[k]) for k in shown) or 1
    figure = Figure(figsize=(0.9 * patches + 1.6, 0.9 * len(shown) + 0.6))
    grid = figure.add_gridspec(len(shown), patches + 1, width_ratios=[1.6] + [1] * patches, hspace=0.1, wspace=0.05)
    pages = -(-len(order) // per_page)
    figure.suptitle(f"Codebook gallery, page {page + 1} of {pages}: nearest training patches per concept", fontsize=9)
    for row, concept in enumerate(shown):
        label_axis = figure.add_subplot(grid[row, 0])
        label_axis.axis("off")
        used = f"\nused at {int(usage[concept])} locations" if usage is not None else ""
        label_axis.text(0.95, 0.5, f"#{concept}{used}", ha="right", va="center", fontsize=7)
        for column in range(patches):
            axis = figure.add_subplot(grid[row, 1 + column])
            if column < len(gallery.thumbnails[concept]):
                _image_axis(axis, gallery.thumbnails[concept][column])
                score = gallery.scores[concept, column]
                axis.set_xlabel(f"{score:.2f}", fontsize=6, labelpad=1)
            else:
                axis.axis("off")
    return _finish(figure, path)


def plot_class_sheet(model, gallery, class_index: int, max_concepts: int = 10, path: str | Path | None = None) -> Figure:
    """One class's evidence: its concepts by weight (the non-zero ones, at most `max_concepts`), each with its
    weight and its gallery row."""
    weights = np.maximum(model.classifier.weight.detach().cpu().numpy()[class_index], 0)
    order = [k for k in np.argsort(-weights, kind="stable") if weights[k] > 0][:max_concepts]
    label = model.config.id2label[class_index]
    if not order:
        raise ValueError(f"Class {label!r} uses no concept (all its weights are 0).")
    patches = max(len(gallery.thumbnails[k]) for k in order) or 1
    figure = Figure(figsize=(0.9 * patches + 3.0, 0.9 * len(order) + 0.7))
    grid = figure.add_gridspec(len(order), patches + 1, width_ratios=[3.0] + [1] * patches, hspace=0.1, wspace=0.05)
    used = int((weights > 0).sum())
    figure.suptitle(f"Class {label!r}: {used} concept(s) with weight > 0 (the largest {len(order)} shown)", fontsize=9)
    top = float(weights[order[0]])
    for row, concept in enumerate(order):
        bar_axis = figure.add_subplot(grid[row, 0])
        colour = CONCEPT_COLOURS[row % len(CONCEPT_COLOURS)]
        bar_axis.barh(0, weights[concept], color=colour)
        bar_axis.set_xlim(0, top * 1.05)
        bar_axis.axis("off")
        bar_axis.text(0, 0, f" #{concept}  w = {weights[concept]:.3f}", va="center", fontsize=7, color="black")
        for column in range(patches):
            axis = figure.add_subplot(grid[row, 1 + column])
            if column < len(gallery.thumbnails[concept]):
                _image_axis(axis, gallery.thumbnails[concept][column])
            else:
                axis.axis("off")
    return _finish(figure, path)


def plot_codebook_overview(model, stats, path: str | Path | None = None) -> Figure:
    """The codebook at a glance: usage of the concepts, concepts per class, the sparsity of W, and grounding."""
    weights = np.maximum(model.classifier.weight.detach().cpu().numpy(), 0)
    usage = stats.usage.numpy()
    grounding = stats.grounding.numpy()
    figure = Figure(figsize=(9, 6))
    axes = figure.subplots(2, 2)
    figure.suptitle(f"Codebook overview: K = {len(usage)} concepts, {weights.shape[0]} classes", fontsize=10)

    axis = axes[0, 0]
    axis.bar(np.arange(len(usage)), np.sort(usage)[::-1], color=CONCEPT_COLOURS[2], width=1.0)
    axis.set_yscale("symlog")
    axis.set_title(f"concept usage (nearest concept of each training location); {int((usage == 0).sum())} unused", fontsize=8)
    axis.set_xlabel("concepts, most used first", fontsize=8)

    axis = axes[0, 1]
    per_class = concepts_per_class(model.classifier.weight).numpy()  # the headline count: non-zero weights
    labels = [str(model.config.id2label[i]) for i in range(len(per_class))]
    axis.bar(range(len(per_class)), per_class, color=CONCEPT_COLOURS[1])
    axis.set_xticks(range(len(per_class)))
    axis.set_xticklabels(labels, rotation=60, fontsize=6, ha="right")
    axis.set_title(f"concepts per class (weight > 0): mean {per_class.mean():.1f}, max {per_class.max()}", fontsize=8)

    axis = axes[1, 0]
    positive = weights[weights > 0]
    axis.hist(positive, bins=30, color=CONCEPT_COLOURS[3])
    axis.set_title(f"non-zero weights of W: {positive.size} of {weights.size} ({1 - positive.size / weights.size:.0%} exactly 0)", fontsize=8)
    axis.set_xlabel("ReLU(W)", fontsize=8)

    axis = axes[1, 1]
    axis.hist(grounding, bins=30, color=CONCEPT_COLOURS[0])
    axis.set_title(f"grounding: best cosine to a training patch; mean {grounding.mean():.3f}, min {grounding.min():.3f}", fontsize=8)
    axis.set_xlabel("cosine similarity", fontsize=8)
    for axis in axes.flat:
        axis.tick_params(labelsize=7)
    figure.tight_layout()
    return _finish(figure, path)


__all__ = ["CONCEPT_COLOURS", "HEATMAP", "plot_class_sheet", "plot_codebook_overview", "plot_explanation", "plot_gallery"]
