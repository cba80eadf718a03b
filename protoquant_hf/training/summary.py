"""The typed result of a training run: one record per phase, saved as ``training_summary.json``.

The CLI table, the benchmarks and the model card read these fields; nothing parses result keys back
out of strings. `TrainingSummary.from_json(summary.to_json())` gives an equal object, so the same
types also carry the results of finished phases across an interrupted run (`--resume`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..concepts import (
    PAPER_WEIGHT_THRESHOLD,
    GroundingSummary,
    UsageSummary,
    concepts_for_weight_mass,
    concepts_per_class,
)

SUMMARY_FILE = "training_summary.json"


@dataclass(kw_only=True)
class PhaseResult:
    """What one phase of the job measured. Subclasses register by name, so `from_json` rebuilds them.

    Attributes:
        seconds: wall-clock time of the phase, summed over the segments of a resumed run.
    """

    seconds: float = 0.0
    registry: ClassVar[dict[str, type["PhaseResult"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        PhaseResult.registry[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with its class name under "type"."""
        return _to_jsonable(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "PhaseResult":
        return _from_jsonable(PhaseResult, data)


@dataclass(kw_only=True)
class ConceptsPerClass:
    """How many concepts each class's logit uses, by three counts of its ReLU(W) weights (mean and max over classes).

    Attributes:
        nonzero_mean / nonzero_max: the headline: concepts with a non-zero weight (`concepts_per_class`). After
            top-k sparsification these are the concepts a class can use at all. Scale-invariant: c·W (c > 0) makes
            the same predictions and has the same count.
        mass95_mean / mass95_max: the fewest concepts holding 95 % of the class's total weight
            (`concepts_for_weight_mass`), which still says something about a dense head. Scale-invariant too.
        paper_mean / paper_max: the paper's local size, ReLU(W) > `paper_threshold`, kept as its secondary figure
            for comparison with the paper. Rescaling W changes it, so it can be made as small as wanted.
        paper_threshold: that threshold (0.1).

    Summaries written before the scale-invariant counts existed hold only the paper's figure, under the keys
    "mean", "max" and "threshold" (`renamed_keys`); they load with the other fields None.
    """

    nonzero_mean: float | None = None
    nonzero_max: int | None = None
    mass95_mean: float | None = None
    mass95_max: int | None = None
    paper_mean: float
    paper_max: int
    paper_threshold: float = PAPER_WEIGHT_THRESHOLD
    renamed_keys: ClassVar[dict[str, str]] = {"mean": "paper_mean", "max": "paper_max", "threshold": "paper_threshold"}

    @classmethod
    def from_weight(cls, weight) -> "ConceptsPerClass":
        """The three counts of a `(C, K)` concept→class weight matrix (``model.classifier.weight``)."""
        nonzero = concepts_per_class(weight)
        mass = concepts_for_weight_mass(weight)  # 95 % (WEIGHT_MASS)
        paper = concepts_per_class(weight, PAPER_WEIGHT_THRESHOLD)
        return cls(
            nonzero_mean=float(nonzero.double().mean()), nonzero_max=int(nonzero.max()),
            mass95_mean=float(mass.double().mean()), mass95_max=int(mass.max()),
            paper_mean=float(paper.double().mean()), paper_max=int(paper.max()), paper_threshold=PAPER_WEIGHT_THRESHOLD,
        )

    def figures(self) -> list[tuple[str, str, float, int]]:
        """(key, label, mean, max) of each count this summary holds, the headline first: the one wording of
        the CLI table and the model card (the key is the card's metric type)."""
        figures = [
            ("nonzero_concepts_per_class", "concepts per class (non-zero weights)", self.nonzero_mean, self.nonzero_max),
            ("concepts_per_class_95_weight", "concepts per class holding 95 % of the weight", self.mass95_mean, self.mass95_max),
            ("paper_concepts_per_class", f"concepts per class, the paper's count (ReLU(W) > {self.paper_threshold:g})",
             self.paper_mean, self.paper_max),
        ]
        return [figure for figure in figures if figure[2] is not None]


@dataclass(kw_only=True)
class InitResult(PhaseResult):
    """Concept initialisation (k-means or another `--concept_init`)."""

    method: str
    usage: UsageSummary


@dataclass(kw_only=True)
class ProbeResult(PhaseResult):
    """Step 0: the frozen stage-1 head and the dense reference accuracy on the test split."""

    head: str  # "checkpoint" (the backbone's own classifier) or "linear_probe"
    accuracy: float


@dataclass(kw_only=True)
class CodebookResult(PhaseResult):
    """Stage 1: quantized test accuracy through the frozen stage-1 head, and concept usage after it."""

    accuracy: float
    usage: UsageSummary
    epochs: int


@dataclass(kw_only=True)
class PruneResult(PhaseResult):
    """Dead-concept removal and usage-based pruning after stage 1."""

    dead_removed: int
    usage_rounds: list[UsageSummary]
    num_concepts: int


@dataclass(kw_only=True)
class HeadResult(PhaseResult):
    """A trained concept→class head (stage 2, or its retraining after top-k sparsification)."""

    accuracy: float
    num_concepts: int
    concepts_per_class: ConceptsPerClass
    epochs: int
    concepts_removed: int = 0


@dataclass(kw_only=True)
class GroundingResult(PhaseResult):
    """Grounding of the final concepts in the training feature vectors."""

    grounding: GroundingSummary


@dataclass(kw_only=True)
class GalleryResult(PhaseResult):
    """The codebook gallery stored with the model (``gallery/``): nearest training patches per concept."""

    per_concept: int
    thumb_size: int
    bytes: int


@dataclass(kw_only=True)
class FiguresResult(PhaseResult):
    """Figures written into the model folder (``figures/``), paths relative to it."""

    files: list[str]


@dataclass
class DatasetInfo:
    name: str
    classes: list[str]
    train_size: int
    test_size: int
    image_size: int
    feature_map: list[int]  # (D, H, W) of the cached backbone features
    test_split: str = "the dataset's test split"  # or how it was made, when the source had none


@dataclass
class TrainingSummary:
    """Everything a run measured, phase by phase, with the settings that produced it.

    Attributes:
        dataset: what was trained and evaluated on.
        phases: phase name → its result, in the order the phases ran (skipped phases are absent).
        feature_extraction_s / total_s: seconds, summed over the segments of a resumed run.
        processes: Accelerate processes of the run.
        arguments: the data, model and training arguments, as given.
        versions: package versions.
    """

    dataset: DatasetInfo
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    feature_extraction_s: float = 0.0
    total_s: float = 0.0
    processes: int = 1
    arguments: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    # ---- the headline figures -------------------------------------------------------------

    @property
    def final_head(self) -> HeadResult | None:
        """The head that was saved: after top-k sparsification when it ran, else stage 2."""
        return self.phases.get("sparsify") or self.phases.get("stage2")

    @property
    def accuracy(self) -> float | None:
        return self.final_head.accuracy if self.final_head else None

    @property
    def linear_probe_accuracy(self) -> float | None:
        probe = self.phases.get("probe")
        return probe.accuracy if probe else None

    @property
    def accuracy_vs_linear_probe(self) -> float | None:
        if self.accuracy is None or not self.linear_probe_accuracy:
            return None
        return self.accuracy / self.linear_probe_accuracy

    @property
    def num_concepts(self) -> int | None:
        return self.final_head.num_concepts if self.final_head else None

    @property
    def concepts_per_class(self) -> ConceptsPerClass | None:
        return self.final_head.concepts_per_class if self.final_head else None

    @property
    def grounding(self) -> GroundingSummary | None:
        result = self.phases.get("grounding")
        return result.grounding if result else None

    # ---- (de)serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingSummary":
        return _from_jsonable(cls, data)

    @classmethod
    def from_json(cls, text: str) -> "TrainingSummary":
        return cls.from_dict(json.loads(text))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SUMMARY_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, folder_or_file: str | Path) -> "TrainingSummary":
        path = Path(folder_or_file)
        return cls.from_json((path / SUMMARY_FILE if path.is_dir() else path).read_text())


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        data = {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, PhaseResult):
            data = {"type": type(value).__name__, **data}
        return data
    if isinstance(value, dict):
        return {str(key): _to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(item) for item in value]
    return value


def _from_jsonable(hint: Any, data: Any) -> Any:
    """Rebuild `data` as the type `hint` (dataclasses, PhaseResult subclasses by their "type",
    optionals, lists and dicts of them). Keys the dataclass does not know are left out, and a dataclass may
    map the keys of earlier versions to its fields (`renamed_keys`), so older summaries still load."""
    if data is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _from_jsonable(options[0], data) if len(options) == 1 else data
    if origin is list:
        (item,) = typing.get_args(hint)
        return [_from_jsonable(item, value) for value in data]
    if origin is dict:
        _, item = typing.get_args(hint)
        return {key: _from_jsonable(item, value) for key, value in data.items()}
    if isinstance(hint, type) and issubclass(hint, PhaseResult):
        data = dict(data)
        hint = PhaseResult.registry[data.pop("type")]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        renamed = getattr(hint, "renamed_keys", {})  # keys of summaries written by earlier versions
        data = {renamed.get(name, name): value for name, value in data.items()}
        hints = typing.get_type_hints(hint)
        return hint(**{name: _from_jsonable(hints[name], value) for name, value in data.items() if name in hints})
    return data


__all__ = [
    "CodebookResult",
    "ConceptsPerClass",
    "DatasetInfo",
    "FiguresResult",
    "GalleryResult",
    "GroundingResult",
    "HeadResult",
    "InitResult",
    "PhaseResult",
    "ProbeResult",
    "PruneResult",
    "SUMMARY_FILE",
    "TrainingSummary",
]
