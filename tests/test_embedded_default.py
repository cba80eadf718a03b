"""The embedded default works offline end to end: bundled backbone by short name, bundled data."""

import torch
from skimage import data as skimage_data
from transformers import AutoImageProcessor

from protoquant_hf import ProtoQuantForImageClassification, resolve_backbone
from protoquant_hf.data import with_image_size


def test_from_backbone_short_name_keeps_imagenet_head():
    model = ProtoQuantForImageClassification.from_backbone(
        "protoquant/efficientnet-lite0", num_concepts=16, id2label={0: "a", 1: "b"}, image_size=160
    ).eval()
    assert model.config.backbone_name == "protoquant/efficientnet-lite0"
    assert model.config.stage1_head_num_labels == 1000  # the checkpoint's own ImageNet classifier
    processor = with_image_size(AutoImageProcessor.from_pretrained(resolve_backbone("protoquant/efficientnet-lite0")), 160)
    pixels = processor(images=[skimage_data.coffee()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.forward_features(pixels)
        logits = model.original_head(features)
        out = model(pixels, output_activation_maps=True)
    assert features.shape == (1, 1280, 5, 5)
    assert int(logits.argmax()) == 967  # espresso, through the kept head on ProtoQuant's own feature map
    assert out.activation_maps.shape == (1, 16, 5, 5)
