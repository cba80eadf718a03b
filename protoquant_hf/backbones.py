"""Building a ProtoQuant model around a pretrained backbone: `from_backbone`, backbone aliases, quiet loading.

Loading machinery that only training needs lives here, not in `modeling_protoquant.py`, so the modeling file that
ships with every model as Hub remote code holds the method and nothing a reader never runs.
`ProtoQuantForImageClassification.from_backbone` is this module's `from_backbone`, attached on import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING, MODEL_MAPPING
from transformers.utils import logging as hf_logging

from .configuration_protoquant import ProtoQuantConfig
from .modeling_protoquant import _NO_POOLER_FAMILIES, ProtoQuantForImageClassification

# Short names (e.g. a bundled offline backbone) → a function returning a loadable name or folder.
_BACKBONE_ALIASES: dict[str, Callable[[str], str]] = {}
# Families whose checkpoint head normalises the pooled features before the classifier.
_POOLED_NORM_FAMILIES = ("convnext", "convnextv2")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings (e.g. load reports) and progress bars ("Loading weights", "Writing model
    shards") off around internal loads and saves; errors still raise."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def register_backbone_alias(name: str, resolver: Callable[[str], str]) -> None:
    """Make `name` usable wherever a backbone name is accepted; `resolver(name)` returns a Hub id
    or a local folder (it may build that folder on first use)."""
    _BACKBONE_ALIASES[name] = resolver


def resolve_backbone(name_or_path: str) -> str:
    """Return the Hub id or local folder behind a backbone name (aliases resolved, others as is)."""
    resolver = _BACKBONE_ALIASES.get(str(name_or_path))
    return resolver(str(name_or_path)) if resolver is not None else str(name_or_path)


def from_backbone(
    cls,
    backbone_name_or_path: str,
    *,
    num_concepts: int | None = None,
    id2label: dict[int, str] | None = None,
    label2id: dict[str, int] | None = None,
    image_size: int | None = None,
    backbone_feature_layer: int = -1,
    keep_checkpoint_head: bool = True,
    dtype: torch.dtype = torch.float32,
    **config_kwargs,
) -> "ProtoQuantForImageClassification":
    """Build a ProtoQuant classifier around a pretrained vision backbone.

    Args:
        backbone_name_or_path: a Hub id, a local folder, or a registered alias such as the
            bundled offline ``"protoquant/efficientnet-lite0"``.
        num_concepts: K, the codebook size (default: `ProtoQuantConfig`'s).
        id2label / label2id: the target classes.
        image_size: training/serving resolution; defaults to the backbone's native size.
        backbone_feature_layer: which backbone feature map to use (see `ProtoQuantConfig`).
        keep_checkpoint_head: keep the checkpoint's own classifier (pooler + linear) as the
            frozen stage-1 head when it has one that reads the chosen feature map.
        dtype: the dtype to load the backbone in (float32 by default, for CPU training).
        config_kwargs: any other `ProtoQuantConfig` field.

    Returns:
        The model, with pretrained backbone weights and randomly initialised concepts.
    """
    source = resolve_backbone(backbone_name_or_path)
    backbone_config = AutoConfig.from_pretrained(source)
    if hasattr(backbone_config, "vision_config"):  # CLIP / SigLIP: the vision tower
        backbone_config = backbone_config.vision_config
    if image_size is None:
        native = getattr(backbone_config, "image_size", 224)
        image_size = native[0] if isinstance(native, (list, tuple)) else native
    if num_concepts is not None:
        config_kwargs["num_concepts"] = num_concepts
    config = ProtoQuantConfig(
        backbone_config=backbone_config,
        backbone_feature_layer=backbone_feature_layer,
        id2label=id2label,
        label2id=label2id,
        image_size=image_size,
        backbone_name=str(backbone_name_or_path),
        **config_kwargs,
    )
    model = cls(config)
    backbone = model.protoquant.backbone
    if model.protoquant.backbone_kind == "autobackbone":
        loader = MODEL_FOR_BACKBONE_MAPPING[type(config.backbone_config)]
    else:
        loader = MODEL_MAPPING[type(config.backbone_config)]
    extra = {"add_pooling_layer": False} if config.backbone_config.model_type in _NO_POOLER_FAMILIES else {}
    with quiet_transformers():  # a classification checkpoint's head is "unexpected" here by design
        pretrained = loader.from_pretrained(source, config=config.backbone_config, dtype=dtype, **extra)
    backbone.load_state_dict(pretrained.state_dict())
    if keep_checkpoint_head:
        _keep_checkpoint_head(model, source, backbone_config, dtype)
    return model.to(dtype).set_trainable("head")

def _keep_checkpoint_head(model, source: str, backbone_config, dtype: torch.dtype) -> None:
    architectures = getattr(backbone_config, "architectures", None) or []
    if not any(name.endswith("ForImageClassification") for name in architectures):
        return
    with quiet_transformers():
        checkpoint = AutoModelForImageClassification.from_pretrained(source, dtype=dtype)
    linears = [m for m in checkpoint.classifier.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].in_features != model.protoquant.hidden_size:
        return  # e.g. heads on CLS+patch concatenations: stage 1 fits a probe instead
    norm = None
    if backbone_config.model_type in _POOLED_NORM_FAMILIES:
        norm = getattr(checkpoint, checkpoint.base_model_prefix).layernorm
    model.set_stage1_head(linears[-1], norm)


# `ProtoQuantForImageClassification.from_backbone(...)`, as before the move.
ProtoQuantForImageClassification.from_backbone = classmethod(from_backbone)

__all__ = ["from_backbone", "quiet_transformers", "register_backbone_alias", "resolve_backbone"]
