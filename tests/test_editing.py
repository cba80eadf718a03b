"""Pruning and editing a model: what each edit changes and what it leaves alone, the edit log saved with the model,
and `protoquant prune` / `protoquant edit` writing a new folder (never the input)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from tiny_backbones import tiny_backbone_config
from transformers import BitImageProcessor

from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification, ProtoQuantImageProcessor
from protoquant_hf.concepts import (
    disable_concept,
    edit_log,
    edit_model,
    keep_top_k_per_class,
    remove_unused_concepts,
    scale_weight,
    set_weight,
)
from protoquant_hf.explain import ConceptGallery, build_gallery
from protoquant_hf.hub import render_model_card

LABELS = {0: "alpha", 1: "beta", 2: "gamma"}


def tiny_model(num_concepts=6, seed=0) -> ProtoQuantForImageClassification:
    backbone_config, size = tiny_backbone_config("resnet")
    torch.manual_seed(seed)
    config = ProtoQuantConfig(backbone_config=backbone_config, num_concepts=num_concepts, image_size=size, id2label=LABELS)
    model = ProtoQuantForImageClassification(config).eval()
    with torch.no_grad():  # a head with real zeros and negatives, as after training
        model.classifier.weight.copy_(torch.randn(3, num_concepts))
    return model


def feature_maps(seed=1, batch=4) -> torch.Tensor:
    return torch.randn(batch, 16, 2, 2, generator=torch.Generator().manual_seed(seed)).relu()


def outputs(model, maps):
    with torch.no_grad():
        return model(feature_maps=maps, output_activation_maps=True, output_concept_contributions=True)


def test_disabling_a_concept_removes_exactly_its_contribution():
    model, maps = tiny_model(), feature_maps()
    before = outputs(model, maps)
    disable_concept(model, 2, class_index=1)
    after = outputs(model, maps)
    torch.testing.assert_close(after.concept_scores, before.concept_scores)  # the concept is still in the softmax
    expected = before.logits.clone()
    expected[:, 1] -= before.concept_contributions[:, 1, 2]
    torch.testing.assert_close(after.logits, expected)
    disable_concept(model, 4)  # every class
    assert (model.classifier.weight[:, 4] == 0).all() and model.classifier.weight[0, 2] != 0


def test_set_and_scale_weight_change_one_entry_or_one_column():
    model = tiny_model()
    weight = model.classifier.weight.detach().clone()
    set_weight(model, 0, 3, 2.5)
    scale_weight(model, 1, 0.5)
    scale_weight(model, 5, 3.0, class_index=2)
    expected = weight.clone()
    expected[0, 3] = 2.5
    expected[:, 1] *= 0.5
    expected[2, 5] *= 3.0
    torch.testing.assert_close(model.classifier.weight.detach(), expected)


def test_top_k_masking_keeps_the_remaining_path_and_physical_removal_renormalises_the_softmax():
    model, maps = tiny_model(), feature_maps()
    before = outputs(model, maps)
    keep_top_k_per_class(model, 2)
    weight = model.classifier.weight.detach()
    assert ((weight > 0).sum(dim=1) <= 2).all()
    masked = outputs(model, maps)
    # Masking: every logit is exactly the sum of the kept concepts' original contributions.
    kept = (weight > 0).unsqueeze(0)
    torch.testing.assert_close(masked.logits, (before.concept_contributions * kept).sum(-1))
    used = (weight > 0).any(dim=0)
    removed = remove_unused_concepts(model)
    assert removed == int((~used).sum()) > 0 and model.config.num_concepts == int(used.sum())
    pruned = outputs(model, maps)
    # Physical removal cannot keep the logits: the softmax now runs over fewer concepts, and each location's
    # remaining activations are the old ones renormalised to sum to 1.
    old = before.activation_maps[:, used]
    torch.testing.assert_close(pruned.activation_maps, old / old.sum(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pruned.logits, masked.logits)
    assert (pruned.concept_scores >= before.concept_scores[:, used] - 1e-6).all()


@pytest.mark.parametrize(
    "operation, arguments, message",
    [
        ("disable_concept", {"concept_index": 6}, r"concept_index must be in \[0, 5\]"),
        ("disable_concept", {"concept_index": 0, "class_index": "delta"}, "Unknown class 'delta'"),
        ("set_weight", {"class_index": 0, "concept_index": 0, "value": -1.0}, "finite and >= 0"),
        ("scale_weight", {"concept_index": 0, "factor": float("nan")}, "finite and >= 0"),
        ("keep_top_k_per_class", {"k": 0}, r"k must be in \[1, 6\]"),
        ("prune_to", {"num_concepts": 0, "usage": lambda m: torch.ones(6)}, r"target_num_concepts must be in \[1, 6\]"),
        ("rename_concept", {}, "Unknown edit 'rename_concept'"),
    ],
)
def test_a_bad_edit_is_one_clear_error_and_changes_nothing(operation, arguments, message):
    model = tiny_model()
    weight = model.classifier.weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        edit_model(model, operation, **arguments)
    assert torch.equal(model.classifier.weight.detach(), weight) and not model.config.edit_log


def test_the_edit_log_records_each_edit_and_round_trips_through_save_and_load(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.classifier.weight[1, 1] = 0.7  # used by beta: disabling it changes one weight
    positive = model.classifier.weight.detach() > 0
    positive[1, 1] = False
    beyond_top_2 = int((positive.sum(dim=1) - 2).clamp_min(0).sum())
    accuracies = iter([0.5, 0.25, 0.75])
    first = edit_model(model, "disable_concept", concept_index=1, class_index="beta", reason="spurious background",
                       evaluate=lambda m: next(accuracies), eval_set="held-out")
    second = edit_model(model, "keep_top_k_per_class", k=2, evaluate=lambda m: next(accuracies),
                        accuracy_before=first.accuracy_after)
    assert first.arguments == {"concept_index": 1, "class_index": 1, "class_label": "beta"}
    assert (first.accuracy_before, first.accuracy_after, second.accuracy_before, second.accuracy_after) == (0.5, 0.25, 0.25, 0.75)
    assert first.reason == "spurious background" and second.reason is None
    assert first.weights_changed == 1 and second.weights_changed == beyond_top_2 > 0
    assert edit_model(model, "disable_concept", concept_index=1, class_index=1).weights_changed == 0  # already off
    edit_log_before_save = edit_log(model)
    model.save_pretrained(tmp_path)
    reloaded = ProtoQuantForImageClassification.from_pretrained(tmp_path)
    assert edit_log(reloaded) == edit_log_before_save and edit_log(reloaded)[:2] == [first, second]
    assert json.loads((tmp_path / "config.json").read_text())["edit_log"][0]["operation"] == "disable_concept"


# ---- protoquant prune / protoquant edit on a model folder -----------------------------------------------------


def noise_image(rng, size=32) -> PIL.Image.Image:
    return PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 3)):
        for name in LABELS.values():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise_image(rng).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, image_folder) -> Path:
    from protoquant_hf import load_image_dataset

    model = tiny_model()
    processor = ProtoQuantImageProcessor.wrap(BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3))
    path = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    train = load_image_dataset(str(image_folder))["train"]
    build_gallery(model, train, processor, per_concept=2, show_progress=False)[0].save(path)
    (path / "figures").mkdir()
    (path / "figures" / "overview.png").write_bytes(b"stale")
    return path


def folder_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args):
    """`protoquant ARGS` in this process (the CLI is a thin layer: one real subprocess run is enough, below)."""
    import contextlib
    import io

    from protoquant_hf.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse errors
            code = exit.code
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def test_cli_prune_writes_a_new_pruned_folder_with_its_log_and_gallery(model_folder, image_folder, tmp_path):
    before = folder_digest(model_folder)
    out = tmp_path / "pruned"
    result = cli("prune", "--model", str(model_folder), "--output_dir", str(out), "--top_k_per_class", "1",
                 "--remove_unused", "--dataset", str(image_folder), "--reason", "smaller explanations", "--disable_tqdm")
    assert result.returncode == 0, result.stderr
    assert folder_digest(model_folder) == before  # the input is never modified
    pruned = ProtoQuantForImageClassification.from_pretrained(out)
    original = ProtoQuantForImageClassification.from_pretrained(model_folder)
    assert 1 <= pruned.config.num_concepts <= 3 and ((pruned.classifier.weight > 0).sum(dim=1) <= 1).all()
    records = edit_log(pruned)
    assert [r.operation for r in records] == ["keep_top_k_per_class", "remove_unused_concepts"]
    assert records[1].num_concepts_before == 6 and records[1].num_concepts_after == pruned.config.num_concepts
    assert all(r.reason == "smaller explanations" and r.accuracy_after is not None for r in records)
    assert records[1].accuracy_before == records[0].accuracy_after
    assert f"{records[0].accuracy_before:.4f} before, {records[1].accuracy_after:.4f} after" in result.stdout
    # The gallery follows the kept concepts: each one's patches are the original gallery's row for that concept.
    gallery, original_gallery = ConceptGallery.load(out), ConceptGallery.load(model_folder)
    gallery.check_matches(pruned)
    rows = [next(i for i, c in enumerate(original.codebook.concepts) if torch.equal(c, k)) for k in pruned.codebook.concepts]
    assert np.array_equal(gallery.rows, original_gallery.rows[rows])
    assert not (out / "figures").exists() and "figures/ showed the unedited model" in result.stdout
    card = render_model_card(pruned, out).text
    assert "smaller explanations" in card  # the edit log, with the accuracy the edited model has now
    assert f"| accuracy after the edits | {records[-1].accuracy_after:.4f} (on {records[-1].eval_set}) |" in card


def test_cli_edit_disables_a_concept_for_a_class_by_name(model_folder, tmp_path):
    out = tmp_path / "edited"
    result = cli("edit", "--model", str(model_folder), "--output_dir", str(out), "--disable_concept", "2",
                 "--for_class", "gamma", "--set_weight", "alpha", "0", "1.5")
    assert result.returncode == 0, result.stderr
    original = ProtoQuantForImageClassification.from_pretrained(model_folder).classifier.weight.detach()
    edited = ProtoQuantForImageClassification.from_pretrained(out).classifier.weight.detach()
    expected = original.clone()
    expected[2, 2], expected[0, 0] = 0.0, 1.5
    torch.testing.assert_close(edited, expected)
    ConceptGallery.load(out).check_matches(ProtoQuantForImageClassification.from_pretrained(out))


@pytest.mark.parametrize(
    "args, message",
    [
        (["edit", "--disable_concept", "9"], r"concept_index must be in \[0, 5\]"),
        (["edit", "--disable_concept", "0", "--for_class", "delta"], "Unknown class 'delta'"),
        (["prune", "--prune_to", "0", "--dataset", "IMAGES"], r"target_num_concepts must be in \[1, 6\]"),
        (["prune", "--prune_to", "3"], "pass --dataset"),
        (["prune", "--top_k_per_class", "1", "--dataset", "digits"], "are not the model's"),
    ],
)
def test_cli_a_bad_edit_fails_before_any_work_and_writes_nothing(model_folder, image_folder, tmp_path, args, message):
    out = tmp_path / "out"
    args = [str(image_folder) if a == "IMAGES" else a for a in args]
    result = cli(args[0], "--model", str(model_folder), "--output_dir", str(out), *args[1:])
    assert result.returncode == 2 and message.replace("\\", "") in result.stderr.replace("\\", ""), result.stderr
    assert result.stderr.count("error") == 1
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_cli_never_writes_into_the_model_folder(model_folder):
    before = folder_digest(model_folder)
    result = subprocess.run(
        [sys.executable, "-m", "protoquant_hf", "edit", "--model", str(model_folder), "--output_dir", str(model_folder),
         "--disable_concept", "0"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "written to a new folder" in result.stderr
    assert folder_digest(model_folder) == before


def test_cli_prune_and_edit_need_something_to_do(model_folder, tmp_path):
    for command in ("prune", "edit"):
        result = cli(command, "--model", str(model_folder), "--output_dir", str(tmp_path / "out"))
        assert result.returncode == 2 and "nothing to do" in result.stderr
