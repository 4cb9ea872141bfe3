"""The main job, short: train tiny vanilla + gated BERTs (setting bert-tiny), quantize, evaluate, write
Hub-ready folders, then refresh their cards with hub_eval, offline; and the default setting on its
shipped opt-outlier checkpoint, which the preset's first training steps reproduce."""

import contextlib
import io
import json

import pytest
import torch
from huggingface_hub import ModelCard, constants

from hf_quantizable.evaluation.results import read_results
from hf_quantizable.hub.card import variant_of
from hf_quantizable.hub_eval import main as hub_eval_main
from hf_quantizable.pipeline import SHIPPED_DIR, summary_table
from hf_quantizable.pipeline import main as pipeline_main
from hf_quantizable.train import main as train_main
from hf_quantizable.training.runner import CHECKPOINT_DIR
from tests.isolation import run_without_package

QUICK = ["--setting", "bert-tiny", "--max-steps", "4", "--corpus-size", "1000"]
QUICK += ["--max-sequences", "4", "--num-calibration-batches", "1"]


def run_main_job(root, variants: list[str], options: list[str]) -> tuple:
    """(root, exit status, stdout) of the main job writing into root/out and root/runs."""
    args = ["--local-dir", str(root / "out"), "--work-dir", str(root / "runs"), "--variants", *variants]
    args += ["--namespace", "test-org", "--no-progress", *options]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = pipeline_main(args)
    return root, code, stdout.getvalue()


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    return run_main_job(tmp_path_factory.mktemp("main-job"), ["vanilla", "gated"], QUICK)


def test_main_job_writes_both_sibling_folders_with_cards(main_job):
    root, code, _ = main_job
    assert code == 0
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "bert-tiny-gated",
        "bert-tiny-gated-w8a8",
        "bert-tiny-vanilla",
        "bert-tiny-vanilla-w8a8",
    ]
    for variant, attn_impl in (("vanilla", "softmax"), ("gated", "gated")):
        fp, int8 = out / f"bert-tiny-{variant}", out / f"bert-tiny-{variant}-w8a8"
        assert json.loads((fp / "config.json").read_text())["attn_impl"] == attn_impl
        assert json.loads((int8 / "config.json").read_text())["w8a8_config"]
        records = read_results(fp / "results.json")
        assert {variant_of(r) for r in records} == {"fp32", "fp16", "w8a8-sim", "int8"}
        measured = {(variant_of(r), r.metric): r.value for r in records if r.value is not None}
        # a real float16 forward: close to fp32, not a relabelled copy of it
        fp16, fp32 = measured[("fp16", "perplexity")], measured[("fp32", "perplexity")]
        assert fp16 != fp32 and fp16 == pytest.approx(fp32, rel=0.02)
        card = ModelCard.load(fp / "README.md", ignore_metadata_errors=False)
        in_card = {(r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}
        assert in_card == measured  # the card holds exactly the measured numbers
        assert f"test-org/bert-tiny-{variant}-w8a8" in card.text
        assert ModelCard.load(int8 / "README.md").data.base_model == f"test-org/bert-tiny-{variant}"
        assert (fp / "plots" / "layers.png").stat().st_size > 0 and "(plots/layers.png)" in card.text
        assert "Trained for 4 steps in " in card.text  # from Trainer's train_results.json
        assert ("fp32", "perplexity") in measured and ("int8", "perplexity") in measured
        assert ("fp32", "max_inf_norm") in measured and ("fp32", "avg_kurtosis") in measured


def test_main_job_prints_the_fp_vs_int8_table(main_job):
    root, _, stdout = main_job
    table = summary_table({v: root / "runs" / f"bert-tiny-{v}" / "results.json" for v in ("vanilla", "gated")})
    assert table in stdout  # printed at the end, from the results files
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["attention", "FP32", "ppl", "W8A8-sim"]
    assert lines[2].startswith("vanilla") and lines[3].startswith("gated")
    records = read_results(root / "runs" / "bert-tiny-gated" / "results.json")
    fp_ppl = next(r.value for r in records if variant_of(r) == "fp32" and r.metric == "perplexity")
    assert f"{fp_ppl:.4g}" in lines[3]
    for folder in ("bert-tiny-vanilla", "bert-tiny-vanilla-w8a8", "bert-tiny-gated", "bert-tiny-gated-w8a8"):
        assert str(root / "out" / folder) in stdout


def test_int8_folder_loads_without_the_package(main_job):
    root, _, _ = main_job
    int8 = root / "out" / "bert-tiny-gated-w8a8"
    from transformers import AutoModelForMaskedLM

    ids = [[2, 10, 11, 12, 13, 3]]
    expected = AutoModelForMaskedLM.from_pretrained(int8).eval()(input_ids=torch.tensor(ids)).logits[0, :, :4]
    out = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModelForMaskedLM
        model = AutoModelForMaskedLM.from_pretrained({str(int8)!r}, trust_remote_code=True).eval()
        assert model.config.w8a8_config
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({ids})).logits[0, :, :4]
        print("RESULT", json.dumps(logits.tolist()))
        """
    )
    loaded = torch.tensor(json.loads(out.split("RESULT ", 1)[1]))
    assert torch.allclose(loaded, expected.detach(), atol=1e-5)


def test_hub_eval_refreshes_cards_offline(main_job, capsys):
    root, _, _ = main_job
    out = root / "eval"
    heldout = root / "runs" / "data" / "embedded-heldout" / "validation.txt"
    args = ["--repos", "test-org/bert-tiny-gated=test-org/bert-tiny-gated-w8a8", "--models-dir", str(root / "out")]
    args += ["--output", str(out), "--dataset", str(heldout), "--split", "validation", "--max-sequences", "4"]
    assert hub_eval_main(args) == 0
    refreshed = out / "bert-tiny-gated" / "repos"
    assert {p.name for p in refreshed.iterdir()} == {"bert-tiny-gated", "bert-tiny-gated-w8a8"}
    card = ModelCard.load(refreshed / "bert-tiny-gated" / "README.md")
    records = read_results(out / "bert-tiny-gated" / "results.json")
    assert {r.metric_config for r in card.data.eval_results} == {variant_of(r) for r in records}
    assert "refreshed test-org/bert-tiny-gated-w8a8" in capsys.readouterr().out


def test_bad_arguments_fail_fast(tmp_path, capsys, monkeypatch):
    assert pipeline_main(["--local-dir", str(tmp_path / "o"), "--variants", "vanilla", "sparse"]) == 2
    assert "--variants: unknown ['sparse']; allowed: vanilla, gated, clipped" in capsys.readouterr().err
    assert pipeline_main(["--local-dir", str(tmp_path / "o"), "--max-steps", "0"]) == 2
    assert "--max-steps must be a positive integer" in capsys.readouterr().err
    assert hub_eval_main(["--repos", "not-a-repo-id", "--models-dir", str(tmp_path)]) == 2
    assert "ORG/NAME" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert hub_eval_main(["--repos", "org/model", "--models-dir", str(tmp_path), "--push"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_main_job_reruns_over_its_own_outputs(main_job, capsys):
    """A second run reuses the trained models and replaces only the repo folders it wrote (with --overwrite)."""
    root, _, _ = main_job
    args = ["--local-dir", str(root / "out"), "--work-dir", str(root / "runs"), "--variants", "vanilla", "gated"]
    args += ["--namespace", "test-org", "--no-progress", *QUICK]
    weights = root / "runs" / "bert-tiny-gated" / "model.safetensors"
    trained = weights.stat().st_mtime_ns
    assert pipeline_main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert pipeline_main([*args, "--overwrite"]) == 0
    assert weights.stat().st_mtime_ns == trained  # not retrained
    assert read_results(root / "out" / "bert-tiny-gated" / "results.json")


# --- setting opt-outlier: the shipped checkpoints ---


@pytest.fixture(scope="module")
def outlier_job(tmp_path_factory):
    options = ["--max-sequences", "4", "--num-calibration-batches", "1"]
    return run_main_job(tmp_path_factory.mktemp("outlier-job"), ["vanilla"], options)


def test_opt_outlier_job_quantizes_and_evaluates_the_shipped_weights(outlier_job):
    from safetensors.torch import load_file

    root, code, stdout = outlier_job
    assert code == 0
    assert sorted(p.name for p in (root / "out").iterdir()) == ["opt-outlier-vanilla", "opt-outlier-vanilla-w8a8"]
    fp = root / "out" / "opt-outlier-vanilla"
    shipped = load_file(SHIPPED_DIR / "vanilla" / "model.safetensors")
    published = load_file(fp / "model.safetensors")
    assert shipped.keys() == published.keys() and all(torch.equal(shipped[k], published[k]) for k in shipped)
    assert list(fp.glob("modeling_quantizable_opt.py"))  # the Hub folder carries its modeling code
    measured = {(variant_of(r), r.metric): r.value for r in read_results(fp / "results.json")}
    assert measured[("fp32", "perplexity")] > 1 and measured[("int8", "perplexity")] > 1
    card = (fp / "README.md").read_text()
    assert "Synthetic no-op corpus (held out)" in card and "the synthetic no-op corpus (filler tokens" in card
    assert "English-like grammar" not in card
    provenance = json.loads((SHIPPED_DIR / "vanilla" / "provenance.json").read_text())
    minutes = round(provenance["wall_time_s"] / 60, 1)
    assert (
        f"`benchmarks/outlier_effect.py` (seed 1000), 3200 steps in\n{minutes} minutes on {provenance['machine']}"
        in card
    )
    assert provenance["command"] in card
    for folder in (fp, root / "out" / "opt-outlier-vanilla-w8a8"):
        assert json.loads((folder / "provenance.json").read_text()) == provenance
    assert "FP vs INT8 (W8A8), opt-outlier, held-out no-op corpus, 4 sequences" in stdout


def test_opt_outlier_calibrates_and_evaluates_blocks_that_start_with_bos(outlier_job):
    from transformers import AutoTokenizer

    from hf_quantizable.evaluation.harness import EvalSettings, build_batches
    from hf_quantizable.quantization.data import calibration_batches

    root, _, _ = outlier_job
    run_dir, data = root / "runs" / "opt-outlier-vanilla", root / "runs" / "data"
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    batches, _ = calibration_batches(run_dir, data / "calibration.txt", 4, 256, 2, "quantizable_opt")
    assert len(batches) == 2 and all(b["input_ids"].shape == (4, 256) for b in batches)
    assert all((b["input_ids"][:, 0] == tokenizer.bos_token_id).all() for b in batches)
    settings = EvalSettings(
        task="clm", dataset=str(data / "embedded-noop-heldout"), split="validation", max_sequences=4,
        max_length=256, bos_at_block_start=True,
    )  # fmt: skip
    (batch,) = build_batches(settings, tokenizer, "validation")
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert (batch["input_ids"][:, 1:] != tokenizer.bos_token_id).any()


def test_opt_outlier_refuses_the_training_flags(tmp_path, capsys):
    assert pipeline_main(["--local-dir", str(tmp_path / "o"), "--max-steps", "10"]) == 2
    assert "--max-steps applies to --setting bert-tiny" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_opt_outlier_preset_reproduces_the_first_steps_of_the_shipped_run(tmp_path):
    """The shipped checkpoint's training log at its first logging step equals a fresh run of its preset.

    Compared: the averaged quantities (the training loss over the first logging window, the probe loss on
    held-out text). Single-step ones (the last step's gradient norm, outlier maxima) differ between CPU
    kinds: AVX2 and AVX-512 float kernels round differently, and the runs drift apart in those details.
    """
    shipped = json.loads((SHIPPED_DIR / "vanilla" / "training_log.json").read_text())
    step = shipped["logging_steps"]
    logged = next(e for e in shipped["log_history"] if e["step"] == step and "loss" in e)
    args = ["--preset", "opt-outlier-vanilla", "--output", str(tmp_path / "run"), "--max-steps", str(step)]
    assert train_main([*args, "--no-progress"]) == 0
    state = json.loads((tmp_path / "run" / CHECKPOINT_DIR / f"checkpoint-{step}" / "trainer_state.json").read_text())
    fresh = next(e for e in state["log_history"] if e["step"] == step and "loss" in e)
    assert fresh["loss"] == pytest.approx(logged["loss"], rel=2e-3)
    assert fresh["learning_rate"] == pytest.approx(logged["learning_rate"], rel=1e-6)
    probe = next(e for e in shipped["log_history"] if e["step"] == step and "probe/loss" in e)["probe/loss"]
    fresh_probe = next(e for e in state["log_history"] if e["step"] == step and "probe/loss" in e)["probe/loss"]
    assert fresh_probe == pytest.approx(probe, rel=1e-2)
