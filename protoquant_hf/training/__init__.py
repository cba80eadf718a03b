"""Two-stage ProtoQuant training: feature cache, codebook (stage 1), sparse head (stage 2).

The Python API behind `protoquant train`; `train_protoquant` runs the whole job, and every step
(feature extraction, concept init, usage, pruning, objectives, sparsification) is usable alone.
"""

from .arguments import DataArguments, ModelArguments, ProtoQuantTrainingArguments
from .codebook import (
    concept_usage,
    grounding_scores,
    grounding_summary,
    initialize_concepts,
    prune_by_usage,
    spherical_kmeans,
    usage_summary,
)
from .features import FeatureCache, extract_features, fast_feature_fn
from .head import concepts_per_class, fit_linear_probe, limit_concepts_per_class, prune_unused_concepts
from .objectives import head_loss, l1_penalty, mix_batch, soft_cross_entropy, stage1_loss, stage2_loss
from .pipeline import train_protoquant
from .trainer import ProtoQuantTrainer, compute_accuracy, prepare_trainer_datasets

__all__ = [
    "DataArguments",
    "FeatureCache",
    "ModelArguments",
    "ProtoQuantTrainer",
    "ProtoQuantTrainingArguments",
    "compute_accuracy",
    "concept_usage",
    "concepts_per_class",
    "extract_features",
    "fast_feature_fn",
    "fit_linear_probe",
    "grounding_scores",
    "grounding_summary",
    "head_loss",
    "initialize_concepts",
    "l1_penalty",
    "limit_concepts_per_class",
    "mix_batch",
    "prepare_trainer_datasets",
    "prune_by_usage",
    "prune_unused_concepts",
    "soft_cross_entropy",
    "spherical_kmeans",
    "stage1_loss",
    "stage2_loss",
    "train_protoquant",
    "usage_summary",
]
