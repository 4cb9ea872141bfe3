"""Copy the final models of one outlier-search run into the package as the main job's shipped checkpoints.

The main job (`python -m hf_quantizable.pipeline`, setting `opt-outlier`) quantizes and evaluates
these models live; training them takes about half an hour per variant on one core, so they are
trained once by `benchmarks/outlier_effect.py` and shipped. For each variant this writes the
model (config.json, model.safetensors: the trained fp32 weights unchanged), the tokenizer, the
`opt-outlier-VARIANT` preset as `training_recipe.json` (checked to equal the run's own recipe in
every field that shapes training), the run's logged training loss (`training_log.json`, what
tests/test_pipeline.py reproduces with the preset's first steps) and `provenance.json` (the
command, seed, steps and wall time of the run).

    python benchmarks/ship_outlier_checkpoints.py \\
        ~/.cache/hf_quantizable/outlier_runs/opt-4l128-noop-bos-lr2e-3-seq256-3200/seed1000
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from outlier_effect import DEFAULT_LOG, SETTINGS, read_log  # the sibling benchmark (its folder is on sys.path)

from hf_quantizable.paths import atomic_folder
from hf_quantizable.pipeline import SHIPPED_DIR
from hf_quantizable.training.presets import VARIANTS, get_preset

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
# Recipe fields the search run set through its own options instead of the recipe: its trainer logged and
# tracked every 100 steps (the preset's logging_steps) and put the BOS token first itself.
NOT_IN_RUN_RECIPE = {
    ("training", "logging_steps"),
    ("tracking", "outlier_every_n_steps"),
    ("data", "bos_at_block_start"),
}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def recipe_differences(preset: dict, run: dict) -> list[str]:
    """`group.field` names whose value differs between the preset's recipe and the run's (model,
    training, data, tracking; the fields the run set by other means excluded)."""
    return [
        f"{group}.{name}"
        for group in ("model", "training", "data", "tracking")
        for name in sorted(set(preset[group]) | set(run[group]))
        if (group, name) not in NOT_IN_RUN_RECIPE and preset[group].get(name) != run[group].get(name)
    ]


def search_arguments(setting: dict) -> str:
    """The outlier_effect.py arguments that give `setting` (a setting.json): the named setting whose
    overrides it extends, and the overrides added on the command line."""
    for name, named in SETTINGS.items():
        extends = setting["overrides"][: len(named.overrides)] == named.overrides
        if extends and named.preset == setting["preset"] and named.bos == setting["bos"] and not named.corpus:
            return " ".join([f"--setting {name}", *setting["overrides"][len(named.overrides) :]])
    return " ".join([f"--preset {setting['preset']}", "--bos", *setting["overrides"]])


def ship_variant(run_dir: Path, variant: str, out: Path, setting: dict, label: str, seed: str) -> None:
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    final = checkpoints[-1]
    run_recipe = json.loads((run_dir / "training_recipe.json").read_text())
    preset = get_preset(f"opt-outlier-{variant}").to_dict()
    differences = recipe_differences(preset, run_recipe)
    if differences:
        raise SystemExit(f"error: {run_dir} was not trained with opt-outlier-{variant}: it differs in {differences}")
    if int(final.name.split("-")[1]) != preset["training"]["max_steps"]:
        raise SystemExit(
            f"error: {run_dir}'s last checkpoint is {final.name}, not step {preset['training']['max_steps']}"
        )
    state = json.loads((final / "trainer_state.json").read_text())
    wall = json.loads((run_dir.parent / f"{variant}.wall.json").read_text())["wall_time_s"]
    finished = [
        r
        for r in read_log(DEFAULT_LOG)
        if (r.get("label"), r.get("seed"), r.get("variant"), r.get("status"))
        == (label, int(seed.removeprefix("seed")), variant, "finished")
    ]
    if not finished:
        raise SystemExit(f"error: the search log {DEFAULT_LOG} has no finished record of {label} {seed} {variant}")
    machine = finished[-1]["machine"]
    threads = machine["torch_threads"]
    for name in MODEL_FILES:
        shutil.copy2(final / name, out / name)
    _write_json(out / "training_recipe.json", preset)
    _write_json(
        out / "training_log.json", {"logging_steps": state["logging_steps"], "log_history": state["log_history"]}
    )
    setting_args = search_arguments(setting)
    _write_json(
        out / "provenance.json",
        {
            "trained_by": "benchmarks/outlier_effect.py",
            "label": label,
            "seed": int(seed.removeprefix("seed")),
            "steps": state["global_step"],
            "wall_time_s": wall,
            "machine": f"{machine['cpu_model']} ({', '.join(machine['cpu_flags'])}), {threads} thread{'s' * (threads > 1)}",
            "command": f"python benchmarks/outlier_effect.py --label {label} --seed {seed.removeprefix('seed')} "
            f"--max-steps {state['global_step']} --variants {variant} --w8a8-every {setting['w8a8_every']} "
            f"{setting_args}",
            "same_as": f"python -m hf_quantizable.train --preset opt-outlier-{variant} --output DIR",
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seed_dir", type=Path, help="<runs-dir>/<label>/seed<N> of a finished search run")
    parser.add_argument("--to", type=Path, default=SHIPPED_DIR, help="where the variants' folders go")
    args = parser.parse_args()
    setting = json.loads((args.seed_dir / "setting.json").read_text())
    if not setting.get("bos"):
        sys.exit(f"error: {args.seed_dir} was trained without a BOS token at block start; opt-outlier has one")
    for variant in VARIANTS:
        with atomic_folder(args.to / variant) as tmp:  # replaces an earlier shipped copy
            ship_variant(args.seed_dir / variant, variant, tmp, setting, args.seed_dir.parent.name, args.seed_dir.name)
        print(f"{args.to / variant}: shipped")


if __name__ == "__main__":
    main()
