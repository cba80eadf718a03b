"""Explanations: exact contributions, boxes where planted features are, the gallery, figures, the pipeline, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from fresh_process import run_without_package
from tiny_backbones import tiny_backbone_config
from transformers import BitImageProcessor, ViTImageProcessor, pipeline

import protoquant_hf  # noqa: F401  (registers the Auto classes and pipelines)
from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification, ProtoQuantImageProcessor
from protoquant_hf.concepts import ConceptStats, prune_concepts
from protoquant_hf.data import make_image_transform
from protoquant_hf.explain import (
    ConceptGallery,
    build_gallery,
    explain,
    plot_class_sheet,
    plot_codebook_overview,
    plot_explanation,
    plot_gallery,
)
from protoquant_hf.explanation_protoquant import cell_box, percentile_box

LABELS = {0: "alpha", 1: "beta", 2: "gamma"}  # alphabetical, as an image folder's classes are


def processor_for(size: int) -> ProtoQuantImageProcessor:
    return ProtoQuantImageProcessor.wrap(
        BitImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                          image_mean=[0.5] * 3, image_std=[0.5] * 3)
    )


def tiny_model(model_type="resnet", num_concepts=6, seed=0) -> ProtoQuantForImageClassification:
    backbone_config, size = tiny_backbone_config(model_type)
    torch.manual_seed(seed)
    config = ProtoQuantConfig(backbone_config=backbone_config, num_concepts=num_concepts, image_size=size, id2label=LABELS)
    return ProtoQuantForImageClassification(config).eval()


def noise_images(count: int, size: int, seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def test_contributions_sum_to_the_logit_exactly():
    model = tiny_model()
    images = noise_images(4, 32)
    explanations = explain(model, images, processor_for(32), top_k=3, gallery=None)
    pixels = processor_for(32)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixels).logits
    for index, explanation in enumerate(explanations):
        assert explanation.contributions.dtype == np.float64 and explanation.contributions.shape == (6,)
        assert explanation.contributions.sum() == explanation.logit  # by definition, in float64
        assert explanation.logit == pytest.approx(float(logits[index, explanation.target_class]), abs=1e-5)
        assert sum(c.contribution for c in explanation.concepts) + explanation.rest == pytest.approx(explanation.logit, abs=1e-12)
        assert sum(explanation.contributions / explanation.logit) == pytest.approx(1.0, abs=1e-12)
        contributions = [c.contribution for c in explanation.concepts]
        assert contributions == sorted(contributions, reverse=True) and len(contributions) == 3
        assert explanation.predicted_class == int(logits[index].argmax())
        for evidence in explanation.concepts:
            assert evidence.contribution == pytest.approx(evidence.score * evidence.weight)
            assert evidence.share == pytest.approx(evidence.contribution / explanation.logit)
            assert 0 < evidence.score < 1 and evidence.weight > 0
            assert evidence.activation_map.shape == (4, 4) and evidence.upsampled_map.shape == (32, 32)
            assert evidence.score == pytest.approx(float(evidence.activation_map.max()), rel=1e-6)
            assert np.unravel_index(evidence.activation_map.argmax(), (4, 4)) == evidence.peak_cell
            left, top, right, bottom = evidence.box
            assert 0 <= left < right <= 32 and 0 <= top < bottom <= 32


def test_a_named_class_is_explained_instead_of_the_prediction():
    model = tiny_model()
    explanation = explain(model, noise_images(1, 32), processor_for(32), target="gamma", gallery=None)[0]
    assert explanation.target_label == "gamma" and explanation.target_class == 2
    with pytest.raises(ValueError, match="Unknown class 'zebra'.*'alpha', 'beta', 'gamma'"):
        explain(model, noise_images(1, 32), processor_for(32), target="zebra", gallery=None)
    for bad in (0, 7):
        with pytest.raises(ValueError, match=r"top_k must be in \[1, 6\]"):
            explain(model, noise_images(1, 32), processor_for(32), top_k=bad, gallery=None)


def plant(model, size: int, cell: tuple[int, int], cell_pixels: int, processor):
    """An image with one bright square at `cell`, and a codebook whose concept 0 is exactly the feature vector
    there (the others: feature vectors of other cells); class 0 is evidenced by concept 0 alone."""
    rng = np.random.default_rng(1)
    pixels = np.full((size, size, 3), 40, dtype=np.uint8) + rng.integers(0, 10, (size, size, 3), dtype=np.uint8)
    row, col = cell
    pixels[row * cell_pixels : (row + 1) * cell_pixels, col * cell_pixels : (col + 1) * cell_pixels] = 250
    image = PIL.Image.fromarray(pixels)
    with torch.no_grad():
        features = model.forward_features(processor(images=image, return_tensors="pt")["pixel_values"])[0]
    grid = features.shape[-2:]
    others = [(r, c) for r in range(grid[0]) for c in range(grid[1]) if (r, c) != cell]
    picks = [others[i] for i in np.random.default_rng(2).choice(len(others), model.config.num_concepts - 1, replace=False)]
    concepts = torch.stack([features[:, row, col]] + [features[:, r, c] for r, c in picks])
    model.codebook.concepts.data.copy_(concepts)
    weight = torch.full_like(model.classifier.weight, -1.0)
    weight[0, 0] = 5.0
    weight[1:, 1:] = 1.0
    model.classifier.weight.data.copy_(weight)
    return image, grid


@pytest.mark.parametrize("model_type", ["resnet", "vit"])
def test_planted_feature_is_found_where_it_was_planted(model_type):
    if model_type == "vit":
        model, size, cell_pixels, cell = tiny_model("vit"), 32, 8, (2, 1)  # patch 8: a 4x4 grid
        processor = ProtoQuantImageProcessor.wrap(ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3))
    else:
        model, size, cell = tiny_model("resnet"), 96, (5, 7)
        processor = processor_for(96)
        with torch.no_grad():
            cell_pixels = 96 // model.forward_features(torch.zeros(1, 3, 96, 96)).shape[-1]  # 8: a 12x12 grid
    image, grid = plant(model, size, cell, cell_pixels, processor)
    explanation = explain(model, image, processor, target="alpha", top_k=1, gallery=None)[0]
    evidence = explanation.concepts[0]
    assert evidence.concept == 0 and evidence.peak_cell == cell
    assert evidence.similarity == pytest.approx(1.0, abs=1e-5)
    planted = (cell[1] * cell_pixels, cell[0] * cell_pixels, (cell[1] + 1) * cell_pixels, (cell[0] + 1) * cell_pixels)
    if model_type == "vit":
        assert evidence.box == planted  # the patch grid is exact
        assert explanation.box_rule == "patch"
    else:
        assert explanation.box_rule == "pipnet"
        left, top, right, bottom = evidence.box
        assert right - left == bottom - top == 32  # PIP-Net's 32-px patch
        assert left <= planted[0] and top <= planted[1] and planted[2] <= right and planted[3] <= bottom
        protopnet = explain(model, image, processor, target="alpha", top_k=1, box_rule="protopnet", gallery=None)[0]
        left, top, right, bottom = protopnet.concepts[0].box
        centre = ((planted[0] + planted[2]) / 2, (planted[1] + planted[3]) / 2)
        assert left <= centre[0] <= right and top <= centre[1] <= bottom


def test_box_rules_by_hand():
    # PIP-Net: 7x7 grid at 224 px: 32-px boxes 32 px apart; the last cell snaps to the border.
    assert cell_box((0, 0), (7, 7), (224, 224), "pipnet") == (0, 0, 32, 32)
    assert cell_box((3, 2), (7, 7), (224, 224), "pipnet") == (64, 96, 96, 128)
    assert cell_box((6, 6), (7, 7), (224, 224), "pipnet") == (192, 192, 224, 224)
    # 14x14 (ViT-like grid) at 224: stride round(192 / 13) = 15, last snapped.
    assert cell_box((1, 13), (14, 14), (224, 224), "pipnet") == (192, 15, 224, 47)
    assert cell_box((1, 2), (4, 4), (64, 64), "patch", patch_size=16) == (32, 16, 48, 32)
    heat = np.linspace(0, 0.5, 400).reshape(20, 20)
    heat[5:9, 10:15] = 1.0  # 20 of 400 pixels: the top 5 %
    assert percentile_box(heat) == (10, 5, 15, 9)


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    import datasets

    images = noise_images(10, 40, seed=3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(LABELS.values()))})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(10)]}, features=features)


def test_gallery_patches_are_the_nearest_patches_cut_where_they_are(train_split):
    model, processor = tiny_model(), processor_for(32)
    gallery, stats = build_gallery(model, train_split, processor, per_concept=3, thumb_size=16, show_progress=False)
    # The nearest patches are those of a ConceptStats pass (tested against brute force in test_concepts).
    transform = make_image_transform(processor)
    with torch.no_grad():
        maps = model.forward_features(transform(train_split[:10])["pixel_values"])
    reference = ConceptStats.collect(model, [(maps, torch.tensor(train_split["label"]))], top_n=3)
    assert np.array_equal(gallery.rows, reference.top_rows.numpy()) and np.array_equal(gallery.cells, reference.top_cells.numpy())
    np.testing.assert_allclose(gallery.scores, reference.top_scores.numpy(), rtol=1e-6)
    # Each thumbnail is its box cut from the processed training image.
    for concept, slot in ((0, 0), (5, 2)):
        row, box = int(gallery.rows[concept, slot]), tuple(gallery.boxes[concept, slot])
        assert box == cell_box(tuple(gallery.cells[concept, slot]), (4, 4), (32, 32), "pipnet")
        from protoquant_hf.explanation_protoquant import pixels_to_image

        image = PIL.Image.fromarray(pixels_to_image(transform(train_split[row : row + 1])["pixel_values"][0], [0.5] * 3, [0.5] * 3))
        expected = np.asarray(image.crop(box).resize((16, 16), PIL.Image.BICUBIC))
        assert np.array_equal(np.asarray(gallery.thumbnails[concept][slot]), expected)
    assert gallery.info["box_rule"] == "pipnet" and gallery.info["per_concept"] == 3


def test_gallery_uses_the_stats_it_is_given(train_split):
    """The main job hands the gallery the stats of its grounding pass instead of collecting them again."""
    model, processor = tiny_model(), processor_for(32)
    transform = make_image_transform(processor)
    with torch.no_grad():
        maps = model.forward_features(transform(train_split[:5])["pixel_values"])
    first_five = ConceptStats.collect(model, [(maps, torch.tensor(train_split["label"][:5]))], top_n=3)
    gallery, stats = build_gallery(model, train_split, processor, per_concept=3, stats=first_five, show_progress=False)
    assert stats is first_five and np.array_equal(gallery.rows, first_five.top_rows.numpy())
    collected, _ = build_gallery(model, train_split, processor, per_concept=3, show_progress=False)
    assert collected.rows.max() >= 5  # a pass of its own would reach the other five images
    with pytest.raises(ValueError, match="keep 3 patches for 6 concepts; the gallery needs 2.*top_n=2"):
        build_gallery(model, train_split, processor, per_concept=2, stats=first_five, show_progress=False)


def smooth_split():
    """Images with smooth content (gradients and a disc), where JPEG thumbnails are faithful (noise is not)."""
    import datasets

    grid = np.mgrid[0:40, 0:40].astype(float)
    images = []
    for index in range(6):
        disc = ((grid[0] - 10 - 3 * index) ** 2 + (grid[1] - 20) ** 2 < 60)[..., None]
        pixels = np.stack([grid[0] * 5, grid[1] * 5, np.full((40, 40), 40.0 * index)], -1) * (1 - disc) + 230 * disc
        images.append(PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(LABELS.values()))})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(6)]}, features=features)


def test_gallery_round_trips_and_refuses_another_codebook(tmp_path):
    model, processor = tiny_model(), processor_for(32)
    gallery, _ = build_gallery(model, smooth_split(), processor, per_concept=2, show_progress=False)
    gallery.save(tmp_path)
    loaded = ConceptGallery.load(tmp_path)
    for name in ("scores", "rows", "cells", "boxes"):
        assert np.array_equal(getattr(loaded, name), getattr(gallery, name)), name
    difference = np.abs(np.asarray(loaded.thumbnails[1][0], dtype=int) - np.asarray(gallery.thumbnails[1][0], dtype=int))
    assert difference.mean() < 3  # JPEG thumbnails, close to the originals
    loaded.check_matches(model)
    edited = tiny_model()
    with torch.no_grad():
        edited.codebook.concepts[0] += 1
    with pytest.raises(ValueError, match="other concept vectors"):
        loaded.check_matches(edited)
    prune_concepts(edited, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="6 concepts but the model has 3.*another codebook"):
        loaded.check_matches(edited)
    with pytest.raises(FileNotFoundError, match="no concept gallery.*protoquant gallery --model"):
        ConceptGallery.load(tmp_path / "elsewhere")


def test_figures_are_written_at_a_readable_size(train_split, tmp_path):
    model, processor = tiny_model(), processor_for(32)
    gallery, stats = build_gallery(model, train_split, processor, per_concept=4, show_progress=False)
    explanation = explain(model, noise_images(1, 32), processor, gallery=gallery)[0]
    plot_explanation(explanation, tmp_path / "explanation.png")
    plot_gallery(gallery, usage=stats.usage.numpy(), path=tmp_path / "gallery.png")
    plot_class_sheet(model, gallery, 0, path=tmp_path / "class.png")
    plot_codebook_overview(model, stats, tmp_path / "overview.png")
    for name, (min_width, min_height) in {
        "explanation.png": (800, 400), "gallery.png": (400, 500), "class.png": (400, 500), "overview.png": (900, 600),
    }.items():
        with PIL.Image.open(tmp_path / name) as image:
            width, height = image.size
            assert width >= min_width and height >= min_height, (name, image.size)
            assert width <= 3000 and height <= 3000, (name, image.size)
            assert np.asarray(image.convert("L")).std() > 10  # not blank
    with pytest.raises(ValueError, match="Page 5 is empty"):
        plot_gallery(gallery, page=5)


@pytest.fixture(scope="module")
def folder(train_split, tmp_path_factory):
    model, processor = tiny_model(), processor_for(32)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    build_gallery(model, train_split, processor, per_concept=2, show_progress=False)[0].save(path)
    return path


def test_concept_explanation_pipeline_in_the_package(folder):
    explainer = pipeline("concept-explanation", model=str(folder))
    result = explainer(noise_images(1, 32)[0], top_concepts=2, figure=True)
    reference = explain(ProtoQuantForImageClassification.from_pretrained(folder), noise_images(1, 32), ProtoQuantImageProcessor.from_pretrained(folder))[0]
    assert result["predicted_label"] == reference.predicted_label
    assert [c["concept"] for c in result["concepts"]] == [c.concept for c in reference.concepts[:2]]
    assert result["logit"] == pytest.approx(reference.logit)
    assert all(len(patches) == 2 for patches in result["gallery"].values())
    assert isinstance(result["figure"], PIL.Image.Image) and result["figure"].size[0] > 100
    classify = pipeline("image-classification", model=str(folder))  # the same folder still classifies
    assert classify(noise_images(1, 32)[0])[0]["label"] == reference.predicted_label


def test_concept_explanation_pipeline_in_a_fresh_process(folder, tmp_path):
    image_path = tmp_path / "image.png"
    noise_images(1, 32)[0].save(image_path)
    reference = explain(ProtoQuantForImageClassification.from_pretrained(folder), str(image_path), ProtoQuantImageProcessor.from_pretrained(folder))[0]
    expected = {"label": reference.predicted_label, "concepts": [c.concept for c in reference.concepts], "logit": reference.logit}
    script = (
        f"""
        import json
        from transformers import pipeline
        explainer = pipeline("concept-explanation", model={str(folder)!r}, trust_remote_code=True)
        assert type(explainer).__module__.startswith("transformers_modules"), type(explainer).__module__
        result = explainer({str(image_path)!r})
        expected = {json.dumps(expected)}
        assert result["predicted_label"] == expected["label"], result["predicted_label"]
        assert [c["concept"] for c in result["concepts"]] == expected["concepts"]
        assert abs(result["logit"] - expected["logit"]) < 1e-6
        assert sum(len(p) for p in result["gallery"].values()) == 2 * len(expected["concepts"])
        print("EXPLAIN-OK")
        """
    )
    result = run_without_package(script, tmp_path)
    assert "EXPLAIN-OK" in result.stdout, result.stderr[-3000:]


def test_a_model_without_gallery_still_explains_and_names_the_command(tmp_path, caplog):
    model, processor = tiny_model(), processor_for(32)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = ProtoQuantForImageClassification.from_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        explanation = explain(loaded, noise_images(1, 32), processor)[0]
    assert "no concept gallery" in caplog.text and "protoquant gallery --model" in caplog.text
    assert explanation.gallery == {} and explanation.concepts


def cli(*argv, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "protoquant_hf", *argv], capture_output=True, text=True, timeout=600, cwd=cwd,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def test_cli_explain_and_gallery_end_to_end(folder, train_split, tmp_path):
    images = tmp_path / "images"
    for index, image in enumerate(noise_images(2, 32)):
        (images / LABELS[index]).mkdir(parents=True, exist_ok=True)
        image.save(images / LABELS[index] / f"{index}.png")
    (images / "gamma").mkdir()
    noise_images(1, 32, seed=9)[0].save(images / "gamma" / "2.png")
    result = cli("explain", str(images / "alpha" / "0.png"), str(images / "beta" / "1.png"),
                 "--model", str(folder), "--output_dir", str(tmp_path / "out"), "--top_k", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "out" / "explanations.json").read_text())
    assert len(records) == 2 and len(records[0]["concepts"]) == 2
    assert all((tmp_path / "out" / record["figure"]).is_file() for record in records)
    total = sum(c["contribution"] for c in records[0]["concepts"]) + records[0]["rest"]
    assert total == pytest.approx(records[0]["logit"])

    # A gallery from a dataset folder, into a new folder; the model folder is untouched.
    before = sorted(p.name for p in folder.iterdir())
    result = cli("gallery", "--model", str(folder), "--dataset", str(images), "--per_concept", "1",
                 "--output_dir", str(tmp_path / "with-gallery"), "--disable_tqdm")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == before
    made = tmp_path / "with-gallery"
    assert (made / "gallery" / "index.json").is_file() and (made / "figures" / "overview.png").is_file()
    assert ConceptGallery.load(made).info["per_concept"] == 1



def cli_in_process(capsys, *argv) -> tuple[int, str]:
    """The CLI's main() in this process (the end-to-end test above runs it as a command)."""
    from protoquant_hf.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["missing.png"], "No such image file: missing.png"),
        (["notes.txt"], "notes.txt is not an image file"),
        (["image.png", "--class", "zebra"], "Unknown class 'zebra'"),
        (["image.png", "--top_k", "0"], r"top_k must be in \[1, 6\]"),
    ],
)
def test_cli_explain_bad_inputs(folder, tmp_path, monkeypatch, capsys, argv, match):
    import re

    monkeypatch.chdir(tmp_path)
    noise_images(1, 32)[0].save(tmp_path / "image.png")
    (tmp_path / "notes.txt").write_text("not an image")
    code, err = cli_in_process(capsys, "explain", *argv, "--model", str(folder), "--output_dir", str(tmp_path / "out"))
    assert code == 2 and re.search(match, err), err[-2000:]
    assert not (tmp_path / "out").exists()


def test_cli_explain_never_replaces_a_users_folder(folder, tmp_path, capsys):
    noise_images(1, 32)[0].save(tmp_path / "image.png")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    argv = ["explain", str(tmp_path / "image.png"), "--model", str(folder)]
    for extra in ([], ["--overwrite"]):
        code, err = cli_in_process(capsys, *argv, "--output_dir", str(mine), *extra)
        assert code == 2 and "is not a folder written by `protoquant explain`" in err and "also with --overwrite" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    # Its own earlier output is replaced only when asked.
    out = str(tmp_path / "out")
    assert cli_in_process(capsys, *argv, "--output_dir", out)[0] == 0
    code, err = cli_in_process(capsys, *argv, "--output_dir", out)
    assert code == 2 and "holds explanations already. Pass --overwrite" in err
    (tmp_path / "out" / "explanations.json").write_text("[]")
    assert cli_in_process(capsys, *argv, "--output_dir", out, "--overwrite")[0] == 0
    assert len(json.loads((tmp_path / "out" / "explanations.json").read_text())) == 1


def test_cli_explain_refuses_a_gallery_of_another_codebook(folder, tmp_path, capsys):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    model = ProtoQuantForImageClassification.from_pretrained(edited)
    with torch.no_grad():
        model.codebook.concepts[0] += 1
    model.save_pretrained(edited)
    noise_images(1, 32)[0].save(tmp_path / "image.png")
    code, err = cli_in_process(capsys, "explain", str(tmp_path / "image.png"), "--model", str(edited), "--output_dir", str(tmp_path / "out"))
    assert code == 2 and "other concept vectors" in err
    assert not (tmp_path / "out").exists()


def test_cli_gallery_needs_a_destination(folder, tmp_path, capsys):
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        cli_in_process(capsys, "gallery", "--model", str(folder), "--dataset", str(tmp_path))
    assert exit_info.value.code == 2
    assert "one of the arguments --output_dir --in_place is required" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_cli_gallery_never_replaces_a_users_folder(folder, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    code, err = cli_in_process(capsys, "gallery", "--model", str(folder), "--dataset", str(tmp_path),
                               "--output_dir", str(mine), "--overwrite")
    assert code == 2 and "is not a ProtoQuant model folder" in err and "also with --overwrite" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
