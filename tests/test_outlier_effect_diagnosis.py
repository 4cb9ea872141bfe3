"""Mechanisms of the outlier-effect diagnosis: the filler-pairs corpus, the token profile, the quantizer ablation."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_inputs, tiny_model

_BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "outlier_effect.py"


@pytest.fixture(scope="module")
def search():
    spec = importlib.util.spec_from_file_location("outlier_effect_benchmark_diagnosis", _BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_filler_pairs_corpus_structure(search):
    lines = search.filler_pairs_corpus(200, seed=2)
    assert lines == search.filler_pairs_corpus(200, seed=2)  # deterministic
    pairs, delimiters, words = {}, 0, 0
    for line in lines:
        tokens = line.split()
        assert tokens[-1] == "."
        assert line.count(".") == 5  # one delimiter per sentence
        words += len(tokens)
        delimiters += tokens.count(".")
        for i, t in enumerate(tokens):
            assert t == "." or t[0] in "fkv"
            if t.startswith("k"):
                assert tokens[i + 1].startswith("v")
                assert pairs.setdefault(t, tokens[i + 1]) == tokens[i + 1]  # a fixed partner per key
    assert 0.05 < delimiters / words < 0.2  # delimiters are rare, unlike the no-op corpus's background `.`
    assert len(set(pairs.values())) == len(pairs)  # a permutation


class _Tokens:
    def convert_ids_to_tokens(self, i):
        return f"t{i}"


def test_token_profile_finds_a_planted_token_peak(search):
    model = tiny_model("bert")
    batch = tiny_inputs("bert", batch_size=2)
    batch["input_ids"][:, 4] = 7  # token 7 at position 4 of both rows
    point = model.bert.encoder.layer[0].output.residual_quant
    ids = batch["input_ids"]

    def plant(_m, _i, out):
        out = out.clone()
        out[ids == 7, 3] = 500.0
        return out

    handle = point.register_forward_hook(plant)
    try:
        rows = {r["point"]: r for r in search.token_profile(model, _Tokens(), [batch])}
    finally:
        handle.remove()
    row = rows["bert.encoder.layer.0.output.residual_quant"]
    assert row["max"] == pytest.approx(500.0)
    assert row["top1pct_tokens"][0] == ["t7", 1.0] or tuple(row["top1pct_tokens"][0]) == ("t7", 1.0)
    assert row["max_over_median"] > 50
    assert row["top1pct_position0_share"] == 0.0
    untouched = rows["bert.encoder.layer.1.output.residual_quant"]
    assert untouched["max_over_median"] < 20


def test_quantizer_ablation_reports_every_kind_and_restores_modes(search):
    model = tiny_model("bert")
    batch = tiny_inputs("bert", batch_size=2)
    batch = {**batch, "labels": batch["input_ids"].clone()}
    calibration = [{k: v for k, v in batch.items() if k != "labels"}]
    out = search.quantizer_ablation(model, [batch], calibration, "bondarenko2023-bert")
    assert out["fp_perplexity"] > 0 and out["all"] > 0 and out["weights_only"] > 0
    assert out["paper_preset"] == "bondarenko2023-bert" and out["all_paper"] > 0
    for kind in ("residual_quant", "dense_quant", "probs_quant", "scores_quant", "output_quant"):
        assert out[f"only_{kind}"] > 0
    assert all(step > 0 for step in out["grid_step"].values())
    for p in model.parameters():  # the model itself is left in floating point
        assert p.dtype == torch.float32


def test_a_corpus_replaces_the_dataset_and_embedded_size_of_the_setting(search, tmp_path, monkeypatch):
    monkeypatch.setitem(search.CORPORA, "filler-pairs", (search.filler_pairs_corpus, 50))
    setting = search.Setting(
        "opt-tiny", ["data.dataset=embedded-noop", "data.embedded_size=100000"], bos=True, corpus="filler-pairs"
    )
    preset = search.variant_preset(setting, "vanilla", 10, 3, tmp_path)
    assert preset.data.dataset == str(tmp_path / "corpora" / "filler-pairs-50.txt")
    assert (tmp_path / "corpora" / "filler-pairs-50.txt").read_text().count("\n") == 50
    assert preset.training["max_steps"] == 10 and preset.training["seed"] == 3


def test_attention_sinks_sums_the_mass_each_key_token_receives(search):
    model = tiny_model("opt")
    batch = tiny_inputs("opt", batch_size=2)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    rows = search.attention_sinks(model, _Tokens(), [batch])
    layers = model.config.num_hidden_layers
    heads = model.config.num_attention_heads
    assert len(rows) == layers * heads
    with torch.no_grad():
        probs = model(**batch, output_attentions=True).attentions[0][:, 0, 1:]  # layer 0, head 0, queries 1..
    expected_first = float(probs[:, :, 0].sum() / (probs.shape[0] * probs.shape[1]))
    assert rows[0]["position0_mass"] == pytest.approx(expected_first, rel=1e-5)
    ids = batch["input_ids"]
    per_token = {}
    for b in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            per_token[int(ids[b, k])] = per_token.get(int(ids[b, k]), 0.0) + float(probs[b, :, k].sum())
    top = max(per_token, key=per_token.get)
    assert rows[0]["top_token"] == f"t{top}"
    assert rows[0]["top_token_mass"] == pytest.approx(per_token[top] / (probs.shape[0] * probs.shape[1]), rel=1e-5)
    assert rows[0]["top_token_key_share"] == pytest.approx(float((ids == top).float().mean()))


def test_an_override_the_preset_refuses_is_logged_as_a_failed_attempt(search, tmp_path):
    args = [
        "--preset", "opt-tiny", "--label", "bad", "--variants", "vanilla", "--max-steps", "2",
        "--runs-dir", str(tmp_path / "runs"), "--log", str(tmp_path / "log.jsonl"),
        "--comparison", str(tmp_path / "comparison.json"), "model.no_such_field=1",
    ]  # fmt: skip
    assert search.main(args) == 0
    records = search.read_log(tmp_path / "log.jsonl")
    assert [r["status"] for r in records] == ["started", "failed"]
    assert "no_such_field" in records[-1]["error"] and records[-1]["steps_done"] == 0
