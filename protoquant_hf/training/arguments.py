"""Arguments of the two-stage training job, as dataclasses for `transformers.HfArgumentParser`
(in the style of transformers' example scripts). Every field's help text is its `--help` line."""

from __future__ import annotations

from dataclasses import dataclass, field

import math

from ..configuration_protoquant import CONCEPT_TRAINING, ProtoQuantConfig
from .concept_init import CONCEPT_INITS

# Model defaults live in the config; the arguments show and pass them on.
_CONFIG_DEFAULTS = ProtoQuantConfig()
LOG_LEVELS = ("passive", "debug", "info", "warning", "error", "critical")
# Grounded fine-tuning's radius when none is given (held-out study, benchmarks/RESULTS.md), and the value that turns
# the projection off: every vector is within cosine -1 of any other.
DEFAULT_GROUNDING_RADIUS = 0.9
NO_GROUNDING = -1.0


def grounds(radius: float | None) -> bool:
    """Whether a grounding radius projects trained concepts (a radius, and not the no-constraint one)."""
    return radius is not None and radius != NO_GROUNDING


@dataclass
class DataArguments:
    dataset: str = field(
        default="animal-mnist",
        metadata={
            "help": "Bundled offline set (animal-mnist, fashion-mnist, digits, synthetic-parts, synthetic-stream), a "
            "local image folder (class sub-folders) or parquet/webdataset shards, or a Hub dataset id. From Python also "
            "a datasets.DatasetDict or IterableDatasetDict object."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the dataset (datasets' streaming=True) instead of downloading or converting it first: "
            "features are extracted shard by shard as images arrive, memory stays bounded however many there are."
        },
    )
    labels: list[str] | None = field(
        default=None,
        metadata={
            "help": "Class names in class-id order, for a stream whose label column is not a ClassLabel (its classes "
            "cannot be known without reading every row)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Square input resolution fed to the backbone (pixels). Default: the backbone's native resolution, "
            "the size its image processor outputs (224 for the bundled EfficientNet-Lite0)."
        },
    )
    max_samples_per_split: int | None = field(
        default=None, metadata={"help": "Use a stratified subset of at most this many images per split (quick runs)."}
    )
    test_split: str = field(
        default="test",
        metadata={
            "help": "Split to evaluate on: 'test' (or 'validation' when the source has no test split), or any split "
            "the dataset has, e.g. validation for ImageNet-1k, whose test split has no labels."
        },
    )
    validation_split: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this stratified fraction of the training split (fixed seed 0) and report every accuracy "
            "on it instead of on the test split, which is then not read: for choosing hyperparameters without "
            "looking at test (e.g. 0.1)."
        },
    )
    bad_images: str = field(
        default="error",
        metadata={"help": "What to do with unreadable or too-small images: 'error' or 'skip' (counted and reported)."},
    )
    augment: bool = field(
        default=False,
        metadata={
            "help": "Random resized crops and horizontal flips of the training images in both training stages. "
            "The backbone then runs on every training batch (the feature cache still serves evaluation, "
            "concept init and the probe); without augmentation every epoch reads the cache."
        },
    )
    feature_dtype: str = field(
        default="float16", metadata={"help": "Storage dtype of the feature cache: float16 (half the disk) or float32."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where feature caches live (default: $PROTOQUANT_CACHE or $HF_HOME/protoquant/features)."},
    )

    def __post_init__(self):
        # The backbone's own minimum (its downsampling or patch size) is checked when the backbone is known,
        # still before any data is read.
        from datasets import DatasetDict, IterableDatasetDict

        if not isinstance(self.dataset, (str, DatasetDict, IterableDatasetDict)):
            raise TypeError(
                f"dataset must be a name or path, a datasets.DatasetDict or an IterableDatasetDict; got "
                f"{type(self.dataset).__name__} (wrap single splits: DatasetDict(train=..., test=...))."
            )
        if self.streaming and self.augment:
            raise ValueError(
                "--augment needs random access to the training images (every epoch re-reads them), which a stream "
                "does not give: drop --augment or --streaming."
            )
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be a positive number of pixels, got {self.image_size}.")
        if self.max_samples_per_split is not None and self.max_samples_per_split < 2:
            raise ValueError(
                f"--max_samples_per_split must be >= 2 (a classifier needs images of 2 classes), got {self.max_samples_per_split}."
            )
        if self.validation_split is not None and not 0 < self.validation_split < 1:
            raise ValueError(f"--validation_split must be a fraction in (0, 1), e.g. 0.1; got {self.validation_split}.")
        if self.bad_images not in ("error", "skip"):
            raise ValueError(f"--bad_images must be 'error' or 'skip', got {self.bad_images!r}.")
        if self.feature_dtype not in ("float16", "float32"):
            raise ValueError(f"--feature_dtype must be float16 or float32, got {self.feature_dtype!r}.")


@dataclass
class ModelArguments:
    backbone: str = field(
        default="protoquant/efficientnet-lite0",
        metadata={
            "help": "Frozen backbone: a Hub id, a local folder, or a bundled offline name "
            "(protoquant/efficientnet-lite0, protoquant/efficientnet-lite2)."
        },
    )
    num_concepts: int = field(
        default=_CONFIG_DEFAULTS.num_concepts, metadata={"help": "K, the number of concepts in the codebook."}
    )
    temperature: float = field(
        default=_CONFIG_DEFAULTS.temperature, metadata={"help": "τ of the softmax over concepts at each location."}
    )
    backbone_feature_layer: int = field(
        default=-1, metadata={"help": "Which backbone feature map to use (-1 = the last stage)."}
    )

    def __post_init__(self):
        if self.num_concepts < 1:
            raise ValueError(f"--num_concepts must be >= 1, got {self.num_concepts}.")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"--temperature must be finite and > 0, got {self.temperature}.")


@dataclass
class ProtoQuantTrainingArguments:
    output_dir: str = field(default="outputs/protoquant", metadata={"help": "Folder for the trained model and summaries."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing output folder (refused without this flag)."}
    )
    resume: bool = field(
        default=False, metadata={"help": "Continue an interrupted run of the same output_dir from its last checkpoint."}
    )
    checkpoints_per_stage: int = field(
        default=10,
        metadata={"help": "Checkpoints (for --resume) written per training stage, at evenly spaced epochs and the last."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for sampling, k-means, shuffling and mixing."})
    batch_size: int = field(default=256, metadata={"help": "Batch size (per process) of both training stages."})
    shuffle_window_shards: int | None = field(
        default=None,
        metadata={
            "help": "Shuffle training epochs a window of this many feature-cache shards at a time (shards in random "
            "order, rows shuffled within each window) instead of a full permutation, so an epoch keeps only that many "
            "shards in use: for caches bigger than RAM (each shard holds 4 096 images; ImageNet at 224 px on Lite0: "
            "~0.5 GB a shard). Default: a full permutation."
        },
    )
    extraction_batch_size: int = field(default=64, metadata={"help": "Images per backbone forward pass."})
    mixed_precision: str = field(default="no", metadata={"help": "Accelerate mixed precision: no, bf16 or fp16."})
    log_level: str = field(
        default="passive",
        metadata={
            "help": "Logging level of transformers and protoquant_hf: debug, info, warning, error, critical, or "
            "passive (leave it as it is), as in transformers' TrainingArguments."
        },
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bars (one per phase)."})
    concept_training: str = field(
        default="quantized",
        metadata={
            "help": "quantized: ProtoQuant (concepts from --concept_init on the training features, learned VQ-style "
            "through the frozen head in stage 1, then fine-tuned with W under --grounding_radius, or frozen with "
            "--train_concepts False). free: the non-quantized baseline for "
            "side-by-side comparison, a PIP-Net-style prototype head on the same backbone with the same outputs: "
            "free prototypes from a random (orthogonal) start, trained jointly with W (at --stage1_lr) for "
            "stage1_epochs + stage2_epochs epochs, then the same sparsification; no k-means, no stage 1, no "
            "dead-concept or usage pruning."
        },
    )
    # Stage 1: the codebook.
    concept_init: str = field(
        default="class_kmeans",
        metadata={
            "help": f"Concept initialisation, one of {', '.join(CONCEPT_INITS)}. class_kmeans: spherical "
            "k-means within each class's training feature vectors (K/C concepts per class); kmeans: over all "
            "of them; both keep every concept alive and grounded. orthogonal is the official code's default, "
            "kept for reproduction (it leaves most concepts dead on ReLU features)."
        },
    )
    kmeans_max_vectors: int = field(
        default=50000, metadata={"help": "At most this many feature vectors are sampled for k-means (bounds its cost)."}
    )
    probe_max_samples: int = field(
        default=200_000,
        metadata={
            "help": "The linear probe is fitted on at most this many training images (a seeded sample beyond it): "
            "its memory is this many pooled feature vectors, however large the dataset."
        },
    )
    kmeans_iterations: int = field(default=20, metadata={"help": "Lloyd iterations of spherical k-means."})
    stage1_epochs: int = field(default=3, metadata={"help": "Epochs of stage-1 codebook training (0 = init only)."})
    stage1_lr: float = field(default=5e-4, metadata={"help": "Adam learning rate of the concepts in stage 1."})
    codebook_loss_weight: float = field(
        default=_CONFIG_DEFAULTS.codebook_loss_weight, metadata={"help": "w in L = CE + w·MSE(code, stop_grad(feature))."}
    )
    drop_dead_concepts: bool = field(
        default=True, metadata={"help": "After stage 1, remove concepts no training location selects."}
    )
    prune_to: int | None = field(
        default=None, metadata={"help": "Usage-based pruning of the codebook to this many concepts after stage 1."}
    )
    prune_steps: int = field(default=4, metadata={"help": "Rounds of usage-based pruning (usage recounted each round)."})
    # Stage 2: the interpretable head.
    stage2_epochs: int = field(
        default=60,
        metadata={
            "help": "Epochs of stage-2 head training (chosen on held-out data with grounded fine-tuning: 60 beat 25 by "
            "0.6-1.1 points; cheap with frozen concepts, which train on precomputed scores)."
        },
    )
    stage2_lr: float = field(
        default=0.3,
        metadata={
            "help": "Adam learning rate of the concept→class weights. Large on purpose: with τ = 0.1 and "
            "hundreds of concepts the presence scores are nearly flat."
        },
    )
    l1_lambda: float = field(
        default=_CONFIG_DEFAULTS.head_l1_lambda,
        metadata={"help": "λ of the sparsity term λ·ΣReLU(W) (saved as config.head_l1_lambda, which the stock Trainer uses)."},
    )
    train_concepts: bool = field(
        default=True,
        metadata={
            "help": "Fine-tune the concepts together with W in stage 2 and the sparsify retraining, each kept within "
            "cosine --grounding_radius of a real training feature vector (grounded concept fine-tuning). False: "
            "frozen concepts, the paper's recipe: several times faster (stage 2 trains on a precomputed score table), "
            "1.1 points lower on held-out Animal-MNIST and 3.0 on held-out Fashion-MNIST (10 k subset) at 128 px "
            "(benchmarks/RESULTS.md)."
        },
    )
    concept_lr: float = field(
        default=1e-3,
        metadata={"help": "Learning rate of the concepts when they train (chosen on held-out data: 1e-4 was 0.9-1.4 points lower)."},
    )
    grounding_radius: float | None = field(
        default=None,
        metadata={
            "help": "γ of grounded concept fine-tuning, a cosine in (0, 1]. After every optimiser step of stage 2 and "
            "of the sparsify retraining, each concept whose cosine to every bank vector (training feature vectors, "
            "--grounding_bank_size) is below γ is rotated toward its nearest one until their cosine is γ (norm "
            "kept); the others are left as they are. Every concept's grounding (max cosine to a training feature "
            "vector) then ends >= γ. 1.0: every concept is a real training vector's direction. Default: "
            f"{DEFAULT_GROUNDING_RADIUS} when ProtoQuant's concepts train (chosen on held-out data: the largest γ "
            "within one standard error of the best), none for the --concept_training free baseline. "
            f"{NO_GROUNDING}: no constraint, free fine-tuning as in the official code (concepts drift away from "
            "every training feature)."
        },
    )
    grounding_bank_size: int = field(
        default=50000,
        metadata={
            "help": "With --grounding_radius: the bank is at most this many training feature vectors, a seeded sample "
            "of the cached ones, held in the cache's dtype on the main process (50 000 x 1280 float16: 128 MB)."
        },
    )
    grounding_refresh_steps: int = field(
        default=50,
        metadata={
            "help": "With --grounding_radius: every step projects against each concept's shortlist of its 8 nearest "
            "bank vectors, recomputed over the whole bank every this many steps (and after every checkpoint, so a "
            "resumed run gives the same model); each phase ends with an exact projection over the whole bank."
        },
    )
    mixup: bool = field(
        default=False, metadata={"help": "Mixup/CutMix (α 0.8/1.0, label smoothing 0.1) on the feature maps in stage 2."}
    )
    top_k_per_class: int | None = field(
        default=10,
        metadata={
            "help": "Post-training sparsification: keep the k strongest concepts per class, drop unused "
            "concepts, retrain the head (--top_k_per_class 0 or none to skip)."
        },
    )
    sparsify_epochs: int = field(
        default=60,
        metadata={"help": "Head (and concept) retraining epochs after top-k sparsification (chosen with --stage2_epochs)."},
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Linear warm-up share of each stage's steps (cosine decay after)."})
    # Explanations stored and drawn with the model.
    gallery_per_concept: int = field(
        default=5,
        metadata={"help": "Nearest training patches per concept stored with the model in gallery/ (0: no gallery)."},
    )
    hub_bundle: bool = field(
        default=True,
        metadata={"help": "Also write OUTPUT_DIR/hub: the Hub bundle (weights without training-only state, model card, "
                  "remote code, gallery, figures, Space app) that `protoquant push` uploads."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the bundle to the Hub when training succeeded."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository of --push_to_hub, 'your-name/model-name'."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the --push_to_hub repository as private."})
    explain_test_images: int = field(
        default=4,
        metadata={
            "help": "Local explanations drawn for this many test images into figures/, with the codebook overview, "
            "a gallery page and one sheet per class (0: no figures)."
        },
    )

    def __post_init__(self):
        if not 0 <= self.l1_lambda < math.inf:
            raise ValueError(f"--l1_lambda must be finite and >= 0, got {self.l1_lambda}.")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}.")
        if self.concept_training not in CONCEPT_TRAINING:
            raise ValueError(f"--concept_training must be one of {', '.join(CONCEPT_TRAINING)}, got {self.concept_training!r}.")
        if self.concept_init not in CONCEPT_INITS:
            raise ValueError(f"--concept_init must be one of {', '.join(CONCEPT_INITS)}, got {self.concept_init!r}.")
        if self.overwrite and self.resume:
            raise ValueError("--overwrite and --resume contradict each other; pass one of them.")
        for name in ("stage1_epochs", "stage2_epochs", "sparsify_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.top_k_per_class == 0:
            self.top_k_per_class = None
        if self.top_k_per_class is not None and self.top_k_per_class < 0:
            raise ValueError(f"--top_k_per_class must be >= 1 (or 0 to skip), got {self.top_k_per_class}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id your-name/model-name.")
        if self.push_to_hub and not self.hub_bundle:
            raise ValueError("--push_to_hub uploads the bundle: do not pass --hub_bundle False with it.")
        for name in ("gallery_per_concept", "explain_test_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("checkpoints_per_stage", "batch_size", "extraction_batch_size", "kmeans_max_vectors", "probe_max_samples",
                     "kmeans_iterations", "prune_steps", "grounding_bank_size", "grounding_refresh_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.shuffle_window_shards is not None and self.shuffle_window_shards < 1:
            raise ValueError(f"--shuffle_window_shards must be >= 1 shard (or left out for a full permutation), got {self.shuffle_window_shards}.")
        if self.prune_to is not None and self.prune_to < 1:
            raise ValueError(f"--prune_to must be >= 1 concept (or left out to skip pruning), got {self.prune_to}.")
        for name in ("stage1_lr", "stage2_lr", "concept_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"--{name} must be finite and > 0, got {getattr(self, name)}.")
        if self.grounding_radius is None and self.train_concepts and self.concept_training == "quantized":
            self.grounding_radius = DEFAULT_GROUNDING_RADIUS
        if self.grounding_radius is not None:
            if not (0 < self.grounding_radius <= 1 or self.grounding_radius == NO_GROUNDING):
                raise ValueError(
                    f"--grounding_radius must be a cosine in (0, 1], or {NO_GROUNDING} for no constraint (free "
                    f"fine-tuning); got {self.grounding_radius}."
                )
            if not (self.train_concepts or self.concept_training == "free"):
                raise ValueError(
                    "--grounding_radius bounds how far fine-tuned concepts may move, but --train_concepts False "
                    "freezes them: drop one of the two."
                )
        if not 0 <= self.codebook_loss_weight < math.inf:
            raise ValueError(f"--codebook_loss_weight must be finite and >= 0, got {self.codebook_loss_weight}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"--mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}.")

    @property
    def grounds_concepts(self) -> bool:
        """Whether trained concepts are projected back into the grounded set."""
        return grounds(self.grounding_radius)


__all__ = ["DEFAULT_GROUNDING_RADIUS", "NO_GROUNDING", "DataArguments", "ModelArguments", "ProtoQuantTrainingArguments", "grounds"]
