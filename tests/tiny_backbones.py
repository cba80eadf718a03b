"""Tiny random backbone configs, one per supported route, in the spirit of transformers' model testers."""

from transformers import AutoConfig, PreTrainedConfig

_TRANSFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)

# model_type -> (config kwargs, input size)
TINY_BACKBONES: dict[str, tuple[dict, int]] = {
    "resnet": (dict(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8), 32),
    "convnext": (dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), 32),
    "dinov2": (dict(_TRANSFORMER, image_size=28, patch_size=14), 28),
    "dinov2_with_registers": (dict(_TRANSFORMER, image_size=28, patch_size=14, num_register_tokens=2), 28),
    "vit": (dict(_TRANSFORMER, image_size=32, patch_size=8), 32),
    "deit": (dict(_TRANSFORMER, image_size=32, patch_size=8), 32),
    "clip_vision_model": (dict(_TRANSFORMER, image_size=32, patch_size=8), 32),
    "siglip_vision_model": (dict(_TRANSFORMER, image_size=32, patch_size=8), 32),
    "efficientnet": (dict(width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, image_size=64), 64),
    "mobilenet_v2": (dict(depth_multiplier=0.1, image_size=32), 32),
}


def tiny_backbone_config(model_type: str) -> tuple[PreTrainedConfig, int]:
    kwargs, size = TINY_BACKBONES[model_type]
    return AutoConfig.for_model(model_type, **kwargs), size
