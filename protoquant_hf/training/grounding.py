"""Grounded concept fine-tuning: concepts train with W, but never leave the grounded set.

The grounded set of radius γ is every vector whose cosine to some **bank** vector (a seeded sample of the cached
training feature vectors) is at least γ. After every optimiser step each concept is projected back into it: a
concept already inside is left exactly as it is; any other is moved along the great circle toward its nearest bank
vector until their cosine is γ, keeping its norm. So the model's own grounding check (each concept's highest cosine to
a training feature vector, `ConceptStats.grounding`, over a superset of the bank) holds for every concept, not just on
average, while the concepts still adapt to the task (free fine-tuning drops the minimum to ≈ 0.2–0.55, issue 13).

The nearest bank vector is the expensive part (K × N × D), so each concept keeps a shortlist of its nearest bank
vectors, recomputed over the whole bank now and then (`ConceptProjector.step`); every step projects against the
shortlist only, and a phase ends with one exact projection over the whole bank (`ConceptProjector.exact`).

    bank = grounding_bank(train_cache, max_vectors=50_000, seed=0)    # (N, D), the cache's storage dtype
    projector = ConceptProjector(bank, radius=0.9, refresh_steps=50)
    concepts = projector.step(concepts)                              # after every optimiser step
    concepts = projector.exact(concepts)                             # at the end of the phase
"""

from __future__ import annotations

import torch

from ..concepts import FeatureCache, set_concepts
from .concept_init import unit_vectors
from .loop import broadcast_tensor

# The projection works this far inside γ: the model measures grounding with its own float32 cosine (ε added to the
# norms), which can read ~1e-6 below the float64 cosine computed here, and a moved concept, cast back to float32,
# must still count as inside at the next step (it is left alone from half the margin up).
GROUNDING_MARGIN = 1e-5


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    # A smaller floor than k-means': projections run in float64, where norms far below 1e-12 are still exact.
    return unit_vectors(vectors, min_norm=1e-30)


def grounding_bank(cache: FeatureCache, max_vectors: int | None = None, seed: int = 0) -> torch.Tensor:
    """The bank: the cache's non-zero training feature vectors, or a seeded sample of at most `max_vectors`.

    Returns:
        `(N, D)` in the cache's storage dtype: exactly the cached values (nothing is lost to rounding, so the
        guarantee holds for the training features the model's grounding reads), at half the memory of float32 for the
        default float16 cache (50 000 × 1280 → 128 MB).
    """
    vectors, _ = cache.feature_vectors(max_vectors=max_vectors, seed=seed)
    return vectors.to(getattr(torch, str(cache.dtype)))


@torch.no_grad()
def nearest_bank_vectors(
    concepts: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each concept's k most cosine-similar bank vectors, by a float32 search over bank chunks.

    Args:
        concepts: `(K, D)`.
        bank: `(N, D)` non-zero vectors, any float dtype (each chunk is converted to float32, bounding the extra
            memory at chunk_size × D floats).
        k: shortlist length (at most N is returned).

    Returns:
        (cosines `(K, k)`, best first; bank row indices `(K, k)`).
    """
    units = _unit(concepts.float())
    best = torch.empty(units.shape[0], 0, device=units.device)
    rows = torch.empty(units.shape[0], 0, dtype=torch.long, device=units.device)
    for start in range(0, bank.shape[0], chunk_size):
        chunk = bank[start : start + chunk_size].to(units.device, torch.float32)
        # Dividing the (K, chunk) products by the chunk's norms is cheaper than normalising the chunk when K < D.
        cosines = (units @ chunk.T) / chunk.norm(dim=1)
        chunk_best, chunk_rows = cosines.topk(min(k, chunk.shape[0]), dim=1)
        best, rows = torch.cat([best, chunk_best], dim=1), torch.cat([rows, chunk_rows + start], dim=1)
        best, top = best.topk(min(k, best.shape[1]), dim=1)
        rows = rows.gather(1, top)
    return best, rows


@torch.no_grad()
def project_to_cap(
    concepts: torch.Tensor, centers: torch.Tensor, radius: float, target: float | None = None
) -> torch.Tensor:
    """Project each concept onto the spherical cap {x : cos(x, center) ≥ radius} around its center.

    A concept inside the cap is returned unchanged (bit for bit). One outside is rotated along the great circle
    through it and its center until their cosine is `target`, and keeps its norm: the head's cosine ignores the
    norm, and a rotation leaves the scale Adam's moments were built on alone. At target 1 a concept becomes its
    center's direction at its own norm. Computed in float64 (the cosine reached is `target` to ~1e-15 before the
    result is cast back).

    Args:
        concepts: `(K, D)`.
        centers: `(K, D)` non-zero, one per concept (any scale).
        radius: the cap's cosine, in (0, 1].
        target: the cosine an outside concept is moved to, in [radius, 1] (default: `radius`, the cap's edge).

    Returns:
        `(K, D)` projected concepts, in `concepts`' dtype.
    """
    target = radius if target is None else target
    vectors, centers = concepts.double(), centers.double()
    norms = torch.linalg.vector_norm(vectors, dim=1)
    cosine = torch.einsum("kd,kd->k", vectors, centers) / (norms * torch.linalg.vector_norm(centers, dim=1)).clamp_min(1e-300)
    # Only the concepts outside are touched (after the first steps usually a few): fewer and smaller operations per
    # optimiser step.
    outside = (cosine < radius).nonzero().flatten()
    if len(outside) == 0:
        return concepts
    direction, center, norms = _unit(vectors[outside]), _unit(centers[outside]), norms[outside, None]
    tangent = direction - cosine[outside, None] * center  # the great circle's direction, at the center, toward the concept
    tangent_norm = tangent.norm(dim=1, keepdim=True)
    on_circle = target * center + (1 - target**2) ** 0.5 * tangent / tangent_norm.clamp_min(1e-30)
    # A concept pointing exactly away from its center (or a zero one) has no great circle to follow: it takes
    # the center's direction (a zero concept at unit norm).
    moved = torch.where(tangent_norm > 1e-12, on_circle, center) * torch.where(norms > 0, norms, 1.0)
    projected = concepts.clone()
    projected[outside] = moved.to(concepts.dtype)
    return projected


class ConceptProjector:
    """Projects concepts into the grounded set of radius γ around a bank, cheaply at every step.

    Each concept keeps a shortlist of its `shortlist_size` nearest bank vectors, and `step` projects it onto the cap
    of its nearest shortlisted vector. The shortlists are recomputed over the whole bank at the first step, every
    `refresh_steps` steps after that, and at the first step after `restart()` (a training run calls it after every
    checkpoint, where a resumed run starts: so a resumed run refreshes exactly where the uninterrupted one did). A
    concept can drift out of its shortlist's reach between refreshes and still stays grounded (every shortlisted
    vector is a bank vector); it is only pulled toward an older neighbour than its nearest.

    Concepts from cosine γ + `GROUNDING_MARGIN`/2 up are left alone and the others moved to γ + `GROUNDING_MARGIN`
    (both capped at 1).

    Args:
        bank: `(N, D)` the bank (`grounding_bank`), on the concepts' device.
        radius: γ in (0, 1].
        refresh_steps: steps between shortlist refreshes.
        shortlist_size: nearest bank vectors kept per concept.
    """

    def __init__(self, bank: torch.Tensor, radius: float, refresh_steps: int = 50, shortlist_size: int = 8):
        if not 0 < radius <= 1:
            raise ValueError(f"The grounding radius must be in (0, 1], got {radius}.")
        self.bank = bank
        self.radius = min(radius + GROUNDING_MARGIN / 2, 1.0)
        self.target = min(radius + GROUNDING_MARGIN, 1.0)
        self.refresh_steps = refresh_steps
        self.shortlist_size = shortlist_size
        self.shortlist: torch.Tensor | None = None  # (K, m, D) float32 unit vectors
        self.steps_since_refresh = 0

    def restart(self) -> None:
        """Forget the shortlists: the next step recomputes them."""
        self.shortlist = None

    @torch.no_grad()
    def refresh(self, concepts: torch.Tensor) -> None:
        """Recompute every concept's shortlist over the whole bank."""
        _, rows = nearest_bank_vectors(concepts, self.bank, self.shortlist_size)
        self.shortlist = _unit(self.bank[rows].float())
        self.steps_since_refresh = 0

    @torch.no_grad()
    def step(self, concepts: torch.Tensor) -> torch.Tensor:
        """`(K, D)` → `(K, D)`: the concepts after an optimiser step, projected against their shortlists
        (refreshed first when due)."""
        if self.shortlist is None or self.steps_since_refresh >= self.refresh_steps:
            self.refresh(concepts)
        self.steps_since_refresh += 1
        # The nearest shortlisted vector has the largest dot product (the vectors are unit, the concept's norm is common).
        nearest = torch.einsum("kd,kmd->km", concepts.float(), self.shortlist).argmax(dim=1)
        centers = self.shortlist[torch.arange(len(concepts), device=concepts.device), nearest]
        return project_to_cap(concepts, centers, self.radius, self.target)

    @torch.no_grad()
    def exact(self, concepts: torch.Tensor) -> torch.Tensor:
        """`(K, D)` → `(K, D)`: the concepts projected onto the cap of their nearest vector in the whole bank."""
        _, rows = nearest_bank_vectors(concepts, self.bank, 1)
        return project_to_cap(concepts, self.bank[rows[:, 0]], self.radius, self.target)


class GroundedConcepts:
    """A model's concepts kept grounded by a `ConceptProjector` during training, on any number of processes.

    The main process projects and every process receives its result, so all processes hold the same concepts
    whatever their float arithmetic; the others hold no bank (`projector` None there).
    """

    def __init__(self, model, accelerator, projector: ConceptProjector | None):
        self.model, self.accelerator, self.projector = model, accelerator, projector

    def after_step(self) -> None:
        """The `fit(after_step=...)` hook: project after every optimiser step."""
        self._project(lambda concepts: self.projector.step(concepts))

    def restart(self) -> None:
        """After a checkpoint: the next step recomputes the shortlists, as a run resumed from it does."""
        if self.projector is not None:
            self.projector.restart()

    def finish(self) -> None:
        """The exact projection over the whole bank that ends a phase."""
        self._project(lambda concepts: self.projector.exact(concepts))

    def _project(self, project) -> None:
        concepts = self.model.codebook.concepts.detach()
        if self.accelerator.is_main_process:
            concepts = project(concepts)
        set_concepts(self.model, broadcast_tensor(self.accelerator, concepts))


__all__ = [
    "GROUNDING_MARGIN",
    "ConceptProjector",
    "GroundedConcepts",
    "grounding_bank",
    "nearest_bank_vectors",
    "project_to_cap",
]
