"""On-disk cache of frozen-backbone feature maps, the input every concept computation reads.

The backbone never changes during ProtoQuant training, so its feature maps are computed once and
every epoch of both stages reads them back (method §4: "caching is legitimate because the backbone
is frozen"). An entry is a sharded store (`shards.py`): ``features-00000.npy`` (rows, D, H, W; float16 or
float32) and ``labels-00000.npy`` (rows,) for every `shard_size` rows, and an ``index.json`` listing the shards.
Its folder name is a hash of everything that determines the features: the backbone weights and config, the feature
layer, the preprocessing, the content of the dataset (see `dataset_content`), the split and the storage dtype, so a
stale entry can never be read for new inputs. Reads memory-map one shard at a time, so training streams from disk
instead of holding the cache in RAM.

Building. The input is a map-style `datasets.Dataset` (row i of the cache is row i of the dataset) or a streaming
`datasets.IterableDataset` (N unknown; rows in stream order with one process). Shards are written as extraction goes,
each one atomically, so memory stays at one shard buffer plus one batch. With P Accelerate processes, the shards of a
dataset are dealt round-robin (in a fresh build shard s goes to process s % P; the result does not depend on P); a
stream is split with `datasets.distributed.split_dataset_by_node` and process r writes shards ``rank{r}-00000``,
``rank{r}-00001``, ... of its part (the cache then holds process 0's rows, then process 1's: every row exactly once,
in an order that depends on P; the key does not, so a later run with another P reuses the entry as it is).

Concurrency and damage. One run builds an entry, under a file lock, in a private folder (``.<key>.partial``) renamed
into place when complete; other runs wait for the lock and read it, and a reader only opens complete, validated
entries. A build that is killed keeps its complete shards: the next build of the same key resumes, computing only the
missing ones (a stream re-reads, without running the backbone, the rows of the shards it already has). A finished
entry whose index is damaged is rebuilt; one whose shard is missing or truncated gets only that shard rebuilt.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from accelerate import Accelerator
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from filelock import FileLock
from tqdm.auto import tqdm

from ..cache import cache_root
from ..memory import release_free_heap
from .shards import (
    DEFAULT_SHARD_SIZE,
    STORE_FORMAT_VERSION,
    ShardedArray,
    ShardWriter,
    StoreError,
    damaged_shards,
    inspect_shard,
    read_index,
    shard_files,
    shard_order,
    write_index,
)

CACHE_FORMAT_VERSION = STORE_FORMAT_VERSION  # 3: sharded, keyed by dataset content (2: one file, by fingerprint)
logger = logging.getLogger(__name__)
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
_BUILD_RECORD = "build.json"  # in a partial build: the layout its shards were written with (resume only if equal)
_HASH_ROWS = 1024  # rows per hashed Arrow chunk: bounded memory, and the same chunks (so the same hash) every run
_STREAM_HEAD_ROWS = 16  # rows of a stream hashed into its default description


# Backbone config keys that do not change what the backbone computes (provenance, labels of its own
# classifier, the dtype it was stored in), left out of the fingerprint so that a model and its saved
# and reloaded copy share a cache.
_NON_ARCHITECTURE_KEYS = ("_name_or_path", "id2label", "label2id", "transformers_version", "dtype", "architectures")


def backbone_fingerprint(model) -> str:
    """Hash of the frozen backbone's weights, its architecture config and the feature layer used."""
    digest = hashlib.sha256()
    protoquant = model.protoquant
    backbone_config = protoquant.config.backbone_config.to_dict()
    for key in _NON_ARCHITECTURE_KEYS:
        backbone_config.pop(key, None)
    digest.update(json.dumps(backbone_config, sort_keys=True, default=str).encode())
    digest.update(str(protoquant.config.backbone_feature_layer).encode())
    for name, tensor in sorted(protoquant.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# What the rows are: the dataset part of the key
# --------------------------------------------------------------------------------------------------------------


def dataset_content(dataset: Dataset | IterableDataset, content_description: dict | None = None) -> dict:
    """What identifies the rows of `dataset` in the cache key (public API only, no private fingerprint).

    - map-style `Dataset`: its number of rows and a SHA-256 of its Arrow content, rows in order (the selected and
      shuffled rows, not the underlying table), about 40 ms for Fashion-MNIST's 60 000 training images;
    - streaming `IterableDataset`: a stream cannot be hashed without reading all of it, so **its key is its
      description**: `content_description` when given (name, config, split, revision, data files: whatever tells
      this stream from any other), else one from its public attributes (`info`, `split`, `n_shards`, features) and a
      hash of its first rows. Pass a description when the stream's data can change under the same name.

    `content_description` also replaces the hash of a map-style dataset too large to hash on every run.
    """
    if isinstance(dataset, IterableDataset):
        return {"type": "stream", "description": content_description or stream_description(dataset)}
    if content_description is not None:
        return {"type": "dataset", "num_rows": len(dataset), "description": content_description}
    return {"type": "dataset", "num_rows": len(dataset), "sha256": _arrow_sha256(dataset)}


def _arrow_sha256(dataset: Dataset) -> str:
    """SHA-256 of the dataset's rows as Arrow IPC, in fixed chunks of rows. `with_format("arrow")` slices honour the
    dataset's row selection; the IPC writer serialises only a slice's own bytes (`buffers()` would hash whole
    shared chunks), and combining chunks first makes the bytes independent of how the table happens to be chunked."""
    digest = hashlib.sha256()
    arrow = dataset.with_format("arrow")
    for start in range(0, len(dataset), _HASH_ROWS):
        table = arrow[start : start + _HASH_ROWS].combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()


def stream_description(stream: IterableDataset) -> dict:
    """Default description of a stream: its public info, and a hash of its first rows undecoded (the image bytes or
    paths), so that two local streams with the same builder ("imagefolder") and features still differ. It cannot see
    how a stream was cut (`take(n)` keeps info and first rows): callers that cut streams add that to the description
    (the training job adds its data arguments)."""
    info = stream.info
    head = hashlib.sha256()
    for example in itertools.islice(iter(stream.decode(False)), _STREAM_HEAD_ROWS):
        _hash_value(head, example)
    return {
        "builder_name": info.builder_name,
        "dataset_name": info.dataset_name,
        "config_name": info.config_name,
        "description": info.description,
        "version": str(info.version) if info.version is not None else None,
        "split": str(stream.split) if stream.split is not None else None,
        "download_checksums": info.download_checksums,
        "features": stream.features.to_dict() if stream.features is not None else None,
        "n_shards": stream.n_shards,
        "head_sha256": head.hexdigest(),
    }


def _hash_value(digest, value) -> None:
    """Feed an example's value (nested dicts / lists of bytes, numbers, strings, arrays, images) to `digest`."""
    if isinstance(value, dict):
        for key in sorted(value):
            digest.update(f"<{key}>".encode())
            _hash_value(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _hash_value(digest, item)
        digest.update(b"]")
    elif isinstance(value, (bytes, bytearray)):
        digest.update(value)
    elif hasattr(value, "tobytes"):  # numpy arrays, decoded PIL images
        digest.update(str(getattr(value, "shape", getattr(value, "size", ""))).encode())
        digest.update(value.tobytes())
    else:
        digest.update(json.dumps(value, default=str).encode())


def _entry_key(model, image_processor, content: dict, split: str, dtype: str, precision: str = "no") -> str:
    parts = {
        "version": CACHE_FORMAT_VERSION,
        "backbone": backbone_fingerprint(model),
        "preprocessing": image_processor.to_dict(),
        "content": content,
        "split": split,
        "dtype": dtype,
    }
    if precision != "no":  # a bf16 / fp16 backbone pass computes other features (float32 entries keep their keys)
        parts["precision"] = precision
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_key(
    model, image_processor, dataset: Dataset | IterableDataset, split: str, dtype: str, content_description: dict | None = None,
    precision: str = "no",
) -> str:
    """Everything that determines the cached features, hashed into a folder name (see `dataset_content` for the
    dataset's part; the backbone pass's mixed precision is part of it; the shard size and the number of processes are
    not)."""
    return _entry_key(model, image_processor, dataset_content(dataset, content_description), split, dtype, precision)


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureCache:
    """Read access to one cached split: sharded feature maps (memory-mapped on demand) and their labels."""

    path: Path
    store: ShardedArray  # (N, D, H, W) in the storage dtype
    labels: np.ndarray  # (N,)
    meta: dict  # the entry's index.json (split, content, shards, ...)

    @classmethod
    def open(cls, path: str | Path) -> "FeatureCache":
        """Open a complete cache entry. Raises `CacheEntryError` (naming what is wrong) for an entry that is
        incomplete or damaged: missing or edited index.json, another format version, missing or truncated shards."""
        path = Path(path)
        try:
            index = read_index(path)
        except StoreError as error:
            raise CacheEntryError(path, str(error)) from None
        damaged = damaged_shards(path, index)
        if damaged:
            raise CacheEntryError(path, "; ".join(str(error) for _, error in damaged))
        labels = [np.load(shard_files(path, shard["name"])[1], allow_pickle=False) for shard in index["shards"]]
        return cls(path=path, store=ShardedArray.from_folder(path, index), labels=np.concatenate(labels), meta=index)

    @classmethod
    def from_arrays(cls, features: np.ndarray, labels: np.ndarray, shard_size: int | None = None) -> "FeatureCache":
        """An in-memory cache of `features` `(N, D, H, W)` and `labels` `(N,)` (tests, small experiments), cut into
        shards of `shard_size` rows (one shard by default) exactly like an entry on disk."""
        features, labels = np.asarray(features), np.asarray(labels)
        size = shard_size or max(len(features), 1)
        shards = [features[start : start + size] for start in range(0, len(features), size)]
        store = ShardedArray(shards, [len(shard) for shard in shards], features.shape[1:], features.dtype)
        return cls(path=Path("in-memory"), store=store, labels=labels, meta={})

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, D, H, W)."""
        return self.store.shape

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype of the feature maps (float16 or float32); `read` always returns float32."""
        return self.store.dtype

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature maps float32 `(B, D, H, W)`, labels `(B,)`) of the given rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential on disk, one shard at a time
        stored = torch.from_numpy(self.store.read_sorted(rows[order]))
        # torch widens float16 with vector instructions, numpy element by element: 4x faster reads of a float16 cache.
        features = torch.empty(stored.shape, dtype=torch.float32)
        features[torch.from_numpy(order)] = stored.float()
        return features, torch.from_numpy(self.labels[rows])

    def to_numpy(self) -> np.ndarray:
        """All feature maps `(N, D, H, W)` in the storage dtype, in memory (for tests and small caches)."""
        return self.store.to_numpy()

    def shard_order(self, epoch: int, seed: int, window: int = 1) -> np.ndarray:
        """A seeded shuffle `(N,)` of the rows that reads `window` shards at a time (see `shards.shard_order`)."""
        return shard_order(self.store.row_counts, epoch, seed, window)

    def examples_in_row_order(self, dataset) -> Iterator[dict]:
        """The examples of the split this cache was extracted from, in cache row order (row i is the i-th yielded).

        For a map-style dataset that is its own order; for a stream extracted by W processes it is each process's
        part (`split_dataset_by_node`) in turn, as the index lists their shards. Reading a stream this way needs it to
        yield the same rows in the same order again, as Hub, local and synthetic streams without shuffling do."""
        source = self.meta.get("source", {})
        if source.get("type") != "stream" or source.get("world_size", 1) == 1:
            yield from dataset
            return
        for rank in range(source["world_size"]):
            yield from split_dataset_by_node(dataset, rank=rank, world_size=source["world_size"])

    def batches(self, batch_size: int, indices: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (feature maps float32 `(B, D, H, W)`, labels `(B,)`) for consecutive chunks of
        `indices` (all rows by default), each chunk in its given order."""
        order = np.arange(len(self)) if indices is None else np.asarray(indices)
        unreleased = 0
        for start in range(0, len(order), batch_size):
            yield self.read(order[start : start + batch_size])
            unreleased += batch_size
            if unreleased >= DEFAULT_SHARD_SIZE:  # a pass over N rows keeps the footprint of one shard's worth
                release_free_heap()
                unreleased = 0

    def pooled(self, batch_size: int = 1024, indices: np.ndarray | None = None) -> torch.Tensor:
        """Global-average-pooled features (N, D) of all rows, or of `indices` in their order: a linear probe's input."""
        return torch.cat([features.mean(dim=(2, 3)) for features, _ in self.batches(batch_size, indices)])

    def feature_vectors(
        self, max_vectors: int | None = None, seed: int = 0, batch_size: int = 512
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Individual non-zero location vectors (n, D) with their image's label (n,): all of them,
        or a seeded sample of at most `max_vectors` locations (zero vectors among them dropped).

        Memory is bounded by the sample, not by N: the sampled locations are `max_vectors` sorted positions
        (numpy's choice without replacement keeps O(sample) state), matched batch by batch as the cache is read."""
        num_images, hidden_size, height, width = self.shape
        per_image = height * width
        sampled = None
        if max_vectors is not None and num_images * per_image > max_vectors:
            sampled = np.sort(np.random.default_rng(seed).choice(num_images * per_image, size=max_vectors, replace=False))
        vectors, labels, offset = [], [], 0
        for features, batch_labels in self.batches(batch_size):
            flat = features.flatten(2).transpose(1, 2).reshape(-1, hidden_size)
            flat_labels = batch_labels.repeat_interleave(per_image)
            selected = flat.norm(dim=1) > 0
            if sampled is not None:
                first, last = np.searchsorted(sampled, [offset, offset + len(flat)])
                in_sample = torch.zeros(len(flat), dtype=torch.bool)
                in_sample[torch.from_numpy(sampled[first:last] - offset)] = True
                selected &= in_sample
            offset += len(flat)
            vectors.append(flat[selected])
            labels.append(flat_labels[selected])
        return torch.cat(vectors), torch.cat(labels)


class CacheEntryError(ValueError):
    """A feature-cache entry that is incomplete or damaged."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"Feature cache entry {path} is damaged: {reason}.")
        self.path, self.reason = path, reason


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------


def extract_features(
    model,
    dataset: Dataset | IterableDataset,
    image_processor,
    transform: Callable,
    *,
    split: str,
    accelerator: Accelerator | None = None,
    dtype: str = "float16",
    batch_size: int = 64,
    shard_size: int = DEFAULT_SHARD_SIZE,
    content_description: dict | None = None,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> FeatureCache:
    """Compute (or reuse) the cached feature maps of one split.

    Safe under concurrency: the first run to need an entry builds it under a file lock, in a private folder renamed
    into place only when complete; other runs wait for it and reuse it. An interrupted build is resumed by the next
    one (its complete shards are kept). An entry whose index fails validation is rebuilt, and a missing or truncated
    shard of a valid entry is rebuilt alone, each with a warning naming the path.

    Args:
        model: a `ProtoQuantForImageClassification`; only its frozen backbone is run, through
            `model.forward_features` (call `model.use_fast_backbone()` first for the fast copy).
        dataset: the split, with an `image` and a `label` column (no transform set): a map-style `Dataset`, or a
            streaming `IterableDataset` (read in batches, never held in memory).
        image_processor: the processor `transform` applies (part of the cache key).
        transform: batch transform producing `pixel_values` and `labels` (see `make_image_transform`); it must bring
            images of any size to one size.
        split: split name, part of the cache key and the progress bar.
        accelerator: shards the extraction across processes when given.
        dtype: `"float16"` (half the disk) or `"float32"` storage.
        batch_size: images per forward pass.
        shard_size: rows per shard file; a build holds one shard in memory (`shard_size` x D x H x W values).
        content_description: identifies the data in the cache key instead of the default (see `dataset_content`);
            for a stream, the name, config, split, revision or data files that tell it from any other.
        cache_dir: where caches live; defaults to `cache_root() / "features"`.
        show_progress: show a progress bar (on the local main process).

    Returns:
        The ready cache.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"dataset must be a datasets.Dataset or datasets.IterableDataset, got {type(dataset).__name__}.")
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"Split {split!r} has no rows: there are no features to extract.")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "features"
    lock = None
    plan: list = [None]  # what the lock holder decided, for every process
    if accelerator.is_main_process:
        content = dataset_content(dataset, content_description)
        final = root / _entry_key(model, image_processor, content, split, dtype, str(accelerator.mixed_precision))
        root.mkdir(parents=True, exist_ok=True)
        # Another run may be building this very entry: wait for it (the lock dies with its holder).
        lock = FileLock(str(root / f".{final.name}.lock"))
        lock.acquire()
        try:
            metadata = {"split": split, "content": content, "backbone": getattr(model.config, "backbone_name", None)}
            plan = [_plan(final, dataset, metadata, dtype, shard_size, accelerator.num_processes)]
        except BaseException:
            lock.release()
            raise
    try:
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(plan, from_process=0)
        plan = plan[0]
        if plan["action"] == "build":
            _build(model, dataset, transform, accelerator, plan, dtype, batch_size, show_progress)
        elif plan["action"] == "repair":
            _repair(model, dataset, transform, accelerator, plan, dtype, batch_size, show_progress)
        accelerator.wait_for_everyone()
    finally:
        if lock is not None:
            lock.release()
    return FeatureCache.open(plan["final"])


def _plan(final: Path, dataset, metadata: dict, dtype: str, shard_size: int, num_processes: int) -> dict:
    """The lock holder's decision: "ready", "repair" (the damaged shards of a finished entry) or "build" (the missing
    shards of a new or resumed partial build). Only the lock holder ever writes, so what it finds is not changing."""
    if final.exists():
        try:
            index = read_index(final)
        except StoreError as error:
            logger.warning("%s Rebuilding it.", CacheEntryError(final, str(error)))
            shutil.rmtree(final)
        else:
            damaged = damaged_shards(final, index)
            if not damaged:
                return {"action": "ready", "final": str(final)}
            for _, error in damaged:
                logger.warning("Feature cache shard %s is damaged: %s. Rebuilding that shard.", error.path, error.reason)
            return {
                "action": "repair", "final": str(final), "source": index["source"], "shard_size": index["shard_size"],
                "tasks": [shard for shard, _ in damaged],
            }
    partial = final.parent / f".{final.name}.partial"
    source = {"type": "stream", "world_size": num_processes} if isinstance(dataset, IterableDataset) else {"type": "dataset"}
    layout = {"version": STORE_FORMAT_VERSION, "dtype": dtype, "shard_size": shard_size, "source": source}
    previous = _build_record(partial)
    if previous is not None and _ignoring_world_size(previous) == _ignoring_world_size(layout):
        # A stream's parts depend on the world size it was split for: resume with that one (any process runs any part).
        layout = previous
    elif partial.exists():
        logger.info("Discarding the partial feature cache build %s (written with another layout %s).", partial, previous)
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for stale in partial.glob(".*.tmp"):  # files a killed writer left half-written
        stale.unlink()
    (partial / _BUILD_RECORD).write_text(json.dumps(layout))
    if layout["source"]["type"] == "dataset":
        tasks = _missing_dataset_shards(partial, len(dataset), shard_size, dtype)
    else:
        tasks = _stream_continuations(partial, layout["source"]["world_size"], shard_size, dtype)
    if previous is not None:
        logger.info("Resuming the feature cache build %s: %d part(s) left to extract.", partial, len(tasks))
    return {
        "action": "build", "final": str(final), "partial": str(partial), "source": layout["source"],
        "shard_size": shard_size, "metadata": metadata, "tasks": tasks,
    }


def _build_record(partial: Path) -> dict | None:
    """The layout a partial build was started with (None: no partial build, or an unreadable record)."""
    try:
        record = json.loads((partial / _BUILD_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("source"), dict) else None


def _ignoring_world_size(layout: dict) -> dict:
    return {**layout, "source": {key: value for key, value in layout["source"].items() if key != "world_size"}}


def _complete_shard(folder: Path, name: str, rows: int | None, dtype: str) -> int | None:
    """Rows of shard `name` if its files are complete, of `dtype` and of `rows` rows (any number when None)."""
    try:
        header = inspect_shard(folder, name)
    except StoreError:
        return None
    if header.dtype != np.dtype(dtype) or (rows is not None and header.rows != rows):
        return None
    return header.rows


def _remove_shard(folder: Path, name: str) -> None:
    for path in shard_files(folder, name):
        path.unlink(missing_ok=True)


def _dataset_shards(num_rows: int, shard_size: int) -> list[dict]:
    """The shards of a map-style dataset: shard s holds rows s*S .. (s+1)*S - 1."""
    return [
        {"name": f"{s:05d}", "start": s * shard_size, "rows": min(shard_size, num_rows - s * shard_size)}
        for s in range(math.ceil(num_rows / shard_size))
    ]


def _missing_dataset_shards(partial: Path, num_rows: int, shard_size: int, dtype: str) -> list[dict]:
    missing = []
    for shard in _dataset_shards(num_rows, shard_size):
        if _complete_shard(partial, shard["name"], shard["rows"], dtype) is None:
            _remove_shard(partial, shard["name"])
            missing.append(shard)
    return missing


def _stream_shard_name(rank: int, position: int) -> str:
    return f"rank{rank}-{position:05d}"


def _stream_shards(folder: Path, rank: int, shard_size: int, dtype: str) -> tuple[list[dict], bool]:
    """The complete shards of part `rank` of a stream, in order, and whether the part is finished (a part's shards
    are full except its last)."""
    shards = []
    for position in itertools.count():
        rows = _complete_shard(folder, _stream_shard_name(rank, position), None, dtype)
        if rows is None or rows > shard_size:
            return shards, False
        shards.append({"name": _stream_shard_name(rank, position), "rank": rank, "start": position * shard_size, "rows": rows})
        if rows < shard_size:
            return shards, True


def _stream_continuations(partial: Path, world_size: int, shard_size: int, dtype: str) -> list[dict]:
    """For every unfinished part of a stream, where to continue: after its complete shards. Whatever follows them
    (a shard cut short by a kill, a shard after a gap) is removed, as it will be written again."""
    tasks = []
    for rank in range(world_size):
        shards, finished = _stream_shards(partial, rank, shard_size, dtype)
        for path in partial.glob(f"*-rank{rank}-*.npy"):
            if int(path.stem.rsplit("-", 1)[1]) >= len(shards):
                path.unlink()
        if not finished:
            tasks.append({"rank": rank, "start": len(shards) * shard_size, "first_shard": len(shards)})
    return tasks


def _dataset_batches(dataset: Dataset, transform: Callable, start: int, stop: int, batch_size: int) -> Iterator[dict]:
    transformed = dataset.with_transform(transform)
    for batch_start in range(start, stop, batch_size):
        yield transformed[batch_start : min(batch_start + batch_size, stop)]


def _stream_batches(
    stream: IterableDataset, transform: Callable, rank: int, world_size: int, skip: int, rows: int | None, batch_size: int
) -> Iterator[dict]:
    """Transformed batches of rows `skip` .. `skip + rows` of part `rank` of the stream (to its end when `rows` is
    None). Rows are skipped by iterating (not `IterableDataset.skip`, which after `split_dataset_by_node` counts rows of
    the whole stream, not of the part); they are read but neither transformed nor run through the backbone."""
    part = split_dataset_by_node(stream, rank=rank, world_size=world_size) if world_size > 1 else stream
    examples = itertools.islice(iter(part), skip, None if rows is None else skip + rows)
    while chunk := list(itertools.islice(examples, batch_size)):
        yield transform({column: [example[column] for example in chunk] for column in chunk[0]})


def _run_tasks(model, dataset, transform, accelerator, plan: dict, folder: Path, dtype, batch_size, show_progress, desc):
    """Extract this process's share of `plan["tasks"]` (task i runs on process i % P) into `folder`.

    A task with a `name` is exactly one shard (`start`, `rows`); one without is the rest of a stream's part, written as
    shards `first_shard`, `first_shard + 1`, ... as they fill."""
    device, shard_size, source = accelerator.device, plan["shard_size"], plan["source"]
    tasks = plan["tasks"][accelerator.process_index :: accelerator.num_processes]
    known = [task["rows"] for task in tasks if "rows" in task]
    progress = tqdm(
        total=sum(known) if len(known) == len(tasks) else None, desc=desc, unit="image",
        disable=not (show_progress and accelerator.is_local_main_process),
    )
    for task in tasks:
        if source["type"] == "dataset":
            batches = _dataset_batches(dataset, transform, task["start"], task["start"] + task["rows"], batch_size)
        else:
            batches = _stream_batches(
                dataset, transform, task["rank"], source["world_size"], task["start"], task.get("rows"), batch_size
            )
        if "name" in task:
            names = iter([task["name"]])
        else:
            names = (_stream_shard_name(task["rank"], position) for position in itertools.count(task["first_shard"]))
        writer = ShardWriter(folder, names, shard_size, STORAGE_DTYPES[dtype])
        # The accelerator's mixed precision (--mixed_precision bf16) runs the backbone pass in bf16 on GPU.
        with torch.inference_mode(), accelerator.autocast():
            for batch in batches:
                if "labels" not in batch:
                    raise ValueError("The transform returned no 'labels': the dataset needs a label column.")
                maps = model.forward_features(batch["pixel_values"].to(device)).float().cpu().numpy()
                writer.add(maps, batch["labels"].numpy())
                progress.update(len(maps))
        writer.close()
    progress.close()


def _build(model, dataset, transform, accelerator, plan: dict, dtype, batch_size, show_progress):
    """Extract the missing shards into the partial folder (all processes), then index it and rename it into place."""
    partial = Path(plan["partial"])
    _run_tasks(model, dataset, transform, accelerator, plan, partial, dtype, batch_size, show_progress,
               f"Extracting {plan['metadata']['split']} features")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish(partial, Path(plan["final"]), plan, dataset, dtype)


def _finish(partial: Path, final: Path, plan: dict, dataset, dtype: str) -> None:
    """Write the index of a partial build whose shards are all there, and rename it to `final` (the only way an
    entry appears)."""
    shard_size, source = plan["shard_size"], plan["source"]
    if source["type"] == "dataset":
        shards = _dataset_shards(len(dataset), shard_size)
    else:
        shards = [shard for rank in range(source["world_size"]) for shard in _stream_shards(partial, rank, shard_size, dtype)[0]]
    if not shards:
        raise ValueError(f"Split {plan['metadata']['split']!r} yielded no rows: there are no features to extract.")
    row_shape = inspect_shard(partial, shards[0]["name"]).row_shape
    index = write_index(partial, {
        **plan["metadata"], "row_shape": list(row_shape), "dtype": dtype, "shard_size": shard_size, "source": source,
        "shards": shards,
    })
    damaged = damaged_shards(partial, index)
    if damaged:  # a process wrote fewer rows than its shard holds, or other feature-map shapes
        raise CacheEntryError(partial, "; ".join(str(error) for _, error in damaged))
    (partial / _BUILD_RECORD).unlink()
    os.replace(partial, final)


def _repair(model, dataset, transform, accelerator, plan: dict, dtype, batch_size, show_progress):
    """Rebuild the damaged shards of a finished entry in place (each shard file replaced atomically)."""
    final = Path(plan["final"])
    _run_tasks(model, dataset, transform, accelerator, plan, final, dtype, batch_size, show_progress, "Rebuilding feature shards")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        damaged = damaged_shards(final, read_index(final))
        if damaged:
            raise CacheEntryError(
                final,
                "rebuilt shards still disagree with the index (" + "; ".join(str(error) for _, error in damaged) + "): the "
                "data changed under the same description; delete the folder to rebuild the whole entry",
            )


__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheEntryError",
    "FeatureCache",
    "backbone_fingerprint",
    "cache_key",
    "stream_description",
    "dataset_content",
    "extract_features",
]
