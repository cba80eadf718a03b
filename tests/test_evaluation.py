"""`evaluate_model` / `protoquant evaluate`: the report is the metrics of the model's own outputs on the split, bad
input is refused before any work, and the output folder is new (or the command's own)."""

import json

import numpy as np
import pytest
import torch
from test_editing import cli, image_folder, model_folder, tiny_model  # noqa: F401 (fixtures)

from protoquant_hf import ProtoQuantForImageClassification, ProtoQuantImageProcessor, load_image_dataset
from protoquant_hf.data import make_image_transform
from protoquant_hf.metrics import explanation_size
from protoquant_hf.metrics.evaluation import EvaluationReport, EvaluationSettings, evaluate_model, keypoints_to_input


def test_the_report_holds_the_metrics_of_the_models_own_outputs(model_folder, image_folder):  # noqa: F811
    model = ProtoQuantForImageClassification.from_pretrained(model_folder).eval()
    processor = ProtoQuantImageProcessor.from_pretrained(model_folder)
    dataset = load_image_dataset(str(image_folder))
    report = evaluate_model(model, dataset, processor, EvaluationSettings(top_ks=(1, 2, 6, 50)), show_progress=False)
    batch = make_image_transform(processor)(dataset["test"][:])
    with torch.no_grad():
        scores = model(batch["pixel_values"]).concept_scores
    expected = explanation_size(scores, model.classifier.weight, batch["labels"], ks=(1, 2, 6)).to_dict()
    assert report.size.keys() == expected.keys()
    for key, value in expected.items():  # the cache is float16, the direct forward float32
        if key == "top_k_curve":
            assert [p["k"] for p in report.size[key]] == [1, 2, 6]  # k > K is left out
            assert [p["accuracy"] for p in report.size[key]] == pytest.approx([p["accuracy"] for p in value], abs=1 / 9)
        else:
            assert report.size[key] == pytest.approx(value, abs=1 / 9 if key == "accuracy" else 0.2), key
    assert report.num_images == 9 and report.misalignment is None and report.purity is None
    assert -1 <= report.grounding["min"] <= report.grounding["mean"] <= 1
    assert EvaluationReport.from_json(report.to_json()) == report
    markdown = report.to_markdown()
    assert f"| accuracy | {report.size['accuracy']:.4f} |" in markdown and "| 6 |" in markdown


def test_the_report_leads_with_the_non_zero_count_and_reads_reports_of_earlier_versions():
    weight = torch.tensor([[0.001, 0.6, 0.1], [-0.5, 0.4, 0.3]], dtype=torch.float64)
    scores = torch.tensor([[0.9, 0.002, 0.5], [0.0005, 0.2, 0.8], [0.3, 0.7, 0.001]], dtype=torch.float64)
    size = explanation_size(scores, weight, torch.tensor([1, 1, 0])).to_dict()
    report = EvaluationReport(model="m", dataset="d", split="test", num_images=3, size=size)
    rows = dict(report.rows())
    names = [name for name in rows if "concepts per class" in name]
    assert names == ["concepts per class (non-zero weights)", "concepts per class holding 95 % of the weight",
                     "local size, the paper's count (concepts per class with ReLU(W) > 0.1)"]
    assert [rows[name] for name in names] == ["mean 2.5, min 2, max 3", "mean 2.0, min 2, max 2", "mean 1.5, min 1, max 2"]
    # An evaluation.json written before the scale-invariant sizes: only the paper's count, nothing invented.
    old = {key: value for key, value in size.items() if not key.startswith(("nonzero_size", "mass95_size"))}
    old_rows = dict(EvaluationReport.from_json(json.dumps({**json.loads(report.to_json()), "size": old})).rows())
    assert [name for name in old_rows if "concepts per class" in name] == names[2:]


def test_keypoints_follow_the_processors_resize_and_centre_crop():
    # 64 x 48 (w x h) → shortest edge 48 → 32: scale 2/3, width 42.67, 5.33 px cropped on the left.
    parts = [{"part": 0, "keypoint": [32.0, 24.0]}, {"part": 1, "keypoint": [3.0, 10.0]}, {"part": 2, "keypoint": [50.0, 47.0]}, {"part": 3, "keypoint": [60.0, 20.0]}]
    mapped = keypoints_to_input(parts, (64, 48), 32)
    assert [p["part"] for p in mapped] == [0, 2]  # parts 1 and 3 lie in the cropped-away strips
    np.testing.assert_allclose(mapped[0]["keypoint"], [16.0, 16.0], atol=1e-6)
    np.testing.assert_allclose(mapped[1]["keypoint"], [50 * 2 / 3 - 16 / 3, 47 * 2 / 3], atol=1e-6)


def test_bad_inputs_are_refused_before_any_work(image_folder):  # noqa: F811
    model = tiny_model()
    dataset = load_image_dataset(str(image_folder))
    processor = None  # never reached: every check comes first
    with pytest.raises(ValueError, match="no 'validation' split"):
        evaluate_model(model, dataset, processor, EvaluationSettings(split="validation"))
    with pytest.raises(ValueError, match="--purity needs part annotations"):
        evaluate_model(model, dataset, processor, EvaluationSettings(purity=True))
    model.config.id2label = {0: "alpha", 1: "beta", 2: "delta"}
    with pytest.raises(ValueError, match="are not the model's"):
        evaluate_model(model, dataset, processor)
    with pytest.raises(ValueError, match="stability_images must be >= 1"):
        EvaluationSettings(stability_images=0)


def test_cli_evaluate_writes_a_new_folder_and_never_replaces_a_users(model_folder, image_folder, tmp_path):  # noqa: F811
    out = tmp_path / "evaluation"
    result = cli("evaluate", "--model", str(model_folder), "--dataset", str(image_folder), "--output_dir", str(out),
                 "--stability", "--iterations", "2", "--stability_images", "4", "--disable_tqdm")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "evaluation.json").read_text())
    assert report["settings"]["stability_image_count"] == 4 and report["settings"]["iterations"] == 2
    assert {"mean_pac", "mean_prc", "mean_plc", "ac"} <= set(report["misalignment"])
    assert 0 <= report["noise"]["location_stability"] <= 100
    assert (out / "accuracy_vs_top_k.png").stat().st_size > 5000 and "PAC" in (out / "evaluation.md").read_text()
    assert "PAC (activation change" in result.stdout
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):
        result = cli("evaluate", "--model", str(model_folder), "--dataset", str(image_folder), "--output_dir", str(user), *extra)
        assert result.returncode == 2 and (user / "notes.txt").read_text() == "keep"
    result = cli("evaluate", "--model", str(model_folder), "--dataset", str(image_folder), "--output_dir", str(out), "--overwrite",
                 "--disable_tqdm")
    assert result.returncode == 0 and json.loads((out / "evaluation.json").read_text())["misalignment"] is None
