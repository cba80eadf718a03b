"""Two-stage ProtoQuant training: concept init, stage 1 (codebook), stage 2 (sparse head).

The stages' building blocks (arguments, k-means init, linear probe, objectives, grounded concept fine-tuning, the
Accelerate loop, the typed `TrainingSummary`) and `ProtoQuantTrainer`, the transformers `Trainer` front end. The main
job that runs them with the gallery, figures and Hub bundle, `train_protoquant`, lives one level up
(`protoquant_hf.job`) and is re-exported here. Feature caches, concept statistics and concept editing live in
`protoquant_hf.concepts`.
"""

from .arguments import DataArguments, ModelArguments, ProtoQuantTrainingArguments
from .concept_init import CONCEPT_INITS, initialize_concepts, spherical_kmeans
from .grounding import ConceptProjector, grounding_bank, nearest_bank_vectors, project_to_cap
from .objectives import mix_batch, model_objective, soft_cross_entropy
from .probe import fit_linear_probe, pooled_training_sample
from .summary import TrainingSummary
from .trainer import ProtoQuantTrainer, compute_accuracy, prepare_trainer_datasets

_FROM_THE_JOB = ("PHASES", "check_saved_model", "train_protoquant")


def __getattr__(name: str):
    # The job imports this package, so it is re-exported lazily (no import cycle).
    if name in _FROM_THE_JOB:
        from .. import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CONCEPT_INITS",
    "ConceptProjector",
    "DataArguments",
    "ModelArguments",
    "PHASES",
    "ProtoQuantTrainer",
    "ProtoQuantTrainingArguments",
    "TrainingSummary",
    "check_saved_model",
    "compute_accuracy",
    "fit_linear_probe",
    "pooled_training_sample",
    "grounding_bank",
    "initialize_concepts",
    "mix_batch",
    "model_objective",
    "nearest_bank_vectors",
    "prepare_trainer_datasets",
    "project_to_cap",
    "soft_cross_entropy",
    "spherical_kmeans",
    "train_protoquant",
]
