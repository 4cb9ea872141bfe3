"""W8A8 as a registered transformers quantization method (`quantization_config`, `hf_quantizer`)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from hf_quantizable import W8A8QuantizationConfig
from hf_quantizable.modeling.quantization_method import QUANT_METHOD, W8A8HfQuantizer
from hf_quantizable.quantization import W8A8Config, W8A8Quantizer
from tests.conftest import tiny_inputs, tiny_model
from tests.isolation import run_without_package


def calibration_batches(count: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 99, (4, 12), generator=generator) for _ in range(count)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("method")
    for family in ("bert", "opt"):
        tiny_model(family, attn_impl="gated").save_pretrained(root / family)
        W8A8Quantizer.from_pretrained(root / family).quantize(
            root / f"{family}-int8", W8A8Config(num_calibration_batches=2), calibration_batches()
        )
    return root


@pytest.mark.parametrize(("family", "auto_class"), [("bert", AutoModelForMaskedLM), ("opt", AutoModelForCausalLM)])
def test_quantize_while_loading_equals_the_int8_checkpoint(folders, family, auto_class, tmp_path):
    config = W8A8QuantizationConfig(calibration_dataset=calibration_batches(), num_calibration_batches=2)
    model = auto_class.from_pretrained(folders / family, quantization_config=config)
    assert model.is_quantized and isinstance(model.hf_quantizer, W8A8HfQuantizer)
    reference = auto_class.from_pretrained(folders / f"{family}-int8")
    assert reference.is_quantized and isinstance(reference.hf_quantizer, W8A8HfQuantizer)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        logits = model(**inputs).logits
        torch.testing.assert_close(logits, reference(**inputs).logits, rtol=0, atol=0)
    assert model.config.w8a8_config["source_fingerprint"] == reference.config.w8a8_config["source_fingerprint"]
    # save_pretrained / from_pretrained round trip, with the standard field in config.json
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == QUANT_METHOD and saved["weight_bits"] == 8 and "calibration_dataset" not in saved
    reloaded = auto_class.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, logits, rtol=0, atol=0)


def test_settings_reach_the_quantizer(folders):
    config = W8A8QuantizationConfig(calibration_dataset=calibration_batches(), num_calibration_batches=1, weight_bits=6)
    model = AutoModelForMaskedLM.from_pretrained(folders / "bert", quantization_config=config)
    assert (
        model.config.w8a8_config["weight_bits"] == 6 and model.config.quantization_config.to_dict()["weight_bits"] == 6
    )


def test_quantizing_while_loading_needs_calibration_data(folders):
    with pytest.raises(ValueError, match="needs calibration data"):
        AutoModelForMaskedLM.from_pretrained(folders / "bert", quantization_config=W8A8QuantizationConfig())


def test_int8_checkpoint_is_quantized_without_the_package(folders):
    """The checkpoint's own copy of the code registers the method: trust_remote_code loads keep working."""
    out = run_without_package(
        f"""
        from transformers import AutoModelForMaskedLM
        model = AutoModelForMaskedLM.from_pretrained({str(folders / "bert-int8")!r}, trust_remote_code=True)
        print("RESULT", model.is_quantized, type(model.hf_quantizer).__name__, type(model).__module__.split(".")[0])
        """
    )
    assert "RESULT True W8A8HfQuantizer transformers_modules" in out


def _int8_logits(folder, inputs):
    with torch.no_grad():
        return AutoModelForMaskedLM.from_pretrained(folder)(**inputs).logits


def test_quantizer_accepts_what_optimum_users_pass_and_quantizes_twice(folders, tmp_path):
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import BatchEncoding

    batches = calibration_batches()
    rows = {k: torch.cat([b[k] for b in batches]).tolist() for k in batches[0]}
    quantizer = W8A8Quantizer.from_pretrained(folders / "bert")
    inputs = tiny_inputs("bert")
    sources = {
        "dicts": batches,
        "batch-encodings": [BatchEncoding(b) for b in batches],
        "dataloader": DataLoader(Dataset.from_dict(rows).with_format("torch"), batch_size=4),
        "dataset": Dataset.from_dict({**rows, "text": ["unused"] * 8}),  # batched by batch_size, text dropped
    }
    outputs = {}
    for name, source in sources.items():  # one quantizer, four runs: its FP model stays FP
        quantizer.quantize(tmp_path / name, W8A8Config(num_calibration_batches=2), source, batch_size=4)
        outputs[name] = _int8_logits(tmp_path / name, inputs)
    for name, logits in outputs.items():
        torch.testing.assert_close(logits, outputs["dicts"], rtol=0, atol=0, msg=name)
    reference = _int8_logits(folders / "bert-int8", inputs)  # a fresh quantizer, same data
    torch.testing.assert_close(outputs["dicts"], reference, rtol=0, atol=0)
    ragged = Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 6]], "attention_mask": [[1, 1, 1], [1, 1]]})
    with pytest.raises(ValueError, match="rows of different lengths: pad them"):
        quantizer.quantize(tmp_path / "ragged", W8A8Config(num_calibration_batches=1), ragged)
    assert not (tmp_path / "ragged").exists()


def test_hub_ids_are_downloaded_after_the_local_folder_check(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="no local folder org/not-cached, and it cannot be downloaded"):
        W8A8Quantizer.from_pretrained("org/not-cached")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        W8A8Quantizer.from_pretrained(str(tmp_path / "missing"))  # a path is never taken for a repo id


def test_stock_checkpoints_quantize_while_loading_through_our_classes(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from hf_quantizable import QuantizableBertForMaskedLM
    from tests.conftest import TINY_BERT

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(**TINY_BERT)).save_pretrained(tmp_path / "stock")
    config = W8A8QuantizationConfig(calibration_dataset=calibration_batches(), num_calibration_batches=2)
    model = QuantizableBertForMaskedLM.from_pretrained(tmp_path / "stock", quantization_config=config)
    assert model.is_quantized and model.config.w8a8_config["quantized_linears"]
    with pytest.raises(ValueError, match="load stock checkpoints with the hf_quantizable class"):
        AutoModelForMaskedLM.from_pretrained(tmp_path / "stock", quantization_config=config)
