"""Fast CPU inference for a frozen transformers EfficientNet (the bundled EfficientNet-Lite backbones).

ProtoQuant never trains its backbone, so feature extraction can use an inference-only copy. Eager transformers
EfficientNet-Lite0 on 2 CPU threads (batch 64, 128 px) is slow for reasons a frozen copy can remove:

1. **Memory, not arithmetic.** Every op writes a fresh activation of up to 100 MB (64 x 96 x 64 x 64 floats).
   Buffers that large are ``mmap``-ed and returned to the kernel on free, so one forward takes ~460k page faults
   (~1.8 GB zeroed by the kernel) and nothing stays in cache. Micro-batches of at most sixteen 128-px images reuse
   warm heap memory instead (no page faults, fewer cache misses): this alone is ~2.5x.
2. **An OpenMP barrier per op.** Each of the ~50 ops per forward splits across all threads and waits for the
   slowest; when another process holds a core, every op waits for the descheduled thread (eager drops from ~80 to
   ~14 img/s). Micro-batches therefore run on single-threaded workers, one per thread, which never wait for each
   other.
3. **Unfused elementwise passes.** Each conv is followed by a separate batch-norm, ReLU6, and for stride-2 convs a
   zero-pad (fill + copy) pass. Batch-norms are folded into the conv weights, ReLU6 runs in place, and the TF
   "same" zero-pads are folded into the conv (a symmetric pad becomes conv padding; the asymmetric (k//2 - 1, k//2)
   pad becomes a (k+1)-sized kernel with a zero first row/column and symmetric padding k//2, which reads exactly
   the same pixels).
4. **The squeeze-excite that Lite does not have.** The converted model multiplies by ``sigmoid(30) == 1.0``:
   a pooling, two 1x1 convs and a full-size multiply per block. Blocks whose gate is provably exactly 1.0 (expand
   weights all zero and ``sigmoid(expand.bias) == 1`` in the weights' dtype) become ``nn.Identity``.
5. **NCHW layout.** oneDNN reorders NCHW activations to its blocked layout around every conv; channels-last
   weights and inputs avoid the reorders.

Measured with ``benchmarks/bench_extraction.py`` this reaches ONNX Runtime's throughput. ``torch.compile``
(inductor, frozen weights) was tried on top: a few percent more, but it needs a C++ compiler and ~7 s of compiling
per input size, so it is not used. The result matches the original to ~1e-5 (equally valid float summation orders).
"""

from __future__ import annotations

import copy
import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from transformers import EfficientNetForImageClassification, EfficientNetModel
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention
from transformers.models.efficientnet.modeling_efficientnet import (
    EfficientNetDepthwiseLayer,
    EfficientNetEmbeddings,
    EfficientNetSqueezeExciteLayer,
)

# (conv attribute, batch-norm attribute) pairs in transformers' EfficientNet modules, conv applied first.
_CONV_BN_PAIRS = (
    ("convolution", "batchnorm"),
    ("expand_conv", "expand_bn"),
    ("depthwise_conv", "depthwise_norm"),
    ("project_conv", "project_bn"),
    ("top_conv", "top_bn"),
)
# Sixteen 128 x 128 images per micro-batch: the largest Lite0 activation (96 channels at stride 2) is then 25 MB,
# under glibc's 32 MB ceiling for reusing freed heap memory (larger buffers are mmap-ed afresh, page faults every
# time). Measured on 2 threads at 128 px: 4 or 8 images are slower (per-op overhead), 32 slower again.
DEFAULT_MICRO_BATCH_PIXELS = 16 * 128 * 128


def is_identity_squeeze_excite(layer: EfficientNetSqueezeExciteLayer) -> bool:
    """Whether a squeeze-excite layer multiplies every input by exactly 1.0.

    With all expand weights zero the gate is ``sigmoid(expand.bias)`` whatever the input, so checking that this is
    exactly 1.0 in the weights' own dtype proves the layer is an identity (for finite inputs).
    """
    expand = layer.expand
    if expand.bias is None or torch.any(expand.weight != 0):
        return False
    return bool(torch.all(torch.sigmoid(expand.bias) == 1.0))


def _fold_zero_pad(pad: nn.ZeroPad2d, conv: nn.Conv2d) -> nn.Conv2d | None:
    """A conv with no separate pad that computes ``conv(pad(x))`` exactly, or ``None`` for other pad shapes."""
    left, right, top, bottom = pad.padding
    if conv.padding not in ("valid", (0, 0)):
        return None
    if (left, top) == (right, bottom):
        weight, padding = conv.weight, (top, left)
    elif (left + 1, top + 1) == (right, bottom):
        # TF "same" for even inputs: one pixel more on the right/bottom. Growing the kernel by a zero first
        # row/column and padding both sides by the larger amount reads exactly the same pixels.
        weight, padding = nn.functional.pad(conv.weight, (1, 0, 1, 0)), (bottom, right)
    else:
        return None
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=tuple(weight.shape[-2:]),
        stride=conv.stride,
        padding=padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        folded.weight.copy_(weight)
        if conv.bias is not None:
            folded.bias.copy_(conv.bias)
    return folded


def _simplify_(model: EfficientNetModel) -> None:
    """In place: drop identity squeeze-excites, fold batch-norms and zero-pads into convs, ReLU6 in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, EfficientNetSqueezeExciteLayer) and is_identity_squeeze_excite(child):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.ReLU6):
                # Safe: every activation in EfficientNet is applied to a freshly computed conv output.
                setattr(module, name, nn.ReLU6(inplace=True))
        for conv_name, norm_name in _CONV_BN_PAIRS:
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(module, norm_name, nn.Identity())
        if isinstance(module, EfficientNetEmbeddings):
            pad_name, conv_name = "padding", "convolution"
        elif isinstance(module, EfficientNetDepthwiseLayer) and module.stride == 2:
            # Stride-1 depthwise layers own a pad module too but never call it (they use padding="same").
            pad_name, conv_name = "depthwise_conv_pad", "depthwise_conv"
        else:
            continue
        folded = _fold_zero_pad(getattr(module, pad_name), getattr(module, conv_name))
        if folded is not None:
            setattr(module, conv_name, folded)
            setattr(module, pad_name, nn.Identity())


class FrozenEfficientNet(nn.Module):
    """Inference-only EfficientNet that runs a simplified copy in cache-sized micro-batches.

    Call it like ``EfficientNetModel``: ``outputs = fast(pixel_values)`` gives ``last_hidden_state`` (B, C, h, w),
    ``pooler_output`` (B, C) and, with ``output_hidden_states=True``, the per-block maps. Outputs are ordinary
    (contiguous NCHW, no-grad) tensors, so they can feed a trainable head.

    On CPU with ``torch.get_num_threads() == n > 1`` the micro-batches run on n single-threaded workers instead of
    one n-threaded op at a time: no OpenMP barrier per op, so a core taken by another process delays one worker
    instead of stalling every op (measured with a competing process on 2 cores: 7 img/s with 2-thread ops vs
    170 img/s with two 1-thread workers).
    """

    def __init__(self, model: EfficientNetModel, micro_batch_pixels: int):
        super().__init__()
        self.model = model
        self.config = model.config
        self.micro_batch_pixels = micro_batch_pixels

    def _run(self, pixels: torch.Tensor, output_hidden_states: bool) -> tuple:
        with torch.no_grad():  # grad mode is per thread: set it in the worker
            pixels = pixels.contiguous(memory_format=torch.channels_last)
            return self.model(pixels, output_hidden_states=output_hidden_states, return_dict=False)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> BaseModelOutputWithPoolingAndNoAttention:
        threads = torch.get_num_threads()
        if pixel_values.device.type == "cpu":
            height, width = pixel_values.shape[-2:]
            per_worker = math.ceil(len(pixel_values) / threads)
            micro_batch = max(1, min(self.micro_batch_pixels // (height * width), per_worker))
        else:  # the page-fault and cache argument is CPU-only; accelerators want whole batches
            micro_batch = max(1, len(pixel_values))
        batches = pixel_values.split(micro_batch)
        run = functools.partial(self._run, output_hidden_states=output_hidden_states)
        if pixel_values.device.type == "cpu" and threads > 1 and len(batches) > 1:
            workers = min(threads, len(batches))
            try:
                with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                    outputs = list(pool.map(run, batches))
            finally:
                torch.set_num_threads(threads)  # a worker's set_num_threads(1) also changed the process default
        else:
            outputs = [run(pixels) for pixels in batches]
        # Each output is (last_hidden_state, pooler_output[, hidden_states]).
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(torch.cat(maps).contiguous() for maps in zip(*(out[2] for out in outputs)))
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=torch.cat([out[0] for out in outputs]).contiguous(),
            pooler_output=torch.cat([out[1] for out in outputs]),
            hidden_states=hidden_states,
        )


def optimize_frozen_backbone(
    model: EfficientNetModel | EfficientNetForImageClassification,
    micro_batch_pixels: int = DEFAULT_MICRO_BATCH_PIXELS,
) -> FrozenEfficientNet:
    """A faster inference-only copy of a frozen transformers EfficientNet (the original is left untouched).

    Args:
        model: An ``EfficientNetModel``, or an ``EfficientNetForImageClassification`` whose ``.efficientnet`` is used.
        micro_batch_pixels: Most pixels per micro-batch (images x height x width); the default is sixteen
            128-px images.

    Returns:
        A :class:`FrozenEfficientNet` whose outputs match ``model`` in eval mode to ~1e-5.
    """
    if isinstance(model, EfficientNetForImageClassification):
        model = model.efficientnet
    if not isinstance(model, EfficientNetModel):
        raise TypeError(f"Expected a transformers EfficientNetModel, got {type(model).__name__}.")
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    _simplify_(fast)
    fast = fast.to(memory_format=torch.channels_last)
    return FrozenEfficientNet(fast, micro_batch_pixels).eval()


__all__ = ["FrozenEfficientNet", "is_identity_squeeze_excite", "optimize_frozen_backbone"]
