"""The Accelerate training core: sharded epochs over cached features, global evaluation and counts.

Everything that decides the model is global: every process sees the same shuffled order (a
seeded permutation per epoch) and takes its own slice of each global batch, gradients are averaged
by DDP, and accuracies and concept-usage counts are summed across processes. So N processes give
the same model semantics as one process with an N-times larger batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..concepts import FeatureCache
from ..memory import release_free_heap


class AugmentedImages:
    """Training images augmented on the fly, served like a FeatureCache (`read`, `labels`).

    The alternative to the cache when images are augmented: each batch is freshly augmented
    pixels, so the objective must run the backbone itself. Row i is the cache's row i."""

    def __init__(self, dataset, transform: Callable):
        self.dataset = dataset.with_transform(transform)
        self.labels = np.asarray(dataset["label"])

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.dataset[[int(i) for i in rows]]
        return batch["pixel_values"], batch["labels"]


class Objective(nn.Module):
    """Wraps `fn(model, inputs, targets) -> (loss, logits)` as a module, so Accelerate/DDP can
    synchronise the gradients of exactly the parameters that stage trains."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(self.model, inputs, targets)


def epoch_batches(
    num_rows: int, batch_size: int, epoch: int, seed: int, accelerator: Accelerator, order: np.ndarray | None = None
) -> list[np.ndarray]:
    """This process's row indices for every step of one epoch.

    The global batch (batch_size × processes) of the epoch's order (a seeded permutation unless `order`, a
    permutation of the rows the same on every process, is given) is split evenly; the last one wraps
    around, so every process runs the same number of equally sized steps.

    Why not Accelerate's prepared DataLoader (seedable sampler, even_batches): with one process it
    yields a short last batch (50 rows, batch 16: 16/16/16/2), with two it pads the last global batch
    to full size from the start of the epoch, so 1 and N processes would take different last steps
    whenever N_rows is not a multiple of the global batch. Here the padding is the same for any
    number of processes, which is what makes N processes equal one process with an N-times batch.
    """
    if order is None:
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    elif len(order) != num_rows:
        raise ValueError(f"the epoch order has {len(order)} rows, the training source {num_rows}.")
    processes = accelerator.num_processes
    global_batch = batch_size * processes
    steps = math.ceil(num_rows / global_batch)
    padded = np.concatenate([order, order[: steps * global_batch - num_rows]])
    return [padded[step * global_batch : (step + 1) * global_batch][accelerator.process_index :: processes] for step in range(steps)]


def take_rows(inputs, labels, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `index` of a training source: a FeatureCache / AugmentedImages, or in-memory tensors."""
    if hasattr(inputs, "read"):
        return inputs.read(index)
    return inputs[index], torch.as_tensor(labels)[index]


def shard_rows(num_rows: int, accelerator: Accelerator) -> np.ndarray:
    """This process's contiguous share of the rows for evaluation and counting (summed across processes)."""
    with accelerator.split_between_processes(torch.arange(num_rows)) as rows:
        return rows.numpy()


def global_sum(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.to(accelerator.device), reduction="sum").cpu()


def broadcast_tensor(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Process 0's value of `tensor` on every process (for results computed once, e.g. k-means)."""
    if accelerator.num_processes == 1:
        return tensor
    from accelerate.utils import broadcast

    return broadcast(tensor.contiguous().to(accelerator.device), from_process=0).cpu()


@torch.no_grad()
def accuracy(
    accelerator: Accelerator, predict: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor | FeatureCache, labels, batch_size: int = 256
) -> float:
    """Global accuracy of `predict(inputs_batch) -> logits` over a cache or an in-memory tensor."""
    rows = shard_rows(len(labels), accelerator)
    correct = torch.zeros(2, dtype=torch.long)
    for start in range(0, len(rows), batch_size):
        index = rows[start : start + batch_size]
        batch, targets = take_rows(inputs, labels, index)
        logits = predict(batch.to(accelerator.device)).cpu()
        correct += torch.tensor([int((logits.argmax(-1) == targets).sum()), len(index)])
    correct = global_sum(accelerator, correct)
    return float(correct[0]) / max(int(correct[1]), 1)


def fit(
    accelerator: Accelerator,
    objective: Objective,
    param_groups: list[dict],
    inputs: torch.Tensor | FeatureCache,
    labels,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    warmup_ratio: float,
    desc: str,
    start_epoch: int = 0,
    restore: Callable[[], None] | None = None,
    transform_batch: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    after_step: Callable[[], None] | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    epoch_order: Callable[[int], np.ndarray] | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """Train `objective` with Adam and a warm-up + cosine schedule.

    Args:
        param_groups: Adam parameter groups (each with its own `lr`); only these are trained.
        inputs / labels: a FeatureCache (streamed from disk), `AugmentedImages`, or in-memory tensors.
        start_epoch: epochs already done (resume); `restore()` then reloads the saved optimizer,
            scheduler and weights after `prepare`.
        transform_batch: optional (inputs, labels, rng) → (inputs, targets), e.g. Mixup/CutMix.
        after_step: called after every optimizer step, on every process, e.g. to project the trained
            parameters back into a constraint set.
        on_epoch_end: called with (epoch index, log record) after every epoch, e.g. to checkpoint.
        epoch_order: epoch index → the order of the rows in that epoch (the same on every process), e.g. a
            shard-window shuffle; a seeded full permutation when None.
        show_progress: one progress bar for the stage (epochs as steps, the loss in its postfix).

    Returns:
        One log record per epoch run: epoch, mean loss, learning rate, seconds.
    """
    if epochs == 0:
        return []
    num_rows = len(labels)
    steps_per_epoch = math.ceil(num_rows / (batch_size * accelerator.num_processes))
    optimizer = torch.optim.Adam(param_groups)
    # A prepared scheduler is stepped once per process at every optimizer step (Accelerate's
    # convention for per-process data loaders), so the schedule is laid out in those units.
    total = steps_per_epoch * epochs * accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)
    prepared, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    if restore is not None:
        restore()
    records = []
    bar = tqdm(
        total=epochs, initial=start_epoch, desc=desc, unit="epoch",
        disable=not (show_progress and accelerator.is_local_main_process),
    )
    try:
        for epoch in range(start_epoch, epochs):
            prepared.train()
            start, losses = time.perf_counter(), []
            rng = np.random.default_rng([seed, epoch, accelerator.process_index])
            order = epoch_order(epoch) if epoch_order is not None else None
            for index in epoch_batches(num_rows, batch_size, epoch, seed, accelerator, order):
                batch, targets = take_rows(inputs, labels, index)
                batch, targets = batch.to(accelerator.device), targets.to(accelerator.device)
                if transform_batch is not None:
                    batch, targets = transform_batch(batch, targets, rng)
                loss, _ = prepared(batch, targets)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                if after_step is not None:
                    after_step()
                losses.append(loss.item())
            totals = global_sum(accelerator, torch.tensor([sum(losses), len(losses)], dtype=torch.float64))
            record = {
                "stage": desc,
                "epoch": epoch + 1,
                "loss": float(totals[0] / totals[1].clamp_min(1)),
                "lr": scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - start,
            }
            records.append(record)
            release_free_heap()  # the epoch's freed batch temporaries go back (flat memory over long runs)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update()
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    finally:
        bar.close()
        accelerator.free_memory()
    return records


__all__ = [
    "AugmentedImages",
    "Objective",
    "accuracy",
    "broadcast_tensor",
    "epoch_batches",
    "fit",
    "global_sum",
    "shard_rows",
    "take_rows",
]
