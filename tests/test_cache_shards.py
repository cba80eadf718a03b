"""The sharded feature cache: reads across shards, resuming killed builds, repairing one shard, streams, content keys,
the one-shard memory bound and two-process extraction."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from tiny_backbones import tiny_backbone_config
from transformers import BitImageProcessor

import protoquant_hf.concepts.shards as shards_module
from protoquant_hf import ProtoQuantConfig, ProtoQuantForImageClassification
from protoquant_hf.concepts import ConceptStats, FeatureCache, cache_key, extract_features, set_concepts
from protoquant_hf.concepts.shards import ShardedArray, shard_order
from protoquant_hf.data import make_image_transform, synthetic_stream

TESTS = Path(__file__).resolve().parent
SIZES = [(32, 32), (40, 36), (36, 48), (32, 64)]  # mixed sizes: the transform must bring them all to 32 x 32


def tiny_model() -> ProtoQuantForImageClassification:
    backbone_config, _ = tiny_backbone_config("resnet")
    torch.manual_seed(0)
    return ProtoQuantForImageClassification(
        ProtoQuantConfig(backbone_config=backbone_config, num_concepts=4, image_size=32, id2label={0: "a", 1: "b"})
    ).eval()


def images_dataset(num_rows: int = 10, seed: int = 0) -> Dataset:
    """Random RGB images of mixed sizes with labels 0/1."""
    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(rng.integers(0, 255, (*SIZES[i % len(SIZES)], 3), dtype=np.uint8)) for i in range(num_rows)
    ]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])})
    return Dataset.from_dict({"image": images, "label": [i % 2 for i in range(num_rows)]}, features=features)


def inputs():
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tiny_model(), processor, make_image_transform(processor)


def direct_features(model, dataset, transform) -> np.ndarray:
    """The truth: the backbone run on every image at once, no cache involved. `(N, D, H, W)`."""
    with torch.inference_mode():
        return model.forward_features(transform(dataset[:])["pixel_values"]).float().numpy()


@pytest.fixture
def count_images(monkeypatch):
    """Images the backbone runs on (a list of batch sizes); after `fail_after` calls, the next raises KeyboardInterrupt."""
    calls, settings = [], {"fail_after": None}
    original = ProtoQuantForImageClassification.forward_features

    def counting(self, pixel_values):
        if settings["fail_after"] is not None and len(calls) == settings["fail_after"]:
            raise KeyboardInterrupt
        calls.append(len(pixel_values))
        return original(self, pixel_values)

    monkeypatch.setattr(ProtoQuantForImageClassification, "forward_features", counting)
    return calls, settings


def as_source(dataset: Dataset, kind: str):
    return dataset if kind == "dataset" else dataset.to_iterable_dataset()


def test_sharded_reads_equal_the_backbone_features(tmp_path):
    model, processor, transform = inputs()
    dataset = images_dataset(10)
    cache = extract_features(model, dataset, processor, transform, split="train", dtype="float32", batch_size=3,
                             shard_size=4, cache_dir=tmp_path, show_progress=False)
    truth = direct_features(model, dataset, transform)
    assert [shard["rows"] for shard in cache.meta["shards"]] == [4, 4, 2]
    assert len(cache) == 10 and cache.shape == truth.shape and cache.dtype == np.float32
    rows = np.array([9, 0, 5, 3, 4, 8, 1, 5])  # every shard, out of order, one row twice
    features, labels = cache.read(rows)
    torch.testing.assert_close(features, torch.from_numpy(truth[rows]), rtol=1e-5, atol=1e-5)
    assert labels.tolist() == [row % 2 for row in rows]
    torch.testing.assert_close(cache.pooled(batch_size=3), torch.from_numpy(truth.mean(axis=(2, 3))), rtol=1e-5, atol=1e-5)
    vectors, vector_labels = cache.feature_vectors(batch_size=3)
    flat = torch.from_numpy(truth).flatten(2).transpose(1, 2).reshape(-1, truth.shape[1])
    nonzero = flat.norm(dim=1) > 0
    torch.testing.assert_close(vectors, flat[nonzero], rtol=1e-5, atol=1e-5)
    assert torch.equal(vector_labels, torch.arange(10).repeat_interleave(truth.shape[2] * truth.shape[3])[nonzero] % 2)
    np.testing.assert_allclose(cache.to_numpy(), truth, rtol=1e-5, atol=1e-5)


def test_float16_reads_widen_exactly():
    stored = np.random.default_rng(0).normal(size=(7, 3, 2, 2)).astype(np.float16)
    cache = FeatureCache.from_arrays(stored, np.arange(7), shard_size=3)
    features, _ = cache.read(np.array([6, 2, 3]))
    assert features.dtype == torch.float32 and cache.dtype == np.float16
    assert torch.equal(features, torch.from_numpy(stored[[6, 2, 3]].astype(np.float32)))


@pytest.mark.parametrize("kind", ["dataset", "stream"])
def test_killed_build_resumes_with_only_the_missing_shards(tmp_path, count_images, kind):
    calls, settings = count_images
    model, processor, transform = inputs()
    dataset = images_dataset(10)
    arguments = dict(split="train", dtype="float32", batch_size=2, shard_size=4, show_progress=False)
    settings["fail_after"] = 4  # batches 1-4 fill shards 0 and 1; the kill comes in the fifth, the last
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, as_source(dataset, kind), processor, transform, cache_dir=tmp_path / "killed", **arguments)
    settings["fail_after"] = None
    calls.clear()
    resumed = extract_features(model, as_source(dataset, kind), processor, transform, cache_dir=tmp_path / "killed", **arguments)
    assert sum(calls) == 2  # only the rows of the missing shard 2 went through the backbone
    clean = extract_features(model, as_source(dataset, kind), processor, transform, cache_dir=tmp_path / "clean", **arguments)
    np.testing.assert_array_equal(resumed.to_numpy(), clean.to_numpy())
    assert np.array_equal(resumed.labels, clean.labels) and resumed.meta["shards"] == clean.meta["shards"]
    assert not list((tmp_path / "killed").glob(".*partial*"))


@pytest.mark.parametrize("damage", ["delete", "truncate"])
@pytest.mark.parametrize("kind", ["dataset", "stream"])
def test_damaged_shard_of_a_finished_entry_is_rebuilt_alone(tmp_path, caplog, count_images, damage, kind):
    calls, _ = count_images
    model, processor, transform = inputs()
    dataset = images_dataset(10)
    arguments = dict(split="train", dtype="float32", batch_size=2, shard_size=4, cache_dir=tmp_path, show_progress=False)
    first = extract_features(model, as_source(dataset, kind), processor, transform, **arguments)
    expected, path = first.to_numpy(), first.path
    name = first.meta["shards"][1]["name"]
    del first
    damaged = path / f"features-{name}.npy"
    if damage == "delete":
        damaged.unlink()
    else:
        damaged.write_bytes(damaged.read_bytes()[:-7])
    calls.clear()
    with caplog.at_level("WARNING"):
        again = extract_features(model, as_source(dataset, kind), processor, transform, **arguments)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "Rebuilding that shard" in warnings[0]
    assert sum(calls) == 4  # shard 1's rows only
    assert again.path == path
    np.testing.assert_array_equal(again.to_numpy(), expected)


def test_a_dataset_and_its_stream_give_equal_features(tmp_path):
    model, processor, transform = inputs()
    dataset = images_dataset(10)
    arguments = dict(split="train", dtype="float32", batch_size=3, shard_size=4, cache_dir=tmp_path, show_progress=False)
    mapped = extract_features(model, dataset, processor, transform, **arguments)
    streamed = extract_features(model, dataset.to_iterable_dataset(num_shards=2), processor, transform, **arguments)
    assert streamed.path != mapped.path  # a stream is keyed by its description, a dataset by its content
    # Batches run across shard boundaries in a stream, not in a dataset: equal up to the backbone's float rounding.
    np.testing.assert_allclose(streamed.to_numpy(), mapped.to_numpy(), rtol=1e-5, atol=1e-5)
    assert np.array_equal(streamed.labels, mapped.labels)


def test_the_key_follows_image_content_not_the_private_fingerprint():
    model, processor, _ = inputs()
    original, rebuilt, edited = images_dataset(6), images_dataset(6), images_dataset(6)
    pixels = np.array(edited[3]["image"])
    pixels[0, 0] ^= 1  # one pixel of one image
    edited = Dataset.from_dict(
        {"image": [edited[i]["image"] if i != 3 else Image.fromarray(pixels) for i in range(6)], "label": edited["label"]},
        features=edited.features,
    )
    # Bogus fingerprints (datasets' own methods still read them, the key must not): equal for the edited copy,
    # different for the identical one.
    original._fingerprint, rebuilt._fingerprint, edited._fingerprint = "same", "other", "same"

    def key(dataset, **kwargs):
        return cache_key(model, processor, dataset, "train", "float32", **kwargs)

    assert key(original) == key(rebuilt)  # same content, another fingerprint
    assert key(edited) != key(original)  # same length and fingerprint, one pixel changed
    assert key(original.select([1, 0, 2, 3, 4, 5])) != key(original)  # same rows, another order
    assert key(original.to_iterable_dataset()) == key(rebuilt.to_iterable_dataset())
    assert key(edited.to_iterable_dataset()) != key(original.to_iterable_dataset())
    described = dict(content_description={"name": "my-stream", "revision": "abc"})
    assert key(original.to_iterable_dataset(), **described) == key(edited.to_iterable_dataset(), **described)


def test_a_stream_is_written_one_shard_buffer_at_a_time(tmp_path, monkeypatch):
    """The memory bound is structural: a shard is written every shard_size rows while the stream is read, from one
    reused buffer, so no more than a shard plus a batch is ever held."""
    model, processor, transform = inputs()
    seen, written = [0], []

    def counting_transform(batch):
        seen[0] += len(batch["image"])
        return transform(batch)

    original = shards_module.write_shard

    def recording(folder, name, values, labels):
        written.append({"name": name, "rows": len(values), "seen": seen[0], "buffer": values})
        original(folder, name, values, labels)

    monkeypatch.setattr(shards_module, "write_shard", recording)
    cache = extract_features(model, images_dataset(10).to_iterable_dataset(), processor, counting_transform, split="train",
                             dtype="float32", batch_size=3, shard_size=4, cache_dir=tmp_path, show_progress=False)
    assert [shard["rows"] for shard in written] == [4, 4, 2] and len(cache) == 10
    total = 0
    for shard in written:
        total += shard["rows"]
        assert shard["seen"] - total < 3  # written as soon as it filled: less than a batch read ahead
        assert np.shares_memory(shard["buffer"], written[0]["buffer"])  # one buffer, reused for every shard
    assert [shard["name"] for shard in cache.meta["shards"]] == ["rank0-00000", "rank0-00001", "rank0-00002"]


def test_shard_order_shuffles_shards_then_rows_within_each():
    counts = [4, 4, 2, 3]
    order = shard_order(counts, epoch=1, seed=0)
    assert sorted(order.tolist()) == list(range(13))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    shard_of = np.searchsorted(offsets, order, side="right") - 1
    assert (np.diff(shard_of) != 0).sum() == len(counts) - 1  # each shard visited in one contiguous run
    assert np.array_equal(order, shard_order(counts, epoch=1, seed=0))
    assert not np.array_equal(order, shard_order(counts, epoch=2, seed=0))


def test_shard_window_order_mixes_the_rows_of_each_window_and_nothing_else():
    counts = [4, 4, 2, 3, 4]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    order = shard_order(counts, epoch=0, seed=3, window=2)
    assert sorted(order.tolist()) == list(range(17))
    shard_of = np.searchsorted(offsets, order, side="right") - 1
    last_position = {shard: np.flatnonzero(shard_of == shard).max() for shard in range(len(counts))}
    blocks, current, end = [], set(), -1
    for position, shard in enumerate(shard_of):  # a block ends where every shard begun in it has ended
        current.add(int(shard))
        end = max(end, last_position[shard])
        if position == end:
            blocks.append(current)
            current = set()
    assert [len(block) for block in blocks] == [2, 2, 1]  # windows of 2 whole shards (the last of the 1 left)
    first_window = shard_of[: sum(counts[i] for i in blocks[0])]
    assert (np.diff(first_window) != 0).sum() > 1  # a window's rows are interleaved, not one shard after the other
    assert np.array_equal(order, shard_order(counts, epoch=0, seed=3, window=2))
    with pytest.raises(ValueError, match="at least 1 shard"):
        shard_order(counts, epoch=0, seed=0, window=0)


def test_sharded_array_reads_sorted_rows_across_shards():
    data = np.arange(26, dtype=np.float32).reshape(13, 2)
    store = ShardedArray([data[:5], data[5:9], data[9:]], [5, 4, 4], (2,), np.float32)  # rows of shape (K,)
    rows = np.array([0, 4, 5, 8, 9, 12])
    assert np.array_equal(store.read_sorted(rows), data[rows]) and store.shape == (13, 2)
    with pytest.raises(IndexError, match="13 rows"):
        store.read_sorted(np.array([3, 13]))


TWO_PROCESS_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from accelerate import Accelerator
from test_cache_shards import fixed_concepts, images_dataset, inputs
from protoquant_hf.concepts import ConceptStats, extract_features

accelerator = Accelerator(cpu=True)
model, processor, transform = inputs()
dataset = images_dataset(11)
arguments = dict(split="train", dtype="float32", batch_size=2, shard_size=3, cache_dir={cache!r}, show_progress=False,
                 accelerator=accelerator)
stream = extract_features(model, dataset.to_iterable_dataset(), processor, transform, **arguments)
mapped = extract_features(model, dataset, processor, transform, **arguments)
fixed_concepts(model)
usage = ConceptStats.collect(model, stream, accelerator=accelerator).usage.tolist()  # each process counts its share
if accelerator.is_main_process:
    print(json.dumps({{"stream": str(stream.path), "mapped": str(mapped.path), "processes": accelerator.num_processes,
                      "usage": usage}}))
accelerator.end_training()  # destroys the process group before interpreter teardown (else gloo may abort at exit)
"""


def fixed_concepts(model) -> None:
    """Seeded concepts, the same in every process and run (usage counts are then comparable)."""
    num_concepts, hidden = model.codebook.concepts.shape
    set_concepts(model, torch.randn(num_concepts, hidden, generator=torch.Generator().manual_seed(0)))


def test_two_processes_extract_every_row_exactly_once(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(tests=str(TESTS), cache=str(tmp_path / "cache")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", str(script)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    paths = json.loads(result.stdout.strip().splitlines()[-1])
    assert paths["processes"] == 2
    model, processor, transform = inputs()
    dataset = images_dataset(11)
    one = extract_features(model, dataset, processor, transform, split="train", dtype="float32", shard_size=3,
                           cache_dir=tmp_path / "one", show_progress=False)
    truth = one.to_numpy()
    # Map-style: shard s came from process s % 2, and the cache is the one-process cache, row for row.
    mapped = FeatureCache.open(paths["mapped"])
    np.testing.assert_allclose(mapped.to_numpy(), truth, rtol=1e-5, atol=1e-5)
    assert np.array_equal(mapped.labels, one.labels)
    # Stream: each process wrote its part's shards; together they hold every row exactly once.
    stream = FeatureCache.open(paths["stream"])
    assert sorted({shard["rank"] for shard in stream.meta["shards"]}) == [0, 1] and len(stream) == 11
    distances = ((stream.to_numpy()[:, None] - truth[None]) ** 2).reshape(11, 11, -1).sum(-1)
    match = distances.argmin(axis=1)
    assert sorted(match.tolist()) == list(range(11))  # a permutation: no row twice, none missing
    assert distances[np.arange(11), match].max() < 1e-8
    assert np.array_equal(stream.labels, one.labels[match])
    # Global counts stay global: the usage counted by 2 processes over their shares is the 1-process count.
    fixed_concepts(model)
    assert paths["usage"] == ConceptStats.collect(model, one).usage.tolist()
    # The cache's row order of a 2-process stream can be replayed from the stream (the gallery reads images so).
    replayed = [example["label"] for example in stream.examples_in_row_order(dataset.to_iterable_dataset())]
    assert replayed == stream.labels.tolist() and len(replayed) == 11
    images = [np.asarray(example["image"]) for example in stream.examples_in_row_order(dataset.to_iterable_dataset())]
    assert [int(m) for m in match] == [next(i for i in range(11) if np.array_equal(images[row], np.asarray(dataset[i]["image"])))
                                       for row in range(11)]
    # A lost shard of process 1's part is rebuilt by one process, from that part of the stream split for 2.
    expected = stream.to_numpy()
    (stream.path / "features-rank1-00001.npy").unlink()
    del stream
    repaired = extract_features(model, dataset.to_iterable_dataset(), processor, transform, split="train", dtype="float32",
                                batch_size=2, shard_size=3, cache_dir=tmp_path / "cache", show_progress=False)
    assert str(repaired.path) == paths["stream"]
    np.testing.assert_allclose(repaired.to_numpy(), expected, rtol=1e-5, atol=1e-5)


def test_synthetic_streams_of_two_lengths_have_two_keys():
    """Their first images are the same: only the description (their length, in the stream's info) tells them apart."""
    model, processor, _ = inputs()
    keys = {cache_key(model, processor, synthetic_stream(size), "train", "float16") for size in (20, 30)}
    assert len(keys) == 2


def test_a_bf16_backbone_pass_is_its_own_entry(tmp_path):
    """--mixed_precision bf16 runs extraction under the accelerator's autocast: other features, so another key."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model, processor, transform = inputs()
    dataset = images_dataset(6)
    arguments = dict(split="train", dtype="float32", cache_dir=tmp_path, show_progress=False)
    full = extract_features(model, dataset, processor, transform, accelerator=Accelerator(cpu=True), **arguments)
    AcceleratorState._reset_state(True)  # the state is a process singleton; its precision is fixed at creation
    try:
        half = extract_features(model, dataset, processor, transform, accelerator=Accelerator(cpu=True, mixed_precision="bf16"), **arguments)
    finally:
        AcceleratorState._reset_state(True)
    assert half.path != full.path
    difference = np.abs(half.to_numpy() - full.to_numpy())
    assert 0 < difference.max() < 0.02 * np.abs(full.to_numpy()).max()  # bf16 rounding: close, not equal


def test_as_many_shards_stay_mapped_as_the_descriptor_limit_allows(monkeypatch):
    """Every training batch touches every shard: keeping only 64 maps of a larger cache re-maps shards batch after
    batch (15x slower reads at 123 shards). The default follows the file-descriptor limit each map uses."""
    import resource

    for soft, expected in ((1024, 512), (20_000, 10_000), (100, 64), (resource.RLIM_INFINITY, 16_384)):
        monkeypatch.setattr(resource, "getrlimit", lambda _, soft=soft: (soft, resource.RLIM_INFINITY))
        assert ShardedArray([np.zeros((1, 2))], [1], (2,), np.float32).max_open == expected
    assert ShardedArray([np.zeros((1, 2))], [1], (2,), np.float32, max_open=3).max_open == 3


def test_every_shard_written_hands_the_free_heap_back(tmp_path, monkeypatch):
    import protoquant_hf.concepts.shards as shards_module

    released = []
    monkeypatch.setattr(shards_module, "release_free_heap", lambda: released.append(True))
    writer = shards_module.ShardWriter(tmp_path, (f"{i:05d}" for i in range(10)), shard_size=4, dtype=np.float16)
    writer.add(np.zeros((10, 2), dtype=np.float32), np.zeros(10, dtype=np.int64))
    assert len(released) == 2  # two full shards written so far
    writer.close()
    assert len(released) == 3


def write_store(folder: Path, shard_rows: list[int], row_shape: tuple[int, ...], seed: int = 0, **store_options):
    """Shards of random float16 rows written as a store would; returns (store, every row in one array)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((sum(shard_rows), *row_shape)).astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum(shard_rows)])
    for i, rows in enumerate(shard_rows):
        shards_module.write_shard(folder, f"{i:05d}", data[offsets[i] : offsets[i + 1]], np.zeros(rows))
    paths = [shards_module.shard_files(folder, f"{i:05d}")[0] for i in range(len(shard_rows))]
    return ShardedArray(paths, shard_rows, row_shape, np.float16, **{"max_open": 2, **store_options}), data


def test_mapped_reads_are_exact_when_maps_are_evicted_and_closed(tmp_path):
    store, data = write_store(tmp_path, [5, 4, 0, 4, 3], (2, 3))  # an empty shard too; 2 maps for 5 shards
    rng = np.random.default_rng(1)
    for _ in range(3):
        rows = np.sort(rng.choice(len(data), size=9, replace=False))
        assert np.array_equal(store.read_sorted(rows), data[rows])
        assert len(store._open) <= 2
    assert np.array_equal(store.to_numpy(), data)
    store.close()
    assert not store._open and np.array_equal(store.read_sorted(np.array([0, 15])), data[[0, 15]])  # maps anew


def resident_file_mb() -> float:
    """The process's resident file-backed pages (`RssFile` in /proc/self/status), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(
    not Path("/proc/self/status").exists() or shards_module._DONTNEED is None, reason="needs Linux's madvise and RssFile"
)
def test_shuffled_epochs_do_not_keep_the_cache_pages_resident(tmp_path):
    """A shuffled epoch touches every page of the cache; left mapped, those pages count in RSS (RSS grew by the cache's
    size, 1.2 GB at 1 M images). Without dropping them this grows by ~48 MB (the whole store)."""
    store, data = write_store(tmp_path, [2048] * 6, (4, 16, 16), max_open=6, max_resident_bytes=8 * 2**20)  # 6 x 8 MB
    before = resident_file_mb()
    order = np.random.default_rng(0).permutation(len(data))
    for start in range(0, len(order), 512):
        rows = np.sort(order[start : start + 512])
        batch = store.read_sorted(rows)
    assert np.array_equal(batch, data[rows])
    assert resident_file_mb() - before < 20, "the mapped shard pages stayed resident"  # bound: 8 MB + one shard


def test_pages_are_dropped_only_once_the_shards_read_exceed_the_bound(tmp_path, monkeypatch):
    """Dropping costs refaults, so a store within the bound is never dropped; above it, each drop follows reads of
    more than the bound (and every open shard read since is dropped)."""
    dropped = []
    monkeypatch.setattr(shards_module._MappedShard, "drop_pages", lambda self: dropped.append(self))
    shard_bytes = 100 * 2 * 3 * 2  # 100 rows of (2, 3) float16
    rows = np.arange(0, 400, 7)  # every shard, once per read
    small, _ = write_store(tmp_path / "small", [100] * 4, (2, 3), max_open=4, max_resident_bytes=4 * shard_bytes)
    for _ in range(3):
        small.read_sorted(rows)
    assert not dropped
    large, data = write_store(tmp_path / "large", [100] * 4, (2, 3), max_open=4, max_resident_bytes=2 * shard_bytes)
    assert np.array_equal(large.read_sorted(rows), data[rows])
    assert len(dropped) == 3  # the third shard read crosses 2 shards' bytes: shards 0-2 dropped, shard 3 pending
    large.read_sorted(rows)
    assert len(dropped) == 3 + 3  # shard 3 (pending) + 0 + 1 cross it again
