"""Tests of the synthetic part-annotated dataset: generation, annotations, config validation, caching."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import numpy as np
import pytest
from datasets import ClassLabel
from datasets import Image as ImageFeature

from protoquant_hf.data import SyntheticPartsConfig, generate_synthetic_parts, load_image_dataset, part_names
from protoquant_hf.data import datasets as data_module
from protoquant_hf.data import synthetic_parts as synthetic_module
from protoquant_hf.data.synthetic_parts import PART_TYPES

TINY = SyntheticPartsConfig(image_size=32, train_size=8, test_size=6)
# All twelve part types, without colour jitter, so each part's pixels have exactly known colours.
ALL_TYPES = SyntheticPartsConfig(num_part_types=12, parts_per_class=3, num_classes=8, train_size=24, test_size=8,
                                 color_jitter=0.0)  # fmt: skip
# Four large parts in a 64 px image: random placement often fails and falls back to the grid.
CROWDED = SyntheticPartsConfig(num_part_types=8, parts_per_class=4, num_classes=6, part_size=(0.36, 0.44),
                               train_size=24, test_size=6, color_jitter=0.0)  # fmt: skip


def image_bytes(split) -> list[bytes]:
    return [entry["bytes"] for entry in split.cast_column("image", ImageFeature(decode=False))["image"]]


def chroma(example) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (H, W, 3) int, chroma (H, W))``; chroma (max - min channel) is 0 exactly on grey pixels."""
    pixels = np.asarray(example["image"]).astype(np.int64)
    return pixels, pixels.max(axis=2) - pixels.min(axis=2)


def test_same_config_gives_identical_data_and_another_seed_other_data():
    first, again = generate_synthetic_parts(TINY), generate_synthetic_parts(TINY)
    other = generate_synthetic_parts(dataclasses.replace(TINY, seed=1))
    for split in ("train", "test"):
        assert image_bytes(first[split]) == image_bytes(again[split])
        assert first[split]["parts"] == again[split]["parts"] and first[split]["label"] == again[split]["label"]
        assert not set(image_bytes(first[split])) & set(image_bytes(other[split]))
    # The seed drives the layouts too, not only which classes exist: no part lands at the same spot.
    keypoints = [{tuple(part["keypoint"]) for parts in dataset["train"]["parts"] for part in parts}
                 for dataset in (first, other)]  # fmt: skip
    assert not keypoints[0] & keypoints[1]
    # The two splits are different images, classes balanced within one image.
    assert not set(image_bytes(first["train"])) & set(image_bytes(first["test"]))
    assert sorted(Counter(first["train"]["label"]).values()) == [1, 1, 1, 1, 2, 2]
    image = first["train"][0]["image"]
    assert (image.mode, image.size) == ("RGB", (32, 32))


@pytest.mark.parametrize("config", [ALL_TYPES, CROWDED], ids=["all-part-types", "crowded"])
def test_parts_are_drawn_exactly_where_annotated(config, monkeypatch):
    grid_layouts = []
    place_on_grid = synthetic_module._grid_centers
    monkeypatch.setattr(synthetic_module, "_grid_centers", lambda *args: grid_layouts.append(1) or place_on_grid(*args))
    dataset = generate_synthetic_parts(config)
    assert (len(grid_layouts) > 0) == (config is CROWDED)  # the crowded config exercises the fallback placement
    side = config.image_size
    for example in itertools.chain(dataset["train"], dataset["test"]):
        pixels, colourfulness = chroma(example)
        background = np.ones((side, side), dtype=bool)
        boxes = [part["box"] for part in example["parts"]]
        for part, (left, top, right, bottom) in zip(example["parts"], boxes):
            assert 0 <= left < right <= side and 0 <= top < bottom <= side
            background[top:bottom, left:right] = False
            coloured = colourfulness[top:bottom, left:right] > 0
            # The box is tight: its outermost rows and columns hold part pixels.
            assert coloured[0].any() and coloured[-1].any() and coloured[:, 0].any() and coloured[:, -1].any()
            # Every coloured pixel has the part's colour, bright or in the texture's dark shade.
            part_type = PART_TYPES[part["part"]]
            bright = np.array(part_type.color)
            dark = np.rint(synthetic_module._SHADE * bright)
            colours = {tuple(colour) for colour in pixels[top:bottom, left:right][coloured]}
            expected = {tuple(bright)} if part_type.texture == "solid" else {tuple(bright), tuple(dark)}
            assert colours == expected, (part_type.name, colours)
            # The keypoint is the shape's centre: near the box centre, on the part except in hollow shapes.
            x, y = part["keypoint"]
            assert abs(x - (left + right) / 2) <= 0.15 * (right - left) + 1
            assert abs(y - (top + bottom) / 2) <= 0.15 * (bottom - top) + 1
            assert (colourfulness[int(y), int(x)] > 0) == (part_type.shape not in {"ring", "frame"})
        # Outside all boxes there is only (exactly grey) background.
        assert (colourfulness[background] == 0).all()
        for (l1, t1, r1, b1), (l2, t2, r2, b2) in itertools.combinations(boxes, 2):
            assert r1 <= l2 or r2 <= l1 or b1 <= t2 or b2 <= t1, "boxes overlap"


def test_every_image_shows_exactly_its_class_parts():
    dataset = generate_synthetic_parts(dataclasses.replace(TINY, train_size=30))
    names, classes = part_names(dataset), dataset["train"].features["label"].names
    palette = np.array([part.color for part in PART_TYPES[: TINY.num_part_types]], dtype=np.float64)
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    for example in dataset["train"]:
        assert sorted(names[part["part"]] for part in example["parts"]) == sorted(classes[example["label"]].split("+"))
        # The pixels agree with the annotation (colour jitter is mild): each box's colour is its part type's.
        pixels, colourfulness = chroma(example)
        for part in example["parts"]:
            left, top, right, bottom = part["box"]
            coloured = pixels[top:bottom, left:right][colourfulness[top:bottom, left:right] > 0]
            direction = coloured.mean(axis=0) / np.linalg.norm(coloured.mean(axis=0))
            assert np.argmax(palette @ direction) == part["part"]


def test_default_classes_share_every_part_type():
    for seed in range(3):
        # The sizes of the splits do not change the classes, so small splits stand in for the defaults.
        config = dataclasses.replace(SyntheticPartsConfig(), seed=seed, train_size=6, test_size=6)
        classes = [name.split("+") for name in generate_synthetic_parts(config)["train"].features["label"].names]
        assert len(classes) == 6 and len({frozenset(parts) for parts in classes}) == 6
        assert all(len(set(parts)) == 2 for parts in classes)
        counts = Counter(part for parts in classes for part in parts)
        assert set(counts) == {part.name for part in PART_TYPES[:6]} and set(counts.values()) == {2}, counts
    assert (
        generate_synthetic_parts(dataclasses.replace(config, train_size=12))["test"]["parts"]
        == generate_synthetic_parts(config)["test"]["parts"]
    )


def test_load_generates_once_caches_and_round_trips_parts(monkeypatch, tmp_path):
    loaded = load_image_dataset("synthetic-parts", synthetic_parts=TINY, cache_dir=tmp_path)
    assert (tmp_path / f"synthetic-parts-{TINY.key()}-v1" / "synthetic_parts_config.json").is_file()
    generated = generate_synthetic_parts(TINY)
    parts = loaded["train"][0]["parts"]
    assert isinstance(parts, list) and isinstance(parts[0], dict) and set(parts[0]) == {"part", "keypoint", "box"}
    assert all(isinstance(value, int) for value in parts[0]["box"]) and len(parts[0]["keypoint"]) == 2
    assert loaded["train"].features["parts"].feature["part"] == ClassLabel(names=part_names(generated))
    assert part_names(loaded["test"]) == [
        "red-circle", "blue-square", "green-triangle", "yellow-cross", "magenta-ring", "cyan-striped-square",
    ]  # fmt: skip
    for split in ("train", "test"):
        assert loaded[split]["parts"] == generated[split]["parts"]
        assert image_bytes(loaded[split]) == image_bytes(generated[split])

    def no_generation(config):
        raise AssertionError("generated again instead of loading the cached copy")

    monkeypatch.setattr(data_module, "generate_synthetic_parts", no_generation)
    # A dict of the same fields (part_size as a list, a float field as an int) is the same config and cache.
    fields = {**TINY.to_dict(), "background_noise": 12}
    again = load_image_dataset("synthetic-parts", synthetic_parts=fields, cache_dir=tmp_path)
    assert again["train"]["parts"] == loaded["train"]["parts"]
    with pytest.raises(AssertionError, match="generated again"):
        load_image_dataset("synthetic-parts", synthetic_parts={**fields, "seed": 1}, cache_dir=tmp_path)


def test_max_samples_per_split_keeps_part_annotations(tmp_path):
    config = dataclasses.replace(TINY, num_classes=3, train_size=12)
    small = load_image_dataset("synthetic-parts", synthetic_parts=config, max_samples_per_split=6, cache_dir=tmp_path)
    assert small["train"].column_names == ["image", "label", "parts"] and len(small["train"]) == 6
    assert sorted(Counter(small["train"]["label"]).values()) == [2, 2, 2]
    names, classes = part_names(small), small["train"].features["label"].names
    full = generate_synthetic_parts(config)["train"]
    for example in small["train"]:
        assert sorted(names[part["part"]] for part in example["parts"]) == sorted(classes[example["label"]].split("+"))
        assert example["parts"] in full["parts"]


def test_config_key_is_stable_and_covers_every_field():
    config = SyntheticPartsConfig()
    assert SyntheticPartsConfig(part_size=[14 / 64, 20 / 64], background_noise=12).key() == config.key()
    assert SyntheticPartsConfig.from_dict(config.to_dict()) == config
    changed = {"num_classes": 5, "parts_per_class": 3, "num_part_types": 7, "image_size": 96, "train_size": 100,
               "test_size": 50, "seed": 1, "part_size": (0.2, 0.3), "background_noise": 5.0,
               "color_jitter": 0.0}  # fmt: skip
    assert set(changed) == set(config.to_dict())
    keys = {dataclasses.replace(config, **{name: value}).key() for name, value in changed.items()}
    assert len(keys | {config.key()}) == len(changed) + 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_classes": 1}, r"num_classes=1: a classifier needs at least 2 classes"),
        ({"num_classes": 16}, r"more than the 15 distinct combinations.*C\(6, 2\).*raise num_part_types"),
        ({"num_part_types": 13}, r"num_part_types=13 must be between 2 and 12"),
        ({"parts_per_class": 7}, r"parts_per_class=7 must be between 1 and num_part_types=6"),
        ({"image_size": 4}, r"image_size=4 is below the 8 px minimum"),
        ({"train_size": 3}, r"train_size=3 is smaller than num_classes=6.*one image per class"),
        ({"test_size": 0}, r"test_size=0 is smaller than num_classes=6"),
        ({"seed": -1}, r"seed=-1 must be >= 0"),
        ({"part_size": (0.3, 0.2)}, r"part_size=\(0.3, 0.2\) must be \(smallest, largest\) fractions"),
        ({"part_size": 0.3}, r"part_size=0.3 must be \(smallest, largest\) fractions"),
        ({"part_size": (0.05, 0.3)}, r"parts of 3.2 px.*below the 5 px.*raise part_size\[0\] to at least 0.078"),
        ({"part_size": (0.5, 1.0)}, r"parts of up to 64 px, too large for a 64 px image.*at most 0.969"),
        ({"parts_per_class": 5, "part_size": (0.36, 0.44)},
         r"5 parts of up to 28.16 px cannot be placed without overlap in a 64 px image \(at most 4"),
        ({"background_noise": -1.0}, r"background_noise=-1.0 must be >= 0"),
        ({"background_noise": float("nan")}, r"background_noise must be a finite number, got nan"),
        ({"color_jitter": 0.5}, r"color_jitter=0.5 must be between 0 and 0.3"),
        ({"num_classes": 6.0}, r"num_classes must be an integer, got 6.0 \(float\)"),
    ],
)  # fmt: skip
def test_bad_config_gives_one_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        SyntheticPartsConfig(**fields)


def test_bad_synthetic_parts_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"synthetic_parts= configures the 'synthetic-parts' dataset only.*'digits'"):
        load_image_dataset("digits", synthetic_parts={"num_classes": 4})
    with pytest.raises(ValueError, match=r"Unknown SyntheticPartsConfig field\(s\) \['classes'\]; the fields are"):
        load_image_dataset("synthetic-parts", synthetic_parts={"classes": 4}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"must be a SyntheticPartsConfig or a dict of its fields, got list"):
        load_image_dataset("synthetic-parts", synthetic_parts=[4], cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"no part annotations.*columns are \['image', 'label'\]"):
        part_names(generate_synthetic_parts(TINY)["train"].remove_columns("parts"))
    assert not any(tmp_path.iterdir())  # nothing half-built was left in the cache
