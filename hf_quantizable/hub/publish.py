"""From a run folder to Hub repo folders: check every input first, then render cards and write folders.

A run folder is the training output (a `save_pretrained` folder with `training_recipe.json`) holding
`results.json` from the evaluation and, optionally, `plots/`. Its INT8 sibling is the quantizer's
output folder (config.json with `w8a8_config`).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.results import ResultRecord, read_results
from .card import CardInputs, render_model_card
from .folder import (
    PLOTS_DIR,
    RECIPE_FILE,
    RESULTS_FILE,
    find_plots,
    plot_paths_in_repo,
    read_model_config,
    write_repo_folder,
)
from .upload import check_repo_id


@dataclass
class RepoPlan:
    """One Hub repository to write: where its model comes from and its rendered inputs."""

    repo_id: str
    model_dir: Path
    card_inputs: CardInputs
    results_path: Path
    plots: list[Path]
    shared_from: Path | None = None

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1]


def default_int8_dir(run_dir: Path) -> Path:
    """Where `python -m hf_quantizable.quantize RUN_DIR` puts the INT8 checkpoint by default."""
    return run_dir.with_name(f"{run_dir.name}-w8a8")


def _read_records(results_path: Path) -> list[ResultRecord]:
    if not results_path.is_file():
        raise ValueError(
            f"no results file at {results_path}: evaluate the model first (python -m hf_quantizable.evaluate) "
            "or pass --results"
        )
    try:
        records = read_results(results_path)
    except Exception as error:  # jsonschema / JSON errors: say which file
        raise ValueError(f"{results_path} is not a valid results file: {error}") from None
    if not records:
        raise ValueError(f"{results_path} holds no records: a card needs at least one measured result")
    return records


def _read_recipe(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def plan_push(
    run_dir: str | Path,
    repo_id: str,
    *,
    int8_repo_id: str | None = None,
    int8_dir: str | Path | None = None,
    results_path: str | Path | None = None,
    plots_dir: str | Path | None = None,
) -> list[RepoPlan]:
    """Check all inputs (ValueError with a clear message) and return the FP (and INT8) repo plans."""
    run_dir = Path(run_dir)
    check_repo_id(repo_id, "--repo-id")
    if int8_repo_id is not None:
        check_repo_id(int8_repo_id, "--int8-repo-id")
        if int8_repo_id == repo_id:
            raise ValueError("--int8-repo-id must differ from --repo-id (FP and INT8 are sibling repos)")
    elif int8_dir is not None:
        raise ValueError("--int8-dir needs --int8-repo-id (the repo the INT8 checkpoint goes to)")
    config = read_model_config(run_dir)
    if config.get("w8a8_config"):
        raise ValueError(f"{run_dir} holds an INT8 checkpoint; pass the floating-point run folder as RUN_DIR")
    results_path = Path(results_path) if results_path else run_dir / RESULTS_FILE
    records = _read_records(results_path)
    plots = find_plots(plots_dir if plots_dir is not None else run_dir / PLOTS_DIR)
    recipe = _read_recipe(run_dir)
    if not any(run_dir.glob("tokenizer*")) and not (run_dir / "preprocessor_config.json").is_file():
        raise ValueError(f"{run_dir} has no tokenizer or image processor files; users could not run the model")

    int8_config = None
    if int8_repo_id is not None:
        int8_dir = Path(int8_dir) if int8_dir is not None else default_int8_dir(run_dir)
        int8_config = read_model_config(int8_dir)
        if not int8_config.get("w8a8_config"):
            raise ValueError(f"{int8_dir} is not an INT8 checkpoint (its config.json has no `w8a8_config`)")

    common = dict(records=records, recipe=recipe, plots=plot_paths_in_repo(plots), int8_config=int8_config)
    fp_inputs = CardInputs(repo_id=repo_id, config=config, int8_repo_id=int8_repo_id, **common)
    plans = [RepoPlan(repo_id, run_dir, fp_inputs, results_path, plots)]
    if int8_repo_id is not None:
        int8_inputs = CardInputs(repo_id=int8_repo_id, config=int8_config, fp_repo_id=repo_id, **common)
        plans.append(RepoPlan(int8_repo_id, int8_dir, int8_inputs, results_path, plots, shared_from=run_dir))
    for plan in plans:  # render now: a template or metadata problem fails before anything is written
        render_model_card(plan.card_inputs)
    return plans


def write_plan(plan: RepoPlan, target: str | Path) -> Path:
    """Write the repo folder of `plan` to `target` (atomically)."""
    card = render_model_card(plan.card_inputs)
    return write_repo_folder(target, plan.model_dir, card, plan.results_path, plan.plots, plan.shared_from)
