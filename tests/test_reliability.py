"""Never lose a user's files, never save a silently wrong model: output-folder safety, kill -9 while finishing,
concurrent runs on one new cache."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_backbones import tiny_backbone_config
from transformers import AutoModel, BitImageProcessor

from protoquant_hf import ProtoQuantForImageClassification
from protoquant_hf.training import DataArguments, ModelArguments, ProtoQuantTrainingArguments, TrainingSummary, train_protoquant

SIZE = 32


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for kind, name in enumerate(("dark", "bright")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                base = 40 if kind == 0 else 200
                pixels = np.clip(base + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("backbone")
    config, _ = tiny_backbone_config("resnet")
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def train_command(image_folder, backbone_folder, cache, *extra) -> list[str]:
    """`protoquant train` with the settings of `api_args`."""
    return [
        sys.executable, "-m", "protoquant_hf", "train", "--dataset", str(image_folder), "--backbone", str(backbone_folder),
        "--image_size", str(SIZE), "--num_concepts", "4", "--feature_dtype", "float32", "--stage1_epochs", "1",
        "--stage2_epochs", "2", "--top_k_per_class", "0", "--kmeans_iterations", "3", "--batch_size", "8",
        "--cache_dir", str(cache), "--disable_tqdm", "--explain_test_images", "0", "--hub_bundle", "False", *extra,
    ]


def cli(image_folder, backbone_folder, cache, *extra, env=None, cwd=None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    command = train_command(image_folder, backbone_folder, cache, *extra)
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, cwd=cwd)


def api_args(image_folder, backbone_folder, output_dir, cache, **training):
    return (
        DataArguments(dataset=str(image_folder), image_size=SIZE, feature_dtype="float32", cache_dir=str(cache)),
        ModelArguments(backbone=str(backbone_folder), num_concepts=4),
        ProtoQuantTrainingArguments(
            output_dir=str(output_dir), batch_size=8, stage1_epochs=1, stage2_epochs=2, kmeans_iterations=3,
            top_k_per_class=None, disable_tqdm=True, explain_test_images=0, hub_bundle=False, **training,
        ),
    )


def weights(folder) -> torch.Tensor:
    return ProtoQuantForImageClassification.from_pretrained(folder).classifier.weight.detach()


@pytest.fixture(scope="module")
def reference(image_folder, backbone_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train_protoquant(*api_args(image_folder, backbone_folder, out, out.parent / "cache"))
    return out


# ---- --overwrite and unsafe output folders --------------------------------------------------------------


@pytest.mark.parametrize("target", [".", "..", "~", "/", "cwd-parent", "cache-parent"])
def test_unsafe_output_folders_are_refused_before_anything_happens(image_folder, backbone_folder, tmp_path, monkeypatch, target):
    work_dir = tmp_path / "project" / "sub"
    work_dir.mkdir(parents=True)
    (work_dir / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work_dir)
    monkeypatch.setenv("HOME", str(tmp_path / "project"))
    cache = tmp_path / "caches" / "features"
    output = {"cwd-parent": str(tmp_path / "project"), "cache-parent": str(tmp_path / "caches")}.get(target, target)
    data, model, training = api_args(image_folder, backbone_folder, output, cache, overwrite=True)
    with pytest.raises(ValueError, match="never uses such a folder as an output folder"):
        train_protoquant(data, model, training)
    assert (work_dir / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in work_dir.iterdir()) == ["notes.txt"]
    assert not cache.exists()  # refused before any feature extraction


def test_overwrite_refuses_a_folder_that_is_not_a_previous_run(image_folder, backbone_folder, tmp_path):
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not a protoquant training run.*also with --overwrite"):
        train_protoquant(*api_args(image_folder, backbone_folder, user_folder, tmp_path / "cache", overwrite=True))
    assert [p.name for p in user_folder.iterdir()] == ["thesis.tex"]
    assert not (tmp_path / "cache").exists()


def test_overwrite_replaces_a_previous_run_only_after_success(image_folder, backbone_folder, tmp_path, reference):
    previous = tmp_path / "run"
    train_protoquant(*api_args(image_folder, backbone_folder, previous, tmp_path / "cache"))
    before = weights(previous)
    (previous / "my-notes.txt").write_text("part of the old run folder")

    def fail(stage, epoch):
        raise RuntimeError("simulated failure during stage 2")

    data, model, training = api_args(image_folder, backbone_folder, previous, tmp_path / "cache", overwrite=True, seed=7)
    with pytest.raises(RuntimeError, match="simulated"):
        train_protoquant(data, model, training, on_epoch_end=lambda stage, epoch: stage == "stage2" and fail(stage, epoch))
    torch.testing.assert_close(weights(previous), before)  # a failed --overwrite leaves the previous model intact
    train_protoquant(*api_args(image_folder, backbone_folder, previous, tmp_path / "cache", overwrite=True, seed=7))
    assert not torch.equal(weights(previous), before)
    assert not (previous / "my-notes.txt").exists()  # the old run was replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # nothing aside, nothing incomplete


def test_unwritable_output_folder_is_found_before_data_loading(image_folder, backbone_folder, tmp_path):
    with pytest.raises(ValueError, match="Cannot write the output folder.*not writable"):
        train_protoquant(*api_args(image_folder, backbone_folder, "/proc/protoquant/run", tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


# ---- kill -9 while finishing ----------------------------------------------------------------------------


def test_kill_after_marking_complete_is_finished_by_a_plain_rerun(image_folder, backbone_folder, tmp_path, reference):
    out = tmp_path / "run"
    killed = cli(image_folder, backbone_folder, tmp_path / "cache", "--output_dir", str(out), env={"PROTOQUANT_CRASH_AT": "complete"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists() and (tmp_path / ".run.incomplete" / ".complete").is_file()
    rerun = cli(image_folder, backbone_folder, tmp_path / "cache", "--output_dir", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    torch.testing.assert_close(weights(out), weights(reference))
    assert not (tmp_path / ".run.incomplete").exists()
    assert not {"checkpoint", "progress.json", ".complete"} & {p.name for p in out.iterdir()}


def test_kill_before_marking_complete_is_finished_by_resume(image_folder, backbone_folder, tmp_path, reference):
    out = tmp_path / "run"
    killed = cli(image_folder, backbone_folder, tmp_path / "cache", "--output_dir", str(out), env={"PROTOQUANT_CRASH_AT": "before-complete"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    plain = cli(image_folder, backbone_folder, tmp_path / "cache", "--output_dir", str(out))
    assert plain.returncode == 2 and "--resume" in plain.stderr
    resumed = cli(image_folder, backbone_folder, tmp_path / "cache", "--output_dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    torch.testing.assert_close(weights(out), weights(reference))


def test_kill_in_the_middle_of_an_overwrite_keeps_a_complete_model(image_folder, backbone_folder, tmp_path, reference):
    out = tmp_path / "run"
    first = cli(image_folder, backbone_folder, tmp_path / "cache", "--output_dir", str(out), "--seed", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    old = weights(out)
    killed = cli(
        image_folder, backbone_folder, tmp_path / "cache", "--output_dir", str(out), "--overwrite",
        env={"PROTOQUANT_CRASH_AT": "replaced-aside"},
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    aside = tmp_path / ".run.replaced"
    torch.testing.assert_close(weights(aside), old)  # the previous model is still whole, just aside
    rerun = cli(image_folder, backbone_folder, tmp_path / "cache", "--output_dir", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    torch.testing.assert_close(weights(out), weights(reference))  # the new run (seed 42, as the reference)
    assert not aside.exists()


# ---- concurrent runs --------------------------------------------------------------------------------------


def test_two_runs_on_one_new_cache_give_the_same_correct_model(image_folder, backbone_folder, tmp_path, reference):
    cache = tmp_path / "shared-cache"
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    runs = []
    for name in ("a", "b"):
        command = train_command(image_folder, backbone_folder, cache, "--output_dir", str(tmp_path / name))
        runs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment))
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
    torch.testing.assert_close(weights(tmp_path / "a"), weights(reference))
    torch.testing.assert_close(weights(tmp_path / "b"), weights(reference))
    summaries = [TrainingSummary.load(tmp_path / name) for name in ("a", "b")]
    assert summaries[0].accuracy == summaries[1].accuracy == TrainingSummary.load(reference).accuracy


# ---- two processes writing one output folder ------------------------------------------------------------


def test_a_folder_being_written_is_refused_to_every_other_writer(image_folder, backbone_folder, tmp_path, reference, monkeypatch):
    """While a process writes a folder (it holds the folder's lock), a training run, explanations, a gallery and a
    bundle into it are refused before anything is written; every spelling of the folder is the same folder."""
    from protoquant_hf.explain.model_folder import add_gallery, explain_to_folder
    from protoquant_hf.hub import export_bundle
    from protoquant_hf.output_folder import write_lock

    monkeypatch.chdir(tmp_path)
    busy = "Another protoquant process is writing .*out right now"
    with write_lock(tmp_path / "out"):
        with pytest.raises(ValueError, match=busy):
            train_protoquant(*api_args(image_folder, backbone_folder, "./out", tmp_path / "cache"))
        with pytest.raises(ValueError, match=busy):
            explain_to_folder(["image.png"], reference, "out")
        with pytest.raises(ValueError, match=busy):
            add_gallery(reference, str(image_folder), output_dir="sub/../out")
        with pytest.raises(ValueError, match=busy):
            export_bundle(reference, tmp_path / "out")
    with write_lock(reference):  # e.g. a training run finishing there
        with pytest.raises(ValueError, match="Another protoquant process is writing"):
            add_gallery(reference, str(image_folder), in_place=True)
    assert list(tmp_path.iterdir()) == []  # no output, no work folder, no feature cache
    train_protoquant(*api_args(image_folder, backbone_folder, "out", tmp_path / "cache"))  # free once released
    torch.testing.assert_close(weights(tmp_path / "out"), weights(reference))


def test_two_runs_into_one_new_folder_give_one_run_and_one_clear_error(image_folder, backbone_folder, tmp_path, reference):
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    command = train_command(image_folder, backbone_folder, tmp_path / "cache", "--output_dir", str(tmp_path / "out"))
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment) for _ in range(2)]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 2], errors
    refused = errors[[run.returncode for run in runs].index(2)]
    # Refused while the other one runs, or (if it started after the other finished) for the finished run.
    assert "Another protoquant process is writing" in refused or "holds a previous training run" in refused, refused
    torch.testing.assert_close(weights(tmp_path / "out"), weights(reference))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]  # nothing incomplete left


@pytest.mark.parametrize("outcome", ["success", "error"])
def test_protoquant_train_destroys_its_process_group_before_exit(monkeypatch, tmp_path, outcome):
    """A gloo process group left to interpreter teardown can abort a finished 2-process run ("terminate called without
    an active exception", exit code 134); the command that owns the process ends it, also after an error."""
    from accelerate import PartialState

    import protoquant_hf.cli as cli
    import protoquant_hf.job as job
    import protoquant_hf.training as training

    destroyed = []
    monkeypatch.setattr(PartialState, "destroy_process_group", lambda self, group=None: destroyed.append(group))

    def fake_job(*_):
        if outcome == "error":
            raise ValueError("bad dataset")
        return "summary"

    monkeypatch.setattr(training, "train_protoquant", fake_job)
    monkeypatch.setattr(job, "check_saved_model", lambda *_: {})
    monkeypatch.setattr(cli, "format_summary", lambda *_: "")
    assert cli.train(["--output_dir", str(tmp_path / "out")]) == (0 if outcome == "success" else 2)
    assert destroyed == [None]
