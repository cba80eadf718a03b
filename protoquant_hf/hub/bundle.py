"""The inference bundle (exactly what a Hub repository should hold) and its upload in one commit.

`export_bundle` writes, from a trained folder: the weights without training-only state (the frozen stage-1 head is
dropped unless asked for), `config.json` with `auto_map` (config, base model, classifier, image processor) and
`custom_pipelines` (concept-explanation), the remote-code files, the image processor, the gallery, the figures,
the training summaries, a Space-ready `app.py` + `requirements.txt`, and the model card as `README.md`.
`push_bundle` uploads such a folder with `HfApi.create_repo` + one `create_commit`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoImageProcessor, AutoModelForImageClassification

from ..backbones import quiet_transformers
from ..output_folder import check_destination, mark_complete, publish, work_folder, write_lock
from ..training.summary import SUMMARY_FILE, TrainingSummary
from .card import render_model_card

REMOTE_CODE_FILES = (
    "configuration_protoquant.py",
    "modeling_protoquant.py",
    "image_processing_protoquant.py",
    "explanation_protoquant.py",
    "pipeline_protoquant.py",
    "fast_backbone.py",
)
COPIED = ("gallery", "figures", "examples", SUMMARY_FILE, "train_log.jsonl", "edit_log.json")
SPACE_APP = '''"""A Hugging Face Space for this ProtoQuant model: upload an image, see the prediction and why."""
from protoquant_hf.app import build_app

build_app(".").launch()
'''
SPACE_REQUIREMENTS = "protoquant_hf[app]\ntorch\ntransformers\n"


def check_model_folder(folder: str | Path) -> Path:
    """One clear error naming what a trained folder lacks (weights, processor, summary)."""
    folder = Path(folder)
    needed = {
        "config.json": "the model config",
        "model.safetensors": "the weights",
        "preprocessor_config.json": "the image processor",
        SUMMARY_FILE: "the training summary (the card's numbers come from it)",
    }
    missing = [f"{name} ({what})" for name, what in needed.items() if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is not a complete trained ProtoQuant folder: it has no {', '.join(missing)}. Export the "
            "output folder of `protoquant train`."
        )
    if json.loads((folder / "config.json").read_text()).get("model_type") != "protoquant":
        raise ValueError(f"{folder}/config.json is not a ProtoQuant config.")
    return folder


def is_bundle(folder: Path) -> bool:
    """Whether `folder` is a bundle written by `export_bundle` (the only kind it replaces)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        card = (folder / "README.md").read_text()
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "protoquant" and "protoquant" in card.split("---")[1]


def export_bundle(
    model_folder: str | Path,
    output_dir: str | Path,
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    include_stage1_head: bool = False,
    overwrite: bool = False,
    template_path: str | Path | None = None,
) -> Path:
    """Write the Hub bundle of a trained folder into `output_dir` (built hidden, renamed into place when complete;
    an existing `output_dir` is replaced only if it is a bundle and `overwrite`)."""
    model_folder = check_model_folder(model_folder)
    with write_lock(output_dir):  # one process at a time writes a folder
        output_dir = check_destination(
            output_dir, overwrite=overwrite, replaceable=is_bundle, kind="a ProtoQuant bundle", existing="a bundle",
            flag="--dry_run",
        )
        summary = TrainingSummary.load(model_folder)
        with quiet_transformers():
            model = AutoModelForImageClassification.from_pretrained(model_folder)
        processor = AutoImageProcessor.from_pretrained(model_folder)
        work = work_folder(output_dir)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if not include_stage1_head and model.original_head is not None:
            # Training-only: classifying and explaining never use it (continue stage 1 with include_stage1_head).
            model.original_head = None
            model.config.stage1_head_num_labels = 0
            model.config.stage1_head_norm = False
        with quiet_transformers():
            model.save_pretrained(work)
        processor.save_pretrained(work)
        for name in COPIED:
            source = model_folder / name
            if source.is_dir():
                shutil.copytree(source, work / name)
            elif source.is_file():
                shutil.copy2(source, work / name)
        (work / "app.py").write_text(SPACE_APP)
        (work / "requirements.txt").write_text(SPACE_REQUIREMENTS)
        render_model_card(model, work, repo_id=repo_id, summary=summary, license=license, template_path=template_path).save(work / "README.md")
        missing = [name for name in REMOTE_CODE_FILES if not (work / name).is_file()]
        if missing:
            raise RuntimeError(f"The bundle lacks remote-code files {missing}; transformers did not copy them.")
        mark_complete(work)
        publish(work, output_dir, is_bundle)
        return output_dir


def check_repo_and_token(repo_id: str, token: str | None = None) -> str:
    """A valid repository id and a Hub token, or one clear error (before anything is built or uploaded)."""
    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("expected 'namespace/name'")
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a Hub repository id of the form 'your-name/model-name' ({error}).") from None
    token = token or get_token()
    if not token:
        raise ValueError(
            "Not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN. Nothing was uploaded."
        )
    return token


def push_bundle(
    bundle: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload ProtoQuant model (protoquant_hf bundle)",
):
    """Upload a bundle folder as one commit (`create_repo`, then one `create_commit` of every file). Returns the
    commit info."""
    bundle = Path(bundle)
    if not is_bundle(bundle):
        raise ValueError(f"{bundle} is not a bundle written by export_bundle (`protoquant push --dry_run` writes one).")
    token = check_repo_and_token(repo_id, token)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    # One create_commit with every file (upload_folder may split large folders into several commits).
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(bundle).as_posix(), path_or_fileobj=str(path))
        for path in sorted(bundle.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    return api.create_commit(
        repo_id=repo_id, repo_type="model", operations=operations, commit_message=commit_message, revision=revision,
    )


__all__ = ["REMOTE_CODE_FILES", "check_model_folder", "check_repo_and_token", "export_bundle", "is_bundle", "push_bundle"]
