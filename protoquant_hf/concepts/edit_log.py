"""Model edits a user asks for, each applied through `editing.py` and appended to an edit log saved with the model.

The log lives in the model's config (``config.edit_log``, a list of plain dicts), so it is saved and loaded with the
weights by `save_pretrained` / `from_pretrained`, travels to the Hub in ``config.json``, and the model card shows it.
Each record says what was done (operation and arguments, classes by index and name), when (UTC), why (the user's
reason), how K changed, and the accuracy before and after when an evaluation function was given.

Training's own sparsification is not logged here: the training summary records it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from ..explanation_protoquant import resolve_class
from .editing import (
    disable_concept,
    keep_top_k_per_class,
    prune_by_usage,
    remove_unused_concepts,
    scale_weight,
    set_weight,
)


def _prune_to(model, num_concepts: int, usage: Callable, steps: int = 4) -> None:
    prune_by_usage(model, usage, num_concepts, steps)


# operation name -> (function(model, **arguments), arguments that are data, not settings, and stay out of the log)
EDIT_OPERATIONS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "keep_top_k_per_class": (keep_top_k_per_class, ()),
    "remove_unused_concepts": (remove_unused_concepts, ()),
    "prune_to": (_prune_to, ("usage",)),
    "disable_concept": (disable_concept, ()),
    "set_weight": (set_weight, ()),
    "scale_weight": (scale_weight, ()),
}


@dataclass
class EditRecord:
    """One entry of a model's edit log.

    Attributes:
        operation: a key of `EDIT_OPERATIONS`.
        arguments: its settings (a class also by name, as ``class_label``).
        reason: why, in the user's words (None when not given).
        time: when, ISO 8601 UTC.
        num_concepts_before / num_concepts_after: K before and after.
        accuracy_before / accuracy_after: on `eval_set`, when an evaluation function was given.
        eval_set: what the accuracies were measured on.
        weights_changed: how many entries of ReLU(W) (the weights the head uses) the edit changed (None when K
            changed): 0 says the edit had no effect, e.g. a concept disabled for a class that did not use it.
    """

    operation: str
    arguments: dict
    reason: str | None
    time: str
    num_concepts_before: int
    num_concepts_after: int
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    eval_set: str | None = None
    weights_changed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def edit_model(
    model,
    operation: str,
    *,
    reason: str | None = None,
    evaluate: Callable[[object], float] | None = None,
    eval_set: str | None = None,
    accuracy_before: float | None = None,
    **arguments,
) -> EditRecord:
    """Apply one edit to `model` in place and append it to ``model.config.edit_log``.

    Args:
        operation: one of `EDIT_OPERATIONS` (``keep_top_k_per_class`` k=, ``remove_unused_concepts``,
            ``prune_to`` num_concepts=, usage= (a function model → (K,) usage counts), steps=,
            ``disable_concept`` concept_index=, class_index= (None: every class), ``set_weight`` class_index=,
            concept_index=, value=, ``scale_weight`` concept_index=, factor=, class_index=).
            A `class_index` may be a label name.
        reason: why, recorded in the log.
        evaluate: model → accuracy, run before (unless `accuracy_before` is given) and after the edit.
        eval_set: what `evaluate` measures on, recorded in the log.
        accuracy_before: the accuracy before, when the caller already knows it (e.g. the previous edit's after).

    Returns:
        The record appended to the log.
    """
    if operation not in EDIT_OPERATIONS:
        raise ValueError(f"Unknown edit {operation!r}; the edits are {sorted(EDIT_OPERATIONS)}.")
    function, data_arguments = EDIT_OPERATIONS[operation]
    logged = {name: value for name, value in arguments.items() if name not in data_arguments}
    if arguments.get("class_index") is not None:
        arguments["class_index"] = logged["class_index"] = resolve_class(model, arguments["class_index"])
        logged["class_label"] = str(model.config.id2label[arguments["class_index"]])
    if evaluate is not None and accuracy_before is None:
        accuracy_before = evaluate(model)
    num_concepts_before = model.config.num_concepts
    weight_before = model.classifier.weight.detach().relu()  # what the head uses: ReLU(W)
    function(model, **arguments)
    weight_after = model.classifier.weight.detach().relu()
    record = EditRecord(
        operation=operation,
        arguments=logged,
        reason=reason,
        time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        num_concepts_before=num_concepts_before,
        num_concepts_after=model.config.num_concepts,
        accuracy_before=accuracy_before,
        accuracy_after=evaluate(model) if evaluate is not None else None,
        eval_set=eval_set if evaluate is not None else None,
        weights_changed=int((weight_after != weight_before).sum()) if weight_after.shape == weight_before.shape else None,
    )
    model.config.edit_log = [*(model.config.edit_log or []), record.to_dict()]
    return record


def edit_log(model_or_config) -> list[EditRecord]:
    """The edits recorded in a model (or its config), oldest first."""
    config = getattr(model_or_config, "config", model_or_config)
    return [EditRecord(**entry) for entry in (getattr(config, "edit_log", None) or [])]


__all__ = ["EDIT_OPERATIONS", "EditRecord", "edit_log", "edit_model"]
