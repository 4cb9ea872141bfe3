"""Safety of `train` and `retrofit`: bad input refused before anything is written, faults that lose no work.

The tables list bad inputs (each refused with exit code 2, one `error:` line naming the problem, no
traceback, and the workspace untouched). The fault tests kill a run while it writes a checkpoint,
truncate a checkpoint file, fill the disk, and check what `--resume` makes of the result; the last
ones check the saved tokenizer's length limit and the permissions of the outputs.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, Trainer

from hf_quantizable import retrofit, train
from hf_quantizable.training import apply_overrides, build_model, get_preset, list_presets
from hf_quantizable.training.data import train_tokenizer
from hf_quantizable.training.embedded import generate_corpus
from hf_quantizable.training.presets import validate_preset
from tests.cli_safety import BadInput, assert_clean_refusal, run_main

TINY = [
    "hidden_size=32",
    "num_attention_heads=2",
    "model.num_hidden_layers=1",
    "intermediate_size=64",
    "per_device_train_batch_size=8",
    "per_device_eval_batch_size=8",
    "warmup_steps=0",
    "logging_steps=2",
    "save_steps=2",
    "data.embedded_size=300",
    "data.vocab_size=300",
    "data.seq_length=32",
    "tracking.outlier_every_n_steps=0",
]
UMASK = 0o002  # not the usual 022, so a file that merely got a fixed mode does not pass


pytestmark = pytest.mark.usefixtures("one_thread")


def train_argv(output: Path, *extra: str) -> list[str]:
    return ["--preset", "bert-tiny-vanilla", "--output", str(output), "--no-progress", *TINY, *extra]


def local_data_argv(output: Path, dataset: Path) -> list[str]:
    """`train_argv` on a local dataset (without the embedded dataset's size, which it would ignore)."""
    argv = [a for a in train_argv(output) if not a.startswith("data.embedded_size")]
    return [*argv, "--dataset", str(dataset)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Inputs for the bad-input rows: good / empty / binary text, a plain file and a tiny stock BERT."""
    root = tmp_path_factory.mktemp("inputs")
    lines = generate_corpus(300)
    (root / "corpus.txt").write_text("\n".join(lines))
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (root / "a_file").write_text("not a folder")
    stock = root / "stock"
    BertModel(
        BertConfig(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(stock)
    train_tokenizer("bert", iter(lines), vocab_size=120).save_pretrained(stock)
    (root / "roberta").mkdir()
    (root / "roberta" / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    return root


@pytest.fixture
def workspace(inputs, tmp_path) -> Path:
    """A fresh copy of the inputs per test, so no row sees what another one wrote."""
    return Path(shutil.copytree(inputs, tmp_path / "workspace"))


TRAIN_CASES = [
    BadInput(
        "learning-rate-abc", lambda w: train_argv(w / "out", "learning_rate=abc"), r"learning_rate must be a number"
    ),
    BadInput(
        "batch-size-0", lambda w: train_argv(w / "out", "per_device_train_batch_size=0"), r"batch_size must be > 0"
    ),
    BadInput(
        "max-steps-flag-negative",
        lambda w: train_argv(w / "out", "--max-steps", "-5"),
        r"--max-steps: must be an integer >= 1",
    ),
    BadInput(
        "max-steps-flag-zero",
        lambda w: train_argv(w / "out", "--max-steps", "0"),
        r"--max-steps: must be an integer >= 1",
    ),
    BadInput("max-steps-field-zero", lambda w: train_argv(w / "out", "max_steps=0"), r"max_steps must be > 0"),
    BadInput(
        "dataset-missing",
        lambda w: local_data_argv(w / "out", w / "nope.txt"),
        r"--dataset .*nope\.txt does not exist",
    ),
    BadInput("dataset-empty", lambda w: local_data_argv(w / "out", w / "empty.txt"), r"empty\.txt is empty"),
    BadInput(
        "dataset-binary",
        lambda w: local_data_argv(w / "out", w / "binary.txt"),
        r"binary\.txt is binary",
    ),
    BadInput(
        "dataset-field-missing-path",
        lambda w: [*local_data_argv(w / "out", w / "corpus.txt")[:-2], f"data.dataset={w / 'missing_dir'}"],
        r"missing_dir.*does not exist",
    ),
    BadInput("attn-impl-bogus", lambda w: train_argv(w / "out", "model.attn_impl=bogus"), r"attn_impl.*must be one of"),
    BadInput(
        "seq-length-beyond-positions",
        lambda w: train_argv(w / "out", "data.seq_length=100000"),
        r"seq_length=100000 exceeds model\.max_position_embeddings=128",
    ),
    BadInput(
        "layers-0", lambda w: train_argv(w / "out", "model.num_hidden_layers=0"), r"num_hidden_layers must be > 0"
    ),
    BadInput("hidden-size-abc", lambda w: train_argv(w / "out", "hidden_size=abc"), r"'hidden_size' expected int"),
    BadInput("unknown-field", lambda w: train_argv(w / "out", "learning_rat=1e-3"), r"unknown override field"),
    BadInput(
        "scheduler-bogus", lambda w: train_argv(w / "out", "lr_scheduler_type=bogus"), r"not a valid SchedulerType"
    ),
    BadInput("fsdp", lambda w: train_argv(w / "out", "training.fsdp=full_shard"), r"FSDP is not supported: .*DDP"),
    BadInput("resume-nothing", lambda w: train_argv(w / "out", "--resume"), r"--resume: .*out holds no run to resume"),
    BadInput("output-is-a-file", lambda w: train_argv(w / "a_file"), r"--output .*a_file is a file"),
    BadInput(
        "output-under-a-file", lambda w: train_argv(w / "a_file" / "run"), r"--output .*lies under the file .*a_file"
    ),
    # Accepted and ignored before: now refused.
    BadInput(
        "image-field-on-text-model",
        lambda w: train_argv(w / "out", "data.image_size=64"),
        r"data\.image_size would be ignored",
    ),
    BadInput(
        "gate-field-on-vanilla",
        lambda w: train_argv(w / "out", "model.pi_init=0.3"),
        r"model\.pi_init would be ignored",
    ),
    BadInput(
        "w8a8-with-tracking-off",
        lambda w: train_argv(w / "out", "tracking.w8a8_every_n_steps=5"),
        r"w8a8_every_n_steps would be ignored: tracking is off",
    ),
    BadInput(
        "resume-from-checkpoint-field",
        lambda w: train_argv(w / "out", "resume_from_checkpoint=x"),
        r"resume_from_checkpoint would be ignored.*--resume",
    ),
    BadInput(
        "epochs-under-max-steps",
        lambda w: train_argv(w / "out", "num_train_epochs=3"),
        r"num_train_epochs would be ignored: training\.max_steps=500 takes precedence",
    ),
    BadInput(
        "save-steps-without-step-saving",
        lambda w: train_argv(w / "out", "save_strategy=epoch"),
        r"save_steps would be ignored: training\.save_strategy='epoch'",
    ),
    BadInput("show-with-output", lambda w: [*train_argv(w / "out"), "--show"], r"--show does not use --output"),
    BadInput(
        "list-presets-with-preset",
        lambda w: ["--list-presets", "--preset", "bert-tiny-gated"],
        r"--list-presets does not use --preset",
    ),
]


def test_every_preset_passes_validation():
    for name in list_presets():
        validate_preset(get_preset(name))  # the checks refuse bad values, never a shipped recipe


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: c.id)
def test_train_refuses_bad_input_before_writing(workspace, case):
    assert_clean_refusal(train.main, case, workspace)


def retrofit_argv(w: Path, *extra: str, model: str | None = None) -> list[str]:
    return [
        model or str(w / "stock"),
        "--output",
        str(w / "out"),
        "--dataset",
        str(w / "corpus.txt"),
        "--max-length",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--no-progress",
        *extra,
    ]


RETROFIT_CASES = [
    BadInput(
        "model-missing",
        lambda w: retrofit_argv(w, model=str(w / "no_such_model")),
        r"could not load the model .*no_such_model",
    ),
    BadInput(
        "model-not-bert", lambda w: retrofit_argv(w, model=str(w / "roberta")), r"supports BERT checkpoints.*roberta"
    ),
    BadInput("pi-init-0", lambda w: retrofit_argv(w, "--pi-init", "0"), r"pi_init.*\(0, 1\)"),
    BadInput(
        "max-steps-minus-1", lambda w: retrofit_argv(w, "--max-steps", "-1"), r"--max-steps: must be an integer >= 1"
    ),
    BadInput("max-steps-0", lambda w: retrofit_argv(w, "--max-steps", "0"), r"--max-steps: must be an integer >= 1"),
    BadInput("batch-size-0", lambda w: retrofit_argv(w, "--batch-size", "0"), r"--batch-size: must be an integer >= 1"),
    BadInput("learning-rate-abc", lambda w: retrofit_argv(w, "--learning-rate", "abc"), r"--learning-rate.*positive"),
    BadInput(
        "seq-length-beyond-positions",
        lambda w: retrofit_argv(w, "--max-length", "100000"),
        r"--max-length 100000 exceeds .*max_position_embeddings=64",
    ),
    BadInput(
        "dataset-missing",
        lambda w: retrofit_argv(w, "--dataset", str(w / "nope.txt")),
        r"--dataset .*nope\.txt does not exist",
    ),
    BadInput("dataset-empty", lambda w: retrofit_argv(w, "--dataset", str(w / "empty.txt")), r"empty\.txt is empty"),
    BadInput(
        "dataset-binary", lambda w: retrofit_argv(w, "--dataset", str(w / "binary.txt")), r"binary\.txt is binary"
    ),
    BadInput(
        "clip-gamma-positive",
        lambda w: retrofit_argv(w, "--attn-impl", "clipped_softmax", "--clip-gamma", "0.5"),
        r"clip_gamma.*<= 0",
    ),
    BadInput(
        "output-is-a-file",
        lambda w: [*retrofit_argv(w), "--output", str(w / "a_file")],
        r"--output .*a_file is a file",
    ),
    # Accepted and ignored before: now refused.
    BadInput(
        "pi-init-without-gates",
        lambda w: retrofit_argv(w, "--attn-impl", "softmax", "--pi-init", "0.3"),
        r"--pi-init is only used with --attn-impl gated",
    ),
    BadInput(
        "clip-gamma-with-gates",
        lambda w: retrofit_argv(w, "--clip-gamma", "-0.1"),
        r"--clip-gamma is only used with --attn-impl clipped_softmax",
    ),
    BadInput(
        "gate-learning-rate-without-gates",
        lambda w: retrofit_argv(w, "--attn-impl", "normalized_clipped_softmax", "--gate-learning-rate", "1e-3"),
        r"--gate-learning-rate is only used with --attn-impl gated",
    ),
    BadInput("unknown-flag", lambda w: retrofit_argv(w, "--epochs", "3"), r"unrecognized arguments: --epochs"),
]


@pytest.mark.parametrize("case", RETROFIT_CASES, ids=lambda c: c.id)
def test_retrofit_refuses_bad_input_before_writing(workspace, case):
    assert_clean_refusal(retrofit.main, case, workspace)


def test_unreachable_hub_dataset_is_a_one_line_error(workspace, monkeypatch):
    def offline(*args, **kwargs):
        if args and args[0] in ("text", "json", "csv", "imagefolder"):
            raise AssertionError("only the Hub is expected here")
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr("hf_quantizable.training.data.load_dataset", offline)
    case = BadInput(
        "hub-offline",
        lambda w: [*local_data_argv(w / "out", w / "corpus.txt")[:-2], "data.dataset=wikitext-2"],
        r"Hub dataset 'Salesforce/wikitext' .*needs the Hugging Face Hub.*--dataset FILE",
    )
    assert_clean_refusal(train.main, case, workspace)


def test_accelerate_fsdp_launch_is_refused(workspace, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    case = BadInput("accelerate-fsdp", lambda w: train_argv(w / "out"), r"--use_fsdp: FSDP is not supported")
    assert_clean_refusal(train.main, case, workspace)


def test_read_only_output_is_refused(workspace, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the access check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    try:
        case = BadInput("read-only", lambda _: train_argv(locked / "run"), r"--output .*locked.* is not writable")
        assert_clean_refusal(train.main, case, tmp_path)
        case = BadInput("read-only", lambda w: [*retrofit_argv(w), "--output", str(locked / "run")], r"is not writable")
        assert_clean_refusal(retrofit.main, case, workspace)
    finally:
        locked.chmod(0o755)


def test_the_optimizer_field_reaches_the_trainer(tmp_path):
    from hf_quantizable.training import build_run

    preset = apply_overrides(get_preset("bert-tiny-vanilla"), [*TINY, "optimizer=muon"])
    run = build_run(preset, tmp_path / "run", training_overrides={"disable_tqdm": True})
    assert run.trainer.optimizer_name == "muon"


# --- faults: kills, truncated files, a full disk ---


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 4-step run under umask 002 (checkpoints at steps 2 and 4, then the final model)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    previous = os.umask(UMASK)
    try:
        code, _, err = run_main(train.main, train_argv(out, "--max-steps", "4"))
    finally:
        os.umask(previous)
    assert code == 0, err
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


KILL_DURING_SAVE = """
import os, signal, sys
from transformers import Trainer
from hf_quantizable.train import main

save_rng_state = Trainer._save_rng_state

def killed_at_step_4(self, output_dir):  # model and optimizer are on disk, RNG and trainer state are not
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(self, output_dir)

Trainer._save_rng_state = killed_at_step_4
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_resumes_from_the_newest_complete_one(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, *train_argv(out, "--max-steps", "6")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]  # no half checkpoint-4

    code, _, err = run_main(train.main, train_argv(out, "--max-steps", "6", "--resume"))
    assert code == 0, err
    assert f"resuming from {checkpoints / 'checkpoint-2'}, the newest complete checkpoint" in err
    state = json.loads((checkpoints / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert not list(checkpoints.glob(".*"))  # the killed attempt's staging folder is gone


def test_truncated_optimizer_state_is_skipped_or_refused(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    checkpoints = run / "checkpoints"
    for step in (2, 4):
        optimizer = checkpoints / f"checkpoint-{step}" / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:100])
    case = BadInput(
        "truncated-optimizer",
        lambda _: train_argv(run, "--max-steps", "6", "--resume"),
        r"no complete checkpoint.*checkpoint-4/optimizer\.pt is truncated",
    )
    assert_clean_refusal(train.main, case, run)

    shutil.copy(finished_run / "checkpoints" / "checkpoint-2" / "optimizer.pt", checkpoints / "checkpoint-2")
    code, _, err = run_main(train.main, train_argv(run, "--max-steps", "6", "--resume"))
    assert code == 0, err
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in err
    assert "skipped checkpoint-4: " in err and "optimizer.pt is truncated" in err


def test_a_checkpoint_left_half_written_in_place_is_skipped(finished_run, tmp_path):
    """What a kill during the in-place save of earlier versions left: weights and half the optimizer state."""
    run = copy_run(finished_run, tmp_path)
    checkpoints = run / "checkpoints"
    (checkpoints / "checkpoint-4" / "checkpoint_complete.json").unlink()  # saved in place, but completely
    half = checkpoints / "checkpoint-6"
    half.mkdir()
    shutil.copy(checkpoints / "checkpoint-4" / "model.safetensors", half)
    (half / "optimizer.pt").write_bytes((checkpoints / "checkpoint-4" / "optimizer.pt").read_bytes()[:100])
    code, _, err = run_main(train.main, train_argv(run, "--max-steps", "6", "--resume"))
    assert code == 0, err
    assert f"resuming from {checkpoints / 'checkpoint-4'}, the newest complete checkpoint" in err
    assert "skipped checkpoint-6: " in err and "trainer_state.json is missing" in err
    assert json.loads((half / "trainer_state.json").read_text())["global_step"] == 6  # replaced by a complete one


def test_full_disk_during_a_checkpoint_is_a_one_line_error(tmp_path, monkeypatch):
    save = Trainer._save_optimizer_and_scheduler

    def disk_full_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            path = Path(output_dir) / "optimizer.pt"
            path.write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_full_at_step_4)
    out = tmp_path / "run"
    code, _, err = run_main(train.main, train_argv(out, "--max-steps", "6"))
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert "rerun with --resume (it continues from checkpoint-2" in errors[0]
    checkpoints = out / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-2"]  # no half checkpoint-4, no staging folder


# --- what the outputs declare and how they are written ---


def test_saved_tokenizer_declares_the_models_position_limit(finished_run):
    tokenizer = AutoTokenizer.from_pretrained(finished_run)
    config = json.loads((finished_run / "config.json").read_text())
    assert tokenizer.model_max_length == config["max_position_embeddings"] == 128
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(finished_run).eval()
    inputs = tokenizer(" ".join(generate_corpus(60)), truncation=True, return_tensors="pt")
    assert inputs["input_ids"].shape[1] == 128
    with torch.no_grad():
        model(**inputs)  # a long input truncated by the tokenizer fits the model


def test_opt_tokenizer_limit_counts_the_positions_the_model_reads():
    preset = apply_overrides(get_preset("opt-tiny-vanilla"), ["model.max_position_embeddings=48", "data.seq_length=32"])
    tokenizer = train_tokenizer("opt", iter(generate_corpus(200)), vocab_size=300)
    model = build_model(preset, tokenizer).eval()
    assert tokenizer.model_max_length == 48
    inputs = tokenizer(" ".join(generate_corpus(60)), truncation=True, return_tensors="pt")
    assert inputs["input_ids"].shape[1] == 48
    with torch.no_grad():
        model(**inputs)


def assert_umask_modes(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~UMASK
        assert path.stat().st_mode & 0o777 == expected, f"{path}: {oct(path.stat().st_mode & 0o777)}"


def test_train_outputs_follow_the_umask(finished_run):
    assert_umask_modes(finished_run)  # model.safetensors included (safetensors writes 0600)


def test_retrofit_output_follows_the_umask_and_the_models_limit(workspace, tmp_path):
    out = tmp_path / "gated"
    previous = os.umask(UMASK)
    try:
        code, _, err = run_main(retrofit.main, [*retrofit_argv(workspace), "--output", str(out)])
    finally:
        os.umask(previous)
    assert code == 0, err
    assert_umask_modes(out)
    assert AutoTokenizer.from_pretrained(out).model_max_length == 64
