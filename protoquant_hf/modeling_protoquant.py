"""ProtoQuant: an interpretable concept head on a frozen Hugging Face vision backbone.

The whole method lives in this file (Janusz et al., "ProtoQuant", arXiv 2602.06592; section numbers
below refer to the project's method spec):

    image ──backbone (frozen)──▶ feature map z (B, D, H, W)
          ──cosine to K concepts──▶ similarity maps m (B, K, H, W)            §3.4
          ──softmax over concepts / τ──▶ activation maps p (B, K, H, W)       §3.5
          ──spatial max──▶ concept scores s (B, K)                            §3.6
          ──s · ReLU(W)ᵀ──▶ logits (B, C)                                     §3.7

Stage-1 codebook training instead replaces every feature vector by its nearest concept and feeds
the result to the backbone's own frozen classifier head (§3.8); `forward_quantized` implements it.

The file is self-contained (torch + transformers + the sibling configuration module) so that a
saved folder loads as Hub remote code with ``trust_remote_code=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, PreTrainedModel
from transformers import initialization as init
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING, MODEL_MAPPING
from transformers.utils import ModelOutput

from .configuration_protoquant import ProtoQuantConfig, backbone_kind

# Short names (e.g. a bundled offline backbone) → a function returning a loadable name or folder.
_BACKBONE_ALIASES: dict[str, Callable[[str], str]] = {}

# Families whose checkpoint head normalises the pooled features before the classifier.
_POOLED_NORM_FAMILIES = ("convnext", "convnextv2")
# Families that build a pooler we never use unless told not to.
_NO_POOLER_FAMILIES = ("vit", "deit")


def register_backbone_alias(name: str, resolver: Callable[[str], str]) -> None:
    """Make `name` usable wherever a backbone name is accepted; `resolver(name)` returns a Hub id
    or a local folder (it may build that folder on first use)."""
    _BACKBONE_ALIASES[name] = resolver


def resolve_backbone(name_or_path: str) -> str:
    """Return the Hub id or local folder behind a backbone name (aliases resolved, others as is)."""
    resolver = _BACKBONE_ALIASES.get(str(name_or_path))
    return resolver(str(name_or_path)) if resolver is not None else str(name_or_path)


@dataclass
class ProtoQuantModelOutput(ModelOutput):
    """Concept detection for a batch of images.

    Args:
        concept_scores (`torch.FloatTensor` of shape `(batch_size, num_concepts)`):
            Presence score s_k of every concept: the spatial max of its activation map, in (0, 1).
        activation_maps (`torch.FloatTensor` of shape `(batch_size, num_concepts, height, width)`, *optional*):
            p, the softmax over concepts (temperature τ) at each feature-map location; each location
            sums to 1 over concepts. Returned when `output_activation_maps=True`.
        similarity_maps (`torch.FloatTensor` of shape `(batch_size, num_concepts, height, width)`, *optional*):
            m, the raw cosine similarity of every location to every concept, in [-1, 1]. Returned
            when `output_similarity_maps=True`.
        feature_maps (`torch.FloatTensor` of shape `(batch_size, hidden_size, height, width)`, *optional*):
            The frozen backbone's feature map z. Returned when `output_feature_maps=True`.
    """

    concept_scores: torch.FloatTensor | None = None
    activation_maps: torch.FloatTensor | None = None
    similarity_maps: torch.FloatTensor | None = None
    feature_maps: torch.FloatTensor | None = None


@dataclass
class ProtoQuantImageClassifierOutput(ModelOutput):
    """Output of [`ProtoQuantForImageClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
            Cross-entropy of the logits.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            s · ReLU(W)ᵀ, non-negative evidence per class.
        concept_scores (`torch.FloatTensor` of shape `(batch_size, num_concepts)`):
            Presence score of every concept (see [`ProtoQuantModelOutput`]).
        activation_maps (`torch.FloatTensor` of shape `(batch_size, num_concepts, height, width)`, *optional*):
            Softmax-over-concepts maps p; only with `output_activation_maps=True`.
        similarity_maps (`torch.FloatTensor` of shape `(batch_size, num_concepts, height, width)`, *optional*):
            Raw cosine maps m; only with `output_similarity_maps=True`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    concept_scores: torch.FloatTensor | None = None
    activation_maps: torch.FloatTensor | None = None
    similarity_maps: torch.FloatTensor | None = None


@dataclass
class ProtoQuantQuantizedOutput(ModelOutput):
    """Stage-1 forward: features replaced by their nearest concepts, through the frozen original head.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
            CE(logits, labels) + codebook_loss_weight · codebook_loss.
        logits (`torch.FloatTensor` of shape `(batch_size, stage1_head_num_labels)`):
            The original head's logits on the quantized feature map.
        codebook_loss (`torch.FloatTensor` of shape `()`):
            MSE(selected concept vectors, stop_grad(features)), the VQ-VAE codebook term (§3.8).
        concept_indices (`torch.LongTensor` of shape `(batch_size, height, width)`):
            Index of the nearest concept (by cosine) at every location.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    concept_indices: torch.LongTensor | None = None


def cosine_similarity_maps(features: torch.Tensor, concepts: torch.Tensor, eps: float) -> torch.Tensor:
    """m_k(z) = ⟨z, c_k⟩ / ((‖z‖ + ε)(‖c_k‖ + ε)) at every location (§3.4).

    Args:
        features: `(batch_size, hidden_size, height, width)`.
        concepts: `(num_concepts, hidden_size)`.

    Returns:
        `(batch_size, num_concepts, height, width)`, computed in float32.
    """
    batch_size, hidden_size, height, width = features.shape
    vectors = features.float().flatten(2)  # (B, D, HW)
    vectors = vectors / (vectors.norm(dim=1, keepdim=True) + eps)
    concepts = concepts.float()
    concepts = concepts / (concepts.norm(dim=1, keepdim=True) + eps)
    similarity = torch.matmul(concepts, vectors)  # (K, D) @ (B, D, HW) -> (B, K, HW)
    return similarity.view(batch_size, -1, height, width)


class ProtoQuantCodebook(nn.Module):
    """The K concept vectors, living in the backbone's own feature space (no projection, §3.2)."""

    def __init__(self, config: ProtoQuantConfig, hidden_size: int):
        super().__init__()
        self.temperature = config.temperature
        self.eps = config.cosine_eps
        # Frozen unless training asks otherwise: fine-tuning concepts in stage 2 destroys their
        # grounding in real training features (method §13).
        self.concepts = nn.Parameter(torch.empty(config.num_concepts, hidden_size), requires_grad=False)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (concept_scores `(B, K)`, activation_maps `(B, K, H, W)`, similarity_maps `(B, K, H, W)`)."""
        similarity = cosine_similarity_maps(features, self.concepts, self.eps)
        activations = torch.softmax(similarity / self.temperature, dim=1)  # over concepts, §3.5
        scores = activations.amax(dim=(2, 3))  # spatial max, §3.6
        return scores, activations, similarity

    @torch.no_grad()
    def nearest(self, features: torch.Tensor) -> torch.LongTensor:
        """Index `(B, H, W)` of the most cosine-similar concept at every location (no gradient, §3.8)."""
        return cosine_similarity_maps(features, self.concepts, self.eps).argmax(dim=1)


class ProtoQuantConceptClassifier(nn.Module):
    """logits = s · ReLU(W)ᵀ, no bias (§3.7). ReLU on the fly keeps the stored weight a plain
    parameter, so any optimiser or training loop preserves non-negativity."""

    def __init__(self, config: ProtoQuantConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_labels, config.num_concepts))

    def forward(self, concept_scores: torch.Tensor) -> torch.Tensor:
        return concept_scores @ F.relu(self.weight).t()


class ProtoQuantOriginalHead(nn.Module):
    """The frozen head stage 1 trains the codebook through: global average pooling → optional
    LayerNorm → linear. It is the backbone checkpoint's own classifier when that fits the data, or
    a linear probe fitted on pooled frozen features."""

    def __init__(self, config: ProtoQuantConfig, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size) if config.stage1_head_norm else nn.Identity()
        self.classifier = nn.Linear(hidden_size, config.stage1_head_num_labels)
        self.requires_grad_(False)

    def forward(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(feature_maps.mean(dim=(2, 3))))


class ProtoQuantPreTrainedModel(PreTrainedModel):
    config: ProtoQuantConfig
    config_class = ProtoQuantConfig
    base_model_prefix = "protoquant"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # forward takes no **kwargs, and the Trainer must not rescale our loss (hf-integration.md §7.1).
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ProtoQuantCodebook):
            init.orthogonal_(module.concepts)
        elif isinstance(module, ProtoQuantConceptClassifier):
            init.normal_(module.weight, mean=1.0, std=0.1)  # N(1, 0.1), §3.7

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path} do not match its config.json (the load "
                "report above lists the tensors): num_concepts, the labels or the backbone were changed "
                "after saving. Load an unmodified folder, or pass ignore_mismatched_sizes=True to "
                "re-initialise the mismatched tensors."
            ) from None


class ProtoQuantModel(ProtoQuantPreTrainedModel):
    """Frozen backbone + codebook: images → concept scores (and maps on request)."""

    def __init__(self, config: ProtoQuantConfig):
        super().__init__(config)
        backbone_config = config.backbone_config
        self.backbone_kind = backbone_kind(backbone_config.model_type)
        if self.backbone_kind == "autobackbone":
            self.backbone = MODEL_FOR_BACKBONE_MAPPING[type(backbone_config)](backbone_config)
        else:
            extra = {"add_pooling_layer": False} if backbone_config.model_type in _NO_POOLER_FAMILIES else {}
            self.backbone = AutoModel.from_config(backbone_config, **extra)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.hidden_size = self._backbone_hidden_size()
        self.codebook = ProtoQuantCodebook(config, self.hidden_size)
        self.post_init()

    def _backbone_hidden_size(self) -> int:
        backbone_config = self.config.backbone_config
        if self.backbone_kind == "autobackbone":
            return self.backbone.channels[-1]
        if self.backbone_kind == "tokens":
            return backbone_config.hidden_size
        convs = [m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels

    def train(self, mode: bool = True) -> "ProtoQuantModel":
        """Switch the concept head's mode; the frozen backbone always stays in eval mode, so its
        batch-norm statistics and dropout never change (also under `Trainer.train()`)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        backbone_config = self.config.backbone_config
        channels = getattr(backbone_config, "num_channels", 3)
        size = self.config.image_size
        expected = f"(batch_size, {channels}, height, width), e.g. (8, {channels}, {size}, {size})"
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must be a float tensor of shape {expected}; got {got}. Use the model's "
                "image processor (AutoImageProcessor) to turn images into pixel_values."
            )
        height, width = pixel_values.shape[-2:]
        if self.backbone_kind == "tokens":
            patch = backbone_config.patch_size
            if height % patch or width % patch or height < patch or width < patch:
                raise ValueError(
                    f"pixel_values must have shape {expected} with height and width positive multiples "
                    f"of the patch size {patch}; got {tuple(pixel_values.shape)}."
                )

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's feature map `(batch_size, hidden_size, height, width)`."""
        self._check_pixel_values(pixel_values)
        layer = self.config.backbone_feature_layer
        if self.backbone_kind == "autobackbone":
            features = self.backbone(pixel_values).feature_maps[-1]
        elif self.backbone_kind == "tokens":
            features = self._token_feature_map(pixel_values, layer)
        else:
            features = self.backbone(pixel_values).last_hidden_state
        if features.shape[-1] == 0 or features.shape[-2] == 0:
            raise ValueError(
                f"pixel_values of spatial size {tuple(pixel_values.shape[-2:])} are too small for this "
                f"backbone (empty feature map); use at least {self.config.image_size}x{self.config.image_size}."
            )
        return features

    def _token_feature_map(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        backbone_config = self.config.backbone_config
        height, width = pixel_values.shape[-2:]
        native = backbone_config.image_size
        outputs = self.backbone(
            pixel_values,
            output_hidden_states=layer != -1,
            interpolate_pos_encoding=(height, width) != (native, native),
        )
        tokens = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        grid_h, grid_w = height // backbone_config.patch_size, width // backbone_config.patch_size
        # Drop every prefix token (CLS, distillation, registers) and lay the patches out as a grid.
        patches = tokens[:, tokens.shape[1] - grid_h * grid_w :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)

    def forward_concepts(
        self, feature_maps: torch.Tensor, output_activation_maps: bool = False, output_similarity_maps: bool = False
    ) -> ProtoQuantModelOutput:
        """Concept detection on precomputed feature maps `(B, D, H, W)` (e.g. from a feature cache)."""
        scores, activations, similarity = self.codebook(feature_maps)
        return ProtoQuantModelOutput(
            concept_scores=scores,
            activation_maps=activations if output_activation_maps else None,
            similarity_maps=similarity if output_similarity_maps else None,
        )

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_activation_maps: bool = False,
        output_similarity_maps: bool = False,
        output_feature_maps: bool = False,
    ) -> ProtoQuantModelOutput:
        features = self.forward_features(pixel_values)
        outputs = self.forward_concepts(features, output_activation_maps, output_similarity_maps)
        outputs.feature_maps = features if output_feature_maps else None
        return outputs


class ProtoQuantForImageClassification(ProtoQuantPreTrainedModel):
    """ProtoQuant image classifier: concept scores → non-negative, sparse concept→class weights.

    Uniform small API (timm-style), each step callable on its own:
    `forward_features` (pixels → feature map), `forward_concepts` (feature map → concept scores and
    maps), `forward_head` (scores → logits), and `forward_quantized` for stage-1 codebook training.
    """

    def __init__(self, config: ProtoQuantConfig):
        super().__init__(config)
        self.protoquant = ProtoQuantModel(config)
        self.classifier = ProtoQuantConceptClassifier(config)
        hidden_size = self.protoquant.hidden_size
        self.original_head = (
            ProtoQuantOriginalHead(config, hidden_size) if config.stage1_head_num_labels > 0 else None
        )
        self.post_init()

    @property
    def codebook(self) -> ProtoQuantCodebook:
        return self.protoquant.codebook

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen backbone feature map `(batch_size, hidden_size, height, width)`."""
        return self.protoquant.forward_features(pixel_values)

    def forward_concepts(
        self, feature_maps: torch.Tensor, output_activation_maps: bool = False, output_similarity_maps: bool = False
    ) -> ProtoQuantModelOutput:
        return self.protoquant.forward_concepts(feature_maps, output_activation_maps, output_similarity_maps)

    def forward_head(self, concept_scores: torch.Tensor) -> torch.Tensor:
        """Logits `(batch_size, num_labels)` from concept scores `(batch_size, num_concepts)`."""
        return self.classifier(concept_scores)

    def _check_labels(self, labels: torch.Tensor, num_labels: int) -> None:
        if labels.ndim != 1 or labels.dtype.is_floating_point:
            raise ValueError(
                f"labels must be a 1-D integer tensor of class indices; got dtype {labels.dtype}, shape {tuple(labels.shape)}."
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
            raise ValueError(
                f"labels must be class indices in [0, {num_labels - 1}]; got values from "
                f"{int(labels.min())} to {int(labels.max())}. Check that the dataset's label column "
                "matches the model's id2label."
            )

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_activation_maps: bool = False,
        output_similarity_maps: bool = False,
    ) -> ProtoQuantImageClassifierOutput:
        features = self.forward_features(pixel_values)
        return self.classify_features(features, labels, output_activation_maps, output_similarity_maps)

    def classify_features(
        self,
        feature_maps: torch.Tensor,
        labels: torch.LongTensor | None = None,
        output_activation_maps: bool = False,
        output_similarity_maps: bool = False,
    ) -> ProtoQuantImageClassifierOutput:
        """The full head on precomputed feature maps `(B, D, H, W)`: what `forward` does after the backbone."""
        concepts = self.forward_concepts(feature_maps, output_activation_maps, output_similarity_maps)
        logits = self.forward_head(concepts.concept_scores)
        loss = None
        if labels is not None:
            self._check_labels(labels, self.config.num_labels)
            loss = F.cross_entropy(logits, labels)
        return ProtoQuantImageClassifierOutput(
            loss=loss,
            logits=logits,
            concept_scores=concepts.concept_scores,
            activation_maps=concepts.activation_maps,
            similarity_maps=concepts.similarity_maps,
        )

    def forward_quantized(
        self, feature_maps: torch.Tensor, labels: torch.LongTensor | None = None
    ) -> ProtoQuantQuantizedOutput:
        """Stage 1 (§3.8): hard nearest-concept assignment by cosine (no gradient through it), the
        selected raw concept vectors replace the features and go through the frozen original head.
        Only the selected concepts receive gradient (no straight-through estimator)."""
        if self.original_head is None:
            raise ValueError(
                "This model has no stage-1 head. Build it with `from_backbone` from a classification "
                "checkpoint whose classes match, or fit a linear probe first (protoquant_hf.training)."
            )
        indices = self.codebook.nearest(feature_maps)  # (B, H, W)
        quantized = self.codebook.concepts[indices].permute(0, 3, 1, 2)  # (B, D, H, W)
        logits = self.original_head(quantized)
        codebook_loss = F.mse_loss(quantized, feature_maps.detach().to(quantized.dtype))
        loss = None
        if labels is not None:
            self._check_labels(labels, self.config.stage1_head_num_labels)
            loss = F.cross_entropy(logits, labels) + self.config.codebook_loss_weight * codebook_loss
        return ProtoQuantQuantizedOutput(
            loss=loss, logits=logits, codebook_loss=codebook_loss, concept_indices=indices
        )

    def set_stage1_head(self, classifier: nn.Linear, norm: nn.LayerNorm | None = None) -> None:
        """Install a frozen stage-1 head (a checkpoint's own classifier or a fitted linear probe)."""
        if classifier.in_features != self.protoquant.hidden_size:
            raise ValueError(
                f"The stage-1 classifier takes {classifier.in_features} features but the backbone "
                f"feature map has {self.protoquant.hidden_size} channels."
            )
        self.config.stage1_head_num_labels = classifier.out_features
        self.config.stage1_head_norm = norm is not None
        head = ProtoQuantOriginalHead(self.config, self.protoquant.hidden_size)
        head.classifier.load_state_dict(classifier.state_dict())
        if norm is not None:
            head.norm.load_state_dict(norm.state_dict())
        self.original_head = head.to(self.classifier.weight.device)

    @torch.no_grad()
    def prune_concepts(self, keep: torch.Tensor) -> None:
        """Keep only the concepts indexed by `keep` (LongTensor or bool mask of length K), shrinking
        the codebook and the concept→class matrix consistently. Changes the softmax normalisation of
        the remaining concepts (method §11.9): re-evaluate or retrain afterwards."""
        keep = torch.as_tensor(keep, device=self.classifier.weight.device)
        if keep.dtype == torch.bool:
            keep = keep.nonzero().flatten()
        if keep.numel() == 0:
            raise ValueError("prune_concepts would remove every concept; keep at least one.")
        codebook, classifier = self.codebook, self.classifier
        codebook.concepts = nn.Parameter(
            codebook.concepts[keep].clone(), requires_grad=codebook.concepts.requires_grad
        )
        classifier.weight = nn.Parameter(classifier.weight[:, keep].clone())
        self.config.num_concepts = int(keep.numel())

    @classmethod
    def from_backbone(
        cls,
        backbone_name_or_path: str,
        *,
        num_concepts: int = 256,
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
            num_concepts: K, the codebook size.
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
        config = ProtoQuantConfig(
            backbone_config=backbone_config,
            backbone_feature_layer=backbone_feature_layer,
            num_concepts=num_concepts,
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
        pretrained = loader.from_pretrained(source, config=config.backbone_config, dtype=dtype, **extra)
        backbone.load_state_dict(pretrained.state_dict())
        if keep_checkpoint_head:
            model._keep_checkpoint_head(source, backbone_config, dtype)
        return model.to(dtype)

    def _keep_checkpoint_head(self, source: str, backbone_config, dtype: torch.dtype) -> None:
        architectures = getattr(backbone_config, "architectures", None) or []
        if not any(name.endswith("ForImageClassification") for name in architectures):
            return
        checkpoint = AutoModelForImageClassification.from_pretrained(source, dtype=dtype)
        linears = [m for m in checkpoint.classifier.modules() if isinstance(m, nn.Linear)]
        if not linears or linears[-1].in_features != self.protoquant.hidden_size:
            return  # e.g. heads on CLS+patch concatenations: stage 1 fits a probe instead
        norm = None
        if backbone_config.model_type in _POOLED_NORM_FAMILIES:
            norm = getattr(checkpoint, checkpoint.base_model_prefix).layernorm
        self.set_stage1_head(linears[-1], norm)


__all__ = [
    "ProtoQuantForImageClassification",
    "ProtoQuantImageClassifierOutput",
    "ProtoQuantModel",
    "ProtoQuantModelOutput",
    "ProtoQuantPreTrainedModel",
    "ProtoQuantQuantizedOutput",
    "cosine_similarity_maps",
    "register_backbone_alias",
    "resolve_backbone",
]
