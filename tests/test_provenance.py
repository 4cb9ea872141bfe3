"""`model_fingerprint`: same model, same fingerprint; any change of weights or architecture, another."""

import json
import shutil

import torch

from hf_quantizable.provenance import model_fingerprint
from tests.conftest import tiny_model


def test_fingerprint_follows_weights_and_architecture_only(tmp_path):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path / "a")
    reference = model_fingerprint(tmp_path / "a")
    # a copy elsewhere, with results, training state and a re-save by another transformers version: same model
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    (tmp_path / "copy" / "results.json").write_text("{}")
    (tmp_path / "copy" / "training_args.bin").write_bytes(b"pickled trainer state")
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    config["transformers_version"] = "0.0.0"
    (tmp_path / "copy" / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(tmp_path / "copy") == reference
    # one weight changed
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    model.save_pretrained(tmp_path / "b")
    assert model_fingerprint(tmp_path / "b") != reference
    # one architecture field changed
    config["attn_impl"] = "gated"
    (tmp_path / "copy" / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(tmp_path / "copy") != reference
