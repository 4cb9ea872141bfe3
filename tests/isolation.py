"""Run Python code in a fresh interpreter that cannot import hf_quantizable."""

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

_PRELUDE = """
import importlib.abc, sys

class _BlockHfQuantizable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_quantizable" or name.startswith("hf_quantizable."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
        return None

sys.meta_path.insert(0, _BlockHfQuantizable())
try:
    import hf_quantizable  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("hf_quantizable is importable: the isolation failed")
"""


def run_without_package(code: str, timeout: float = 300) -> str:
    """Run `code` in a new process (cwd outside the repo, hf_quantizable blocked); return stdout.

    Raises AssertionError with the child's stderr when it fails.
    """
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(
            [sys.executable, "-c", _PRELUDE + textwrap.dedent(code)],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            # The environment's bin folder stays on PATH, as for a user (tools such as ninja live there).
            env={
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                "HOME": cwd,
            },
        )
    assert result.returncode == 0, f"child failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout
