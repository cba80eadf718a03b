"""The transformers ``Trainer`` front end: fine-tune a ProtoQuant head with stock ``TrainingArguments``.

```python
>>> from transformers import TrainingArguments
>>> from protoquant_hf.training.trainer import ProtoQuantTrainer, compute_accuracy, prepare_trainer_datasets
>>> data = prepare_trainer_datasets(load_image_dataset("animal-mnist"), processor, image_size=64)
>>> args = TrainingArguments("out", remove_unused_columns=False, num_train_epochs=3, learning_rate=1e-2)
>>> trainer = ProtoQuantTrainer(
...     model, args, train_dataset=data["train"], eval_dataset=data["test"],
...     processing_class=processor, compute_metrics=compute_accuracy, stage="head", l1_lambda=1e-4,
... )
>>> trainer.train(); trainer.evaluate()["eval_accuracy"]; trainer.save_model("out/final")
```

The subclass only decides *which* parameters train and *which* objective they minimise; the
objectives themselves are the shared ones of `objectives.py` (also used by the Accelerate loop), so
both front ends optimise exactly the same thing:

* ``stage="head"`` (stage 2, default): CE + λ·ΣReLU(W) on the concept→class matrix W
  (`stage2_loss`); the concepts train too only with ``train_concepts=True``.
* ``stage="codebook"`` (stage 1): the concepts alone, through the frozen stage-1 head on quantized
  features (`stage1_loss`); evaluation then reports the *quantized* accuracy.

The backbone is always frozen (and stays in eval mode, so batch-norm statistics never move).

Single process only (one CPU/GPU, or ``nn.DataParallel``): the objectives call the model's stage
methods directly, past the DDP wrapper, so multi-process runs would not synchronise gradients; use
`train_protoquant` (Accelerate) for those.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalPrediction

from ..data.preprocessing import collate_fn, make_image_transform
from ..modeling_protoquant import ProtoQuantImageClassifierOutput, ProtoQuantQuantizedOutput
from .objectives import stage1_loss, stage2_loss

STAGES = ("head", "codebook")


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
        stage: ``"head"`` (stage 2: W, with the shared `stage2_loss`) or ``"codebook"`` (stage 1:
            the concepts through the frozen stage-1 head, `stage1_loss`; needs `model.original_head`).
        l1_lambda: λ of the L1 term on ReLU(W) in the head stage (≥ 0).
        train_concepts: also fine-tune the concepts in the head stage (off by default: it loosens
            their grounding in real training features).
        *args, **kwargs: as for `transformers.Trainer`; ``data_collator`` defaults to `collate_fn`.

    At construction exactly the parameters of the stage get ``requires_grad=True`` (everything else,
    the backbone always, is frozen), so the Trainer's optimizer sees only those.
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, stage: str = "head", l1_lambda: float = 1e-4, train_concepts: bool = False, **kwargs):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}; got {stage!r}.")
        if not isinstance(l1_lambda, (int, float)) or not np.isfinite(l1_lambda) or l1_lambda < 0:
            raise ValueError(f"l1_lambda must be a finite number >= 0; got {l1_lambda!r}.")
        self.stage = stage
        self.l1_lambda = float(l1_lambda)
        self.train_concepts = bool(train_concepts)
        if len(args) < 3 and kwargs.get("data_collator") is None:
            kwargs["data_collator"] = collate_fn
        model = args[0] if args else kwargs.get("model")
        if model is not None:
            self._configure_model(model)
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise ValueError(
                "ProtoQuantTrainer runs in a single process (its objectives bypass the DDP wrapper); "
                f"this run has {self.args.world_size} processes. Use protoquant_hf.training.train_protoquant "
                "(Accelerate) for multi-process training."
            )
        self._check_datasets()

    # ---- set-up -------------------------------------------------------------------------------

    def _configure_model(self, model: nn.Module) -> None:
        """Freeze everything but the parameters this stage trains."""
        for name in ("forward_features", "classifier", "codebook"):
            if not hasattr(model, name):
                raise TypeError(
                    f"ProtoQuantTrainer needs a ProtoQuantForImageClassification model; got {type(model).__name__}."
                )
        if self.stage == "codebook" and getattr(model, "original_head", None) is None:
            raise ValueError(
                "stage='codebook' trains the concepts through the frozen stage-1 head, but the model has "
                "none: build it with from_backbone from a classification checkpoint, or install a fitted "
                "probe with model.set_stage1_head(linear)."
            )
        model.requires_grad_(False)
        if self.stage == "head":
            model.classifier.weight.requires_grad_(True)
            if self.train_concepts:
                model.codebook.concepts.requires_grad_(True)
        else:
            model.codebook.concepts.requires_grad_(True)

    def call_model_init(self, trial=None) -> nn.Module:
        model = super().call_model_init(trial)
        self._configure_model(model)
        return model

    def _expected_num_labels(self, model: nn.Module | None = None) -> int:
        config = (model if model is not None else self.model).config
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

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        # The objectives call the model's stage methods, not the forward that Accelerate wraps in
        # autocast, so enter the mixed-precision context here (a no-op in fp32).
        return self.accelerator.autocast()

    # ---- loss and prediction ------------------------------------------------------------------

    def _stage_outputs(self, model: nn.Module, inputs: dict[str, Any]):
        """(loss or None, output) of this stage on a batch; the loss comes from the shared objectives."""
        net = self.accelerator.unwrap_model(model)
        if "pixel_values" not in inputs:
            raise ValueError(
                f"ProtoQuantTrainer batches need 'pixel_values'; got keys {sorted(inputs)}. Use "
                "prepare_trainer_datasets (or make_image_transform) with collate_fn, and "
                "TrainingArguments(remove_unused_columns=False)."
            )
        features = net.forward_features(inputs["pixel_values"])
        labels = inputs.get("labels")
        if labels is not None and labels.ndim == 1:
            net._check_labels(labels, self._expected_num_labels(net))
        if self.stage == "head":
            if labels is None:
                return None, ProtoQuantImageClassifierOutput(logits=net.classify_features(features).logits)
            loss, logits = stage2_loss(net, features, labels, self.l1_lambda)
            return loss, ProtoQuantImageClassifierOutput(loss=loss, logits=logits)
        if labels is None:
            return None, ProtoQuantQuantizedOutput(logits=net.forward_quantized(features).logits)
        loss, logits = stage1_loss(net, features, labels)
        return loss, ProtoQuantQuantizedOutput(loss=loss, logits=logits)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The stage's shared objective on ``model.forward_features(pixel_values)``; a per-batch mean
        (head: CE + λ·ΣReLU(W); codebook: CE of the stage-1 head on quantized features + w·MSE)."""
        if inputs.get("labels") is None:
            raise ValueError("ProtoQuantTrainer needs 'labels' in every training batch.")
        loss, outputs = self._stage_outputs(model, inputs)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(loss, logits, labels): class logits in the head stage, the stage-1 head's logits on
        quantized features in the codebook stage. The loss is the stage objective (as in training)."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self._stage_outputs(model, inputs)
        if loss is not None:
            loss = loss.detach().float().mean()
        if prediction_loss_only:
            return loss, None, None
        return loss, outputs.logits.detach().float(), None if labels is None else labels.detach()


__all__ = ["ProtoQuantTrainer", "compute_accuracy", "dataset_num_classes", "prepare_trainer_datasets"]
