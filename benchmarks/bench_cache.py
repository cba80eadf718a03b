"""Stage-2 head-training time per epoch: reading the feature cache vs recomputing backbone features.

All three variants train the same head (W, L1 on ReLU(W)) for one epoch over the same images in one run:
  recompute  images → processor → frozen backbone → concept head → loss      (what training without a cache does;
             the backbone runs through the same optimised inference copy the job uses)
  cache      cached feature maps streamed from disk → concept head → loss    (fine-tuned concepts or mixup)
  scores     concept scores precomputed once from the cache → loss           (the default: frozen concepts)
Target: cache / recompute <= 1/50.

    python benchmarks/bench_cache.py --num-images 512 --image-size 128
"""

from __future__ import annotations

import argparse
import time

import torch

from protoquant_hf import ProtoQuantForImageClassification, load_image_dataset, resolve_backbone
from protoquant_hf.concepts import extract_features
from protoquant_hf.data import collate_fn, make_image_transform, with_image_size
from transformers import AutoImageProcessor


def train_epoch(model, batches, input_name: str) -> float:
    """One stage-2 epoch through the model's own forward and loss (training mode: CE + λ·ΣReLU(W))."""
    optimizer = torch.optim.Adam([model.classifier.weight], lr=0.1)
    model.train()
    start = time.perf_counter()
    for inputs, labels in batches():
        loss = model(**{input_name: inputs}, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="animal-mnist")
    parser.add_argument("--backbone", default="protoquant/efficientnet-lite0")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-concepts", type=int, default=256)
    args = parser.parse_args()

    dataset = load_image_dataset(args.dataset, max_samples_per_split=args.num_images)["train"]
    processor = with_image_size(AutoImageProcessor.from_pretrained(resolve_backbone(args.backbone)), args.image_size)
    transform = make_image_transform(processor)
    names = dataset.features["label"].names
    model = ProtoQuantForImageClassification.from_backbone(
        args.backbone, num_concepts=args.num_concepts, id2label=dict(enumerate(names)), image_size=args.image_size,
        head_l1_lambda=1e-4,
    )
    model.use_fast_backbone()  # the fastest exact backbone path, as the training job uses
    cache = extract_features(model, dataset, processor, transform, split="bench-train", batch_size=args.batch_size)

    pixels = dataset.with_transform(transform)
    loader = torch.utils.data.DataLoader(pixels, batch_size=args.batch_size, collate_fn=collate_fn)

    def recompute_batches():
        for batch in loader:
            yield batch["pixel_values"], batch["labels"]

    with torch.no_grad():
        scores = torch.cat([model(feature_maps=f).concept_scores for f, _ in cache.batches(args.batch_size)])
    labels = torch.from_numpy(cache.labels)

    def score_batches():
        for start in range(0, len(labels), args.batch_size):
            yield scores[start : start + args.batch_size], labels[start : start + args.batch_size]

    timings = {
        "recompute": train_epoch(model, recompute_batches, "pixel_values"),
        "cache": train_epoch(model, lambda: cache.batches(args.batch_size), "feature_maps"),
        "scores": train_epoch(model, score_batches, "concept_scores"),
    }
    print(f"{len(dataset)} images, {args.image_size} px, batch {args.batch_size}, K={args.num_concepts}, threads={torch.get_num_threads()}")
    for name, seconds in timings.items():
        print(f"  {name:<10} {seconds:8.2f} s per epoch")
    print(f"ratio cache / recompute:  1/{timings['recompute'] / timings['cache']:.0f}")
    print(f"ratio scores / recompute: 1/{timings['recompute'] / timings['scores']:.0f}")


if __name__ == "__main__":
    main()
