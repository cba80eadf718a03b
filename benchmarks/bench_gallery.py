"""The codebook gallery: time of its pass per 1 000 images next to feature extraction of the same images, and its
storage size at K = 256 and K = 4096.

All in one run on the bundled EfficientNet-Lite0 (CPU, fast backbone copy) and Animal-MNIST training images:

  extraction   images → processor → frozen backbone → feature maps (what the feature cache stores)
  gallery      feature maps → ConceptStats top-n per concept → patches cut from the processed images → thumbnails
               (the pass the job runs on its feature cache)

Codebooks are random training feature vectors (`--concept_init samples`), so any K can be measured without
training; the gallery's cost and size do not depend on how the concepts were learned.

    python benchmarks/bench_gallery.py --num-images 1000 --image-size 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor

from protoquant_hf import ProtoQuantForImageClassification, ProtoQuantImageProcessor, load_image_dataset, resolve_backbone
from protoquant_hf.concepts import extract_features
from protoquant_hf.data import make_image_transform, with_image_size
from protoquant_hf.explain import build_gallery
from protoquant_hf.training import initialize_concepts


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--per-concept", type=int, default=5)
    parser.add_argument("--num-concepts", type=int, nargs="+", default=[256, 4096])
    args = parser.parse_args()

    data = load_image_dataset("animal-mnist", max_samples_per_split=args.num_images)["train"]
    names = data.features["label"].names
    source = resolve_backbone("protoquant/efficientnet-lite0")
    processor = ProtoQuantImageProcessor.wrap(with_image_size(AutoImageProcessor.from_pretrained(source), args.image_size))
    transform = make_image_transform(processor)
    print(f"{len(data)} Animal-MNIST images, {args.image_size} px, {args.per_concept} patches per concept, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for num_concepts in args.num_concepts:
            model = ProtoQuantForImageClassification.from_backbone(
                "protoquant/efficientnet-lite0", num_concepts=num_concepts, id2label=dict(enumerate(names)),
                image_size=args.image_size,
            ).eval()
            model.use_fast_backbone()
            start = time.perf_counter()
            cache = extract_features(model, data, processor, transform, split=f"bench-{num_concepts}", cache_dir=Path(tmp) / f"cache-{num_concepts}", show_progress=False)
            extraction = time.perf_counter() - start
            initialize_concepts(model, cache, "samples", seed=0)
            start = time.perf_counter()
            gallery, _ = build_gallery(model, data, processor, per_concept=args.per_concept, features=cache, show_progress=False)
            gallery_seconds = time.perf_counter() - start
            saved = gallery.save(Path(tmp) / f"model-{num_concepts}")
            size = folder_bytes(saved)
            per_1000 = 1000 / len(data)
            print(
                f"K = {num_concepts:5d}: extraction {extraction * per_1000:6.1f} s / 1000 images, gallery pass "
                f"{gallery_seconds * per_1000:6.1f} s / 1000 images ({gallery_seconds / extraction:.2f} x extraction), "
                f"stored gallery {size / 1e6:.2f} MB ({size / num_concepts / 1e3:.2f} kB per concept, "
                f"{np.mean([len(t) for t in gallery.thumbnails]):.1f} patches each)"
            )


if __name__ == "__main__":
    main()
