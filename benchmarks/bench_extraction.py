"""Feature-extraction throughput of a frozen backbone: eager vs `optimize_frozen_backbone` vs ONNX Runtime.

For EfficientNet backbones it also times `ProtoQuantForImageClassification.forward_features` after
`use_fast_backbone()`: the path the training job, the Trainer and pipelines take (the fast copy behind the
model's own input checks), which must be as fast as the copy alone.

Default: the bundled EfficientNet-Lite0 on CPU, 128 px, batch 64, 2 threads. Variants run round-robin (one batch
each per round) so that noise from other processes hits them alike; the median of the rounds is reported, with the
best round in brackets. ONNX needs the benchmark-only extras `pip install onnxruntime onnx onnxscript`.

    python benchmarks/bench_extraction.py                      # Lite0, CPU, 128 px, batch 64, 2 threads
    python benchmarks/bench_extraction.py --device cuda --backbone-config convnext-tiny --resolution 224 \
        --batch-size 128                                       # random ConvNeXt-T (or vit-base / a config.json)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, ConvNextConfig, EfficientNetModel, ViTConfig
from transformers.utils import logging

from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification
from protoquant_hf.bundled_backbones import bundled_backbone_path
from protoquant_hf.fast_backbone import optimize_frozen_backbone

PRESETS = {
    "convnext-tiny": lambda size: ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768]),
    "vit-base": lambda size: ViTConfig(image_size=size),  # ViT-B/16
}


def load_backbone(backbone_config: str | None, resolution: int) -> torch.nn.Module:
    if backbone_config is None:
        return EfficientNetModel.from_pretrained(bundled_backbone_path("protoquant/efficientnet-lite0"))
    if backbone_config in PRESETS:
        config = PRESETS[backbone_config](resolution)
    else:
        config = AutoConfig.from_pretrained(backbone_config)
    return AutoModel.from_config(config)  # random weights: throughput does not depend on them


def onnx_runner(model: torch.nn.Module, pixels: torch.Tensor, threads: int) -> Callable | None:
    """Export ``model``'s last_hidden_state to ONNX and return an ONNX Runtime CPU runner (None if unavailable)."""
    try:
        import onnxruntime
    except ImportError:
        print("onnx: skipped (pip install onnxruntime onnx onnxscript)")
        return None

    class LastHiddenState(torch.nn.Module):
        def __init__(self, backbone: torch.nn.Module):
            super().__init__()
            self.backbone = backbone

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.backbone(pixel_values).last_hidden_state

    path = Path(tempfile.mkdtemp()) / "backbone.onnx"
    torch.onnx.export(LastHiddenState(model).eval(), (pixels,), path, input_names=["pixel_values"], dynamo=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"pixel_values": x.numpy()})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and ONNX Runtime intra-op")
    parser.add_argument("--rounds", type=int, default=7, help="timed batches per variant (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (ONNX Runtime runs on CPU only)")
    parser.add_argument(
        "--backbone-config", help=f"random backbone: {' / '.join(PRESETS)} or a config.json path (default: Lite0)"
    )
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (or a CPU-only torch build)")

    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()  # loading the classification folder as a bare model reports the unused head
    model = load_backbone(args.backbone_config, args.resolution).eval().to(args.device)
    pixels = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=args.device)
    variants: dict[str, Callable] = {"eager": model}
    if isinstance(model, EfficientNetModel):
        variants["optimized"] = optimize_frozen_backbone(model)
        config = ProtoQuantConfig(backbone_config=model.config, image_size=args.resolution, id2label={0: "a", 1: "b"})
        protoquant = ProtoQuantForImageClassification(config).eval().to(args.device)
        protoquant.protoquant.backbone.load_state_dict(model.state_dict())
        protoquant.use_fast_backbone()
        variants["model.forward_features"] = protoquant.forward_features
    if args.device.startswith("cuda"):

        def autocast_bf16(x: torch.Tensor):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x)

        variants["eager bf16 autocast"] = autocast_bf16
    if args.device == "cpu" and not args.no_onnx:
        runner = onnx_runner(model, pixels, args.threads)
        if runner is not None:
            variants["onnxruntime"] = runner

    def timed(run: Callable) -> float:
        start = time.perf_counter()
        run(pixels)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for run in variants.values():  # warm-up (oneDNN primitives, allocator) outside the timing
            timed(run)
        for _ in range(args.rounds):
            for name, run in variants.items():
                seconds[name].append(timed(run))

    setting = f"{args.resolution} px, batch {args.batch_size}, {args.threads} threads"
    print(f"{type(model).__name__} on {args.device}, {setting}")
    throughput = {name: args.batch_size / statistics.median(times) for name, times in seconds.items()}
    for name, times in seconds.items():
        print(f"{name:>20}: {throughput[name]:8.1f} img/s  (best {args.batch_size / min(times):.1f})")
    if "optimized" in throughput and "onnxruntime" in throughput:
        print(f"optimized / onnxruntime: {throughput['optimized'] / throughput['onnxruntime']:.2f}")
    if "model.forward_features" in throughput:
        print(f"model.forward_features / optimized: {throughput['model.forward_features'] / throughput['optimized']:.2f}")
        if "onnxruntime" in throughput:
            print(f"model.forward_features / onnxruntime: {throughput['model.forward_features'] / throughput['onnxruntime']:.2f}")


if __name__ == "__main__":
    main()
