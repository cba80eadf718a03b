"""Core model: shapes per backbone family, the head math, freezing, save/load, remote code, pipeline."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from fresh_process import run_without_package
from tiny_backbones import TINY_BACKBONES, tiny_backbone_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    BertConfig,
    BertModel,
    BitImageProcessor,
    ResNetForImageClassification,
    ViTModel,
    pipeline,
)

import protoquant_hf
from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification
from protoquant_hf.concepts import prune_concepts

LABELS = {0: "cat", 1: "dog", 2: "bird"}


def tiny_model(model_type: str = "resnet", num_concepts: int = 6, **kwargs) -> tuple[ProtoQuantForImageClassification, int]:
    backbone_config, size = tiny_backbone_config(model_type)
    config = ProtoQuantConfig(
        backbone_config=backbone_config, num_concepts=num_concepts, image_size=size, id2label=LABELS, **kwargs
    )
    torch.manual_seed(0)
    return ProtoQuantForImageClassification(config).eval(), size


def tiny_processor(size: int) -> BitImageProcessor:
    return BitImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


@pytest.mark.parametrize("model_type", sorted(TINY_BACKBONES))
def test_forward_shapes_every_family(model_type):
    model, size = tiny_model(model_type)
    pixels = torch.randn(2, 3, size, size)
    out = model(pixels, labels=torch.tensor([0, 2]), output_activation_maps=True, output_similarity_maps=True)
    features = model.forward_features(pixels)
    batch, hidden, height, width = features.shape
    assert (batch, hidden) == (2, model.protoquant.hidden_size) and height > 0 and width > 0
    assert out.logits.shape == (2, 3)
    assert out.concept_scores.shape == (2, 6)
    assert out.activation_maps.shape == (2, 6, height, width)
    assert out.similarity_maps.shape == (2, 6, height, width)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.activation_maps.sum(dim=1), torch.ones(2, height, width))


def test_maps_only_when_asked():
    model, size = tiny_model()
    out = model(torch.randn(1, 3, size, size))
    assert out.activation_maps is None and out.similarity_maps is None
    assert list(out.keys()) == ["logits", "concept_scores"]


def test_token_models_drop_every_prefix_token():
    # DeiT has CLS + distillation tokens; registers add more. The grid must hold patch tokens only.
    for model_type, prefix in [("deit", 2), ("vit", 1), ("siglip_vision_model", 0)]:
        model, size = tiny_model(model_type)
        pixels = torch.randn(1, 3, size, size)
        tokens = model.protoquant.backbone(pixels).last_hidden_state
        features = model.forward_features(pixels)
        grid = size // 8
        assert tokens.shape[1] == prefix + grid * grid
        torch.testing.assert_close(features.flatten(2).transpose(1, 2), tokens[:, prefix:])


def test_token_model_non_native_size_interpolates_position_embeddings():
    model, size = tiny_model("vit")
    features = model.forward_features(torch.randn(1, 3, 48, 40))
    assert features.shape[-2:] == (6, 5)


def test_head_math_matches_hand_computation():
    model, _ = tiny_model(num_concepts=2)
    # D = 16 channels; use two directions only so the cosines are easy to do by hand.
    concepts = torch.zeros(2, 16)
    concepts[0, 0] = 2.0  # direction e0
    concepts[1, 1] = 1.0  # direction e1
    weight = torch.tensor([[1.5, -0.7], [0.0, 2.0], [0.5, 0.5]])  # negative entry must act as 0
    model.codebook.concepts.data.copy_(concepts)
    model.classifier.weight.data.copy_(weight)
    features = torch.zeros(1, 16, 1, 2)
    features[0, 0, 0, 0], features[0, 1, 0, 0] = 3.0, 4.0  # location A = (3, 4): cos = 0.6, 0.8
    features[0, 1, 0, 1] = 5.0  # location B = (0, 5): cos = 0, 1
    out = model(
        feature_maps=features, output_activation_maps=True, output_similarity_maps=True, output_concept_contributions=True
    )

    eps, tau = 1e-6, 0.1
    cos_a = [3 * 2 / ((5 + eps) * (2 + eps)), 4 * 1 / ((5 + eps) * (1 + eps))]
    cos_b = [0.0, 5 * 1 / ((5 + eps) * (1 + eps))]
    p_a = [math.exp(c / tau) / sum(math.exp(x / tau) for x in cos_a) for c in cos_a]
    p_b = [math.exp(c / tau) / sum(math.exp(x / tau) for x in cos_b) for c in cos_b]
    scores = [max(p_a[0], p_b[0]), max(p_a[1], p_b[1])]
    relu_w = [[1.5, 0.0], [0.0, 2.0], [0.5, 0.5]]
    logits = [sum(w * s for w, s in zip(row, scores)) for row in relu_w]

    torch.testing.assert_close(out.similarity_maps[0, :, 0, 0], torch.tensor(cos_a))
    torch.testing.assert_close(out.similarity_maps[0, :, 0, 1], torch.tensor(cos_b))
    torch.testing.assert_close(out.activation_maps[0, :, 0, 0], torch.tensor(p_a))
    torch.testing.assert_close(out.concept_scores[0], torch.tensor(scores))
    torch.testing.assert_close(out.logits[0], torch.tensor(logits))
    contributions = [[w * s for w, s in zip(row, scores)] for row in relu_w]
    torch.testing.assert_close(out.concept_contributions[0], torch.tensor(contributions))
    torch.testing.assert_close(out.concept_contributions.sum(-1), out.logits)  # no bias: the logit is the sum
    # The same head from precomputed concept scores (the score-table path of stage 2).
    torch.testing.assert_close(model(concept_scores=out.concept_scores).logits, out.logits)


def test_temperature_is_read_at_call_time():
    model, size = tiny_model()
    features = torch.randn(2, model.protoquant.hidden_size, 2, 2)
    with torch.no_grad():
        sharp = model(feature_maps=features, output_similarity_maps=True)
        model.config.temperature = 1.0
        flat = model(feature_maps=features)
    torch.testing.assert_close(flat.concept_scores, torch.softmax(sharp.similarity_maps / 1.0, dim=1).amax(dim=(2, 3)))
    assert not torch.allclose(flat.concept_scores, sharp.concept_scores)


def test_init_weights_follow_the_method():
    model, _ = tiny_model(num_concepts=64)
    weight = model.classifier.weight
    assert abs(weight.mean().item() - 1.0) < 0.05 and abs(weight.std().item() - 0.1) < 0.03
    assert not model.codebook.concepts.requires_grad  # concepts frozen by default


def test_gradients_reach_only_head_and_backbone_statistics_stay():
    model, size = tiny_model("resnet")
    model.train()
    assert not model.protoquant.backbone.training  # backbone stays in eval under model.train()
    bn_stats = {k: v.clone() for k, v in model.protoquant.backbone.state_dict().items() if "running" in k}
    assert bn_stats
    model.set_trainable("head", train_concepts=True)  # stage-2 option: fine-tune concepts too
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"protoquant.codebook.concepts", "classifier.weight"}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(torch.randn(4, 3, size, size), labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    for key, value in model.protoquant.backbone.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(value, bn_stats[key], rtol=0, atol=0)


def test_codebook_stage_forward():
    model, size = tiny_model("resnet", num_concepts=5)
    model.set_stage1_head(torch.nn.Linear(16, 4))
    model.set_trainable("codebook")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["protoquant.codebook.concepts"]
    features = torch.relu(torch.randn(2, 16, 2, 2))
    out = model(feature_maps=features, labels=torch.tensor([0, 3]), stage="codebook")
    expected = model.codebook.nearest(features)
    assert torch.equal(out.concept_indices, expected)
    quantized = model.codebook.concepts.detach()[expected].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.codebook_loss, torch.nn.functional.mse_loss(quantized, features))
    head_logits = model.original_head(quantized)
    torch.testing.assert_close(out.logits, head_logits)
    ce = torch.nn.functional.cross_entropy(head_logits, torch.tensor([0, 3]))
    torch.testing.assert_close(out.loss, ce + model.config.codebook_loss_weight * out.codebook_loss)
    out.loss.backward()
    grad_rows = model.codebook.concepts.grad.abs().sum(dim=1) > 0
    used = torch.zeros(5, dtype=torch.bool)
    used[expected.flatten()] = True
    assert torch.equal(grad_rows, used)  # only selected concepts learn
    assert model.original_head.classifier.weight.grad is None  # the original head stays frozen
    pixels = torch.randn(2, 3, size, size)  # from pixels: the same path after the backbone
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixels, stage="codebook").logits, model(feature_maps=model.forward_features(pixels), stage="codebook").logits
        )
    with pytest.raises(ValueError, match="stage must be one of"):
        model(pixels, stage="both")


def test_training_mode_loss_is_the_stage2_objective():
    model, size = tiny_model()
    pixels, labels = torch.randn(3, 3, size, size), torch.tensor([0, 1, 2])
    model.eval()
    evaluation = model(pixels, labels=labels)
    torch.testing.assert_close(evaluation.loss, torch.nn.functional.cross_entropy(evaluation.logits, labels))
    assert evaluation.sparsity_loss is None
    model.train()
    training = model(pixels, labels=labels)
    l1 = model.config.head_l1_lambda * torch.relu(model.classifier.weight).sum()
    torch.testing.assert_close(training.sparsity_loss, l1)
    torch.testing.assert_close(training.loss, evaluation.loss + l1)
    model.config.head_l1_lambda = 0.0
    assert model(pixels, labels=labels).sparsity_loss is None


def test_prune_concepts_shrinks_codebook_and_weights_consistently():
    model, size = tiny_model(num_concepts=6)
    keep = torch.tensor([0, 2, 5])
    concepts = model.codebook.concepts.detach().clone()
    weight = model.classifier.weight.detach().clone()
    prune_concepts(model, keep)
    assert model.config.num_concepts == 3
    torch.testing.assert_close(model.codebook.concepts, concepts[keep])
    torch.testing.assert_close(model.classifier.weight, weight[:, keep])
    assert model(torch.randn(1, 3, size, size)).concept_scores.shape == (1, 3)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight"]
    with pytest.raises(ValueError, match="every concept"):
        prune_concepts(model, torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("model_type", ["resnet", "dinov2", "efficientnet"])
def test_save_load_exact_logits(tmp_path, model_type):
    model, size = tiny_model(model_type)
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(pixels).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    for loader in (ProtoQuantForImageClassification, AutoModelForImageClassification):
        loaded = loader.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert torch.equal(loaded(pixels).logits, expected)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__ == "ProtoQuantModel"


def test_save_load_keeps_pruned_k_and_stage1_head(tmp_path):
    model, size = tiny_model(num_concepts=6)
    model.set_stage1_head(torch.nn.Linear(16, 7))
    prune_concepts(model, torch.tensor([1, 3]))
    model.save_pretrained(tmp_path)
    loaded = ProtoQuantForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.num_concepts == 2 and loaded.config.stage1_head_num_labels == 7
    torch.testing.assert_close(loaded.original_head.classifier.weight, model.original_head.classifier.weight)


def test_from_pretrained_rejects_config_weight_mismatch(tmp_path):
    model, _ = tiny_model(num_concepts=6)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_concepts"] = 9
    (tmp_path / "config.json").write_text(json.dumps(config))
    # The library's exception type (callers such as ignore_mismatched_sizes flows catch RuntimeError),
    # with the likely cause in the message.
    with pytest.raises(RuntimeError, match="do not match its config.json"):
        ProtoQuantForImageClassification.from_pretrained(tmp_path)
    loaded = ProtoQuantForImageClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert loaded.codebook.concepts.shape[0] == 9


def save_pipeline_folder(tmp_path, model_type="resnet"):
    model, size = tiny_model(model_type)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tiny_processor(size).save_pretrained(folder)
    return model, size, folder


def test_saved_folder_is_remote_code_bundle(tmp_path):
    _, _, folder = save_pipeline_folder(tmp_path)
    files = {p.name for p in folder.iterdir()}
    assert {"configuration_protoquant.py", "modeling_protoquant.py", "config.json"} <= files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_protoquant.ProtoQuantForImageClassification"


def test_pipeline_returns_labels_from_id2label(tmp_path):
    model, size, folder = save_pipeline_folder(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    results = pipeline("image-classification", model=str(folder))(image)
    assert {r["label"] for r in results} == set(LABELS.values())
    processor = tiny_processor(size)
    with torch.no_grad():
        probs = model(**processor(images=image, return_tensors="pt")).logits.softmax(-1)[0]
    assert results[0]["label"] == LABELS[int(probs.argmax())]
    assert results[0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_fresh_process_remote_code_load_without_package(tmp_path):
    model, size, folder = save_pipeline_folder(tmp_path, "vit")
    pixels = torch.randn(1, 3, size, size)
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = model(pixels).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = (
        f"""
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageClassification, pipeline
        try:
            import protoquant_hf
            raise SystemExit("package visible")
        except ImportError:
            pass
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(model(pixels).logits, expected)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable == ["classifier.weight"], trainable
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(base).__name__ == "ProtoQuantModel", type(base)
        assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
        assert not any(p.requires_grad for p in base.parameters())
        with torch.no_grad():
            assert torch.equal(base(pixels).concept_scores, model(pixels).concept_scores)
        pipe = pipeline("image-classification", model={str(folder)!r}, trust_remote_code=True)
        out = pipe(Image.new("RGB", (40, 40), (120, 30, 200)))
        assert {{r["label"] for r in out}} == {set(LABELS.values())!r}, out
        print("REMOTE-OK")
        """
    )
    result = run_without_package(script, tmp_path)
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize(
    "pixels, match",
    [
        (torch.randn(3, 32, 32), r"shape \(batch_size, 3, height, width\).*got \(3, 32, 32\)"),
        (torch.randn(1, 1, 32, 32), r"shape \(batch_size, 3, height, width\).*got \(1, 1, 32, 32\)"),
        (np.zeros((1, 3, 32, 32), dtype=np.float32), r"shape \(batch_size, 3, height, width\).*got ndarray"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "must be a float tensor.*torch.uint8"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN or infinite"),
        (torch.full((1, 3, 32, 32), float("inf")), "NaN or infinite"),
    ],
)
def test_bad_pixel_values_are_one_clear_error(pixels, match):
    model, _ = tiny_model()
    with pytest.raises(ValueError, match=match):
        model(pixels)


def test_pixel_values_below_the_backbones_minimum_are_one_clear_error():
    model, size = tiny_model("efficientnet")
    minimum = model.protoquant.minimum_image_size()
    assert 1 < minimum <= size
    model(torch.randn(1, 3, minimum, minimum))  # the minimum itself works
    with pytest.raises(ValueError, match=rf"2x2 are too small for this backbone.*at least {minimum}x{minimum}"):
        model(torch.randn(1, 3, 2, 2))


def test_bad_pixel_size_for_token_model():
    model, _ = tiny_model("vit")
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model(torch.randn(1, 3, 30, 32))


def test_labels_out_of_range():
    model, size = tiny_model()
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        model(torch.randn(2, 3, size, size), labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        model(torch.randn(2, 3, size, size), labels=torch.tensor([-1, 0]))
    # -100 is the library's ignore index, not an error.
    assert torch.isfinite(model(torch.randn(2, 3, size, size), labels=torch.tensor([-100, 1])).loss)


def test_config_validation_messages():
    with pytest.raises(Exception, match="num_concepts must be >= 1"):
        ProtoQuantConfig(num_concepts=0)
    with pytest.raises(Exception, match="temperature must be finite and > 0"):
        ProtoQuantConfig(temperature=0.0)
    with pytest.raises(ValueError, match="Supported families: .*resnet.*vit"):
        ProtoQuantConfig(backbone_config=BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="use -1"):
        ProtoQuantConfig(backbone_feature_layer=2)


def test_from_backbone_local_classification_checkpoint_keeps_head(tmp_path):
    backbone_config, size = tiny_backbone_config("resnet")
    backbone_config.num_labels = 5
    torch.manual_seed(1)
    source = ResNetForImageClassification(backbone_config).eval()
    source.save_pretrained(tmp_path / "resnet")
    model = ProtoQuantForImageClassification.from_backbone(str(tmp_path / "resnet"), num_concepts=4, id2label=LABELS)
    assert model.config.stage1_head_num_labels == 5 and model.config.backbone_name == str(tmp_path / "resnet")
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        # Backbone weights are the pretrained ones, and the kept head reproduces the checkpoint's logits.
        features = model.forward_features(pixels)
        torch.testing.assert_close(features, source.resnet(pixels).last_hidden_state)
        torch.testing.assert_close(model.original_head(features), source(pixels).logits)


def test_from_backbone_local_autobackbone_and_token_folders(tmp_path):
    for model_type, loader in [("dinov2", AutoModel), ("vit", ViTModel)]:
        backbone_config, size = tiny_backbone_config(model_type)
        source = loader.from_config(backbone_config) if loader is AutoModel else loader(backbone_config)
        source.save_pretrained(tmp_path / model_type)
        model = ProtoQuantForImageClassification.from_backbone(str(tmp_path / model_type), num_concepts=4, id2label=LABELS)
        assert model.config.stage1_head_num_labels == 0
        source_state = source.state_dict()
        for key, value in model.protoquant.backbone.state_dict().items():
            if key in source_state:
                torch.testing.assert_close(value, source_state[key])
        assert model(torch.randn(1, 3, size, size)).logits.shape == (1, 3)


def test_from_backbone_rejects_non_vision_model(tmp_path):
    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ValueError, match="'bert' is not supported"):
        ProtoQuantForImageClassification.from_backbone(str(tmp_path / "bert"), num_concepts=4, id2label=LABELS)


def test_aliases_resolve_through_registry(tmp_path):
    backbone_config, _ = tiny_backbone_config("resnet")
    AutoModel.from_config(backbone_config).save_pretrained(tmp_path / "r")
    protoquant_hf.register_backbone_alias("test/tiny-resnet", lambda name: str(tmp_path / "r"))
    model = ProtoQuantForImageClassification.from_backbone("test/tiny-resnet", num_concepts=3, id2label=LABELS)
    assert model.config.backbone_name == "test/tiny-resnet"
    assert AutoConfig.from_pretrained(protoquant_hf.resolve_backbone("test/tiny-resnet")).model_type == "resnet"


def test_backbone_feature_layer_selects_that_stage():
    model, size = tiny_model("resnet", backbone_feature_layer=1)
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model.forward_features(pixels)
        stages = model.protoquant.backbone(pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(features, stages[1])  # stage 1, not the last stage
    assert features.shape[1] == model.protoquant.hidden_size == 8 != stages[-1].shape[1]
    vit, size = tiny_model("vit", backbone_feature_layer=1)
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = vit.forward_features(pixels)
        hidden = vit.protoquant.backbone(pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), hidden[1][:, 1:])
    assert not torch.allclose(features.flatten(2).transpose(1, 2), hidden[-1][:, 1:])


def test_fast_backbone_is_exact_unsaved_and_checked(tmp_path, monkeypatch):
    model, size = tiny_model("efficientnet")
    with torch.no_grad():  # random tiny weights give all-zero features; make them informative
        for name, parameter in model.protoquant.backbone.named_parameters():
            parameter.normal_(0.5 if "bn" in name or "norm" in name else 0.0, 0.3)
    pixels = torch.randn(3, 3, size, size)
    with torch.no_grad():
        eager = model.forward_features(pixels)
    assert eager.abs().max() > 0.1
    assert model.use_fast_backbone() is True
    keys = set(model.state_dict())

    def refuse(*args, **kwargs):
        raise AssertionError("the eager backbone ran")

    monkeypatch.setattr(model.protoquant.backbone, "forward", refuse)
    with torch.no_grad():
        fast = model.forward_features(pixels)
        logits = model(pixels).logits  # the whole forward takes the same path
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
    assert logits.shape == (3, 3)
    with pytest.raises(ValueError, match="NaN"):  # the model's own input checks still apply
        model(torch.full((1, 3, size, size), float("nan")))
    monkeypatch.undo()
    # Gradients to the pixels (attacks, attribution) go through the eager backbone: the copy is inference-only.
    attacked = pixels.clone().requires_grad_(True)
    model(attacked).logits.sum().backward()
    reference = pixels.clone().requires_grad_(True)
    model.use_fast_backbone(False)
    model(reference).logits.sum().backward()
    torch.testing.assert_close(attacked.grad, reference.grad)
    assert attacked.grad.abs().max() > 0
    model.use_fast_backbone()
    assert set(model.state_dict()) == keys  # never saved
    model.save_pretrained(tmp_path)
    assert ProtoQuantForImageClassification.from_pretrained(tmp_path).protoquant.__dict__["_fast_backbone"] is None
    assert model.use_fast_backbone(False) is False and model.protoquant.__dict__["_fast_backbone"] is None
    assert tiny_model("resnet")[0].use_fast_backbone() is False  # other families keep the eager backbone

    import protoquant_hf.fast_backbone as fast_backbone

    original = fast_backbone.optimize_frozen_backbone

    class Shifted(torch.nn.Module):  # a copy whose features are off by 1 %
        def __init__(self, copy):
            super().__init__()
            self.copy = copy

        def forward(self, pixel_values):
            outputs = self.copy(pixel_values)
            outputs.last_hidden_state = outputs.last_hidden_state * 1.01
            return outputs

    def broken(backbone):
        return Shifted(original(backbone))

    monkeypatch.setattr(fast_backbone, "optimize_frozen_backbone", broken)
    with pytest.raises(RuntimeError, match="differs from the eager backbone"):
        model.use_fast_backbone()
    assert model.protoquant.__dict__["_fast_backbone"] is None
