"""Two-stage ProtoQuant training: concept init, stage 1 (codebook), stage 2 (sparse head).

The Python API behind `protoquant train`: `train_protoquant` runs the whole job (the phases of
`job.PHASES`) and returns a typed `TrainingSummary`; `ProtoQuantTrainer` is the transformers
`Trainer` front end. Feature caches, concept statistics and concept editing live in
`protoquant_hf.concepts`.
"""

from .arguments import DataArguments, ModelArguments, ProtoQuantTrainingArguments
from .concept_init import CONCEPT_INITS, initialize_concepts, spherical_kmeans
from .job import PHASES, check_saved_model, train_protoquant
from .objectives import mix_batch, model_objective, soft_cross_entropy
from .probe import fit_linear_probe
from .summary import TrainingSummary
from .trainer import ProtoQuantTrainer, compute_accuracy, prepare_trainer_datasets

__all__ = [
    "CONCEPT_INITS",
    "DataArguments",
    "ModelArguments",
    "PHASES",
    "ProtoQuantTrainer",
    "ProtoQuantTrainingArguments",
    "TrainingSummary",
    "check_saved_model",
    "compute_accuracy",
    "fit_linear_probe",
    "initialize_concepts",
    "mix_batch",
    "model_objective",
    "prepare_trainer_datasets",
    "soft_cross_entropy",
    "spherical_kmeans",
    "train_protoquant",
]
