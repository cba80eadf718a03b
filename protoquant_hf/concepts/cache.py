"""On-disk cache of frozen-backbone feature maps, the input every concept computation reads.

The backbone never changes during ProtoQuant training, so its feature maps are computed once and
every epoch of both stages reads them back (method §4: "caching is legitimate because the backbone
is frozen"). A cache is a folder holding ``features.npy`` (N, D, H, W; float16 or float32),
``labels.npy`` (N,) and ``meta.json``. Its name is a hash of everything that determines the
features: the backbone weights and config, the feature layer, the preprocessing, the dataset
fingerprint and split, and the storage dtype, so a stale cache can never be read for new inputs.
Reads go through a memory map, so training streams from disk instead of holding the cache in RAM.
Extraction is sharded across Accelerate processes; each writes its own rows of one file.

Concurrent runs share entries safely: one builds an entry (under a file lock, in a private folder renamed into
place when complete), the others wait and read it; a reader only ever opens complete, validated entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from filelock import FileLock
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..cache import cache_root
from ..data import collate_fn

CACHE_FORMAT_VERSION = 2  # 2: meta.json carries a checksum
logger = logging.getLogger(__name__)
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


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


def cache_key(model, image_processor, dataset: Dataset, split: str, dtype: str) -> str:
    """Everything that determines the cached features, hashed into a folder name."""
    parts = {
        "version": CACHE_FORMAT_VERSION,
        "backbone": backbone_fingerprint(model),
        "preprocessing": image_processor.to_dict(),
        "dataset": dataset._fingerprint,
        "num_rows": len(dataset),
        "split": split,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class FeatureCache:
    """Read access to one cached split: memory-mapped feature maps and their labels."""

    path: Path
    features: np.ndarray  # (N, D, H, W), memory-mapped
    labels: np.ndarray  # (N,)
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> "FeatureCache":
        """Open a complete cache entry. Raises `CacheEntryError` (naming what is wrong) for an entry that is
        incomplete or damaged: missing or edited meta.json, another format version, truncated arrays."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as error:
            raise CacheEntryError(path, f"meta.json unreadable ({error})") from None
        if meta.get("version") != CACHE_FORMAT_VERSION:
            raise CacheEntryError(path, f"format {meta.get('version')}, expected {CACHE_FORMAT_VERSION}")
        if meta.get("checksum") != _meta_checksum(meta):
            raise CacheEntryError(path, "meta.json does not match its checksum")
        shape = tuple(meta["shape"])
        try:
            features = np.load(path / "features.npy", mmap_mode="r")
            labels = np.load(path / "labels.npy")
        except (OSError, ValueError) as error:  # missing, or truncated ("mmap length is greater than file size")
            raise CacheEntryError(path, f"array files unreadable ({error})") from None
        if features.shape != shape or str(features.dtype) != meta["dtype"] or labels.shape != shape[:1]:
            raise CacheEntryError(
                path, f"arrays of shape {features.shape} / {labels.shape} ({features.dtype}), meta.json says {shape} ({meta['dtype']})"
            )
        return cls(path=path, features=features, labels=labels, meta=meta)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature maps float32 `(B, D, H, W)`, labels `(B,)`) of the given rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential on disk
        stored = torch.from_numpy(np.ascontiguousarray(self.features[rows[order]]))
        # torch widens float16 with vector instructions, numpy element by element: 4x faster reads of a float16 cache.
        features = torch.empty(stored.shape, dtype=torch.float32)
        features[torch.from_numpy(order)] = stored.float()
        return features, torch.from_numpy(self.labels[rows])

    def batches(self, batch_size: int, indices: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (feature maps float32 `(B, D, H, W)`, labels `(B,)`) for consecutive chunks of
        `indices` (all rows by default), each chunk in its given order."""
        order = np.arange(len(self)) if indices is None else np.asarray(indices)
        for start in range(0, len(order), batch_size):
            yield self.read(order[start : start + batch_size])

    def pooled(self, batch_size: int = 1024) -> torch.Tensor:
        """Global-average-pooled features (N, D), the input of a linear probe."""
        return torch.cat([features.mean(dim=(2, 3)) for features, _ in self.batches(batch_size)])

    def feature_vectors(
        self, max_vectors: int | None = None, seed: int = 0, batch_size: int = 512
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Individual non-zero location vectors (n, D) with their image's label (n,): all of them,
        or a seeded sample of at most `max_vectors` (memory stays bounded by the sample)."""
        num_images, hidden_size, height, width = self.features.shape
        per_image = height * width
        keep = None
        if max_vectors is not None and num_images * per_image > max_vectors:
            keep = np.zeros(num_images * per_image, dtype=bool)
            keep[np.random.default_rng(seed).choice(len(keep), size=max_vectors, replace=False)] = True
        vectors, labels, offset = [], [], 0
        for features, batch_labels in self.batches(batch_size):
            flat = features.flatten(2).transpose(1, 2).reshape(-1, hidden_size)
            flat_labels = batch_labels.repeat_interleave(per_image)
            selected = flat.norm(dim=1) > 0
            if keep is not None:
                selected &= torch.from_numpy(keep[offset : offset + len(flat)])
            offset += len(flat)
            vectors.append(flat[selected])
            labels.append(flat_labels[selected])
        return torch.cat(vectors), torch.cat(labels)


def extract_features(
    model,
    dataset: Dataset,
    image_processor,
    transform: Callable,
    *,
    split: str,
    accelerator: Accelerator | None = None,
    dtype: str = "float16",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> FeatureCache:
    """Compute (or reuse) the cached feature maps of one split.

    Safe under concurrency: the first run to need an entry builds it under a file lock, in a private folder renamed
    into place only when complete; other runs wait for it and reuse it. An entry that fails validation (truncated
    arrays, an edited meta.json) is rebuilt with a warning naming its path.

    Args:
        model: a `ProtoQuantForImageClassification`; only its frozen backbone is run, through
            `model.forward_features` (call `model.use_fast_backbone()` first for the fast copy).
        dataset: the split, with an `image` and a `label` column (no transform set).
        image_processor: the processor `transform` applies (part of the cache key).
        transform: batch transform producing `pixel_values` and `labels` (see `make_image_transform`).
        split: split name, part of the cache key and the progress bar.
        accelerator: shards the extraction across processes when given.
        dtype: `"float16"` (half the disk) or `"float32"` storage.
        batch_size: images per forward pass.
        cache_dir: where caches live; defaults to `cache_root() / "features"`.
        show_progress: show a progress bar (on the local main process).

    Returns:
        The ready cache.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "features"
    final = root / cache_key(model, image_processor, dataset, split, dtype)
    lock = None
    decision = [None, None]  # ("ready" | "build", private build folder)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        # Another run may be building this very entry: wait for it (the lock dies with its holder).
        lock = FileLock(str(root / f".{final.name}.lock"))
        lock.acquire()
        decision = ["ready", None] if _usable(final) else ["build", str(_fresh_build_folder(root, final))]
    try:
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(decision, from_process=0)
        if decision[0] == "build":
            try:
                _build(model, dataset, transform, accelerator, Path(decision[1]), final, split, dtype, batch_size, show_progress)
            except BaseException:
                if accelerator.is_main_process:
                    shutil.rmtree(decision[1], ignore_errors=True)
                raise
        accelerator.wait_for_everyone()
    finally:
        if lock is not None:
            lock.release()
    return FeatureCache.open(final)


class CacheEntryError(ValueError):
    """A feature-cache entry that is incomplete or damaged."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"Feature cache entry {path} is damaged: {reason}.")
        self.path, self.reason = path, reason


def _meta_checksum(meta: dict) -> str:
    body = {key: value for key, value in meta.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _usable(final: Path) -> bool:
    """Whether the entry is complete and valid; a damaged one is removed (the caller holds the lock)."""
    if not final.exists():
        return False
    try:
        FeatureCache.open(final)
        return True
    except CacheEntryError as error:
        logger.warning("%s Rebuilding it.", error)
        shutil.rmtree(final)
        return False


def _fresh_build_folder(root: Path, final: Path) -> Path:
    """A private, empty folder to build `final` in; leftovers of killed builds of it are removed first
    (only the lock holder ever builds, so any that exist are stale)."""
    for stale in root.glob(f".{final.name}.partial*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=root))


def _build(model, dataset, transform, accelerator, partial: Path, final: Path, split, dtype, batch_size, show_progress):
    """Extract into `partial` (all processes, one contiguous shard each), then rename it to `final`."""
    device = accelerator.device
    with torch.inference_mode():
        probe = model.forward_features(transform({"image": [dataset[0]["image"]]})["pixel_values"].to(device))
    shape = (len(dataset), *probe.shape[1:])
    if accelerator.is_main_process:
        open_memmap(partial / "features.npy", mode="w+", dtype=STORAGE_DTYPES[dtype], shape=shape).flush()
        open_memmap(partial / "labels.npy", mode="w+", dtype=np.int64, shape=(len(dataset),)).flush()
    accelerator.wait_for_everyone()

    with accelerator.split_between_processes(torch.arange(len(dataset))) as mine:
        rows = range(int(mine[0]), int(mine[-1]) + 1) if len(mine) else range(0)
    features_out = np.load(partial / "features.npy", mmap_mode="r+")
    labels_out = np.load(partial / "labels.npy", mmap_mode="r+")
    loader = DataLoader(dataset.select(rows).with_transform(transform), batch_size=batch_size, collate_fn=collate_fn)
    position = rows.start
    progress = tqdm(
        loader, desc=f"Extracting {split} features", unit="batch",
        disable=not (show_progress and accelerator.is_local_main_process),
    )
    with torch.inference_mode():
        for batch in progress:
            maps = model.forward_features(batch["pixel_values"].to(device)).float().cpu().numpy()
            features_out[position : position + len(maps)] = maps
            labels_out[position : position + len(maps)] = batch["labels"].numpy()
            position += len(maps)
    features_out.flush()
    labels_out.flush()
    del features_out, labels_out
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        meta = {
            "version": CACHE_FORMAT_VERSION,
            "split": split,
            "shape": list(shape),
            "dtype": dtype,
            "dataset_fingerprint": dataset._fingerprint,
            "backbone": getattr(model.config, "backbone_name", None),
        }
        meta["checksum"] = _meta_checksum(meta)
        (partial / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(partial, final)  # complete: the only way an entry appears


__all__ = [
    "CacheEntryError",
    "FeatureCache",
    "backbone_fingerprint",
    "cache_key",
    "extract_features",
]
