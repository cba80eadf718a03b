"""Tests of streaming input: load_image_dataset(streaming=True) for every source kind, and the synthetic stream."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from datasets import ClassLabel, Dataset, Features, IterableDataset, IterableDatasetDict, Value
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node
from test_data import write_folder

from protoquant_hf.data import (
    SyntheticStreamConfig,
    hold_out_validation,
    load_image_dataset,
    synthetic_stream,
    synthetic_stream_class_names,
    synthetic_stream_image,
)
from protoquant_hf.data import datasets as data_module


def gray(value: int, size: tuple[int, int] = (16, 16)) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.full(size[::-1], value, dtype=np.uint8))


def rows(split) -> list[tuple[bytes, int]]:
    """``(pixels, label)`` of every example, in iteration order (works for map-style splits and streams)."""
    return [(np.asarray(example["image"]).tobytes(), example["label"]) for example in split]


def count_image_opens(monkeypatch) -> list[int]:
    """Count ``PIL.Image.open`` calls (every image decode goes through it); returns a one-item counter."""
    opens = [0]
    original = PIL.Image.open

    def counting_open(*args, **kwargs):
        opens[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    return opens


# ----------------------------------------------------------------------------------------------------------------
# Bundled datasets: a stream is the map-style dataset, lazily
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "max_samples"), [("digits", None), ("digits", 40), ("animal-mnist", 40)])
def test_bundled_stream_equals_map_style(name, max_samples):
    mapped = load_image_dataset(name, max_samples_per_split=max_samples)
    stream = load_image_dataset(name, max_samples_per_split=max_samples, streaming=True)
    assert isinstance(stream, IterableDatasetDict) and set(stream) == {"train", "test"}
    for split in ("train", "test"):
        assert isinstance(stream[split], IterableDataset) and stream[split].n_shards > 1
        assert stream[split].features["label"].names == mapped[split].features["label"].names
        assert rows(stream[split]) == rows(mapped[split])  # same images and labels, same order


def test_bundled_stream_checks_labels_argument():
    names = [str(digit) for digit in range(10)]
    assert load_image_dataset("digits", streaming=True, labels=names)["train"].features["label"].names == names
    with pytest.raises(ValueError, match=r"differ from the classes of 'digits'.*drop labels="):
        load_image_dataset("digits", streaming=True, labels=names[::-1])


# ----------------------------------------------------------------------------------------------------------------
# Local folders and files: classes from the ClassLabel feature, renamed columns
# ----------------------------------------------------------------------------------------------------------------


def test_image_folder_stream_gets_class_names_from_features(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data", {"train/cat": [gray(i) for i in range(3)],
                                             "train/dog": [gray(100 + i) for i in range(3)],
                                             "test/cat": [gray(50)], "test/dog": [gray(150)]})  # fmt: skip
    stream = load_image_dataset(root, streaming=True, cache_dir=tmp_path / "cache")
    mapped = load_image_dataset(root, cache_dir=tmp_path / "cache")
    for split in ("train", "test"):
        assert stream[split].features["label"] == ClassLabel(names=["cat", "dog"])
        assert sorted(rows(stream[split])) == sorted(rows(mapped[split]))
    # Lazy: loading a stream opens no image; iterating decodes each image exactly once.
    opens = count_image_opens(monkeypatch)
    stream = load_image_dataset(root, streaming=True, cache_dir=tmp_path / "cache")
    assert opens[0] == 0
    examples = list(stream["train"]) + list(stream["test"])
    assert len(examples) == 8 and opens[0] == 8
    assert all(isinstance(example["image"], PIL.Image.Image) for example in examples)


def test_parquet_stream_renames_columns_and_keeps_class_label(tmp_path):
    features = Features({"img": ImageFeature(), "species": ClassLabel(names=["owl", "cat", "emu"]), "id": Value("int32")})
    data = {"img": [gray(i) for i in range(6)], "species": [0, 1, 2, 0, 1, 2], "id": list(range(6))}
    Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "train.parquet"))
    Dataset.from_dict({key: values[:2] for key, values in data.items()}, features=features).to_parquet(
        str(tmp_path / "test.parquet")
    )
    files = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    kwargs = dict(data_files=files, image_column="img", label_column="species", cache_dir=tmp_path / "cache")
    stream = load_image_dataset("parquet", streaming=True, **kwargs)
    assert list(stream["train"].features) == ["image", "label", "id"]
    assert stream["train"].features["label"].names == ["owl", "cat", "emu"]  # from the feature, not sorted
    first = next(iter(stream["train"]))
    assert set(first) == {"image", "label", "id"} and first["id"] == 0
    mapped = load_image_dataset("parquet", **kwargs)
    assert rows(stream["train"]) == rows(mapped["train"]) and rows(stream["test"]) == rows(mapped["test"])
    with pytest.raises(ValueError, match=r"no column 'image'.*image_column="):
        load_image_dataset("parquet", streaming=True, data_files=files, label_column="species")


# ----------------------------------------------------------------------------------------------------------------
# Labels that are not a ClassLabel
# ----------------------------------------------------------------------------------------------------------------


def counting_stream(labels: list, label_feature: Value) -> tuple[IterableDatasetDict, list[int]]:
    """A stream whose generator counts the rows it yields (the list's only item)."""
    yielded = [0]
    images = [gray(10 * i) for i in range(len(labels))]

    def generate():
        for image, label in zip(images, labels):
            yielded[0] += 1
            yield {"picture": image, "kind": label}

    features = Features({"picture": ImageFeature(), "kind": label_feature})
    return IterableDatasetDict({"train": IterableDataset.from_generator(generate, features=features)}), yielded


@pytest.mark.parametrize(("values", "feature"), [(["owl", "cat", "emu"] * 2, Value("string")),
                                                  ([2, 0, 1] * 2, Value("int64"))])  # fmt: skip
def test_stream_labels_without_class_label_need_labels_argument(values, feature, monkeypatch):
    stream, yielded = counting_stream(values, feature)
    # A Hub id: the real remote code path, with datasets.load_dataset answering from memory.
    monkeypatch.setattr(data_module.datasets, "load_dataset", lambda *args, **kwargs: stream)
    kwargs = dict(streaming=True, image_column="picture", label_column="kind", test_size=0.5)
    with pytest.raises(ValueError) as error:
        load_image_dataset("someone/animals", **kwargs)
    message = str(error.value)
    assert "not a ClassLabel" in message and "labels=[...]" in message and "--labels" in message
    assert "cast the column to ClassLabel" in message
    assert yielded[0] == 0  # refused from the schema alone, before any row was read

    loaded = load_image_dataset("someone/animals", labels=["cat", "emu", "owl"], **kwargs)
    assert loaded["train"].features["label"].names == ["cat", "emu", "owl"]
    got = {pixels: label for split in ("train", "test") for pixels, label in rows(loaded[split])}
    expected = [2, 0, 1] * 2  # owl, cat, emu by name; or the int labels as ids
    assert got == {np.asarray(gray(10 * i)).tobytes(): label for i, label in enumerate(expected)}
    assert all(isinstance(example["image"], PIL.Image.Image) for example in loaded["train"])


def test_stream_labels_outside_labels_argument_fail_when_read(monkeypatch):
    stream, _ = counting_stream(["owl", "yak"], Value("string"))
    monkeypatch.setattr(data_module.datasets, "load_dataset", lambda *args, **kwargs: stream)
    loaded = load_image_dataset("someone/animals", streaming=True, image_column="picture", label_column="kind",
                                labels=["cat", "owl"], test_size=0.5)  # fmt: skip
    with pytest.raises(ValueError, match=r"Label 'yak' is not one of labels=\['cat', 'owl'\]"):
        list(loaded["train"]) + list(loaded["test"])
    with pytest.raises(ValueError, match="at least 2 distinct classes"):
        load_image_dataset("someone/animals", streaming=True, labels=["cat", "cat"])


def test_map_style_labels_argument_sets_class_order(tmp_path):
    path = tmp_path / "d.parquet"
    Dataset.from_dict({"image": [gray(i) for i in range(4)], "label": ["owl", "cat", "owl", "cat"]},
                      features=Features({"image": ImageFeature(), "label": Value("string")})).to_parquet(str(path))  # fmt: skip
    dataset = load_image_dataset("parquet", data_files=str(path), labels=["owl", "cat"], test_size=0.5,
                                 cache_dir=tmp_path / "cache")  # fmt: skip
    assert dataset["train"].features["label"].names == ["owl", "cat"]  # not sorted: the given order
    pairs = {(np.asarray(ex["image"])[0, 0], ex["label"]) for split in dataset for ex in dataset[split]}
    assert pairs == {(0, 0), (1, 1), (2, 0), (3, 1)}
    with pytest.raises(ValueError, match=r"Label 'owl' is not one of labels="):
        load_image_dataset("parquet", data_files=str(path), labels=["cat", "emu"], cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------------------
# Hold-out test split, max_samples_per_split and bad images, all lazy
# ----------------------------------------------------------------------------------------------------------------


def write_parquet_shards(folder: Path, num_files: int = 4, per_file: int = 15) -> list[str]:
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"])})
    folder.mkdir()
    paths = []
    for file in range(num_files):
        values = range(file * per_file, (file + 1) * per_file)
        paths.append(str(folder / f"part-{file}.parquet"))
        Dataset.from_dict({"image": [gray(v) for v in values], "label": [v % 3 for v in values]},
                          features=features).to_parquet(paths[-1])  # fmt: skip
    return paths


def test_stream_hold_out_is_deterministic_and_independent_of_process_layout(tmp_path):
    files = write_parquet_shards(tmp_path / "shards")  # 60 images, one shard per file
    load = lambda seed: load_image_dataset("parquet", data_files=files, streaming=True, seed=seed,  # noqa: E731
                                           test_size=0.25, cache_dir=tmp_path / "cache")  # fmt: skip
    stream = load(0)
    assert stream["train"].n_shards == 4
    train, test = set(rows(stream["train"])), set(rows(stream["test"]))
    assert not train & test and len(train | test) == 60 and 5 <= len(test) <= 25
    assert "held out" in stream["test"].info.description
    assert set(rows(load(0)["test"])) == test  # deterministic
    assert set(rows(load(1)["test"])) != test  # seeded
    # Two processes (by shards) or three (by examples): each holds out the same test images as one process.
    for world_size in (2, 3):
        for split, expected in (("train", train), ("test", test)):
            parts = [rows(split_dataset_by_node(stream[split], rank, world_size)) for rank in range(world_size)]
            assert sorted(sum(parts, [])) == sorted(expected)


def test_hold_out_validation_of_a_stream_is_a_partition_of_train(tmp_path):
    files = write_parquet_shards(tmp_path / "shards", num_files=2)
    stream = load_image_dataset("parquet", data_files={"train": files, "test": files[:1]}, streaming=True,
                                cache_dir=tmp_path / "cache")  # fmt: skip
    held = hold_out_validation(stream, 0.3)
    assert isinstance(held, IterableDatasetDict)
    train, validation = rows(held["train"]), rows(held["test"])
    assert sorted(train + validation) == sorted(rows(stream["train"])) and validation
    assert rows(hold_out_validation(stream, 0.3)["test"]) == validation
    assert "validation" in held["test"].info.description


def test_stream_max_samples_per_split_takes_the_first_examples(tmp_path):
    files = write_parquet_shards(tmp_path / "shards", num_files=2)
    full = load_image_dataset("parquet", data_files={"train": files, "test": files[1:]}, streaming=True,
                              cache_dir=tmp_path / "cache")  # fmt: skip
    small = load_image_dataset("parquet", data_files={"train": files, "test": files[1:]}, streaming=True,
                               max_samples_per_split=7, cache_dir=tmp_path / "cache")  # fmt: skip
    for split in ("train", "test"):
        assert rows(small[split]) == rows(full[split])[:7]


def test_stream_skips_bad_images_lazily_and_mixed_sizes_are_fine(tmp_path, caplog, monkeypatch):
    root = write_folder(tmp_path / "data", {"cat": [gray(i, size=(16 + i, 20)) for i in range(5)],
                                             "dog": [gray(200 + i, size=(40, 16 + i)) for i in range(5)]})  # fmt: skip
    (root / "dog" / "broken.png").write_bytes(b"this is not an image")
    gray(7, size=(1, 1)).save(root / "cat" / "dot.png")  # below MIN_IMAGE_SIZE
    PIL.Image.fromarray(np.array([[0, 257, 32768, 65535] * 4] * 16, dtype=np.uint16)).save(root / "dog" / "deep.png")
    opens = count_image_opens(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="protoquant_hf.data.datasets"):
        stream = load_image_dataset(root, streaming=True, bad_images="skip", test_size=0.3, cache_dir=tmp_path / "c")
        assert opens[0] == 0 and "skipped" not in caplog.text  # nothing checked up front
        examples = list(stream["train"]) + list(stream["test"])
    assert len(examples) == 11 and {example["image"].size for example in examples} >= {(16, 20), (40, 20)}
    assert opens[0] == 13  # every image decoded once: the check is the decode, not a separate pass
    deep = [np.asarray(ex["image"]) for ex in examples if ex["image"].mode == "L" and np.asarray(ex["image"])[0, 3] == 255]
    assert len(deep) == 1 and deep[0][0, :4].tolist() == [0, 1, 128, 255]  # 16-bit rescaled, as in map style
    skipped = [record.message for record in caplog.records if "skipped bad image" in record.message]
    assert len(skipped) == 2 and any("broken.png" in message and "unreadable" in message for message in skipped)
    assert any("dot.png" in message and "1x1 px" in message for message in skipped)

    stream = load_image_dataset(root, streaming=True, test_size=0.3, cache_dir=tmp_path / "c")  # no error yet
    with pytest.raises(ValueError, match=r"bad image: .*(broken|dot)\.png.*bad_images='skip'"):
        list(stream["train"]) + list(stream["test"])

    capped = load_image_dataset(root, streaming=True, bad_images="skip", max_samples_per_split=6,
                                test_size=0.3, cache_dir=tmp_path / "c")  # fmt: skip
    assert len(list(capped["train"])) == 6  # skipped images do not count towards the cap


# ----------------------------------------------------------------------------------------------------------------
# The synthetic stream
# ----------------------------------------------------------------------------------------------------------------


def test_synthetic_stream_is_a_pure_function_of_seed_and_index():
    first = rows(synthetic_stream(30, num_shards=4))
    assert first == rows(synthetic_stream(30, num_shards=4))  # two iterations agree
    assert first == rows(synthetic_stream(100, num_shards=7))[:30]  # image i does not depend on length or shards
    assert rows(synthetic_stream(30, seed=1)) != first
    assert set(rows(synthetic_stream(30, split="test"))).isdisjoint(first)
    for index in (0, 17, 29):
        pixels, label = synthetic_stream_image(index)
        assert (pixels.tobytes(), label) == first[index] and pixels.shape == (32, 32, 3)
    example = next(iter(synthetic_stream(1, image_size=48)))
    assert example["image"].mode == "RGB" and example["image"].size == (48, 48)


def test_synthetic_stream_any_length_shards_and_balance():
    huge = synthetic_stream(10**9, num_shards=8)  # nothing is generated up front
    assert len(list(huge.take(5))) == 5
    stream = synthetic_stream(1003, num_classes=10, num_shards=6)
    assert stream.n_shards == 6
    assert stream.features["label"] == ClassLabel(names=synthetic_stream_class_names(10))
    assert len(list(stream.take(257))) == 257
    everything = rows(stream)
    assert len(everything) == 1003 and len(set(everything)) == 1003
    counts = Counter(label for _, label in everything)
    assert set(counts) == set(range(10)) and max(counts.values()) - min(counts.values()) <= 1
    for world_size in (2, 4):  # by shards (6 % 2 == 0) and by examples (6 % 4 != 0)
        parts = [rows(split_dataset_by_node(stream, rank, world_size)) for rank in range(world_size)]
        assert all(parts) and sorted(sum(parts, [])) == sorted(everything)  # every row exactly once


def test_synthetic_stream_classes_are_learnable():
    # Nearest class mean of the mean colour: the classes must differ visibly, not only by their label.
    def mean_colours(split: str) -> tuple[np.ndarray, np.ndarray]:
        examples = list(synthetic_stream(400, split=split))
        colours = np.stack([np.asarray(example["image"], dtype=np.float64).mean(axis=(0, 1)) for example in examples])
        return colours, np.array([example["label"] for example in examples])

    train_x, train_y = mean_colours("train")
    test_x, test_y = mean_colours("test")
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in range(10)])
    predicted = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert (predicted == test_y).mean() > 0.9


def test_synthetic_stream_by_name_in_both_modes():
    config = SyntheticStreamConfig(num_images=30, num_test_images=12, num_classes=4, image_size=16, seed=3)
    stream = load_image_dataset("synthetic-stream", streaming=True, synthetic_stream=config)
    mapped = load_image_dataset("synthetic-stream", synthetic_stream=config.to_dict())
    assert isinstance(stream, IterableDatasetDict) and len(mapped["train"]) == 30 and len(mapped["test"]) == 12
    for split in ("train", "test"):
        assert stream[split].features["label"].names == mapped[split].features["label"].names
        assert rows(stream[split]) == rows(mapped[split])
    small = load_image_dataset("synthetic-stream", streaming=True, synthetic_stream=config, max_samples_per_split=5)
    assert rows(small["train"]) == rows(mapped["train"])[:5]
    assert "synthetic-stream" in data_module.BUNDLED_DATASETS
    with pytest.raises(ValueError, match="synthetic_stream= configures the 'synthetic-stream' dataset only"):
        load_image_dataset("digits", synthetic_stream=config)
    with pytest.raises(ValueError, match=r"Unknown SyntheticStreamConfig field\(s\) \['size'\]"):
        load_image_dataset("synthetic-stream", streaming=True, synthetic_stream={"size": 3})
    with pytest.raises(ValueError, match="num_classes=1 must be at least 2"):
        SyntheticStreamConfig(num_classes=1)
