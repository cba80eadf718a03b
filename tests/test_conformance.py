"""ProtoQuant behaves like a transformers image classifier: each check runs on a stock
`ViTForImageClassification` too, so a failure says where we differ from the library."""

import json

import pytest
import torch
from tiny_backbones import tiny_backbone_config
from transformers import (
    AutoModelForImageClassification,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import protoquant_hf  # noqa: F401  (registers the Auto classes)
from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification

SIZE = 32


def stock_vit(num_labels: int = 3, **config_kwargs):
    backbone_config, _ = tiny_backbone_config("vit")
    config = ViTConfig(**{**backbone_config.to_dict(), "num_labels": num_labels, **config_kwargs})
    torch.manual_seed(0)
    return ViTForImageClassification(config)


def protoquant(num_labels: int = 3, **config_kwargs):
    backbone_config, _ = tiny_backbone_config("vit")
    config = ProtoQuantConfig(
        backbone_config=backbone_config, num_concepts=6, image_size=SIZE,
        id2label={i: f"class{i}" for i in range(num_labels)}, **config_kwargs,
    )
    torch.manual_seed(0)
    return ProtoQuantForImageClassification(config)


MODELS = {"stock-vit": stock_vit, "protoquant": protoquant}


@pytest.fixture(params=sorted(MODELS))
def make_model(request):
    return MODELS[request.param]


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_return_dict_false_gives_a_tuple(make_model):
    model = make_model().eval()
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = model(pixels(), labels=labels)
        as_tuple = model(pixels(), labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)


def test_config_return_dict_false_gives_a_tuple():
    # (The stock ViTForImageClassification of transformers 5.24 crashes here: its encoder returns a
    # tuple that the classifier then reads as an output object.)
    model = protoquant().eval()
    with torch.no_grad():
        expected = model(pixels()).logits
        model.config.return_dict = False
        without_labels = model(pixels())
        base = model.protoquant(pixels())
    assert isinstance(without_labels, tuple) and isinstance(base, tuple)
    torch.testing.assert_close(without_labels[0], expected)


def test_generic_output_keywords_are_accepted(make_model):
    model = make_model(attn_implementation="eager").eval()  # sdpa cannot return attention weights
    with torch.no_grad():
        out = model(pixels(), output_hidden_states=True, output_attentions=True)
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else 2
    assert out.hidden_states is not None and len(out.hidden_states) == layers + 1
    assert out.attentions is not None and len(out.attentions) == layers
    assert out.attentions[0].shape[:2] == (2, 2)  # (batch, heads, tokens, tokens)


@pytest.mark.parametrize("problem", ["single", "multi_label", "regression"])
def test_problem_types_use_the_library_loss(make_model, problem):
    if problem == "regression":
        model = make_model(num_labels=1).eval()
        labels = torch.tensor([0.5, -1.0])
    else:
        model = make_model().eval()
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]) if problem == "multi_label" else torch.tensor([2, 0])
    with torch.no_grad():
        out = model(pixels(), labels=labels)
    logits = out.logits
    expected = {
        "single": lambda: torch.nn.functional.cross_entropy(logits, labels),
        "multi_label": lambda: torch.nn.functional.binary_cross_entropy_with_logits(logits, labels),
        "regression": lambda: torch.nn.functional.mse_loss(logits.squeeze(), labels),
    }[problem]()
    torch.testing.assert_close(out.loss, expected)
    inferred = {"single": "single_label_classification", "multi_label": "multi_label_classification", "regression": "regression"}
    assert model.config.problem_type == inferred[problem]


def test_explicit_problem_type_is_respected(make_model):
    model = make_model(problem_type="multi_label_classification").eval()
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with torch.no_grad():
        out = model(pixels(), labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels))


def test_mismatched_sizes_raise_the_library_error(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["id2label"] = {str(i): f"class{i}" for i in range(5)}
    config["label2id"] = {f"class{i}": i for i in range(5)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes|do not match"):
        AutoModelForImageClassification.from_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert loaded.config.num_labels == 5


def test_every_extra_output_is_ignored_at_inference():
    from protoquant_hf.modeling_protoquant import ProtoQuantImageClassifierOutput, ProtoQuantQuantizedOutput

    fields = set(ProtoQuantImageClassifierOutput.__dataclass_fields__) | set(ProtoQuantQuantizedOutput.__dataclass_fields__)
    assert set(ProtoQuantConfig.keys_to_ignore_at_inference) == fields - {"loss", "logits"}


def test_loading_leaves_exactly_the_head_trainable(tmp_path):
    """transformers re-creates loaded tensors as trainable: every load path must freeze again."""
    expected = ["classifier.weight"]
    model = protoquant()
    model.set_stage1_head(torch.nn.Linear(32, 4))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == expected
    model.save_pretrained(tmp_path / "saved")
    for loader in (ProtoQuantForImageClassification, AutoModelForImageClassification):
        loaded = loader.from_pretrained(tmp_path / "saved")
        assert [n for n, p in loaded.named_parameters() if p.requires_grad] == expected, loader
    backbone_config, _ = tiny_backbone_config("resnet")
    backbone_config.num_labels = 5
    ResNetForImageClassification(backbone_config).save_pretrained(tmp_path / "resnet")
    built = ProtoQuantForImageClassification.from_backbone(str(tmp_path / "resnet"), num_concepts=4, id2label={0: "a", 1: "b"})
    assert built.original_head is not None
    assert [n for n, p in built.named_parameters() if p.requires_grad] == expected


def test_saved_config_has_no_local_backbone_path_or_backbone_labels(tmp_path):
    backbone_config, _ = tiny_backbone_config("resnet")
    backbone_config.id2label = {i: f"imagenet class {i}" for i in range(1000)}
    ResNetForImageClassification(backbone_config).save_pretrained(tmp_path / "resnet")
    model = ProtoQuantForImageClassification.from_backbone(str(tmp_path / "resnet"), num_concepts=4, id2label={0: "a", 1: "b"})
    assert model.config.backbone_config._name_or_path  # in memory it knows where it came from
    model.save_pretrained(tmp_path / "model")
    text = (tmp_path / "model" / "config.json").read_text()
    saved = json.loads(text)
    assert "_name_or_path" not in saved["backbone_config"]
    assert "id2label" not in saved["backbone_config"] and "imagenet class" not in text
    assert str(tmp_path) not in json.dumps(saved["backbone_config"])
    assert saved["backbone_name"] == str(tmp_path / "resnet")  # provenance stays
    assert len(text) < 4000
    reloaded = ProtoQuantForImageClassification.from_pretrained(tmp_path / "model")
    assert reloaded.config.backbone_config.model_type == "resnet"


def test_auto_map_records_both_model_classes_and_the_processor(tmp_path):
    protoquant().save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_protoquant.ProtoQuantConfig",
        "AutoModel": "modeling_protoquant.ProtoQuantModel",
        "AutoModelForImageClassification": "modeling_protoquant.ProtoQuantForImageClassification",
        "AutoImageProcessor": "image_processing_protoquant.ProtoQuantImageProcessor",
    }
