"""Plots are written as non-empty PNG files."""

import matplotlib.figure
import pytest
import torch

from hf_quantizable.evaluation import compute_outlier_stats
from hf_quantizable.evaluation.attention_view import attention_mass, attention_probabilities
from hf_quantizable.evaluation.outliers import OutlierStatsCollector
from hf_quantizable.evaluation.plots import (
    plot_attention_heatmap,
    plot_head_mass,
    plot_layer_stats,
    plot_outlier_dims,
)
from tests.conftest import tiny_inputs, tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > 2000


def test_plots_are_written(tmp_path):
    batch = tiny_inputs("bert")
    vanilla, gated = tiny_model("bert"), tiny_model("bert", attn_impl="gated")
    stats = {
        "vanilla fp32": compute_outlier_stats(vanilla, [batch]),
        "gated fp32": compute_outlier_stats(gated, [batch]),
    }
    assert _is_png(plot_layer_stats(stats, tmp_path / "layers.png"))

    with OutlierStatsCollector(vanilla, outlier_threshold=2.0) as collector:
        with torch.no_grad():
            vanilla(**batch)
    assert _is_png(plot_outlier_dims(collector.outlier_counts(), tmp_path / "dims.png"))

    probs = attention_probabilities(vanilla, batch, layer=1, head=0)
    tokens = [f"t{i}" for i in range(probs.shape[0])]
    assert _is_png(plot_attention_heatmap(probs, tmp_path / "sub" / "heatmap.png", tokens=tokens))

    view = attention_mass(vanilla, [batch], delimiter_ids=[5])
    assert _is_png(plot_head_mass(view["mass"], tmp_path / "mass.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dims.png", "layers.png", "mass.png", "sub"]


def test_empty_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="at least one variant"):
        plot_layer_stats({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plot_outlier_dims({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_MAGIC)  # a partial PNG, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    stats = {"vanilla fp32": compute_outlier_stats(tiny_model("bert"), [tiny_inputs("bert")])}
    with pytest.raises(OSError, match="disk full"):
        plot_layer_stats(stats, tmp_path / "layers.png")
    assert list(tmp_path.iterdir()) == []
