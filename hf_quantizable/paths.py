"""Where the offline data lives, and the one atomic file writer of the package."""

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

DATA_ENV = "HF_QUANTIZABLE_DATA"


def shared_data_dir() -> Path:
    """Offline data folder: `$HF_QUANTIZABLE_DATA`, else `../shared/data` beside the repository."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds.

    Nothing half-written ever sits at `path`: on an exception (or a killed process before the rename)
    only the hidden temporary file can remain, and on an exception it is removed. The temporary name
    is unique per call (process id and a random token), so concurrent writers never share one, and it
    keeps the suffix of `path` (writers that pick a format from the suffix, like matplotlib, still
    work). The file is not created in advance, so it gets the ordinary permissions of a new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename: never a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename: never a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
