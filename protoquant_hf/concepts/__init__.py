"""The neutral layer every consumer of concepts stands on: training, explanations and metrics import it,
never each other.

``cache``    the on-disk feature cache (frozen-backbone feature maps, computed once)
``stats``    `ConceptStats`: usage, nearest training patches, grounding, per-class presence in one pass
``editing``  the only functions that change concepts or the concept→class weights
"""

from .cache import FeatureCache, backbone_fingerprint, cache_key, extract_features
from .editing import (
    keep_top_k_per_class,
    prune_by_usage,
    prune_concepts,
    remove_unused_concepts,
    set_concepts,
    zero_weight,
)
from .stats import ConceptStats, GroundingSummary, UsageSummary, concepts_per_class

__all__ = [
    "ConceptStats",
    "FeatureCache",
    "GroundingSummary",
    "UsageSummary",
    "backbone_fingerprint",
    "cache_key",
    "concepts_per_class",
    "extract_features",
    "keep_top_k_per_class",
    "prune_by_usage",
    "prune_concepts",
    "remove_unused_concepts",
    "set_concepts",
    "zero_weight",
]
