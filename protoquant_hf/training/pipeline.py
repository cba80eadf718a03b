"""The two-stage training job: step 0 (stage-1 head), stage 1 (codebook), stage 2 (sparse head).

    dataset ─▶ feature cache ─▶ step 0: checkpoint head or linear probe (the dense reference)
            ─▶ concept init (k-means) ─▶ stage 1: codebook through the frozen head ─▶ usage, pruning
            ─▶ stage 2: ReLU(W) head with L1 ─▶ optional top-k sparsification + retraining
            ─▶ output folder: model + image processor + training_summary.json + train_log.jsonl

The run works in a hidden sibling folder (``.<name>.incomplete``) holding checkpoints, and renames
it to ``output_dir`` only when everything succeeded, so a failed run never leaves a half-written
output folder, and ``--resume`` continues an interrupted one from its last epoch.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoImageProcessor

from ..data import load_image_dataset, make_image_transform, to_rgb, with_image_size
from ..modeling_protoquant import ProtoQuantForImageClassification, resolve_backbone
from .arguments import DataArguments, ModelArguments, ProtoQuantTrainingArguments
from .codebook import (
    concept_usage,
    grounding_scores,
    grounding_summary,
    initialize_concepts,
    prune_by_usage,
    usage_summary,
)
from .features import FeatureCache, extract_features, fast_feature_fn
from .head import concepts_per_class, fit_linear_probe, limit_concepts_per_class, prune_unused_concepts
from .loop import AugmentedImages, Objective, accuracy, broadcast_tensor, fit, global_sum, shard_rows
from .objectives import head_loss, mix_batch, stage1_loss, stage2_loss

SUMMARY_FILE = "training_summary.json"
LOG_FILE = "train_log.jsonl"
PROGRESS_FILE = "progress.json"
PHASES = ("init", "probe", "stage1", "prune", "stage2", "sparsify", "done")


def _work_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.incomplete"


def check_output_dir(args: ProtoQuantTrainingArguments) -> tuple[Path, Path]:
    """Refuse unsafe output folders before anything is written. Returns (output_dir, work_dir)."""
    output_dir = Path(args.output_dir)
    work = _work_dir(output_dir)
    if args.resume:
        if not (work / PROGRESS_FILE).exists():
            raise ValueError(f"--resume: there is no interrupted run of {output_dir} to continue (no {work / PROGRESS_FILE}).")
        return output_dir, work
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        if (output_dir / SUMMARY_FILE).exists():
            raise ValueError(
                f"{output_dir} holds a previous training run. Pass --overwrite to replace it, or choose another --output_dir."
            )
        raise ValueError(
            f"{output_dir} exists and is not a protoquant training run; refusing to write into it. Choose another "
            "--output_dir (or pass --overwrite to replace the folder and everything in it)."
        )
    if work.exists() and not args.overwrite:
        raise ValueError(
            f"An interrupted run of {output_dir} exists ({work}). Pass --resume to continue it, or --overwrite to start over."
        )
    return output_dir, work


class RunState:
    """Which phase and epoch the run reached, results so far, and the epoch log; persisted in the
    work folder after every epoch so `--resume` can continue."""

    def __init__(self, work: Path, accelerator: Accelerator):
        self.work, self.accelerator = work, accelerator
        self.phase, self.epoch, self.results, self.timings, self.log = PHASES[0], 0, {}, {}, []

    @classmethod
    def load(cls, work: Path, accelerator: Accelerator) -> "RunState":
        state = cls(work, accelerator)
        saved = json.loads((work / PROGRESS_FILE).read_text())
        state.phase, state.epoch, state.results, state.timings, state.log = (
            saved["phase"], saved["epoch"], saved["results"], saved["timings"], saved["log"]
        )
        return state

    def done(self, phase: str) -> bool:
        return PHASES.index(self.phase) > PHASES.index(phase)

    @property
    def checkpoint(self) -> Path:
        return self.work / "checkpoint"

    def save(self, model, phase: str, epoch: int, with_optimizer: bool = False) -> None:
        """Checkpoint the model (its config carries the current K), optionally the Accelerate state
        (optimizer, scheduler, RNG) of the running stage, then the progress marker, last."""
        self.phase, self.epoch = phase, epoch
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if with_optimizer:
            accelerator.save_state(str(self.checkpoint / "state"), safe_serialization=True)
        if accelerator.is_main_process:
            model.save_pretrained(self.checkpoint / "model")
            payload = {"phase": phase, "epoch": epoch, "results": self.results, "timings": self.timings, "log": self.log}
            tmp = self.work / (PROGRESS_FILE + ".tmp")
            tmp.write_text(json.dumps(payload, indent=2))
            tmp.replace(self.work / PROGRESS_FILE)
        accelerator.wait_for_everyone()


def load_dataset_for(data_args: DataArguments):
    """The dataset a run with these arguments trains and evaluates on."""
    return load_image_dataset(
        data_args.dataset,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        bad_images=data_args.bad_images,
        max_samples_per_split=data_args.max_samples_per_split,
        **({"name": data_args.dataset_config} if data_args.dataset_config else {}),
    )


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


def train_protoquant(
    data_args: DataArguments,
    model_args: ModelArguments,
    training_args: ProtoQuantTrainingArguments,
    *,
    on_epoch_end: Callable[[str, int], None] | None = None,
) -> dict:
    """Run the whole job and return the training summary (also written to the output folder).

    Args:
        on_epoch_end: optional hook called with (stage, epoch index) after each checkpoint, e.g. to
            stop a run early in tests.
    """
    output_dir, work = check_output_dir(training_args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=training_args.mixed_precision)
    set_seed(training_args.seed)
    started = time.perf_counter()

    dataset = load_dataset_for(data_args)
    class_names = _class_names(dataset)
    source = resolve_backbone(model_args.backbone)
    processor = with_image_size(AutoImageProcessor.from_pretrained(source), data_args.image_size)
    transform = make_image_transform(processor)

    if training_args.resume:
        state = RunState.load(work, accelerator)
        model = ProtoQuantForImageClassification.from_pretrained(state.checkpoint / "model", dtype=torch.float32)
    else:
        state = RunState(work, accelerator)
        model = ProtoQuantForImageClassification.from_backbone(
            model_args.backbone,
            num_concepts=model_args.num_concepts,
            id2label=dict(enumerate(class_names)),
            label2id={name: i for i, name in enumerate(class_names)},
            image_size=data_args.image_size,
            temperature=model_args.temperature,
            backbone_feature_layer=model_args.backbone_feature_layer,
            concept_init=training_args.concept_init,
            codebook_loss_weight=training_args.codebook_loss_weight,
        )
    if model.config.num_labels != len(class_names):
        raise ValueError(
            f"The model has {model.config.num_labels} labels but the dataset has {len(class_names)} classes."
        )
    model.to(accelerator.device)

    tick = time.perf_counter()
    feature_fn = fast_feature_fn(model)
    extract = dict(
        accelerator=accelerator,
        dtype=data_args.feature_dtype,
        batch_size=training_args.extraction_batch_size,
        cache_dir=data_args.cache_dir,
        feature_fn=feature_fn,
    )
    train_cache = extract_features(model, dataset["train"], processor, transform, split="train", **extract)
    test_cache = extract_features(model, dataset["test"], processor, transform, split="test", **extract)
    state.timings.setdefault("feature_extraction_s", time.perf_counter() - tick)
    results, seed = state.results, training_args.seed
    num_classes = len(class_names)
    # What the training epochs read: the cache, or freshly augmented images run through the backbone.
    if data_args.augment:
        augment = make_image_transform(processor, augment_seed=seed + 1000 * accelerator.process_index)
        train_inputs, pixel_features = AugmentedImages(dataset["train"], augment), feature_fn
    else:
        train_inputs, pixel_features = train_cache, None

    # Concept initialisation, computed once and broadcast.
    if not state.done("init"):
        tick = time.perf_counter()
        if accelerator.is_main_process:
            initialize_concepts(
                model,
                train_cache,
                training_args.concept_init,
                max_vectors=training_args.kmeans_max_vectors,
                kmeans_iterations=training_args.kmeans_iterations,
                seed=seed,
            )
        model.codebook.concepts.data = broadcast_tensor(accelerator, model.codebook.concepts.data.cpu()).to(accelerator.device)
        state.timings["concept_init_s"] = time.perf_counter() - tick
        results["init_usage"] = usage_summary(_global_usage(accelerator, model, train_cache))
        # Only now, with every input validated, does the run write anything.
        if accelerator.is_main_process:
            if training_args.overwrite:
                shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
        state.save(model, "probe", 0)

    # Step 0: the frozen head stage 1 trains through, and the dense reference accuracy.
    if not state.done("probe"):
        tick = time.perf_counter()
        if _checkpoint_head_matches(model, source, class_names):
            results["stage1_head"] = "checkpoint"
        else:
            probe = fit_linear_probe(train_cache.pooled(), torch.from_numpy(train_cache.labels), num_classes)
            probe.weight.data = broadcast_tensor(accelerator, probe.weight.data)
            probe.bias.data = broadcast_tensor(accelerator, probe.bias.data)
            model.set_stage1_head(probe)
            results["stage1_head"] = "linear_probe"
        head = model.original_head
        test_pooled = test_cache.pooled()
        results["linear_probe_accuracy"] = accuracy(
            accelerator, lambda x: head.classifier(head.norm(x)), test_pooled, test_cache.labels
        )
        state.timings["probe_s"] = time.perf_counter() - tick
        state.save(model, "stage1", 0)

    def checkpointed(stage: str, epochs: int):
        # Evenly spaced epochs (and always the last): a checkpoint writes the whole model, which
        # costs more than a stage-2 epoch on precomputed scores. Epoch-based, so every process agrees.
        every = max(1, math.ceil(epochs / training_args.checkpoints_per_stage))

        def hook(epoch: int, record: dict) -> None:
            state.log.append(record)
            if (epoch + 1) % every == 0 or epoch + 1 == epochs:
                state.save(model, stage, epoch + 1, with_optimizer=True)
            if on_epoch_end is not None:
                on_epoch_end(stage, epoch)

        return hook

    def restore_if_resuming(stage: str):
        if state.phase == stage and state.epoch > 0 and (state.checkpoint / "state").exists():
            return lambda: accelerator.load_state(str(state.checkpoint / "state"))
        return None

    # Stage 1: codebook learning through the frozen original head.
    stage1_usage = None
    if not state.done("stage1"):
        tick = time.perf_counter()
        model.requires_grad_(False)
        model.codebook.concepts.requires_grad_(True)
        fit(
            accelerator,
            Objective(model, _on_inputs(stage1_loss, pixel_features)),
            [{"params": [model.codebook.concepts], "lr": training_args.stage1_lr}],
            train_inputs,
            train_cache.labels,
            epochs=training_args.stage1_epochs,
            batch_size=training_args.batch_size,
            seed=seed,
            warmup_ratio=training_args.warmup_ratio,
            desc="stage1",
            start_epoch=state.epoch if state.phase == "stage1" else 0,
            restore=restore_if_resuming("stage1"),
            on_epoch_end=checkpointed("stage1", training_args.stage1_epochs),
        )
        model.codebook.concepts.requires_grad_(False)
        state.timings["stage1_s"] = state.timings.get("stage1_s", 0.0) + time.perf_counter() - tick
        results["stage1_accuracy"] = accuracy(accelerator, lambda x: model.forward_quantized(x).logits, test_cache, test_cache.labels)
        stage1_usage = _global_usage(accelerator, model, train_cache)
        results["stage1_usage"] = usage_summary(stage1_usage)
        state.save(model, "prune", 0)

    # Dead concepts and usage-based pruning.
    if not state.done("prune"):
        if training_args.drop_dead_concepts:
            # The counts of the stage-1 block above, unless this run resumed right at this phase.
            usage = stage1_usage if stage1_usage is not None else _global_usage(accelerator, model, train_cache)
            if (usage > 0).sum() < len(usage):
                model.prune_concepts(usage > 0)
        if training_args.prune_to is not None and training_args.prune_to < model.config.num_concepts:
            prune_by_usage(
                model, lambda m: _global_usage(accelerator, m, train_cache), training_args.prune_to, training_args.prune_steps
            )
        results["num_concepts_after_pruning"] = model.config.num_concepts
        state.save(model, "stage2", 0)

    # Stage 2: the interpretable head (and optionally the top-k sparsified head).
    for stage, epochs in (("stage2", training_args.stage2_epochs), ("sparsify", training_args.sparsify_epochs)):
        if stage == "sparsify" and training_args.top_k_per_class is None:
            continue
        if state.done(stage):
            continue
        tick = time.perf_counter()
        resuming = state.phase == stage and state.epoch > 0
        if stage == "sparsify" and not resuming:
            limit_concepts_per_class(model, min(training_args.top_k_per_class, model.config.num_concepts))
            results["concepts_removed_by_sparsify"] = prune_unused_concepts(model)
        _train_head(
            accelerator, model, training_args, train_cache, train_inputs, pixel_features, stage, epochs,
            start_epoch=state.epoch if resuming else 0,
            restore=restore_if_resuming(stage),
            on_epoch_end=checkpointed(stage, epochs),
        )
        state.timings[f"{stage}_s"] = state.timings.get(f"{stage}_s", 0.0) + time.perf_counter() - tick
        results[f"{stage}_accuracy"] = accuracy(
            accelerator, lambda x: model.classify_features(x).logits, test_cache, test_cache.labels
        )
        per_class = concepts_per_class(model)
        results[f"{stage}_concepts_per_class"] = {"mean": float(per_class.float().mean()), "max": int(per_class.max())}
        state.save(model, PHASES[PHASES.index(stage) + 1], 0)

    tick = time.perf_counter()
    results["grounding"] = grounding_summary(grounding_scores(model.codebook.concepts, train_cache))
    state.timings["grounding_s"] = time.perf_counter() - tick
    final_stage = "sparsify" if training_args.top_k_per_class is not None else "stage2"
    results["accuracy"] = results.get(f"{final_stage}_accuracy")
    results["accuracy_vs_linear_probe"] = (
        results["accuracy"] / results["linear_probe_accuracy"] if results.get("accuracy") is not None else None
    )
    results["num_concepts"] = model.config.num_concepts
    results["concepts_per_class"] = results.get(f"{final_stage}_concepts_per_class")
    state.timings["total_s"] = state.timings.get("total_s", 0.0) + time.perf_counter() - started

    summary = {
        "results": results,
        "timings": state.timings,
        "dataset": {
            "name": data_args.dataset,
            "classes": class_names,
            "train_size": len(train_cache),
            "test_size": len(test_cache),
            "image_size": data_args.image_size,
            "feature_map": list(train_cache.features.shape[1:]),
        },
        "arguments": {"data": asdict(data_args), "model": asdict(model_args), "training": asdict(training_args)},
        "processes": accelerator.num_processes,
        "versions": {
            "protoquant_hf": __import__("protoquant_hf").__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.config.architectures = ["ProtoQuantForImageClassification"]
        model.save_pretrained(work)
        processor.save_pretrained(work)
        (work / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        (work / LOG_FILE).write_text("".join(json.dumps(record) + "\n" for record in state.log))
        shutil.rmtree(work / "checkpoint", ignore_errors=True)
        (work / PROGRESS_FILE).unlink(missing_ok=True)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        work.rename(output_dir)
    accelerator.wait_for_everyone()
    return summary


def _global_usage(accelerator: Accelerator, model, cache: FeatureCache) -> torch.Tensor:
    rows = shard_rows(len(cache), accelerator)
    return global_sum(accelerator, concept_usage(model, cache, indices=rows))


def _concept_score_table(model, cache: FeatureCache, batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        device = model.codebook.concepts.device
        return torch.cat(
            [model.forward_concepts(features.to(device)).concept_scores.cpu() for features, _ in cache.batches(batch_size)]
        )


def _on_inputs(loss_fn: Callable, pixel_features: Callable | None) -> Callable:
    """A feature-map objective as an objective on what the training source yields: feature maps
    (cache) as they are, or pixels (augmented images) through the frozen backbone first."""
    if pixel_features is None:
        return loss_fn
    return lambda model, pixels, targets: loss_fn(model, pixel_features(pixels), targets)


def _train_head(
    accelerator, model, args: ProtoQuantTrainingArguments, train_cache: FeatureCache, train_inputs,
    pixel_features: Callable | None, stage: str, epochs: int, **fit_kwargs,
) -> None:
    """Stage-2 head training. With frozen concepts and neither mixing nor augmentation, the concept
    scores of every training image are fixed, so they are computed once and the epochs train W on
    that table."""
    model.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    param_groups = [{"params": [model.classifier.weight], "lr": args.stage2_lr}]
    if args.train_concepts:
        model.codebook.concepts.requires_grad_(True)
        param_groups.append({"params": [model.codebook.concepts], "lr": args.concept_lr})
    l1 = args.l1_lambda
    mixing = None
    if args.mixup:
        num_classes = model.config.num_labels
        mixing = lambda inputs, labels, rng: mix_batch(inputs, labels, num_classes, rng=rng)  # noqa: E731
    if args.train_concepts or args.mixup or pixel_features is not None:
        loss = _on_inputs(lambda m, x, y: stage2_loss(m, x, y, l1), pixel_features)
        inputs, objective = train_inputs, Objective(model, loss)
    else:
        inputs, objective = _concept_score_table(model, train_cache), Objective(model, lambda m, x, y: head_loss(m, x, y, l1))
    fit(
        accelerator, objective, param_groups, inputs, train_cache.labels,
        epochs=epochs, batch_size=args.batch_size, seed=args.seed, warmup_ratio=args.warmup_ratio,
        desc=stage, transform_batch=mixing, **fit_kwargs,
    )
    model.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)


__all__ = ["check_output_dir", "check_saved_model", "train_protoquant"]


def check_saved_model(output_dir: str | Path, data_args: DataArguments, num_images: int = 16) -> dict:
    """Reload a trained folder the way users will (`AutoModelForImageClassification` and
    `pipeline("image-classification")`) and check both agree on a few test images."""
    from transformers import AutoModelForImageClassification, pipeline

    dataset = load_dataset_for(data_args)
    images = [row["image"] for row in dataset["test"].select(range(min(num_images, len(dataset["test"]))))]
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    classify = pipeline("image-classification", model=model, image_processor=processor)
    with torch.no_grad():
        direct = model(**processor(images=[to_rgb(image) for image in images], return_tensors="pt")).logits.argmax(-1)
    via_pipeline = [classify(to_rgb(image), top_k=1)[0]["label"] for image in images]
    agree = sum(model.config.id2label[int(i)] == label for i, label in zip(direct, via_pipeline))
    return {"num_images": len(images), "agreement": agree / max(len(images), 1)}
