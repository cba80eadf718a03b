"""One head-training step with trainable concepts (`--train_concepts`, grounded fine-tuning): the model's codebook
forward and backward on a batch of cached fp16 feature maps, as stage 2 and the top-k retraining run it.

Side by side in one process, interleaved, median of several repeats:

  normalise-first   the cosine as written before: normalise the (B, HW, D) feature vectors, then one product
  library           `modeling_protoquant.cosine_similarity` as it is now
  each also under bf16 autocast (`--mixed_precision bf16`)

and the largest difference of the library's cosines from the normalise-first ones.

    python benchmarks/bench_concept_step.py --map-size 4 7 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from protoquant_hf import ProtoQuantConfig, modeling_protoquant
from protoquant_hf.modeling_protoquant import ProtoQuantCodebook

LIBRARY_COSINE = modeling_protoquant.cosine_similarity


def normalise_first_cosine(features: torch.Tensor, concepts: torch.Tensor, eps: float) -> torch.Tensor:
    vectors = features.float().flatten(2).transpose(1, 2)
    vectors = vectors / (vectors.norm(dim=2, keepdim=True) + eps)
    concepts = concepts.float()
    concepts = concepts / (concepts.norm(dim=1, keepdim=True) + eps)
    return vectors @ concepts.t()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--map-size", type=int, nargs="+", default=[4, 7], help="feature-map side (4: 128 px, 7: 224 px on Lite0)")
    parser.add_argument("--hidden-size", type=int, default=1280)
    parser.add_argument("--num-concepts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ProtoQuantConfig(num_concepts=args.num_concepts, num_labels=10)
    codebook = ProtoQuantCodebook(config, args.hidden_size)
    codebook.concepts.data.normal_()
    codebook.concepts.requires_grad_(True)
    weight = torch.nn.Parameter(torch.rand(10, args.num_concepts))
    labels = torch.randint(0, 10, (args.batch_size,))

    print(f"batch {args.batch_size}, D {args.hidden_size}, K {args.num_concepts}, {args.threads} threads; ms per step (median of {args.repeats})")
    for side in args.map_size:
        features = (torch.randn(args.batch_size, args.hidden_size, side, side) * 3).relu().half()  # a cache batch

        def step(cosine, bf16: bool) -> None:
            modeling_protoquant.cosine_similarity = cosine
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                scores, _, _ = codebook(features)
                logits = scores.float() @ weight.relu().t()
                torch.nn.functional.cross_entropy(logits, labels).backward()
            modeling_protoquant.cosine_similarity = LIBRARY_COSINE

        variants = {
            ("normalise-first", False): lambda: step(normalise_first_cosine, False),
            ("library", False): lambda: step(LIBRARY_COSINE, False),
            ("normalise-first", True): lambda: step(normalise_first_cosine, True),
            ("library", True): lambda: step(LIBRARY_COSINE, True),
        }
        times = {name: [] for name in variants}
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        reference = statistics.median(times[("normalise-first", False)])
        with torch.no_grad():
            difference = (LIBRARY_COSINE(features, codebook.concepts, config.cosine_eps)
                          - normalise_first_cosine(features, codebook.concepts, config.cosine_eps)).abs().max()
        print(f"\n{side}x{side} map (largest cosine difference {float(difference):.1e})")
        for (name, bf16), values in times.items():
            median = statistics.median(values)
            print(f"  {name:16s} {'bf16' if bf16 else 'fp32'}  {median * 1000:7.1f} ms   {reference / median:4.2f} x")


if __name__ == "__main__":
    main()
