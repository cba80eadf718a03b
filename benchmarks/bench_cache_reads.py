"""Reading a sharded feature cache in shuffled order: time per batch and the resident pages a reader keeps.

Three readers gather the same sorted row batches of one shuffled epoch from the same store (fp16 `.npy` shards):
  store   `ShardedArray.read_sorted`: memory-mapped shards whose pages are dropped (madvise) once the shards read
          since the last drop exceed its resident bound (one reader per `--bounds-mb`; the default bound first)
  mmap    the same gather from `np.load(mmap_mode="r")` maps left as they are (what the store did before)
  pread   `os.preadv` of each row into the batch (no mapping at all)
Each reader runs `--passes` epochs after one warm-up epoch (the page cache then holds the store for all of them);
reported: median ms per batch, ratios to mmap per pass, and how much the process's resident file-backed memory
(`RssFile`) grew over the reader's epochs.

    python benchmarks/bench_cache_reads.py --rows 200000 --row-shape 32 4 4
    python benchmarks/bench_cache_reads.py --rows 12000 --row-shape 1280 4 4 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from protoquant_hf.concepts.shards import (
    DEFAULT_MAX_RESIDENT_BYTES, ShardedArray, read_npy_header, shard_files, write_shard,
)


def resident_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_store(folder: Path, rows: int, row_shape: tuple[int, ...], shard_size: int) -> list[tuple[Path, int]]:
    rng = np.random.default_rng(0)
    shards = []
    for i, start in enumerate(range(0, rows, shard_size)):
        count = min(shard_size, rows - start)
        name = f"{i:05d}"
        write_shard(folder, name, rng.standard_normal((count, *row_shape), dtype=np.float32).astype(np.float16),
                    np.zeros(count, dtype=np.int64))
        shards.append((shard_files(folder, name)[0], count))
    return shards


class MmapReader:
    """The same gather over plain read-only memory maps, kept open (their pages stay resident)."""

    def __init__(self, shards, row_shape):
        self.arrays = [np.load(path, mmap_mode="r") for path, _ in shards]
        self.offsets = np.concatenate([[0], np.cumsum([count for _, count in shards])])
        self.row_shape = row_shape

    def read_sorted(self, rows):
        out = np.empty((len(rows), *self.row_shape), dtype=np.float16)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        ids, starts = np.unique(shard_of, return_index=True)
        for shard_id, start, end in zip(ids, starts, np.append(starts[1:], len(rows))):
            np.take(self.arrays[shard_id], rows[start:end] - self.offsets[shard_id], axis=0, out=out[start:end],
                    mode="clip")
        return out

    def close(self):
        self.arrays = []


class PreadReader:
    """One `preadv` per row straight into the batch."""

    def __init__(self, shards, row_shape):
        self.files, self.data_offsets = [], []
        for path, _ in shards:
            with open(path, "rb") as file:
                self.data_offsets.append(read_npy_header(file)[3])
            self.files.append(os.open(path, os.O_RDONLY))
        self.offsets = np.concatenate([[0], np.cumsum([count for _, count in shards])])
        self.row_shape = row_shape
        self.row_bytes = int(np.prod(row_shape)) * 2

    def read_sorted(self, rows):
        out = np.empty((len(rows), *self.row_shape), dtype=np.float16)
        flat, size = memoryview(out.reshape(-1).view(np.uint8)), self.row_bytes
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for j, (row, shard_id) in enumerate(zip(rows.tolist(), shard_of.tolist())):
            position = self.data_offsets[shard_id] + (row - int(self.offsets[shard_id])) * self.row_bytes
            os.preadv(self.files[shard_id], [flat[j * size : (j + 1) * size]], position)
        return out

    def close(self):
        for descriptor in self.files:
            os.close(descriptor)
        self.files = []


def epoch_batches(rows: int, batch_size: int, batches: int | None, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(rows)
    out = [np.sort(order[start : start + batch_size]) for start in range(0, rows, batch_size)]
    return out[:batches] if batches else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--row-shape", type=int, nargs="+", default=[32, 4, 4])
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=None, help="batches per epoch (default: the whole epoch)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--bounds-mb", type=float, nargs="+", default=[DEFAULT_MAX_RESIDENT_BYTES / 2**20, 32],
                        help="the store's resident bounds to measure (default: its default, and 32 MB)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row_shape = tuple(args.row_shape)

    with tempfile.TemporaryDirectory() as folder:
        shards = build_store(Path(folder), args.rows, row_shape, args.shard_size)
        store_mb = sum(path.stat().st_size for path, _ in shards) / 2**20
        def store(bound_mb):
            return lambda: ShardedArray([p for p, _ in shards], [c for _, c in shards], row_shape, np.float16,
                                        max_resident_bytes=int(bound_mb * 2**20))

        readers = {f"store, bound {bound:g} MB": store(bound) for bound in args.bounds_mb}
        readers |= {
            "mmap": lambda: MmapReader(shards, row_shape),
            "pread": lambda: PreadReader(shards, row_shape),
        }
        per_batch = {name: [] for name in readers}  # per pass: median ms per batch
        growth = {}
        reference = None
        for name, make in readers.items():
            reader = make()
            for batch in epoch_batches(args.rows, args.batch_size, args.batches, seed=99):  # warm-up: page cache
                reader.read_sorted(batch)
            if hasattr(reader, "close"):
                reader.close()
            reader = make()
            before = resident_file_mb()
            for pass_ in range(args.passes):
                times = []
                for batch in epoch_batches(args.rows, args.batch_size, args.batches, seed=pass_):
                    start = time.perf_counter()
                    values = reader.read_sorted(batch)
                    times.append(time.perf_counter() - start)
                per_batch[name].append(1000 * statistics.median(times))
                if pass_ == 0:
                    checksum = float(values.astype(np.float32).sum())
                    reference = checksum if reference is None else reference
                    assert checksum == reference, f"{name} read other values"
            growth[name] = resident_file_mb() - before
            reader.close()

    result = {
        "rows": args.rows, "row_shape": row_shape, "shard_size": args.shard_size, "batch_size": args.batch_size,
        "store_mb": store_mb, "ms_per_batch": per_batch, "rss_file_growth_mb": growth,
        "ratio_to_mmap": {name: [a / b for a, b in zip(times, per_batch["mmap"])] for name, times in per_batch.items()},
    }
    print(f"{args.rows} rows of {row_shape} fp16 ({store_mb:.1f} MB in {len(shards)} shards), batch {args.batch_size}")
    print("| reader | ms per batch (median of passes) | × mmap (per pass) | RssFile growth |")
    print("|---|---|---|---|")
    for name in readers:
        ratios = ", ".join(f"{r:.2f}" for r in result["ratio_to_mmap"][name])
        print(f"| {name} | {statistics.median(per_batch[name]):.2f} | {ratios} | {growth[name]:.1f} MB |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
