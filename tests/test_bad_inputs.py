"""Every bad input is one clear error, before any expensive work, with nothing left behind."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_backbones import tiny_backbone_config
from transformers import AutoModel, BertConfig, BertModel, BitImageProcessor, HfArgumentParser

from protoquant_hf.training import DataArguments, ModelArguments, ProtoQuantTrainingArguments, train_protoquant

REPO = Path(__file__).resolve().parents[1]


def parse(*argv: str):
    parser = HfArgumentParser((DataArguments, ModelArguments, ProtoQuantTrainingArguments))
    return parser.parse_args_into_dataclasses(args=list(argv))


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--temperature", "inf"], "--temperature must be finite and > 0"),
        (["--temperature", "0"], "--temperature must be finite and > 0"),
        (["--warmup_ratio", "-1"], r"--warmup_ratio must be in \[0, 1\)"),
        (["--warmup_ratio", "1"], r"--warmup_ratio must be in \[0, 1\)"),
        (["--image_size", "0"], "--image_size must be a positive number of pixels"),
        (["--image_size", "-3"], "--image_size must be a positive number of pixels"),
        (["--max_samples_per_split", "0"], "--max_samples_per_split must be >= 2"),
        (["--prune_to", "0"], "--prune_to must be >= 1"),
        (["--l1_lambda", "nan"], "--l1_lambda must be finite"),
        (["--stage2_lr", "0"], "--stage2_lr must be finite and > 0"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--kmeans_max_vectors", "0"], "--kmeans_max_vectors must be >= 1"),
        (["--mixed_precision", "fp8"], "--mixed_precision must be no, bf16 or fp16"),
        (["--feature_dtype", "int8"], "--feature_dtype must be float16 or float32"),
        (["--bad_images", "ignore"], "--bad_images must be 'error' or 'skip'"),
        (["--log_level", "loud"], "--log_level must be one of"),
        (["--num_concepts", "0"], "--num_concepts must be >= 1"),
        (["--overwrite", "--resume"], "contradict"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    ],
)
def test_arguments_are_validated_where_they_are_parsed(argv, match):
    with pytest.raises(ValueError, match=match):
        parse(*argv)


def test_cli_reports_a_bad_argument_in_one_line_and_writes_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "protoquant_hf", "train", "--output_dir", str(tmp_path / "out"), "--prune_to", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 2
    assert "--prune_to must be >= 1" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def run(image_folder, backbone, tmp_path, image_size=32):
    return train_protoquant(
        DataArguments(dataset=str(image_folder), image_size=image_size, cache_dir=str(tmp_path / "cache")),
        ModelArguments(backbone=str(backbone), num_concepts=2),
        ProtoQuantTrainingArguments(output_dir=str(tmp_path / "out"), disable_tqdm=True),
    )


def nothing_written(tmp_path) -> bool:
    return not (tmp_path / "cache").exists() and not (tmp_path / "out").exists() and not (tmp_path / ".out.incomplete").exists()


def test_unsupported_backbone_family_is_named_before_data_loading(image_folder, tmp_path, monkeypatch):
    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).save_pretrained(tmp_path / "bert")
    import protoquant_hf.job as job

    monkeypatch.setattr(job, "load_dataset_for", lambda *a: pytest.fail("the dataset was loaded"))
    with pytest.raises(ValueError, match="'bert' is not supported.*Supported families"):
        run(image_folder, tmp_path / "bert", tmp_path)
    assert nothing_written(tmp_path)


def test_backbone_folder_without_config_says_so(image_folder, tmp_path):
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="needs a transformers config.json"):
        run(image_folder, tmp_path / "weights-only", tmp_path)
    assert nothing_written(tmp_path)


def test_backbone_without_image_processor_says_so(image_folder, tmp_path):
    config, _ = tiny_backbone_config("resnet")
    AutoModel.from_config(config).save_pretrained(tmp_path / "no-processor")
    with pytest.raises(ValueError, match="no usable image processor"):
        run(image_folder, tmp_path / "no-processor", tmp_path)
    assert nothing_written(tmp_path)


def test_image_size_below_the_backbones_minimum(image_folder, tmp_path):
    config, _ = tiny_backbone_config("efficientnet")
    AutoModel.from_config(config).save_pretrained(tmp_path / "effnet")
    BitImageProcessor().save_pretrained(tmp_path / "effnet")
    with pytest.raises(ValueError, match=r"--image_size 8 is too small for the backbone .* needs at least \d+ px"):
        run(image_folder, tmp_path / "effnet", tmp_path, image_size=8)
    assert nothing_written(tmp_path)


def test_kmeans_error_names_the_sample_limit(image_folder, tmp_path):
    config, _ = tiny_backbone_config("resnet")
    AutoModel.from_config(config).save_pretrained(tmp_path / "resnet")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "resnet")
    with pytest.raises(ValueError, match="--kmeans_max_vectors 4 .*raise it"):
        train_protoquant(
            DataArguments(dataset=str(image_folder), image_size=32, cache_dir=str(tmp_path / "cache")),
            ModelArguments(backbone=str(tmp_path / "resnet"), num_concepts=6),
            ProtoQuantTrainingArguments(output_dir=str(tmp_path / "out"), disable_tqdm=True, kmeans_max_vectors=4, concept_init="kmeans"),
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.incomplete").exists()


def test_a_held_out_test_split_is_reported_in_the_summary(image_folder, tmp_path):
    config, _ = tiny_backbone_config("resnet")
    AutoModel.from_config(config).save_pretrained(tmp_path / "resnet")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "resnet")
    summary = train_protoquant(
        DataArguments(dataset=str(image_folder), image_size=32, cache_dir=str(tmp_path / "cache")),
        ModelArguments(backbone=str(tmp_path / "resnet"), num_concepts=2),
        ProtoQuantTrainingArguments(output_dir=str(tmp_path / "out"), disable_tqdm=True, stage1_epochs=1,
                                    stage2_epochs=1, top_k_per_class=None, kmeans_iterations=2, explain_test_images=0,
                                    hub_bundle=False),
    )
    assert "held out" in summary.dataset.test_split  # the image folder has no test/ split
    from protoquant_hf.cli import format_summary

    assert "test split" in format_summary(summary, str(tmp_path / "out")) and "held out" in format_summary(summary, "x")
