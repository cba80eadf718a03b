"""Prune or edit a saved model folder into a **new** folder (`protoquant prune`, `protoquant edit`).

Each edit goes through `concepts.edit_model`, so it is recorded in the model's edit log (``config.edit_log``, saved
with the weights and shown by the model card) with the accuracy before and after on the evaluation split when a
dataset is given. The input folder is never modified: the result is written to a hidden work folder and renamed
into place when complete. The copy keeps the gallery (restricted to the kept concepts: a concept's nearest
training patches do not depend on the others) and the Hub bundle is re-exported when the input had one; the
figures and example images of the input show the unedited model and are not copied.

All edits are first tried on a copy of the model, so a bad edit (a concept index out of range, an unknown class,
pruning to K = 0) is one clear error before any data is read.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones import quiet_transformers
from .concepts import ConceptStats, EditRecord, concept_score_table, edit_model, extract_features
from .data import check_split, load_image_dataset, make_image_transform
from .explain.model_folder import is_model_folder, load_model_folder
from .explanation_protoquant import ConceptGallery
from .hub import export_bundle
from .metrics import accuracy
from .output_folder import check_destination, is_complete, mark_complete, publish, work_folder, write_lock

# What is not copied from the input folder: rebuilt (gallery, bundle) or stale (figures and examples show the
# unedited model; an interrupted training run's leftovers).
NOT_COPIED = ("gallery", "figures", "examples", "hub", "checkpoint", "progress.json")


@dataclass
class EditResult:
    """What `edit_folder` did: the new folder, each edit's log record, and the accuracies it measured."""

    output_dir: Path
    records: list[EditRecord]
    eval_set: str | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    notes: list[str] = field(default_factory=list)


class _FolderData:
    """The dataset an edit is measured on, loaded and its features extracted only when first needed."""

    def __init__(self, model, processor, dataset: str, split: str, max_samples: int | None, show_progress: bool):
        self.model, self.processor, self.split, self.show_progress = model, processor, split, show_progress
        self.data = load_image_dataset(dataset, max_samples_per_split=max_samples)
        part = check_split(self.data, split, model.config.id2label, "accuracy is measured on data with the model's classes")
        self.name = f"{dataset} ({split}, {len(part)} images)"
        self._caches = {}
        model.use_fast_backbone()  # once: it checks the copy against the eager backbone

    def cache(self, split: str):
        if split not in self._caches:
            self._caches[split] = extract_features(
                self.model, self.data[split], self.processor, make_image_transform(self.processor), split=split,
                show_progress=self.show_progress,
            )
        return self._caches[split]

    def accuracy(self, model) -> float:
        cache = self.cache(self.split)
        return accuracy(model(concept_scores=concept_score_table(model, cache)).logits, cache.labels)

    def usage(self, model) -> torch.Tensor:
        if "train" not in self.data:
            raise ValueError("Usage-based pruning counts concept usage on the training split; the dataset has none.")
        return ConceptStats.collect(model, self.cache("train")).usage


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Row of each remaining concept in the codebook before the edits (pruning keeps rows unchanged)."""
    rows = {tuple(vector.tolist()): index for index, vector in enumerate(before)}
    return [rows[tuple(vector.tolist())] for vector in after]


def edit_folder(
    model_folder: str | Path,
    output_dir: str | Path,
    edits: list[tuple[str, dict]],
    *,
    dataset: str | None = None,
    split: str = "test",
    max_samples: int | None = None,
    reason: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> EditResult:
    """Apply `edits` (``(operation, arguments)`` pairs of `concepts.EDIT_OPERATIONS`, in order) to a model folder
    and write the result to the new folder `output_dir`.

    Args:
        model_folder: a ProtoQuant model folder (never modified).
        output_dir: the new folder (or one this function wrote before, with `overwrite`).
        edits: e.g. ``[("keep_top_k_per_class", {"k": 5}), ("remove_unused_concepts", {})]``; ``prune_to`` needs
            `dataset` (usage is counted on its train split).
        dataset: when given, the accuracy on its `split` is measured before and after every edit and logged.
        max_samples: use at most this many images per split (stratified).
        reason: why, recorded with every edit.
    """
    model_folder = Path(model_folder)
    if not edits:
        raise ValueError("Nothing to do: give at least one edit.")
    if Path(output_dir).resolve() == model_folder.resolve():
        raise ValueError("--output_dir is the model folder itself: edits are written to a new folder.")
    with write_lock(output_dir):
        output_dir = check_destination(
            output_dir, overwrite=overwrite, replaceable=is_model_folder, kind="a ProtoQuant model folder",
            existing="a model folder",
        )
        model, processor = load_model_folder(model_folder)
        if any(operation == "prune_to" for operation, _ in edits) and dataset is None:
            raise ValueError("Pruning to K concepts counts their usage on the training data: pass --dataset.")
        trial = copy.deepcopy(model)
        for operation, arguments in edits:  # every bad edit fails here, before any data is read
            any_usage = {"usage": lambda m: torch.ones(m.config.num_concepts)} if operation == "prune_to" else {}
            edit_model(trial, operation, **arguments, **any_usage)
        del trial
        gallery, notes = None, []
        if (model_folder / "gallery").is_dir():
            gallery = ConceptGallery.load(model_folder)
            try:
                gallery.check_matches(model)
            except ValueError as error:
                gallery = None
                notes.append(f"The input's gallery was not copied: {error}")
        data = _FolderData(model, processor, dataset, split, max_samples, show_progress) if dataset else None
        concepts_before = model.codebook.concepts.detach().clone()
        records, accuracy = [], None
        for operation, arguments in edits:
            extra = {"usage": data.usage} if operation == "prune_to" else {}
            record = edit_model(
                model, operation, reason=reason, evaluate=data.accuracy if data else None,
                eval_set=data.name if data else None, accuracy_before=accuracy, **arguments, **extra,
            )
            accuracy = record.accuracy_after
            records.append(record)
            change = f": accuracy {record.accuracy_before:.4f} → {record.accuracy_after:.4f}" if data else ""
            if record.weights_changed == 0:
                change += " (no weight changed: the edit had no effect)"
            log(f"{operation}({', '.join(f'{k}={v}' for k, v in record.arguments.items())}), "
                f"K {record.num_concepts_before} → {record.num_concepts_after}{change}")
        work = work_folder(output_dir)
        if not is_complete(work):
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(model_folder, work, ignore=shutil.ignore_patterns(*NOT_COPIED))
            with quiet_transformers():
                model.save_pretrained(work)
            if gallery is not None:
                kept = _kept_rows(concepts_before, model.codebook.concepts.detach())
                gallery.select(kept, model.codebook.concepts).save(work)
            if (model_folder / "figures").is_dir():
                notes.append("figures/ showed the unedited model and was not copied; redraw it with "
                             f"`protoquant gallery --model {output_dir} --dataset <training data> --in_place`.")
            if (model_folder / "hub").is_dir():
                export_bundle(work, work / "hub", overwrite=True)
            mark_complete(work)
        publish(work, output_dir, is_model_folder)
        return EditResult(
            output_dir=output_dir, records=records, eval_set=data.name if data else None,
            accuracy_before=records[0].accuracy_before, accuracy_after=records[-1].accuracy_after, notes=notes,
        )


__all__ = ["EditResult", "NOT_COPIED", "edit_folder"]
