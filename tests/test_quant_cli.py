"""`python -m hf_quantizable.quantize`: happy path and clear errors without partial output."""

import json
import re

import pytest
import torch
from transformers import BertTokenizerFast

from hf_quantizable.quantize import main
from tests.test_quant_core import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    model, _ = tiny_model("bert")
    model.save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    text = folder / "calib.txt"
    text.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 45}" for j in range(12)) for i in range(40)) + "\n")
    return folder


def test_cli_writes_a_reloadable_checkpoint(model_dir, tmp_path, capsys):
    out = tmp_path / "w8a8"
    code = main(
        [
            str(model_dir),
            "--output",
            str(out),
            "--dataset",
            str(model_dir / "calib.txt"),
            "--num-calibration-batches",
            "2",
            "--batch-size",
            "4",
            "--per-channel-residuals",
            "--outlier-channels",
            "2",
        ]
    )
    assert code == 0
    summary = capsys.readouterr().out
    assert "quantized activations: 28" in summary
    ratio = float(re.search(r"\(([\d.]+)x smaller\)", summary).group(1))
    assert ratio > 3.9
    assert "per channel in the residual stream, 2 outlier channels per linear input" in summary
    settings = json.loads((out / "config.json").read_text())["w8a8_config"]
    assert settings["num_calibration_batches"] == 2 and settings["outlier_channels"] == 2
    assert settings["per_channel_residuals"] and settings["outlier_channel_linears"]
    assert (out / "tokenizer_config.json").exists()
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)
    assert model(input_ids=torch.tensor([[2, 7, 8, 3]])).logits.shape == (1, 4, 50)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--activation-estimator", "max"], "`activation_estimator` must be one of"),
        (["--bits", "9"], "`weight_bits` must be an integer in [2, 8]"),
        (["--bits", "1"], "`weight_bits` must be an integer in [2, 8]"),
        (["--dataset", "EMPTY"], "calibration set is empty"),
        (["--outlier-channels", "1000"], "`outlier_channels` must be an integer in [0, 512]"),
        (["--outlier-channels", "500"], "`outlier_channels` (500) must be smaller than the"),
        (["--dataset", "/nonexistent/calib.txt"], "does not exist"),
    ],
)
def test_cli_errors_leave_no_output(model_dir, tmp_path, capsys, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    extra = [str(empty) if e == "EMPTY" else e for e in extra]
    out = tmp_path / "out"
    assert main([str(model_dir), "--output", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_rejects_missing_and_unsupported_models(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "no model at" in capsys.readouterr().err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    assert main([str(tmp_path / "gpt2"), "--output", str(tmp_path / "out")]) == 2
    assert "cannot quantize model type 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
