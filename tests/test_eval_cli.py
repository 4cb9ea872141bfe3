"""`python -m hf_quantizable.evaluate`: FP vs W8A8 vs INT8 end to end on tiny models, and bad input."""

import json
import math

import pytest
from transformers import AutoTokenizer, ViTImageProcessor

from hf_quantizable.evaluate import main
from hf_quantizable.evaluation.harness import EvalSettings, build_batches
from hf_quantizable.evaluation.quality import evaluate_batches
from hf_quantizable.evaluation.results import read_results, result_schema, validate_results
from hf_quantizable.quantization import W8A8Config, W8A8Quantizer
from tests.conftest import tiny_model

SMALL = ["--max-sequences", "8", "--max-length", "32", "--batch-size", "4", "--num-calibration-batches", "2"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory, tokenizer, data_dir):
    root = tmp_path_factory.mktemp("bert")
    model = tiny_model("bert", vocab_size=tokenizer.vocab_size)
    model.save_pretrained(root / "fp")
    tokenizer.save_pretrained(root / "fp")
    settings = EvalSettings(
        task="mlm",
        dataset=str(data_dir / "wikitext-2"),
        split="validation",
        max_sequences=8,
        max_length=32,
        batch_size=4,
    )
    calibration = [
        {k: b[k] for k in ("input_ids", "attention_mask")} for b in build_batches(settings, tokenizer, "validation")
    ]
    W8A8Quantizer.from_pretrained(root / "fp").quantize(
        root / "int8", quantization_config=W8A8Config(num_calibration_batches=2), calibration_dataset=calibration
    )
    return root


def test_mlm_fp_w8a8_int8(bert_dirs, data_dir, tokenizer, capsys):
    output = bert_dirs / "eval"
    argv = [
        str(bert_dirs / "fp"),
        "--int8",
        str(bert_dirs / "int8"),
        "--task",
        "mlm",
        "--dataset",
        str(data_dir / "wikitext-2"),
        "--output",
        str(output),
        *SMALL,
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["variant", "perplexity", "max_inf_norm", "avg_kurtosis", "max_kurtosis"]
    assert [line.split()[0] for line in table.splitlines()[1:4]] == ["fp32", "w8a8-sim", "int8"]

    document = json.loads((output / "results.json").read_text())
    validate_results(document)
    assert document["records"][0].keys() <= result_schema()["$defs"]["record"]["properties"].keys()
    records = read_results(output / "results.json")
    by_variant = {(r.extra["variant"], r.metric): r for r in records}
    assert len(records) == 12 and {r.precision for r in records} == {"fp32", "w8a8-sim", "int8"}
    assert {r.task for r in records} == {"mlm", "outliers"}
    assert all(r.n == 8 and r.seed == 0 and r.split == "test" for r in records)

    # the FP perplexity equals a direct evaluation of the same masked batches
    settings = EvalSettings(
        task="mlm", dataset=str(data_dir / "wikitext-2"), max_sequences=8, max_length=32, batch_size=4
    )
    batches = build_batches(settings, tokenizer, "test")
    model = tiny_model("bert", vocab_size=tokenizer.vocab_size)
    direct = evaluate_batches(model, "mlm", batches)
    assert by_variant[("fp32", "perplexity")].value == pytest.approx(direct["value"], rel=1e-5)
    assert by_variant[("fp32", "max_inf_norm")].value == pytest.approx(direct["outliers"]["max_inf_norm"], rel=1e-5)
    assert len(by_variant[("fp32", "max_inf_norm")].extra["per_layer"]) == 6
    for variant in ("w8a8-sim", "int8"):
        value = by_variant[(variant, "perplexity")].value
        assert math.isfinite(value) and value != by_variant[("fp32", "perplexity")].value
    assert by_variant[("w8a8-sim", "perplexity")].extra["w8a8"]["calibration_split"] == "validation"
    for name in ("layers", "outlier_dims", "head_mass", "attention"):
        assert (output / "plots" / f"{name}.png").stat().st_size > 2000

    # --append adds a second run's records (a calibration option with --no-w8a8 would be refused)
    assert main([*argv[:-2], "--no-w8a8", "--no-plots", "--append"]) == 0
    assert len(read_results(output / "results.json")) == 12 + 8


def test_clm_on_tiny_opt(tmp_path, tokenizer, data_dir, capsys):
    model = tiny_model("opt", vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    model.save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    grids = ["--per-channel-weights", "--per-channel-residuals", "--outlier-channels", "2"]
    dataset = str(data_dir / "wikitext-2")
    argv = [str(tmp_path / "opt"), "--task", "clm", "--dataset", dataset, "--no-plots", "--bf16", *grids, *SMALL]
    assert main(argv) == 0
    records = read_results(tmp_path / "opt" / "results.json")
    perplexities = {r.precision: r.value for r in records if r.metric == "perplexity"}
    assert set(perplexities) == {"fp32", "bf16", "w8a8-sim"} and all(math.isfinite(v) for v in perplexities.values())
    assert perplexities["bf16"] == pytest.approx(perplexities["fp32"], rel=0.05)
    config = next(r for r in records if r.precision == "w8a8-sim").extra["w8a8"]["config"]
    assert config["per_channel_weights"] and config["per_channel_residuals"] and config["outlier_channels"] == 2
    assert {r.task for r in records} == {"clm", "outliers"}


def test_image_on_tiny_vit_with_local_mnist(tmp_path, data_dir):
    model = tiny_model("vit", num_labels=10)
    model.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 16, "width": 16}, do_convert_rgb=True).save_pretrained(tmp_path / "vit")
    argv = [
        str(tmp_path / "vit"),
        "--task",
        "image",
        "--dataset",
        str(data_dir / "mnist"),
        "--calibration-split",
        "test",
        "--fp16",
        *SMALL,
    ]
    assert main(argv) == 0
    records = read_results(tmp_path / "vit" / "results.json")
    accuracy = {r.precision: r for r in records if r.metric == "accuracy"}
    assert set(accuracy) == {"fp32", "fp16", "w8a8-sim"} and 0.0 <= accuracy["fp32"].value <= 1.0
    assert abs(accuracy["fp16"].value - accuracy["fp32"].value) <= 1 / 8  # pixels cast to fp16, one image at most
    assert accuracy["w8a8-sim"].extra["w8a8"]["calibration_skip"] == 8  # calibrated on other images
    assert (tmp_path / "vit" / "plots" / "head_mass.png").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "clm"], "task 'clm' needs a OPT model"),
        (["--task", "mlm", "--dataset", "/no/such/folder"], "does not exist"),
        (["--task", "glue"], "--task glue needs --glue-task"),
        (["--task", "glue", "--glue-task", "mnlx"], "unknown GLUE task 'mnlx'"),
        (["--task", "mlm", "--int8", "FP"], "is not an INT8 checkpoint"),
    ],
)
def test_bad_input_fails_fast(bert_dirs, capsys, extra, message):
    extra = [str(bert_dirs / "fp") if e == "FP" else e for e in extra]
    small = [] if "glue" in extra else SMALL  # GLUE refuses the data options it does not use
    assert main([str(bert_dirs / "fp"), *extra, "--output", str(bert_dirs / "bad"), *small]) == 2
    assert message in capsys.readouterr().err
    assert not (bert_dirs / "bad").exists()


def test_int8_checkpoint_as_model_and_unknown_task(bert_dirs, capsys):
    assert main([str(bert_dirs / "int8"), "--task", "mlm"]) == 2
    assert "is an INT8 checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(bert_dirs / "fp"), "--task", "translation"])
    assert "invalid choice: 'translation'" in capsys.readouterr().err


def test_encoder_without_head_is_rejected_for_mlm(minilm_path, capsys, tmp_path):
    assert main([minilm_path, "--task", "mlm", "--output", str(tmp_path / "x")]) == 2
    assert "has no such head" in capsys.readouterr().err
