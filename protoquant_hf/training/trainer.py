"""The transformers ``Trainer`` front end for ProtoQuant.

The stock ``transformers.Trainer`` already trains a ProtoQuant model correctly: loading a folder
leaves only the concept→class weights W trainable, and the model's loss in training mode is the
stage-2 objective CE + λ·ΣReLU(W) with λ = ``config.head_l1_lambda``. `ProtoQuantTrainer` adds
stage switches (stage 1, fine-tuned concepts), a default collator and early checks of the datasets:

```python
>>> from transformers import TrainingArguments
>>> from protoquant_hf.training import ProtoQuantTrainer, compute_accuracy, prepare_trainer_datasets
>>> data = prepare_trainer_datasets(load_image_dataset("animal-mnist"), processor, image_size=64)
>>> args = TrainingArguments("out", remove_unused_columns=False, num_train_epochs=3, learning_rate=0.3)
>>> trainer = ProtoQuantTrainer(
...     model, args, train_dataset=data["train"], eval_dataset=data["test"],
...     processing_class=processor, compute_metrics=compute_accuracy, stage="head", l1_lambda=1e-4,
... )
>>> trainer.train(); trainer.evaluate()["eval_accuracy"]; trainer.save_model("out/final")
```

* ``stage="head"`` (stage 2, default): W with CE + λ·ΣReLU(W); the concepts train too only with
  ``train_concepts=True``.
* ``stage="codebook"`` (stage 1): the concepts alone, through the frozen stage-1 head on quantized
  features; evaluation then reports the *quantized* accuracy.

Every batch goes through ``model(**inputs, stage=...)``, the model's own forward, so the Trainer's
DDP wrapper synchronises gradients and multi-process runs work like single-process ones. The
backbone is always frozen and stays in eval mode, so batch-norm statistics never move.
"""

from __future__ import annotations

import numpy as np
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalPrediction

from ..data.preprocessing import collate_fn, make_image_transform
from ..modeling_protoquant import TRAINING_STAGES


def compute_accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy for ``Trainer(compute_metrics=...)`` (numpy only, works offline).

    Args:
        eval_pred: predictions `(N, C)` logits (or a tuple whose first item they are) and label ids `(N,)`.

    Returns:
        ``{"accuracy": float}``; the Trainer reports it as ``eval_accuracy``.
    """
    predictions = eval_pred.predictions
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    labels = eval_pred.label_ids
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if labels.size == 0:
        return {"accuracy": 0.0}
    return {"accuracy": float((predictions.argmax(-1) == labels).mean())}


def prepare_trainer_datasets(
    dataset_dict,
    image_processor,
    image_size: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
):
    """Attach the lazy image transform to every split, ready for `ProtoQuantTrainer`.

    Args:
        dataset_dict: a `datasets.DatasetDict` (e.g. from `load_image_dataset`) or a single `Dataset`.
        image_processor: the backbone's image processor (save the same one with the model).
        image_size: square training size in pixels; ``None`` keeps the processor's own size.
        image_column / label_column: the dataset's columns.

    Returns:
        The same kind of object with ``with_transform(make_image_transform(...))`` on every split.
        Train with ``TrainingArguments(remove_unused_columns=False)``; the trainer's default data
        collator is `collate_fn`. ``ClassLabel`` features stay visible, so the trainer can check
        the class count against the model.
    """
    transform = make_image_transform(image_processor, image_size, image_column, label_column)
    if hasattr(dataset_dict, "with_transform"):  # Dataset or DatasetDict
        return dataset_dict.with_transform(transform)
    return {name: split.with_transform(transform) for name, split in dataset_dict.items()}


def dataset_num_classes(dataset) -> int | None:
    """The class count of a dataset's ``ClassLabel`` column (``label``, ``labels``, or the only one), else None."""
    features = getattr(dataset, "features", None)
    if not features:
        return None
    from datasets import ClassLabel

    for name in ("label", "labels"):
        if isinstance(features.get(name), ClassLabel):
            return features[name].num_classes
    class_labels = [feature for feature in features.values() if isinstance(feature, ClassLabel)]
    return class_labels[0].num_classes if len(class_labels) == 1 else None


class ProtoQuantTrainer(Trainer):
    """`transformers.Trainer` for one ProtoQuant training stage on images.

    Args:
        stage: ``"head"`` (stage 2: W) or ``"codebook"`` (stage 1: the concepts through the frozen
            stage-1 head; needs `model.original_head`).
        l1_lambda: λ of the L1 term on ReLU(W) in the head stage (≥ 0); stored as
            ``config.head_l1_lambda`` (so the saved model records it). ``None`` keeps the config's.
        train_concepts: also fine-tune the concepts in the head stage (off by default: it loosens
            their grounding in real training features).
        *args, **kwargs: as for `transformers.Trainer`; ``data_collator`` defaults to `collate_fn`.

    At construction `model.set_trainable(stage, train_concepts)` decides which parameters train (the
    backbone never), so the Trainer's optimizer sees only those.
    """

    def __init__(self, *args, stage: str = "head", l1_lambda: float | None = None, train_concepts: bool = False, **kwargs):
        if stage not in TRAINING_STAGES:
            raise ValueError(f"stage must be one of {TRAINING_STAGES}; got {stage!r}.")
        if l1_lambda is not None and (not isinstance(l1_lambda, (int, float)) or not np.isfinite(l1_lambda) or l1_lambda < 0):
            raise ValueError(f"l1_lambda must be a finite number >= 0; got {l1_lambda!r}.")
        self.stage = stage
        self.l1_lambda = None if l1_lambda is None else float(l1_lambda)
        self.train_concepts = bool(train_concepts)
        if len(args) < 3 and kwargs.get("data_collator") is None:
            kwargs["data_collator"] = collate_fn
        model = args[0] if args else kwargs.get("model")
        if model is not None:
            self._configure_model(model)
        super().__init__(*args, **kwargs)
        self._check_datasets()

    def _configure_model(self, model: nn.Module) -> None:
        if not hasattr(model, "set_trainable") or not hasattr(model, "classifier"):
            raise TypeError(f"ProtoQuantTrainer needs a ProtoQuantForImageClassification model; got {type(model).__name__}.")
        if self.stage == "codebook" and getattr(model, "original_head", None) is None:
            raise ValueError(
                "stage='codebook' trains the concepts through the frozen stage-1 head, but the model has "
                "none: build it with from_backbone from a classification checkpoint, or install a fitted "
                "probe with model.set_stage1_head(linear)."
            )
        if self.l1_lambda is not None:
            model.config.head_l1_lambda = self.l1_lambda
        model.set_trainable(self.stage, train_concepts=self.train_concepts)

    def call_model_init(self, trial=None) -> nn.Module:
        model = super().call_model_init(trial)
        self._configure_model(model)
        return model

    def _expected_num_labels(self) -> int:
        config = self.model.config
        return config.stage1_head_num_labels if self.stage == "codebook" else config.num_labels

    def _check_datasets(self) -> None:
        datasets = {"train": self.train_dataset}
        if isinstance(self.eval_dataset, dict):
            datasets.update({f"eval ({name})": split for name, split in self.eval_dataset.items()})
        else:
            datasets["eval"] = self.eval_dataset
        expected = self._expected_num_labels() if self.model is not None else None
        for name, dataset in datasets.items():
            if dataset is None:
                continue
            if self.args.remove_unused_columns and getattr(dataset, "format", {}).get("type") == "custom":
                raise ValueError(
                    f"The {name} dataset has a transform (set_transform / with_transform), so its image column "
                    "must reach it: pass TrainingArguments(remove_unused_columns=False)."
                )
            num_classes = dataset_num_classes(dataset)
            if expected is not None and num_classes is not None and num_classes != expected:
                head = "labels (config.num_labels)"
                if self.stage == "codebook":
                    head = "stage-1 head labels (config.stage1_head_num_labels)"
                raise ValueError(
                    f"The {name} dataset has {num_classes} classes (ClassLabel) but the model has {expected} "
                    f"{head}: label count ≠ model labels. Build the model with this dataset's id2label, or "
                    "use the dataset it was built for."
                )

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> None:
        """Write ProtoQuant's model card (not transformers' generic Trainer card) as ``output_dir/README.md``, so
        ``trainer.push_to_hub()`` publishes it; its numbers are this run's evaluation metrics."""
        if not self.is_world_process_zero():
            return
        from ..hub.card import render_model_card

        metrics = {}
        for record in self.state.log_history:
            metrics.update({key: value for key, value in record.items() if key.startswith("eval_")})
        card = render_model_card(
            self.accelerator.unwrap_model(self.model), self.args.output_dir,
            repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            eval_metrics=metrics, license=license or "apache-2.0",
        )
        card.save(f"{self.args.output_dir}/README.md")

    def _prepare_inputs(self, inputs):
        # The stage is a forward argument, so training, evaluation and prediction all run it
        # through the (possibly DDP-wrapped) model.
        inputs = super()._prepare_inputs(inputs)
        return {**inputs, "stage": self.stage}


__all__ = ["ProtoQuantTrainer", "compute_accuracy", "dataset_num_classes", "prepare_trainer_datasets"]
