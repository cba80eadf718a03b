"""Row-sharded arrays on disk: the storage under the feature cache, generic over the per-row shape.

A store is one folder:

    index.json            format version, per-row shape and dtype, shard size, the shards in row order (name, row
                          count, where their rows come from), a description of the content, and a checksum
    features-00000.npy    the per-row arrays of the first shard, `(rows, *row_shape)`: feature maps `(D, H, W)`
    labels-00000.npy      their labels, int64 `(rows,)`
    features-00001.npy    ...

Every shard holds `shard_size` rows except the last of a sequence, so a build that streams its input writes one shard
whenever a buffer of `shard_size` rows fills and never holds more than that buffer (plus one input batch). Each file
is written under a hidden temporary name and renamed into place (`os.replace`), so a shard file that exists under its
name is complete: a killed build leaves every finished shard usable and the next build writes only the missing ones.
Readers check the index checksum and every shard's `.npy` header and file size when opening (truncated or deleted
shards are named, so they can be rebuilt alone), keep a bounded number of shards memory-mapped (a cache of a million
rows must not hold a file descriptor per shard), read rows in sorted order, one shard at a time, and hand the mapped
pages back whenever the shards read since the last time hold more than a bound (RSS then does not grow with the
cache's size).

The same files can hold any per-row array, e.g. concept-score tables `(K,)`; `row_shape` says which.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from ..memory import release_free_heap

STORE_FORMAT_VERSION = 3  # 3: sharded (2 was one features.npy + meta.json)
DEFAULT_SHARD_SIZE = 4096
INDEX_FILE = "index.json"
# What a reader lets mapped cache pages add to its RSS before it drops them (see ShardedArray).
DEFAULT_MAX_RESIDENT_BYTES = 256 * 2**20
LABEL_DTYPE = np.dtype(np.int64)


class StoreError(ValueError):
    """A store's index or one of its shard files is missing, unreadable or inconsistent."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


# --------------------------------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------------------------------


def shard_files(folder: str | Path, name: str) -> tuple[Path, Path]:
    """(values file, labels file) of shard `name` in `folder`."""
    folder = Path(folder)
    return folder / f"features-{name}.npy", folder / f"labels-{name}.npy"


def write_shard(folder: str | Path, name: str, values: np.ndarray, labels: np.ndarray) -> None:
    """Write one shard atomically: each file goes to a hidden temporary name first, then `os.replace`s its final
    name, so a reader (or a resumed build) never sees half a shard under the real name.

    Args:
        values: `(rows, *row_shape)` in the storage dtype.
        labels: `(rows,)`, stored as int64.
    """
    if len(values) != len(labels):
        raise ValueError(f"Shard {name}: {len(values)} rows of values but {len(labels)} labels.")
    labels = np.asarray(labels, dtype=LABEL_DTYPE)
    # Labels first: a shard counts as present only once its values file exists, and that one is renamed last.
    for path, array in zip(reversed(shard_files(folder, name)), (labels, values)):
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as file:
            np.save(file, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(temporary, path)


@dataclass(frozen=True)
class ShardHeader:
    """What a shard's files say about it, read from the `.npy` headers (no data is read)."""

    rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype


def read_npy_header(file) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, byte offset of the data) of the `.npy` file open at its start."""
    version = npy_format.read_magic(file)
    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(file)
    return shape, fortran_order, dtype, file.tell()


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a C-ordered `.npy` file whose size matches its header (else `StoreError`)."""
    try:
        with open(path, "rb") as file:
            shape, fortran_order, dtype, data_offset = read_npy_header(file)
    except FileNotFoundError:
        raise StoreError(path, "missing") from None
    except (OSError, ValueError) as error:
        raise StoreError(path, f"unreadable .npy header ({error})") from None
    if fortran_order or dtype.hasobject:
        raise StoreError(path, "not a C-ordered array of plain numbers")
    expected = data_offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise StoreError(path, f"{actual} bytes, its header needs {expected} (truncated or overwritten)")
    return tuple(shape), dtype


def inspect_shard(folder: str | Path, name: str) -> ShardHeader:
    """Check that both files of shard `name` are complete and agree with each other; `StoreError` naming the file
    that is not."""
    values_path, labels_path = shard_files(folder, name)
    shape, dtype = _npy_header(values_path)
    label_shape, label_dtype = _npy_header(labels_path)
    if not shape or label_shape != shape[:1] or label_dtype != LABEL_DTYPE:
        raise StoreError(labels_path, f"labels {label_shape} {label_dtype} do not match values {shape} (expected int64)")
    return ShardHeader(rows=shape[0], row_shape=shape[1:], dtype=dtype)


class ShardWriter:
    """Collects rows into one buffer of `shard_size` rows and writes it as the next shard whenever it fills.

    Memory stays at one shard buffer whatever the number of rows (a stream of unknown length included): rows are
    copied into the buffer, already in the storage dtype, and the buffer is reused for the next shard.

    Args:
        folder: where the shards go.
        names: names of the shards to write, in order (one is taken per shard).
        shard_size: rows per shard; the last one (written by `close`) may hold fewer.
        dtype: storage dtype of the values.
    """

    def __init__(self, folder: str | Path, names: Iterator[str], shard_size: int, dtype: np.dtype | str):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
        self.folder, self.names, self.shard_size, self.dtype = Path(folder), iter(names), shard_size, np.dtype(dtype)
        self.values: np.ndarray | None = None  # (shard_size, *row_shape), allocated once the row shape is known
        self.labels = np.empty(shard_size, dtype=LABEL_DTYPE)
        self.filled = 0
        self.written: list[tuple[str, int]] = []  # (name, rows) of the shards written so far

    def add(self, values: np.ndarray, labels: np.ndarray) -> None:
        """Append rows `values` `(B, *row_shape)` with `labels` `(B,)`; writes every shard that fills."""
        if self.values is None:
            self.values = np.empty((self.shard_size, *values.shape[1:]), dtype=self.dtype)
        elif values.shape[1:] != self.values.shape[1:]:
            raise ValueError(f"Rows of shape {values.shape[1:]} added to shards of rows {self.values.shape[1:]}.")
        start = 0
        while start < len(values):  # a batch may straddle two shards
            take = min(self.shard_size - self.filled, len(values) - start)
            self.values[self.filled : self.filled + take] = values[start : start + take]
            self.labels[self.filled : self.filled + take] = labels[start : start + take]
            self.filled += take
            start += take
            if self.filled == self.shard_size:
                self._flush()

    def close(self) -> list[tuple[str, int]]:
        """Write the last, partly filled shard (if any); returns every (name, rows) written."""
        if self.filled:
            self._flush()
        return self.written

    def _flush(self) -> None:
        name = next(self.names)
        write_shard(self.folder, name, self.values[: self.filled], self.labels[: self.filled])
        self.written.append((name, self.filled))
        self.filled = 0
        release_free_heap()  # what the batches of this shard left free goes back (flat memory at any N)


# --------------------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------------------


def index_checksum(index: dict) -> str:
    """Checksum of an index's content (everything but the checksum itself)."""
    body = {key: value for key, value in index.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_index(folder: str | Path, index: dict) -> dict:
    """Write `index.json` (atomically) with its format version and checksum added; returns what was written.

    `index` needs `row_shape`, `dtype`, `shard_size` and `shards` (a list of dicts with at least `name` and `rows`,
    in row order), and should say what the rows are in `content`; any other keys are kept as metadata."""
    missing = [key for key in ("row_shape", "dtype", "shard_size", "shards", "content") if key not in index]
    if missing:
        raise ValueError(f"An index needs {missing}.")
    index = {**index, "version": STORE_FORMAT_VERSION, "num_rows": sum(shard["rows"] for shard in index["shards"])}
    index["checksum"] = index_checksum(index)
    path = Path(folder) / INDEX_FILE
    temporary = path.with_name(f".{INDEX_FILE}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(index, indent=2))
    os.replace(temporary, path)
    return index


def read_index(folder: str | Path) -> dict:
    """The validated `index.json` of a store; `StoreError` when it is missing, edited or of another format."""
    path = Path(folder) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise StoreError(path, f"unreadable ({error})") from None
    if not isinstance(index, dict) or index.get("version") != STORE_FORMAT_VERSION:
        found = index.get("version") if isinstance(index, dict) else None
        raise StoreError(path, f"format {found}, expected {STORE_FORMAT_VERSION}")
    if index.get("checksum") != index_checksum(index):
        raise StoreError(path, "does not match its checksum (edited?)")
    return index


def damaged_shards(folder: str | Path, index: dict) -> list[tuple[dict, StoreError]]:
    """The shards listed in `index` whose files are missing, truncated, or disagree with the index, each with the
    error naming its file. Reads only the `.npy` headers and file sizes."""
    row_shape, dtype = tuple(index["row_shape"]), np.dtype(index["dtype"])
    damaged = []
    for shard in index["shards"]:
        try:
            header = inspect_shard(folder, shard["name"])
            if (header.rows, header.row_shape, header.dtype) != (shard["rows"], row_shape, dtype):
                raise StoreError(
                    shard_files(folder, shard["name"])[0],
                    f"{header.rows} rows of {header.row_shape} {header.dtype}, the index says {shard['rows']} of "
                    f"{row_shape} {dtype}",
                )
        except StoreError as error:
            damaged.append((shard, error))
    return damaged


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def _default_max_open() -> int:
    """Half the soft file-descriptor limit (at least 64, at most 16 384).

    A training epoch draws each batch from the whole cache, so every batch touches every shard: with fewer maps kept
    than shards, shards are re-mapped batch after batch (measured: 46 ms instead of 3 ms per 1 024-row batch of a
    123-shard cache with 64 maps kept; stages 1 and 2 grew 22-40x from 100 k to 1 M images with it, issue 12)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # no `resource` (Windows)
        return 512
    if soft == resource.RLIM_INFINITY:
        return 16_384
    return int(min(max(64, soft // 2), 16_384))


# Absent on Windows and on Python builds without madvise; pages then stay until the kernel reclaims them.
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None) if hasattr(mmap.mmap, "madvise") else None


class _MappedShard:
    """One shard's values file mapped read-only, as an array `(rows, *row_shape)`, with a way to give its pages back.

    A plain `np.load(mmap_mode="r")` leaves every page it ever touched resident and counted in the process's RSS until
    the kernel needs the memory: a shuffled epoch touches the whole cache, so RSS grew by the cache's size (1.2 GB at
    1 M images, issue 12), and kernels that map whole large folios make even a few rows per shard bring in most of it
    (4 096 random rows of 50 000 made 49 MB resident here). `drop_pages` tells the kernel those pages are not needed
    any more (`MADV_DONTNEED`; on a read-only file mapping that only unmaps, the page cache keeps the data), so a
    reader's RSS stays at what it copied out.
    """

    def __init__(self, path: Path, rows: int, row_shape: tuple[int, ...], dtype: np.dtype):
        with open(path, "rb") as file:
            offset = read_npy_header(file)[3]
            # The mapping holds its own duplicate of the descriptor, so the file can be closed here.
            self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        count = rows * int(np.prod(row_shape, dtype=np.int64))
        self.array = np.frombuffer(self.map, dtype=dtype, count=count, offset=offset).reshape(rows, *row_shape)

    def drop_pages(self) -> None:
        if _DONTNEED is not None:
            self.map.madvise(_DONTNEED)

    def close(self) -> None:
        self.array = None  # the array exports the map's buffer: it must go before the map can close
        self.map.close()


class ShardedArray:
    """Rows `(N, *row_shape)` held as consecutive shards (files memory-mapped on demand, or in-memory arrays).

    Reads copy rows out of the mapped files. The mapped pages they leave resident are dropped again
    (`_MappedShard.drop_pages`) once the shards read since the last drop hold more than `max_resident_bytes`, so RSS
    grows by at most about that much whatever the store's size; a store smaller than that is never dropped (dropping
    makes the next read fault its pages in again: 1.4-4.4x slower shuffled reads, measured in benchmarks/RESULTS.md,
    "Reading the cache").

    Args:
        shards: per shard, the path of its values `.npy` or the array itself, in row order.
        row_counts: rows of each shard.
        row_shape, dtype: of every row.
        max_open: memory maps kept open at once (least recently used ones are closed); default: half the process's
            file-descriptor limit (each map holds one), at least 64.
        max_resident_bytes: bytes of shards read since the last drop above which their mapped pages are dropped.
    """

    def __init__(
        self, shards: Sequence[Path | np.ndarray], row_counts: Sequence[int], row_shape: tuple[int, ...], dtype,
        max_open: int | None = None, max_resident_bytes: int = DEFAULT_MAX_RESIDENT_BYTES,
    ):
        self.shards, self.row_shape, self.dtype = list(shards), tuple(row_shape), np.dtype(dtype)
        self.max_open = max_open if max_open is not None else _default_max_open()
        self.row_counts = np.asarray(row_counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.row_counts)])  # shard i holds rows offsets[i] : offsets[i + 1]
        self._open: OrderedDict[int, _MappedShard] = OrderedDict()
        self.max_resident_bytes = max_resident_bytes
        self._row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._read_since_drop: set[int] = set()  # open shards whose pages may be resident
        self._bytes_since_drop = 0  # their size in bytes (an upper bound on what they keep resident)

    @classmethod
    def from_folder(cls, folder: str | Path, index: dict) -> "ShardedArray":
        """The values of a store whose index was validated (`read_index`, `damaged_shards`)."""
        names = [shard["name"] for shard in index["shards"]]
        return cls(
            [shard_files(folder, name)[0] for name in names], [shard["rows"] for shard in index["shards"]],
            tuple(index["row_shape"]), index["dtype"],
        )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    def _mapped(self, i: int) -> _MappedShard:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        mapped = _MappedShard(self.shards[i], int(self.row_counts[i]), self.row_shape, self.dtype)
        self._open[i] = mapped
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return mapped

    def _read_shard_rows(self, i: int, local: np.ndarray, out: np.ndarray) -> None:
        """Copy rows `local` (sorted, inside the shard) of shard `i` into `out`."""
        # take(out=) gathers straight into the result (one copy). "clip" is safe (callers bounds-check, so local rows
        # lie inside their shard) and 10x faster than "raise", which buffers the whole gather when `out` is given.
        source = self.shards[i]
        if isinstance(source, np.ndarray):
            np.take(source, local, axis=0, out=out, mode="clip")
            return
        np.take(self._mapped(i).array, local, axis=0, out=out, mode="clip")
        if i not in self._read_since_drop:
            self._read_since_drop.add(i)
            self._bytes_since_drop += int(self.row_counts[i]) * self._row_bytes
        if self._bytes_since_drop > self.max_resident_bytes:
            for j in self._read_since_drop:
                if j in self._open:  # closed (evicted) maps hold no pages
                    self._open[j].drop_pages()
            self._read_since_drop.clear()
            self._bytes_since_drop = 0

    def read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """Rows `(B, *row_shape)` in the storage dtype; `rows` must be non-decreasing (reads are then sequential
        within each shard and touch each shard once)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        if not len(rows):
            return out
        if rows[0] < 0 or rows[-1] >= len(self):
            raise IndexError(f"Rows {rows[0]}..{rows[-1]} requested from a store of {len(self)} rows.")
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        shard_ids, starts = np.unique(shard_of, return_index=True)
        ends = np.append(starts[1:], len(rows))
        for shard_id, start, end in zip(shard_ids, starts, ends):
            self._read_shard_rows(int(shard_id), rows[start:end] - self.offsets[shard_id], out[start:end])
        return out

    def to_numpy(self) -> np.ndarray:
        """Every row `(N, *row_shape)` in one in-memory array (for tests and small stores)."""
        return self.read_sorted(np.arange(len(self)))

    def close(self) -> None:
        """Unmap every open shard (reading again maps them anew)."""
        while self._open:
            self._open.popitem()[1].close()
        self._read_since_drop.clear()
        self._bytes_since_drop = 0


def shard_order(row_counts: Sequence[int], epoch: int, seed: int, window: int = 1) -> np.ndarray:
    """A seeded epoch order `(N,)` of global row indices that visits the shards in random order, `window` shards at a
    time, and the rows of each window in random order within it: a shuffle that keeps `window` shards in use at once,
    for epochs over stores bigger than RAM (a full permutation touches every shard in every batch). A window of a few
    shards mixes rows from several parts of the data into each batch (one shard of a class-sorted stream holds few
    classes). The same (epoch, seed, window) gives the same order.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 shard, got {window}.")
    rng = np.random.default_rng([seed, epoch])
    counts = np.asarray(row_counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    shards = rng.permutation(len(counts))
    parts = []
    for start in range(0, len(shards), window):
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in shards[start : start + window]])
        parts.append(rng.permutation(rows))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


__all__ = [
    "DEFAULT_MAX_RESIDENT_BYTES",
    "DEFAULT_SHARD_SIZE",
    "INDEX_FILE",
    "STORE_FORMAT_VERSION",
    "ShardHeader",
    "ShardWriter",
    "ShardedArray",
    "StoreError",
    "damaged_shards",
    "index_checksum",
    "read_npy_header",
    "inspect_shard",
    "read_index",
    "shard_files",
    "shard_order",
    "write_index",
    "write_shard",
]
