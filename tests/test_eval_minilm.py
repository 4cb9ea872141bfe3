"""Real-model check: all-MiniLM-L6-v2 (a real pretrained BERT) on WikiText-2 test lines.

Its FFN outputs and residual sums hold strong outliers, and plain min-max W8A8 simulation (all
activations quantized, the papers' setting) measurably degrades its mean-pooled sentence
embeddings. The Outlier Suppression variant (gamma migration + coarse token-wise clipping) is
evaluated and recorded beside it: with the residual stream on per-channel grids it recovers part
of the loss. The numbers are written as result records.
"""

import math

import pytest

from hf_quantizable.evaluation.harness import EvalSettings, evaluate_model
from hf_quantizable.evaluation.results import read_results, write_results


def _records(minilm_path, data_dir, folder, w8a8_config: dict) -> dict:
    settings = EvalSettings(
        task="embedding",
        dataset=str(data_dir / "wikitext-2"),
        split="test",
        max_sequences=16,
        max_length=64,
        batch_size=16,
        outlier_suppression=True,
        w8a8_config={"num_calibration_batches": 1, "clipping_steps": 0, **w8a8_config},
    )
    records, _ = evaluate_model(minilm_path, settings)
    path = write_results(records, folder / "results.json")
    return {(r.extra["variant"], r.metric): r for r in read_results(path)}


@pytest.fixture(scope="module")
def minilm_records(minilm_path, data_dir, tmp_path_factory):
    """The paper's setting: every activation on one grid per tensor."""
    return _records(minilm_path, data_dir, tmp_path_factory.mktemp("minilm"), {})


@pytest.fixture(scope="module")
def minilm_records_residual_channels(minilm_path, data_dir, tmp_path_factory):
    """The residual stream on per-channel grids (Wei et al. leave it unquantized)."""
    return _records(minilm_path, data_dir, tmp_path_factory.mktemp("minilm_pcr"), {"per_channel_residuals": True})


def test_minilm_has_outliers(minilm_records):
    inf_norm = minilm_records[("fp32", "max_inf_norm")]
    by_kind = inf_norm.extra["max_inf_norm_by_kind"]
    assert by_kind["ffn_output"] > 100  # measured ~192 on 32 test lines
    assert by_kind["residual"] > by_kind["layernorm_output"]  # the LayerNorm scales the outliers down
    assert minilm_records[("fp32", "avg_kurtosis")].value > 500  # Gaussian activations: 3
    assert minilm_records[("fp32", "cosine_similarity")].value == 1.0
    assert inf_norm.n == 16 and inf_norm.split == "test" and inf_norm.attn_impl == "softmax"


def test_minmax_w8a8_degrades_embeddings(minilm_records):
    minmax = minilm_records[("w8a8-sim", "cosine_similarity")]
    assert minmax.value < 0.9  # measured ~0.77
    assert minmax.extra["min_cosine_similarity"] <= minmax.value
    assert minmax.extra["w8a8"]["config"]["activation_estimator"] == "running_minmax"
    suppressed = minilm_records[("w8a8-sim+os", "cosine_similarity")]
    assert suppressed.extra["w8a8"]["config"]["gamma_migration"] is True
    assert suppressed.extra["w8a8"]["config"]["token_wise_clipping"] is True
    # Per tensor, the residual sums' outliers (which gamma migration does not touch) dominate the
    # error, so Outlier Suppression cannot recover it here (measured ~0.75); it does run and cut the
    # LayerNorm-output outliers.
    assert 0.0 < suppressed.value <= 1.0 and math.isfinite(minilm_records[("w8a8-sim+os", "max_inf_norm")].value)


def test_outlier_suppression_recovers_part_with_residual_channels(minilm_records, minilm_records_residual_channels):
    records = minilm_records_residual_channels
    minmax = records[("w8a8-sim", "cosine_similarity")]
    suppressed = records[("w8a8-sim+os", "cosine_similarity")]
    assert minmax.extra["w8a8"]["config"]["per_channel_residuals"] is True
    assert suppressed.extra["w8a8"]["config"]["per_channel_residuals"] is True
    per_tensor = minilm_records[("w8a8-sim", "cosine_similarity")].value
    # Still degraded (measured ~0.93); Outlier Suppression recovers part of the rest (~0.94).
    assert per_tensor < minmax.value < 0.97
    assert minmax.value < suppressed.value < 1.0
