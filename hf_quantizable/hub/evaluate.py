"""Evaluate a model folder (and its INT8 sibling) with the evaluation harness for its card.

A thin layer over `hf_quantizable.evaluation.harness.evaluate_model`: picks the task from the
architecture, the sequence length from the training recipe and the data the folder's card was made
on (its `results.json`; the offline WikiText-2 / MNIST for a folder without one), then writes
`results.json` and `plots/` (what the card is rendered from).
"""

from pathlib import Path

from ..evaluation.harness import EvalSettings, evaluate_model
from ..evaluation.results import read_results, write_results
from ..paths import read_model_config, recipe_data_field, shared_data_dir
from .card import dataset_ref, is_hub_id
from .folder import PLOTS_DIR, RESULTS_FILE

TASKS = {"ForMaskedLM": "mlm", "ForCausalLM": "clm", "ForImageClassification": "image"}


def model_task(config: dict) -> str:
    """The harness task of a config.json dict (from its architecture)."""
    architecture = (config.get("architectures") or [""])[0]
    for suffix, task in TASKS.items():
        if architecture.endswith(suffix):
            return task
    raise ValueError(f"cannot evaluate architecture {architecture!r}: expected one ending in {list(TASKS)}")


def default_dataset(task: str) -> tuple[str, str | None, str]:
    """(dataset, config, split): the offline copy when present (WikiText-2 / MNIST), else the Hub."""
    if task == "image":
        local = shared_data_dir() / "mnist"
        return (str(local), None, "test") if local.is_dir() else ("mnist", None, "test")
    local = shared_data_dir() / "wikitext-2"
    return (str(local), None, "test") if local.is_dir() else ("wikitext", "wikitext-2-raw-v1", "test")


QUALITY_TASKS = ("mlm", "clm", "image-classification")


def recorded_dataset(folder: Path) -> tuple[str, str | None, str] | None:
    """(dataset, config, split) the folder's card was made on (its results.json), usable here; None
    when the folder has no results. Raises ValueError when that data is not available on this machine.

    A local copy of a known dataset that is absent here is read from the Hub under its id (the same data).
    """
    path = folder / RESULTS_FILE
    if not path.is_file():
        return None
    record = next((r for r in read_results(path) if r.task in QUALITY_TASKS), None)
    if record is None:
        return None
    dataset, config = record.dataset, record.dataset_config
    if not Path(dataset).exists():
        hub_id, hub_config = dataset_ref(dataset, config)
        if not is_hub_id(hub_id):
            raise ValueError(
                f"{folder}'s card was made on {dataset!r}, which is not on this machine: pass --dataset "
                "(and --split) to evaluate on other data"
            )
        dataset, config = hub_id, hub_config
    return dataset, config, record.split


def sequence_length(folder: Path, config: dict) -> int:
    """The trained sequence length (training_recipe.json), else min(128, max positions)."""
    length = recipe_data_field(folder, "seq_length")
    return int(length) if length else min(128, config.get("max_position_embeddings") or 128)


def evaluate_for_card(
    fp_dir: str | Path,
    int8_dir: str | Path | None,
    output_dir: str | Path,
    *,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str | None = None,
    max_sequences: int = 128,
    seed: int = 0,
    trust_remote_code: bool = False,
    extra_precisions: tuple[str, ...] = ("fp16",),
) -> Path:
    """FP (fp32, and fp16 by default: the cards publish FP16 and INT8 results), simulated W8A8 and the
    INT8 checkpoint on the same batches; return results.json."""
    fp_dir, output_dir = Path(fp_dir), Path(output_dir)
    config = read_model_config(fp_dir)
    task = model_task(config)
    if dataset is None:
        dataset, dataset_config, default_split = recorded_dataset(fp_dir) or default_dataset(task)
        split = split or default_split
    settings = EvalSettings(
        task=task,
        dataset=dataset,
        dataset_config=dataset_config,
        split=split or "test",
        max_sequences=max_sequences,
        max_length=sequence_length(fp_dir, config) if task != "image" else 128,
        bos_at_block_start=task == "clm" and bool(recipe_data_field(fp_dir, "bos_at_block_start", False)),
        seed=seed,
        extra_precisions=extra_precisions,
    )
    records, _ = evaluate_model(
        str(fp_dir),
        settings,
        int8=str(int8_dir) if int8_dir else None,
        plots_dir=output_dir / PLOTS_DIR,
        trust_remote_code=trust_remote_code,
    )
    return write_results(records, output_dir / RESULTS_FILE)
