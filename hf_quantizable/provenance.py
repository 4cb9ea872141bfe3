"""Fingerprints that tie derived artefacts (INT8 checkpoints, result records) to the model they came from."""

import hashlib
import json
import os
from pathlib import Path

from .paths import read_model_config

# config.json fields that change when the same weights are saved again (not part of the model's identity).
_VOLATILE_CONFIG_FIELDS = ("transformers_version", "_name_or_path", "auto_map", "dtype", "torch_dtype")
# Weight files (`save_pretrained` names); training state such as training_args.bin is not the model.
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def model_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over a model folder's config (volatile fields dropped) and its weight files' bytes.

    The same folder always gives the same fingerprint; any change of a weight or of an architecture
    field gives another. Raises FileNotFoundError when the folder has no config.json.
    """
    folder = Path(folder)
    config = read_model_config(folder)
    digest = hashlib.sha256()
    identity = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_FIELDS}
    digest.update(json.dumps(identity, sort_keys=True).encode())
    weight_files = {p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    for weights in sorted(weight_files):
        digest.update(weights.name.encode())
        with weights.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
