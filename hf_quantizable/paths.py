"""Where the offline data lives, and how the package writes its outputs (atomically, never over foreign files)."""

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

DATA_ENV = "HF_QUANTIZABLE_DATA"
# The lm-eval task YAMLs of the package (`TaskManager(include_path=...)`, lm-eval's `--include_path`).
LM_EVAL_TASKS_DIR = Path(__file__).parent / "evaluation" / "lm_eval_tasks"


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


# Temporary folders of an interrupted write are named `.<target>.hfq-tmp-<pid>-<token>` beside the target.
_TMP_MARK = ".hfq-tmp-"


def check_output_folder(
    target: str | os.PathLike,
    *,
    option: str,
    is_own_output: Callable[[Path], bool],
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Refuse (ValueError naming `option`) an output folder whose writing could lose a user's files.

    Allowed: a missing or empty folder; with `overwrite`, a previous output of the same command
    (`is_own_output`). Refused: a file; a folder holding anything else; a folder equal to one of
    `inputs` or containing one. Writes nothing.
    """
    target = Path(target)
    resolved = target.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise ValueError(f"{option} {target} is (or contains) the input {source}: choose another folder")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{option} {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not is_own_output(target):
            raise ValueError(
                f"{option} {target} is not empty and is not an earlier output of this command: "
                "choose a new or empty folder (nothing was written)"
            )
        if not overwrite:
            raise ValueError(f"{option} {target} holds an earlier output: pass --overwrite to replace it")
    for parent in [resolved, *resolved.parents]:
        if parent.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {target}: {parent} is not writable")
            break
    return target


def remove_stale_temp_folders(target: str | os.PathLike) -> None:
    """Remove the temporary folders that interrupted writes of `target` left beside it."""
    target = Path(target)
    if target.parent.is_dir():
        for stale in target.parent.glob(f".{target.name}{_TMP_MARK}*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A new temporary folder beside `target` to fill; it replaces `target` when the block succeeds.

    Callers check `target` first (`check_output_folder`): an existing `target` is replaced only after
    the new folder is complete. The folder gets the permissions of any new folder (umask), not a
    private temp folder's. On an exception it is removed; after a kill, the next write removes it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(target)
    tmp = target.with_name(f".{target.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = tmp.with_name(tmp.name + "-old")
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
