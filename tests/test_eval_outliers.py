"""Outlier statistics against hand-computed values and direct computations."""

import pytest
import scipy.stats
import torch

from hf_quantizable.evaluation import compute_outlier_stats, sequence_stats
from hf_quantizable.evaluation.outliers import OutlierStatsCollector, outlier_counts_per_dim
from tests.conftest import tiny_inputs, tiny_model


def test_sequence_stats_hand_computed():
    # values 1, 2, 3, 10: mean 4, squared deviations 9+4+1+36 = 50 (unbiased variance 50/3),
    # fourth powers 81+16+1+1296 = 1394 (mean 348.5): kurtosis 348.5 / (50/3)^2 = 1.25460
    x = torch.tensor([[[1.0, 2.0], [3.0, 10.0], [100.0, -100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    inf_norm, kurtosis = sequence_stats(x, mask)
    assert inf_norm.item() == 10.0
    assert kurtosis.item() == pytest.approx(348.5 / ((50 / 3) ** 2 + 1e-6), rel=1e-12)
    # unpadded: the official formula (x.view(B, -1), torch.std, eps 1e-6) on the same values
    flat = x[:, :2].reshape(1, -1)
    official = ((flat - flat.mean(1, keepdim=True)) ** 4).mean(1) / (flat.std(1) ** 4 + 1e-6)
    assert kurtosis.item() == pytest.approx(official.item(), rel=1e-6)


def test_sequence_stats_matches_scipy_per_sequence():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4).pow(3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    inf_norms, kurtoses = sequence_stats(x, mask)
    for b in range(3):
        values = x[b][mask[b].bool()].flatten().double().numpy()
        n = values.size
        # scipy's (biased) Pearson kurtosis uses the biased variance; the official one the unbiased
        expected = scipy.stats.kurtosis(values, fisher=False, bias=True) * ((n - 1) / n) ** 2
        assert kurtoses[b].item() == pytest.approx(expected, rel=1e-6)
        assert inf_norms[b].item() == pytest.approx(abs(values).max())


def test_outlier_counts_per_dim():
    x = torch.zeros(1, 40, 3)
    x[0, :, 1] = torch.linspace(-1, 1, 40)
    x[0, 5, 2] = 50.0  # one outlier in dim 2
    x[0, 7, 2] = 60.0  # a second one, but on a padded token
    mask = torch.ones(1, 40)
    mask[0, 7] = 0
    assert outlier_counts_per_dim(x, mask, threshold=4.0).tolist() == [0, 0, 1]


def test_bert_stats_equal_direct_computation_with_padding():
    model = tiny_model("bert")
    batch = tiny_inputs("bert", batch_size=3)
    stats = compute_outlier_stats(model, [batch])
    assert stats["num_sequences"] == 3
    layers = model.config.num_hidden_layers
    assert len(stats["per_layer"]) == 3 * layers
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"]
    for entry in stats["per_layer"]:
        if entry["kind"] != "layernorm_output":
            continue
        h = hidden[entry["layer"] + 1]  # the FFN LayerNorm output is the layer output
        expected = torch.stack([h[b][mask[b].bool()].abs().max() for b in range(3)]).mean()
        assert entry["inf_norm"] == pytest.approx(expected.item(), rel=1e-6)
    # averaging per sequence: the padded batch equals the sequences run one by one without padding
    single = [
        {"input_ids": batch["input_ids"][b : b + 1, : int(mask[b].sum())]} for b in range(batch["input_ids"].shape[0])
    ]
    alone = compute_outlier_stats(model, single)
    for padded, unpadded in zip(stats["per_layer"], alone["per_layer"]):
        assert padded["module"] == unpadded["module"]
        assert padded["inf_norm"] == pytest.approx(unpadded["inf_norm"], rel=1e-5)
        if padded["kurtosis"] is not None:
            assert padded["kurtosis"] == pytest.approx(unpadded["kurtosis"], rel=1e-5)
    kurtoses = [e["kurtosis"] for e in stats["per_layer"] if e["kurtosis"] is not None]
    assert len(kurtoses) == 2 * layers  # the residual sum carries an inf norm only (official code)
    assert stats["avg_kurtosis"] == pytest.approx(sum(kurtoses) / len(kurtoses))
    assert stats["max_kurtosis"] == max(kurtoses)
    assert stats["max_inf_norm"] == max(e["inf_norm"] for e in stats["per_layer"])


def test_hooked_modules_per_family():
    names = {
        family: [e["module"] for e in compute_outlier_stats(tiny_model(family), [tiny_inputs(family)])["per_layer"]]
        for family in ("bert", "opt", "vit")
    }
    assert "bert.encoder.layer.1.output.dense_quant" in names["bert"]
    assert "bert.encoder.layer.1.output.residual_quant" in names["bert"]
    assert "model.decoder.layers.0.self_attn.out_quant" in names["opt"]
    assert "model.decoder.layers.1.fc2_quant" in names["opt"]
    assert "model.decoder.layers.1" in names["opt"]
    assert "model.decoder.final_ln_quant" in names["opt"]
    assert "vit.encoder.layer.0.attention.output.dense_quant" in names["vit"]
    assert len(names["vit"]) == 4


def test_stock_bert_is_hooked_at_stock_modules():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    names = [site.name for site, _, _ in OutlierStatsCollector(model).sites]
    assert names[:2] == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    assert "encoder.layer.0.output.LayerNorm.input" in names


def test_unsupported_model_and_empty_batches():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(ValueError, match="model_type='gpt2'"):
        compute_outlier_stats(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2)), [])
    with pytest.raises(ValueError, match="at least one batch"):
        compute_outlier_stats(tiny_model("bert"), [])
