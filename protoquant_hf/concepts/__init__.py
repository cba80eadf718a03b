"""The neutral layer every consumer of concepts stands on: training, explanations and metrics import it,
never each other.

``cache``    the on-disk feature cache (frozen-backbone feature maps, computed once)
``shards``   the sharded, resumable array store the cache is made of (generic over the per-row shape)
``stats``    `ConceptStats`: usage, nearest training patches, grounding, per-class presence in one pass; how many
             concepts each class uses (`concepts_per_class`, `concepts_for_weight_mass`)
``editing``  the only functions that change concepts or the concept→class weights
``edit_log`` user edits through those functions, each recorded in the edit log saved with the model
"""

from .cache import (
    CacheEntryError,
    FeatureCache,
    backbone_fingerprint,
    cache_key,
    dataset_content,
    extract_features,
    stream_description,
)
from .edit_log import EDIT_OPERATIONS, EditRecord, edit_log, edit_model
from .editing import (
    disable_concept,
    keep_top_k_per_class,
    prune_by_usage,
    prune_concepts,
    remove_unused_concepts,
    scale_weight,
    set_concepts,
    set_weight,
    top_k_mask,
)
from .stats import (
    PAPER_WEIGHT_THRESHOLD,
    WEIGHT_MASS,
    ConceptStats,
    GroundingSummary,
    UsageSummary,
    concept_score_store,
    concept_score_table,
    concepts_for_weight_mass,
    concepts_per_class,
)

__all__ = [
    "EDIT_OPERATIONS",
    "PAPER_WEIGHT_THRESHOLD",
    "WEIGHT_MASS",
    "CacheEntryError",
    "ConceptStats",
    "EditRecord",
    "FeatureCache",
    "GroundingSummary",
    "UsageSummary",
    "backbone_fingerprint",
    "cache_key",
    "concept_score_store",
    "concept_score_table",
    "concepts_for_weight_mass",
    "concepts_per_class",
    "dataset_content",
    "disable_concept",
    "edit_log",
    "edit_model",
    "extract_features",
    "keep_top_k_per_class",
    "prune_by_usage",
    "prune_concepts",
    "remove_unused_concepts",
    "scale_weight",
    "set_concepts",
    "stream_description",
    "set_weight",
    "top_k_mask",
]
