"""Training and serving convert images the same way: the saved image processor is the training one."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from fresh_process import run_without_package
from tiny_backbones import tiny_backbone_config
from transformers import AutoImageProcessor, BitImageProcessor, pipeline

import protoquant_hf  # noqa: F401  (registers the Auto classes)
from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification, ProtoQuantImageProcessor
from protoquant_hf.data import make_image_transform

SIZE = 32
LABELS = {0: "a", 1: "b", 2: "c"}


def images() -> dict[str, PIL.Image.Image]:
    """Inputs whose naive RGB conversion differs from training's (transparency, 16 bits, CMYK)."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (40, 36, 4), dtype=np.uint8)
    rgba[:20, :, 3] = 0  # the top half fully transparent, over random colours
    la = np.stack([rng.integers(0, 255, (30, 30)), np.where(np.arange(30)[None, :] < 15, 0, 255).repeat(30, 0)], -1)
    palette = PIL.Image.fromarray(rng.integers(0, 4, (24, 24), dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.info["transparency"] = 1  # palette index 1 (red) is transparent
    return {
        "RGBA": PIL.Image.fromarray(rgba, mode="RGBA"),
        "LA": PIL.Image.fromarray(la.astype(np.uint8), mode="LA"),
        "P-transparent": palette,
        "I;16": PIL.Image.fromarray(np.full((20, 20), 30000, dtype=np.uint16)),
        "CMYK": PIL.Image.fromarray(rng.integers(0, 255, (20, 28, 4), dtype=np.uint8), mode="CMYK"),
        "transparent": PIL.Image.new("RGBA", (16, 16), (0, 0, 0, 0)),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    backbone_config, _ = tiny_backbone_config("resnet")
    torch.manual_seed(0)
    model = ProtoQuantForImageClassification(
        ProtoQuantConfig(backbone_config=backbone_config, num_concepts=6, image_size=SIZE, id2label=LABELS)
    ).eval()
    processor = ProtoQuantImageProcessor.wrap(
        BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                          image_mean=[0.5] * 3, image_std=[0.5] * 3)
    )
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def training_logits(folder, image) -> torch.Tensor:
    """What the training job computes for an image: its dataset transform, then the model."""
    model = ProtoQuantForImageClassification.from_pretrained(folder).eval()
    transform = make_image_transform(ProtoQuantImageProcessor.from_pretrained(folder))
    with torch.no_grad():
        return model(transform({"image": [image]})["pixel_values"]).logits[0]


def pipeline_logits(classify, image) -> torch.Tensor:
    results = classify(image, function_to_apply="none", top_k=len(LABELS))
    by_label = {result["label"]: result["score"] for result in results}
    return torch.tensor([by_label[LABELS[i]] for i in range(len(LABELS))])


def test_saved_processor_is_protoquant_and_reports_the_training_size(folder):
    processor = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(processor, ProtoQuantImageProcessor)
    assert processor.size["shortest_edge"] == SIZE and processor.crop_size["height"] == SIZE
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["backbone_processor"]["size"] == {"shortest_edge": SIZE}
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoImageProcessor"] == "image_processing_protoquant.ProtoQuantImageProcessor"
    assert (folder / "image_processing_protoquant.py").is_file()


@pytest.mark.parametrize("mode", sorted(images()))
def test_pipeline_logits_equal_training_logits(folder, mode):
    image = images()[mode]
    classify = pipeline("image-classification", model=str(folder))
    torch.testing.assert_close(pipeline_logits(classify, image), training_logits(folder, image), rtol=1e-5, atol=1e-6)


def test_transparency_is_white_in_training_and_serving(folder):
    transparent, white = images()["transparent"], PIL.Image.new("RGB", (16, 16), (255, 255, 255))
    classify = pipeline("image-classification", model=str(folder))
    torch.testing.assert_close(pipeline_logits(classify, transparent), pipeline_logits(classify, white))
    black = PIL.Image.new("RGB", (16, 16), (0, 0, 0))
    assert not torch.allclose(pipeline_logits(classify, transparent), pipeline_logits(classify, black))


def test_other_models_keep_the_stock_pipeline_behaviour(tmp_path):
    """The pipeline that replaces the stock one changes nothing for a model with an ordinary processor."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8, num_labels=3)).save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path))
    image = images()["RGBA"]
    plain = classify(image.convert("RGB"), function_to_apply="none", top_k=3)  # what the stock pipeline feeds it
    assert classify(image, function_to_apply="none", top_k=3) == plain


def test_tiny_images_are_refused_in_both(folder):
    tiny = PIL.Image.new("RGB", (1, 1), (10, 20, 30))
    classify = pipeline("image-classification", model=str(folder))
    with pytest.raises(ValueError, match="1x1 px.*at least 8 px"):
        classify(tiny)
    with pytest.raises(ValueError, match="1x1 px.*at least 8 px"):
        training_logits(folder, tiny)


def test_remote_code_pipeline_converts_like_training(folder, tmp_path):
    """A fresh process without this package: the folder's own processor code gives the training logits."""
    expected = {}
    for mode, image in images().items():
        image.save(tmp_path / f"{mode}.{'tiff' if mode == 'CMYK' else 'png'}")
        expected[mode] = training_logits(folder, image).tolist()
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    script = (
        f"""
        import json
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, pipeline
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        classify = pipeline("image-classification", model={str(folder)!r}, trust_remote_code=True)
        assert type(classify).__name__ == "ProtoQuantImageClassificationPipeline", type(classify)
        assert type(classify).__module__.startswith("transformers_modules"), type(classify).__module__
        expected = json.load(open({str(tmp_path / "expected.json")!r}))
        labels = {LABELS!r}
        for mode, logits in expected.items():
            path = {str(tmp_path)!r} + "/" + mode + (".tiff" if mode == "CMYK" else ".png")
            results = classify(Image.open(path), function_to_apply="none", top_k=3)
            by_label = {{r["label"]: r["score"] for r in results}}
            got = [by_label[labels[i]] for i in range(3)]
            assert max(abs(a - b) for a, b in zip(got, logits)) < 1e-5, (mode, got, logits)
        try:
            classify(Image.new("RGB", (1, 1)))
            raise SystemExit("a 1x1 image was accepted")
        except ValueError as error:
            assert "at least 8 px" in str(error), error
        print("PARITY-OK")
        """
    )
    result = run_without_package(script, tmp_path)
    assert "PARITY-OK" in result.stdout, result.stderr[-3000:]
