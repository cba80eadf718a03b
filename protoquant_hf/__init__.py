"""protoquant_hf: ProtoQuant interpretable image classifiers for the Hugging Face ecosystem.

`import protoquant_hf` registers the model and its image processor with transformers' Auto classes, so
``AutoModelForImageClassification.from_pretrained(folder_or_repo)``, ``AutoImageProcessor.from_pretrained(...)``
and ``pipeline("image-classification", model=folder_or_repo)`` work for ProtoQuant checkpoints.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .bundled_backbones import BUNDLED_BACKBONES, bundled_backbone_path
from .configuration_protoquant import SUPPORTED_BACKBONE_FAMILIES, ProtoQuantConfig
from .data import BUNDLED_DATASETS, load_image_dataset
from .image_processing_protoquant import ProtoQuantImageProcessor
from .pipeline_protoquant import ConceptExplanationPipeline, ProtoQuantImageClassificationPipeline, register_pipelines
from .modeling_protoquant import (
    ProtoQuantForImageClassification,
    ProtoQuantImageClassifierOutput,
    ProtoQuantModel,
    ProtoQuantModelOutput,
    ProtoQuantQuantizedOutput,
)
from .backbones import register_backbone_alias, resolve_backbone

__version__ = "0.1.0"

AutoConfig.register(ProtoQuantConfig.model_type, ProtoQuantConfig, exist_ok=True)
AutoModel.register(ProtoQuantConfig, ProtoQuantModel, exist_ok=True)
AutoModelForImageClassification.register(ProtoQuantConfig, ProtoQuantForImageClassification, exist_ok=True)
AutoImageProcessor.register(
    ProtoQuantConfig,
    image_processor_classes={"pil": ProtoQuantImageProcessor, "torchvision": ProtoQuantImageProcessor},
    exist_ok=True,
)
# save_pretrained / push_to_hub then export the config and modeling files as remote code.
ProtoQuantConfig.register_for_auto_class("AutoConfig")
ProtoQuantModel.register_for_auto_class("AutoModel")
ProtoQuantForImageClassification.register_for_auto_class("AutoModelForImageClassification")
ProtoQuantImageProcessor.register_for_auto_class("AutoImageProcessor")
# pipeline("image-classification") on a ProtoQuant folder converts images as training did, and
# pipeline("concept-explanation") explains its predictions.
register_pipelines()
# Bundled offline backbones are addressable by short name wherever a backbone name is accepted.
for _name in BUNDLED_BACKBONES:
    register_backbone_alias(_name, bundled_backbone_path)

__all__ = [
    "BUNDLED_BACKBONES",
    "ConceptExplanationPipeline",
    "BUNDLED_DATASETS",
    "SUPPORTED_BACKBONE_FAMILIES",
    "ProtoQuantConfig",
    "ProtoQuantForImageClassification",
    "ProtoQuantImageClassificationPipeline",
    "ProtoQuantImageClassifierOutput",
    "ProtoQuantImageProcessor",
    "ProtoQuantModel",
    "ProtoQuantModelOutput",
    "ProtoQuantQuantizedOutput",
    "load_image_dataset",
    "register_backbone_alias",
    "resolve_backbone",
]
