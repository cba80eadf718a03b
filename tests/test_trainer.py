"""The transformers Trainer front end: which parameters train, shared objectives, eval, save, resume."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_backbones import tiny_backbone_config
from transformers import AutoModelForImageClassification, BitImageProcessor, TrainingArguments, pipeline
from transformers.trainer_utils import EvalPrediction

import protoquant_hf  # noqa: F401  (registers the Auto classes)
from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification
from protoquant_hf.training.trainer import ProtoQuantTrainer, compute_accuracy, prepare_trainer_datasets

NAMES = ["red", "green", "blue"]
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230]])


def image_dataset(num_images: int = 48, num_classes: int = 3, seed: int = 0) -> datasets.DatasetDict:
    """Colour-coded noisy 32 px images with a ClassLabel column, split 36 train / 12 test."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num_images) % num_classes
    images = []
    for label in labels:
        base = COLOURS[label % 3] * rng.uniform(0.6, 1.0)
        pixels = base + rng.normal(0, 40, size=(32, 32, 3))
        top, left = rng.integers(0, 16, size=2)
        pixels[top : top + 16, left : left + 16] = 255 - pixels[top : top + 16, left : left + 16]
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    names = (NAMES + [f"extra{i}" for i in range(num_classes)])[:num_classes]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    dataset = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
    split = num_images * 3 // 4
    return datasets.DatasetDict(
        {"train": dataset.select(range(split)), "test": dataset.select(range(split, num_images))}
    )


def tiny_processor() -> BitImageProcessor:
    return BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def tiny_model(seed: int = 0, num_concepts: int = 6) -> ProtoQuantForImageClassification:
    backbone_config, size = tiny_backbone_config("resnet")
    config = ProtoQuantConfig(
        backbone_config=backbone_config, num_concepts=num_concepts, image_size=size, id2label=dict(enumerate(NAMES))
    )
    torch.manual_seed(seed)
    return ProtoQuantForImageClassification(config)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions are latency-bound: with several OpenMP threads on a busy machine they run
    100x slower than on one. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return prepare_trainer_datasets(image_dataset(), tiny_processor(), image_size=32)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        per_device_train_batch_size=12,
        per_device_eval_batch_size=12,
        num_train_epochs=3,
        learning_rate=0.05,
        warmup_steps=0,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(tmp_path, data, model=None, args=None, **kwargs) -> ProtoQuantTrainer:
    return ProtoQuantTrainer(
        model=model if model is not None else tiny_model(),
        args=args if args is not None else training_args(tmp_path),
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=tiny_processor(),
        compute_metrics=compute_accuracy,
        **kwargs,
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed(before, after) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def full_batch(data, split="train"):
    rows = [data[split][i] for i in range(len(data[split]))]
    return torch.stack([row["pixel_values"] for row in rows]), torch.tensor([int(row["labels"]) for row in rows])


def stage_loss(model, pixels, labels, stage="head") -> torch.Tensor:
    """The training objective of a stage: the model's own loss in training mode."""
    model.train()
    with torch.no_grad():
        loss = model(pixels, labels=labels, stage=stage).loss
    model.eval()
    return loss


def test_head_stage_trains_only_w_and_lowers_the_loss(tmp_path, data):
    model = tiny_model()
    pixels, labels = full_batch(data)
    loss_before = stage_loss(model, pixels, labels)
    before = snapshot(model)
    trainer = make_trainer(tmp_path, data, model=model, l1_lambda=1e-4, args=training_args(tmp_path, learning_rate=0.5))
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["classifier.weight"]
    assert model.config.head_l1_lambda == 1e-4
    trainer.train()
    loss_after = stage_loss(model, pixels, labels)
    assert loss_after < loss_before - 0.03
    # Only W moved: backbone weights and BN running statistics, and the concepts, are bit-identical.
    assert changed(before, snapshot(model)) == {"classifier.weight"}
    assert not model.protoquant.backbone.training


def test_w_relu_in_forward_and_l1_shrinks_relu_w(tmp_path, data):
    results = {}
    for l1 in (0.0, 0.05):
        model = tiny_model()
        make_trainer(tmp_path, data, model=model, l1_lambda=l1, args=training_args(tmp_path, learning_rate=0.2)).train()
        results[l1] = model
    plain, sparse = results[0.0], results[0.05]
    assert torch.relu(sparse.classifier.weight).sum() < 0.5 * torch.relu(plain.classifier.weight).sum()
    # Negative stored weights exist and do not matter: the forward applies ReLU.
    weight = sparse.classifier.weight.detach()
    assert (weight < 0).any()
    pixels, _ = full_batch(data, "test")
    with torch.no_grad():
        out = sparse(pixels)
        torch.testing.assert_close(out.logits, out.concept_scores @ torch.relu(weight).t())
        assert (out.logits >= 0).all()
        sparse.classifier.weight.copy_(torch.where(weight < 0, torch.full_like(weight, -7.0), weight))
        torch.testing.assert_close(sparse(pixels).logits, out.logits)


def test_train_concepts_option_trains_concepts_too(tmp_path, data):
    model = tiny_model()
    before = snapshot(model)
    args = training_args(tmp_path, num_train_epochs=1)
    trainer = make_trainer(tmp_path, data, model=model, train_concepts=True, args=args)
    trained = {"classifier.weight", "protoquant.codebook.concepts"}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trained
    trainer.train()
    assert changed(before, snapshot(model)) == trained


def test_codebook_stage_trains_only_concepts_and_evaluates_quantized(tmp_path, data):
    model = tiny_model()
    torch.manual_seed(1)
    model.set_stage1_head(torch.nn.Linear(model.protoquant.hidden_size, 3))
    before = snapshot(model)
    args = training_args(tmp_path, learning_rate=0.02)
    trainer = make_trainer(tmp_path, data, model=model, stage="codebook", args=args)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["protoquant.codebook.concepts"]
    pixels, labels = full_batch(data)
    loss_before = stage_loss(model, pixels, labels, "codebook")
    trainer.train()
    loss_after = stage_loss(model, pixels, labels, "codebook")
    assert changed(before, snapshot(model)) == {"protoquant.codebook.concepts"}
    assert loss_after < loss_before
    metrics = trainer.evaluate()
    test_pixels, test_labels = full_batch(data, "test")
    with torch.no_grad():
        quantized = model(test_pixels, stage="codebook").logits
        head = model(test_pixels).logits
    expected = float((quantized.argmax(-1) == test_labels).float().mean())
    assert metrics["eval_accuracy"] == pytest.approx(expected)
    # The predictions are the quantized logits, not the concept head's.
    predictions = trainer.predict(data["test"]).predictions
    torch.testing.assert_close(torch.from_numpy(predictions), quantized)
    assert not torch.allclose(torch.from_numpy(predictions), head)


def test_codebook_stage_needs_stage1_head(tmp_path, data):
    with pytest.raises(ValueError, match="stage-1 head"):
        make_trainer(tmp_path, data, stage="codebook")


def test_evaluate_reports_accuracy_of_class_logits(tmp_path, data):
    model = tiny_model()
    trainer = make_trainer(tmp_path, data, model=model, args=training_args(tmp_path, num_train_epochs=1))
    trainer.train()
    metrics = trainer.evaluate()
    pixels, labels = full_batch(data, "test")
    with torch.no_grad():
        out = model(pixels, labels=labels)
    assert metrics["eval_accuracy"] == pytest.approx(float((out.logits.argmax(-1) == labels).float().mean()))
    # Evaluation runs in eval mode: the loss is the plain cross-entropy (the L1 term is a training term).
    assert metrics["eval_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out.logits, labels)), rel=1e-4)
    predictions = trainer.predict(data["test"]).predictions
    torch.testing.assert_close(torch.from_numpy(predictions), out.logits)


def test_compute_accuracy():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert compute_accuracy(EvalPrediction(predictions=logits, label_ids=np.array([1, 0, 0, 0]))) == {"accuracy": 0.75}
    assert compute_accuracy(EvalPrediction(predictions=(logits,), label_ids=np.array([1, 1, 1, 1])))["accuracy"] == 0.5


def test_gradient_accumulation_does_not_scale_the_loss(tmp_path, data):
    losses = {}
    for accumulation, batch in ((1, 12), (2, 6)):
        args = training_args(
            tmp_path / str(accumulation), num_train_epochs=1, learning_rate=1e-4,
            gradient_accumulation_steps=accumulation, per_device_train_batch_size=batch,
        )
        losses[accumulation] = make_trainer(tmp_path, data, args=args).train().training_loss
    assert losses[2] == pytest.approx(losses[1], rel=0.05)


def test_save_model_loads_with_auto_class_and_pipeline(tmp_path, data):
    model = tiny_model()
    trainer = make_trainer(tmp_path, data, model=model, args=training_args(tmp_path, num_train_epochs=1))
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    files = ("config.json", "model.safetensors", "preprocessor_config.json")
    for name in files + ("configuration_protoquant.py", "modeling_protoquant.py"):
        assert (out / name).is_file(), name
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_protoquant.ProtoQuantForImageClassification"
    loaded = AutoModelForImageClassification.from_pretrained(str(out)).eval()
    assert isinstance(loaded, ProtoQuantForImageClassification)
    pixels, _ = full_batch(data, "test")
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model.eval()(pixels).logits)
    image = image_dataset()["test"][0]["image"]
    results = pipeline("image-classification", model=str(out), top_k=3)(image)
    assert {result["label"] for result in results} == set(NAMES)


def test_resume_from_checkpoint_reaches_the_same_weights(tmp_path, data):
    args = dict(num_train_epochs=2, save_strategy="epoch", per_device_train_batch_size=8, learning_rate=0.02,
                lr_scheduler_type="linear")
    full = tiny_model()
    trainer = make_trainer(tmp_path, data, model=full, args=training_args(tmp_path / "a", **args), l1_lambda=1e-3)
    trainer.train()
    steps_per_epoch = trainer.state.global_step // 2
    checkpoint = tmp_path / "a" / "run" / f"checkpoint-{steps_per_epoch}"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed = tiny_model(seed=5)  # different init: only the checkpoint can make it match
    resumed.classifier.weight.data.fill_(3.0)
    trainer = make_trainer(tmp_path, data, model=resumed, args=training_args(tmp_path / "b", **args), l1_lambda=1e-3)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(resumed.classifier.weight, full.classifier.weight)
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == ["classifier.weight"]  # still frozen
    assert trainer.state.global_step == 2 * steps_per_epoch
    assert not torch.equal(full.classifier.weight, tiny_model().classifier.weight)  # training did move W


def test_bf16_runs_the_objectives_under_autocast(tmp_path, data):
    from accelerate.state import AcceleratorState

    model = tiny_model()
    dtypes = []
    hook = model.protoquant.backbone.embedder.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        trainer = make_trainer(tmp_path, data, model=model, args=training_args(tmp_path, num_train_epochs=1, bf16=True))
        trainer.train()
        metrics = trainer.evaluate()
    finally:
        hook.remove()
        AcceleratorState._reset_state(reset_partial_state=True)
    assert dtypes and all(dtype == torch.bfloat16 for dtype in dtypes)
    assert model.classifier.weight.dtype == torch.float32  # the master weights stay fp32
    pixels, labels = full_batch(data, "test")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        predictions = model.eval()(pixels).logits.argmax(-1)
    assert metrics["eval_accuracy"] == pytest.approx(float((predictions == labels).float().mean()))


def test_label_count_mismatch_is_one_clear_error(tmp_path):
    four = prepare_trainer_datasets(image_dataset(num_images=16, num_classes=4), tiny_processor(), image_size=32)
    with pytest.raises(ValueError, match=r"4 classes .* 3 labels.*label count ≠ model labels"):
        make_trainer(tmp_path, four)


def test_invalid_arguments(tmp_path, data):
    with pytest.raises(ValueError, match="l1_lambda"):
        make_trainer(tmp_path, data, l1_lambda=-0.1)
    with pytest.raises(ValueError, match="stage"):
        make_trainer(tmp_path, data, stage="both")
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        make_trainer(tmp_path, data, args=training_args(tmp_path, remove_unused_columns=True))


def test_stock_trainer_on_a_loaded_folder_runs_exactly_stage_2(tmp_path, data):
    """The stock `transformers.Trainer` with stock arguments: one SGD step must equal
    W - lr · ∇(CE + λ·ΣReLU(W)) at the loaded W, and nothing but W may move."""
    from transformers import Trainer

    tiny_model().save_pretrained(tmp_path / "folder")
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "folder")
    model.config.head_l1_lambda = 0.05  # large, so a missing L1 term would show
    pixels, labels = full_batch(data)
    weight = model.classifier.weight.detach().clone().requires_grad_(True)
    with torch.no_grad():
        scores = model(pixels).concept_scores
    objective = torch.nn.functional.cross_entropy(scores @ torch.relu(weight).t(), labels) + 0.05 * torch.relu(weight).sum()
    (gradient,) = torch.autograd.grad(objective, weight)
    expected = weight.detach() - 0.1 * gradient
    before = snapshot(model)
    args = training_args(
        tmp_path, optim="sgd", learning_rate=0.1, weight_decay=0.0, max_grad_norm=0.0, num_train_epochs=1,
        per_device_train_batch_size=len(labels),
    )
    Trainer(model=model, args=args, train_dataset=data["train"], data_collator=None).train()
    assert changed(before, snapshot(model)) == {"classifier.weight"}
    torch.testing.assert_close(model.classifier.weight.detach(), expected)


TWO_PROCESS_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_trainer import data_for_script, tiny_model, training_args_for_script
from protoquant_hf.training import ProtoQuantTrainer
from pathlib import Path
torch.set_num_threads(1)
model = tiny_model()
trainer = ProtoQuantTrainer(model=model, args=training_args_for_script({out!r}, {batch}), train_dataset=data_for_script()["train"], l1_lambda=1e-3)
trainer.train()
if trainer.is_world_process_zero():
    torch.save({{"weight": model.classifier.weight.detach(), "world": trainer.args.world_size}}, Path({out!r}) / "weight.pt")
trainer.accelerator.end_training()  # destroys the process group before interpreter teardown (else gloo may abort at exit)
"""


def data_for_script():
    return prepare_trainer_datasets(image_dataset(), tiny_processor(), image_size=32)


def training_args_for_script(out, batch):
    return training_args(
        Path(out), per_device_train_batch_size=batch, num_train_epochs=2, learning_rate=0.05, output_dir=str(out),
        optim="sgd", weight_decay=0.0, max_grad_norm=0.0, dataloader_drop_last=True,
    )


def test_protoquant_trainer_two_processes_match_one(tmp_path):
    """Under DDP the batches go through model(**inputs), so gradients are synchronised: two processes
    with half the batch each reach the one-process weights."""
    import os
    import subprocess
    import sys

    tests = str(Path(__file__).resolve().parent)
    results = {}
    for processes, batch in ((1, 12), (2, 6)):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        script = out / "train.py"
        script.write_text(TWO_PROCESS_SCRIPT.format(tests=tests, out=str(out), batch=batch))
        launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"] if processes == 2 else [sys.executable]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        result = subprocess.run([*launcher, str(script)], capture_output=True, text=True, env=env, timeout=600, cwd=out)
        assert result.returncode == 0, result.stderr[-3000:]
        results[processes] = torch.load(out / "weight.pt", weights_only=True)
    assert results[1]["world"] == 1 and results[2]["world"] == 2
    assert not torch.allclose(results[1]["weight"], tiny_model().classifier.weight.detach())  # training moved W
    torch.testing.assert_close(results[2]["weight"], results[1]["weight"], rtol=1e-4, atol=1e-5)
