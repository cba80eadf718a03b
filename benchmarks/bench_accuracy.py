"""Accuracy of ProtoQuant against the dense linear probe: frozen, free and grounded fine-tuned concepts, several seeds.

Every run is one `train_protoquant` job (bundled EfficientNet-Lite0; runs of one dataset and resolution share a
feature cache), recorded in a JSON file as it finishes, so an interrupted benchmark continues where it stopped
(rerun the same command). Methods:

  frozen        --train_concepts False: k-means concepts, stage 1, frozen in stage 2 (the paper's recipe and the job's
                default before grounded fine-tuning), with the 100 stage-2 and retraining epochs it had then
  free          --concept_training free (a PIP-Net-style baseline: prototypes trained freely with W), 100 + 100 epochs
  grounded-γ    --train_concepts --grounding_radius γ: concepts trained with W, projected back within cosine γ of a
                real training feature vector after every step (γ = 1: concepts are training vectors)

Two stages, never mixing their data:

  study       --split validation: every run trains on 90 % of train and is measured on the held-out 10 %
              (--validation_split 0.1); a grid of concept learning rates and epochs for grounded fine-tuning at
              --study-gamma, then every γ at the chosen setting. The choice rule (printed): the best mean validation
              accuracy; among γ, the largest γ within one standard error of the best (more grounded at equal
              accuracy). The test split is never read.
  benchmark   --split test: each method at the chosen setting (--concept-lr/--epochs), on the full train split,
              measured on test; --seeds seeds each; table of mean and range, and an accuracy-vs-γ figure.

    python benchmarks/bench_accuracy.py study --dataset animal-mnist --json benchmarks/accuracy_study.json
    python benchmarks/bench_accuracy.py benchmark --dataset animal-mnist --concept-lr 1e-3 --epochs 30 \
        --json benchmarks/accuracy.json --figure docs/accuracy_vs_gamma.png
    python benchmarks/bench_accuracy.py table --json benchmarks/accuracy.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch

from protoquant_hf.training import (
    DataArguments,
    ModelArguments,
    ProtoQuantTrainingArguments,
    TrainingSummary,
    train_protoquant,
)

GAMMAS = (1.0, 0.95, 0.9, 0.85)


def method_arguments(method: str, concept_lr: float, epochs: int | None) -> dict:
    """Training-argument overrides of one method ("frozen", "free" or "grounded-<γ>")."""
    # The references keep the epochs they were first measured with (the job's defaults before grounded fine-tuning).
    if method == "frozen":
        return {"train_concepts": False, "stage2_epochs": 100, "sparsify_epochs": 100}
    if method == "free":
        return {"concept_training": "free", "stage2_epochs": 100, "sparsify_epochs": 100}
    if method.startswith("grounded-"):
        overrides = {"train_concepts": True, "grounding_radius": float(method.split("-", 1)[1]), "concept_lr": concept_lr}
        if epochs is not None:
            overrides.update(stage2_epochs=epochs, sparsify_epochs=epochs)
        return overrides
    raise ValueError(f"unknown method {method!r}")


def run_id(dataset: str, image_size: int, split: str, method: str, seed: int, concept_lr: float, epochs: int | None,
           mixed_precision: str = "no") -> str:
    setting = f"lr{concept_lr:g}-ep{epochs}" if method.startswith("grounded-") else "default"
    key = f"{dataset}/{image_size}px/{split}/{method}/{setting}/seed{seed}"
    # Full precision keeps the ids it was first recorded with.
    return key if mixed_precision == "no" else f"{key}/{mixed_precision}"


class Results:
    """The JSON file of finished runs: run id → {method, seed, settings, summary}. Written after every run."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.runs = json.loads(self.path.read_text())["runs"] if self.path.exists() else {}

    def run(self, dataset, image_size, split, method, seed, concept_lr, epochs, threads, max_samples=None,
            mixed_precision="no") -> TrainingSummary:
        label = dataset if max_samples is None else f"{dataset}[:{max_samples}]"  # a subset is a dataset of its own
        key = run_id(label, image_size, split, method, seed, concept_lr, epochs, mixed_precision)
        if key not in self.runs:
            overrides = method_arguments(method, concept_lr, epochs)
            print(f"== {key}: {overrides}", flush=True)
            torch.set_num_threads(threads)
            with tempfile.TemporaryDirectory() as tmp:
                summary = train_protoquant(
                    DataArguments(dataset=dataset, image_size=image_size, max_samples_per_split=max_samples,
                                  validation_split=0.1 if split == "validation" else None),
                    ModelArguments(),
                    ProtoQuantTrainingArguments(
                        output_dir=str(Path(tmp) / "run"), seed=seed, explain_test_images=0, gallery_per_concept=0,
                        hub_bundle=False, disable_tqdm=True, mixed_precision=mixed_precision, **overrides,
                    ),
                )
            self.runs[key] = {
                "dataset": label, "max_samples": max_samples, "image_size": image_size, "split": split, "method": method, "seed": seed,
                "concept_lr": concept_lr, "epochs": epochs, "threads": threads, "mixed_precision": mixed_precision,
                "summary": summary.to_dict(),
            }
            self.path.write_text(json.dumps({"runs": self.runs}, indent=1))
            print(f"   accuracy {summary.accuracy:.4f} ({summary.accuracy_vs_linear_probe:.3f} x probe), "
                  f"grounding min {summary.grounding.min:.3f}, {summary.total_s:.0f} s", flush=True)
        return TrainingSummary.from_dict(self.runs[key]["summary"])

    def groups(self) -> dict[tuple, list[dict]]:
        """Runs grouped by everything but the seed, in insertion order."""
        grouped: dict[tuple, list[dict]] = {}
        for record in self.runs.values():
            key = (record["dataset"], record["image_size"], record["split"], record["method"], record["concept_lr"] if record["method"].startswith("grounded-") else None,
                   record["epochs"] if record["method"].startswith("grounded-") else None, record.get("mixed_precision", "no"))
            grouped.setdefault(key, []).append(record)
        return grouped


def _mean_range(values: list[float], digits: int = 4) -> str:
    text = f"{statistics.mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def standard_error(accuracy: float, num_images: int) -> float:
    """Binomial standard error of an accuracy measured on `num_images` images."""
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / num_images)


HEADER = (
    "| dataset | px | split | model | seeds | accuracy mean (range) | × linear probe | non-zero concepts per class mean / max "
    "| grounding mean / min | concept lr / epochs (s2 = top-k retrain) | wall time per run |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def table(results: Results) -> str:
    lines, probes_done = [HEADER], set()
    for (dataset, size, split, method, lr, epochs, precision), records in results.groups().items():
        summaries = [TrainingSummary.from_dict(r["summary"]) for r in records]
        precision_note = "" if precision == "no" else f", {precision} autocast"  # its own features, so its own probe
        if (dataset, size, split, precision) not in probes_done:
            probes_done.add((dataset, size, split, precision))
            probe = [s.linear_probe_accuracy for s in summaries]
            lines.append(f"| {dataset} | {size} | {split} | linear probe (dense, pooled features){precision_note} | {len(probe)} | {_mean_range(probe)} | 1.000 | dense | - | - | - |")
        per_class = [s.concepts_per_class for s in summaries]
        setting = f"{lr:g} / {epochs if epochs is not None else 'default'}" if lr is not None else "default"
        lines.append(
            f"| {dataset} | {size} | {split} | {method}{precision_note} | {len(summaries)} | {_mean_range([s.accuracy for s in summaries])} "
            f"| {_mean_range([s.accuracy_vs_linear_probe for s in summaries], 3)} "
            f"| {statistics.mean(p.nonzero_mean for p in per_class):.1f} / {max(p.nonzero_max for p in per_class)} "
            f"| {statistics.mean(s.grounding.mean for s in summaries):.3f} / {min(s.grounding.min for s in summaries):.3f} "
            f"| {setting} | {statistics.mean(s.total_s for s in summaries):.0f} s |"
        )
    return "\n".join(lines)


def figure(results: Results, path: str) -> None:
    """Accuracy (× probe) against γ for grounded fine-tuning, one colour per dataset / resolution / split: the mean over
    seeds joined across γ, the range as error bars, frozen and free concepts as dashed and dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.6, 4.6))
    grounded: dict[tuple, dict] = {}  # (dataset, px, split) → (concept lr, epochs) → γ → ratios
    references: dict[tuple, dict] = {}  # (dataset, px, split) → frozen / free → ratios
    for (dataset, size, split, method, lr, epochs, precision), records in results.groups().items():
        if precision != "no":  # the figure compares methods at full precision
            continue
        ratios = [TrainingSummary.from_dict(r["summary"]).accuracy_vs_linear_probe for r in records]
        if method.startswith("grounded-"):
            grounded.setdefault((dataset, size, split), {}).setdefault((lr, epochs), {})[float(method.split("-", 1)[1])] = ratios
        else:
            references.setdefault((dataset, size, split), {})[method] = ratios
    # Series measured at the same γ would hide each other's points: offset them sideways by a fixed step, centred on γ.
    offset = {series: (rank - (len(grounded) - 1) / 2) * 0.0025 for rank, series in enumerate(grounded)}
    for index, series in enumerate(dict.fromkeys([*grounded, *references])):
        (dataset, size, split), methods = series, references.get(series, {})
        label, colour = f"{dataset} {size} px, {split}", f"C{index}"
        # A study's grid has several settings at one γ: show the setting measured at the most γ (the chosen one).
        settings = grounded.get(series, {})
        gammas = sorted(max(settings.values(), key=len).items()) if settings else []
        if gammas:
            means = [statistics.mean(r) for _, r in gammas]
            spread = [[m - min(r) for m, (_, r) in zip(means, gammas)], [max(r) - m for m, (_, r) in zip(means, gammas)]]
            seeds = sorted({len(r) for _, r in gammas})
            ax.errorbar([g + offset[series] for g, _ in gammas], means, yerr=spread, fmt="o-", color=colour, capsize=3,
                        label=f"grounded, {label} ({'–'.join(map(str, seeds))} seed{'s' if seeds[-1] > 1 else ''})")
        for method, style in (("frozen", "--"), ("free", ":")):
            if method in methods:
                ax.axhline(statistics.mean(methods[method]), linestyle=style, color=colour, linewidth=1,
                           label=f"{method} concepts, {label}")
    ax.axhline(0.99, color="grey", linewidth=0.8, label="target 0.99 × probe")
    ax.set_xlabel("grounding radius γ (every concept within cosine γ of a training feature vector)")
    ax.set_ylabel("accuracy / dense linear probe")
    ax.invert_xaxis()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: points stay visible
    ax.set_title("ProtoQuant, ≤ 10 concepts per class: accuracy vs grounding\n"
                 "(mean, range over seeds; series offset sideways so that none hides another)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study(args) -> None:
    results = Results(args.json)
    val_size = None

    def mean_accuracy(method, lr, epochs):
        nonlocal val_size
        summaries = [results.run(args.dataset, args.image_size, "validation", method, seed, lr, epochs, args.threads, args.max_samples)
                     for seed in range(args.seeds)]
        val_size = summaries[0].dataset.test_size
        return statistics.mean(s.accuracy for s in summaries)

    grid = {(lr, epochs): mean_accuracy(f"grounded-{args.study_gamma:g}", lr, epochs) for epochs in args.epoch_grid for lr in args.lr_grid}
    (best_lr, best_epochs), best = max(grid.items(), key=lambda item: item[1])
    print(table(results))
    print(f"\nchosen at γ {args.study_gamma:g}: concept lr {best_lr:g}, {best_epochs} epochs (validation {best:.4f})")
    by_gamma = {gamma: mean_accuracy(f"grounded-{gamma:g}", best_lr, best_epochs) for gamma in GAMMAS}
    top = max(by_gamma.values())
    error = standard_error(top, val_size) / math.sqrt(args.seeds)
    chosen = max(gamma for gamma, accuracy in by_gamma.items() if accuracy >= top - error)
    for method in ("frozen", "free"):
        mean_accuracy(method, best_lr, None)
    print(table(results))
    print(f"\nγ: validation accuracy {by_gamma}; best {top:.4f}, one standard error of a {args.seeds}-seed mean on "
          f"{val_size} images {error:.4f} → largest γ within it: {chosen:g}")


def benchmark(args) -> None:
    results = Results(args.json)
    for method in args.methods:
        for seed in range(args.seeds):
            results.run(args.dataset, args.image_size, args.split, method, seed, args.concept_lr, args.epochs, args.threads,
                        args.max_samples, args.mixed_precision)
        print(table(results), flush=True)
    if args.figure:
        figure(results, args.figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("study", "held-out choice of the grounded fine-tuning setting"), ("benchmark", "every method on test")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--json", required=True, help="results file (read, extended, rewritten after every run)")
        command.add_argument("--dataset", default="animal-mnist")
        command.add_argument("--image-size", type=int, default=128)
        command.add_argument("--seeds", type=int, default=3 if name == "benchmark" else 2)
        command.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads per run")
        command.add_argument("--max-samples", type=int, default=None,
                             help="the first N images of each split (--max_samples_per_split); recorded as dataset[:N]")
    study_command, benchmark_command = commands.choices["study"], commands.choices["benchmark"]
    study_command.add_argument("--study-gamma", type=float, default=0.9)
    study_command.add_argument("--lr-grid", type=float, nargs="+", default=[1e-4, 1e-3])
    study_command.add_argument("--epoch-grid", type=int, nargs="+", default=[30, 100])
    benchmark_command.add_argument("--concept-lr", type=float, required=True)
    benchmark_command.add_argument("--epochs", type=int, required=True, help="stage-2 and top-k retraining epochs of grounded runs")
    benchmark_command.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                                   help="the job's --mixed_precision (bf16: autocast, on CPU when no GPU is there)")
    benchmark_command.add_argument("--figure", default=None, help="write the accuracy-vs-γ figure here (PNG)")
    benchmark_command.add_argument("--split", choices=["test", "validation"], default="test",
                                   help="validation: the same runs on the held-out 10 %% of train (for choosing defaults)")
    benchmark_command.add_argument(
        "--methods", nargs="+", default=["frozen", "free", *(f"grounded-{gamma:g}" for gamma in GAMMAS)],
        help="methods to run, in this order (an interrupted benchmark keeps what finished)",
    )
    table_command = commands.add_parser("table", help="render the table (and --figure) of one or more results files")
    table_command.add_argument("--json", required=True, nargs="+", help="results files (their runs are shown together)")
    table_command.add_argument("--figure", default=None, help="write the accuracy-vs-γ figure here (PNG)")
    args = parser.parse_args()
    if args.command == "study":
        study(args)
    elif args.command == "benchmark":
        benchmark(args)
    else:
        results = Results(args.json[0])
        for other in args.json[1:]:
            results.runs.update(Results(other).runs)
        print(table(results))
        if args.figure:
            figure(results, args.figure)


if __name__ == "__main__":
    main()
