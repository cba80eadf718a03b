"""Images per second of ProtoQuant's three passes at ImageNet scale, for the multi-GPU recipe (issue 12).

A randomly initialised ConvNeXt-T-sized backbone (transformers' `ConvNextConfig()` defaults: depths 3/3/9/3, widths
96–768, 28 M parameters; throughput does not depend on the weights) at 224 px, 1000 classes, batch 128, for each K:

  extraction   backbone forward to the (B, 768, 7, 7) feature maps (the cache's input), bf16 autocast on GPU
  stage 1      one codebook training step on cached feature maps (quantize, frozen head, CE + MSE; Adam)
  stage 2      one head step on the concept-score table (B × K, frozen concepts: what the default recipe trains on)
  stage 2 maps one head + concept step on feature maps (fine-tuned / grounded concepts read the maps)

Each figure is the median of --repeats timed batches after --warmup untimed ones, synchronised on GPU. Prints a
markdown table and writes JSON. One short command on the device machine (≈ 2–4 minutes on one H200):

    python benchmarks/bench_gpu_throughput.py --json $OUT/gpu_throughput.json

On CPU it runs as a smoke test with small sizes: `--tiny`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import ConvNextConfig

from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification
from protoquant_hf.training.loop import Objective
from protoquant_hf.training.objectives import model_objective


def _timed(step, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one call of `step()`."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model(num_concepts: int, backbone: ConvNextConfig, num_labels: int, device) -> ProtoQuantForImageClassification:
    config = ProtoQuantConfig(
        backbone_config=backbone, num_concepts=num_concepts, id2label={i: f"class_{i}" for i in range(num_labels)}
    )
    torch.manual_seed(0)
    model = ProtoQuantForImageClassification(config)
    hidden = model.protoquant.hidden_size
    model.set_stage1_head(torch.nn.Linear(hidden, num_labels), norm=torch.nn.LayerNorm(hidden))  # ConvNeXt's head
    with torch.no_grad():
        model.codebook.concepts.normal_()
    return model.to(device)


def measure(num_concepts: int, args, backbone: ConvNextConfig, device: torch.device) -> dict:
    model = _model(num_concepts, backbone, args.num_labels, device)
    batch, size = args.batch_size, args.image_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    pixels = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, args.num_labels, (batch,), device=device)
    with torch.inference_mode(), autocast:
        maps = model.forward_features(pixels).float()
    maps = maps.clone()  # out of inference mode: a training input

    def extraction():
        with torch.inference_mode(), autocast:
            model.forward_features(pixels)

    def training_step(stage: str, input_name: str, inputs, parameters):
        model.set_trainable(stage, train_concepts=stage == "head" and input_name == "feature_maps")
        objective = Objective(model, model_objective(stage, input_name))
        optimizer = torch.optim.Adam(parameters, lr=1e-4)

        def step():
            with autocast:
                loss, _ = objective(inputs, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    with torch.no_grad():
        scores = model.codebook(maps)[0]
    results = {"num_concepts": num_concepts, "feature_map": list(maps.shape[1:])}
    passes = {
        "extraction": extraction,
        "stage1": training_step("codebook", "feature_maps", maps, [model.codebook.concepts]),
        "stage2_scores": training_step("head", "concept_scores", scores, [model.classifier.weight]),
        "stage2_maps": training_step("head", "feature_maps", maps, [model.classifier.weight, model.codebook.concepts]),
    }
    for name, step in passes.items():
        seconds = _timed(step, device, args.warmup, args.repeats)
        results[f"{name}_images_per_s"] = batch / seconds
    if device.type == "cuda":
        results["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-concepts", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-labels", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 everywhere (bf16 autocast by default)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: a 2-stage ConvNeXt, 32 px, batch 8, K 64/128")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = ConvNextConfig()
    if args.tiny:
        backbone = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
        args.num_concepts, args.batch_size, args.image_size, args.num_labels = [64, 128], 8, 32, 10
        args.warmup, args.repeats = 1, 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = [measure(k, args, backbone, device) for k in args.num_concepts]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, ConvNeXt {'tiny test' if args.tiny else 'T'} (random), {args.image_size} px, batch {args.batch_size}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; images/s (median of {args.repeats})\n")
    print("| K | feature map | extraction | stage 1 | stage 2 (score table) | stage 2 (feature maps, concepts trained) | peak GPU memory |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_concepts']} | {'×'.join(map(str, r['feature_map']))} | {r['extraction_images_per_s']:.0f} | "
              f"{r['stage1_images_per_s']:.0f} | {r['stage2_scores_images_per_s']:.0f} | {r['stage2_maps_images_per_s']:.0f} | "
              f"{'%.1f GB' % r['peak_gpu_memory_gb'] if 'peak_gpu_memory_gb' in r else '-'} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "arguments": vars(args), "results": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
