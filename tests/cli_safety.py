"""Table-driven checks that a command refuses bad input cleanly.

A refusal is clean when the command exits non-zero, prints a one-line `error: ...` naming the problem
(no traceback), and leaves the file tree it was given exactly as it was: nothing written, nothing
removed, nothing changed. Each CLI's test module lists its bad inputs as `BadInput` rows and runs
them through `assert_clean_refusal`, so a new flag joins by adding a row.
"""

import contextlib
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BadInput:
    """One bad input: `argv(workspace)` builds the command line, `message` is a regex of the error."""

    id: str
    argv: Callable[[Path], list[str]]
    message: str


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its type, size, mtime and mode: equal snapshots = untouched tree."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            state[str(path.relative_to(root))] = (path.is_dir(), info.st_size, info.st_mtime_ns, info.st_mode)
    return state


def run_main(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str, str]:
    """Run a CLI `main` in process; exit code (argparse's SystemExit included), stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_clean_refusal(main: Callable[[list[str]], int], case: BadInput, workspace: Path) -> str:
    """Run `case` against `workspace`; assert a clean refusal and return the error line."""
    before = snapshot(workspace)
    code, _, err = run_main(main, case.argv(workspace))
    assert code != 0, f"{case.id}: exit code 0 on bad input"
    assert "Traceback" not in err, f"{case.id}: traceback\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert errors, f"{case.id}: no error line in\n{err}"
    assert re.search(case.message, errors[-1]), f"{case.id}: {errors[-1]!r} does not match {case.message!r}"
    assert snapshot(workspace) == before, f"{case.id}: the command changed files under {workspace}"
    return errors[-1]
