"""Forward-time overhead of the ProtoQuant head over the backbone's own classifier.

Prints  ProtoQuant forward time / backbone classifier forward time  for the same backbone (the
EfficientNet-Lite0 architecture with random weights by default), both measured in one run,
interleaved, median of several repeats. Target: <= 1.05 on CPU at K = 2048, batch 32.

    python benchmarks/bench_forward.py --num-concepts 2048 --batch-size 32 --image-size 224
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import EfficientNetForImageClassification

from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification


def median_seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-concepts", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = ProtoQuantConfig(num_concepts=args.num_concepts, image_size=args.image_size, id2label={i: str(i) for i in range(10)})
    protoquant = ProtoQuantForImageClassification(config).eval()
    baseline = EfficientNetForImageClassification(config.backbone_config).eval()
    baseline.efficientnet.load_state_dict(protoquant.protoquant.backbone.state_dict())
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    with torch.inference_mode():
        features = protoquant.forward_features(pixels)
        protoquant(pixels), baseline(pixels), protoquant(feature_maps=features)  # warm-up
        pq_times, base_times, head_times = [], [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            pq_times += median_seconds(lambda: protoquant(pixels), 1)
            base_times += median_seconds(lambda: baseline(pixels), 1)
            head_times += median_seconds(lambda: protoquant(feature_maps=features), 1)
    pq, base, head = statistics.median(pq_times), statistics.median(base_times), statistics.median(head_times)
    # Each repeat's two forwards ran back to back: their ratio is robust to the machine's drift.
    paired = sorted(p / b for p, b in zip(pq_times, base_times))
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    print(f"threads={args.threads} K={args.num_concepts} batch={args.batch_size} size={args.image_size} repeats={args.repeats}")
    print(f"backbone classifier forward: {base * 1000:.1f} ms (median)")
    print(f"ProtoQuant forward:          {pq * 1000:.1f} ms (median)")
    print(f"concept head alone (cached features): {head * 1000:.1f} ms (median) = {head / base:.3f} of the classifier")
    print(f"ratio ProtoQuant / classifier: {pq / base:.3f} (ratio of medians)")
    print(f"paired ratio ProtoQuant / classifier: median {statistics.median(paired):.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})")

if __name__ == "__main__":
    main()
