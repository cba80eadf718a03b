"""Per-concept statistics in one streaming pass: usage, nearest training patches, grounding, per-class presence;
and how many concepts each class uses, read from the concept→class weights.

Training (dead concepts, usage-based pruning, the grounding score), explanations (the codebook gallery: each
concept's nearest training patches) and metrics all read the same `ConceptStats`, computed with the model's own
forward (its cosine with ε, its τ), so no consumer re-derives a similarity of its own. Memory is bounded
independently of the dataset size: counts and sums are (K,) and (C, K) tensors, and the nearest patches are a
running top-n per concept.

The training summary (hence the CLI table and the model card) and the metrics count concepts per class with
`concepts_per_class` and `concepts_for_weight_mass`, so they cannot disagree.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache import FeatureCache
from .shards import DEFAULT_SHARD_SIZE, ShardWriter, write_index


@dataclass
class UsageSummary:
    """How the training locations spread over the concepts (each location counts for its nearest concept)."""

    num_concepts: int
    dead_concepts: int
    dead_ratio: float
    usage_max: int
    usage_median_alive: float

    @classmethod
    def from_counts(cls, usage: torch.Tensor) -> "UsageSummary":
        alive = usage[usage > 0].float()
        return cls(
            num_concepts=int(usage.numel()),
            dead_concepts=int((usage == 0).sum()),
            dead_ratio=float((usage == 0).float().mean()),
            usage_max=int(usage.max()),
            usage_median_alive=float(alive.median()) if alive.numel() else 0.0,
        )


@dataclass
class GroundingSummary:
    """Grounding over concepts: per concept, the highest cosine similarity to any training feature vector."""

    mean: float
    min: float


@dataclass
class ConceptStats:
    """Statistics of every concept over a set of feature maps (one row per image).

    Attributes:
        usage: `(K,)` how many locations have this concept as their most cosine-similar one.
        top_scores: `(K, n)` cosine similarity of the concept's n nearest patches, best first
            (`-inf` where fewer than n locations were seen).
        top_rows: `(K, n)` the dataset row (image index) of each of those patches (-1 where none).
        top_cells: `(K, n, 2)` the feature-map cell (h, w) of each of those patches.
        class_presence: `(C, K)` the sum of the concept's presence score s_k over the images of each class.
        class_counts: `(C,)` images per class.
        feature_size: (H, W) of the feature maps.
    """

    usage: torch.Tensor
    top_scores: torch.Tensor
    top_rows: torch.Tensor
    top_cells: torch.Tensor
    class_presence: torch.Tensor
    class_counts: torch.Tensor
    feature_size: tuple[int, int]

    @property
    def grounding(self) -> torch.Tensor:
        """`(K,)` per concept, the highest cosine similarity to any feature vector seen: close to 1
        means the concept looks like a real training patch, which is what lets an explanation show it."""
        return self.top_scores[:, 0]

    @property
    def mean_class_presence(self) -> torch.Tensor:
        """`(C, K)` the mean presence score of each concept over the images of each class."""
        return self.class_presence / self.class_counts.clamp_min(1).unsqueeze(1)

    def usage_summary(self) -> UsageSummary:
        return UsageSummary.from_counts(self.usage)

    def grounding_summary(self) -> GroundingSummary:
        grounding = self.grounding
        return GroundingSummary(mean=float(grounding.mean()), min=float(grounding.min()))

    @classmethod
    @torch.no_grad()
    def collect(
        cls,
        model,
        features: FeatureCache | Iterable[tuple[torch.Tensor, torch.Tensor]],
        *,
        top_n: int = 1,
        indices: np.ndarray | None = None,
        batch_size: int = 256,
        accelerator=None,
        show_progress: bool = False,
    ) -> "ConceptStats":
        """One pass over feature maps through the model's own concept forward.

        Args:
            model: a ProtoQuant model (classifier or base model).
            features: a `FeatureCache`, or any iterable of (feature maps `(B, D, H, W)`, labels `(B,)`)
                batches, whose rows are then numbered in order from 0.
            top_n: nearest patches to keep per concept.
            indices: cache rows to read (all by default); only for a `FeatureCache`.
            batch_size: images per forward, bounding memory at batch_size × K × H × W similarities.
            accelerator: with several processes, each reads its share of the cache rows and the
                results are combined, so every process gets the global statistics.
            show_progress: show a progress bar.
        """
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}.")
        processes = accelerator.num_processes if accelerator is not None else 1
        if isinstance(features, FeatureCache):
            rows = np.arange(len(features)) if indices is None else np.asarray(indices)
            if processes > 1:
                with accelerator.split_between_processes(torch.from_numpy(rows)) as mine:
                    rows = mine.numpy()
            chunks = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
            batches = ((chunk, *features.read(chunk)) for chunk in chunks)
            total = len(chunks)
        else:
            if processes > 1:
                raise ValueError("Multi-process ConceptStats needs a FeatureCache (rows are split between processes).")
            batches = _numbered(features)
            total = None
        parameter = next(model.parameters())
        num_concepts, num_classes = model.config.num_concepts, model.config.num_labels
        stats = cls._empty(num_concepts, num_classes, top_n)
        for rows_in_batch, maps, labels in tqdm(batches, total=total, desc="Concept statistics", disable=not show_progress):
            outputs = model(feature_maps=maps.to(parameter.device), output_similarity_maps=True)
            stats._update(outputs.similarity_maps.float().cpu(), outputs.concept_scores.float().cpu(), labels, rows_in_batch)
        if processes > 1:
            stats = stats._combine_processes(accelerator)
        return stats

    @classmethod
    def _empty(cls, num_concepts: int, num_classes: int, top_n: int) -> "ConceptStats":
        return cls(
            usage=torch.zeros(num_concepts, dtype=torch.long),
            top_scores=torch.full((num_concepts, top_n), -float("inf")),
            top_rows=torch.full((num_concepts, top_n), -1, dtype=torch.long),
            top_cells=torch.full((num_concepts, top_n, 2), -1, dtype=torch.long),
            class_presence=torch.zeros(num_classes, num_concepts, dtype=torch.float64),
            class_counts=torch.zeros(num_classes, dtype=torch.long),
            feature_size=(0, 0),
        )

    def _update(self, similarity: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, rows) -> None:
        batch, num_concepts, height, width = similarity.shape
        self.feature_size = (height, width)
        self.usage += torch.bincount(similarity.argmax(dim=1).flatten(), minlength=num_concepts)
        self.class_presence.index_add_(0, labels.long(), scores.double())
        self.class_counts += torch.bincount(labels.long(), minlength=self.class_counts.numel())
        flat = similarity.permute(1, 0, 2, 3).reshape(num_concepts, -1)  # (K, B·H·W)
        best, where = flat.topk(min(self.top_scores.shape[1], flat.shape[1]), dim=1)
        image, cell = where // (height * width), where % (height * width)
        batch_rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)[image]
        cells = torch.stack([cell // width, cell % width], dim=-1)
        self._keep_best(best, batch_rows, cells)

    def _keep_best(self, scores: torch.Tensor, rows: torch.Tensor, cells: torch.Tensor) -> None:
        """Merge candidate patches `(K, m)` into the running top-n."""
        all_scores = torch.cat([self.top_scores, scores], dim=1)
        all_rows = torch.cat([self.top_rows, rows], dim=1)
        all_cells = torch.cat([self.top_cells, cells], dim=1)
        # Stable order on ties: earlier rows first, so the result does not depend on batching.
        order = _sort_desc_by_score_then_row(all_scores, all_rows)[:, : self.top_scores.shape[1]]
        self.top_scores = all_scores.gather(1, order)
        self.top_rows = all_rows.gather(1, order)
        self.top_cells = all_cells.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))

    def _combine_processes(self, accelerator) -> "ConceptStats":
        from accelerate.utils import gather

        device = accelerator.device
        processes = accelerator.num_processes
        combined = ConceptStats._empty(self.usage.numel(), self.class_counts.numel(), self.top_scores.shape[1])
        combined.usage = accelerator.reduce(self.usage.to(device), reduction="sum").cpu()
        combined.class_presence = accelerator.reduce(self.class_presence.to(device), reduction="sum").cpu()
        combined.class_counts = accelerator.reduce(self.class_counts.to(device), reduction="sum").cpu()
        combined.feature_size = self.feature_size
        num_concepts, top_n = self.top_scores.shape

        def gathered(tensor: torch.Tensor) -> torch.Tensor:  # (K, n, ...) per process → (K, P·n, ...)
            stacked = gather(tensor.contiguous().to(device)).cpu().view(processes, num_concepts, top_n, *tensor.shape[2:])
            return stacked.transpose(0, 1).reshape(num_concepts, processes * top_n, *tensor.shape[2:])

        combined._keep_best(gathered(self.top_scores), gathered(self.top_rows), gathered(self.top_cells))
        return combined


def _sort_desc_by_score_then_row(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Column order `(K, m)` by descending score, ties broken by ascending row (empty slots last)."""
    by_row = torch.argsort(torch.where(rows < 0, torch.iinfo(torch.long).max, rows), dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_row), dim=1, descending=True, stable=True)
    return by_row.gather(1, by_score)


def _numbered(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]):
    start = 0
    for maps, labels in batches:
        yield np.arange(start, start + len(maps)), maps, labels
        start += len(maps)


@torch.no_grad()
def _concept_score_batches(model, features: FeatureCache, batch_size: int, show_progress: bool):
    """(presence scores float32 `(B, K)`, labels `(B,)`) of consecutive cache rows, through the model's own forward."""
    device = next(model.parameters()).device
    model.eval()
    batches = tqdm(features.batches(batch_size), total=-(-len(features) // batch_size), desc="Concept scores",
                   disable=not show_progress)
    with torch.no_grad():
        for maps, labels in batches:
            yield model(feature_maps=maps.to(device)).concept_scores.float().cpu(), labels


def concept_score_table(model, features: FeatureCache, batch_size: int = 256, show_progress: bool = False) -> torch.Tensor:
    """`(N, K)` presence scores of every cached image (in cache row order), through the model's own forward.

    With frozen concepts this table is all that head training and the size metrics read."""
    return torch.cat([scores for scores, _ in _concept_score_batches(model, features, batch_size, show_progress)])


def concept_score_store(
    model, features: FeatureCache, folder: str | Path, batch_size: int = 256, shard_size: int = DEFAULT_SHARD_SIZE,
    show_progress: bool = False,
) -> FeatureCache:
    """`concept_score_table` written to `folder` as a sharded float32 store `(N, K)` and opened for reading.

    What frozen-concept head training reads, kept on disk (read through the page cache, like the feature maps), so
    memory holds one shard of scores however many images there are (10⁶ images × K = 2048 would be 8 GB in RAM). The
    values are exactly the table's (float32), and `read(rows)` returns them with their labels like a feature cache."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, (f"{number:05d}" for number in itertools.count()), shard_size, np.float32)
    for scores, labels in _concept_score_batches(model, features, batch_size, show_progress):
        writer.add(scores.numpy(), labels.numpy())
    shards = [{"name": name, "rows": rows} for name, rows in writer.close()]
    write_index(folder, {
        "row_shape": [model.config.num_concepts], "dtype": "float32", "shard_size": shard_size, "shards": shards,
        "content": {"concept_scores_of": str(features.path)},
    })  # fmt: skip
    return FeatureCache.open(folder)


# ---- how many concepts each class uses: functions of the concept→class weights W (C, K) ----------------
#
# Logits are s · ReLU(W)ᵀ, so W and c·W (c > 0) make the same predictions. A count of weights above a fixed
# threshold is then not a property of the classifier: rescaling W moves it anywhere. The counts below that do
# not depend on the scale are the headline; the paper's threshold count is kept as its secondary figure.

PAPER_WEIGHT_THRESHOLD = 0.1
"""The paper's local size counts ReLU(W) > 0.1 (official code, ``analyze_local_size.py``). Secondary only: it is
not scale-invariant, so it says nothing without the scale of W."""

WEIGHT_MASS = 0.95
"""The share of a class's total ReLU(W) weight that `concepts_for_weight_mass` counts the concepts of."""


def _positive_weight(weight) -> torch.Tensor:
    """ReLU(W) as CPU float64: a threshold then means the same number for every dtype (an entry stored as
    float32(0.1) is slightly above 0.1), and counting is cheap for W on any device."""
    weight = torch.as_tensor(weight).detach()
    if weight.dim() != 2 or weight.shape[1] == 0:
        raise ValueError(
            f"weight must be the (num_classes, num_concepts) concept→class matrix with at least one concept; "
            f"got shape {tuple(weight.shape)}."
        )
    return F.relu(weight.to("cpu", torch.float64))


def concepts_per_class(weight, threshold: float = 0.0) -> torch.Tensor:
    """`(C,)` per class, the number of concepts with ReLU(W_ck) > `threshold`.

    The default counts the non-zero weights, the headline sparsity measure: the concepts a class's logit can use
    at all (after top-k sparsification the others are exactly 0). It is scale-invariant. Only exact zeros (and
    negative weights, which ReLU makes zeros) are left out: a weight of 1e-30 counts.

    ``threshold=PAPER_WEIGHT_THRESHOLD`` gives the paper's local size, its secondary figure, which rescaling W changes.

    Args:
        weight: `(C, K)` concept→class weights (``model.classifier.weight``), any dtype and device.
        threshold: strict lower bound on a weight that counts, >= 0.
    """
    if not threshold >= 0:  # a negative threshold would count every entry, zeros included
        raise ValueError(f"threshold must be >= 0, got {threshold}.")
    return (_positive_weight(weight) > threshold).sum(dim=1)


def concepts_for_weight_mass(weight, mass: float = WEIGHT_MASS) -> torch.Tensor:
    """`(C,)` per class, the fewest concepts holding `mass` of the class's total ReLU(W) weight.

    The class's weights sorted in decreasing order, the smallest n whose cumulative sum is >= mass × total; 0 for
    a class with no positive weight. Meant for dense heads, whose weights are rarely exactly 0 although few concepts
    carry most of the logit. Scale-invariant (a common factor scales the sums and the target alike; rounding can
    only matter at an exact tie) and never above the non-zero count.

    Args:
        weight: `(C, K)` concept→class weights, any dtype and device.
        mass: the share of the total weight to hold, in (0, 1].
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}.")
    cumulative = _positive_weight(weight).sort(dim=1, descending=True).values.cumsum(dim=1)
    # The total is the cumulative sum's own end, so rounding cannot put the target out of reach (e.g. mass = 1).
    total = cumulative[:, -1]
    needed = (cumulative < mass * total.unsqueeze(1)).sum(dim=1) + 1
    return torch.where(total > 0, needed, 0)


__all__ = [
    "PAPER_WEIGHT_THRESHOLD",
    "WEIGHT_MASS",
    "ConceptStats",
    "GroundingSummary",
    "UsageSummary",
    "concept_score_store",
    "concept_score_table",
    "concepts_for_weight_mass",
    "concepts_per_class",
]
