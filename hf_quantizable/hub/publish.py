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
from ..paths import check_output_folder
from ..provenance import model_fingerprint
from .card import CardInputs, render_model_card
from .folder import (
    PLOTS_DIR,
    PROVENANCE_FILE,
    RECIPE_FILE,
    RESULTS_FILE,
    TRAIN_RESULTS_FILE,
    find_plots,
    is_repo_folder,
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
    records = read_results(results_path)
    if not records:
        raise ValueError(f"{results_path} holds no records: a card needs at least one measured result")
    return records


def _check_records_belong_to(records: list[ResultRecord], results_path: Path, run_dir: Path) -> None:
    """Refuse records measured on another model than `run_dir` (compared by `model_fingerprint`)."""
    fingerprint = model_fingerprint(run_dir)
    foreign = next((r for r in records if r.model_fingerprint != fingerprint), None)
    if foreign is not None:
        which = "records no model fingerprint" if foreign.model_fingerprint is None else "belongs to another model"
        raise ValueError(
            f"{results_path}: a record of {foreign.model!r} ({foreign.metric}, {foreign.precision}) {which}; "
            f"a card shows only results of {run_dir}: evaluate it with python -m hf_quantizable.evaluate"
        )


def _read_recipe(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_training_run(model_dir: Path, recipe: dict[str, Any] | None) -> dict[str, Any] | None:
    """How the run was trained, for its card: `provenance.json` (a shipped model: command, seed, steps,
    wall time) or Trainer's `train_results.json` (steps from the recipe, `train_runtime`); else None."""
    provenance = model_dir / PROVENANCE_FILE
    if provenance.is_file():
        return json.loads(provenance.read_text())
    train_results = model_dir / TRAIN_RESULTS_FILE
    if not train_results.is_file():
        return None
    runtime = json.loads(train_results.read_text()).get("train_runtime")
    steps = ((recipe or {}).get("training") or {}).get("max_steps")
    return {"steps": steps, "wall_time_s": runtime} if runtime is not None else None


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
    _check_records_belong_to(records, results_path, run_dir)
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
        source = int8_config["w8a8_config"].get("source_fingerprint")
        if source is not None and source != model_fingerprint(run_dir):
            raise ValueError(f"{int8_dir} was not quantized from {run_dir} (its `source_fingerprint` differs)")

    common = dict(records=records, recipe=recipe, plots=plot_paths_in_repo(plots), int8_config=int8_config)
    common["training_run"] = read_training_run(run_dir, recipe)
    fp_inputs = CardInputs(repo_id=repo_id, config=config, int8_repo_id=int8_repo_id, **common)
    plans = [RepoPlan(repo_id, run_dir, fp_inputs, results_path, plots)]
    if int8_repo_id is not None:
        int8_inputs = CardInputs(repo_id=int8_repo_id, config=int8_config, fp_repo_id=repo_id, **common)
        plans.append(RepoPlan(int8_repo_id, int8_dir, int8_inputs, results_path, plots, shared_from=run_dir))
    for plan in plans:  # render now: a template or metadata problem fails before anything is written
        render_model_card(plan.card_inputs)
    return plans


def check_plan_targets(plans: list[RepoPlan], local_dir: Path, overwrite: bool) -> None:
    """Refuse `local_dir/NAME` targets that hold anything but an earlier repo folder (ValueError)."""
    for plan in plans:
        inputs = [plan.model_dir, *([plan.shared_from] if plan.shared_from else [])]
        check_output_folder(
            local_dir / plan.name,
            option="--local-dir",
            is_own_output=is_repo_folder,
            overwrite=overwrite,
            inputs=inputs,
        )


def write_plan(plan: RepoPlan, target: str | Path) -> Path:
    """Write the repo folder of `plan` to `target` (atomically; check it first with `check_plan_targets`)."""
    card = render_model_card(plan.card_inputs)
    return write_repo_folder(target, plan.model_dir, card, plan.results_path, plan.plots, plan.shared_from)
