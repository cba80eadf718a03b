"""ProtoQuant against the non-quantized baseline head, side by side, on the paper's interpretability claims.

For each dataset and seed, two runs of the same job on the same frozen bundled backbone with the same epochs:
  protoquant  --concept_training quantized (k-means concepts, stage 1 through the frozen head, frozen in stage 2)
  baseline    --concept_training free      (PIP-Net-style free prototypes from a random start, trained with W)
then `evaluate_model` on the test split: accuracy, concepts per class, grounding, the spatial-misalignment benchmark (PAC,
PRC, PLC, AC; masked PGD ε 0.4, step 0.01, 40 iterations), Gaussian-noise stability (std 0.2), and on the part-
annotated synthetic dataset Huang et al.'s consistency and PIP-Net's part purity. Prints a markdown table of
mean and range over seeds and writes every report to --json.

    python benchmarks/bench_interpretability.py --datasets synthetic-parts animal-mnist --seeds 0 1 2 \\
        --json benchmarks/interpretability_128.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from protoquant_hf.data import load_image_dataset
from protoquant_hf.metrics.evaluation import EvaluationSettings, evaluate_folder
from protoquant_hf.training import DataArguments, ModelArguments, ProtoQuantTrainingArguments, train_protoquant

METHODS = {"protoquant": "quantized", "baseline": "free"}
# (label, report section, key, format)
METRICS = [
    ("accuracy", "size", "accuracy", "{:.4f}"),
    ("concepts per class (non-zero weights)", "size", "nonzero_size_mean", "{:.1f}"),
    ("concepts per class holding 95 % of the weight", "size", "mass95_size_mean", "{:.1f}"),
    ("local size, the paper's count (ReLU(W) > 0.1)", "size", "local_size_mean", "{:.1f}"),
    ("grounding mean", "grounding", "mean", "{:.3f}"),
    ("grounding min", "grounding", "min", "{:.3f}"),
    ("PAC % ↓", "misalignment", "mean_pac", "{:.1f}"),
    ("PRC ↓", "misalignment", "mean_prc", "{:.2f}"),
    ("PLC % ↓", "misalignment", "mean_plc", "{:.1f}"),
    ("AC points ↓", "misalignment", "ac", "{:.1f}"),
    ("noise: location unchanged % ↑", "noise", "location_stability", "{:.1f}"),
    ("noise: parts unchanged % ↑", "noise", "part_stability", "{:.1f}"),
    ("consistency % ↑", "consistency", "consistency", "{:.1f}"),
    ("part purity ↑", "purity", "mean_purity", "{:.3f}"),
]


def run(dataset: str, method: str, seed: int, work: Path, args) -> dict:
    folder = work / f"{dataset}-{method}-{seed}"
    tick = time.perf_counter()
    summary = train_protoquant(
        DataArguments(dataset=dataset, image_size=args.image_size),
        ModelArguments(),
        ProtoQuantTrainingArguments(
            output_dir=str(folder), overwrite=True, seed=seed, concept_training=METHODS[method],
            stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs, sparsify_epochs=args.sparsify_epochs,
            gallery_per_concept=0, explain_test_images=0, hub_bundle=False, disable_tqdm=True,
        ),
    )
    train_s = time.perf_counter() - tick
    data = load_image_dataset(dataset)
    settings = EvaluationSettings(
        stability=True, purity="parts" in data["test"].column_names, stability_images=args.stability_images, seed=seed,
    )
    report = evaluate_folder(folder, dataset, settings, show_progress=False)
    record = json.loads(report.to_json())
    record.update(dataset=dataset, method=method, seed=seed, train_s=train_s, linear_probe=summary.linear_probe_accuracy)
    pgd = report.seconds["misalignment"] / report.settings["stability_image_count"] * 1000
    print(f"{dataset} {method} seed {seed}: accuracy {report.size['accuracy']:.4f}, PAC "
          f"{report.misalignment['mean_pac']:.1f}, train {train_s:.0f} s, PGD {pgd:.0f} s / 1000 images", flush=True)
    return record


def cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean = fmt.format(float(np.mean(values)))
    return mean if len(values) == 1 else f"{mean} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def table(records: list[dict]) -> str:
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        rows = [r for r in records if r["dataset"] == dataset]
        seeds = sorted({r["seed"] for r in rows})
        lines += [f"**{dataset}** ({rows[0]['num_images']} test images; stability on {rows[0]['settings']['stability_image_count']}; "
                  f"seeds {', '.join(map(str, seeds))}: mean (min–max))", "",
                  "| metric | ProtoQuant | baseline (free prototypes) |", "|---|---|---|"]
        for label, section, key, fmt in METRICS:
            values = {m: [r[section][key] for r in rows if r["method"] == m and r.get(section) and r[section].get(key) is not None]
                      for m in METHODS}
            if any(values.values()):
                lines.append(f"| {label} | {cell(values['protoquant'], fmt)} | {cell(values['baseline'], fmt)} |")
        pgd = {m: [r["seconds"]["misalignment"] / r["settings"]["stability_image_count"] * 1000 for r in rows if r["method"] == m]
               for m in METHODS}
        train = {m: [r["train_s"] for r in rows if r["method"] == m] for m in METHODS}
        lines.append(f"| training time, s | {cell(train['protoquant'], '{:.0f}')} | {cell(train['baseline'], '{:.0f}')} |")
        lines.append(f"| misalignment benchmark, s per 1000 images | {cell(pgd['protoquant'], '{:.0f}')} | {cell(pgd['baseline'], '{:.0f}')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["synthetic-parts", "animal-mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--stage1_epochs", type=int, default=3)
    parser.add_argument("--stage2_epochs", type=int, default=30)
    parser.add_argument("--sparsify_epochs", type=int, default=30)
    parser.add_argument("--stability_images", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory(prefix="protoquant-interpretability-") as tmp:
        for dataset in args.datasets:
            for seed in args.seeds:
                for method in METHODS:
                    records.append(run(dataset, method, seed, Path(tmp), args))
                    if args.json:  # after every run, so a long benchmark keeps what it measured
                        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "runs": records}, indent=2))
    print(table(records))


if __name__ == "__main__":
    main()
