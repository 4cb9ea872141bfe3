"""Assemble the exact folder a Hub repository receives, atomically (temporary folder, then rename)."""

import fnmatch
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from ..paths import atomic_folder

RECIPE_FILE = "training_recipe.json"
PROVENANCE_FILE = "provenance.json"  # how a shipped model was trained (command, seed, steps, wall time)
TRAIN_RESULTS_FILE = "train_results.json"  # Trainer's summary of a run (train_runtime)
RESULTS_FILE = "results.json"
PLOTS_DIR = "plots"
PLOT_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")
# Tokenizer / image processor files and the recipe: an INT8 checkpoint may lack them and shares them
# with its floating-point run.
SHARED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    RECIPE_FILE,
    PROVENANCE_FILE,
)
# What a model folder contributes to its Hub repo; training state (optimizer, checkpoints, pickled
# training arguments) stays behind.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "*.py",
) + SHARED_FILES
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The config.json of a `save_pretrained` folder that can be pushed; ValueError says what is missing.

    Checks: config.json exists, safetensors weights exist, `auto_map` is set and every module it
    names (and their relative imports) is in the folder, so `trust_remote_code` loading works.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not model_dir.is_dir() or not config_path.is_file():
        raise ValueError(f"{model_dir} is not a model folder: no config.json (save the model with `save_pretrained`)")
    if not any(model_dir.glob("*.safetensors")):
        raise ValueError(f"{model_dir} has no safetensors weights (*.safetensors); the Hub repo needs them")
    config = json.loads(config_path.read_text())
    auto_map = config.get("auto_map")
    if not auto_map:
        raise ValueError(f"{config_path} has no `auto_map`: save a hf_quantizable model with `save_pretrained`")
    missing = sorted(_module_files(model_dir, auto_map) - {p.name for p in model_dir.glob("*.py")})
    if missing:
        raise ValueError(f"{model_dir} lacks the modeling files {missing} that `auto_map` needs")
    return config


def _module_files(model_dir: Path, auto_map: dict[str, Any]) -> set[str]:
    """Python files that `auto_map` references, with their relative imports (transitively)."""
    pending = set()
    for reference in auto_map.values():
        for item in reference if isinstance(reference, list) else [reference]:
            if item:
                pending.add(item.split("--")[-1].rsplit(".", 1)[0] + ".py")
    needed: set[str] = set()
    while pending:
        name = pending.pop()
        needed.add(name)
        path = model_dir / name
        if path.is_file():
            pending.update(f"{m}.py" for m in _RELATIVE_IMPORT.findall(path.read_text()) if f"{m}.py" not in needed)
    return needed


def model_files(model_dir: str | Path, shared_from: str | Path | None = None) -> list[Path]:
    """The files of `model_dir` that belong in the Hub repo.

    Args:
        shared_from: a folder (the floating-point run) supplying the tokenizer / image processor files
            and the training recipe that `model_dir` lacks.
    """
    files = _matching(Path(model_dir), MODEL_FILES)
    if shared_from is not None:
        names = {p.name for p in files}
        files += [p for p in _matching(Path(shared_from), SHARED_FILES) if p.name not in names]
    return sorted(files, key=lambda p: p.name)


def _matching(folder: Path, patterns: Sequence[str]) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, g) for g in patterns)]


def find_plots(plots_dir: str | Path | None) -> list[Path]:
    if plots_dir is None or not Path(plots_dir).is_dir():
        return []
    return sorted(p for p in Path(plots_dir).iterdir() if p.suffix.lower() in PLOT_SUFFIXES)


def plot_paths_in_repo(plots: Sequence[Path]) -> list[str]:
    """Where `plots` land in the repo (what the card links to)."""
    return [f"{PLOTS_DIR}/{p.name}" for p in plots]


def is_repo_folder(folder: str | Path) -> bool:
    """Whether `folder` is an earlier `write_repo_folder` output: a card, results, and only repo files."""
    folder = Path(folder)
    if not ((folder / "README.md").is_file() and (folder / RESULTS_FILE).is_file()):
        return False
    patterns = (*MODEL_FILES, "README.md", RESULTS_FILE)
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if relative.parts[0] == PLOTS_DIR and len(relative.parts) <= 2:
            if path.is_dir() or path.suffix.lower() in PLOT_SUFFIXES:
                continue
        if not (len(relative.parts) == 1 and path.is_file() and any(fnmatch.fnmatch(path.name, g) for g in patterns)):
            return False
    return True


def write_repo_folder(
    target: str | Path,
    model_dir: str | Path,
    card: ModelCard,
    results_path: str | Path,
    plots: Sequence[Path] = (),
    shared_from: str | Path | None = None,
) -> Path:
    """Write the repo folder: model files, README.md (the card), results.json, plots/.

    `shared_from`: see `model_files`. The folder is built beside `target` and renamed into place, so
    `target` is never half written; callers check an existing `target` first (`check_output_folder`
    with `is_repo_folder`).
    """
    with atomic_folder(target) as tmp:
        for path in model_files(model_dir, shared_from):
            shutil.copy2(path, tmp / path.name)
        card.save(tmp / "README.md")
        shutil.copy2(results_path, tmp / RESULTS_FILE)
        if plots:
            (tmp / PLOTS_DIR).mkdir()
            for plot in plots:
                shutil.copy2(plot, tmp / PLOTS_DIR / plot.name)
    return Path(target)
