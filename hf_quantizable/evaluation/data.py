"""Evaluation data: Hub datasets by name, or local files offline.

`dataset` is either a Hub dataset name (`wikitext`, `mnist`, `cifar10`, ...; with `dataset_config`)
or a local path:

- a file: `.txt` / `.tokens` / `.raw` (one text per line), `.json` / `.jsonl`, `.csv`;
- a folder with one file per split (`test.txt`, `valid.txt` or `validation.txt`, `train.json`, ...),
  e.g. `../shared/data/wikitext-2`;
- a folder with MNIST IDX files (`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`, and
  `train-*` for the train split), e.g. `../shared/data/mnist`;
- any other folder of images: the `imagefolder` builder (one sub-folder per class).
"""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, load_dataset
from datasets.arrow_writer import SchemaInferenceError
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError

TEXT_SUFFIXES = {".txt": "text", ".tokens": "text", ".raw": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
MNIST_PREFIX = {"test": "t10k", "train": "train"}


def _looks_like_path(dataset: str) -> bool:
    return os.sep in dataset or dataset.startswith(".") or Path(dataset).suffix in TEXT_SUFFIXES


def _split_file(folder: Path, split: str) -> Path | None:
    for stem in SPLIT_ALIASES.get(split, (split,)):
        for suffix in TEXT_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _idx_array(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_file(folder: Path, prefix: str, kind: str) -> Path | None:
    for name in (f"{prefix}-{kind}.gz", f"{prefix}-{kind}"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist_idx(folder: str | os.PathLike, split: str = "test", limit: int | None = None) -> Dataset:
    """MNIST from its original IDX files as a `datasets.Dataset` (`image`, `label`)."""
    folder = Path(folder)
    if split not in MNIST_PREFIX:
        raise ValueError(f"MNIST IDX files have splits {sorted(MNIST_PREFIX)}, got {split!r}")
    images_file = _mnist_file(folder, MNIST_PREFIX[split], "images-idx3-ubyte")
    labels_file = _mnist_file(folder, MNIST_PREFIX[split], "labels-idx1-ubyte")
    if images_file is None or labels_file is None:
        raise FileNotFoundError(f"no MNIST {split} IDX files ({MNIST_PREFIX[split]}-*-ubyte[.gz]) in {folder}")
    images, labels = _idx_array(images_file), _idx_array(labels_file)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    return Dataset.from_dict({"image": list(images), "label": labels.astype(np.int64).tolist()}, features=features)


def load_split(
    dataset: str,
    dataset_config: str | None = None,
    split: str = "test",
    data_files: str | list[str] | None = None,
    limit: int | None = None,
) -> Dataset:
    """One split of a Hub dataset or of local files (see the module docstring).

    Args:
        data_files: with a builder name as `dataset` (`text`, `json`, `csv`, `imagefolder`): the files.
        limit: keep the first `limit` examples.
    Raises ValueError naming the dataset when it is empty, not text, or cannot be fetched.
    """
    try:
        return _load_split(dataset, dataset_config, split, data_files, limit)
    except DatasetGenerationError as error:  # empty or binary files: the real reason is the cause
        cause = error.__cause__ or error
        reasons = {SchemaInferenceError: "it holds no example", UnicodeDecodeError: "it is not UTF-8 text"}
        reason = next((text for kind, text in reasons.items() if isinstance(cause, kind)), type(cause).__name__)
        raise ValueError(f"dataset {dataset!r} ({split} split) cannot be read: {reason}") from None
    except (DatasetNotFoundError, ConnectionError) as error:  # unknown or unreachable Hub dataset
        line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"dataset {dataset!r} cannot be loaded: {line} (offline? pass a local path)") from None


def _load_split(
    dataset: str, dataset_config: str | None, split: str, data_files: str | list[str] | None, limit: int | None
) -> Dataset:
    if data_files is not None:
        loaded = load_dataset(dataset, data_files={split: data_files}, split=split)
    elif _looks_like_path(dataset) or Path(dataset).exists():
        path = Path(dataset).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset path {str(path)!r} does not exist")
        loaded = _load_local(path, split, limit)
    else:
        loaded = load_dataset(dataset, dataset_config, split=split)
    if limit is not None and len(loaded) > limit:
        loaded = loaded.select(range(limit))
    return loaded


def _load_local(path: Path, split: str, limit: int | None) -> Dataset:
    if path.is_file():
        builder = TEXT_SUFFIXES.get(path.suffix)
        if builder is None:
            raise ValueError(f"unsupported data file {path.name!r}: use one of {sorted(TEXT_SUFFIXES)}")
        return load_dataset(builder, data_files={split: str(path)}, split=split)
    if _mnist_file(path, "t10k", "images-idx3-ubyte") or _mnist_file(path, "train", "images-idx3-ubyte"):
        return load_mnist_idx(path, split, limit)
    split_file = _split_file(path, split)
    if split_file is not None:
        return load_dataset(TEXT_SUFFIXES[split_file.suffix], data_files={split: str(split_file)}, split=split)
    if any(p.is_dir() for p in path.iterdir()):
        return load_dataset("imagefolder", data_dir=str(path), split=split)
    available = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"no file for split {split!r} in {path} (looked for {list(SPLIT_ALIASES.get(split, (split,)))} with "
        f"suffixes {sorted(TEXT_SUFFIXES)}); found {available}"
    )
