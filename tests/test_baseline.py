"""The non-quantized baseline (`--concept_training free`): trained by the same job on the same backbone, it is the
same model class with the same outputs, so every metric, explanation and pipeline runs on it unchanged."""

import numpy as np
import pytest
import torch
from test_training import _pattern, backbone_folder, image_folder, run_args  # noqa: F401 (fixtures)
from transformers import AutoModelForImageClassification, pipeline

from protoquant_hf.explain import explain
from protoquant_hf.hub import render_model_card
from protoquant_hf.training import TrainingSummary, train_protoquant


@pytest.fixture(scope="module")
def baseline(image_folder, backbone_folder, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("runs") / "baseline"
    summary = train_protoquant(*run_args(
        image_folder, backbone_folder, output, concept_training="free", top_k_per_class=2, stage1_lr=0.05))
    return output, summary


def test_the_baseline_trains_free_prototypes_jointly_with_the_same_budget(baseline):
    output, summary = baseline
    assert TrainingSummary.load(output) == summary
    # No quantization: no codebook stage and no stage-1 usage pruning; the same epochs go to joint training.
    assert list(summary.phases) == ["init", "probe", "stage2", "sparsify", "grounding", "gallery"]
    assert summary.phases["init"].method == "orthogonal"
    training = summary.arguments["training"]
    assert summary.phases["stage2"].epochs == training["stage1_epochs"] + training["stage2_epochs"] == 6
    model = AutoModelForImageClassification.from_pretrained(output)
    assert model.config.concept_training == "free"
    # The prototypes moved away from their orthonormal random start (they are trained, not k-means centroids).
    concepts = torch.nn.functional.normalize(model.codebook.concepts.detach(), dim=1)
    assert not torch.allclose(concepts @ concepts.T, torch.eye(len(concepts)), atol=1e-2)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["classifier.weight"]


def test_the_baseline_has_protoquants_forward_contract(baseline):
    output, _ = baseline
    model = AutoModelForImageClassification.from_pretrained(output).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixels, output_activation_maps=True, output_similarity_maps=True, output_concept_contributions=True)
        as_tuple = model(pixels, return_dict=False)
    torch.testing.assert_close(out.concept_contributions.sum(-1), out.logits)
    torch.testing.assert_close(out.activation_maps.sum(1), torch.ones_like(out.activation_maps[:, 0]))
    torch.testing.assert_close(out.activation_maps.amax(dim=(2, 3)), out.concept_scores)
    torch.testing.assert_close(as_tuple[0], out.logits)
    image = _pattern(0, np.random.default_rng(1))
    assert pipeline("image-classification", model=str(output))(image)[0]["label"] in {"horizontal", "vertical", "checker"}
    explanation = explain(model, [image], top_k=2)[0]
    assert explanation.logit == pytest.approx(float(explanation.contributions.sum()))


def test_the_baseline_card_says_what_it_is(baseline):
    output, _ = baseline
    text = render_model_card(AutoModelForImageClassification.from_pretrained(output), output,
                             summary=TrainingSummary.load(output)).text
    assert "non-quantized baseline" in text and "concept_training | free" in text.replace("`", "")
