"""evaluate, push, hub_eval, lm_eval and the main job: bad input is refused cleanly, nothing is lost,
and no model folder runs its own code without `--trust-remote-code`."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hf_quantizable.evaluate import main as evaluate_main
from hf_quantizable.evaluation.harness import EvalSettings, build_batches
from hf_quantizable.evaluation.results import ResultRecord, read_results, write_results
from hf_quantizable.hub_eval import main as hub_eval_main
from hf_quantizable.pipeline import main as pipeline_main
from hf_quantizable.provenance import model_fingerprint
from hf_quantizable.push import main as push_main
from hf_quantizable.quantization import W8A8Config, W8A8Quantizer
from tests.cli_safety import BadInput, assert_clean_refusal, run_main, snapshot
from tests.conftest import tiny_model

SMALL = ["--max-sequences", "8", "--max-length", "32", "--batch-size", "4", "--num-calibration-batches", "2"]
MARKER = "remote-code-ran.txt"


def write_remote_code_folder(folder: Path, marker: Path) -> Path:
    """A model folder whose config needs its own code, and that code writes `marker` when imported."""
    folder.mkdir(parents=True)
    config = {"model_type": "evil_remote", "architectures": ["EvilForMaskedLM"]}
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(
        "from pathlib import Path\n"
        "from transformers import PretrainedConfig\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'evil_remote'\n"
    )
    return folder


def record(run: Path, fingerprint: str | None) -> ResultRecord:
    return ResultRecord(
        model=str(run),
        model_fingerprint=fingerprint,
        attn_impl="softmax",
        precision="fp32",
        task="outliers",
        dataset="d",
        split="test",
        metric="max_inf_norm",
        value=1.0,
        n=1,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_path, data_dir):
    """Two tiny BERT runs (vanilla, gated) with tokenizers, results, and an INT8 checkpoint of each."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    settings = EvalSettings(
        task="mlm", dataset=str(data_dir / "wikitext-2"), split="validation", max_sequences=8, max_length=32
    )
    calibration = [
        {k: b[k] for k in ("input_ids", "attention_mask")} for b in build_batches(settings, tokenizer, "validation")
    ]
    for name, attn_impl in (("vanilla", "softmax"), ("gated", "gated")):
        model = tiny_model("bert", vocab_size=tokenizer.vocab_size, attn_impl=attn_impl)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        write_results([record(root / name, model_fingerprint(root / name))], root / name / "results.json")
        W8A8Quantizer.from_pretrained(root / name).quantize(
            root / f"{name}-w8a8",
            quantization_config=W8A8Config(num_calibration_batches=1),
            calibration_dataset=calibration,
        )
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    return root


@pytest.fixture
def workspace(models, tmp_path):
    """A private copy of the models (a refusal must leave it exactly as it was)."""
    shutil.copytree(models, tmp_path / "ws")
    return tmp_path / "ws"


def test_int8_checkpoints_record_their_source(models):
    for name in ("vanilla", "gated"):
        config = json.loads((models / f"{name}-w8a8" / "config.json").read_text())
        assert config["w8a8_config"]["source_fingerprint"] == model_fingerprint(models / name)
    assert model_fingerprint(models / "vanilla") != model_fingerprint(models / "gated")


# ---- evaluate -------------------------------------------------------------------------------------------

EVALUATE_CASES = [
    BadInput("missing folder", lambda w: [str(w / "no" / "such"), "--task", "mlm"], r"does not exist"),
    BadInput(
        "int8 of another model",
        lambda w: [
            str(w / "gated"),
            "--int8",
            str(w / "vanilla-w8a8"),
            "--task",
            "mlm",
            "--max-length",
            "32",
            "--output",
            str(w / "o"),
        ],
        r"was not quantized from",
    ),
    BadInput(
        "results.json exists",
        lambda w: [str(w / "gated"), "--task", "mlm", "--no-plots", *SMALL],
        r"results\.json exists: pass --append .* or --overwrite",
    ),
    BadInput(
        "append and overwrite",
        lambda w: [str(w / "gated"), "--task", "mlm", "--append", "--overwrite"],
        r"--overwrite and --append exclude each other",
    ),
    BadInput(
        "data option for glue",
        lambda w: [str(w / "gated"), "--task", "glue", "--glue-task", "sst2", "--max-sequences", "8"],
        r"--max-sequences does not apply to --task glue",
    ),
    BadInput(
        "glue option for mlm",
        lambda w: [str(w / "gated"), "--task", "mlm", "--glue-task", "sst2"],
        r"--glue-task applies to --task glue only",
    ),
    BadInput(
        "calibration option with --no-w8a8",
        lambda w: [str(w / "gated"), "--task", "mlm", "--no-w8a8", "--per-channel-weights"],
        r"--per-channel-weights has no effect with --no-w8a8",
    ),
    BadInput(
        "clipping steps without outlier suppression",
        lambda w: [str(w / "gated"), "--task", "mlm", "--clipping-steps", "5"],
        r"--clipping-steps applies only with --outlier-suppression",
    ),
    BadInput(
        "image column for a text task",
        lambda w: [str(w / "gated"), "--task", "mlm", "--image-column", "img"],
        r"--image-column applies to --task image only",
    ),
    BadInput(
        "max length beyond the positions",
        lambda w: [str(w / "gated"), "--task", "mlm", "--max-length", "65", "--output", str(w / "o")],
        r"--max-length 65 exceeds the model's max_position_embeddings \(64\)",
    ),
    BadInput(
        "empty dataset",
        lambda w: [
            str(w / "gated"),
            "--task",
            "mlm",
            "--dataset",
            str(w / "empty.txt"),
            "--max-length",
            "32",
            "--output",
            str(w / "o"),
        ],
        r"empty\.txt.* cannot be read: it holds no example",
    ),
    BadInput(
        "binary dataset",
        lambda w: [
            str(w / "gated"),
            "--task",
            "mlm",
            "--dataset",
            str(w / "binary.txt"),
            "--max-length",
            "32",
            "--output",
            str(w / "o"),
        ],
        r"binary\.txt.* cannot be read: it is not UTF-8 text",
    ),
    BadInput(
        "mlm probability for clm",
        lambda w: [str(w / "gated"), "--task", "clm", "--mlm-probability", "0.2"],
        r"--mlm-probability applies to --task mlm only",
    ),
]


@pytest.mark.parametrize("case", EVALUATE_CASES, ids=lambda c: c.id)
def test_evaluate_refuses_cleanly(case, workspace):
    assert_clean_refusal(evaluate_main, case, workspace)


def test_evaluate_garbage_config_names_the_file(workspace):
    (workspace / "gated" / "config.json").write_text("{garbage")
    case = BadInput("garbage config.json", lambda w: [str(w / "gated"), "--task", "mlm"], r"MODEL .*gated")
    assert_clean_refusal(evaluate_main, case, workspace)


def test_evaluate_overwrite_replaces_its_own_results(workspace, data_dir):
    argv = [str(workspace / "gated"), "--task", "mlm", "--dataset", str(data_dir / "wikitext-2"), "--no-plots"]
    code, _, err = run_main(evaluate_main, [*argv, *SMALL, "--int8", str(workspace / "gated-w8a8"), "--overwrite"])
    assert code == 0, err
    records = read_results(workspace / "gated" / "results.json")
    assert {r.precision for r in records} == {"fp32", "w8a8-sim", "int8"}
    assert {r.model_fingerprint for r in records} == {model_fingerprint(workspace / "gated")}
    assert all(r.extra["int8_source_verified"] for r in records if r.precision == "int8")


# ---- remote code -----------------------------------------------------------------------------------------


def test_evaluate_runs_no_foreign_code_without_consent(tmp_path):
    marker = tmp_path / MARKER
    folder = write_remote_code_folder(tmp_path / "evil", marker)
    case = BadInput("remote code", lambda w: [str(folder), "--task", "mlm"], r"pass --trust-remote-code")
    assert_clean_refusal(evaluate_main, case, tmp_path)
    assert not marker.exists()
    code, _, err = run_main(evaluate_main, [str(folder), "--task", "mlm", "--trust-remote-code"])
    assert marker.exists()  # with consent the folder's code runs (then the model type is refused)
    assert code == 2 and "model_type 'evil_remote'" in err


def test_hub_eval_runs_no_foreign_code_without_consent(tmp_path):
    marker = tmp_path / MARKER
    write_remote_code_folder(tmp_path / "models" / "evil", marker)
    argv = ["--repos", "org/evil", "--models-dir", str(tmp_path / "models"), "--output", str(tmp_path / "e")]
    case = BadInput("remote code", lambda w: argv, r"pass --trust-remote-code")
    assert_clean_refusal(hub_eval_main, case, tmp_path)
    assert not marker.exists()


def test_lm_eval_model_runs_no_foreign_code_without_consent(tmp_path):
    from hf_quantizable.evaluation.lm_eval_model import QuantizableLM

    marker = tmp_path / MARKER
    folder = write_remote_code_folder(tmp_path / "evil", marker)
    with pytest.raises(ValueError, match="pass --trust-remote-code"):
        QuantizableLM(pretrained=str(folder))
    assert not marker.exists()


def test_lm_eval_cli_errors_are_one_line(tmp_path, monkeypatch, models):
    from hf_quantizable.evaluation import lm_eval

    def cli(argv):
        monkeypatch.setattr(sys, "argv", ["lm_eval", *argv])
        return lm_eval.main()

    common = ["run", "--model", "hf-quantizable", "--tasks", "wikitext2_local"]  # the package's tasks by default
    missing = BadInput(
        "missing model",
        lambda w: [*common, "--model_args", f"pretrained={w / 'nope' / 'opt'}"],
        r"error: pretrained .* does not exist",
    )
    assert_clean_refusal(cli, missing, tmp_path)


# ---- push ------------------------------------------------------------------------------------------------


def test_push_never_replaces_user_files(workspace):
    out = workspace / "out"
    (out / "bert-gated").mkdir(parents=True)
    (out / "bert-gated" / "notes.txt").write_text("mine")
    argv = lambda w: [str(w / "gated"), "--repo-id", "org/bert-gated", "--local-dir", str(w / "out")]  # noqa: E731
    assert_clean_refusal(push_main, BadInput("user files", argv, r"not an earlier output"), workspace)
    overwrite = lambda w: [*argv(w), "--overwrite"]  # noqa: E731
    assert_clean_refusal(push_main, BadInput("user files", overwrite, r"not an earlier output"), workspace)
    assert (out / "bert-gated" / "notes.txt").read_text() == "mine"

    (out / "bert-gated" / "notes.txt").unlink()
    assert run_main(push_main, argv(workspace))[0] == 0
    assert_clean_refusal(push_main, BadInput("earlier output", argv, r"pass --overwrite"), workspace)
    card = out / "bert-gated" / "README.md"
    card.write_text("stale")
    assert run_main(push_main, overwrite(workspace))[0] == 0
    assert card.read_text() != "stale"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left


PUSH_CASES = [
    BadInput(
        "results of another model",
        lambda w: [str(w / "gated"), "--repo-id", "o/g", "--results", str(w / "vanilla" / "results.json"), "--dry-run"],
        r"belongs to another model",
    ),
    BadInput(
        "int8 of another run",
        lambda w: [
            str(w / "gated"),
            "--repo-id",
            "o/g",
            "--int8-repo-id",
            "o/g8",
            "--int8-dir",
            str(w / "vanilla-w8a8"),
            "--dry-run",
        ],
        r"was not quantized from",
    ),
    BadInput(
        "local dir is the input",
        lambda w: [str(w / "gated"), "--repo-id", "o/gated", "--local-dir", str(w)],
        r"is the input .*gated: choose another folder",
    ),
    BadInput(
        "overwrite without local dir",
        lambda w: [str(w / "gated"), "--repo-id", "o/g", "--dry-run", "--overwrite"],
        r"--overwrite applies to --local-dir only",
    ),
    BadInput(
        "private without upload",
        lambda w: [str(w / "gated"), "--repo-id", "o/g", "--dry-run", "--private"],
        r"--private applies only when uploading",
    ),
]


@pytest.mark.parametrize("case", PUSH_CASES, ids=lambda c: c.id)
def test_push_refuses_cleanly(case, workspace):
    assert_clean_refusal(push_main, case, workspace)


def test_push_refuses_records_without_a_fingerprint(workspace):
    write_results([record(workspace / "gated", None)], workspace / "gated" / "results.json")
    case = BadInput(
        "no fingerprint", lambda w: [str(w / "gated"), "--repo-id", "o/g", "--dry-run"], r"records no model fingerprint"
    )
    assert_clean_refusal(push_main, case, workspace)


# ---- hub_eval --------------------------------------------------------------------------------------------

HUB_EVAL_CASES = [
    BadInput(
        "fp model as the int8 part",
        lambda w: [
            "--repos",
            "org/gated=org/vanilla",
            "--models-dir",
            str(w),
            "--output",
            str(w / "e"),
            "--max-sequences",
            "2",
        ],
        r"not an INT8 checkpoint",
    ),
    BadInput("upload from nothing", lambda w: ["--upload-from", str(w / "gated")], r"has no refreshed\.json"),
    BadInput("upload with repos", lambda w: ["--upload-from", str(w), "--repos", "org/a"], r"evaluates nothing"),
    BadInput("no repos", lambda w: ["--output", str(w / "e")], r"--repos is required"),
    BadInput(
        "foreign output",
        lambda w: ["--repos", "org/gated", "--models-dir", str(w), "--output", str(w / "gated")],
        r"not an earlier output",
    ),
]


@pytest.mark.parametrize("case", HUB_EVAL_CASES, ids=lambda c: c.id)
def test_hub_eval_refuses_cleanly(case, workspace):
    assert_clean_refusal(hub_eval_main, case, workspace)


def test_hub_eval_offline_download_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    case = BadInput(
        "offline",
        lambda w: ["--repos", "org/not-cached-anywhere", "--output", str(w / "e")],
        r"cannot download org/not-cached-anywhere",
    )
    assert_clean_refusal(hub_eval_main, case, tmp_path)


# ---- main job --------------------------------------------------------------------------------------------

PIPELINE_CASES = [
    BadInput(
        "work dir is a file",
        lambda w: ["--local-dir", str(w / "out"), "--work-dir", str(w / "gated" / "config.json")],
        r"--work-dir .* exists and is not a folder",
    ),
    BadInput(
        "work dir holds user files",
        lambda w: ["--local-dir", str(w / "out"), "--work-dir", str(w / "gated")],
        r"--work-dir .* not an earlier output",
    ),
    BadInput(
        "repo folder holds user files",
        lambda w: ["--local-dir", str(w), "--work-dir", str(w / "runs"), "--variants", "gated"],
        r"--local-dir .*opt-outlier-gated.* not an earlier output",
    ),
]


@pytest.mark.parametrize("case", PIPELINE_CASES, ids=lambda c: c.id)
def test_pipeline_refuses_cleanly(case, workspace):
    if case.id == "repo folder holds user files":
        (workspace / "opt-outlier-gated").mkdir()
        (workspace / "opt-outlier-gated" / "notes.txt").write_text("mine")
    assert_clean_refusal(pipeline_main, case, workspace)


def test_snapshot_sees_every_change(tmp_path):
    """The tree comparison behind every refusal test notices a new, removed or rewritten file."""
    (tmp_path / "a").write_text("1")
    before = snapshot(tmp_path)
    (tmp_path / "a").write_text("22")
    assert snapshot(tmp_path) != before
    (tmp_path / "b").mkdir()
    assert snapshot(tmp_path) != snapshot(tmp_path / "b")


def test_hub_eval_keeps_the_data_the_card_was_made_on(workspace, tmp_path):
    """No silent switch of evaluation data: the card's dataset, its Hub copy, or a clear refusal."""
    from hf_quantizable.hub.evaluate import recorded_dataset

    def results_on(dataset, config=None, split="validation"):
        quality = ResultRecord(**{**record(workspace / "gated", None).to_dict(), "task": "mlm", "metric": "perplexity"})
        quality.dataset, quality.dataset_config, quality.split = dataset, config, split
        write_results([quality], workspace / "gated" / "results.json")

    local = tmp_path / "heldout" / "validation.txt"
    local.parent.mkdir()
    local.write_text("some held-out text\n")
    results_on(str(local))
    assert recorded_dataset(workspace / "gated") == (str(local), None, "validation")
    results_on("/elsewhere/shared/data/wikitext-2", split="test")  # an offline copy that is not here
    assert recorded_dataset(workspace / "gated") == ("Salesforce/wikitext", "wikitext-2-v1", "test")
    results_on("/elsewhere/main-job/data/embedded-heldout/validation.txt")
    with pytest.raises(ValueError, match="not on this machine: pass --dataset"):
        recorded_dataset(workspace / "gated")
