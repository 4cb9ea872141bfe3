"""GLUE: TSV reading, official metrics against scikit-learn/scipy, a short MiniLM fine-tune FP -> W8A8."""

import json

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import AutoTokenizer

from hf_quantizable import QuantizableBertForSequenceClassification
from hf_quantizable import evaluate as evaluate_cli
from hf_quantizable.evaluation import glue
from hf_quantizable.evaluation.glue import (
    GLUE_PRESETS,
    GLUE_TASKS,
    GluePreset,
    finetune_glue,
    get_preset,
    get_task,
    glue_metrics,
    load_glue_split,
    predict,
    read_glue_tsv,
    tokenize_glue,
    training_arguments,
)
from hf_quantizable.evaluation.results import read_results
from hf_quantizable.quantization import W8A8Config

LOCAL_COUNTS = {
    ("cola", "train"): 8551,
    ("cola", "validation"): 1043,
    ("sst2", "validation"): 872,
    ("mrpc", "train"): 3668,
    ("mrpc", "validation"): 408,
    ("stsb", "validation"): 1500,
    ("qnli", "validation"): 5463,
    ("rte", "validation"): 277,
    ("wnli", "train"): 635,
}


@pytest.mark.parametrize(("task", "split"), sorted(LOCAL_COUNTS))
def test_local_tsvs_read_without_quote_processing(data_dir, task, split):
    dataset = load_glue_split(get_task(task), split, data_dir / "glue")
    assert len(dataset) == LOCAL_COUNTS[(task, split)]
    assert list(dataset.features) == [*GLUE_TASKS[task].text_columns, "label"]


def test_tsv_details(data_dir, tmp_path):
    mrpc = load_glue_split(get_task("mrpc"), "validation", data_dir / "glue")
    assert sum(mrpc["label"]) == 279  # 279 paraphrases / 129 not (header with BOM parsed)
    cola = load_glue_split(get_task("cola"), "validation", data_dir / "glue")
    assert sum(cola["label"]) == 721  # no header: every line is a row
    # quotes stay as they are: a field that opens with a quote does not swallow the next lines
    path = tmp_path / "RTE" / "dev.tsv"
    path.parent.mkdir()
    path.write_text('index\tsentence1\tsentence2\tlabel\n0\t"He said\tit rains.\tentailment\n1\tb\tc\tnot_entailment\n')
    rte = read_glue_tsv(get_task("rte"), path)
    assert rte["sentence1"] == ['"He said', "b"] and rte["label"] == [0, 1]
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="label 'maybe' not in"):
        read_glue_tsv(get_task("rte"), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_glue_split(get_task("qqp"), "train", tmp_path)
    with pytest.raises(ValueError, match="unknown GLUE task 'mnlx'"):
        get_task("mnlx")
    with pytest.raises(ValueError, match="unknown GLUE preset"):
        get_preset("fast")


def test_metrics_against_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    predictions = np.where(rng.random(50) < 0.7, labels, 1 - labels)
    assert glue_metrics(get_task("cola"), predictions, labels) == {
        "matthews_correlation": pytest.approx(matthews_corrcoef(labels, predictions))
    }
    mrpc = glue_metrics(get_task("mrpc"), predictions, labels)
    assert mrpc == {
        "accuracy": pytest.approx(accuracy_score(labels, predictions)),
        "f1": pytest.approx(f1_score(labels, predictions)),
    }
    scores = rng.random(30) * 5
    noisy = scores + rng.normal(0, 1, 30)
    stsb = glue_metrics(get_task("stsb"), noisy, scores)
    assert stsb["pearson"] == pytest.approx(scipy.stats.pearsonr(noisy, scores)[0])
    assert stsb["spearmanr"] == pytest.approx(scipy.stats.spearmanr(noisy, scores)[0])
    # hand-computed: 3 of 4 right, one false positive: precision 2/3, recall 1, F1 0.8
    assert glue_metrics(get_task("qqp"), np.array([1, 1, 0, 1]), np.array([1, 1, 0, 0])) == {
        "accuracy": 0.75,
        "f1": pytest.approx(0.8),
    }


def test_short_minilm_finetune_fp_and_w8a8(data_dir, minilm_path, tmp_path):
    output = tmp_path / "sst2"
    records = finetune_glue(
        minilm_path,
        "sst2",
        output,
        preset="cpu-smoke",
        data_dir=data_dir / "glue",
        max_train_samples=48,
        max_eval_samples=64,
        max_steps=3,
        w8a8_config=W8A8Config(num_calibration_batches=2),
        progress=False,
    )
    assert [(r.precision, r.metric) for r in records] == [("fp32", "accuracy"), ("w8a8-sim", "accuracy")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sst2"]  # no temporary folder left
    assert [r.to_dict() for r in read_results(output / "results.json")] == [r.to_dict() for r in records]
    assert json.loads((output / "config.json").read_text())["model_type"] == "quantizable_bert"

    # the saved fine-tuned model reproduces the FP record, with the metric computed by scikit-learn
    task = get_task("sst2")
    tokenizer = AutoTokenizer.from_pretrained(output)
    model = QuantizableBertForSequenceClassification.from_pretrained(output).eval()
    validation = load_glue_split(task, "validation", data_dir / "glue").select(range(64))
    logits = predict(model, tokenize_glue(validation, task, tokenizer, 64), tokenizer)
    assert records[0].value == pytest.approx(accuracy_score(validation["label"], logits.argmax(-1)))
    assert records[0].n == 64 and records[0].dataset_config == "sst2"
    assert torch.isfinite(torch.tensor(records[1].value))


@pytest.mark.parametrize("name", sorted(GLUE_PRESETS))
def test_preset_fields_reach_training_arguments(name, tmp_path):
    preset = get_preset(name)
    args = training_arguments(preset, tmp_path / "trainer", max_steps=7, seed=3, progress=False)
    assert args.learning_rate == preset.learning_rate
    assert args.num_train_epochs == preset.num_train_epochs
    assert args.per_device_train_batch_size == preset.batch_size
    assert args.weight_decay == preset.weight_decay
    assert args.warmup_steps == preset.warmup_ratio
    assert (args.max_steps, args.seed, args.disable_tqdm, args.report_to) == (7, 3, True, [])
    assert preset.source


def test_liao_monz_presets_follow_appendix_a():
    """Liao & Monz 2024, Table 4: lr 1e-5 / batch 32 (large tasks), a lr x batch grid (small tasks),
    weight decay 0.1, 10 epochs, warmup 0.06; only the max length comes from their script."""
    preset = get_preset("liao-monz")
    assert "2402.12102" in preset.source and "Table 4" in preset.source
    assert (preset.learning_rate, preset.batch_size, preset.num_train_epochs) == (1e-5, 32, 10.0)
    assert (preset.weight_decay, preset.warmup_ratio, preset.max_length) == (0.1, 0.06, 128)
    assert preset.unverified == ("max_length",)
    grid = {
        (get_preset(f"liao-monz-lr{lr}-bs{b}").learning_rate, b) for lr in ("1e-5", "2e-5", "3e-5") for b in (16, 32)
    }
    assert grid == {(lr, b) for lr in (1e-5, 2e-5, 3e-5) for b in (16, 32)}
    assert get_preset("liao-monz-cpu").num_train_epochs == 3.0
    assert get_preset("bondarenko").unverified == ()
    with pytest.raises(ValueError, match="unknown fields \\['epochs'\\]"):
        GluePreset("x", 128, 3.0, 2e-5, 16, unverified=("epochs",))


def test_unknown_preset_names_the_allowed_values(minilm_path, tmp_path, capsys):
    with pytest.raises(ValueError, match="choose one of \\['bondarenko', 'cpu-smoke', 'liao-monz', 'liao-monz-cpu', "):
        get_preset("fast")
    argv = [minilm_path, "--task", "glue", "--glue-task", "rte", "--preset", "fast", "--output", str(tmp_path / "x")]
    assert evaluate_cli.main(argv) == 2
    assert (
        "unknown GLUE preset 'fast'; choose one of ['bondarenko', 'cpu-smoke', 'liao-monz', 'liao-monz-cpu', "
        in capsys.readouterr().err
    )
    assert not (tmp_path / "x").exists()


class _Stop(Exception):
    pass


def test_cli_preset_reaches_the_trainer(minilm_path, data_dir, tmp_path, monkeypatch):
    """`evaluate --task glue --preset liao-monz` -> finetune_glue -> the TrainingArguments given to Trainer."""
    seen = {}

    class RecordingTrainer:
        def __init__(self, model, args, **kwargs):
            seen["args"] = args
            raise _Stop

    monkeypatch.setattr(glue, "Trainer", RecordingTrainer)
    output = tmp_path / "rte"
    argv = [minilm_path, "--task", "glue", "--glue-task", "rte", "--preset", "liao-monz"]
    argv += ["--glue-data", str(data_dir / "glue"), "--max-train-samples", "8", "--max-eval-samples", "8"]
    with pytest.warns(UserWarning, match="'liao-monz': max_length is a placeholder"):
        with pytest.raises(_Stop):
            evaluate_cli.run(evaluate_cli.build_parser().parse_args([*argv, "--output", str(output)]))
    preset, args = get_preset("liao-monz"), seen["args"]
    assert (args.learning_rate, args.per_device_train_batch_size) == (preset.learning_rate, preset.batch_size)
    assert (args.num_train_epochs, args.weight_decay) == (preset.num_train_epochs, preset.weight_decay)
    assert list(tmp_path.iterdir()) == []  # the temporary folder is removed when training fails


def test_cli_quantization_flags_reach_the_glue_w8a8_config(minilm_path, data_dir, tmp_path, monkeypatch):
    """--task glue honours the W8A8 flags (they were accepted and ignored before)."""
    seen = {}

    def recording_finetune(*args):
        seen["w8a8"] = args[-1]
        raise _Stop

    monkeypatch.setattr(glue, "finetune_glue", recording_finetune)
    argv = [minilm_path, "--task", "glue", "--glue-task", "rte", "--glue-data", str(data_dir / "glue")]
    argv += ["--per-channel-weights", "--per-channel-residuals", "--outlier-channels", "2", "--outlier-suppression"]
    argv += ["--clipping-steps", "3", "--num-calibration-batches", "4", "--output", str(tmp_path / "rte")]
    with pytest.raises(_Stop):
        evaluate_cli.main(argv)
    config = seen["w8a8"]
    assert (config.per_channel_weights, config.per_channel_residuals, config.outlier_channels) == (True, True, 2)
    assert (config.gamma_migration, config.token_wise_clipping, config.clipping_steps) == (True, True, 3)
    assert config.num_calibration_batches == 4
    assert list(tmp_path.iterdir()) == []
