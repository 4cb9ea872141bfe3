"""One JSON result format for every evaluation (schema: `result.schema.json`).

A results file is `{"schema_version": 1, "records": [...]}`, one record per metric value. Model
cards and benchmarks read these files with `read_results`.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from ..paths import write_text_atomic

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("result.schema.json")
PRECISIONS = ("fp32", "fp16", "bf16", "w8a8-sim", "int8")
TASKS = ("mlm", "clm", "image-classification", "glue", "outliers", "embedding-fidelity", "lm-eval")
VERSIONED_PACKAGES = (
    "hf_quantizable",
    "torch",
    "transformers",
    "datasets",
    "evaluate",
    "optimum",
    "accelerate",
    "lm_eval",
    "scikit-learn",
    "scipy",
)


@cache
def result_schema() -> dict:
    """The JSON Schema of a results file."""
    return json.loads(SCHEMA_PATH.read_text())


@cache
def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of Python and of the installed packages that shape the numbers (plus `extra` ones)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES + extra:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@cache
def cpu_description() -> tuple[str, frozenset[str]]:
    """(CPU model name, instruction-set flags) of this machine, for benchmark records (performance
    claims name the CPU they were measured on); the flags are empty where /proc/cpuinfo is absent."""
    model, flags = platform.processor(), frozenset()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        if line.startswith("model name") and model == platform.processor():
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = frozenset(line.split(":", 1)[1].split())
    return model, flags


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class ResultRecord:
    """One metric value of one evaluation (see `result.schema.json` for each field)."""

    model: str
    attn_impl: str
    precision: str
    task: str
    dataset: str
    split: str
    metric: str
    value: float | None
    n: int
    dataset_config: str | None = None
    seed: int | None = None
    model_fingerprint: str | None = None
    versions: dict[str, str] = dataclasses.field(default_factory=lambda: dict(package_versions()))
    timestamp: str = dataclasses.field(default_factory=_now)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS}, got {self.precision!r}")
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {self.task!r}")
        if self.value is not None:
            value = float(self.value)
            if math.isfinite(value):
                self.value = value
            else:  # JSON has no inf/nan: keep the fact in `extra`
                self.value = None
                self.extra = {**self.extra, "non_finite": repr(value)}
        self.n = int(self.n)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResultRecord":
        return cls(**data)


def validate_results(document: dict) -> None:
    """Raise `jsonschema.ValidationError` when `document` is not a valid results file."""
    jsonschema.validate(document, result_schema(), format_checker=jsonschema.FormatChecker())


def write_results(records: Iterable[ResultRecord], path: str | os.PathLike, append: bool = False) -> Path:
    """Write `records` as a results file (atomically: temporary file, then rename).

    Args:
        append: keep the records already in `path` (if it exists) and add these after them.
    """
    path = Path(path)
    records = list(records)
    if append and path.exists():
        records = read_results(path) + records
    document = {"schema_version": SCHEMA_VERSION, "records": [record.to_dict() for record in records]}
    validate_results(document)
    return write_text_atomic(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def read_results(path: str | os.PathLike) -> list[ResultRecord]:
    """Read and validate a results file (ValueError naming the file when it is not one)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        validate_results(document)
    except (ValueError, UnicodeDecodeError, jsonschema.ValidationError) as error:
        raise ValueError(f"{path} is not a valid results file: {str(error).splitlines()[0]}") from None
    return [ResultRecord.from_dict(record) for record in document["records"]]
