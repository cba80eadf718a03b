"""Concept initialisation before stage 1: spherical k-means on real training feature vectors.

Initialisation matters more than the paper's official default suggests: on the bundled
EfficientNet-Lite0 features (non-negative ReLU6 outputs, ~83 % zeros) orthogonal init leaves most
concepts dead and stage-1 accuracy near 50 %, while spherical k-means on real training feature
vectors keeps every concept alive (method §13). K-means is therefore the default; its cost is
bounded by sampling at most `max_vectors` feature vectors.
"""

from __future__ import annotations

import torch

from ..concepts import FeatureCache, set_concepts

CONCEPT_INITS = ("kmeans", "class_kmeans", "samples", "orthogonal")


def unit_vectors(vectors: torch.Tensor, min_norm: float = 1e-12) -> torch.Tensor:
    """`vectors` scaled to unit norm along the last axis (a zero vector stays zero)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(min_norm)


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
    unit = unit_vectors(vectors.float())

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
        centres = unit_vectors(sums)
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
    method: str,
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
    num_concepts, hidden_size = model.codebook.concepts.shape
    if method == "orthogonal":
        set_concepts(model, torch.nn.init.orthogonal_(torch.empty(num_concepts, hidden_size), generator=torch.Generator().manual_seed(seed)))
        return
    vectors, labels = train_cache.feature_vectors(max_vectors=max_vectors, seed=seed)
    if num_concepts > len(vectors):
        num_images, _, height, width = train_cache.shape
        sampled = max_vectors is not None and num_images * height * width > max_vectors
        limit = f" in a sample of --kmeans_max_vectors {max_vectors} locations (raise it)" if sampled else ""
        raise ValueError(
            f"Initialising K={num_concepts} concepts needs at least K non-zero training feature vectors, but only "
            f"{len(vectors)} are available{limit}. Lower --num_concepts, use more training images, or use "
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
                    f"training feature vectors in the k-means sample (--kmeans_max_vectors {max_vectors}). Lower "
                    "--num_concepts, raise --kmeans_max_vectors, or use --concept_init kmeans."
                )
            if share > 0:
                parts.append(spherical_kmeans(members, share, kmeans_iterations, seed)[0])
        centroids = torch.cat(parts)
    else:  # samples
        centroids = vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:num_concepts]]
    set_concepts(model, centroids)


__all__ = ["CONCEPT_INITS", "initialize_concepts", "spherical_kmeans"]
