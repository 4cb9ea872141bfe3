"""W8A8Config presets: each preset's quantized node set, the recorded name, the CLI flags."""

import json

import pytest

from hf_quantizable.quantization import W8A8Config, quantize_model
from hf_quantizable.quantization.calibration import (
    activation_quantizers,
    quantized_embeddings,
    quantized_layernorms,
    quantized_linears,
)
from hf_quantizable.quantization.config import preset_names
from hf_quantizable.quantize import main
from tests.test_quant_cli import model_dir  # noqa: F401  (fixture)
from tests.test_quant_core import EXPECTED_NODES, tiny_model


def _bert_layer(i: int, last: bool) -> list[str]:
    """The Outlier Suppression nodes of one BERT layer (official `model/quant_bert.py`): Q, K, V
    (`query_permute`, `key_transpose`, `value_permute`), `attention_probs`, `context_view`, the
    attention LayerNorm output, `intermediate_act_fn`, and the output LayerNorm except the last layer's."""
    layer = f"bert.encoder.layer.{i}"
    nodes = [
        f"{layer}.attention.self.query_quant",
        f"{layer}.attention.self.key_quant",
        f"{layer}.attention.self.value_quant",
        f"{layer}.attention.self.core.probs_quant",
        f"{layer}.attention.self.core.context_quant",
        f"{layer}.attention.output.output_quant",
        f"{layer}.intermediate.act_quant",
    ]
    return nodes if last else [*nodes, f"{layer}.output.output_quant"]


def _all_nodes(family: str, prefix: str, layers: str) -> list[str]:
    """Every node of `EXPECTED_NODES[family]` in the two-layer `tiny_model`."""
    model_level, per_layer, _ = EXPECTED_NODES[family]
    return [f"{prefix}.{node}" for node in model_level] + [
        f"{layers}.{i}.{node}" for i in range(2) for node in per_layer
    ]


OS_BERT = ["bert.embeddings.output_quant", *_bert_layer(0, last=False), *_bert_layer(1, last=True)]
# Bondarenko et al.'s BERT set (official `models/quantized_bert.py`, quant_setup "all"): the
# embedding sum and LayerNorm output, Q/K/V, scores, probabilities, context, each dense output, each
# residual sum, each LayerNorm output, the FFN activation (`EXPECTED_NODES`, written out there). The
# presets that follow it exactly also quantize the word + token-type partial sum
# (`sum_input_token_type_embd_act_quantizer`), with the embedding tables and LayerNorm weights
# (tests/test_int8_embedding.py).
ALL_BERT = _all_nodes("bert", "bert", "bert.encoder.layer")
OFFICIAL_BERT = ["bert.embeddings.token_type_sum_quant", *ALL_BERT]
OS_OPT = [
    f"model.decoder.layers.{i}.{node}"
    for i in range(2)
    for node in (
        "self_attn.q_quant",
        "self_attn.k_quant",
        "self_attn.v_quant",
        "self_attn.core.probs_quant",
        "self_attn.core.context_quant",
        "attn_ln_quant",
        "ffn_ln_quant",
        "act_quant",
    )
]


# Bondarenko et al.'s OPT set (official `models/quantized_opt.py`): the embedding sum, each LayerNorm
# output, Q/K/V, scores, probabilities, context, the attention output, both residual sums, the FFN
# activation (`fc1_act`), the FFN output and the final LayerNorm output (`EXPECTED_NODES`).
ALL_OPT = _all_nodes("opt", "model.decoder", "model.decoder.layers")
# Bondarenko et al.'s ViT setting (paper appendix: every activation, as their BERT setting; no official
# ViT code): the embedding output, each LayerNorm output, Q/K/V, scores, probabilities, context, the
# attention output, both residual sums, the FFN activation and output, and the final LayerNorm output.
ALL_VIT = _all_nodes("vit", "vit", "vit.encoder.layer")


def _nodes(family: str, config: W8A8Config, attn_impl: str = "softmax") -> list[str]:
    model, batches = tiny_model(family, attn_impl=attn_impl)
    quantize_model(model, config, batches)
    return sorted(activation_quantizers(model)), model


@pytest.mark.parametrize(
    ("family", "preset", "expected"),
    [
        ("bert", "wei2022-os", OS_BERT),
        ("bert", "wei2022-os-6bit", OS_BERT),
        ("bert", "bondarenko2023-bert", OFFICIAL_BERT),
        ("bert", "liao2024-bert", OFFICIAL_BERT),
        ("bert", "hf-quantizable-best", ALL_BERT),
        ("bert", "bondarenko2023-bert-weights-only", []),
        ("opt", "wei2022-os", OS_OPT),
        ("opt", "bondarenko2023-opt", ALL_OPT),
        ("opt", "liao2024-opt", ALL_OPT),
        ("vit", "bondarenko2023-vit", ALL_VIT),
    ],
)
def test_preset_node_set_is_the_official_list(family, preset, expected):
    config = W8A8Config.preset(preset, clipping_quantiles=[1.0], clipping_steps=0)
    nodes, model = _nodes(family, config)
    assert nodes == sorted(expected)
    linears = quantized_linears(model)
    assert linears and all(linear.input_quantizer in (set(nodes) | {None}) for linear in linears.values())
    assert model.w8a8_config.preset_name.startswith(preset)


@pytest.mark.parametrize("preset", ["bondarenko2023-opt", "liao2024-opt"])
def test_opt_presets_quantize_both_tables_and_every_layernorm(preset):
    """`QuantizedOPTDecoder`: `embed_tokens` and the learned positional table as weights, every LayerNorm's weight."""
    _, model = _nodes("opt", W8A8Config.preset(preset))
    assert sorted(quantized_embeddings(model)) == ["model.decoder.embed_positions", "model.decoder.embed_tokens"]
    layer_norms = [
        f"model.decoder.layers.{i}.{n}" for i in range(2) for n in ("self_attn_layer_norm", "final_layer_norm")
    ]
    assert sorted(quantized_layernorms(model)) == sorted(["model.decoder.final_layer_norm", *layer_norms])


@pytest.mark.parametrize(
    ("gated_context", "quantized"), [("after_gate", "context_quant"), ("before_gate", "ungated_context_quant")]
)
def test_gated_context_point(gated_context, quantized):
    """Gated attention's context on its grid after the gate (the output projection reads it: an integer
    GEMM) or before the gate (official OPT code: the output projection reads the float gated context)."""
    config = W8A8Config(num_calibration_batches=2, gated_context=gated_context)
    nodes, model = _nodes("opt", config, attn_impl="gated")
    context = {n.rsplit(".", 1)[1] for n in nodes if "context" in n}
    assert context == {quantized}
    readers = {n: linear.input_quantizer for n, linear in quantized_linears(model).items() if n.endswith("out_proj")}
    expected = None if gated_context == "before_gate" else "model.decoder.layers.0.self_attn.core.context_quant"
    assert readers["model.decoder.layers.0.self_attn.out_proj"] == expected
    assert W8A8Config.preset("bondarenko2023-opt").gated_context == "before_gate"
    assert W8A8Config.preset("bondarenko2023-bert").gated_context == "after_gate"  # quantized_bert.py


def test_every_preset_is_valid_and_named():
    for name in preset_names():
        config = W8A8Config.preset(name)
        assert config.preset_name == name
        assert W8A8Config.from_dict(json.loads(config.to_json_string())) == config
    assert W8A8Config.preset("wei2022-os", num_calibration_batches=2).preset_name == (
        "wei2022-os (modified: num_calibration_batches)"
    )
    assert W8A8Config.preset("wei2022-os", clipping_steps=24).preset_name == "wei2022-os"  # the preset's own value
    with pytest.raises(ValueError, match="unknown W8A8 preset 'wei2023'"):
        W8A8Config.preset("wei2023")


def test_official_settings_of_the_presets():
    os8, os6 = W8A8Config.preset("wei2022-os"), W8A8Config.preset("wei2022-os-6bit")
    assert (os8.clipping_lr, os8.num_calibration_batches, os8.clipping_steps) == (1e-5, 8, 3 * 8)
    assert len(os8.clipping_grid()) == 10 and len(os6.clipping_grid()) == 30 and os6.activation_bits == 6
    assert os8.per_channel_weights and os8.remove_padding and os8.calibration_quantized == "none"
    opt = W8A8Config.preset("bondarenko2023-opt")
    assert (opt.weight_estimator, opt.activation_estimator, opt.percentile, opt.momentum) == (
        "mse",
        "percentile",
        99.999,
        0.9,
    )
    assert opt.num_calibration_batches == 4 and W8A8Config.preset("liao2024-opt").num_calibration_batches == 16
    bert = W8A8Config.preset("bondarenko2023-bert")
    assert (bert.activation_estimator, bert.momentum, bert.num_calibration_batches) == ("running_minmax", 0.9, 16)
    assert bert.calibration_quantized == "all" and not bert.per_channel_weights


def test_cli_preset_and_weights_only(model_dir, tmp_path, capsys):  # noqa: F811
    common = ["--dataset", str(model_dir / "calib.txt"), "--batch-size", "4"]
    out = tmp_path / "preset"
    assert main([str(model_dir), "--output", str(out), "--preset", "bondarenko2023-bert", *common]) == 0
    summary = capsys.readouterr().out
    assert "(preset bondarenko2023-bert)" in summary and "quantized activations: 29" in summary
    settings = json.loads((out / "config.json").read_text())["w8a8_config"]
    assert settings["preset_name"] == "bondarenko2023-bert" and settings["calibration_quantized"] == "all"
    out = tmp_path / "weights"
    assert (
        main([str(model_dir), "--output", str(out), "--weights-only", "--num-calibration-batches", "1", *common]) == 0
    )
    assert "activations: floating point (weights only)" in capsys.readouterr().out
    settings = json.loads((out / "config.json").read_text())["w8a8_config"]
    assert settings["quantized_activations"] == [] and not any(settings["quantized_linears"].values())
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_dir), "--output", str(tmp_path / "bad"), "--preset", "nope", *common])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def _evaluate_options(*argv: str):
    from hf_quantizable.cli import given_options
    from hf_quantizable.evaluate import build_parser, check_options, w8a8_overrides

    parser = build_parser()
    args = parser.parse_args(["MODEL", "--task", "embedding", *argv])
    check_options(args, given_options(parser, ["MODEL", "--task", "embedding", *argv]))
    return w8a8_overrides(args)


def test_evaluate_w8a8_preset_option():
    fields = _evaluate_options("--w8a8-preset", "wei2022-os-6bit", "--clipping-steps", "3")
    assert fields["activation_nodes"] == "matmul_inputs" and fields["activation_bits"] == 6
    assert fields["clipping_steps"] == 3 and fields["preset_name"] == "wei2022-os-6bit (modified: clipping_steps)"
    assert _evaluate_options("--w8a8-preset", "bondarenko2023-bert")["preset_name"] == "bondarenko2023-bert"
    with pytest.raises(ValueError, match="clipping-steps"):
        _evaluate_options("--w8a8-preset", "bondarenko2023-bert", "--clipping-steps", "3")
    with pytest.raises(ValueError, match="w8a8-preset.*--no-w8a8"):
        _evaluate_options("--w8a8-preset", "wei2022-os", "--no-w8a8")
    with pytest.raises(ValueError, match="unknown W8A8 preset 'nope'"):
        _evaluate_options("--w8a8-preset", "nope")
    with pytest.raises(ValueError, match="applies to --task glue only"):
        _evaluate_options("--w8a8-preset", "wei2022-os", "--preset", "bondarenko")


def test_training_presets_follow_the_official_scripts():
    """BERT MLP gate width d_head // 4 (official bert_attention.py, `attn_gate_mlp`); OPT's clipped
    softmax gamma = -alpha / training length, fixed at build time as the official code."""
    from hf_quantizable.training.presets import PRESETS

    base = PRESETS["bert-base-gated"].model
    assert base["gate_n_hid"] == 768 // 12 // 4 == 16
    opt = PRESETS["opt-125m-clipped"].model
    assert (opt["clip_alpha"], opt["clip_alpha_length"], opt["clip_max_length"]) == (12.0, "fixed", 512)


def test_clip_alpha_length_fixed_or_runtime():
    from hf_quantizable.modeling.configuration_quantizable import QuantizableOPTConfig

    fixed = QuantizableOPTConfig(
        attn_impl="clipped_softmax", clip_alpha=12.0, clip_alpha_length="fixed", clip_max_length=512
    )
    runtime = QuantizableOPTConfig(attn_impl="clipped_softmax", clip_alpha=12.0)
    assert fixed.clip_gamma_for(100) == fixed.clip_gamma_for(512) == -12.0 / 512
    assert runtime.clip_gamma_for(100) == -0.12 and runtime.clip_gamma_for(512) == -12.0 / 512
    with pytest.raises(ValueError, match="needs `clip_max_length`"):
        QuantizableOPTConfig(attn_impl="clipped_softmax", clip_alpha=12.0, clip_alpha_length="fixed")
    with pytest.raises(ValueError, match="`clip_alpha_length` must be 'runtime' or 'fixed'"):
        QuantizableOPTConfig(attn_impl="clipped_softmax", clip_alpha=12.0, clip_alpha_length="max")
