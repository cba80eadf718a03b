"""Scale on CPU (issue 12): memory flat in N, time linear in N, and the cost growth in K.

**N sweep.** For each N, one training job in its own process on the seeded synthetic image stream
(`load_image_dataset("synthetic-stream", streaming=True)`, 32 px, 10 classes) through a small random ResNet backbone
(the same for every N): streaming extraction into the sharded cache, k-means on a bounded sample, the linear probe on a
bounded sample, stage 1 and stage 2 (one epoch each, on the cache / the on-disk score table), the grounding pass and the
codebook gallery (a second read of the stream), evaluation on 2 000 test images. Reported: the process's peak RSS
(`wait4` of that process alone), wall time, both per 10 000 images, the phases, and a least-squares fit
time = a + b·N over the sizes.

**K sweep.** On one cache of Lite0-shaped feature maps (N images, D = 1280, 4 × 4, random float16; nothing depends on
the values but the gallery's choice of rows), for each K: one stage-2 epoch (computing the on-disk score table, then
one epoch of the head over it) and the gallery pass (`build_gallery`: the per-concept top-5 over every location, then
the K × 5 thumbnails from a synthetic image set of the same N).

    python benchmarks/bench_scale.py sizes --sizes 10000 100000 1000000 --json benchmarks/scale_sizes.json
    python benchmarks/bench_scale.py concepts --num-concepts 256 1024 4096 8192 --json benchmarks/scale_concepts.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, re, sys, threading, time
import torch
from protoquant_hf import load_image_dataset
from protoquant_hf.training import DataArguments, ModelArguments, ProtoQuantTrainingArguments, train_protoquant

num_images, backbone, work, threads = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
peaks = {"anon": 0, "file": 0}


def sample_memory():
    # RssAnon: the process's own memory; RssFile: file-backed pages (shared libraries, ~170 MB of torch, and the pages
    # of memory-mapped cache shards, which the store drops past its resident bound, 256 MB by default).
    # Peak RSS (wait4) is at most their sum.
    while True:
        status = open("/proc/self/status").read()
        for key, field in (("anon", "RssAnon"), ("file", "RssFile")):
            peaks[key] = max(peaks[key], int(re.search(field + r":\s+(\d+)", status).group(1)) / 1024)
        time.sleep(0.2)


threading.Thread(target=sample_memory, daemon=True).start()
stream = load_image_dataset("synthetic-stream", streaming=True, synthetic_stream={
    "num_images": num_images, "num_test_images": 2000, "num_classes": 10, "image_size": 32, "num_shards": 16})
start = time.perf_counter()
summary = train_protoquant(
    DataArguments(dataset=stream, image_size=32, cache_dir=work + "/cache"),
    ModelArguments(backbone=backbone, num_concepts=64),
    ProtoQuantTrainingArguments(
        # Frozen concepts, as first measured: stage 2 on the on-disk score table (grounded fine-tuning reads the maps).
        output_dir=work + "/run", train_concepts=False, stage1_epochs=1, stage2_epochs=1, top_k_per_class=None, gallery_per_concept=5,
        explain_test_images=0, hub_bundle=False, batch_size=1024, extraction_batch_size=256, disable_tqdm=True,
    ),
)
print("RESULT " + json.dumps({
    "wall_s": time.perf_counter() - start, "accuracy": summary.accuracy, "probe": summary.linear_probe_accuracy,
    "train_size": summary.dataset.train_size, "feature_map": summary.dataset.feature_map,
    "extraction_s": summary.feature_extraction_s, "peak_anon_mb": peaks["anon"], "peak_file_mb": peaks["file"],
    "phases_s": {name: round(phase.seconds, 2) for name, phase in summary.phases.items()},
}))
"""


def _backbone(folder: Path) -> str:
    """A small random ResNet (2 stages, 16/32 channels) with a 32 px processor, saved once: the same for every N."""
    import torch
    from transformers import AutoConfig, AutoModel, BitImageProcessor

    config = AutoConfig.for_model("resnet", hidden_sizes=[16, 32], depths=[1, 1], embedding_size=16)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def run_size(num_images: int, backbone: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as work:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(num_images), backbone, work, str(threads)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
        )
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)  # this process's own peak RSS, not the maximum over all children
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"N={num_images} failed:\n{output[-3000:]}")
        disk = sum(path.stat().st_size for path in Path(work, "cache").rglob("*") if path.is_file())
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    result.update(num_images=num_images, peak_rss_mb=usage.ru_maxrss / 1024, process_s=time.perf_counter() - started,
                  cache_bytes=disk)
    return result


def sizes(args) -> None:
    results = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    with tempfile.TemporaryDirectory(prefix="bench_scale_backbone_") as folder:
        backbone = _backbone(Path(folder))
        for num_images in args.sizes:
            if str(num_images) in results:
                continue
            print(f"== N = {num_images}", flush=True)
            results[str(num_images)] = run_size(num_images, backbone, args.threads)
            print(json.dumps(results[str(num_images)]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    print(size_table(results))


def size_table(results: dict) -> str:
    rows = sorted(results.values(), key=lambda r: r["num_images"])
    counts = np.array([r["num_images"] for r in rows], dtype=float)
    seconds = np.array([r["process_s"] for r in rows])
    lines = [
        "| N images | peak RSS (own memory / file-backed: libraries, mapped shards) | wall time (whole process) | s per 10 k images | extraction "
        "| stage 1 | stage 2 | gallery | cache on disk (per image) | accuracy (probe) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_image = r["cache_bytes"] / r["num_images"] if r["num_images"] else 0
        lines.append(
            f"| {r['num_images']:,} | {r['peak_rss_mb']:.0f} MB ({r.get('peak_anon_mb', float('nan')):.0f} / {r.get('peak_file_mb', float('nan')):.0f}) | {r['process_s']:.0f} s | {r['process_s'] / r['num_images'] * 1e4:.1f} "
            f"| {r['extraction_s']:.0f} s | {r['phases_s'].get('stage1', 0):.0f} s | {r['phases_s'].get('stage2', 0):.0f} s "
            f"| {r['phases_s'].get('gallery', 0):.0f} s | {r['cache_bytes'] / 2**20:.0f} MB ({per_image:.0f} B) "
            f"| {r['accuracy']:.3f} ({r['probe']:.3f}) |"
        )
    if len(rows) >= 2:
        slope, intercept = np.polyfit(counts, seconds, 1)
        predicted = intercept + slope * counts
        worst = float(np.max(np.abs(predicted - seconds) / seconds))
        lines.append(f"\nFit: time = {intercept:.1f} s + {slope * 1e4:.2f} s per 10 k images (largest relative residual {worst:.1%}); "
                     f"peak RSS {min(r['peak_rss_mb'] for r in rows):.0f}–{max(r['peak_rss_mb'] for r in rows):.0f} MB, own memory "
                     f"{min(r.get('peak_anon_mb', 0) for r in rows):.0f}–{max(r.get('peak_anon_mb', 0) for r in rows):.0f} MB over "
                     f"N = {int(counts[0]):,}–{int(counts[-1]):,}.")
    return "\n".join(lines)


def concepts(args) -> None:
    import torch
    from transformers import AutoConfig

    from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification
    from protoquant_hf.concepts import FeatureCache, concept_score_store
    from protoquant_hf.data import generate_synthetic_stream
    from protoquant_hf.explain import build_gallery
    from protoquant_hf.image_processing_protoquant import ProtoQuantImageProcessor
    from protoquant_hf.training.loop import Objective, fit
    from protoquant_hf.training.objectives import model_objective
    from accelerate import Accelerator
    from transformers import BitImageProcessor

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    num_images, hidden = args.num_images, 1280
    features = np.abs(rng.standard_normal((num_images, hidden, 4, 4), dtype=np.float32)).astype(np.float16)  # ReLU-like
    labels = rng.integers(0, 10, num_images)
    cache = FeatureCache.from_arrays(features, labels, shard_size=4096)
    images = generate_synthetic_stream({"num_images": num_images, "num_test_images": 10}, streaming=False)["train"]
    processor = ProtoQuantImageProcessor.wrap(BitImageProcessor(size={"shortest_edge": 128}, crop_size={"height": 128, "width": 128}))
    backbone = AutoConfig.for_model("resnet", hidden_sizes=[8, hidden], depths=[1, 1], embedding_size=8)
    accelerator = Accelerator(cpu=True)
    rows = []
    for num_concepts in args.num_concepts:
        config = ProtoQuantConfig(backbone_config=backbone, num_concepts=num_concepts, id2label={i: str(i) for i in range(10)})
        torch.manual_seed(0)
        model = ProtoQuantForImageClassification(config)
        with torch.no_grad():
            model.codebook.concepts.copy_(torch.from_numpy(features[rng.integers(0, num_images, num_concepts), :, 0, 0].astype(np.float32)))
        model.set_trainable("head")
        with tempfile.TemporaryDirectory(prefix="bench_scale_scores_") as folder:
            start = time.perf_counter()
            scores = concept_score_store(model, cache, folder)
            table_s = time.perf_counter() - start
            start = time.perf_counter()
            fit(accelerator, Objective(model, model_objective("head", "concept_scores")), [{"params": [model.classifier.weight], "lr": 0.3}],
                scores, cache.labels, epochs=1, batch_size=256, seed=0, warmup_ratio=0.05, desc="stage2", show_progress=False)
            epoch_s = time.perf_counter() - start
            del scores
        start = time.perf_counter()
        build_gallery(model, images, processor, per_concept=5, features=cache, show_progress=False)
        gallery_s = time.perf_counter() - start
        rows.append({"num_concepts": num_concepts, "score_table_s": table_s, "head_epoch_s": epoch_s, "gallery_s": gallery_s})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"num_images": num_images, "threads": args.threads, "results": rows}, indent=1))
    base = rows[0]
    print(f"\n{num_images:,} images of 1280 × 4 × 4, {args.threads} thread(s)\n")
    print("| K | score table | head epoch on it | stage-2 epoch total (× K = first) | gallery pass (× K = first) |")
    print("|---|---|---|---|---|")
    for r in rows:
        stage2, first = r["score_table_s"] + r["head_epoch_s"], base["score_table_s"] + base["head_epoch_s"]
        print(f"| {r['num_concepts']} | {r['score_table_s']:.1f} s | {r['head_epoch_s']:.1f} s | {stage2:.1f} s ({stage2 / first:.1f} ×) "
              f"| {r['gallery_s']:.1f} s ({r['gallery_s'] / base['gallery_s']:.1f} ×) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    size_command = commands.add_parser("sizes", help="peak RSS and time against N on the synthetic stream")
    size_command.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    concept_command = commands.add_parser("concepts", help="stage-2 epoch and gallery pass against K")
    concept_command.add_argument("--num-concepts", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    concept_command.add_argument("--num-images", type=int, default=5000)
    table_command = commands.add_parser("table", help="render the table of a sizes --json file")
    for command in (size_command, concept_command, table_command):
        command.add_argument("--json", default=None, required=command is table_command)
        command.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.command == "sizes":
        sizes(args)
    elif args.command == "concepts":
        concepts(args)
    else:
        print(size_table(json.loads(Path(args.json).read_text())))


if __name__ == "__main__":
    main()
