"""Codebook utilities for stage 1: concept initialisation, usage counting, pruning, grounding.

Initialisation matters more than the paper's official default suggests: on the bundled
EfficientNet-Lite0 features (non-negative ReLU6 outputs, ~83 % zeros) orthogonal init leaves most
concepts dead and stage-1 accuracy near 50 %, while spherical k-means on real training feature
vectors keeps every concept alive (method §13). K-means is therefore the default; its cost is
bounded by sampling at most `max_vectors` feature vectors.
"""

from __future__ import annotations

import math

import torch
from transformers import initialization as init

from ..configuration_protoquant import CONCEPT_INITS
from .features import FeatureCache


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def spherical_kmeans(
    vectors: torch.Tensor, num_clusters: int, iterations: int = 20, seed: int = 0, chunk_size: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster vectors by cosine similarity (Lloyd iterations on the unit sphere).

    Args:
        vectors: `(n, D)` feature vectors (raw scale).
        num_clusters: K, at most n.
        iterations: Lloyd iterations.
        seed: seeds the initial centres (k-means++ on cosine distance).
        chunk_size: vectors per assignment chunk (bounds memory at chunk_size × K).

    Returns:
        (centroids `(K, D)`: the mean of each cluster's raw member vectors, so concepts keep the
        features' own scale, which stage 1's MSE term and the original head expect;
        assignment `(n,)`).
    """
    num_vectors = vectors.shape[0]
    if num_clusters > num_vectors:
        raise ValueError(
            f"k-means needs at least K={num_clusters} non-zero training feature vectors but only "
            f"{num_vectors} are available. Lower --num_concepts, use more training images, or use "
            "--concept_init orthogonal."
        )
    generator = torch.Generator().manual_seed(seed)
    unit = _unit(vectors.float())

    # k-means++ seeding with cosine distance, on a subsample for speed.
    pool = unit[torch.randperm(num_vectors, generator=generator)[: min(num_vectors, 20 * num_clusters)]]
    centres = [pool[torch.randint(len(pool), (1,), generator=generator)].squeeze(0)]
    closest = 1 - pool @ centres[0]
    for _ in range(1, num_clusters):
        weights = closest.clamp_min(0) + 1e-12
        chosen = pool[torch.multinomial(weights, 1, generator=generator)].squeeze(0)
        centres.append(chosen)
        closest = torch.minimum(closest, 1 - pool @ chosen)
    centres = torch.stack(centres)

    def assign(centres: torch.Tensor) -> torch.Tensor:
        return torch.cat([(part @ centres.T).argmax(dim=1) for part in unit.split(chunk_size)])

    for _ in range(iterations):
        assignment = assign(centres)
        sums = torch.zeros_like(centres).index_add_(0, assignment, unit)
        counts = torch.bincount(assignment, minlength=num_clusters)
        empty = counts == 0
        if empty.any():  # re-seed empty clusters with the worst-fitting vectors
            fit = (unit * centres[assignment]).sum(dim=1)
            sums[empty] = unit[fit.argsort()[: int(empty.sum())]]
        centres = _unit(sums)
    assignment = assign(centres)
    counts = torch.bincount(assignment, minlength=num_clusters).clamp_min(1).unsqueeze(1)
    centroids = torch.zeros(num_clusters, vectors.shape[1]).index_add_(0, assignment, vectors.float()) / counts
    lonely = centroids.norm(dim=1) == 0
    centroids[lonely] = centres[lonely] * vectors.norm(dim=1).mean()
    return centroids, assignment


@torch.no_grad()
def initialize_concepts(
    model,
    train_cache: FeatureCache,
    method: str = "kmeans",
    *,
    max_vectors: int = 50000,
    kmeans_iterations: int = 20,
    seed: int = 0,
) -> None:
    """Set the model's concepts from the training feature maps.

    Args:
        method: `"kmeans"` (spherical k-means on all training feature vectors), `"class_kmeans"`
            (k-means within each class's feature vectors, K/C concepts per class: concepts typical
            of one class, which a sparse non-negative head can use directly), `"samples"` (random
            distinct training feature vectors) or `"orthogonal"` (the official code's init, kept
            for reproduction).
        max_vectors: sample size bounding the k-means cost on large datasets.
    """
    if method not in CONCEPT_INITS:
        raise ValueError(f"Unknown concept init {method!r}; choose one of {', '.join(CONCEPT_INITS)}.")
    concepts = model.codebook.concepts
    num_concepts = concepts.shape[0]
    if method == "orthogonal":
        init.orthogonal_(concepts.data, generator=torch.Generator().manual_seed(seed))
        return
    vectors, labels = train_cache.feature_vectors(max_vectors=max_vectors, seed=seed)
    if num_concepts > len(vectors):
        raise ValueError(
            f"Initialising K={num_concepts} concepts needs at least K non-zero training feature vectors, but only "
            f"{len(vectors)} are available. Lower --num_concepts, use more training images, or use "
            "--concept_init orthogonal."
        )
    if method == "kmeans":
        centroids, _ = spherical_kmeans(vectors, num_concepts, kmeans_iterations, seed)
    elif method == "class_kmeans":
        classes = labels.unique()
        shares = [num_concepts // len(classes) + (i < num_concepts % len(classes)) for i in range(len(classes))]
        parts = []
        for label, share in zip(classes.tolist(), shares):
            members = vectors[labels == label]
            if share > len(members):
                raise ValueError(
                    f"class_kmeans gives class {label} {share} concepts but it has only {len(members)} non-zero "
                    "training feature vectors. Lower --num_concepts or use --concept_init kmeans."
                )
            if share > 0:
                parts.append(spherical_kmeans(members, share, kmeans_iterations, seed)[0])
        centroids = torch.cat(parts)
    else:  # samples
        centroids = vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:num_concepts]]
    concepts.data.copy_(centroids.to(concepts))


@torch.no_grad()
def concept_usage(model, cache: FeatureCache, batch_size: int = 256, indices=None) -> torch.Tensor:
    """How many feature-map locations pick each concept as their nearest (K,) over `cache` rows
    (`indices`, all by default). Sum it across processes for a global count."""
    usage = torch.zeros(model.config.num_concepts, dtype=torch.long)
    device = model.codebook.concepts.device
    for features, _ in cache.batches(batch_size, indices):
        nearest = model.codebook.nearest(features.to(device)).flatten().cpu()
        usage += torch.bincount(nearest, minlength=usage.numel())
    return usage


def usage_summary(usage: torch.Tensor) -> dict[str, float]:
    """Dead concepts and the spread of usage, for training summaries."""
    used = usage[usage > 0].float()
    return {
        "num_concepts": int(usage.numel()),
        "dead_concepts": int((usage == 0).sum()),
        "dead_ratio": float((usage == 0).float().mean()),
        "usage_max": int(usage.max()),
        "usage_median_alive": float(used.median()) if used.numel() else 0.0,
    }


@torch.no_grad()
def prune_by_usage(model, usage_fn, target_num_concepts: int, steps: int = 4) -> list[dict[str, float]]:
    """Drop the least-used concepts in `steps` rounds until `target_num_concepts` remain (§4.2).

    Usage is recounted between rounds (`usage_fn(model) -> (K,) counts`, global across processes),
    because removing a concept reassigns its locations to others.

    Returns:
        The usage summary before each round.
    """
    if not 1 <= target_num_concepts <= model.config.num_concepts:
        raise ValueError(
            f"target_num_concepts must be in [1, {model.config.num_concepts}], got {target_num_concepts}."
        )
    history = []
    for round_index in range(steps):
        current = model.config.num_concepts
        remaining_rounds = steps - round_index
        drop = math.ceil((current - target_num_concepts) / remaining_rounds)
        if drop <= 0:
            break
        usage = usage_fn(model)
        history.append(usage_summary(usage))
        order = torch.argsort(usage, descending=True, stable=True)
        model.prune_concepts(order[: current - drop].sort().values)
    return history


@torch.no_grad()
def grounding_scores(concepts: torch.Tensor, cache: FeatureCache, batch_size: int = 256) -> torch.Tensor:
    """Per concept, the highest cosine similarity to any training feature vector (K,).

    A concept close to 1 is "grounded": it looks like a real training patch, which is what lets an
    explanation show it. Fine-tuned concepts drift away from every real feature (method §13).
    """
    unit_concepts = _unit(concepts.detach().float().cpu())
    best = torch.full((unit_concepts.shape[0],), -1.0)
    for features, _ in cache.batches(batch_size):
        vectors = _unit(features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1]))
        best = torch.maximum(best, (unit_concepts @ vectors.T).amax(dim=1))
    return best


def grounding_summary(scores: torch.Tensor) -> dict[str, float]:
    return {"grounding_mean": float(scores.mean()), "grounding_min": float(scores.min())}


__all__ = [
    "concept_usage",
    "grounding_scores",
    "grounding_summary",
    "initialize_concepts",
    "prune_by_usage",
    "spherical_kmeans",
    "usage_summary",
]
