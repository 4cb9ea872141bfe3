"""A wheel built from the repository carries everything the package reads at run time (card templates,
lm-eval tasks, the INT8 kernel's C++ source)."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "retrofit", "quantize", "evaluate", "push", "hub-eval", "pipeline", "lm-eval")


def test_wheel_installed_outside_the_repo_renders_a_card_and_finds_its_tasks(tmp_path):
    # built from a clean copy: a stale build/ folder of the checkout must not supply missing files
    source = tmp_path / "src"
    ignored = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache", "runs", "out")
    shutil.copytree(REPO, source, ignore=ignored)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("hf_quantizable-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert all(f"hfq-{name} =" in scripts for name in SCRIPTS)
    # A fresh process in another folder, importing the wheel's copy (PYTHONPATH comes before the editable install).
    code = textwrap.dedent(
        """
        import hf_quantizable, sys
        from pathlib import Path
        from hf_quantizable.evaluation.results import ResultRecord
        from hf_quantizable.hub.card import CardInputs, render_model_card
        from hf_quantizable.modeling.int8_kernel import package_kernel_source
        from hf_quantizable.paths import LM_EVAL_TASKS_DIR

        assert Path(hf_quantizable.__file__).is_relative_to(Path(sys.argv[1])), hf_quantizable.__file__
        assert package_kernel_source().is_relative_to(Path(sys.argv[1])), package_kernel_source()
        assert (LM_EVAL_TASKS_DIR / "wikitext2_local.yaml").is_file() and (LM_EVAL_TASKS_DIR / "utils.py").is_file()
        record = ResultRecord(model="m", attn_impl="gated", precision="fp32", task="mlm", dataset="wikitext",
                              split="test", metric="perplexity", value=12.5, n=8)
        config = {"model_type": "quantizable_bert", "architectures": ["QuantizableBertForMaskedLM"], "attn_impl": "gated"}
        card = render_model_card(CardInputs(repo_id="org/m", config=config, records=[record]))
        assert "12.5" in str(card)
        print("OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-2000:]
