"""Publishing: the bundle, its card, one-commit uploads (HfApi mocked), the fresh-process load, the demo app."""

import ast
import json
import socket
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from fresh_process import run_without_package
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from tiny_backbones import tiny_backbone_config
from transformers import BitImageProcessor

from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification, ProtoQuantImageProcessor
from protoquant_hf.concepts import GroundingSummary, UsageSummary
from protoquant_hf.hub import REMOTE_CODE_FILES, export_bundle, push_bundle, render_model_card
from protoquant_hf.training.summary import (
    CodebookResult,
    ConceptsPerClass,
    DatasetInfo,
    GroundingResult,
    HeadResult,
    ProbeResult,
    TrainingSummary,
)

LABELS = {0: "alpha", 1: "beta", 2: "gamma"}
PER_CLASS = ConceptsPerClass(nonzero_mean=4.5, nonzero_max=6, mass95_mean=2.5, mass95_max=3, paper_mean=3.5, paper_max=5)


def summary(with_optional: bool = True) -> TrainingSummary:
    phases = {
        "probe": ProbeResult(head="linear_probe", accuracy=0.9123),
        "stage2": HeadResult(accuracy=0.8765, num_concepts=6, concepts_per_class=PER_CLASS, epochs=4),
    }
    if with_optional:
        phases["stage1"] = CodebookResult(accuracy=0.8001, usage=UsageSummary(6, 0, 0.0, 40, 12.0), epochs=2)
        phases["grounding"] = GroundingResult(grounding=GroundingSummary(mean=0.9345, min=0.7012))
    return TrainingSummary(
        dataset=DatasetInfo(name="user/some-dataset", classes=list(LABELS.values()), train_size=30, test_size=9,
                            image_size=32, feature_map=[16, 4, 4]),
        phases=phases, total_s=12.0,
        arguments={"training": {"stage2_lr": 0.3, "l1_lambda": 1e-4, "seed": 0}, "model": {"num_concepts": 6}},
    )


def trained_folder(path: Path, stage1_labels: int = 1000, with_optional: bool = True) -> Path:
    """A folder as `protoquant train` writes it, with a kept 1000-class stage-1 head (an ImageNet checkpoint's)."""
    backbone_config, size = tiny_backbone_config("resnet")
    torch.manual_seed(0)
    model = ProtoQuantForImageClassification(
        ProtoQuantConfig(backbone_config=backbone_config, num_concepts=6, image_size=size, id2label=LABELS,
                         backbone_name="microsoft/resnet-tiny-test")
    ).eval()
    if stage1_labels:
        model.set_stage1_head(torch.nn.Linear(16, stage1_labels))
    model.save_pretrained(path)
    ProtoQuantImageProcessor.wrap(
        BitImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ).save_pretrained(path)
    summary(with_optional).save(path)
    (path / "figures").mkdir()
    PIL.Image.new("RGB", (40, 30), "white").save(path / "figures" / "overview.png")
    return path


def test_bundle_holds_exactly_what_a_hub_repo_needs(tmp_path):
    folder = trained_folder(tmp_path / "run")
    bundle = export_bundle(folder, tmp_path / "bundle", repo_id="someone/protoquant-test")
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == sorted([
        "README.md", "app.py", "config.json", "model.safetensors", "preprocessor_config.json", "requirements.txt",
        "training_summary.json", "figures/overview.png", *REMOTE_CODE_FILES,
    ])
    config = json.loads((bundle / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoImageProcessor"}
    assert config["custom_pipelines"]["concept-explanation"]["impl"] == "pipeline_protoquant.ConceptExplanationPipeline"
    # Training-only state is dropped: the 1000 x 16 stage-1 head.
    assert config["stage1_head_num_labels"] == 0
    assert (bundle / "model.safetensors").stat().st_size < (folder / "model.safetensors").stat().st_size - 1000 * 16 * 4
    kept = export_bundle(folder, tmp_path / "with-head", include_stage1_head=True)
    assert json.loads((kept / "config.json").read_text())["stage1_head_num_labels"] == 1000
    allowed = {"torch", "transformers", "huggingface_hub", "numpy", "PIL", "safetensors", "httpx", *sys.stdlib_module_names}
    for name in REMOTE_CODE_FILES:  # remote code imports only these (transformers' own dependencies) and siblings
        tree = ast.parse((bundle / name).read_text())
        roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert roots <= allowed, (name, roots - allowed)
    modeling = (bundle / "modeling_protoquant.py").read_text()
    assert "def from_backbone" not in modeling and "_BACKBONE_ALIASES" not in modeling


def test_card_metadata_and_sections_come_from_the_summary(tmp_path):
    folder = trained_folder(tmp_path / "run")
    card = ModelCard.load(export_bundle(folder, tmp_path / "bundle", repo_id="someone/protoquant-test") / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert set(data.tags) == {"protoquant", "interpretability", "prototypes", "concept-based", "image-classification"}
    assert data.base_model == "microsoft/resnet-tiny-test" and data.datasets == ["user/some-dataset"]
    assert data.license == "apache-2.0"
    metrics = {result.metric_name: result.metric_value for result in data.eval_results}
    assert metrics["test accuracy"] == 0.8765 and metrics["linear probe accuracy (dense reference, same frozen features)"] == 0.9123
    assert metrics["grounding: min over concepts of the best cosine to a training patch"] == 0.7012
    # Concepts per class: the non-zero count is the headline, then 95 % of the weight, the paper's count last.
    per_class = [(r.metric_type, r.metric_value) for r in data.eval_results if "concepts_per_class" in r.metric_type]
    assert per_class == [("nonzero_concepts_per_class", 4.5), ("concepts_per_class_95_weight", 2.5),
                         ("paper_concepts_per_class", 3.5)]
    assert "| concepts per class (non-zero weights), mean | 4.5 (max 6) |" in card.text
    assert "| concepts per class holding 95 % of the weight, mean | 2.5 (max 3) |" in card.text
    assert "| concepts per class, the paper's count (ReLU(W) > 0.1), mean | 3.5 (max 5) |" in card.text
    assert all(result.dataset_type == "user/some-dataset" for result in data.eval_results)
    for section in ("## How to use", "## Model", "## Training procedure", "## Evaluation", "## What the model learned",
                    "## Limitations", "## Citation", "trust_remote_code=True", "someone/protoquant-test", "concept-explanation"):
        assert section in card.text, section
    assert "0.8765" in card.text and "0.961" in card.text  # accuracy and accuracy / probe, from the summary
    assert "![Codebook overview" in card.text and "## Edits" not in card.text


def test_missing_measurements_are_left_out_not_invented(tmp_path):
    folder = trained_folder(tmp_path / "run", with_optional=False)
    model = ProtoQuantForImageClassification.from_pretrained(folder)
    card = render_model_card(model, folder, repo_id="a/b", summary=TrainingSummary.load(folder))
    assert "| grounding" not in card.text and "stage-1 quantized" not in card.text
    assert {r.metric_name for r in card.data.eval_results} == {
        "test accuracy", "linear probe accuracy (dense reference, same frozen features)",
        "concepts per class (non-zero weights), mean", "concepts per class holding 95 % of the weight, mean",
        "concepts per class, the paper's count (ReLU(W) > 0.1), mean",
    }
    bare = render_model_card(model, folder, repo_id="a/b")  # no summary at all
    assert "(no measurement saved with this model)" in bare.text and bare.data.eval_results is None
    # A local backbone path never becomes base_model.
    model.config.backbone_name = str(tmp_path / "local-backbone")
    assert render_model_card(model, folder, repo_id="a/b").data.base_model is None


def test_the_card_of_an_old_summary_shows_only_the_papers_count(tmp_path):
    from test_concepts import OLD_SUMMARY

    folder = trained_folder(tmp_path / "run")
    model = ProtoQuantForImageClassification.from_pretrained(folder)
    card = render_model_card(model, folder, repo_id="a/b", summary=TrainingSummary.from_json(OLD_SUMMARY))
    assert "| concepts per class, the paper's count (ReLU(W) > 0.1), mean | 9.8 (max 10) |" in card.text
    assert "non-zero" not in card.text and "95 %" not in card.text  # not measured then: left out, not invented


def test_a_template_without_a_required_field_is_refused(tmp_path):
    folder = trained_folder(tmp_path / "run")
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ model_name }}\n{{ repo_id }}\n")
    model = ProtoQuantForImageClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match="does not use results_table"):
        render_model_card(model, folder, template_path=template)


@pytest.mark.parametrize("missing, match", [("model.safetensors", "the weights"), ("preprocessor_config.json", "image processor"),
                                            ("training_summary.json", "training summary")])
def test_incomplete_model_folders_are_refused(tmp_path, missing, match):
    folder = trained_folder(tmp_path / "run")
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=f"has no .*{match}"):
        export_bundle(folder, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_bundle_folder_safety(tmp_path):
    folder = trained_folder(tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a ProtoQuant bundle.*also with --overwrite"):
        export_bundle(folder, mine, overwrite=True)
    assert (mine / "keep.txt").read_text() == "keep me"
    export_bundle(folder, tmp_path / "bundle")
    with pytest.raises(ValueError, match="holds a bundle already.*--overwrite"):
        export_bundle(folder, tmp_path / "bundle")
    export_bundle(folder, tmp_path / "bundle", overwrite=True)


def mocked_hub():
    """HfApi with create_repo / create_branch / create_commit captured; nothing reaches the network."""
    commits = []

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        commits.append({"repo_id": repo_id, "operations": list(operations), "message": commit_message, **kwargs})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message=commit_message,
                          commit_description="", oid="1" * 40)

    patches = [
        mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}")),
        mock.patch.object(HfApi, "create_branch", autospec=True),
        mock.patch.object(HfApi, "create_commit", create_commit),
        # upload_folder asks the Hub to validate README.md's metadata: the card's is parsed offline in these tests.
        mock.patch.object(HfApi, "_validate_yaml", autospec=True),
        # The Trainer's upload_folder: its single-commit path (the xet path streams several commits).
        mock.patch("huggingface_hub.hf_api.is_xet_available", return_value=False),
    ]
    return commits, patches


def uploaded(commit) -> dict[str, bytes]:
    files = {}
    for operation in commit["operations"]:
        source = operation.path_or_fileobj
        files[operation.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    return files


def test_push_uploads_the_whole_bundle_in_one_commit(tmp_path):
    bundle = export_bundle(trained_folder(tmp_path / "run"), tmp_path / "bundle", repo_id="someone/pq")
    commits, patches = mocked_hub()
    with patches[0] as create_repo, patches[1], patches[2], patches[3], patches[4]:
        push_bundle(bundle, "someone/pq", private=True, token="hf_test")
    assert create_repo.call_args.kwargs["private"] is True
    assert len(commits) == 1
    files = uploaded(commits[0])
    expected = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert sorted(files) == expected
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: transformers" in card and "- protoquant" in card
    assert "## How to use" in card and "someone/pq" in card
    parsed = ModelCard(card).data  # valid card metadata, offline: YAML, fields and model-index parse back
    assert parsed.eval_results and parsed.eval_results[0].metric_value == 0.8765


def test_push_without_login_or_with_a_bad_id_uploads_nothing(tmp_path, monkeypatch):
    bundle = export_bundle(trained_folder(tmp_path / "run"), tmp_path / "bundle")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    commits, patches = mocked_hub()
    with patches[0] as create_repo, patches[1], patches[2], patches[3], patches[4]:
        with pytest.raises(ValueError, match="Not logged in.*hf auth login.*HF_TOKEN.*Nothing was uploaded"):
            push_bundle(bundle, "someone/pq")
        with pytest.raises(ValueError, match="not a Hub repository id"):
            push_bundle(bundle, "not a repo id", token="hf_test")
        with pytest.raises(ValueError, match="not a Hub repository id"):
            push_bundle(bundle, "no-namespace", token="hf_test")
    assert create_repo.call_count == 0 and commits == []


def test_trainer_push_to_hub_keeps_the_protoquant_card(tmp_path):
    import datasets
    from transformers import TrainingArguments

    from protoquant_hf.training import ProtoQuantTrainer, compute_accuracy, prepare_trainer_datasets

    folder = trained_folder(tmp_path / "run", stage1_labels=0)
    model = ProtoQuantForImageClassification.from_pretrained(folder)
    processor = ProtoQuantImageProcessor.from_pretrained(folder)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(LABELS.values()))})
    data = prepare_trainer_datasets(datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2] * 2}, features=features), processor)
    args = TrainingArguments(str(tmp_path / "trainer"), use_cpu=True, report_to="none", remove_unused_columns=False,
                             num_train_epochs=1, per_device_train_batch_size=6, save_strategy="no", push_to_hub=True,
                             hub_model_id="someone/pq-trainer", hub_token="hf_test", disable_tqdm=True)
    commits, patches = mocked_hub()
    with patches[0], patches[1], patches[2], patches[3], patches[4]:
        trainer = ProtoQuantTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                    processing_class=processor, compute_metrics=compute_accuracy)
        trainer.train()
        trainer.evaluate()
        trainer.push_to_hub()
    card = uploaded(commits[-1])["README.md"].decode()
    assert "- protoquant" in card and "## How to use" in card and "someone/pq-trainer" in card
    assert "generated_from_trainer" not in card  # not transformers' generic Trainer card
    assert "evaluation accuracy" in card


def test_bundle_loads_without_the_package_and_gives_the_training_logits(tmp_path):
    folder = trained_folder(tmp_path / "run")
    bundle = export_bundle(folder, tmp_path / "bundle")
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (36, 40, 4), dtype=np.uint8), mode="RGBA")
    image.save(tmp_path / "image.png")
    model = ProtoQuantForImageClassification.from_pretrained(folder).eval()
    processor = ProtoQuantImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        expected = model(**processor(images=image, return_tensors="pt")).logits[0].tolist()
    script = f"""
        import json, torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline
        folder, expected = {str(bundle)!r}, {expected!r}
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(processor).__name__ == "ProtoQuantImageProcessor"
        image = Image.open({str(tmp_path / "image.png")!r})
        with torch.no_grad():
            logits = model(**processor(images=image, return_tensors="pt")).logits[0].tolist()
            base(**processor(images=image, return_tensors="pt"))
        assert max(abs(a - b) for a, b in zip(logits, expected)) < 1e-5, (logits, expected)
        classify = pipeline("image-classification", model=folder, trust_remote_code=True)
        scores = {{r["label"]: r["score"] for r in classify(image, function_to_apply="none", top_k=3)}}
        assert max(abs(scores[l] - e) for l, e in zip({list(LABELS.values())!r}, expected)) < 1e-5, scores
        explain = pipeline("concept-explanation", model=folder, trust_remote_code=True)
        result = explain(image)
        assert abs(result["logit"] - max(expected)) < 1e-5
        print("BUNDLE-OK")
    """
    result = run_without_package(script, tmp_path)
    assert "BUNDLE-OK" in result.stdout, result.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_app_serves_the_pipelines_prediction(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file
    from transformers import pipeline

    from protoquant_hf.app import build_app

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    folder = trained_folder(tmp_path / "run", stage1_labels=0)
    image_path = tmp_path / "image.png"
    PIL.Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image_path)
    app = build_app(folder, examples=[str(image_path)])
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        label, figure, table = client.predict(handle_file(str(image_path)), api_name="/predict")
    finally:
        app.close()
    expected = pipeline("image-classification", model=str(folder))(str(image_path), top_k=1)[0]["label"]
    assert label["label"] == expected
    assert Path(figure).is_file() and PIL.Image.open(figure).size[0] > 300
    assert len(table["data"]) >= 1 and table["data"][0][0].startswith("#")


def test_app_without_gradio_names_the_install_command(tmp_path, monkeypatch, capsys):
    from protoquant_hf.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    folder = trained_folder(tmp_path / "run", stage1_labels=0)
    assert main(["app", "--model", str(folder)]) == 2
    assert "pip install 'protoquant_hf[app]'" in capsys.readouterr().err


@pytest.fixture()
def job_inputs(tmp_path):
    from transformers import AutoModel

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in LABELS.values():
        (images / name).mkdir(parents=True)
        for index in range(5):
            PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / name / f"{index}.png")
    backbone_config, _ = tiny_backbone_config("resnet")
    AutoModel.from_config(backbone_config).save_pretrained(tmp_path / "backbone")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "backbone")
    return images, tmp_path / "backbone"


def job_arguments(job_inputs, tmp_path, **training):
    from protoquant_hf.training import DataArguments, ModelArguments, ProtoQuantTrainingArguments

    images, backbone = job_inputs
    return (
        DataArguments(dataset=str(images), image_size=32, cache_dir=str(tmp_path / "cache")),
        ModelArguments(backbone=str(backbone), num_concepts=4),
        ProtoQuantTrainingArguments(output_dir=str(tmp_path / "run"), stage1_epochs=1, stage2_epochs=1, top_k_per_class=None,
                                    kmeans_iterations=2, explain_test_images=0, disable_tqdm=True, **training),
    )


def test_train_push_to_hub_uploads_the_bundle_in_one_commit(job_inputs, tmp_path, monkeypatch):
    from protoquant_hf.training import train_protoquant

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    commits, patches = mocked_hub()
    with patches[0], patches[1], patches[2], patches[3], patches[4]:
        train_protoquant(*job_arguments(job_inputs, tmp_path, push_to_hub=True, hub_model_id="someone/pq-job"))
    bundle = tmp_path / "run" / "hub"
    assert len(commits) == 1 and commits[0]["repo_id"] == "someone/pq-job"
    assert sorted(uploaded(commits[0])) == sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert "someone/pq-job" in (bundle / "README.md").read_text()


def test_train_push_to_hub_without_login_stops_before_training(job_inputs, tmp_path, monkeypatch):
    from protoquant_hf.training import train_protoquant

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="Not logged in.*hf auth login"):
        train_protoquant(*job_arguments(job_inputs, tmp_path, push_to_hub=True, hub_model_id="someone/pq-job"))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
