"""Model cards: rendered only from result records, valid Hub metadata, round-trip through huggingface_hub."""

import re

import pytest
import yaml
from huggingface_hub import EvalResult, ModelCard, metadata_load

from hf_quantizable.evaluation.results import ResultRecord
from hf_quantizable.hub.card import CardInputs, render_model_card, validate_model_card

CONFIG = {
    "architectures": ["QuantizableBertForMaskedLM"],
    "model_type": "quantizable_bert",
    "attn_impl": "gated",
    "gate_type": "linear",
    "gate_n_hid": 4,
    "pi_init": 0.25,
    "clip_gamma": None,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "auto_map": {"AutoModelForMaskedLM": "modeling_quantizable_bert.QuantizableBertForMaskedLM"},
}
INT8_CONFIG = {**CONFIG, "w8a8_config": {"weight_bits": 8, "activation_bits": 8, "estimator": "running_minmax"}}


def record(precision, task, metric, value, dataset="wikitext", dataset_config="wikitext-2-raw-v1", split="validation"):
    return ResultRecord(
        model="runs/bert-gated",
        attn_impl="gated",
        precision=precision,
        task=task,
        dataset=dataset,
        dataset_config=dataset_config,
        split=split,
        metric=metric,
        value=value,
        n=128,
        seed=0,
    )


@pytest.fixture
def records():
    return [
        record("fp32", "mlm", "perplexity", 17.3125),
        record("w8a8-sim", "mlm", "perplexity", 19.0625),
        record("int8", "mlm", "perplexity", 19.125),
        record("fp32", "outliers", "max_inf_norm", 23.40625),
        record("fp32", "outliers", "avg_kurtosis", 6.71875),
        record("w8a8-sim", "outliers", "max_inf_norm", 22.0),
        record("fp32", "glue", "matthews_correlation", 0.1875, dataset="glue", dataset_config="cola"),
        record("w8a8-sim", "glue", "matthews_correlation", 0.15625, dataset="glue", dataset_config="cola"),
        record("fp32", "glue", "pearson", 0.625, dataset="glue", dataset_config="stsb"),
        record("w8a8-sim", "mlm", "perplexity", float("inf"), split="test"),  # overflow: not finite
    ]


def render(records, config=CONFIG, **kwargs):
    inputs = CardInputs(
        repo_id="org/bert-gated",
        config=config,
        records=records,
        int8_repo_id="org/bert-gated-w8a8",
        recipe={"name": "bert-tiny-gated", "training": {"learning_rate": 0.001, "max_steps": 300}},
        plots=["plots/outliers.png"],
        **kwargs,
    )
    return render_model_card(inputs)


def test_eval_results_round_trip(tmp_path, records):
    card = render(records)
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path, ignore_metadata_errors=False).data.eval_results
    finite = [r for r in records if r.value is not None]
    assert len(loaded) == len(finite)
    assert all(isinstance(r, EvalResult) for r in loaded)
    by_key = {(r.task_type, r.dataset_config, r.dataset_split, r.metric_type, r.metric_config): r for r in loaded}
    task_types = {"mlm": "fill-mask", "outliers": "fill-mask", "glue": "text-classification"}
    for rec in finite:
        got = by_key[(task_types[rec.task], rec.dataset_config, rec.split, rec.metric, rec.precision)]
        assert got.metric_value == rec.value
        assert got.dataset_type == {"wikitext": "Salesforce/wikitext", "glue": "nyu-mll/glue"}[rec.dataset]
        assert got.metric_args == {"n_examples": 128, "seed": 0}
    assert loaded == card.data.eval_results


def test_metadata_is_valid_for_the_hub(tmp_path, records):
    card = render(records)
    card.save(tmp_path / "README.md")
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "fill-mask"
    assert metadata["license"] == "apache-2.0"
    assert metadata["datasets"] == ["Salesforce/wikitext", "nyu-mll/glue"]  # real Hub ids
    results = metadata["model-index"][0]["results"]
    assert metadata["model-index"][0]["name"] == "bert-gated"
    for result in results:
        assert result["task"]["type"] in {"fill-mask", "text-classification"}
        assert {"type", "name", "split"} <= result["dataset"].keys()
        for metric in result["metrics"]:
            assert isinstance(metric["value"], float)
            assert metric["config"] in {"fp32", "w8a8-sim", "int8"}
    validate_model_card(card)


def test_validation_rejects_broken_metadata(records):
    text = str(render(records))
    no_type = text.replace("type: perplexity", "name_only: perplexity", 1)
    with pytest.raises(ValueError, match="type"):
        validate_model_card(no_type)
    string_value = re.sub(r"value: 17\.3125", "value: high", text)
    with pytest.raises(ValueError, match="must be a number"):
        validate_model_card(string_value)
    bad_yaml = text.replace("model-index:", "model-index: [", 1)
    with pytest.raises(ValueError):
        validate_model_card(bad_yaml)


def test_body_numbers_come_from_the_records(records):
    body = render(records).text
    table = body.split("## Results: floating point vs INT8")[1].split("##")[0]
    header = next(line for line in table.splitlines() if line.startswith("| task"))
    assert "| FP32 | W8A8 simulated | INT8 checkpoint |" in header
    mlm_row = next(line for line in table.splitlines() if line.startswith("| mlm") and "| validation |" in line)
    assert "| 17.31 | 19.06 (1.101x) | 19.12 (1.105x) | 128 |" in mlm_row
    assert "Matthews corr." in table and "| 0.1875 | 0.1562 (0.833x) |" in table
    assert "| inf |" in table  # the overflowing perplexity is reported, not dropped
    # Changing a record changes the card: nothing is typed by hand.
    changed = [record("fp32", "mlm", "perplexity", 99.5)] + records[1:]
    assert "99.5" in render(changed).text


def test_outlier_suppression_variant_is_its_own_column(records):
    suppressed = record("w8a8-sim", "mlm", "perplexity", 18.0)
    suppressed.extra = {"variant": "w8a8-sim+os"}
    card = render([*records, suppressed])
    assert "W8A8 simulated + Outlier Suppression" in card.text
    configs = {r.metric_config for r in card.data.eval_results if r.metric_type == "perplexity"}
    assert configs == {"fp32", "w8a8-sim", "w8a8-sim+os", "int8"}


def test_precision_labels_only_what_was_measured(records):
    text = render(records).text
    assert "FP32" in text
    assert "FP16" not in text and "fp16" not in text
    half = [record("fp16", "mlm", "perplexity", 17.25)] + records[1:]
    assert "FP16" in render(half).text


def test_body_sections(records):
    text = render(records).text
    for section in ("## Method", "## How to load", "## Training recipe and data", "## Plots", "## Limitations"):
        assert section in text
    assert 'AutoModelForMaskedLM.from_pretrained("org/bert-gated", trust_remote_code=True)' in text
    assert 'from_pretrained("org/bert-gated-w8a8", trust_remote_code=True)' in text
    assert "| `pi_init` | `0.25` |" in text and "| `gate_type` | `linear` |" in text
    assert "learning_rate: 0.001" in text
    assert "![plots/outliers.png](plots/outliers.png)" in text
    refs = text.split("## Paper reference numbers (not ours)")[1].split("##")[0]
    ours = next(line for line in refs.splitlines() if line.startswith("| This model"))
    assert "| ours |" in ours and "17.31" in ours and "23.41" in ours and "6.719" in ours
    assert "| 735 |" in refs and "| 1294 |" in refs  # Bondarenko et al. Table 2, vanilla
    assert "Gated attention, linear (pi_init = 0.25 ... 0.75) *" in refs  # this model's variant is marked
    assert "MLP (n_hid = d_head / 4 = 16) *" not in refs and "Vanilla softmax *" not in refs
    assert "after 300 training\n  steps" in text
    for citation in ("Bondarenko", "Liao", "Wei"):
        assert citation in text.split("## Citations")[1]


def test_int8_card_links_back_and_shows_the_quantization_settings(records):
    inputs = CardInputs(repo_id="org/bert-gated-w8a8", config=INT8_CONFIG, records=records, fp_repo_id="org/bert-gated")
    card = render_model_card(inputs)
    assert card.data.base_model == "org/bert-gated"
    assert "INT8 (W8A8) checkpoint" in card.text
    assert "estimator: running_minmax" in card.text
    assert 'from_pretrained("org/bert-gated", trust_remote_code=True)' in card.text
    assert "int8" in card.data.tags


def test_clipped_method_parameters(records):
    config = {**CONFIG, "attn_impl": "clipped_softmax", "clip_gamma": -0.025, "clip_zeta": 1.0}
    text = render(records, config=config).text
    assert "| `clip_gamma` | `-0.025` |" in text and "pi_init" not in text.split("## How to load")[0]


def test_unknown_architecture_is_a_clear_error(records):
    with pytest.raises(ValueError, match="architecture"):
        render(records, config={**CONFIG, "architectures": ["Mystery"]})
    with pytest.raises(ValueError, match="architectures"):
        render(records, config={k: v for k, v in CONFIG.items() if k != "architectures"})


def test_local_data_is_named_but_not_listed_as_hub_dataset(records, tmp_path):
    data = tmp_path / "embedded-heldout" / "validation.txt"
    data.parent.mkdir()
    data.write_text("some text\n")
    card = render([record("fp32", "mlm", "perplexity", 12.5, dataset=str(data), dataset_config=None)])
    assert card.data.datasets is None
    assert card.data.eval_results[0].dataset_type == "embedded-heldout"
    assert str(tmp_path) not in str(card).split("---")[1]  # no local path in the metadata


def test_lm_eval_records_get_their_task_type(records):
    lm_eval = [
        record("fp32", "lm-eval", "word_perplexity", 40.5, dataset="wikitext2_local", dataset_config=None),
        record("fp32", "lm-eval", "acc", 0.5625, dataset="sst2_local", dataset_config=None),
    ]
    types = {r.metric_type: r.task_type for r in render(lm_eval).data.eval_results}
    assert types == {"word_perplexity": "text-generation", "acc": "text-classification"}


def test_front_matter_is_plain_yaml(records):
    """The metadata parses with a safe YAML loader and holds exactly the finite measured values."""
    text = str(render(records))
    front = yaml.safe_load(text.split("---")[1])
    assert (front["library_name"], front["pipeline_tag"], front["license"]) == (
        "transformers",
        "fill-mask",
        "apache-2.0",
    )
    metrics = [m for result in front["model-index"][0]["results"] for m in result["metrics"]]
    measured = sorted((r.precision, r.metric, r.value) for r in records if r.value is not None)
    assert sorted((m["config"], m["type"], m["value"]) for m in metrics) == measured
    assert all(m["args"] == {"n_examples": 128, "seed": 0} for m in metrics)


def test_local_copies_of_known_datasets_get_their_hub_ids(records):
    local = record("fp32", "mlm", "perplexity", 12.0, dataset="../shared/data/wikitext-2", dataset_config=None)
    synthetic = record("fp32", "mlm", "perplexity", 30.0, dataset="runs/x/data/embedded-heldout/validation.txt")
    card = render([local, synthetic])
    by_type = {r.dataset_type: r for r in card.data.eval_results}
    assert by_type["Salesforce/wikitext"].dataset_config == "wikitext-2-v1"  # the offline copy is the tokens version
    assert "embedded-heldout" in by_type and card.data.datasets == ["Salesforce/wikitext"]
    assert "embedded synthetic corpus" in card.text  # said beside the papers' numbers
    assert "embedded synthetic corpus" not in render([local]).text


def test_int8_model_index_holds_only_its_own_results(records):
    int8_config = {**CONFIG, "w8a8_config": {"weight_bits": 8}}
    card = render(records, config=int8_config, fp_repo_id="org/bert-gated")
    variants = {r.metric_config for r in card.data.eval_results}
    assert variants == {"w8a8-sim", "int8"}  # the FP numbers stay in the comparison table
    assert "| 17.31 |" in card.text
    assert 'int8_kernel="onednn"' in card.text and "HF_QUANTIZABLE_INT8_KERNEL=onednn" in card.text
    assert "arXiv:2402.12102" in card.text and "2402.08337" not in card.text
