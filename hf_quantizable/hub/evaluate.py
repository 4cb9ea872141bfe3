"""Evaluate a published FP model and its INT8 sibling on the same inputs with the evaluation harness.

Writes `results.json` (FP and INT8 quality plus outlier statistics) and the per-layer outlier plot:
what a model card is rendered from.
"""

import json
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoTokenizer,
)

from ..evaluation.data import load_split
from ..evaluation.plots import plot_layer_stats
from ..evaluation.quality import clm_batches, evaluate_batches, image_batches, mlm_batches
from ..evaluation.results import ResultRecord, write_results
from ..paths import shared_data_dir
from .card import precision_label
from .folder import PLOTS_DIR, RECIPE_FILE, RESULTS_FILE

HEADS = {  # architecture suffix -> (task, Auto class)
    "ForMaskedLM": ("mlm", AutoModelForMaskedLM),
    "ForCausalLM": ("clm", AutoModelForCausalLM),
    "ForImageClassification": ("image-classification", AutoModelForImageClassification),
}
OUTLIER_METRICS = ("max_inf_norm", "avg_kurtosis", "max_kurtosis")


def model_task(config: dict) -> tuple[str, type]:
    """(evaluation task, Auto class) of a config.json dict."""
    architecture = (config.get("architectures") or [""])[0]
    for suffix, head in HEADS.items():
        if architecture.endswith(suffix):
            return head
    raise ValueError(f"cannot evaluate architecture {architecture!r}: expected one ending in {list(HEADS)}")


def default_dataset(task: str) -> tuple[str, str | None, str]:
    """(dataset, config, split): the offline copy of the evaluation data when present, else the Hub."""
    if task == "image-classification":
        local = shared_data_dir() / "mnist"
        return (str(local), None, "test") if local.is_dir() else ("mnist", None, "test")
    local = shared_data_dir() / "wikitext-2"
    return (str(local), None, "validation") if local.is_dir() else ("wikitext", "wikitext-2-raw-v1", "validation")


def sequence_length(folder: Path, config: dict) -> int:
    """The trained sequence length (from training_recipe.json), else min(128, max positions)."""
    recipe = folder / RECIPE_FILE
    if recipe.is_file():
        length = json.loads(recipe.read_text()).get("data", {}).get("seq_length")
        if length:
            return int(length)
    return min(128, config.get("max_position_embeddings") or 128)


def _batches(task: str, folder: Path, dataset: str, dataset_config, split: str, max_sequences: int, seed: int):
    if task == "image-classification":
        processor = AutoImageProcessor.from_pretrained(folder)
        data = load_split(dataset, dataset_config, split=split, limit=max_sequences)
        return image_batches(processor, data, batch_size=32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = load_split(dataset, dataset_config, split=split)
    texts = (text for text in data[data.column_names[0]] if text.strip())
    max_length = min(
        sequence_length(folder, json.loads((folder / "config.json").read_text())), tokenizer.model_max_length
    )
    if task == "mlm":
        return mlm_batches(tokenizer, texts, max_length=max_length, seed=seed, max_sequences=max_sequences)
    return clm_batches(tokenizer, texts, block_size=max_length, max_sequences=max_sequences)


def evaluate_pair(
    fp_dir: str | Path,
    int8_dir: str | Path | None,
    output_dir: str | Path,
    *,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    max_sequences: int = 256,
    seed: int = 0,
    model_name: str | None = None,
) -> Path:
    """Evaluate FP (fp32 on CPU) and INT8 on the same batches; write results.json and plots; return its path."""
    fp_dir, output_dir = Path(fp_dir), Path(output_dir)
    config = json.loads((fp_dir / "config.json").read_text())
    task, auto_class = model_task(config)
    if dataset is None:
        dataset, dataset_config, default_split = default_dataset(task)
        split = split or default_split
    split = split or "validation"
    batches = _batches(task, fp_dir, dataset, dataset_config, split, max_sequences, seed)
    variants = {"fp32": fp_dir} | ({"int8": Path(int8_dir)} if int8_dir is not None else {})
    records, per_layer = [], {}
    for precision, folder in variants.items():
        model = auto_class.from_pretrained(folder, dtype=torch.float32).eval()
        result = evaluate_batches(model, task, batches, outliers=True, desc=f"{precision} {folder.name}")
        common = dict(
            model=model_name or folder.name,
            attn_impl=config.get("attn_impl", "softmax"),
            precision=precision,
            dataset=dataset,
            dataset_config=dataset_config,
            split=split,
            n=result["n"],
            seed=seed if task == "mlm" else None,
        )
        extra = {"tokens": result["tokens"]} if result["tokens"] is not None else {}
        records.append(ResultRecord(task=task, metric=result["metric"], value=result["value"], extra=extra, **common))
        outliers = result["outliers"]
        records += [ResultRecord(task="outliers", metric=m, value=outliers[m], **common) for m in OUTLIER_METRICS]
        per_layer[precision_label(precision)] = outliers
    plot_layer_stats(per_layer, output_dir / PLOTS_DIR / "outliers_per_layer.png", title=model_name or fp_dir.name)
    return write_results(records, output_dir / RESULTS_FILE)
