"""W8A8Config, range estimators, fake-quant bounds and quantization-node coverage."""

import json

import pytest
import torch

from hf_quantizable import (
    QuantizableBertConfig,
    QuantizableBertForMaskedLM,
    QuantizableOPTConfig,
    QuantizableOPTForCausalLM,
    QuantizableViTConfig,
    QuantizableViTForImageClassification,
)
from hf_quantizable.modeling.int8 import activation_qparams, fake_quantize_activation, quantize_weight, weight_scale
from hf_quantizable.quantization import W8A8Config, quantize_model
from hf_quantizable.quantization.calibration import activation_quantizers, quantized_linears
from hf_quantizable.quantization.ranges import ActivationRangeEstimator, weight_absmax


def test_config_json_round_trip(tmp_path):
    config = W8A8Config(
        weight_bits=6,
        activation_estimator="percentile",
        percentile=99.999,
        per_channel_weights=True,
        per_channel_residuals=True,
    )
    config.to_json_file(tmp_path / "q.json")
    assert W8A8Config.from_json_file(tmp_path / "q.json") == config
    assert W8A8Config.from_dict(json.loads(config.to_json_string())) == config


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("weight_bits", 9, "[2, 8]"),
        ("activation_bits", 1, "[2, 8]"),
        ("activation_estimator", "max", "running_minmax"),
        ("weight_estimator", "percentile", "minmax"),
        ("momentum", 1.0, "[0, 1)"),
        ("num_calibration_batches", 0, ">= 1"),
        ("percentile", 40.0, "(50, 100]"),
        ("outlier_channels", 600, "[0, 512]"),
        ("outlier_channels", -1, "[0, 512]"),
    ],
)
def test_config_errors_name_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as error:
        W8A8Config(**{field: value})
    assert f"`{field}`" in str(error.value) and allowed in str(error.value)


def test_config_rejects_unknown_field():
    with pytest.raises(ValueError, match="bitz"):
        W8A8Config.from_dict({"bitz": 8})


def test_running_minmax_matches_hand_computation():
    estimator = ActivationRangeEstimator("running_minmax", 8, momentum=0.9)
    for lo, hi in [(-1.0, 2.0), (-3.0, 1.0), (0.0, 5.0)]:
        estimator.update(torch.tensor([lo, 0.5, hi]))
    x_min, x_max = estimator.range()
    expected_min = 0.9 * (0.9 * -1.0 + 0.1 * -3.0) + 0.1 * 0.0
    expected_max = 0.9 * (0.9 * 2.0 + 0.1 * 1.0) + 0.1 * 5.0
    assert x_min.item() == pytest.approx(expected_min) and x_max.item() == pytest.approx(expected_max)


def test_percentile_is_an_ema_of_interpolated_percentiles():
    """As the official RunningMinMaxEstimator with `percentile`: numpy-style percentiles per batch,
    then the momentum-0.9 moving average."""
    estimator = ActivationRangeEstimator("percentile", 8, momentum=0.9, percentile=99.0)
    # 1..100: position 0.99 * 99 = 98.01 -> 99.01; 1st percentile at 0.99 -> 1.99
    estimator.update(torch.arange(1, 101, dtype=torch.float32))
    estimator.update(torch.arange(1, 101, dtype=torch.float32) * 2)  # -> 3.98, 198.02
    x_min, x_max = estimator.range()
    assert x_min.item() == pytest.approx(0.9 * 1.99 + 0.1 * 3.98, rel=1e-5)
    assert x_max.item() == pytest.approx(0.9 * 99.01 + 0.1 * 198.02, rel=1e-5)
    estimator = ActivationRangeEstimator("avg_minmax", 8)
    estimator.update(torch.tensor([-1.0, 4.0]))
    estimator.update(torch.tensor([-3.0, 2.0]))
    assert [v.item() for v in estimator.range()] == [-2.0, 3.0]


def test_mse_range_clips_gaussian_tails_at_low_bits():
    torch.manual_seed(0)
    x = torch.randn(20_000)
    estimator = ActivationRangeEstimator("mse", 4)
    estimator.update(x)
    x_min, x_max = estimator.range()
    assert x.min() < x_min < -1.5 and 1.5 < x_max < x.max()  # 4-bit optimum for N(0, 1) is ~2.5 sigma
    scale, zp = activation_qparams(x_min, x_max, 4)
    clipped_err = (fake_quantize_activation(x, scale, zp, 4) - x).pow(2).mean()
    scale, zp = activation_qparams(x.min(), x.max(), 4)
    assert clipped_err < (fake_quantize_activation(x, scale, zp, 4) - x).pow(2).mean()


def test_per_channel_minmax_matches_hand_computation():
    estimator = ActivationRangeEstimator("running_minmax", 8, momentum=0.5, per_channel=True)
    estimator.update(torch.tensor([[[1.0, -2.0], [3.0, 4.0]]]))  # [batch, tokens, channels]
    estimator.update(torch.tensor([[[-1.0, 0.0], [5.0, 8.0]]]))
    x_min, x_max = estimator.range()
    assert x_min.tolist() == pytest.approx([0.5 * 1 + 0.5 * -1, -2.0 * 0.5 + 0.0 * 0.5])
    assert x_max.tolist() == pytest.approx([0.5 * 3 + 0.5 * 5, 0.5 * 4 + 0.5 * 8])


@pytest.mark.parametrize("kind", ["running_minmax", "percentile", "mse"])
def test_per_channel_estimator_equals_one_estimator_per_channel(kind):
    torch.manual_seed(0)
    batches = [
        torch.randn(4, 300, 3) * torch.tensor([1.0, 10.0, 0.1]) + torch.tensor([0.0, 2.0, 0.0]) for _ in range(3)
    ]
    joint = ActivationRangeEstimator(kind, 6, percentile=99.0, per_channel=True)
    singles = [ActivationRangeEstimator(kind, 6, percentile=99.0) for _ in range(3)]
    for x in batches:
        joint.update(x)
        for channel, single in enumerate(singles):
            single.update(x[..., channel])
    x_min, x_max = joint.range()
    assert x_min.shape == x_max.shape == (3,)
    for channel, single in enumerate(singles):
        lo, hi = single.range()
        assert x_min[channel].item() == pytest.approx(lo.item(), rel=1e-5)
        assert x_max[channel].item() == pytest.approx(hi.item(), rel=1e-5)


def test_outlier_mask_gives_two_ranges_by_hand():
    estimator = ActivationRangeEstimator("running_minmax", 8)
    estimator.outlier_mask = torch.tensor([False, True, False])
    estimator.update(torch.tensor([[1.0, 100.0, -2.0], [3.0, -50.0, 4.0]]))
    x_min, x_max = estimator.range()
    assert x_min.tolist() == [-2.0, -50.0, -2.0] and x_max.tolist() == [4.0, 100.0, 4.0]


def test_weight_estimators():
    w = torch.tensor([[0.5, -2.0, 1.0], [0.1, 0.2, -0.4]])
    assert weight_absmax(w, 8, "minmax", False).item() == 2.0
    assert weight_absmax(w, 8, "minmax", True).tolist() == pytest.approx([2.0, 0.4])
    torch.manual_seed(0)
    w = torch.randn(2, 20_000)
    absmax = weight_absmax(w, 4, "mse", True)
    assert (absmax < w.abs().amax(dim=1)).all() and (absmax > 1.5).all()

    def err(a):
        s = weight_scale(a, 4)[:, None]
        return (quantize_weight(w, s, 4) * s - w).pow(2).sum(dim=1)

    assert (err(absmax) < err(w.abs().amax(dim=1))).all()


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_fake_quant_round_trip_bounds(bits):
    x = torch.randn(10_000) * 3
    scale, zero_point = activation_qparams(x.min(), x.max(), bits)
    q = fake_quantize_activation(x, scale, zero_point, bits)
    assert (q - x).abs().max() <= scale / 2 + 1e-6  # inside the range: at most half a step
    assert torch.unique(q).numel() <= 2**bits
    codes = q / scale + zero_point
    assert (
        torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= -1e-3 and codes.max() <= 2**bits - 1 + 1e-3
    )
    outside = fake_quantize_activation(torch.tensor([1e6, -1e6]), scale, zero_point, bits)
    assert outside[0] <= x.max() + scale and outside[1] >= x.min() - scale  # clamped
    w = torch.randn(64, 32)
    s = weight_scale(w.abs().max(), bits)
    wq = quantize_weight(w, s, bits)
    assert wq.abs().max() <= 2 ** (bits - 1) - 1 and (wq * s - w).abs().max() <= s / 2 + 1e-6


# The papers' node set (Bondarenko et al.: every activation): every quantized activation per family (suffixes per layer + model-level ones).
EXPECTED_NODES = {
    "bert": (
        {"embeddings.sum_quant", "embeddings.output_quant"},
        {
            "attention.self.query_quant",
            "attention.self.key_quant",
            "attention.self.value_quant",
            "attention.self.core.scores_quant",
            "attention.self.core.probs_quant",
            "attention.self.core.context_quant",
            "attention.output.dense_quant",
            "attention.output.residual_quant",
            "attention.output.output_quant",
            "intermediate.act_quant",
            "output.dense_quant",
            "output.residual_quant",
            "output.output_quant",
        },
        {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}
        | {"intermediate.dense", "output.dense"},
    ),
    "opt": (
        {"embed_quant", "final_ln_quant"},
        {
            "attn_ln_quant",
            "self_attn.q_quant",
            "self_attn.k_quant",
            "self_attn.v_quant",
            "self_attn.core.scores_quant",
            "self_attn.core.probs_quant",
            "self_attn.core.context_quant",
            "self_attn.out_quant",
            "attn_residual_quant",
            "ffn_ln_quant",
            "act_quant",
            "fc2_quant",
            "ffn_residual_quant",
        },
        {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
    ),
    "vit": (
        {"embeddings.embed_quant", "final_ln_quant"},
        {
            "attn_ln_quant",
            "attention.attention.q_quant",
            "attention.attention.k_quant",
            "attention.attention.v_quant",
            "attention.attention.core.scores_quant",
            "attention.attention.core.probs_quant",
            "attention.attention.core.context_quant",
            "attention.output.dense_quant",
            "attn_residual_quant",
            "ffn_ln_quant",
            "intermediate.act_quant",
            "output.dense_quant",
            "ffn_residual_quant",
        },
        {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"},
    ),
}


def tiny_model(family: str, attn_impl: str = "gated"):
    torch.manual_seed(0)
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "attn_impl": attn_impl}
    if family == "bert":
        model = QuantizableBertForMaskedLM(QuantizableBertConfig(vocab_size=50, intermediate_size=64, **common))
        batches = [{"input_ids": torch.randint(0, 50, (2, 12))} for _ in range(3)]
    elif family == "opt":
        config = QuantizableOPTConfig(
            vocab_size=50, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=32, **common
        )
        model = QuantizableOPTForCausalLM(config)
        batches = [{"input_ids": torch.randint(0, 50, (2, 12))} for _ in range(3)]
    else:
        config = QuantizableViTConfig(image_size=16, patch_size=4, intermediate_size=64, num_labels=3, **common)
        model = QuantizableViTForImageClassification(config)
        batches = [{"pixel_values": torch.randn(2, 3, 16, 16)} for _ in range(3)]
    return model.eval(), batches


def _layer_suffix(name: str) -> str | None:
    """`...layer(s).N.rest` -> `rest`."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "layers") and parts[i + 1].isdigit():
            return ".".join(parts[i + 2 :])
    return None


@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
def test_quantized_nodes_cover_the_paper_setting(family):
    model, batches = tiny_model(family)
    quantize_model(model, W8A8Config(num_calibration_batches=2), batches)
    model_level, per_layer, linears = EXPECTED_NODES[family]
    nodes = activation_quantizers(model)
    for layer in range(2):
        found = {s for n in nodes if (s := _layer_suffix(n)) is not None and f".{layer}." in f".{n}."}
        missing = {e for e in per_layer if not any(f.endswith(e) for f in found)}
        assert not missing, f"{family} layer {layer}: quantization nodes missing {sorted(missing)}"
    top = {n for n in nodes if _layer_suffix(n) is None}
    missing = {e for e in model_level if not any(n.endswith(e) for n in top)}
    assert not missing, f"{family}: model-level nodes missing {sorted(missing)}"
    quantized = quantized_linears(model)
    for suffix in linears:
        hits = [n for n in quantized if n.endswith(suffix)]
        assert len(hits) >= 2, f"{family}: linear {suffix} not quantized in every layer"
        assert all(quantized[n].input_quantizer is not None for n in hits), f"{family}: {suffix} input not quantized"
    # Task heads and gates stay in floating point.
    assert not any(part in n.split(".") for n in quantized for part in ("cls", "lm_head", "classifier", "gate"))
    assert all(m.mode == "quantize" for m in nodes.values())


@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
def test_per_channel_residuals_leave_linear_inputs_per_tensor(family):
    model, batches = tiny_model(family)
    residual_points = {  # the points a W8A8Config option switches on (w8a8_option) are off by default
        name
        for name, m in model.named_modules()
        if getattr(m, "residual_stream", False) and getattr(m, "w8a8_option", None) is None
    }
    quantize_model(model, W8A8Config(num_calibration_batches=2, per_channel_residuals=True), batches)
    nodes = activation_quantizers(model)
    linear_inputs = {linear.input_quantizer for linear in quantized_linears(model).values()}
    per_channel = {name for name, quantizer in nodes.items() if quantizer.per_channel}
    assert per_channel and per_channel == residual_points - linear_inputs
    for name, quantizer in nodes.items():
        assert quantizer.scale.shape == ((32,) if name in per_channel else ())
    # Channels get their own ranges: the grids differ across channels.
    assert all(nodes[name].scale.unique().numel() > 1 for name in per_channel)


@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
def test_outlier_channels_get_their_own_grid(family):
    model, batches = tiny_model(family)
    with torch.no_grad():  # channel 5 of every hidden state becomes the widest one
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[5] = 40.0
    quantize_model(model, W8A8Config(num_calibration_batches=2, outlier_channels=3), batches)
    nodes = activation_quantizers(model)
    linear_inputs = {linear.input_quantizer for linear in quantized_linears(model).values()}
    for name, quantizer in nodes.items():
        if name not in linear_inputs:
            assert quantizer.outlier_channels is None and quantizer.scale.dim() == 0
            continue
        channels = quantizer.outlier_channels
        assert channels.numel() == 3 and quantizer.scale.shape == quantizer.estimator.outlier_mask.shape
        scale, zero_point, outlier_scale = quantizer.group_grids()
        assert quantizer.scale.unique().numel() <= 2 and quantizer.scale[channels].eq(outlier_scale).all()
        if "ln" in name or name.endswith("output_quant"):  # a LayerNorm output: channel 5 is an outlier
            assert 5 in channels.tolist() and outlier_scale > scale, name
    with pytest.raises(ValueError, match="`outlier_channels` \\(40\\) must be smaller than the 32 channels"):
        quantize_model(tiny_model(family)[0], W8A8Config(outlier_channels=40), batches)


def test_quantize_model_errors():
    model, batches = tiny_model("bert")
    with pytest.raises(ValueError, match="calibration set is empty"):
        quantize_model(model, W8A8Config(), [])
    with pytest.raises(ValueError, match="quantization points"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), W8A8Config(), [{"x": torch.ones(1)}])


def test_simulated_model_degrades_gracefully_with_bits():
    """The relative logit error grows as the bits shrink: error(8) < error(6) < error(4), each bounded."""
    errors = {}
    for bits in (8, 6, 4):
        model, batches = tiny_model("bert", attn_impl="softmax")
        with torch.no_grad():
            reference = model(**batches[0]).logits
        quantize_model(model, W8A8Config(weight_bits=bits, activation_bits=bits, num_calibration_batches=3), batches)
        with torch.no_grad():
            quantized = model(**batches[0]).logits
        errors[bits] = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < errors[8] < errors[6] < errors[4], errors
    assert errors[8] < 0.05 and errors[6] < 0.2 and errors[4] < 1.0, errors
