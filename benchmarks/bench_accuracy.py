"""Accuracy of ProtoQuant against the dense linear probe, on full bundled datasets.

For each dataset, two training runs through `train_protoquant` (sharing one feature cache):
  frozen     the defaults: concepts frozen in stage 2 (grounded), top-k sparsification
  finetuned  the same with --train_concepts (the official code's stage-2 default)
and one table row per model: linear probe (dense), stage-1 quantized, stage 2, after top-k, with
concepts per class (non-zero weights, the headline; the fewest holding 95 % of the weight; the paper's
ReLU(W) > 0.1 count), grounding, K, λ, τ and epochs. Prints a markdown table and writes the raw summaries
to --json (summaries of earlier versions, with only the paper's count, show "-" for the others).

    python benchmarks/bench_accuracy.py --datasets animal-mnist fashion-mnist --json benchmarks/accuracy.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from protoquant_hf.training import (
    DataArguments,
    ModelArguments,
    ProtoQuantTrainingArguments,
    TrainingSummary,
    train_protoquant,
)


def row(name: str, dataset: str, summary: TrainingSummary, phase: str) -> str:
    args, model = summary.arguments["training"], summary.arguments["model"]
    head = summary.phases[phase]
    probe = summary.linear_probe_accuracy
    grounding = summary.grounding
    epochs = f"{args['stage1_epochs']}/{args['stage2_epochs']}" + (f"/{args['sparsify_epochs']}" if phase == "sparsify" else "")
    per_class = head.concepts_per_class
    counts = " | ".join(
        "-" if mean is None else f"{mean:.1f} (max {maximum})"
        for mean, maximum in ((per_class.nonzero_mean, per_class.nonzero_max), (per_class.mass95_mean, per_class.mass95_max),
                              (per_class.paper_mean, per_class.paper_max))
    )
    return (
        f"| {dataset} | {name} | {head.accuracy:.4f} | {head.accuracy / probe:.3f} | {counts} "
        f"| {grounding.mean:.3f} / {grounding.min:.3f} | {head.num_concepts} | {args['l1_lambda']:g} | {model['temperature']:g} | {epochs} |"
    )


HEADER = (
    "| dataset | model | test accuracy | × linear probe | concepts per class (non-zero weights) | concepts holding 95 % of the weight "
    "| paper's count (ReLU(W) > 0.1) | grounding mean / min | K | λ | τ | epochs (s1/s2/sparsify) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table(raw: dict[str, dict[str, TrainingSummary]]) -> str:
    lines = [HEADER]
    for dataset, runs in raw.items():
        frozen, finetuned = runs["frozen"], runs["finetuned"]
        probe = frozen.linear_probe_accuracy
        stage1 = frozen.phases["stage1"]
        lines.append(f"| {dataset} | linear probe (dense, pooled features) | {probe:.4f} | 1.000 | dense | dense | dense | - | - | - | - | - |")
        lines.append(
            f"| {dataset} | stage 1 (quantized, frozen probe head) | {stage1.accuracy:.4f} | {stage1.accuracy / probe:.3f} "
            f"| - | - | - | - | - | - | - | {stage1.epochs} |"
        )
        lines.append(row("ProtoQuant, frozen concepts", dataset, frozen, "stage2"))
        lines.append(row("ProtoQuant, frozen concepts, top-k", dataset, frozen, "sparsify"))
        lines.append(row("ProtoQuant, fine-tuned concepts", dataset, finetuned, "stage2"))
        lines.append(row("ProtoQuant, fine-tuned concepts, top-k", dataset, finetuned, "sparsify"))
    return "\n".join(lines)


def _load(path: str) -> dict[str, dict[str, TrainingSummary]]:
    raw = json.loads(Path(path).read_text())
    return {dataset: {name: TrainingSummary.from_dict(summary) for name, summary in runs.items()} for dataset, runs in raw.items()}


def _dump(raw: dict[str, dict[str, TrainingSummary]]) -> str:
    return json.dumps({dataset: {name: s.to_dict() for name, s in runs.items()} for dataset, runs in raw.items()}, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["animal-mnist", "fashion-mnist"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--finetuned-epochs", type=int, default=20, help="stage-2 epochs of the fine-tuned-concepts run")
    parser.add_argument("--concept-lr", type=float, default=1e-4, help="concept learning rate of the fine-tuned run")
    parser.add_argument("--json", default=None, help="write the raw training summaries here")
    parser.add_argument("--from-json", default=None, help="only render the table of a previous --json file")
    args = parser.parse_args()
    if args.from_json:
        print(table(_load(args.from_json)))
        return

    raw = {}
    for dataset in args.datasets:
        data = DataArguments(dataset=dataset, image_size=args.image_size)
        model = ModelArguments()
        with tempfile.TemporaryDirectory() as tmp:
            frozen_args = ProtoQuantTrainingArguments(output_dir=str(Path(tmp) / "frozen"))
            frozen = train_protoquant(data, model, frozen_args)
            finetuned_args = replace(
                frozen_args, output_dir=str(Path(tmp) / "finetuned"), train_concepts=True, concept_lr=args.concept_lr,
                stage2_epochs=args.finetuned_epochs, sparsify_epochs=args.finetuned_epochs,
            )
            finetuned = train_protoquant(data, model, finetuned_args)
        raw[dataset] = {"frozen": frozen, "finetuned": finetuned}
        print(table(raw), flush=True)
        if args.json:
            Path(args.json).write_text(_dump(raw))


if __name__ == "__main__":
    main()
