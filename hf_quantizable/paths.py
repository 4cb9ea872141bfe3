"""Where the offline data lives."""

import os
from pathlib import Path

DATA_ENV = "HF_QUANTIZABLE_DATA"


def shared_data_dir() -> Path:
    """Offline data folder: `$HF_QUANTIZABLE_DATA`, else `../shared/data` beside the repository."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
