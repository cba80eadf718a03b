"""ProtoQuant: an interpretable concept head on a frozen Hugging Face vision backbone.

The whole method lives in this file (Janusz et al., "ProtoQuant", arXiv 2602.06592; section numbers
below refer to the project's method spec):

    image ──backbone (frozen)──▶ feature map z (B, D, H, W)
          ──cosine to K concepts──▶ similarity maps m (B, K, H, W)            §3.4
          ──softmax over concepts / τ──▶ activation maps p (B, K, H, W)       §3.5
          ──spatial max──▶ concept scores s (B, K)                            §3.6
          ──s · ReLU(W)ᵀ──▶ logits (B, C)                                     §3.7

Stage-1 codebook training instead replaces every feature vector by its nearest concept and feeds
the result to the backbone's own frozen classifier head (§3.8): `forward(..., stage="codebook")`.
Every consumer (training, the Trainer, pipelines, explanations, metrics) goes through the same
`forward`, from pixels, cached feature maps or cached concept scores.

The file is self-contained (torch + transformers + the sibling configuration module) so that a
saved folder loads as Hub remote code with ``trust_remote_code=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_protoquant import ProtoQuantConfig, backbone_kind

# What `set_trainable` and `forward(stage=...)` accept: stage 2 (the concept→class head) and stage 1.
TRAINING_STAGES = ("head", "codebook")

# Families that build a pooler we never use unless told not to.
_NO_POOLER_FAMILIES = ("vit", "deit")


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
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The backbone's hidden states, when `output_hidden_states=True` and the backbone returns them.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            The backbone's attention weights, when `output_attentions=True` and the backbone returns them.
    """

    concept_scores: torch.FloatTensor | None = None
    activation_maps: torch.FloatTensor | None = None
    similarity_maps: torch.FloatTensor | None = None
    feature_maps: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ProtoQuantImageClassifierOutput(ModelOutput):
    """Output of [`ProtoQuantForImageClassification`] (stage 2, the interpretable head).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
            The task loss for `config.problem_type` (cross-entropy for class indices), plus
            `sparsity_loss` in training mode.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            s · ReLU(W)ᵀ, non-negative evidence per class (no bias).
        concept_scores (`torch.FloatTensor` of shape `(batch_size, num_concepts)`):
            Presence score of every concept (see [`ProtoQuantModelOutput`]).
        concept_contributions (`torch.FloatTensor` of shape `(batch_size, num_labels, num_concepts)`, *optional*):
            s_k · ReLU(W)_ck, what each concept adds to each class logit; summed over concepts it is
            the logits. Returned when `output_concept_contributions=True`.
        sparsity_loss (`torch.FloatTensor` of shape `()`, *optional*):
            λ·ΣReLU(W) with λ = `config.head_l1_lambda`; returned in training mode when λ > 0.
        activation_maps / similarity_maps / feature_maps / hidden_states / attentions (*optional*):
            As in [`ProtoQuantModelOutput`], each only when requested.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    concept_scores: torch.FloatTensor | None = None
    concept_contributions: torch.FloatTensor | None = None
    sparsity_loss: torch.FloatTensor | None = None
    activation_maps: torch.FloatTensor | None = None
    similarity_maps: torch.FloatTensor | None = None
    feature_maps: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ProtoQuantQuantizedOutput(ModelOutput):
    """Stage 1 (`forward(..., stage="codebook")`): features replaced by their nearest concepts,
    through the frozen original head.

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


def cosine_similarity(features: torch.Tensor, concepts: torch.Tensor, eps: float) -> torch.Tensor:
    """m_k(z) = ⟨z, c_k⟩ / ((‖z‖ + ε)(‖c_k‖ + ε)) at every location (§3.4), location-major.

    Args:
        features: `(batch_size, hidden_size, height, width)`.
        concepts: `(num_concepts, hidden_size)`.

    Returns:
        `(batch_size, height * width, num_concepts)`, computed in float32 by one matrix product over
        all locations of the batch (a batched product per image is ~2x slower for small maps), with
        the concepts on the contiguous axis, where the softmax over concepts runs.
    """
    batch_size, hidden_size = features.shape[:2]
    # One copy converts and transposes to location-major; the feature norms divide the (B, HW, K) product
    # instead of normalising the (B, HW, D) vectors first: the same cosines (to float rounding) with D / K
    # times less elementwise work and no second full-size copy (trained-concept steps 1.45x faster at 7x7, D = 1280).
    vectors = torch.empty(batch_size, features.shape[2] * features.shape[3], hidden_size, dtype=torch.float32, device=features.device)
    vectors.copy_(features.flatten(2).transpose(1, 2))  # (B, HW, D)
    concepts = concepts.float()
    concepts = concepts / (concepts.norm(dim=1, keepdim=True) + eps)
    return (vectors @ concepts.t()).div_(vectors.norm(dim=2, keepdim=True) + eps)  # (B, HW, D) @ (D, K)


def cosine_similarity_maps(features: torch.Tensor, concepts: torch.Tensor, eps: float) -> torch.Tensor:
    """`cosine_similarity` as maps `(batch_size, num_concepts, height, width)` (a view, no copy)."""
    height, width = features.shape[-2:]
    return cosine_similarity(features, concepts, eps).transpose(1, 2).unflatten(2, (height, width))


class ProtoQuantCodebook(nn.Module):
    """The K concept vectors, living in the backbone's own feature space (no projection, §3.2).

    τ and ε are read from the config at every call, so editing `config.temperature` takes effect.
    """

    def __init__(self, config: ProtoQuantConfig, hidden_size: int):
        super().__init__()
        self.config = config
        # Frozen unless a training stage asks otherwise (`set_trainable`): fine-tuning concepts in
        # stage 2 destroys their grounding in real training features (method §13).
        self.concepts = nn.Parameter(torch.empty(config.num_concepts, hidden_size), requires_grad=False)

    def similarity(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity maps `(B, K, H, W)` of feature maps `(B, D, H, W)` to every concept."""
        return cosine_similarity_maps(features, self.concepts, self.config.cosine_eps)

    def forward(
        self, features: torch.Tensor, output_similarity_maps: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return (concept_scores `(B, K)`, activation_maps `(B, K, H, W)`, similarity_maps
        `(B, K, H, W)` or None unless `output_similarity_maps`)."""
        height, width = features.shape[-2:]
        similarity = cosine_similarity(features, self.concepts, self.config.cosine_eps)  # (B, HW, K)
        # Dividing in place saves a full-size buffer when the raw cosines are not returned (the matrix
        # product does not keep its output for backward, so autograd allows it).
        logits = similarity / self.config.temperature if output_similarity_maps else similarity.div_(self.config.temperature)
        activations = torch.softmax(logits, dim=2)  # over concepts at each location, §3.5
        scores = activations.amax(dim=1)  # spatial max, §3.6

        def as_maps(location_major: torch.Tensor) -> torch.Tensor:
            return location_major.transpose(1, 2).unflatten(2, (height, width))

        return scores, as_maps(activations), as_maps(similarity) if output_similarity_maps else None

    @torch.no_grad()
    def nearest(self, features: torch.Tensor) -> torch.LongTensor:
        """Index `(B, H, W)` of the most cosine-similar concept at every location (no gradient, §3.8)."""
        height, width = features.shape[-2:]
        return cosine_similarity(features, self.concepts, self.config.cosine_eps).argmax(dim=2).unflatten(1, (height, width))

    def quantize(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor, torch.Tensor]:
        """Stage-1 vector quantization (§3.8): every feature vector replaced by its nearest concept.

        Hard assignment under no-grad and no straight-through estimator, so only the selected raw
        concept vectors receive gradient (through the frozen head and the codebook term).

        Returns:
            (quantized feature map `(B, D, H, W)`, concept indices `(B, H, W)`,
            codebook loss MSE(quantized, stop_grad(features)) `()`).
        """
        indices = self.nearest(features)
        quantized = self.concepts[indices].permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(quantized, features.detach().to(quantized.dtype))
        return quantized, indices, codebook_loss


class ProtoQuantConceptClassifier(nn.Module):
    """logits = s · ReLU(W)ᵀ, no bias (§3.7). ReLU on the fly keeps the stored weight a plain
    parameter, so any optimiser or training loop preserves non-negativity."""

    def __init__(self, config: ProtoQuantConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_labels, config.num_concepts))

    def forward(self, concept_scores: torch.Tensor) -> torch.Tensor:
        return concept_scores @ F.relu(self.weight).t()

    def contributions(self, concept_scores: torch.Tensor) -> torch.Tensor:
        """s_k · ReLU(W)_ck `(B, C, K)`: the exact per-concept decomposition of the logits."""
        return concept_scores.unsqueeze(1) * F.relu(self.weight).unsqueeze(0)

    def sparsity_loss(self, l1_lambda: float) -> torch.Tensor:
        """λ·ΣReLU(W): L1 on the effective weights (not |W|; §3.7)."""
        return l1_lambda * F.relu(self.weight).sum()


class ProtoQuantOriginalHead(nn.Module):
    """The frozen head stage 1 trains the codebook through: global average pooling → optional
    LayerNorm → linear. It is the backbone checkpoint's own classifier when that fits the data, or
    a linear probe fitted on pooled frozen features."""

    def __init__(self, config: ProtoQuantConfig, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size) if config.stage1_head_norm else nn.Identity()
        self.classifier = nn.Linear(hidden_size, config.stage1_head_num_labels)

    def forward(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(feature_maps.mean(dim=(2, 3))))


class ProtoQuantPreTrainedModel(PreTrainedModel):
    config: ProtoQuantConfig
    config_class = ProtoQuantConfig
    base_model_prefix = "protoquant"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # forward takes **kwargs; the Trainer must not rescale our per-batch mean loss (hf-integration.md §7.1).
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ProtoQuantCodebook):
            init.orthogonal_(module.concepts)
        elif isinstance(module, ProtoQuantConceptClassifier):
            init.normal_(module.weight, mean=1.0, std=0.1)  # N(1, 0.1), §3.7

    def set_trainable(self, stage: str = "head", train_concepts: bool = False) -> "ProtoQuantPreTrainedModel":
        """The one place that decides which parameters train; everything else is frozen.

        Args:
            stage: `"head"` (stage 2: the concept→class weights W) or `"codebook"` (stage 1: the
                concepts). The backbone and the stage-1 head are always frozen.
            train_concepts: in the head stage, fine-tune the concepts together with W (the official
                code's default; it loosens their grounding in real training features).

        Every load path (`from_pretrained`, remote code, `from_backbone`) ends in
        `set_trainable("head")`, so the stock `transformers.Trainer` trains W and nothing else.
        """
        if stage not in TRAINING_STAGES:
            raise ValueError(f"stage must be one of {TRAINING_STAGES}; got {stage!r}.")
        self.requires_grad_(False)
        codebook = self.protoquant.codebook if hasattr(self, "protoquant") else self.codebook
        codebook.concepts.requires_grad_(stage == "codebook" or train_concepts)
        if stage == "head" and hasattr(self, "classifier"):
            self.classifier.weight.requires_grad_(True)
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            # Same exception type as the library (callers catch RuntimeError), with the likely cause.
            raise RuntimeError(
                f"The weights in {pretrained_model_name_or_path} do not match its config.json (the load "
                "report above lists the tensors): num_concepts, the labels or the backbone were changed "
                "after saving. Load an unmodified folder, or pass ignore_mismatched_sizes=True to "
                "re-initialise the mismatched tensors."
            ) from error
        # transformers re-creates loaded tensors as trainable parameters: freeze again.
        return model.set_trainable("head")

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Record both model classes and the image processor in `auto_map`, so `AutoModel`,
        # `AutoModelForImageClassification` and `AutoImageProcessor` all load the folder as remote code.
        if getattr(self, "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", "modeling_protoquant.ProtoQuantModel")
            auto_map.setdefault("AutoModelForImageClassification", "modeling_protoquant.ProtoQuantForImageClassification")
            # The image processor saved beside the model (image_processing_protoquant.py) is found from here.
            auto_map.setdefault("AutoImageProcessor", "image_processing_protoquant.ProtoQuantImageProcessor")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


class ProtoQuantModel(ProtoQuantPreTrainedModel):
    """Frozen backbone + codebook: images (or precomputed feature maps) → concept scores and maps."""

    def __init__(self, config: ProtoQuantConfig):
        super().__init__(config)
        backbone_config = config.backbone_config
        self.backbone_kind = backbone_kind(backbone_config.model_type)
        if self.backbone_kind == "autobackbone":
            self.backbone = MODEL_FOR_BACKBONE_MAPPING[type(backbone_config)](backbone_config)
        else:
            extra = {"add_pooling_layer": False} if backbone_config.model_type in _NO_POOLER_FAMILIES else {}
            self.backbone = AutoModel.from_config(backbone_config, **extra)
        self.backbone.eval()
        self.hidden_size = self._backbone_hidden_size()
        self.codebook = ProtoQuantCodebook(config, self.hidden_size)
        # An optional inference-only copy of the backbone (`use_fast_backbone`); kept out of
        # `_modules`, so it is never saved, moved by `.to()` or trained.
        self.__dict__["_fast_backbone"] = None
        self.post_init()
        self.set_trainable("head")

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

    def use_fast_backbone(self, enabled: bool = True, check: bool = True) -> bool:
        """Compute feature maps with an exact, faster inference copy of the frozen backbone.

        Available for EfficientNet backbones (the bundled default; see `fast_backbone.py`): batch-norms
        folded into convolutions, identity squeeze-excites removed, cache-sized micro-batches on
        single-threaded workers. The copy is a snapshot of the backbone's current weights (call again
        after replacing them), is never saved, and is bypassed whenever the backbone or the pixels
        require grad or hidden states / attentions are requested.

        Args:
            enabled: switch the copy on (`True`) or back to the eager backbone (`False`).
            check: compare the copy against the eager backbone on random pixels first and refuse a
                copy that differs (relative error above 1e-4).

        Returns:
            Whether feature maps now come from a fast copy (`False` for other backbone families).
        """
        self.__dict__["_fast_backbone"] = None
        if not enabled or self.config.backbone_config.model_type != "efficientnet":
            return False
        from .fast_backbone import optimize_frozen_backbone

        fast = optimize_frozen_backbone(self.backbone)
        if check:
            parameter = next(self.backbone.parameters())
            size = self.config.image_size
            pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
            with torch.no_grad():
                expected = self.backbone(pixels).last_hidden_state.float()
                actual = fast.to(parameter.device)(pixels).last_hidden_state.float()
            error = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
            if not error <= 1e-4:
                raise RuntimeError(
                    f"The fast backbone copy differs from the eager backbone (relative error {error:.2e}); "
                    "keeping the eager backbone would be correct: call use_fast_backbone(False)."
                )
        self.__dict__["_fast_backbone"] = fast
        return True

    def _check_pixel_values(self, pixel_values) -> None:
        backbone_config = self.config.backbone_config
        channels = getattr(backbone_config, "num_channels", 3)
        size = self.config.image_size
        expected = f"(batch_size, {channels}, height, width), e.g. (8, {channels}, {size}, {size})"
        if pixel_values is None:
            raise ValueError(f"Pass pixel_values of shape {expected} (or feature_maps / concept_scores to skip the backbone).")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must be a float tensor of shape {expected}; got {got}. Use the model's "
                "image processor (AutoImageProcessor) to turn images into pixel_values."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a float tensor (normalised by the image processor); got dtype "
                f"{pixel_values.dtype}. Use the model's image processor, or convert with .float() after normalising."
            )
        # The sum is finite unless some value is NaN or infinite (or the values are astronomically large):
        # 0.1 ms instead of 7 ms for a full elementwise check on a 32 x 224 px batch.
        if not torch.isfinite(pixel_values.sum()) and not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values; check the images and the preprocessing.")
        height, width = pixel_values.shape[-2:]
        if self.backbone_kind == "tokens":
            patch = backbone_config.patch_size
            if height % patch or width % patch or height < patch or width < patch:
                raise ValueError(
                    f"pixel_values must have shape {expected} with height and width positive multiples "
                    f"of the patch size {patch}; got {tuple(pixel_values.shape)}."
                )
        elif min(height, width) < 64 and min(height, width) < self.minimum_image_size():
            raise ValueError(
                f"pixel_values of spatial size {height}x{width} are too small for this backbone: its downsampling "
                f"needs at least {self.minimum_image_size()}x{self.minimum_image_size()} (the model was trained at "
                f"{size}x{size}). Use the model's image processor."
            )

    def minimum_image_size(self) -> int:
        """The smallest square input side the backbone accepts and turns into a non-empty feature map: the patch
        size of token models; for convnets, found once by trying zero images (a few tiny forwards), then cached."""
        if self.backbone_kind == "tokens":
            return self.config.backbone_config.patch_size
        cached = self.__dict__.get("_minimum_image_size")
        if cached is not None:
            return cached
        channels = getattr(self.config.backbone_config, "num_channels", 3)
        parameter = next(self.backbone.parameters())

        def works(side: int) -> bool:
            pixels = torch.zeros(1, channels, side, side, dtype=parameter.dtype, device=parameter.device)
            try:
                with torch.no_grad():
                    features, _ = self._eager_features(pixels)
            except (RuntimeError, ValueError, IndexError):
                return False
            return features.shape[-1] > 0 and features.shape[-2] > 0

        upper = 1
        while not works(upper):
            if upper >= 1024:
                raise ValueError("The backbone produced no feature map for any input up to 1024 px.")
            upper *= 2
        lower = upper // 2  # fails (or 0); find the smallest working side in (lower, upper]
        while upper - lower > 1:
            middle = (lower + upper) // 2
            lower, upper = (lower, middle) if works(middle) else (middle, upper)
        self.__dict__["_minimum_image_size"] = upper
        return upper

    def _backbone_forward(self, pixel_values: torch.Tensor, **kwargs):
        """(feature map `(B, D, H, W)`, backbone output or None) for checked pixel values."""
        self._check_pixel_values(pixel_values)
        wants_extra = bool(kwargs.get("output_hidden_states") or kwargs.get("output_attentions"))
        fast = self.__dict__["_fast_backbone"]
        # The copy is inference-only: any gradient (to the weights, or to the pixels, as attacks and attribution
        # methods need) goes through the eager backbone.
        needs_grad = pixel_values.requires_grad or any(p.requires_grad for p in self.backbone.parameters())
        if fast is not None and not wants_extra and not needs_grad:
            features, outputs = fast.to(pixel_values.device)(pixel_values).last_hidden_state, None
        else:
            features, outputs = self._eager_features(pixel_values, **kwargs)
        if features.shape[-1] == 0 or features.shape[-2] == 0:
            raise ValueError(
                f"pixel_values of spatial size {tuple(pixel_values.shape[-2:])} are too small for this "
                f"backbone (empty feature map); use at least {self.config.image_size}x{self.config.image_size}."
            )
        return features, outputs

    def _eager_features(self, pixel_values: torch.Tensor, **kwargs):
        layer = self.config.backbone_feature_layer
        if self.backbone_kind == "autobackbone":
            outputs = self.backbone(pixel_values, **kwargs)
            return outputs.feature_maps[-1], outputs
        if self.backbone_kind == "convnet":
            kwargs.pop("output_attentions", None)  # convnets have none
            outputs = self.backbone(pixel_values, **kwargs)
            return outputs.last_hidden_state, outputs
        backbone_config = self.config.backbone_config
        height, width = pixel_values.shape[-2:]
        native = backbone_config.image_size
        kwargs["output_hidden_states"] = bool(kwargs.get("output_hidden_states")) or layer != -1
        outputs = self.backbone(
            pixel_values, interpolate_pos_encoding=(height, width) != (native, native), **kwargs
        )
        tokens = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        grid_h, grid_w = height // backbone_config.patch_size, width // backbone_config.patch_size
        # Drop every prefix token (CLS, distillation, registers) and lay the patches out as a grid.
        patches = tokens[:, tokens.shape[1] - grid_h * grid_w :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w), outputs

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's feature map `(batch_size, hidden_size, height, width)`."""
        return self._backbone_forward(pixel_values)[0]

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        feature_maps: torch.Tensor | None = None,
        output_activation_maps: bool = False,
        output_similarity_maps: bool = False,
        output_feature_maps: bool = False,
        **kwargs,
    ) -> ProtoQuantModelOutput:
        """Concept detection.

        Args:
            pixel_values: `(B, 3, H, W)` images from the image processor, or
            feature_maps: `(B, D, h, w)` precomputed backbone features (e.g. from a feature cache),
                which skip the backbone.
            output_activation_maps / output_similarity_maps / output_feature_maps: return p, m, z.
            kwargs: `output_hidden_states` / `output_attentions` go to the backbone; `return_dict`
                as for every transformers model.
        """
        backbone_outputs = None
        if feature_maps is None:
            feature_maps, backbone_outputs = self._backbone_forward(pixel_values, **_backbone_kwargs(kwargs))
        scores, activations, similarity = self.codebook(feature_maps, output_similarity_maps)
        return ProtoQuantModelOutput(
            concept_scores=scores,
            activation_maps=activations if output_activation_maps else None,
            similarity_maps=similarity if output_similarity_maps else None,
            feature_maps=feature_maps if output_feature_maps else None,
            hidden_states=getattr(backbone_outputs, "hidden_states", None) if kwargs.get("output_hidden_states") else None,
            attentions=getattr(backbone_outputs, "attentions", None) if kwargs.get("output_attentions") else None,
        )


def _backbone_kwargs(kwargs: dict) -> dict:
    """The generic transformers keyword arguments a backbone understands."""
    return {name: kwargs[name] for name in ("output_hidden_states", "output_attentions") if kwargs.get(name)}


class ProtoQuantForImageClassification(ProtoQuantPreTrainedModel):
    """ProtoQuant image classifier: concept scores → non-negative, sparse concept→class weights.

    One `forward` serves every consumer: images, precomputed feature maps or concept scores in;
    logits, loss, concept scores and, on request, the maps and the exact per-concept contributions
    out; `stage="codebook"` gives the stage-1 quantized forward. The timm-style steps
    (`forward_features`, `forward_head`) are the same computations, callable on their own.
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
        self.set_trainable("head")

    @property
    def codebook(self) -> ProtoQuantCodebook:
        return self.protoquant.codebook

    def use_fast_backbone(self, enabled: bool = True, check: bool = True) -> bool:
        """See [`ProtoQuantModel.use_fast_backbone`]."""
        return self.protoquant.use_fast_backbone(enabled, check)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen backbone feature map `(batch_size, hidden_size, height, width)`."""
        return self.protoquant.forward_features(pixel_values)

    def forward_head(self, concept_scores: torch.Tensor) -> torch.Tensor:
        """Logits `(batch_size, num_labels)` from concept scores `(batch_size, num_concepts)`."""
        return self.classifier(concept_scores)

    def _check_class_indices(self, labels: torch.Tensor, num_labels: int) -> None:
        """Class-index labels out of range give one clear error (the library's raw one is cryptic)."""
        if labels.is_floating_point() or labels.dtype == torch.bool:
            return
        valid = labels[labels != -100]  # the library's ignore index
        if valid.numel() and (valid.min() < 0 or valid.max() >= num_labels):
            raise ValueError(
                f"labels must be class indices in [0, {num_labels - 1}]; got values from "
                f"{int(valid.min())} to {int(valid.max())}. Check that the dataset's label column "
                "matches the model's id2label."
            )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        feature_maps: torch.Tensor | None = None,
        concept_scores: torch.Tensor | None = None,
        stage: str = "head",
        output_activation_maps: bool = False,
        output_similarity_maps: bool = False,
        output_feature_maps: bool = False,
        output_concept_contributions: bool = False,
        **kwargs,
    ) -> ProtoQuantImageClassifierOutput | ProtoQuantQuantizedOutput:
        """Classify images, cached feature maps or concept scores.

        Args:
            pixel_values: `(B, 3, H, W)` images from the image processor, or
            feature_maps: `(B, D, h, w)` precomputed backbone features (skip the backbone), or
            concept_scores: `(B, K)` precomputed presence scores (skip the codebook too; head stage only).
            labels: class indices `(B,)`, multi-hot `(B, C)` floats or regression targets, as
                `config.problem_type` says (inferred like every transformers classifier when unset).
            stage: `"head"` (default: the interpretable head, stage 2) or `"codebook"` (stage 1:
                nearest-concept quantization through the frozen original head).
            output_activation_maps / output_similarity_maps / output_feature_maps: return p, m, z.
            output_concept_contributions: return s_k · ReLU(W)_ck `(B, C, K)`, which sums to the logits.
            kwargs: `output_hidden_states` / `output_attentions` go to the backbone; `return_dict`
                as for every transformers model.

        Returns:
            [`ProtoQuantImageClassifierOutput`], or [`ProtoQuantQuantizedOutput`] for `stage="codebook"`.
        """
        if stage not in TRAINING_STAGES:
            raise ValueError(f"stage must be one of {TRAINING_STAGES}; got {stage!r}.")
        if stage == "codebook":
            if concept_scores is not None:
                raise ValueError('stage="codebook" needs pixel_values or feature_maps (it quantizes the feature map).')
            if feature_maps is None:
                feature_maps = self.protoquant.forward_features(pixel_values)
            return self._forward_codebook(feature_maps, labels)

        if concept_scores is None:
            concepts = self.protoquant(
                pixel_values,
                feature_maps=feature_maps,
                output_activation_maps=output_activation_maps,
                output_similarity_maps=output_similarity_maps,
                output_feature_maps=output_feature_maps,
                return_dict=True,
                **kwargs,
            )
        else:
            concepts = ProtoQuantModelOutput(concept_scores=concept_scores)
        logits = self.classifier(concepts.concept_scores)
        loss = sparsity_loss = None
        if self.training and self.config.head_l1_lambda > 0:
            sparsity_loss = self.classifier.sparsity_loss(self.config.head_l1_lambda)
        if labels is not None:
            if self.config.problem_type in (None, "single_label_classification"):
                self._check_class_indices(labels, self.config.num_labels)
            loss = self.loss_function(labels, logits, self.config)
            if sparsity_loss is not None:
                loss = loss + sparsity_loss
        contributions = self.classifier.contributions(concepts.concept_scores) if output_concept_contributions else None
        return ProtoQuantImageClassifierOutput(
            loss=loss,
            logits=logits,
            concept_scores=concepts.concept_scores,
            concept_contributions=contributions,
            sparsity_loss=sparsity_loss,
            activation_maps=concepts.activation_maps,
            similarity_maps=concepts.similarity_maps,
            feature_maps=concepts.feature_maps,
            hidden_states=concepts.hidden_states,
            attentions=concepts.attentions,
        )

    def _forward_codebook(self, feature_maps: torch.Tensor, labels: torch.Tensor | None) -> ProtoQuantQuantizedOutput:
        """Stage 1 (§3.8): the quantized feature map through the frozen original head."""
        if self.original_head is None:
            raise ValueError(
                "This model has no stage-1 head. Build it with `from_backbone` from a classification "
                "checkpoint whose classes match, or fit a linear probe first (protoquant_hf.training)."
            )
        quantized, indices, codebook_loss = self.codebook.quantize(feature_maps)
        logits = self.original_head(quantized)
        loss = None
        if labels is not None:
            self._check_class_indices(labels, self.config.stage1_head_num_labels)
            loss = F.cross_entropy(logits, labels) + self.config.codebook_loss_weight * codebook_loss
        return ProtoQuantQuantizedOutput(loss=loss, logits=logits, codebook_loss=codebook_loss, concept_indices=indices)

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
        self.original_head = head.to(self.classifier.weight.device).requires_grad_(False)


__all__ = [
    "ProtoQuantForImageClassification",
    "ProtoQuantImageClassifierOutput",
    "ProtoQuantModel",
    "ProtoQuantModelOutput",
    "ProtoQuantPreTrainedModel",
    "ProtoQuantQuantizedOutput",
    "TRAINING_STAGES",
    "cosine_similarity",
    "cosine_similarity_maps",
]
