"""Where the offline data lives, and how the package writes its outputs (atomically, never over foreign files)."""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

DATA_ENV = "HF_QUANTIZABLE_DATA"
# The lm-eval task YAMLs of the package (`TaskManager(include_path=...)`, lm-eval's `--include_path`).
LM_EVAL_TASKS_DIR = Path(__file__).parent / "evaluation" / "lm_eval_tasks"


def read_model_config(path: str | Path) -> dict:
    """The parsed config.json of the model folder `path` (errors name the file)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no model at {path!s}: {config_file} does not exist")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, not a {type(config).__name__}")
    return config


def recipe_data_field(path: str | Path, name: str, default: Any = None) -> Any:
    """Field `name` of the `data` section of the training recipe (training_recipe.json) in the model
    folder `path`: how the model's training data was shaped, which its evaluation and calibration
    follow. `default` for a folder without a recipe (a Hub id, a model trained elsewhere) or field."""
    recipe = Path(path) / "training_recipe.json"
    if not recipe.is_file():
        return default
    try:
        data = json.loads(recipe.read_text(encoding="utf-8")).get("data") or {}
    except (ValueError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{recipe} is not a valid training recipe: {error}") from None
    return data.get(name, default)


def shared_data_dir() -> Path:
    """Offline data folder: `$HF_QUANTIZABLE_DATA`, else `../shared/data` beside the repository."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds.

    Nothing half-written ever sits at `path`: on an exception (or a killed process before the rename)
    only the hidden temporary file can remain, and on an exception it is removed. The temporary name
    is unique per call (process id and a random token), so concurrent writers never share one, and it
    keeps the suffix of `path` (writers that pick a format from the suffix, like matplotlib, still
    work). The file is not created in advance, so it gets the ordinary permissions of a new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename: never a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# Temporary folders of a write are `.<target>.tmp-<pid>-<token>` beside the target (`-old` while swapping).
_TMP_MARK = ".tmp-"


def check_output_folder(
    target: str | os.PathLike,
    *,
    option: str,
    is_own_output: Callable[[Path], bool],
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    own_output: str = "an earlier output of this command",
) -> Path:
    """Refuse (ValueError naming `option`) an output folder whose writing could lose a user's files.

    Allowed: a missing or empty folder; with `overwrite`, `own_output` (what `is_own_output` accepts).
    Refused: a file; a folder holding anything else; a folder equal to one of `inputs` or containing
    one; a folder that cannot be written. Writes nothing; returns `target`.
    """
    target = Path(target)
    resolved = target.resolve()
    for source in filter(None, inputs):
        source = Path(source).resolve()
        if resolved == source:
            raise ValueError(f"{option} {target} is the input {source}: choose another folder")
        if resolved in source.parents:
            raise ValueError(f"{option} {target} contains the input {source}: choose another folder")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{option} {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not is_own_output(target):
            raise ValueError(
                f"{option} {target} is not empty and is not {own_output}: "
                "choose a new or empty folder (nothing was written)"
            )
        if not overwrite:
            raise ValueError(f"{option} {target} already holds {own_output}: pass --overwrite to replace it")
    for parent in [resolved, *resolved.parents]:
        if parent.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {target}: {parent} is not writable")
            break
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process, or a platform without signals: leave its folder alone
    return True


def remove_stale_temp_folders(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that interrupted writes of `target` left beside it.

    Their names carry the writer's process id; folders of a process still running are left alone.
    Names without one come from versions that did not record it (and never cleaned up): stale.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for candidate in target.parent.glob(f".{target.name}.*"):
        kind, _, rest = candidate.name[len(target.name) + 2 :].partition("-")
        if kind not in ("tmp", "old") or not candidate.is_dir() or candidate.is_symlink():
            continue
        pid = rest.partition("-")[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, before_swap: Callable[[], object] | None = None) -> Iterator[Path]:
    """A new temporary folder beside `target` to fill; it replaces `target` when the block succeeds.

    Callers check `target` first (`check_output_folder`); `before_swap` may check it again just
    before the rename. An existing `target` is replaced only after the new folder is complete. The
    output gets the user's usual permissions (`apply_umask`). On an exception the temporary folder
    is removed; after a kill, the next write of `target` removes it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(target)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.with_name(f".{target.name}{_TMP_MARK}{token}")
    tmp.mkdir()
    try:
        yield tmp
        apply_umask(tmp)
        if before_swap is not None:
            before_swap()
        if target.exists():
            old = target.with_name(f".{target.name}.old-{token}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def apply_umask(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the permissions of a new file / folder under the user's umask.

    Some writers (safetensors' temporary file, `tempfile.mkdtemp`) create files 0600 / folders 0700;
    outputs meant to be shared or served should carry the user's normal permissions instead.
    """
    umask = os.umask(0)
    os.umask(umask)
    root = Path(root)
    os.chmod(root, 0o777 & ~umask if root.is_dir() else 0o666 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~umask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)
