"""The `protoquant` command line: a thin layer over the Python API (`protoquant_hf.training`).

    protoquant train --help
    protoquant train                      # the embedded default: bundled Lite0 + Animal-MNIST
    python -m protoquant_hf train ...     # the same
"""

from __future__ import annotations

import argparse
import sys

from transformers import HfArgumentParser

TRAIN_DESCRIPTION = """Train a ProtoQuant classifier in two stages on a frozen backbone:
step 0 (stage-1 head: the checkpoint's own or a linear probe), stage 1 (concept codebook, k-means
initialised), stage 2 (sparse non-negative concept->class head), optional top-k sparsification.
The defaults run the embedded offline job: bundled EfficientNet-Lite0 + Animal-MNIST at 128 px.
Writes OUTPUT_DIR with the model, its image processor, training_summary.json and train_log.jsonl."""


def format_summary(summary, output_dir: str, check: dict | None = None) -> str:
    """The end-of-run table of a `TrainingSummary`."""
    data, phases = summary.dataset, summary.phases
    rows = [("dataset", f"{data.name} ({data.train_size} train / {data.test_size} test, {data.image_size} px)")]
    if data.test_split != "the dataset's test split":
        rows.append(("test split", data.test_split))
    if summary.linear_probe_accuracy is not None:
        rows.append(("linear probe accuracy (dense reference)", f"{summary.linear_probe_accuracy:.4f}"))
    if "stage1" in phases:
        rows.append(("stage-1 quantized accuracy", f"{phases['stage1'].accuracy:.4f}"))
    if summary.accuracy is not None:
        ratio = f"  ({summary.accuracy_vs_linear_probe:.3f} x probe)" if summary.accuracy_vs_linear_probe else ""
        rows.append(("ProtoQuant accuracy", f"{summary.accuracy:.4f}{ratio}"))
    if summary.num_concepts is not None:
        dead = f"  (dead after stage 1: {phases['stage1'].usage.dead_concepts})" if "stage1" in phases else ""
        rows.append(("concepts (K)", f"{summary.num_concepts}{dead}"))
    if summary.concepts_per_class is not None:
        per_class = summary.concepts_per_class
        rows.append((f"concepts per class (ReLU(W) > {per_class.threshold:g})", f"mean {per_class.mean:.1f}, max {per_class.max}"))
    if summary.grounding is not None:
        rows.append(("grounding (max cosine to a training feature)", f"mean {summary.grounding.mean:.3f}, min {summary.grounding.min:.3f}"))
    rows.append(("time", f"{summary.total_s:.0f} s (feature extraction {summary.feature_extraction_s:.0f} s)"))
    if check is not None:
        rows.append(("reloaded with from_pretrained + pipeline", f"{check['agreement']:.0%} agreement on {check['num_images']} test images"))
    rows.append(("output", output_dir))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows)


def train(argv: list[str]) -> int:
    from accelerate import PartialState

    from .training import DataArguments, ModelArguments, ProtoQuantTrainingArguments, train_protoquant
    from .training.job import check_saved_model

    parser = HfArgumentParser(
        (DataArguments, ModelArguments, ProtoQuantTrainingArguments),
        prog="protoquant train",
        description=TRAIN_DESCRIPTION,
    )
    try:
        data_args, model_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # argument validation in __post_init__
        parser.error(str(error))
    try:
        summary = train_protoquant(data_args, model_args, training_args)
    except (ValueError, ImportError, FileNotFoundError, OSError) as error:
        print(f"protoquant train: error: {error}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        check = check_saved_model(training_args.output_dir, data_args)
        print("\nProtoQuant training summary")
        print(format_summary(summary, training_args.output_dir, check))
    return 0


COMMANDS = {"train": (train, "train a ProtoQuant classifier (two stages) and save it as a Hugging Face folder")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="protoquant", description="ProtoQuant interpretable image classifiers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
