"""Tests of protoquant_hf.data: bundled datasets, local folders, the load_dataset path, bad inputs, preprocessing."""

from __future__ import annotations

import gzip
import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from transformers import BitImageProcessor, ViTImageProcessor

from protoquant_hf.data import (
    BUNDLED_DATASETS,
    MIN_IMAGE_SIZE,
    collate_fn,
    hold_out_validation,
    load_image_dataset,
    make_image_transform,
    to_rgb,
    with_image_size,
)
from protoquant_hf.data import datasets as data_module

FASHION_MNIST_PRESENT = (data_module._FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


def gray(value: int, size: int = 16) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.full((size, size), value, dtype=np.uint8))


def write_folder(root: Path, layout: dict[str, list[PIL.Image.Image]]) -> Path:
    """Write ``{"sub/folder": [images]}`` as ``root/sub/folder/{i}.png``."""
    for folder, images in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(root / folder / f"{index}.png")
    return root


def class_folder(root: Path, per_class: int = 5) -> Path:
    """An image folder without split folders: classes ``cat`` (dark) and ``dog`` (bright)."""
    return write_folder(root, {"cat": [gray(10 + i) for i in range(per_class)],
                               "dog": [gray(200 + i) for i in range(per_class)]})  # fmt: skip


def write_parquet(path: Path, columns: dict[str, list], features: Features | None = None) -> str:
    Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Bundled datasets
# ----------------------------------------------------------------------------------------------------------------


def test_bundled_names_are_documented():
    assert set(BUNDLED_DATASETS) == {"animal-mnist", "fashion-mnist", "digits", "synthetic-parts", "synthetic-stream"}
    assert all(BUNDLED_DATASETS.values())


def test_animal_mnist_fixed_stratified_split():
    dataset = load_image_dataset("animal-mnist")
    assert {split: len(part) for split, part in dataset.items()} == {"train": 8000, "test": 2000}
    names = dataset["train"].features["label"].names
    assert names == ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
    assert np.bincount(dataset["train"]["label"]).tolist() == [800] * 10
    assert np.bincount(dataset["test"]["label"]).tolist() == [200] * 10
    image = dataset["test"][0]["image"]
    assert (image.mode, image.size) == ("L", (28, 28))
    pixels = np.asarray(image)
    assert pixels.max() == 255 and pixels.min() == 0  # white silhouette on black
    # The split does not depend on the user's seed / test_size (served from the cache the second time).
    again = load_image_dataset("animal-mnist", seed=123, test_size=0.5)
    assert again["test"]["label"] == dataset["test"]["label"]
    assert np.array_equal(np.asarray(again["test"][7]["image"]), np.asarray(dataset["test"][7]["image"]))


@pytest.mark.skipif(not FASHION_MNIST_PRESENT, reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_official_split():
    dataset = load_image_dataset("fashion-mnist")
    assert {split: len(part) for split, part in dataset.items()} == {"train": 60000, "test": 10000}
    names = dataset["test"].features["label"].names
    assert names[0] == "T-shirt/top" and names[9] == "Ankle boot" and len(names) == 10
    assert np.bincount(dataset["test"]["label"]).tolist() == [1000] * 10
    # The official files start with an ankle boot in both splits; the split keeps the file order.
    assert dataset["train"][0]["label"] == 9 and dataset["test"][0]["label"] == 9
    assert dataset["train"][0]["image"].size == (28, 28)


def test_digits_split_and_pixel_scaling():
    from sklearn.datasets import load_digits

    dataset = load_image_dataset("digits")
    assert {split: len(part) for split, part in dataset.items()} == {"train": 1258, "test": 539}
    assert dataset["train"].features["label"].names == [str(digit) for digit in range(10)]
    pixels = np.concatenate([np.asarray(example["image"]) for split in dataset for example in dataset[split]])
    expected = np.rint(load_digits().images * 255 / 16)
    assert pixels.shape == (1797 * 8, 8) and pixels.max() == 255
    assert pixels.astype(np.int64).sum() == expected.sum()


def test_max_samples_per_split_is_stratified_and_seeded():
    small = load_image_dataset("animal-mnist", max_samples_per_split=100, seed=1)
    assert {split: len(part) for split, part in small.items()} == {"train": 100, "test": 100}
    assert np.bincount(small["train"]["label"]).tolist() == [10] * 10
    again = load_image_dataset("animal-mnist", max_samples_per_split=100, seed=1)
    assert again["train"]["label"] == small["train"]["label"]


@pytest.mark.parametrize(
    ("name", "break_it", "error", "command"),
    [
        ("animal-mnist", lambda mp: mp.setattr(data_module.importlib.util, "find_spec", lambda name: None),
         ImportError, "pip install --no-deps animal-mnist==0.4"),
        ("fashion-mnist", lambda mp: mp.setattr(data_module, "_FASHION_MNIST_DIR", Path("/nonexistent")),
         FileNotFoundError, "apt-get update && apt-get install -y dataset-fashion-mnist"),
        ("digits", lambda mp: mp.setitem(sys.modules, "sklearn.datasets", None),
         ImportError, "pip install scikit-learn"),
    ],
)  # fmt: skip
def test_missing_bundled_package_gives_install_command(name, break_it, error, command, monkeypatch, tmp_path):
    break_it(monkeypatch)
    with pytest.raises(error, match=command.replace("+", r"\+").replace(".", r"\.")):
        load_image_dataset(name, cache_dir=tmp_path)  # empty cache: forces reading the package files


def test_numpy_pickle_reader_reads_arrays_and_refuses_code():
    array = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    for variant in (array, np.asfortranarray(array), array.astype(np.uint8)):
        read = data_module._array_from_numpy_pickle(pickle.dumps(variant, protocol=4))
        assert read.dtype == variant.dtype and np.array_equal(read, variant)

    class Exploit:
        def __reduce__(self):
            return (print, ("executed",))

    with pytest.raises(ValueError, match="builtins.print"):
        data_module._array_from_numpy_pickle(pickle.dumps(Exploit(), protocol=4))


def test_idx_reader_rejects_other_files(tmp_path):
    path = tmp_path / "fake-ubyte.gz"
    with gzip.open(path, "wb") as file:
        file.write(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # magic of float data
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        data_module._read_idx(path)


def test_unknown_name_lists_bundled_datasets():
    with pytest.raises(ValueError, match=r"'no-such/dataset-xyz': it is not a bundled dataset \(animal-mnist, fash"):
        load_image_dataset("no-such/dataset-xyz")


# ----------------------------------------------------------------------------------------------------------------
# Local folders and the load_dataset path
# ----------------------------------------------------------------------------------------------------------------


def test_image_folder_with_split_folders(tmp_path):
    root = write_folder(tmp_path / "data", {"train/cat": [gray(1)] * 3, "train/dog": [gray(2)] * 3,
                                             "test/cat": [gray(3)], "test/dog": [gray(4)]})  # fmt: skip
    dataset = load_image_dataset(root, cache_dir=tmp_path / "cache")
    assert {split: len(part) for split, part in dataset.items()} == {"train": 6, "test": 2}
    assert dataset["test"].features["label"] == ClassLabel(names=["cat", "dog"])
    assert sorted(np.asarray(example["image"])[0, 0] for example in dataset["test"]) == [3, 4]


def test_image_folder_single_split_gets_seeded_stratified_test_split(tmp_path):
    root = class_folder(tmp_path / "data", per_class=5)
    dataset = load_image_dataset(root, test_size=0.4, seed=3, cache_dir=tmp_path / "cache")
    assert {split: len(part) for split, part in dataset.items()} == {"train": 6, "test": 4}
    assert sorted(dataset["test"]["label"]) == [0, 0, 1, 1]
    again = load_image_dataset(root, test_size=0.4, seed=3, cache_dir=tmp_path / "cache")
    assert [np.asarray(image)[0, 0] for image in again["test"]["image"]] == [
        np.asarray(image)[0, 0] for image in dataset["test"]["image"]
    ]
    other_seed = load_image_dataset(root, test_size=0.4, seed=4, cache_dir=tmp_path / "cache")
    assert len(other_seed["test"]) == 4


def test_hold_out_validation_replaces_test_with_a_stratified_part_of_train(tmp_path):
    root = class_folder(tmp_path / "data", per_class=10)
    dataset = load_image_dataset(root, test_size=0.2, seed=3, cache_dir=tmp_path / "cache")  # 16 train / 4 test
    held = hold_out_validation(dataset, 0.25)
    assert {split: len(part) for split, part in held.items()} == {"train": 12, "test": 4}
    assert sorted(held["test"]["label"]) == [0, 0, 1, 1]  # stratified
    pixels = lambda part: sorted(np.asarray(image).tobytes() for image in part["image"])  # noqa: E731
    assert sorted(pixels(held["train"]) + pixels(held["test"])) == pixels(dataset["train"])
    assert not set(pixels(held["test"])) & set(pixels(dataset["test"]))  # the real test images are gone
    assert "validation" in held["test"].info.description
    assert pixels(hold_out_validation(dataset, 0.25)["test"]) == pixels(held["test"])  # fixed by its seed
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        hold_out_validation(dataset, 1.0)


def test_load_dataset_path_with_renamed_string_labels_and_validation_split(tmp_path):
    features = Features({"img": ImageFeature(), "species": Value("string")})
    files = {
        "train": write_parquet(tmp_path / "train.parquet",
                               {"img": [gray(i) for i in range(6)], "species": ["owl", "cat", "emu"] * 2}, features),
        "validation": write_parquet(tmp_path / "val.parquet", {"img": [gray(99)], "species": ["emu"]}, features),
    }  # fmt: skip
    dataset = load_image_dataset(
        "parquet", data_files=files, image_column="img", label_column="species", cache_dir=tmp_path / "cache"
    )
    assert set(dataset) == {"train", "test"}  # validation became test
    assert dataset["test"].column_names == ["image", "label"]
    # One class list for all splits, although the validation split only holds "emu".
    names = dataset["train"].features["label"].names
    assert names == dataset["test"].features["label"].names == ["cat", "emu", "owl"]
    assert dataset["test"]["label"] == [1]
    assert dataset["train"]["label"] == [2, 0, 1, 2, 0, 1]
    assert np.asarray(dataset["test"][0]["image"])[0, 0] == 99


def test_integer_labels_become_class_labels_sorted_by_value(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"image": [gray(i) for i in range(6)], "label": [10, 3, 7, 10, 3, 7]},
                         Features({"image": ImageFeature(), "label": Value("int32")}))  # fmt: skip
    dataset = load_image_dataset("parquet", data_files=path, test_size=0.5, cache_dir=tmp_path / "cache")
    assert dataset["train"].features["label"].names == ["3", "7", "10"]
    pairs = {(np.asarray(ex["image"])[0, 0], ex["label"]) for split in dataset for ex in dataset[split]}
    assert pairs == {(0, 2), (1, 0), (2, 1), (3, 2), (4, 0), (5, 1)}


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------


def test_corrupt_image_is_named_or_skipped_with_a_warning(tmp_path, caplog):
    root = class_folder(tmp_path / "data")
    (root / "dog" / "broken.png").write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"1 bad image.*broken\.png.*unreadable.*bad_images='skip'"):
        load_image_dataset(root, cache_dir=tmp_path / "cache")

    with caplog.at_level(logging.WARNING, logger="protoquant_hf.data.datasets"):
        dataset = load_image_dataset(root, bad_images="skip", cache_dir=tmp_path / "cache")
    assert sum(len(part) for part in dataset.values()) == 10
    assert any("skipped 1 bad image" in record.message and "broken.png" in record.message for record in caplog.records)


def test_truncated_image_is_named(tmp_path):
    root = class_folder(tmp_path / "data")
    noise = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    noise.save(root / "cat" / "cut.png")
    data = (root / "cat" / "cut.png").read_bytes()
    (root / "cat" / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png: unreadable.*truncated"):
        load_image_dataset(root, cache_dir=tmp_path / "cache")


def test_tiny_image_is_rejected(tmp_path):
    root = class_folder(tmp_path / "data")
    gray(5, size=1).save(root / "cat" / "dot.png")
    with pytest.raises(ValueError, match=rf"dot\.png: 1x1 px, below the {MIN_IMAGE_SIZE} px minimum"):
        load_image_dataset(root, cache_dir=tmp_path / "cache")


def test_16_bit_image_is_rescaled_not_clipped(tmp_path):
    root = class_folder(tmp_path / "data")
    deep = np.array([[0, 257, 32768, 65535] * 4] * 16, dtype=np.uint16)
    PIL.Image.fromarray(deep).save(root / "dog" / "deep.png")
    assert PIL.Image.open(root / "dog" / "deep.png").mode == "I;16"
    dataset = load_image_dataset(root, test_size=0.5, cache_dir=tmp_path / "cache")
    converted = [ex["image"] for split in dataset for ex in dataset[split] if ex["image"].size == (16, 16)
                 and np.asarray(ex["image"])[0, 3] == 255]  # fmt: skip
    assert len(converted) == 1 and converted[0].mode == "L"
    assert np.asarray(converted[0])[0, :4].tolist() == [0, 1, 128, 255]


def test_folder_without_class_folders_says_it_needs_two(tmp_path):
    root = write_folder(tmp_path / "flat", {".": [gray(i) for i in range(4)]})
    with pytest.raises(ValueError, match=r"needs at least 2 class subfolders.*has 0"):
        load_image_dataset(root, cache_dir=tmp_path / "cache")
    single = write_folder(tmp_path / "single", {"cat": [gray(i) for i in range(4)]})
    with pytest.raises(ValueError, match=r"needs at least 2 class subfolders.*has 1: cat"):
        load_image_dataset(single, cache_dir=tmp_path / "cache")


def test_empty_class_and_split_folders_are_named_in_a_warning(tmp_path, caplog):
    root = write_folder(tmp_path / "data", {"train/cat": [gray(i) for i in range(5)], "train/dog": [gray(200 + i) for i in range(5)]})
    (root / "train" / "bird").mkdir()
    (root / "test" / "cat").mkdir(parents=True)
    with caplog.at_level("WARNING"):
        dataset = load_image_dataset(root, cache_dir=tmp_path / "cache")
    assert "train/bird has no images" in caplog.text and "test has no images" in caplog.text
    assert dataset["train"].features["label"].names == ["cat", "dog"]
    # The test split is then held out of train, loudly, and says so where summaries read it.
    assert "No 'test' split" in caplog.text
    assert "held out" in dataset["test"].info.description


def test_missing_image_column_names_the_option(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"picture": [gray(1)] * 2, "label": [0, 1]})
    with pytest.raises(ValueError, match=r"no column 'image'.*\['picture', 'label'\].*image_column="):
        load_image_dataset("parquet", data_files=path, cache_dir=tmp_path / "cache")


def test_float_labels_are_explained(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"image": [gray(1)] * 2, "label": [0.5, 1.5]})
    with pytest.raises(ValueError, match=r"float64.*cast_column\('label', Value\('int64'\)\)"):
        load_image_dataset("parquet", data_files=path, cache_dir=tmp_path / "cache")


def test_empty_split_is_named(tmp_path):
    root = write_folder(tmp_path / "data", {"train/cat": [gray(1)] * 2, "train/dog": [gray(2)] * 2})
    (root / "test" / "cat").mkdir(parents=True)
    (root / "test" / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"Split 'test' of '.*data' is empty"):
        load_image_dataset(root, bad_images="skip", cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------


def test_to_rgb_modes():
    assert np.asarray(to_rgb(gray(70))).tolist()[0][0] == [70, 70, 70]

    rgba = PIL.Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black → white background
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    assert np.asarray(to_rgb(PIL.Image.new("LA", (1, 1), (0, 128)))).tolist() == [[[127, 127, 127]]]

    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    assert np.asarray(to_rgb(palette)).tolist() == [[[0, 0, 255], [255, 255, 255]]]

    assert np.asarray(to_rgb(PIL.Image.new("CMYK", (1, 1), (0, 255, 255, 0)))).tolist() == [[[255, 0, 0]]]

    deep = PIL.Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [0, 1, 255]
    wide = PIL.Image.fromarray(np.array([[0, 32896, 70000]], dtype=np.int32))  # mode I: 16-bit range, clipped
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    floats = PIL.Image.fromarray(np.array([[0.0, 0.5, 2.0]], dtype=np.float32))  # mode F: [0, 1], clipped
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]
    for image in (deep, rgba, palette):
        assert to_rgb(image).mode == "RGB"


@pytest.fixture
def bit_processor() -> BitImageProcessor:
    return BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def test_with_image_size_fields_say_the_training_resolution():
    # Recipes (the official image-classification example) read size["shortest_edge"] as the resolution.
    processor = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    resized = with_image_size(processor, 64)
    assert resized.size.shortest_edge == 64 and (resized.crop_size.height, resized.crop_size.width) == (64, 64)
    assert processor.size.shortest_edge == 256  # the original is untouched
    wide = PIL.Image.new("RGB", (90, 60), (255, 255, 255))
    assert resized(images=wide, return_tensors="pt")["pixel_values"].shape == (1, 3, 64, 64)
    vit = with_image_size(ViTImageProcessor(), 40)
    assert (vit.size.height, vit.size.width) == (40, 40)


@pytest.mark.parametrize("image_size", [None, 48])
def test_transform_bit_processor_mixed_modes(bit_processor, image_size):
    images = [
        gray(255, size=20),
        PIL.Image.new("RGBA", (30, 20), (0, 0, 0, 0)),  # transparent → white
        PIL.Image.new("CMYK", (20, 30), (0, 0, 0, 0)),  # no ink → white
        PIL.Image.new("P", (25, 25), 0),
    ]
    transform = make_image_transform(bit_processor, image_size=image_size)
    batch = transform({"image": images, "label": [0, 1, 2, 3]})
    side = image_size or 32
    assert batch["pixel_values"].shape == (4, 3, side, side) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 2, 3]
    # White everywhere → (1 - 0.5) / 0.5 = 1 after normalisation; the palette image (black) → -1.
    torch.testing.assert_close(batch["pixel_values"][:3], torch.ones(3, 3, side, side))
    torch.testing.assert_close(batch["pixel_values"][3], -torch.ones(3, side, side))


def test_transform_vit_processor_and_collate_with_dataloader(tmp_path):
    dataset = load_image_dataset(class_folder(tmp_path / "data"), cache_dir=tmp_path / "cache")
    processor = ViTImageProcessor(image_mean=[0.0] * 3, image_std=[1.0] * 3)
    train = dataset["train"].with_transform(make_image_transform(processor, image_size=40))
    example = train[0]
    assert example["pixel_values"].shape == (3, 40, 40) and example["labels"].ndim == 0
    loader = torch.utils.data.DataLoader(train, batch_size=4, collate_fn=collate_fn)
    batches = list(loader)
    assert [batch["pixel_values"].shape for batch in batches] == [(4, 3, 40, 40), (4, 3, 40, 40)]
    labels = torch.cat([batch["labels"] for batch in batches])
    assert labels.dtype == torch.long and sorted(labels.tolist()) == sorted(dataset["train"]["label"])
    # Cat images are dark (10..14), dog images bright (200..204): values survive the pipeline.
    means = torch.cat([batch["pixel_values"].mean(dim=(1, 2, 3)) for batch in batches])
    assert torch.all((means > 0.7) == (labels == 1))


def test_transform_without_labels(bit_processor):
    batch = make_image_transform(bit_processor)({"image": [gray(0)]})
    assert set(batch) == {"pixel_values"}
    assert set(collate_fn([{"pixel_values": batch["pixel_values"][0]}])) == {"pixel_values"}


def test_test_split_chooses_the_evaluation_split(tmp_path):
    """--test_split validation: ImageNet-1k's test split has no labels, so it is evaluated on validation."""
    from protoquant_hf.job import load_dataset_for
    from protoquant_hf.training import DataArguments

    layout = {f"{split}/{name}": [gray(value + i) for i in range(count)]
              for split, count, value in (("train", 3, 10), ("validation", 2, 100), ("test", 1, 200))
              for name in ("cat", "dog")}  # fmt: skip
    root = write_folder(tmp_path / "data", layout)
    chosen = load_dataset_for(DataArguments(dataset=str(root), test_split="validation"))
    assert len(chosen["train"]) == 6 and len(chosen["test"]) == 4  # the validation images
    assert {int(np.asarray(image)[0, 0]) // 100 for image in chosen["test"]["image"]} == {1}
    assert len(load_dataset_for(DataArguments(dataset=str(root)))["test"]) == 2  # the test split by default
    with pytest.raises(ValueError, match="choose one of them"):
        load_dataset_for(DataArguments(dataset=str(root), test_split="holdout"))
