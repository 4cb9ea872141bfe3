"""Attention-head view and the `evaluate` outlier measurement."""

import evaluate
import pytest
import torch

from hf_quantizable.evaluation import compute_outlier_stats
from hf_quantizable.evaluation.attention_view import (
    attention_mass,
    attention_probabilities,
    background_patches,
)
from hf_quantizable.evaluation.metrics import OUTLIER_STATS_PATH
from hf_quantizable.evaluation.outliers import OutlierStatsCollector
from tests.conftest import tiny_inputs, tiny_model


def test_attention_mass_equals_direct_computation():
    model = tiny_model("bert")
    batch = tiny_inputs("bert", batch_size=2, seq_length=9)
    delimiter = int(batch["input_ids"][0, 4])
    view = attention_mass(model, [batch], delimiter_ids=[delimiter])
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    mask = batch["attention_mask"].bool()
    layer, head = 1, 2
    expected_first, expected_delimiter = [], []
    for b in range(2):
        probs = attentions[layer][b, head][mask[b]][:, mask[b]]  # real queries x real keys
        expected_first.append(probs[:, 0].mean())
        keys = batch["input_ids"][b][mask[b]] == delimiter
        expected_delimiter.append(probs[:, keys].sum(dim=-1).mean())
    assert view["mass"]["first"][layer][head] == pytest.approx(torch.stack(expected_first).mean().item(), rel=1e-5)
    assert view["mass"]["delimiter"][layer][head] == pytest.approx(
        torch.stack(expected_delimiter).mean().item(), rel=1e-5
    )
    assert view["gate"] is None and view["num_sequences"] == 2


def test_gate_probabilities_are_logged():
    model = tiny_model("bert", attn_impl="gated", gate_type="linear", pi_init=0.25)
    view = attention_mass(model, [tiny_inputs("bert")])
    assert len(view["gate"]) == 2 and len(view["gate"][0]) == 4
    assert view["gate"][0][0] == pytest.approx(0.25)  # gates start at exactly pi_init


def test_background_patches_and_vit_mass():
    pixels = torch.zeros(1, 3, 16, 16)
    pixels[0, :, 4:8, 8:12] = torch.rand(3, 4, 4)  # one textured patch: row 1, column 2 -> patch 6
    background = background_patches(pixels, patch_size=4)
    assert background.shape == (1, 16)
    assert background[0].tolist() == [i != 6 for i in range(16)]
    view = attention_mass(tiny_model("vit"), [{"pixel_values": pixels}])
    assert set(view["mass"]) == {"first", "background"}
    first, rest = torch.tensor(view["mass"]["first"]), torch.tensor(view["mass"]["background"])
    assert ((first + rest) <= 1 + 1e-6).all() and (rest > 0).all()


def test_attention_probabilities_drop_padding():
    model = tiny_model("bert")
    batch = tiny_inputs("bert", batch_size=2, seq_length=9)
    single = {k: v[1:] for k, v in batch.items()}  # the padded row: 6 real tokens
    probs = attention_probabilities(model, single, layer=0, head=1)
    assert probs.shape == (6, 6)
    assert torch.allclose(probs.sum(-1), torch.ones(6), atol=1e-5)
    with pytest.raises(ValueError, match="`head` must be in"):
        attention_probabilities(model, single, layer=0, head=9)


def test_evaluate_module_equals_compute_outlier_stats():
    model = tiny_model("bert")
    batch = tiny_inputs("bert", batch_size=3)
    stats = compute_outlier_stats(model, [batch])
    collector = OutlierStatsCollector(model)
    captured, handles = [], []
    mask = batch["attention_mask"].bool()
    for site, module, where in collector.sites:

        def hook(module, inputs, output, site=site, where=where):
            x = inputs[0] if where == "input" else output
            captured.extend((x[b][mask[b]].numpy(), site.name) for b in range(x.shape[0]))

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()

    measurement = evaluate.load(OUTLIER_STATS_PATH)
    for activation, name in captured:
        measurement.add(activations=activation, tensors=name)
    residuals = [site.name for site, _, _ in collector.sites if not site.kurtosis]
    result = measurement.compute(inf_norm_only=residuals)
    assert result["max_inf_norm"] == pytest.approx(stats["max_inf_norm"], rel=1e-5)
    assert result["avg_kurtosis"] == pytest.approx(stats["avg_kurtosis"], rel=1e-5)
    assert result["max_kurtosis"] == pytest.approx(stats["max_kurtosis"], rel=1e-5)
    for entry in stats["per_layer"]:
        assert result["per_tensor"][entry["module"]]["inf_norm"] == pytest.approx(entry["inf_norm"], rel=1e-5)
