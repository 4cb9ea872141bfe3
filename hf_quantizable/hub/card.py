"""Model cards rendered only from results files: `model-index` eval results plus a Markdown body.

Every number in a card comes from a `ResultRecord` (ours) or from `hub/model_cards/paper_references.json`
(published numbers, shown in their own clearly labelled table).
"""

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from .. import families
from ..evaluation.results import ResultRecord

TEMPLATES_DIR = Path(__file__).with_name("model_cards")  # package data: wheels ship it
CARD_TEMPLATE = TEMPLATES_DIR / "quantizable_model_card.md.jinja"
REFERENCES_PATH = TEMPLATES_DIR / "paper_references.json"

FP_PRECISIONS = ("fp32", "fp16", "bf16")
PRECISION_LABELS = {
    "fp32": "FP32",
    "fp16": "FP16",
    "bf16": "BF16",
    "w8a8-sim": "W8A8 simulated",
    "int8": "INT8 checkpoint",
}
VARIANT_LABELS = {**PRECISION_LABELS, "w8a8-sim+os": "W8A8 simulated + Outlier Suppression"}
# What a card says about the quality of a model, by the modality of its family (`_modality`).
QUALITY = {  # modality -> (metric, record tasks, preprocessor class, metric label)
    "text": ("perplexity", ("mlm", "clm"), "AutoTokenizer", "Perplexity"),
    "image": ("accuracy", ("image-classification",), "AutoImageProcessor", "Top-1 accuracy (%)"),
}
HEAD_AUTO_CLASSES = {  # architecture suffix -> (Auto class, pipeline tag)
    "ForMaskedLM": ("AutoModelForMaskedLM", "fill-mask"),
    "ForCausalLM": ("AutoModelForCausalLM", "text-generation"),
    "ForSequenceClassification": ("AutoModelForSequenceClassification", "text-classification"),
    "ForImageClassification": ("AutoModelForImageClassification", "image-classification"),
    "Model": ("AutoModel", "feature-extraction"),
}
TASK_TYPES = {  # record task -> Hub task type (None: decided per record, see `_task_type`)
    "mlm": "fill-mask",
    "clm": "text-generation",
    "image-classification": "image-classification",
    "glue": "text-classification",
    "lm-eval": None,  # by metric: perplexities are text generation, the rest classification
    "embedding-fidelity": "feature-extraction",
    "outliers": None,
}
TASK_NAMES = {
    "fill-mask": "Masked language modeling",
    "text-generation": "Causal language modeling",
    "image-classification": "Image classification",
    "text-classification": "Text classification",
    "feature-extraction": "Feature extraction",
}
DATASET_NAMES = {
    "wikitext": "WikiText",
    "glue": "GLUE",
    "mnist": "MNIST",
    "tiny_shakespeare": "Tiny Shakespeare",
    "embedded-heldout": "Embedded synthetic corpus (held out)",
    "embedded-noop-heldout": "Synthetic no-op corpus (held out)",
}
# Dataset names (Hub short names, or the folder of the offline copy) -> (Hub id, config of that copy)
HUB_DATASETS = {
    "wikitext": ("Salesforce/wikitext", None),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-v1"),  # the offline copy: wiki.*.tokens
    "glue": ("nyu-mll/glue", None),
    "mnist": ("ylecun/mnist", None),
    "tiny_shakespeare": ("karpathy/tiny_shakespeare", None),
}
_GRAMMAR = "the embedded synthetic corpus (text generated from a small English-like grammar)"
_NOOP = "the synthetic no-op corpus (filler tokens with key-value pairs: attention is mostly useless)"
# The generated corpora (and the main job's held-out folders of them) -> what the card calls them.
SYNTHETIC_DATASETS = {
    "embedded": _GRAMMAR,
    "embedded-heldout": _GRAMMAR,
    "embedded-noop": _NOOP,
    "embedded-noop-heldout": _NOOP,
}
METRIC_NAMES = {
    "perplexity": "Perplexity",
    "accuracy": "Accuracy",
    "max_inf_norm": "Max inf norm",
    "avg_kurtosis": "Avg kurtosis",
    "max_kurtosis": "Max kurtosis",
    "matthews_correlation": "Matthews corr.",
    "f1": "F1",
    "pearson": "Pearson",
    "spearmanr": "Spearman",
    "cosine_similarity": "Cosine similarity",
}
TASK_ORDER = ("mlm", "clm", "image-classification", "glue", "lm-eval", "embedding-fidelity", "outliers")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class CardInputs:
    """Everything a card is rendered from (the numbers only through `records`)."""

    repo_id: str
    config: dict[str, Any]
    records: Sequence[ResultRecord]
    fp_repo_id: str | None = None
    int8_repo_id: str | None = None
    int8_config: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    plots: Sequence[str] = field(default_factory=list)
    # how the run was trained (`publish.read_training_run`): steps, wall_time_s, and for a shipped model
    # trained_by, command, seed
    training_run: dict[str, Any] | None = None

    @property
    def is_int8(self) -> bool:
        return bool(self.config.get("w8a8_config"))


@cache
def paper_references() -> dict[str, Any]:
    """Published numbers (Bondarenko et al. 2023, Liao & Monz 2024) and citations."""
    return json.loads(REFERENCES_PATH.read_text())


def head_of(config: dict[str, Any]) -> tuple[str, str]:
    """(Auto class name, pipeline tag) of the model described by `config` (a config.json dict)."""
    architectures = config.get("architectures") or []
    if not architectures:
        raise ValueError("config.json has no `architectures`: save the model with `save_pretrained`")
    for suffix, head in HEAD_AUTO_CLASSES.items():
        if architectures[0].endswith(suffix):
            return head
    raise ValueError(f"unknown architecture {architectures[0]!r}; expected a name ending in {list(HEAD_AUTO_CLASSES)}")


def _is_hub_dataset(dataset: str) -> bool:
    return bool(_HUB_ID.match(dataset)) and not Path(dataset).exists()


def dataset_ref(dataset: str, dataset_config: str | None) -> tuple[str, str | None]:
    """(Hub-style dataset id, config) of a record's dataset.

    Known datasets get their Hub id also when read from a local copy (`HUB_DATASETS`); any other
    local path is named after its folder (or file) and is no Hub id (see `is_hub_id`).
    """
    if _is_hub_dataset(dataset):
        name = dataset
    else:
        path = Path(dataset)
        name = re.sub(r"[^\w.-]+", "-", path.parent.name if path.suffix else path.name).strip("-.") or "local"
    hub_id, default_config = HUB_DATASETS.get(name.lower(), (name, None))
    return hub_id, dataset_config or default_config


def is_hub_id(dataset_type: str) -> bool:
    return dataset_type in {hub_id for hub_id, _ in HUB_DATASETS.values()} or "/" in dataset_type


def _dataset_name(dataset_type: str, dataset_config: str | None) -> str:
    base = DATASET_NAMES.get(dataset_type.split("/")[-1].lower(), dataset_type)
    return f"{base} ({dataset_config})" if dataset_config else base


def precision_label(precision: str) -> str:
    return PRECISION_LABELS[precision]


def _task_type(record: ResultRecord, pipeline_tag: str) -> str:
    if record.task == "lm-eval":
        generative = "perplexity" in record.metric or record.metric in ("bits_per_byte", "byte_perplexity")
        return "text-generation" if generative else "text-classification"
    return TASK_TYPES[record.task] or pipeline_tag


def eval_result_from_record(record: ResultRecord, pipeline_tag: str) -> EvalResult:
    """The model-index entry of one record; the variant (precision) goes in the metric name and config."""
    task_type = _task_type(record, pipeline_tag)
    dataset_type, dataset_config = dataset_ref(record.dataset, record.dataset_config)
    args = {"n_examples": record.n}
    if record.seed is not None:
        args["seed"] = record.seed
    return EvalResult(
        task_type=task_type,
        task_name=TASK_NAMES.get(task_type, task_type),
        dataset_type=dataset_type,
        dataset_name=_dataset_name(dataset_type, dataset_config),
        dataset_config=dataset_config,
        dataset_split=record.split,
        metric_type=record.metric,
        metric_value=record.value,
        metric_name=f"{METRIC_NAMES.get(record.metric, record.metric)} ({variant_label(variant_of(record))})",
        metric_config=variant_of(record),
        metric_args=args,
    )


def _sorted(records: Sequence[ResultRecord]) -> list[ResultRecord]:
    def key(record: ResultRecord):
        task = TASK_ORDER.index(record.task) if record.task in TASK_ORDER else len(TASK_ORDER)
        return (task, record.dataset, record.dataset_config or "", record.split, record.metric)

    return sorted(records, key=key)


def eval_results_from_records(records: Sequence[ResultRecord], pipeline_tag: str) -> list[EvalResult]:
    """Model-index entries for every finite record (non-finite values have no place in YAML)."""
    return [eval_result_from_record(r, pipeline_tag) for r in _sorted(records) if r.value is not None]


def format_value(record: ResultRecord | None) -> str:
    if record is None:
        return "–"
    if record.value is None:
        return record.extra.get("non_finite", "not finite")
    value = record.value
    if record.metric in ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr", "cosine_similarity"):
        return f"{value:.4f}"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def variant_of(record: ResultRecord) -> str:
    """The evaluated variant: `extra["variant"]` (fp32, w8a8-sim, w8a8-sim+os, int8, ...) or the precision."""
    return record.extra.get("variant", record.precision)


def variant_label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def _variant_order(variant: str) -> tuple[int, str]:
    order = [*FP_PRECISIONS, "w8a8-sim", "w8a8-sim+os", "int8"]
    return (order.index(variant) if variant in order else len(order), variant)


def comparison_table(records: Sequence[ResultRecord]) -> dict[str, Any]:
    """One row per (task, dataset, split, metric), one column per evaluated variant (FP first).

    Quantized cells also give the ratio to the first floating-point column.
    """
    variants = sorted({variant_of(r) for r in records}, key=_variant_order)
    groups: dict[tuple, dict[str, ResultRecord]] = {}
    for record in _sorted(records):
        key = (record.task, record.dataset, record.dataset_config, record.split, record.metric)
        groups.setdefault(key, {})[variant_of(record)] = record
    fp_variants = [v for v in variants if v in FP_PRECISIONS]
    rows = []
    for (task, dataset, dataset_config, split, metric), cells in groups.items():
        reference = cells.get(fp_variants[0]) if fp_variants else None
        texts = []
        for variant in variants:
            record = cells.get(variant)
            text = format_value(record)
            if record is not None and variant not in FP_PRECISIONS and _finite(reference) and _finite(record):
                if reference.value:
                    text += f" ({record.value / reference.value:.3f}x)"
            texts.append(text)
        rows.append(
            {
                "task": task,
                "dataset": _dataset_name(*dataset_ref(dataset, dataset_config)),
                "split": split,
                "metric": METRIC_NAMES.get(metric, metric),
                "cells": texts,
                "n": str(next(iter(cells.values())).n),
            }
        )
    return {"columns": [variant_label(v) for v in variants], "rows": rows}


def _finite(record: ResultRecord | None) -> bool:
    return record is not None and record.value is not None


def _first(records: Sequence[ResultRecord], variants: Sequence[str], tasks: Sequence[str], metric: str):
    """The record of the first of `variants` (in that order of preference) with this task and metric."""
    for variant in variants:
        for record in _sorted(records):
            if variant_of(record) == variant and record.task in tasks and record.metric == metric:
                return record
    return None


def reference_rows(
    family: str, attn_impl: str, records: Sequence[ResultRecord], gate_type: str | None = None
) -> list[dict[str, Any]]:
    """Paper rows for this model family, with ours (from `records`) as the first row.

    `matches` marks the paper rows of this model's variant (same attn_impl, and gate type for gates).
    """
    quality, tasks, _, _ = QUALITY[families.modality(families.family_of(family))]
    ours = {
        "variant": f"This model ({attn_impl})",
        "source": "ours",
        "model": "this repository",
        "fp_quality": format_value(_first(records, FP_PRECISIONS, tasks, quality)),
        "max_inf_norm": format_value(_first(records, FP_PRECISIONS, ("outliers",), "max_inf_norm")),
        "avg_kurtosis": format_value(_first(records, FP_PRECISIONS, ("outliers",), "avg_kurtosis")),
        "int8_quality": format_value(_first(records, ("int8", "w8a8-sim"), tasks, quality)),
        "matches": True,
    }
    rows = [ours]
    for ref in paper_references()["references"]:
        if ref["family"] != family:
            continue
        rows.append(
            {
                "variant": ref["variant"],
                "source": f"{ref['source']} ({ref['table']})",
                "model": f"{ref['model']}, {ref['data']}",
                "fp_quality": _ref_value(ref.get(f"fp_{quality}")),
                "max_inf_norm": _ref_value(ref.get("max_inf_norm")),
                "avg_kurtosis": _ref_value(ref.get("avg_kurtosis")),
                "int8_quality": _ref_value(ref.get(f"w8a8_{quality}")),
                "matches": ref["attn_impl"] == attn_impl and ref.get("gate_type", gate_type) == gate_type,
            }
        )
    return rows


def _ref_value(value: Any) -> str:
    return "–" if value is None else str(value)


def method_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The attention settings that define the variant (only those the variant uses)."""
    attn_impl = config.get("attn_impl", "softmax")
    keys = {
        "softmax": (),
        "clipped_softmax": ("clip_gamma", "clip_alpha", "clip_zeta"),
        "normalized_clipped_softmax": ("ncs_zeta", "ncs_beta"),
        "gated": ("gate_type", "gate_n_hid", "pi_init"),
    }.get(attn_impl, ())
    params = {"attn_impl": attn_impl}
    params.update({key: config.get(key) for key in keys if config.get(key) is not None})
    if attn_impl == "gated" and config.get("gate_type") != "mlp":
        params.pop("gate_n_hid", None)
    return params


def _yaml_block(data: dict[str, Any] | None) -> str | None:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).strip() if data else None


def own_records(inputs: CardInputs) -> list[ResultRecord]:
    """The records of the repository's own model: an INT8 repo's model-index holds only its quantized
    results (the INT8 checkpoint and, labelled as such, the simulated W8A8); the FP ones stay in its table."""
    if not inputs.is_int8:
        return list(inputs.records)
    return [r for r in inputs.records if variant_of(r) not in FP_PRECISIONS]


def synthetic_corpus(inputs: CardInputs) -> str | None:
    """The generated corpus the model was trained (else evaluated) on, described; None for natural text."""
    recipe_data = ((inputs.recipe or {}).get("data") or {}).get("dataset")
    evaluated = [dataset_ref(r.dataset, r.dataset_config)[0] for r in inputs.records]
    return next((SYNTHETIC_DATASETS[d] for d in (recipe_data, *evaluated) if d in SYNTHETIC_DATASETS), None)


def build_card_data(inputs: CardInputs) -> ModelCardData:
    """The card's YAML metadata: model-index, library, pipeline tag, tags, datasets, metrics."""
    _, pipeline_tag = head_of(inputs.config)
    eval_results = eval_results_from_records(own_records(inputs), pipeline_tag)
    family = families.family_of(inputs.config.get("model_type")) or inputs.config.get("model_type", "transformer")
    tags = ["hf_quantizable", "quantization", "w8a8", family, inputs.config.get("attn_impl", "softmax")]
    tags.append("int8" if inputs.is_int8 else "outlier-free")
    datasets = sorted(
        {t for t, _ in (dataset_ref(r.dataset, r.dataset_config) for r in inputs.records) if is_hub_id(t)}
    )
    base_model = inputs.fp_repo_id if inputs.is_int8 else None
    return ModelCardData(
        model_name=inputs.repo_id.split("/")[-1],
        eval_results=eval_results or None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license="apache-2.0",
        tags=tags,
        datasets=datasets or None,
        metrics=sorted({r.metric_type for r in eval_results}) or None,
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
    )


def render_model_card(inputs: CardInputs, template_path: str | Path = CARD_TEMPLATE) -> ModelCard:
    """Render the card of one repository (FP or INT8) from its config, results and recipe."""
    auto_class, pipeline_tag = head_of(inputs.config)
    family = families.family_of(inputs.config.get("model_type")) or inputs.config.get("model_type")
    _, _, preprocessor_class, quality_label = QUALITY[families.modality(families.family_of(family))]
    attn_impl = inputs.config.get("attn_impl", "softmax")
    precisions = sorted({r.precision for r in inputs.records}, key=_variant_order)
    references = paper_references()
    card = ModelCard.from_template(
        build_card_data(inputs),
        template_path=str(template_path),
        repo_id=inputs.repo_id,
        fp_repo_id=inputs.fp_repo_id,
        int8_repo_id=inputs.int8_repo_id,
        is_int8=inputs.is_int8,
        family=family,
        architecture=(inputs.config.get("architectures") or ["?"])[0],
        auto_class=auto_class,
        pipeline_tag=pipeline_tag,
        preprocessor_class=preprocessor_class,
        size=_size(inputs.config),
        method=method_parameters(inputs.config),
        method_yaml=_yaml_block(method_parameters(inputs.config)),
        w8a8_yaml=_yaml_block(_card_w8a8_config(inputs)),
        recipe_yaml=_yaml_block(inputs.recipe),
        training_run=inputs.training_run,
        table=comparison_table(inputs.records),
        precisions=[precision_label(p) for p in precisions],
        fp_measured=[precision_label(p) for p in precisions if p in FP_PRECISIONS],
        reference_rows=reference_rows(family, attn_impl, inputs.records, inputs.config.get("gate_type")),
        max_steps=(inputs.recipe or {}).get("training", {}).get("max_steps"),
        synthetic_corpus=synthetic_corpus(inputs),
        quality_metric=quality_label,
        glue_references=[g for g in references["glue_average"] if g["family"] == family],
        plots=list(inputs.plots),
        versions=_versions(inputs.records),
        citations=references["citations"],
    )
    validate_model_card(card)
    return card


def _card_w8a8_config(inputs: CardInputs) -> dict[str, Any] | None:
    """The INT8 settings shown on the card: `w8a8_config` without the quantizer's own file list."""
    settings = (inputs.int8_config or inputs.config).get("w8a8_config")
    return {k: v for k, v in settings.items() if k != "files"} if settings else None


def _size(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "ffn_dim", "vocab_size")
    return {key: config[key] for key in keys if key in config}


def _versions(records: Sequence[ResultRecord]) -> dict[str, str]:
    versions: dict[str, str] = {}
    for record in records:
        versions.update(record.versions)
    return versions


def validate_model_card(card: ModelCard | str) -> None:
    """Check the metadata the way the Hub parses it (offline); raise ValueError naming the problem.

    The YAML must parse, the model-index must convert back to the same `EvalResult`s
    (`huggingface_hub.repocard_data.model_index_to_eval_results`), and every result needs the fields
    the Hub requires: task.type, dataset.type, dataset.name, metrics[].type and a numeric value.
    """
    try:
        reloaded = ModelCard(str(card), ignore_metadata_errors=False)
    except yaml.YAMLError as error:
        raise ValueError(f"the card's YAML metadata does not parse: {error}") from None
    metadata = reloaded.data.to_dict()
    model_index = metadata.get("model-index")
    if model_index is None:
        return
    if not isinstance(model_index, list) or len(model_index) != 1 or "name" not in model_index[0]:
        raise ValueError("`model-index` must be a list with one entry holding `name` and `results`")
    for i, result in enumerate(model_index[0].get("results", [])):
        for path in (("task", "type"), ("dataset", "type"), ("dataset", "name")):
            if not isinstance(result.get(path[0], {}).get(path[1]), str):
                raise ValueError(f"model-index result {i}: `{'.'.join(path)}` is required (a string)")
        for j, metric in enumerate(result.get("metrics") or []):
            if not isinstance(metric.get("type"), str):
                raise ValueError(f"model-index result {i} metric {j}: `type` is required (a string)")
            if isinstance(metric.get("value"), bool) or not isinstance(metric.get("value"), (int, float)):
                raise ValueError(f"model-index result {i} metric {j}: `value` must be a number")
        if not result.get("metrics"):
            raise ValueError(f"model-index result {i}: `metrics` must not be empty")
    _, parsed = model_index_to_eval_results(model_index)
    if eval_results_to_model_index(model_index[0]["name"], parsed) != model_index:
        raise ValueError("`model-index` does not round-trip through huggingface_hub's EvalResult")
