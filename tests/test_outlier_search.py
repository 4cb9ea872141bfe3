"""Mechanisms of the outlier-effect search: neuron-RMS kurtosis, max location, search log, resume."""

import pytest
import torch

from hf_quantizable.evaluation import compute_outlier_stats
from hf_quantizable.evaluation.outliers import OutlierStatsCollector, neuron_mean_squares, neuron_rms_kurtosis
from tests.conftest import tiny_inputs, tiny_model


def test_neuron_rms_kurtosis_hand_computed():
    # neuron RMS 10, 1, 1, 1: s = 100, 1, 1, 1; mean(s^2) = 10003 / 4, mean(s)^2 = (103 / 4)^2
    s = torch.tensor([100.0, 1.0, 1.0, 1.0])
    assert neuron_rms_kurtosis(s) == pytest.approx((10003 / 4) / (103 / 4) ** 2, rel=1e-12)
    assert neuron_rms_kurtosis(torch.full((8,), 3.0)) == pytest.approx(1.0)


def test_neuron_rms_kurtosis_is_scale_free_and_ignores_padding():
    x = torch.ones(2, 3, 4)
    x[:, :, 0] = 10.0  # neuron 0 has RMS 10, the others 1
    x[1, 2] = 1000.0  # a padded token: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    sums, tokens = neuron_mean_squares(x, mask)
    assert tokens == 5
    assert sums.tolist() == [500.0, 5.0, 5.0, 5.0]
    expected = (10003 / 4) / (103 / 4) ** 2
    assert neuron_rms_kurtosis(sums / tokens) == pytest.approx(expected)
    assert neuron_rms_kurtosis(7.0 * sums / tokens) == pytest.approx(expected)


def test_collector_rms_kurtosis_accumulates_over_batches():
    """The statistic pools every token of every batch (it is not an average of per-batch values)."""
    model = tiny_model("opt")
    batches = [tiny_inputs("opt", batch_size=2), tiny_inputs("opt", batch_size=3, seq_length=6)]
    with OutlierStatsCollector(model) as collector, torch.no_grad():
        for batch in batches:
            model(**batch)
    summary = collector.summary()
    site = collector.sites[0][0]  # layer 0 attention output
    captured = []
    handle = collector.sites[0][1].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    pooled = torch.cat(
        [o[b][batch["attention_mask"][b].bool()] for o, batch in zip(captured, batches) for b in range(len(o))]
    )
    expected = neuron_rms_kurtosis(pooled.double().pow(2).mean(0))
    assert site.rms_kurtosis == pytest.approx(expected, rel=1e-9)
    assert summary["per_layer"][0]["rms_kurtosis"] == pytest.approx(expected, rel=1e-9)
    values = [e["rms_kurtosis"] for e in summary["per_layer"]]
    assert summary["max_rms_kurtosis"] == max(values)
    assert summary["avg_rms_kurtosis"] == pytest.approx(sum(values) / len(values))


def test_max_location_finds_the_planted_value():
    model = tiny_model("opt")
    batch = tiny_inputs("opt", batch_size=2)
    layer = model.model.decoder.layers[1]

    def plant(module, inputs, output):
        output = output.clone()
        output[1, 3, 5] = 1e4
        return output

    handle = layer.fc2.register_forward_hook(plant)
    try:
        stats = compute_outlier_stats(model, [batch])
    finally:
        handle.remove()
    entry = next(e for e in stats["per_layer"] if e["kind"] == "ffn_output" and e["layer"] == 1)
    location = entry["max_location"]
    assert (location["position"], location["channel"]) == (3, 5)
    assert location["token_id"] == int(batch["input_ids"][1, 3])
    assert location["value"] == pytest.approx(1e4)
    assert 0.0 <= location["first_token_share"] <= 1.0
    assert stats["max_location"]["module"] in {e["module"] for e in stats["per_layer"]}


# --- the search benchmark (benchmarks/outlier_effect.py) ---

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "outlier_effect.py"


@pytest.fixture(scope="module")
def search():
    spec = importlib.util.spec_from_file_location("outlier_effect_benchmark", _BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_search_log_appends_and_keeps_every_record(search, tmp_path):
    log = tmp_path / "results" / "log.jsonl"
    search.append_log(log, {"label": "a", "status": "started"})
    search.append_log(log, {"label": "a", "status": "aborted", "steps_done": 7})
    search.append_log(log, {"label": "a", "status": "started"})
    assert [r["status"] for r in search.read_log(log)] == ["started", "aborted", "started"]
    assert search.read_log(log)[1]["steps_done"] == 7


def test_read_tracking_keeps_the_last_record_of_a_retracked_step(search, tmp_path):
    path = tmp_path / "tracking.jsonl"
    lines = [{"step": 100, "v": 1}, {"step": 200, "v": 2}, {"step": 200, "v": 3}, {"step": 300, "v": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [(r["step"], r["v"]) for r in search.read_tracking(path)] == [(100, 1), (200, 3), (300, 4)]


def test_a_bos_setting_trains_with_bos_at_every_block_start(search):
    assert search.variant_preset(search.Setting("opt-tiny", [], bos=True), "vanilla", 12, 7).data.bos_at_block_start
    assert not search.variant_preset(search.Setting("opt-tiny", []), "vanilla", 12, 7).data.bos_at_block_start


def test_setting_file_refuses_another_setting_and_a_repeat_without_resume(search, tmp_path):
    identity = {"preset": "opt-tiny", "overrides": ["a=1"], "bos": True}
    search.check_setting_file(tmp_path, identity, resume=False)
    search.check_setting_file(tmp_path, identity, resume=True)
    with pytest.raises(ValueError, match="--resume"):
        search.check_setting_file(tmp_path, identity, resume=False)
    with pytest.raises(ValueError, match="another setting"):
        search.check_setting_file(tmp_path, {**identity, "bos": False}, resume=True)


def _result(ppl: float, ratio: float, inf_norm: float) -> dict:
    return {"fp": {"perplexity": ppl}, "w8a8_ratio": ratio, "max_inf_norm": inf_norm}


def test_check_bar(search):
    good = {
        "vanilla": _result(10.0, 1.3, 500.0),
        "clipped": _result(10.2, 1.01, 50.0),
        "gated": _result(9.9, 1.0, 90.0),
    }
    assert search.check_bar(good)["met"]
    assert not search.check_bar({**good, "gated": _result(9.9, 1.0, 200.0)})["met"]  # inf norm only x2.5
    assert not search.check_bar({**good, "clipped": _result(11.0, 1.01, 50.0)})["met"]  # FP ppl +10%
    assert not search.check_bar({**good, "vanilla": _result(10.0, 1.1, 500.0)})["met"]
    assert not search.check_bar({k: v for k, v in good.items() if k != "gated"})["met"]


def test_check_bar_on_the_paper_ratio(search):
    results = {
        "vanilla": {**_result(10.0, 1.0, 500.0), "w8a8_paper_ratio": 1.3},
        "clipped": {**_result(10.2, 1.0, 50.0), "w8a8_paper_ratio": 1.01},
        "gated": {**_result(9.9, 1.0, 90.0), "w8a8_paper_ratio": 1.05},
    }
    assert not search.check_bar(results)["met"]  # the default ratio: vanilla does not degrade
    paper = search.check_bar(results, "w8a8_paper_ratio")
    assert paper["vanilla_w8a8_paper_ratio"] == 1.3 and paper["clipped"]["ok"] and not paper["gated"]["ok"]
    results["gated"]["w8a8_paper_ratio"] = 1.0
    assert search.check_bar(results, "w8a8_paper_ratio")["met"]


def test_variant_preset_sets_seed_steps_and_optimizer(search):
    setting = search.Setting("opt-tiny", ["model.num_hidden_layers=3"])
    preset = search.variant_preset(setting, "vanilla-muon", max_steps=12, seed=7)
    assert preset.name == "opt-tiny-vanilla" and preset.optimizer == "muon"
    assert preset.training["max_steps"] == 12 and preset.training["seed"] == 7
    assert preset.model["num_hidden_layers"] == 3 and preset.tracking.outlier_every_n_steps == 0
    assert search.variant_preset(setting, "gated", 12, 7).model["attn_impl"] == "gated"


def test_muon_trains_saves_and_resumes(tmp_path):
    from hf_quantizable.training.presets import apply_overrides, get_preset
    from hf_quantizable.training.runner import build_run
    from hf_quantizable.training.trainer import MuonWithAdamW

    def preset(max_steps: int):
        return apply_overrides(
            get_preset("opt-tiny-vanilla"),
            [
                "optimizer=muon",
                "data.embedded_size=400",
                "data.seq_length=32",
                "model.max_position_embeddings=32",
                f"training.max_steps={max_steps}",
                "training.save_steps=2",
                "training.warmup_steps=0",
                "training.per_device_train_batch_size=4",
                "tracking.outlier_every_n_steps=0",
            ],
        )

    def train(max_steps: int, resume: bool):
        run = build_run(preset(max_steps), tmp_path / "run", resume=resume, training_overrides={"disable_tqdm": True})
        run.trainer.optimizer_name = preset(max_steps).optimizer
        run.trainer.train(resume_from_checkpoint=run.resume_from)
        return run

    run = train(2, resume=False)
    optimizer = run.trainer.optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    assert isinstance(optimizer, MuonWithAdamW)
    muon, adamw = optimizer.optimizers
    model = run.trainer.model
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert muon_params and all(id(p) in linear_weights and p.ndim == 2 for p in muon_params)
    assert id(model.get_output_embeddings().weight) not in {id(p) for p in muon_params}
    adam_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert id(model.model.decoder.embed_tokens.weight) in adam_params
    assert all(len(muon.state[p]) for p in muon_params)  # momentum buffers after two steps
    assert optimizer.param_groups[0] is muon.param_groups[0]  # the scheduler sets both learning rates
    momentum = muon.state[muon_params[0]]["momentum_buffer"].clone()

    saved = torch.load(Path(run.trainer.args.output_dir) / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert len(saved["optimizers"]) == 2 and saved["optimizers"][0]["state"]

    resumed = train(4, resume=True)
    assert resumed.resume_from is not None and resumed.resume_from.endswith("checkpoint-2")
    assert resumed.trainer.state.global_step == 4
    inner = getattr(resumed.trainer.optimizer, "optimizer", resumed.trainer.optimizer)
    assert inner.param_groups[0] is inner.optimizers[0].param_groups[0]
    first = inner.optimizers[0].param_groups[0]["params"][0]
    assert not torch.equal(inner.optimizers[0].state[first]["momentum_buffer"], momentum)


def test_bigram_backcopy_copies_after_triggers(search):
    lines = search.bigram_backcopy_corpus(20, seed=3, words=40)
    assert lines == search.bigram_backcopy_corpus(20, seed=3, words=40)  # deterministic
    copies = 0
    for line in lines:
        tokens = [int(w[1:]) for w in line.split()]
        assert len(tokens) == 40
        for i in range(1, len(tokens) - 1):
            if tokens[i] < 4:  # a trigger: the next token repeats the one before it
                assert tokens[i + 1] == tokens[i - 1]
                copies += 1
    assert copies > 0


_TINY = [
    "data.embedded_size=400",
    "data.seq_length=32",
    "model.max_position_embeddings=32",
    "training.warmup_steps=0",
    "training.per_device_train_batch_size=4",
    "training.per_device_eval_batch_size=4",
]


def _main(search, tmp_path, *extra: str) -> int:
    return search.main(
        [
            "--preset", "opt-tiny", "--label", "tiny", "--bos", "--variants", "vanilla",
            "--track-every", "2", "--w8a8-every", "2", "--eval-batches", "1",
            "--runs-dir", str(tmp_path / "runs"), "--log", str(tmp_path / "log.jsonl"),
            "--comparison", str(tmp_path / "comparison.json"), *extra, *_TINY,
        ]
    )  # fmt: skip


def test_search_resumes_extends_and_logs_every_attempt(search, tmp_path):
    assert _main(search, tmp_path, "--max-steps", "2") == 0
    with pytest.raises(ValueError, match="--resume"):  # the label exists: continuing needs --resume
        _main(search, tmp_path, "--max-steps", "4")
    assert _main(search, tmp_path, "--max-steps", "4", "--resume") == 0
    records = search.read_log(tmp_path / "log.jsonl")
    assert [r["status"] for r in records] == ["started", "finished", "started", "finished"]
    assert [r["steps_done"] for r in records if r["status"] == "finished"] == [2, 4]
    assert records[-1]["wall_time_total_s"] >= records[-1]["wall_time_s"] > 0
    assert records[-1]["machine"]["cpu_count"] and "cpu_flags" in records[-1]["machine"]
    folder = tmp_path / "runs" / "tiny" / "seed1000" / "vanilla"
    assert [r["step"] for r in search.read_tracking(folder / "outlier_tracking.jsonl")] == [2, 4]
    final = json.loads((folder / "final.json").read_text())
    assert final["steps"] == 4 and final["w8a8_ratio"] > 0 and final["max_rms_kurtosis"] >= 1
    assert final["w8a8_paper"]["preset"] == "bondarenko2023-opt" and final["w8a8_paper_ratio"] > 0
    # finished at the requested steps: reused, not trained again
    assert _main(search, tmp_path, "--max-steps", "4", "--resume") == 0
    assert len(search.read_log(tmp_path / "log.jsonl")) == 4


def test_search_logs_a_failed_attempt(search, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(search, "evaluate_variant", broken)
    assert _main(search, tmp_path, "--max-steps", "2") == 0
    records = search.read_log(tmp_path / "log.jsonl")
    assert [r["status"] for r in records] == ["started", "failed"]
    assert "evaluation broke" in records[-1]["error"] and records[-1]["steps_done"] == 2


def test_search_logs_an_aborted_attempt_and_reraises(search, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search, "evaluate_variant", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _main(search, tmp_path, "--max-steps", "2")
    records = search.read_log(tmp_path / "log.jsonl")
    assert [r["status"] for r in records] == ["started", "aborted"]
    # the checkpoint at step 2 is there: --resume continues from it
    monkeypatch.undo()
    assert _main(search, tmp_path, "--max-steps", "2", "--resume") == 0
    assert search.read_log(tmp_path / "log.jsonl")[-1]["status"] == "finished"
