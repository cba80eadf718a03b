"""The main job (`protoquant train`) as a table of contents: `PHASES`, run in order on one `RunContext`.

It sits above the layers it combines: the training stages (`training/`), the gallery and figures (`explain/`) and the
Hub bundle (`hub/`), which all stand on `concepts/` without importing each other.

    dataset ─▶ feature cache ─▶ init (k-means) ─▶ probe (stage-1 head, dense reference)
            ─▶ stage1 (codebook) ─▶ prune (dead / usage) ─▶ stage2 (sparse head)
            ─▶ sparsify (top-k + retrain) ─▶ grounding ─▶ gallery ─▶ figures ─▶ output folder

Each phase is a function of the run context returning its typed result (`summary.py`), or None when
its options skip it. The run works in a hidden sibling folder (``.<name>.incomplete``): after every
phase, and at evenly spaced epochs inside the training stages, it checkpoints the model and the
progress, so ``--resume`` continues an interrupted run where it stopped; the folder is marked complete
and renamed to ``output_dir`` only when every phase succeeded (`output_folder.py`: a previous run is
replaced only after that, and a run stopped while publishing is published by a rerun). Adding a phase is
one function and one entry in `PHASES`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import IterableDataset
from transformers import AutoConfig, AutoImageProcessor

from .concepts import (
    ConceptStats,
    FeatureCache,
    concept_score_store,
    extract_features,
    keep_top_k_per_class,
    prune_by_usage,
    prune_concepts,
    remove_unused_concepts,
    set_concepts,
    stream_description,
)
from .data import hold_out_validation, load_image_dataset, make_image_transform, native_image_size, with_image_size
from .explain import ConceptGallery, build_gallery, write_figures
from .hub import check_repo_and_token, export_bundle, push_bundle
from .image_processing_protoquant import ProtoQuantImageProcessor
from .configuration_protoquant import ProtoQuantConfig, backbone_kind
from .backbones import quiet_transformers, resolve_backbone
from .memory import release_free_heap
from .modeling_protoquant import ProtoQuantForImageClassification, ProtoQuantModel
from .output_folder import check_destination, crash_point, is_complete, mark_complete, publish, work_folder, write_lock
from .training.arguments import DataArguments, ModelArguments, ProtoQuantTrainingArguments
from .training.concept_init import initialize_concepts
from .training.grounding import ConceptProjector, GroundedConcepts, grounding_bank
from .training.loop import AugmentedImages, Objective, accuracy, broadcast_tensor, fit
from .training.objectives import mix_batch, model_objective
from .training.probe import fit_linear_probe, pooled_training_sample
from .training.summary import (
    SUMMARY_FILE,
    CodebookResult,
    ConceptsPerClass,
    DatasetInfo,
    FiguresResult,
    GalleryResult,
    GroundingResult,
    HeadResult,
    InitResult,
    PhaseResult,
    ProbeResult,
    PruneResult,
    TrainingSummary,
)

LOG_FILE = "train_log.jsonl"
PROGRESS_FILE = "progress.json"
# What a finished work folder no longer needs once it is published.
WORK_LEFTOVERS = ("checkpoint", PROGRESS_FILE, PROGRESS_FILE + ".tmp")
logger = logging.getLogger(__name__)


# ---- the run's persistent progress ---------------------------------------------------------------


@dataclass
class RunProgress:
    """Where the run is and what it measured so far; saved as ``progress.json`` in the work folder.

    Attributes:
        phase: the phase to run (or being run) next.
        epoch: epochs of that phase already done (a resumed stage continues from there).
        phase_seconds: time already spent in that phase by earlier segments of the run.
        phase_state: what that phase must remember across an interruption (e.g. concepts it removed).
        results: finished phases' results (`PhaseResult.to_dict()`), in order.
        log: one record per training epoch.
        feature_extraction_s / total_s: seconds summed over the run's earlier segments.
    """

    phase: str
    epoch: int = 0
    phase_seconds: float = 0.0
    phase_state: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    log: list = field(default_factory=list)
    feature_extraction_s: float = 0.0
    total_s: float = 0.0

    @classmethod
    def load(cls, work: Path) -> "RunProgress":
        return cls(**json.loads((work / PROGRESS_FILE).read_text()))


@dataclass
class RunContext:
    """Everything a phase works on. Built once per run segment (fresh or resumed)."""

    data_args: DataArguments
    model_args: ModelArguments
    args: ProtoQuantTrainingArguments
    accelerator: Accelerator
    work: Path
    model: ProtoQuantForImageClassification
    source: str
    class_names: list[str]
    train_cache: FeatureCache
    test_cache: FeatureCache
    train_inputs: FeatureCache | AugmentedImages
    progress: RunProgress
    dataset: object = None  # the DatasetDict (train / test)
    processor: object = None  # the ProtoQuantImageProcessor saved with the model
    on_epoch_end: Callable[[str, int], None] | None = None
    segment_started: float = field(default_factory=time.perf_counter)
    phase_started: float = field(default_factory=time.perf_counter)
    stage1_usage: torch.Tensor | None = None  # counted after stage 1, reused by the prune phase
    final_stats: ConceptStats | None = None  # of the final model (grounding pass), reused by gallery and figures
    grounding_bank: torch.Tensor | None = None  # --grounding_radius: built once (main process) for both head phases

    @property
    def free_concepts(self) -> bool:
        """The non-quantized baseline (`--concept_training free`): prototypes train jointly with W."""
        return self.args.concept_training == "free"

    @property
    def augmented(self) -> bool:
        return isinstance(self.train_inputs, AugmentedImages)

    @property
    def train_input_name(self) -> str:
        return "pixel_values" if self.augmented else "feature_maps"

    @property
    def resuming_phase(self) -> bool:
        """Whether the current phase was interrupted part-way and is being continued."""
        return self.progress.epoch > 0 or bool(self.progress.phase_state)

    @property
    def show_progress(self) -> bool:
        return not self.args.disable_tqdm

    def phase_elapsed(self) -> float:
        return self.progress.phase_seconds + time.perf_counter() - self.phase_started

    def checkpoint(self, phase: str, epoch: int = 0, with_optimizer: bool = False) -> None:
        """Save the model (its config carries the current K), optionally the Accelerate state of the
        running stage (optimizer, scheduler, RNG), then the progress marker, last."""
        accelerator, progress = self.accelerator, self.progress
        if phase != progress.phase:
            progress.phase_seconds, progress.phase_state = 0.0, {}
        else:
            progress.phase_seconds = self.phase_elapsed()
        progress.phase, progress.epoch = phase, epoch
        self.phase_started = time.perf_counter()
        accelerator.wait_for_everyone()
        if with_optimizer:
            accelerator.save_state(str(self.work / "checkpoint" / "state"), safe_serialization=True)
        if accelerator.is_main_process:
            with quiet_transformers():
                self.model.save_pretrained(self.work / "checkpoint" / "model")
            saved = asdict(progress)
            saved["total_s"] = progress.total_s + time.perf_counter() - self.segment_started
            tmp = self.work / (PROGRESS_FILE + ".tmp")
            tmp.write_text(json.dumps(saved, indent=2))
            tmp.replace(self.work / PROGRESS_FILE)
        accelerator.wait_for_everyone()

    def concept_stats(self, top_n: int = 1) -> ConceptStats:
        """Global statistics of the current concepts over the training cache (all processes)."""
        return ConceptStats.collect(self.model, self.train_cache, top_n=top_n, accelerator=self.accelerator)

    def test_accuracy(self, stage: str = "head") -> float:
        model = self.model.eval()
        return accuracy(
            self.accelerator, lambda maps: model(feature_maps=maps, stage=stage).logits, self.test_cache, self.test_cache.labels
        )

    def fit_stage(
        self, stage: str, objective: Objective, param_groups: list[dict], inputs, epochs: int,
        after_checkpoint: Callable[[], None] | None = None, **kwargs,
    ) -> None:
        """Train one stage with evenly spaced checkpoints (epoch-based, so every process agrees),
        continuing from the last one when the run is resumed there. `after_checkpoint()` follows each
        checkpoint: state the checkpoint does not hold is rebuilt there, as a run resumed from it rebuilds it."""
        args, progress = self.args, self.progress
        every = max(1, math.ceil(epochs / args.checkpoints_per_stage))
        resuming = progress.phase == stage and progress.epoch > 0
        state = self.work / "checkpoint" / "state"

        def on_epoch_end(epoch: int, record: dict) -> None:
            progress.log.append(record)
            if (epoch + 1) % every == 0 or epoch + 1 == epochs:
                self.checkpoint(stage, epoch + 1, with_optimizer=True)
                if after_checkpoint is not None:
                    after_checkpoint()
            if self.on_epoch_end is not None:
                self.on_epoch_end(stage, epoch)

        window = args.shuffle_window_shards
        fit(
            self.accelerator, objective, param_groups, inputs, self.train_cache.labels,
            epochs=epochs, batch_size=args.batch_size, seed=args.seed, warmup_ratio=args.warmup_ratio, desc=stage,
            epoch_order=(lambda epoch: self.train_cache.shard_order(epoch, args.seed, window)) if window else None,
            start_epoch=progress.epoch if resuming else 0,
            restore=(lambda: self.accelerator.load_state(str(state))) if resuming and state.exists() else None,
            on_epoch_end=on_epoch_end, show_progress=self.show_progress, **kwargs,
        )


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[RunContext], PhaseResult | None]


# ---- the phases ------------------------------------------------------------------------------------


def initialize(ctx: RunContext) -> InitResult:
    """Concepts from the training features (k-means by default), computed once and broadcast. The free
    baseline's prototypes start random (orthogonal), as PIP-Net's do."""
    args, model = ctx.args, ctx.model
    method = "orthogonal" if ctx.free_concepts else args.concept_init
    if ctx.accelerator.is_main_process:
        initialize_concepts(
            model, ctx.train_cache, method,
            max_vectors=args.kmeans_max_vectors, kmeans_iterations=args.kmeans_iterations, seed=args.seed,
        )
    set_concepts(model, broadcast_tensor(ctx.accelerator, model.codebook.concepts.detach().cpu()))
    return InitResult(method=method, usage=ctx.concept_stats().usage_summary())


def fit_stage1_head(ctx: RunContext) -> ProbeResult:
    """Step 0: the frozen head stage 1 trains through, and the dense reference accuracy."""
    model, accelerator = ctx.model, ctx.accelerator
    if _checkpoint_head_matches(model, ctx.source, ctx.class_names):
        head_kind = "checkpoint"
    else:
        pooled, labels = pooled_training_sample(ctx.train_cache, ctx.args.probe_max_samples, seed=ctx.args.seed)
        probe = fit_linear_probe(pooled, labels, len(ctx.class_names))
        probe.weight.data = broadcast_tensor(accelerator, probe.weight.data)
        probe.bias.data = broadcast_tensor(accelerator, probe.bias.data)
        model.set_stage1_head(probe)
        head_kind = "linear_probe"
    head = model.original_head
    probe_accuracy = accuracy(
        accelerator, lambda maps: head.classifier(head.norm(maps.mean(dim=(2, 3)))), ctx.test_cache, ctx.test_cache.labels
    )
    return ProbeResult(head=head_kind, accuracy=probe_accuracy)


def train_codebook(ctx: RunContext) -> CodebookResult | None:
    """Stage 1: the concepts learn through the frozen stage-1 head on quantized features (not for the free
    baseline, which has no quantization)."""
    model, args = ctx.model, ctx.args
    if ctx.free_concepts:
        return None
    model.set_trainable("codebook")
    ctx.fit_stage(
        "stage1", Objective(model, model_objective("codebook", ctx.train_input_name)),
        [{"params": [model.codebook.concepts], "lr": args.stage1_lr}], ctx.train_inputs, args.stage1_epochs,
    )
    model.set_trainable("head")
    stats = ctx.concept_stats()
    ctx.stage1_usage = stats.usage
    return CodebookResult(accuracy=ctx.test_accuracy("codebook"), usage=stats.usage_summary(), epochs=args.stage1_epochs)


def prune_codebook(ctx: RunContext) -> PruneResult | None:
    """Dead concepts (no training location picks them) and optional usage-based pruning (both read the
    stage-1 codebook, which the free baseline does not have)."""
    model, args = ctx.model, ctx.args
    if ctx.free_concepts:
        return None
    dead_removed, rounds = 0, []
    if args.drop_dead_concepts:
        # The counts of stage 1, unless this run resumed right at this phase.
        usage = ctx.stage1_usage if ctx.stage1_usage is not None else ctx.concept_stats().usage
        dead_removed = int((usage == 0).sum())
        if dead_removed:
            prune_concepts(model, usage > 0)
    if args.prune_to is not None and args.prune_to < model.config.num_concepts:
        rounds = prune_by_usage(model, lambda _: ctx.concept_stats().usage, args.prune_to, args.prune_steps)
    return PruneResult(dead_removed=dead_removed, usage_rounds=rounds, num_concepts=model.config.num_concepts)


def train_head(ctx: RunContext) -> HeadResult:
    """Stage 2: the non-negative concept→class weights with CE + λ·ΣReLU(W). The free baseline trains its
    prototypes with W here, for stage-1 + stage-2 epochs (the same budget of epochs)."""
    args = ctx.args
    return _train_head(ctx, "stage2", args.stage2_epochs + (args.stage1_epochs if ctx.free_concepts else 0))


def sparsify_head(ctx: RunContext) -> HeadResult | None:
    """Optional: keep the top-k concepts per class, remove concepts no class uses, retrain the head."""
    args, model, progress = ctx.args, ctx.model, ctx.progress
    if args.top_k_per_class is None:
        return None
    if not ctx.resuming_phase:
        keep_top_k_per_class(model, min(args.top_k_per_class, model.config.num_concepts))
        progress.phase_state["concepts_removed"] = remove_unused_concepts(model)
        ctx.checkpoint("sparsify", 0)  # the sparsified model, so a resumed retraining starts from it
    return _train_head(ctx, "sparsify", args.sparsify_epochs, concepts_removed=progress.phase_state["concepts_removed"])


def measure_grounding(ctx: RunContext) -> GroundingResult:
    """Per concept, the highest cosine similarity to any training feature vector (the model's own cosine).
    The same pass keeps each concept's nearest patches for the gallery (the final model does not change)."""
    ctx.final_stats = ctx.concept_stats(top_n=max(1, ctx.args.gallery_per_concept))
    return GroundingResult(grounding=ctx.final_stats.grounding_summary())


def store_gallery(ctx: RunContext) -> GalleryResult | None:
    """The codebook gallery (each concept's nearest training patches) into the model folder's gallery/."""
    per_concept = ctx.args.gallery_per_concept
    if per_concept == 0:
        return None
    if ctx.accelerator.is_main_process:
        gallery, ctx.final_stats = build_gallery(
            ctx.model, ctx.dataset["train"], ctx.processor, per_concept=per_concept, features=ctx.train_cache,
            stats=ctx.final_stats, dataset_name=dataset_name(ctx.data_args), show_progress=ctx.show_progress,
        )
        folder = gallery.save(ctx.work)
        size = sum(path.stat().st_size for path in folder.iterdir())
    else:
        size = 0
    return GalleryResult(per_concept=per_concept, thumb_size=32, bytes=size)


def draw_figures(ctx: RunContext) -> FiguresResult | None:
    """Figures into the model folder's figures/: local explanations of a few test images (one per class, in
    class order), the codebook overview, and with a gallery its first page and one sheet per class."""
    count = ctx.args.explain_test_images
    if count == 0:
        return None
    # Collected by every process (a run resumed here has no grounding pass to reuse), drawn by the main one.
    stats = ctx.final_stats or ctx.concept_stats()
    if not ctx.accelerator.is_main_process:
        return FiguresResult(files=[])
    gallery = None
    if (ctx.work / "gallery").exists():
        gallery = ConceptGallery.load(ctx.work)
        gallery.check_matches(ctx.model)
    labels, images = first_image_per_class(ctx.dataset["test"], ctx.model.config.num_labels, count)
    files = write_figures(
        ctx.model, ctx.work, stats=stats, gallery=gallery, images=images,
        image_processor=ctx.processor,
    )
    # The explained images themselves, as examples for the demo app.
    (ctx.work / "examples").mkdir(exist_ok=True)
    for number, (label, image) in enumerate(zip(labels, images), start=1):
        name = f"examples/{number}_{ctx.class_names[label]}.png"
        image.convert("RGB").save(ctx.work / name)
        files.append(name)
    return FiguresResult(files=files)


def first_image_per_class(split, num_classes: int, count: int) -> tuple[list[int], list]:
    """(labels, images) of the first image of each class in class order, at most `count`: from the label column of a
    map-style split, or by reading a stream only until every class has been seen."""
    if not isinstance(split, IterableDataset):
        labels = list(split["label"])
        rows = [labels.index(c) for c in range(num_classes) if c in labels][:count]
        return [labels[row] for row in rows], [split[row]["image"] for row in rows]
    first = {}
    for example in split:
        first.setdefault(int(example["label"]), example["image"])
        if len(first) == num_classes:
            break
    chosen = sorted(first)[:count]
    return chosen, [first[label] for label in chosen]


PHASES: tuple[Phase, ...] = (
    Phase("init", initialize),
    Phase("probe", fit_stage1_head),
    Phase("stage1", train_codebook),
    Phase("prune", prune_codebook),
    Phase("stage2", train_head),
    Phase("sparsify", sparsify_head),
    Phase("grounding", measure_grounding),
    Phase("gallery", store_gallery),
    Phase("figures", draw_figures),
)
DONE = "done"


def _grounded_concepts(ctx: RunContext) -> GroundedConcepts:
    """`--grounding_radius`: the projector keeping the concepts grounded, with the bank on the main process only
    (it projects for every process)."""
    args, projector = ctx.args, None
    if ctx.accelerator.is_main_process:
        if ctx.grounding_bank is None:
            bank = grounding_bank(ctx.train_cache, args.grounding_bank_size, seed=args.seed)
            ctx.grounding_bank = bank.to(ctx.accelerator.device)
        projector = ConceptProjector(ctx.grounding_bank, args.grounding_radius, args.grounding_refresh_steps)
    return GroundedConcepts(ctx.model, ctx.accelerator, projector)


def _train_head(ctx: RunContext, stage: str, epochs: int, **result_fields) -> HeadResult:
    """Head training. With frozen concepts and neither mixing nor augmentation the concept scores of
    every training image are fixed, so they are computed once and the epochs train W on that table.
    With `--grounding_radius` the trained concepts are projected back into the grounded set after every
    step and, exactly over the whole bank, at the end."""
    args, model = ctx.args, ctx.model
    train_concepts = args.train_concepts or ctx.free_concepts
    model.set_trainable("head", train_concepts=train_concepts)
    param_groups = [{"params": [model.classifier.weight], "lr": args.stage2_lr}]
    if train_concepts:
        # The free baseline's prototypes learn at the rate ProtoQuant's concepts learn at in stage 1.
        concept_lr = args.stage1_lr if ctx.free_concepts else args.concept_lr
        param_groups.append({"params": [model.codebook.concepts], "lr": concept_lr})
    mixing = None
    if args.mixup:
        num_classes = model.config.num_labels
        mixing = lambda inputs, labels, rng: mix_batch(inputs, labels, num_classes, rng=rng)  # noqa: E731
    grounded = _grounded_concepts(ctx) if train_concepts and args.grounds_concepts else None
    # The score table goes to disk beside the feature cache (bounded memory at any N), for this phase only.
    with tempfile.TemporaryDirectory(prefix=".concept-scores-", dir=ctx.train_cache.path.parent) as scores_folder:
        if train_concepts or args.mixup or ctx.augmented:
            inputs, input_name = ctx.train_inputs, ctx.train_input_name
        else:
            inputs, input_name = concept_score_store(model, ctx.train_cache, scores_folder), "concept_scores"
        ctx.fit_stage(
            stage, Objective(model, model_objective("head", input_name)), param_groups, inputs, epochs,
            transform_batch=mixing, after_step=grounded.after_step if grounded else None,
            after_checkpoint=grounded.restart if grounded else None,
        )
        del inputs  # its memory maps close before the folder goes
    if grounded:
        grounded.finish()
    model.set_trainable("head")
    return HeadResult(
        accuracy=ctx.test_accuracy(),
        num_concepts=model.config.num_concepts,
        concepts_per_class=ConceptsPerClass.from_weight(model.classifier.weight),
        epochs=epochs,
        **result_fields,
    )


# ---- the job ----------------------------------------------------------------------------------------


def is_training_run(folder: Path) -> bool:
    """Whether `folder` holds a finished protoquant training run (its summary and a ProtoQuant config.json):
    the only kind of folder `--overwrite` may replace."""
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and config.get("model_type") == "protoquant"


@dataclass
class OutputPlan:
    """Where a run writes: the output folder, its hidden work folder, and whether that work is already complete
    (an earlier run finished training and was stopped while publishing: only the rename is left)."""

    output_dir: Path
    work: Path
    finish_only: bool = False


def check_output_dir(args: ProtoQuantTrainingArguments, cache_dir: str | None = None) -> OutputPlan:
    """Refuse unsafe or occupied output folders before anything is read or written."""
    output_dir = Path(args.output_dir).expanduser()
    work = work_folder(output_dir)
    rules = dict(replaceable=is_training_run, kind="a protoquant training run", existing="a previous training run",
                 protected=[cache_dir] if cache_dir else [])
    if is_complete(work):  # publishing replaces the previous run this finished run was started to replace
        check_destination(args.output_dir, overwrite=True, **rules)
        return OutputPlan(output_dir, work, finish_only=True)
    check_destination(args.output_dir, overwrite=args.overwrite or args.resume, **rules)
    if args.resume:
        if not (work / PROGRESS_FILE).exists():
            raise ValueError(f"--resume: there is no interrupted run of {output_dir} to continue (no {work / PROGRESS_FILE}).")
    elif work.exists() and not args.overwrite:
        raise ValueError(
            f"An interrupted run of {output_dir} exists ({work}). Pass --resume to continue it, or --overwrite to start over."
        )
    return OutputPlan(output_dir, work)


def _finish(work: Path, output_dir: Path, model, processor, summary: TrainingSummary, log: list, args) -> None:
    """Write the output into the work folder, mark it complete, publish it (main process only). Until the marker
    exists, `--resume` redoes this from the last checkpoint; after it, any rerun only publishes."""
    model.config.architectures = ["ProtoQuantForImageClassification"]
    with quiet_transformers():
        model.save_pretrained(work)
    processor.save_pretrained(work)
    summary.save(work)
    (work / LOG_FILE).write_text("".join(json.dumps(record) + "\n" for record in log))
    if args.hub_bundle:
        export_bundle(work, work / "hub", repo_id=args.hub_model_id, overwrite=True)
    crash_point("before-complete")
    mark_complete(work)
    crash_point("complete")
    publish(work, output_dir, is_training_run, leftovers=WORK_LEFTOVERS)


def dataset_name(data_args: DataArguments) -> str:
    """What summaries, cards and gallery indexes call the dataset: its name or path, or a description of an object."""
    if isinstance(data_args.dataset, str):
        return data_args.dataset
    splits = ", ".join(f"{split}: {len(part)}" if hasattr(part, "__len__") else split for split, part in data_args.dataset.items())
    return f"a {type(data_args.dataset).__name__} given in Python ({splits})"


def _arguments_record(data_args: DataArguments) -> dict:
    """`asdict` of the data arguments for the summary, the dataset object (if any) replaced by its description
    (asdict would deep-copy it)."""
    return asdict(replace(data_args, dataset=dataset_name(data_args)))


def stream_identity(data_args: DataArguments, split_data, split: str) -> dict | None:
    """What tells this run's stream from any other in the feature-cache key (None for map-style data, which the cache
    hashes). A stream cannot be hashed without reading it all, so its key is what loaded it: the data arguments
    that choose and cut it (`max_samples_per_split` is a `take(n)`, invisible on the stream itself), with the
    stream's public description (info and a hash of its first rows). A stream object given in Python cannot be
    identified at all: it gets a key of its own, so its features are extracted again on every run, never mixed up."""
    if not isinstance(split_data, IterableDataset):
        return None
    if not isinstance(data_args.dataset, str):
        logger.info("The %s stream is an object: it cannot be identified without reading it, so its features are "
                    "extracted anew (load it by name to reuse the cache).", split)
        return {"stream object": uuid.uuid4().hex}
    arguments = {name: getattr(data_args, name) for name in (
        "dataset", "dataset_config", "image_column", "label_column", "max_samples_per_split", "labels", "bad_images",
        "validation_split",
    )}  # fmt: skip
    return {"arguments": arguments, "split": split, "stream": stream_description(split_data)}


def load_dataset_for(data_args: DataArguments):
    """The dataset a run with these arguments trains and evaluates on."""
    dataset = load_image_dataset(
        data_args.dataset,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        bad_images=data_args.bad_images,
        max_samples_per_split=data_args.max_samples_per_split,
        streaming=data_args.streaming,
        labels=data_args.labels,
        **({"name": data_args.dataset_config} if data_args.dataset_config else {}),
    )
    # A source with train/validation only has its validation split as "test" already.
    if data_args.test_split != "test" and not (data_args.test_split == "validation" and "validation" not in dataset):
        if data_args.test_split not in dataset:
            raise ValueError(
                f"--test_split {data_args.test_split!r}: the dataset has the splits {sorted(dataset)}; choose one of them."
            )
        dataset = type(dataset)({"train": dataset["train"], "test": dataset[data_args.test_split]})
    return hold_out_validation(dataset, data_args.validation_split) if data_args.validation_split else dataset


def _class_names(dataset) -> list[str]:
    names = dataset["train"].features["label"].names
    if len(names) < 2:
        raise ValueError(f"The dataset has {len(names)} class(es); a classifier needs at least 2.")
    return names


def _checkpoint_head_matches(model, source: str, class_names: list[str]) -> bool:
    if model.original_head is None:
        return False
    checkpoint_labels = AutoConfig.from_pretrained(source).id2label or {}
    return [checkpoint_labels.get(i) for i in range(len(checkpoint_labels))] == class_names


def check_backbone(name: str, image_size: int | None) -> tuple[str, object, int]:
    """Check the backbone before any data is read: a loadable transformers config of a supported family, an
    image processor, and an image size its downsampling (or patch size) allows (None: its native resolution).
    Returns its folder or Hub id, its image processor and the image size."""
    source = resolve_backbone(name)
    try:
        backbone_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot use {name!r} as a backbone: it needs a transformers config.json (a Hugging Face model folder or "
            f"Hub id of a vision model). Loading it failed with: {error}"
        ) from None
    backbone_config = getattr(backbone_config, "vision_config", None) or backbone_config
    backbone_kind(backbone_config.model_type)  # unsupported families: one error listing the supported ones
    try:
        image_processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"The backbone {name!r} has no usable image processor (preprocessor_config.json), which training and "
            f"serving need to turn images into pixel values. Loading it failed with: {error}"
        ) from None
    if image_size is None:
        image_size = native_image_size(image_processor)
    probe = ProtoQuantModel(ProtoQuantConfig(backbone_config=backbone_config, num_concepts=1, id2label={0: "a", 1: "b"}))
    minimum = probe.minimum_image_size()
    if image_size < minimum:
        raise ValueError(
            f"--image_size {image_size} is too small for the backbone {name!r}: it needs at least {minimum} px a side "
            f"(its native resolution is {getattr(backbone_config, 'image_size', 'unknown')})."
        )
    patch = getattr(backbone_config, "patch_size", None) if probe.backbone_kind == "tokens" else None
    if patch and image_size % patch:
        raise ValueError(f"--image_size must be a multiple of the backbone's patch size {patch}, got {image_size}.")
    return source, image_processor, image_size


def _set_log_level(level: str) -> None:
    if level == "passive":
        return
    value = transformers.utils.logging.log_levels[level]
    transformers.utils.logging.set_verbosity(value)
    logging.getLogger("protoquant_hf").setLevel(value)


def train_protoquant(
    data_args: DataArguments,
    model_args: ModelArguments,
    training_args: ProtoQuantTrainingArguments,
    *,
    on_epoch_end: Callable[[str, int], None] | None = None,
) -> TrainingSummary:
    """Run the whole job and return its summary (also written to the output folder).

    Args:
        on_epoch_end: optional hook called with (stage, epoch index) after each epoch's checkpoint,
            e.g. to stop a run early in tests.
    """
    _set_log_level(training_args.log_level)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=training_args.mixed_precision)
    # One run at a time writes an output folder; the processes of one run count as one (the main one holds it).
    with write_lock(training_args.output_dir) if accelerator.is_main_process else contextlib.nullcontext():
        return _run_job(accelerator, data_args, model_args, training_args, on_epoch_end)


def _run_job(
    accelerator: Accelerator,
    data_args: DataArguments,
    model_args: ModelArguments,
    training_args: ProtoQuantTrainingArguments,
    on_epoch_end: Callable[[str, int], None] | None,
) -> TrainingSummary:
    plan = check_output_dir(training_args, data_args.cache_dir)
    output_dir, work = plan.output_dir, plan.work
    if training_args.push_to_hub:  # a bad repo id or a missing login is found now, not after training
        check_repo_and_token(training_args.hub_model_id)
    if plan.finish_only:  # trained and marked complete, stopped while publishing: just publish
        summary = TrainingSummary.load(work)
        if accelerator.is_main_process:
            publish(work, output_dir, is_training_run, leftovers=WORK_LEFTOVERS)
        accelerator.wait_for_everyone()
        return summary
    set_seed(training_args.seed)
    segment_started = time.perf_counter()

    source, backbone_processor, image_size = check_backbone(model_args.backbone, data_args.image_size)
    data_args = replace(data_args, image_size=image_size)  # the native resolution when none was given, from here on
    dataset = load_dataset_for(data_args)
    class_names = _class_names(dataset)
    processor = ProtoQuantImageProcessor.wrap(with_image_size(backbone_processor, data_args.image_size))
    transform = make_image_transform(processor)

    if training_args.resume:
        progress = RunProgress.load(work)
        with quiet_transformers():
            model = ProtoQuantForImageClassification.from_pretrained(work / "checkpoint" / "model", dtype=torch.float32)
    else:
        progress = RunProgress(phase=PHASES[0].name)
        model = ProtoQuantForImageClassification.from_backbone(
            model_args.backbone,
            num_concepts=model_args.num_concepts,
            id2label=dict(enumerate(class_names)),
            label2id={name: i for i, name in enumerate(class_names)},
            image_size=data_args.image_size,
            temperature=model_args.temperature,
            backbone_feature_layer=model_args.backbone_feature_layer,
            codebook_loss_weight=training_args.codebook_loss_weight,
            head_l1_lambda=training_args.l1_lambda,
            concept_training=training_args.concept_training,
        )
    if model.config.num_labels != len(class_names):
        raise ValueError(
            f"The model has {model.config.num_labels} labels but the dataset has {len(class_names)} classes."
        )
    model.to(accelerator.device)
    model.use_fast_backbone()  # exact and faster for the bundled EfficientNets; a no-op elsewhere

    tick = time.perf_counter()
    extract = dict(
        accelerator=accelerator, dtype=data_args.feature_dtype, batch_size=training_args.extraction_batch_size,
        cache_dir=data_args.cache_dir, show_progress=not training_args.disable_tqdm,
    )
    train_cache, test_cache = (
        extract_features(
            model, dataset[split], processor, transform, split=split,
            content_description=stream_identity(data_args, dataset[split], split), **extract,
        )
        for split in ("train", "test")
    )
    progress.feature_extraction_s += time.perf_counter() - tick
    if data_args.augment:
        # Training epochs read freshly augmented images through the frozen backbone; the cache
        # still serves evaluation, concept init and the probe.
        seed = training_args.seed + 1000 * accelerator.process_index
        train_inputs = AugmentedImages(dataset["train"], make_image_transform(processor, augment_seed=seed))
    else:
        train_inputs = train_cache

    ctx = RunContext(
        data_args=data_args, model_args=model_args, args=training_args, accelerator=accelerator, work=work,
        model=model, source=source, class_names=class_names, train_cache=train_cache, test_cache=test_cache,
        train_inputs=train_inputs, progress=progress, on_epoch_end=on_epoch_end, segment_started=segment_started,
        dataset=dataset, processor=processor,
    )
    names = [phase.name for phase in PHASES]
    start = names.index(progress.phase) if progress.phase in names else len(PHASES)
    for index in range(start, len(PHASES)):
        phase = PHASES[index]
        ctx.phase_started = time.perf_counter()
        result = phase.run(ctx)
        release_free_heap()
        if result is not None:
            result.seconds = ctx.phase_elapsed()
            progress.results[phase.name] = result.to_dict()
        if index == 0 and not training_args.resume and accelerator.is_main_process:
            # Only now, with every input validated and the first phase done, does the run write anything.
            if training_args.overwrite:
                shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
        ctx.checkpoint(names[index + 1] if index + 1 < len(PHASES) else DONE)

    summary = TrainingSummary(
        dataset=DatasetInfo(
            name=dataset_name(data_args), classes=class_names, train_size=len(train_cache), test_size=len(test_cache),
            image_size=data_args.image_size, feature_map=list(train_cache.shape[1:]),
            test_split=dataset["test"].info.description or "the dataset's test split",
        ),
        phases={name: PhaseResult.from_dict(result) for name, result in progress.results.items()},
        feature_extraction_s=progress.feature_extraction_s,
        total_s=progress.total_s + time.perf_counter() - segment_started,
        processes=accelerator.num_processes,
        arguments={"data": _arguments_record(data_args), "model": asdict(model_args), "training": asdict(training_args)},
        versions={
            "protoquant_hf": __import__("protoquant_hf").__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish(work, output_dir, model, processor, summary, progress.log, training_args)
        if training_args.push_to_hub:
            commit = push_bundle(output_dir / "hub", training_args.hub_model_id, private=training_args.hub_private_repo)
            logger.warning("Pushed the bundle to %s", getattr(commit, "commit_url", training_args.hub_model_id))
    accelerator.wait_for_everyone()
    return summary


def check_saved_model(output_dir: str | Path, data_args: DataArguments, num_images: int = 16) -> dict:
    """Reload a trained folder the way users will (`AutoModelForImageClassification` and
    `pipeline("image-classification")`) and check both agree on a few test images."""
    from transformers import AutoModelForImageClassification, pipeline

    dataset = load_dataset_for(data_args)
    test = dataset["test"]
    head = test.take(num_images) if isinstance(test, IterableDataset) else test.select(range(min(num_images, len(test))))
    images = [row["image"] for row in head]
    with quiet_transformers():
        model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    classify = pipeline("image-classification", model=model, image_processor=processor)
    with torch.no_grad():
        direct = model(**processor(images=images, return_tensors="pt")).logits.argmax(-1)
    via_pipeline = [classify(image, top_k=1)[0]["label"] for image in images]
    agree = sum(model.config.id2label[int(i)] == label for i, label in zip(direct, via_pipeline))
    return {"num_images": len(images), "agreement": agree / max(len(images), 1)}


__all__ = ["PHASES", "Phase", "RunContext", "check_output_dir", "check_saved_model", "is_training_run", "train_protoquant"]
