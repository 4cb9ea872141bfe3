"""INT8 checkpoints: export, size, fresh-process reload, bit-exact agreement with the simulation."""

import json
import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_quantizable.modeling import int8, int8_kernel
from hf_quantizable.modeling.int8 import Int8Linear, int8_gemm_saturates
from hf_quantizable.modeling.int8_kernel import cpu_has_avx2
from hf_quantizable.quantization import W8A8Config, W8A8Quantizer, quantize_model
from hf_quantizable.quantization.calibration import set_mode
from hf_quantizable.quantization.export import freeze
from hf_quantizable.quantization.modules import (
    ActivationQuantizer,
    QuantizedEmbedding,
    QuantizedLayerNorm,
    QuantizedLinear,
)
from tests.isolation import run_without_package
from tests.test_quant_core import tiny_model


def test_int8_linear_matches_exact_integer_product():
    torch.manual_seed(0)
    layer = Int8Linear(64, 48, bias=True, per_channel=True, has_input_quant=True, input_bits=8)
    layer.weight.copy_(torch.randint(-127, 128, (48, 64), dtype=torch.int8))  # many saturating pairs
    layer.weight_scale.copy_(torch.rand(48) * 0.01)
    layer.bias.copy_(torch.randn(48))
    layer.input_scale.fill_(0.05)
    layer.input_zero_point.fill_(37)
    codes = torch.randint(0, 256, (40, 64)).float()
    x = (codes - 37) * 0.05
    expected = ((codes - 37).double() @ layer.weight.double().t()).float() * (0.05 * layer.weight_scale) + layer.bias
    assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-5)


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_saturation_probe_matches_the_kernel(monkeypatch):
    """The oneDNN route splits the weight only where its GEMM saturates; the product stays exact either way."""
    monkeypatch.setenv("HF_QUANTIZABLE_INT8_KERNEL", "onednn")
    flags = _cpu_flags()
    if platform.machine() == "x86_64" and flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        assert int8_gemm_saturates()  # vpmaddubsw: int16 pair sums
    torch.manual_seed(0)
    weight = torch.full((16, 64), 127, dtype=torch.int8)  # every pair saturates for codes near 255
    codes = torch.randint(200, 256, (8, 64)).float()
    expected = (codes @ weight.float().t()) * 0.01
    for saturates in (True, int8_gemm_saturates()):
        monkeypatch.setattr(int8_kernel, "_PAIRS_SATURATE", [saturates])
        layer = Int8Linear(64, 16, bias=False, per_channel=False, has_input_quant=True, input_bits=8)
        layer.weight.copy_(weight)
        layer.weight_scale.fill_(0.01)
        assert torch.equal(layer(codes), expected)
        assert (layer._packed[2].numel() > 0) == saturates  # removed entries exist only with the split


@pytest.mark.parametrize("dense", [False, True])
def test_saturation_correction_is_exact_entry_by_entry_and_dense(monkeypatch, dense):
    """Few removed entries in many channels are added one by one; many in few channels (per-channel
    weight scales put a 127 in every row) by one product over those channels. Both are exact."""
    monkeypatch.setattr(int8_kernel, "_PAIRS_SATURATE", [True])
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-20, 21, (128, 64), generator=generator, dtype=torch.int8)
    if dense:
        weight[:, :8] = 127  # every row saturates in the first four pairs
    else:
        weight[torch.arange(16), 2 * torch.arange(16)] = 100  # one saturating pair in each of 16 rows
        weight[torch.arange(16), 2 * torch.arange(16) + 1] = 90
    layer = Int8Linear(64, 128, bias=False, per_channel=False, has_input_quant=True, input_bits=8)
    layer.weight.copy_(weight)
    layer.input_zero_point.fill_(3)
    codes = torch.randint(0, 256, (32, 64), generator=generator, dtype=torch.uint8)
    exact = int8.integer_matmul_reference(codes, layer.input_zero_point, weight)
    assert torch.equal(layer.accumulator(codes), exact)
    assert torch.equal(layer.accumulator(codes, codes.float() - 3), exact)  # columns read from the float input
    *_, removed = layer._packed
    assert (removed is not None) == dense


def test_int8_linear_with_outlier_channels_matches_exact_product():
    torch.manual_seed(0)
    layer = Int8Linear(64, 48, bias=False, per_channel=False, has_input_quant=True, input_bits=8, outlier_channels=3)
    layer.weight.copy_(torch.randint(-127, 128, (48, 64), dtype=torch.int8))
    layer.weight_scale.fill_(0.02)
    layer.input_scale.fill_(0.05)
    layer.input_zero_point.fill_(37)
    channels = torch.tensor([3, 17, 60])
    layer.outlier_channels.copy_(channels)
    layer.outlier_scale.fill_(1.5)
    codes = torch.randint(0, 256, (40, 64)).double()
    zero_points = torch.full((64,), 37.0, dtype=torch.float64)
    zero_points[channels] = 128.0
    scales = torch.full((64,), 0.05, dtype=torch.float64)
    scales[channels] = 1.5
    x = ((codes - zero_points) * scales).float()
    expected = (((codes - zero_points) * scales) @ (layer.weight.double().t() * 0.02)).float()
    assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-4)


def _quantize(family, tmp_path, config):
    model, batches = tiny_model(family, "softmax" if config.gamma_migration else "gated")  # gates read the LN
    quantizer = W8A8Quantizer.from_pretrained(model)
    out = quantizer.quantize(tmp_path / "int8", quantization_config=config, calibration_dataset=batches)
    return quantizer, batches, out


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("bert", W8A8Config(num_calibration_batches=3)),
        ("opt", W8A8Config(weight_estimator="mse", per_channel_weights=True)),
        ("vit", W8A8Config(weight_bits=6, activation_bits=6, activation_estimator="percentile")),
        ("bert", W8A8Config(per_channel_weights=True, per_channel_residuals=True, gamma_migration=True)),
        ("opt", W8A8Config(activation_estimator="mse", per_channel_residuals=True)),
        ("bert", W8A8Config(weight_bits=6, activation_bits=6, per_channel_weights=True, outlier_channels=4)),
        ("opt", W8A8Config(outlier_channels=2, per_channel_residuals=True)),
        ("vit", W8A8Config(activation_estimator="mse", outlier_channels=3)),
        ("bert", W8A8Config.preset("wei2022-os", clipping_quantiles=[1.0, 0.9], clipping_steps=2)),
        ("opt", W8A8Config.preset("bondarenko2023-opt")),
        ("bert", W8A8Config.preset("bondarenko2023-bert-weights-only")),
        ("vit", W8A8Config(activation_nodes="matmul_inputs", calibration_quantized="all")),
    ],
)
def test_int8_model_equals_simulation(family, config, tmp_path):
    quantizer, batches, out = _quantize(family, tmp_path, config)
    channels = json.loads((out / "config.json").read_text())["w8a8_config"]["per_channel_activations"]
    grids = {
        n: m.scale.numel() for n, m in quantizer.int8_model.named_modules() if type(m).__name__.startswith("Int8Act")
    }
    assert bool(channels) == (config.per_channel_residuals or config.outlier_channels > 0)
    assert all(grids[f"{quantizer.int8_model.base_model_prefix}.{name}"] == n > 1 for name, n in channels.items())
    for batch in batches:
        with torch.no_grad():
            simulated = quantizer.simulated_model(**batch)[0]
            int8 = quantizer.int8_model(**batch)[0]
        assert torch.equal(simulated, int8), (simulated - int8).abs().max()


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("bert", W8A8Config(per_channel_weights=True, per_channel_residuals=True, gamma_migration=True)),
        ("bert", W8A8Config.preset("bondarenko2023-bert")),  # int8 tables, LayerNorm weights on their grid
        ("opt", W8A8Config.preset("bondarenko2023-opt")),  # int8 tables: the tied head is untied, stays FP
        ("vit", W8A8Config(outlier_channels=3)),
    ],
)
def test_freeze_in_place_builds_what_loading_builds(family, config, tmp_path):
    model, batches = tiny_model(family, "softmax" if config.gamma_migration else "gated")
    simulated = quantize_model(model, config, batches)
    with torch.no_grad():
        expected = [simulated(**batch)[0] for batch in batches]
    calibrating = (ActivationQuantizer, QuantizedLinear, QuantizedEmbedding, QuantizedLayerNorm)
    before = {name: m for name, m in simulated.named_modules() if isinstance(m, calibrating)}
    frozen = freeze(simulated)
    assert frozen is model and not hasattr(frozen, "w8a8_config")
    assert not [name for name, m in frozen.named_modules() if isinstance(m, calibrating)]
    # each module froze itself: the same objects, now of their runtime classes, without calibration state
    assert all(frozen.get_submodule(name) is module for name, module in before.items())
    assert not [name for name, m in before.items() if hasattr(m, "estimator") or hasattr(m, "quantize_weights")]
    with torch.no_grad():
        for batch, simulated_out in zip(batches, expected):
            assert torch.equal(frozen(**batch)[0], simulated_out)
    frozen.save_pretrained(tmp_path)
    loaded = type(frozen).from_pretrained(tmp_path).eval()
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in frozen.named_modules()}
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in frozen.named_parameters()]  # int8 in buffers
    frozen_state, loaded_state = frozen.state_dict(), loaded.state_dict()
    assert frozen_state.keys() == loaded_state.keys()
    for key, tensor in frozen_state.items():
        assert tensor.dtype == loaded_state[key].dtype and torch.equal(tensor, loaded_state[key]), key
    if family == "opt":
        assert not frozen.config.tie_word_embeddings and frozen.lm_head.weight.dtype == torch.float32


def test_freeze_refuses_a_model_it_cannot_freeze_and_leaves_it_as_it_was():
    model, batches = tiny_model("bert")
    with pytest.raises(ValueError, match="calibrated by quantize_model"):
        freeze(model)
    simulated = quantize_model(model, W8A8Config(), batches)
    set_mode(simulated, "calibrate")
    modules = {name: type(m) for name, m in simulated.named_modules()}
    with pytest.raises(ValueError, match="in mode 'calibrate'"):
        freeze(simulated)
    assert {name: type(m) for name, m in simulated.named_modules()} == modules


def test_checkpoint_layout_and_size(tmp_path):
    quantizer, _, out = _quantize("bert", tmp_path, W8A8Config(num_calibration_batches=2))
    config = json.loads((out / "config.json").read_text())
    settings = config["w8a8_config"]
    assert settings["weight_bits"] == 8 and settings["activation_estimator"] == "running_minmax"
    assert len(settings["quantized_activations"]) == 2 + 2 * 13
    tensors = load_file(out / "model.safetensors")
    query = "bert.encoder.layer.0.attention.self.query"
    assert tensors[f"{query}.weight"].dtype == torch.int8
    for name in ("weight_scale", "input_scale", "input_zero_point"):
        assert f"{query}.{name}" in tensors
    assert "bert.encoder.layer.0.attention.self.core.probs_quant.scale" in tensors
    assert tensors["cls.predictions.transform.dense.weight"].dtype == torch.float32  # head kept FP
    report = quantizer.report
    assert report["linear_weights_fp32"] / report["linear_weights_int8"] > 3.9
    assert {p.name for p in out.iterdir()} >= {
        "int8.py",
        "int8_kernel.py",
        "int8_avx2.cpp",
        "modeling_quantizable_bert.py",
        "config.json",
    }
    assert not list(tmp_path.glob(".int8*"))  # no temporary folder left behind


def test_fresh_process_reload_agrees_with_simulation(tmp_path):
    config = W8A8Config(num_calibration_batches=2, per_channel_residuals=True, outlier_channels=2)
    quantizer, batches, out = _quantize("bert", tmp_path, config)
    batch = batches[0]
    with torch.no_grad():
        expected = quantizer.simulated_model(**batch).logits
    torch.save(batch, tmp_path / "batch.pt")
    for choice in (None, "avx2"):
        code = f"""
            import torch
            from transformers import AutoModelForMaskedLM
            kwargs = {{}} if {choice!r} is None else {{"int8_kernel": {choice!r}}}
            model = AutoModelForMaskedLM.from_pretrained({str(out)!r}, trust_remote_code=True, **kwargs).eval()
            linear = model.bert.encoder.layer[0].attention.self.query
            assert type(linear).__name__ == "Int8Linear" and linear.weight.dtype == torch.int8, linear
            with torch.no_grad():
                logits = model(**torch.load({str(tmp_path / "batch.pt")!r})).logits
            torch.save(logits, {str(tmp_path / "logits.pt")!r})
            print("avx2 kernel:", linear.avx2_weight() is not None)
        """
        stdout = run_without_package(code)
        assert torch.equal(torch.load(tmp_path / "logits.pt"), expected), choice
        # Without the package the checkpoint's kernel source is built only when asked for.
        assert f"avx2 kernel: {choice == 'avx2' and cpu_has_avx2()}" in stdout, stdout


def test_gamma_migrated_checkpoint_reloads(tmp_path):
    model, batches = tiny_model("bert", attn_impl="softmax")
    quantizer = W8A8Quantizer.from_pretrained(model)
    out = quantizer.quantize(tmp_path / "os", W8A8Config(num_calibration_batches=2, gamma_migration=True), batches)
    from transformers import AutoModelForMaskedLM

    reloaded = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batches[1]).logits, quantizer.simulated_model(**batches[1]).logits)
