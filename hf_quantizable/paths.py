"""Where the offline data lives."""

import os
from pathlib import Path

DATA_ENV = "HF_QUANTIZABLE_DATA"


def shared_data_dir() -> Path:
    """Offline data folder: `$HF_QUANTIZABLE_DATA`, else `../shared/data` beside the repository."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
