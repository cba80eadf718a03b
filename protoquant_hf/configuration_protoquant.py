"""ProtoQuant model configuration.

Self-contained (torch + transformers only) so that a saved model folder carries it as Hub remote
code. The method it configures is described in ProtoQuant (Janusz et al., arXiv 2602.06592).
"""

from __future__ import annotations

import sys

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

# How each supported backbone family yields its spatial feature map (see `backbone_kind`).
# AutoBackbone families return NCHW `feature_maps`; `timm_backbone` needs timm, which we do not use.
AUTOBACKBONE_FAMILIES = tuple(sorted(set(MODEL_FOR_BACKBONE_MAPPING_NAMES) - {"timm_backbone"}))
# Token models outside AutoBackbone: prefix tokens (CLS, distillation, registers) are dropped and the
# patch tokens reshaped to a grid.
TOKEN_FAMILIES = ("vit", "deit", "clip_vision_model", "siglip_vision_model")
# Convnets reachable only through `AutoModel`, whose `last_hidden_state` is already NCHW.
CONVNET_FAMILIES = ("efficientnet", "mobilenet_v1", "mobilenet_v2", "regnet")
SUPPORTED_BACKBONE_FAMILIES = AUTOBACKBONE_FAMILIES + TOKEN_FAMILIES + CONVNET_FAMILIES
# How the concepts were learned (`ProtoQuantConfig.concept_training`): ProtoQuant, or the non-quantized baseline.
CONCEPT_TRAINING = ("quantized", "free")

# The bundled default backbone: EfficientNet-Lite0's architecture expressed as a transformers
# EfficientNet config (Lite: ReLU6, no squeeze-excite, fixed 32/1280 stem/head widths).
EFFICIENTNET_LITE0_KWARGS = {
    "width_coefficient": 1.0,
    "depth_coefficient": 1.0,
    "image_size": 224,
    "hidden_dim": 1280,
    "hidden_act": "relu6",
    "squeeze_expansion_ratio": 0.0,
    "dropout_rate": 0.2,
}


def backbone_kind(model_type: str) -> str:
    """Return ``"autobackbone"``, ``"tokens"`` or ``"convnet"`` for a backbone ``model_type``.

    Raises:
        ValueError: the family is not supported; the message lists every supported family.
    """
    if model_type in TOKEN_FAMILIES:
        return "tokens"
    if model_type in CONVNET_FAMILIES:
        return "convnet"
    if model_type in AUTOBACKBONE_FAMILIES:
        return "autobackbone"
    raise ValueError(
        f"Backbone family {model_type!r} is not supported by ProtoQuant. Supported families: "
        f"{', '.join(SUPPORTED_BACKBONE_FAMILIES)}. Vision-language checkpoints (clip, siglip) are "
        "supported through their vision tower (`from_backbone` selects it automatically)."
    )


@strict
class ProtoQuantConfig(PreTrainedConfig):
    r"""Configuration of a ProtoQuant image classifier: a frozen vision backbone, a codebook of
    `num_concepts` concept vectors in the backbone's feature space, and a non-negative
    concept-to-class matrix.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the frozen vision backbone, any supported family (see
            `SUPPORTED_BACKBONE_FAMILIES`). Defaults to EfficientNet-Lite0's architecture.
        backbone_feature_layer (`int`, *optional*, defaults to -1):
            Which backbone feature to use: a stage index for AutoBackbone families, a hidden-state
            index for token models (-1 = the final, normalised tokens); convnets support -1 only.
        num_concepts (`int`, *optional*, defaults to 256):
            K, the number of concept vectors in the codebook.
        temperature (`float`, *optional*, defaults to 0.1):
            τ of the softmax over concepts at each location (method §3.5).
        cosine_eps (`float`, *optional*, defaults to 1e-6):
            ε added to both norms of the cosine similarity (method §3.4).
        image_size (`int`, *optional*, defaults to 224):
            Resolution the model is trained and served at (the saved image processor uses it).
        stage1_head_num_labels (`int`, *optional*, defaults to 0):
            Output size of the frozen original classifier head used by stage-1 codebook training:
            the backbone checkpoint's own head, or a linear probe fitted on pooled features. 0 = no
            head stored.
        stage1_head_norm (`bool`, *optional*, defaults to `False`):
            Whether that head applies a LayerNorm after pooling (ConvNeXt-style heads).
        codebook_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight w of the stage-1 MSE codebook term, L = CE + w·MSE(code, stop_grad(feature)): the
            loss of `forward(..., stage="codebook", labels=...)`.
        head_l1_lambda (`float`, *optional*, defaults to 1e-4):
            λ of the stage-2 sparsity term: in training mode, `forward(..., labels=...)` returns
            CE + λ·ΣReLU(W), so the stock `transformers.Trainer` trains the head with the stage-2
            objective. Evaluation losses are the plain CE.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of the stage-1 head.
        backbone_name (`str`, *optional*):
            Provenance: the Hub id or alias the backbone was loaded from (`from_backbone` sets it).
        concept_training (`str`, *optional*, defaults to `"quantized"`):
            Provenance: how the concepts were learned. `"quantized"`: ProtoQuant (k-means on training features,
            then VQ-style through the backbone's frozen head). `"free"`: the non-quantized baseline (free
            prototype vectors from a random start, trained jointly with W), kept for side-by-side comparison.
        edit_log (`list[dict]`, *optional*):
            The edits applied to the trained model (pruning, disabled concepts, changed weights), oldest first:
            what, when, why, K and accuracy before/after (`protoquant_hf.concepts.edit_model` appends to it).

    Example:

    ```python
    >>> from transformers import AutoConfig
    >>> from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification
    >>> backbone = AutoConfig.for_model("resnet", hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8)
    >>> config = ProtoQuantConfig(backbone_config=backbone, num_concepts=32, id2label={0: "cat", 1: "dog"})
    >>> model = ProtoQuantForImageClassification(config)
    ```
    """

    model_type = "protoquant"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig, model_type="efficientnet", init_kwargs=EFFICIENTNET_LITE0_KWARGS
        )
    }
    # The Trainer's evaluation loop must see only the logits (hf-integration.md §7.1): every other
    # output field either model can return.
    keys_to_ignore_at_inference = [
        "concept_scores",
        "activation_maps",
        "similarity_maps",
        "feature_maps",
        "concept_contributions",
        "sparsity_loss",
        "codebook_loss",
        "concept_indices",
        "hidden_states",
        "attentions",
    ]
    # Backbone config keys that say where the backbone came from or what its own classifier
    # predicted: a local cache path and (for ImageNet backbones) 1 000 label names, meaningless for
    # this model. `backbone_name` keeps the provenance.
    _BACKBONE_KEYS_NOT_SAVED = ("_name_or_path", "id2label", "label2id")

    backbone_config: dict | PreTrainedConfig | None = None
    backbone_feature_layer: int = -1
    num_concepts: int = 256
    temperature: float = 0.1
    cosine_eps: float = 1e-6
    image_size: int = 224
    stage1_head_num_labels: int = 0
    stage1_head_norm: bool = False
    codebook_loss_weight: float = 1.0
    head_l1_lambda: float = 1e-4
    initializer_range: float = 0.02
    backbone_name: str | None = None
    concept_training: str = "quantized"
    edit_log: list | None = None

    def __post_init__(self, **kwargs):
        # Saved for the Hub (`to_dict`), dropped when loading: transformers' pipeline() insists on
        # trust_remote_code for any task listed there, even when this package (or the folder's remote config,
        # on import) has registered the task already.
        kwargs.pop("custom_pipelines", None)
        super().__post_init__(**kwargs)
        kind = backbone_kind(self.backbone_config.model_type)
        if kind == "autobackbone":
            # A single feature map: the configured stage.
            self.backbone_config.out_indices = [self.backbone_feature_layer]
            if hasattr(self.backbone_config, "reshape_hidden_states"):
                self.backbone_config.reshape_hidden_states = True
        elif kind == "convnet" and self.backbone_feature_layer != -1:
            raise ValueError(
                f"backbone_feature_layer={self.backbone_feature_layer} is not supported for "
                f"{self.backbone_config.model_type!r} backbones: convnets reached through AutoModel "
                "expose their last feature map only (use -1)."
            )

    def validate_concepts(self):
        if self.num_concepts < 1:
            raise ValueError(f"num_concepts must be >= 1, got {self.num_concepts}.")
        if not 0 < self.temperature < float("inf"):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}.")
        if not self.cosine_eps > 0:
            raise ValueError(f"cosine_eps must be > 0, got {self.cosine_eps}.")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}.")
        if self.stage1_head_num_labels < 0:
            raise ValueError(f"stage1_head_num_labels must be >= 0, got {self.stage1_head_num_labels}.")
        if not 0 <= self.codebook_loss_weight < float("inf"):
            raise ValueError(f"codebook_loss_weight must be finite and >= 0, got {self.codebook_loss_weight}.")
        if self.concept_training not in CONCEPT_TRAINING:
            raise ValueError(f"concept_training must be one of {CONCEPT_TRAINING}, got {self.concept_training!r}.")
        if not 0 <= self.head_l1_lambda < float("inf"):
            raise ValueError(f"head_l1_lambda must be finite and >= 0, got {self.head_l1_lambda}.")

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["custom_pipelines"] = {
            "concept-explanation": {
                "impl": "pipeline_protoquant.ConceptExplanationPipeline",
                "pt": ["AutoModelForImageClassification"],
                "tf": [],
                "type": "image",
            }
        }
        backbone = output.get("backbone_config")
        if isinstance(backbone, dict):
            for key in self._BACKBONE_KEYS_NOT_SAVED:
                backbone.pop(key, None)
        return output


# Serve ProtoQuant folders with the image-classification pipeline that converts images as training did (it is
# the stock pipeline for every other model) and register "concept-explanation". Done at config import, because
# pipeline() loads the config before it picks the task's implementation (so this works for remote code too);
# only when pipelines are in use, to keep plain model loading light.
if "transformers.pipelines" in sys.modules:
    from .pipeline_protoquant import register_pipelines

    register_pipelines()

__all__ = ["ProtoQuantConfig", "SUPPORTED_BACKBONE_FAMILIES", "backbone_kind"]
