"""`python -m hf_quantizable.quantize` and INT8 loading under bad input and faults.

Bad input is refused on one `error:` line with nothing written or removed (`tests/cli_safety.py`);
the output folder never replaces what the quantizer did not write; an interrupted run leaves no
partial output; INT8 checkpoints that would load silently wrong are refused; fp16 loading keeps the
quantization parameters in float32.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertTokenizerFast

from hf_quantizable.modeling import int8_kernel
from hf_quantizable.modeling.int8 import Int8ActivationQuantizer, Int8Linear
from hf_quantizable.provenance import model_fingerprint
from hf_quantizable.quantization import W8A8Config, W8A8Quantizer
from hf_quantizable.quantize import main, max_length_for
from tests.cli_safety import BadInput, assert_clean_refusal, run_main, snapshot
from tests.test_quant_core import tiny_model

REPO = Path(__file__).resolve().parents[1]
QUERY = "bert.encoder.layer.0.attention.self.query"
PROBS = "bert.encoder.layer.0.attention.self.core.probs_quant"
DEAD_PID = 4_194_305  # above Linux's largest pid_max: never a running process


def write_model(folder: Path) -> Path:
    """A tiny FP BERT folder with its tokenizer and a calibration text."""
    model, _ = tiny_model("bert")
    model.save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def write_calibration(path: Path) -> Path:
    path.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 45}" for j in range(12)) for i in range(40)) + "\n")
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A workspace: `model/` (FP), `calib.txt`, `int8/` (an INT8 output of the command)."""
    root = tmp_path_factory.mktemp("template")
    write_model(root / "model")
    write_calibration(root / "calib.txt")
    assert main(quantize_args(root, root / "int8")) == 0
    return root


@pytest.fixture
def workspace(template, tmp_path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(template, root)
    return root


def quantize_args(ws: Path, output: Path, *extra: str) -> list[str]:
    calib = ["--dataset", str(ws / "calib.txt"), "--num-calibration-batches", "2", "--batch-size", "4"]
    return [str(ws / "model"), "--output", str(output), *calib, *extra]


def _file(ws: Path, name: str, content: bytes | str) -> Path:
    path = ws / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _model_copy(ws: Path, name: str, edit) -> Path:
    folder = ws / name
    shutil.copytree(ws / "model", folder)
    edit(folder)
    return folder


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _pickle_only(folder: Path) -> None:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _with_config(name: str, content: bytes | str):
    return lambda ws: quantize_args(ws, ws / "out", "--config", str(_file(ws, name, content)))


def _with_model(name: str, edit):
    def argv(ws: Path) -> list[str]:
        return [str(_model_copy(ws, name, edit)), *quantize_args(ws, ws / "out")[1:]]

    return argv


def _vanilla(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attn_impl": "softmax"}))


def _foreign_output(ws: Path) -> Path:
    (ws / "mine").mkdir()
    (ws / "mine" / "notes.txt").write_text("my notes")
    return ws / "mine"


def _int8_plus_user_file(ws: Path) -> Path:
    (ws / "int8" / "README.md").write_text("my card")
    return ws / "int8"


BAD_INPUTS = [
    BadInput("max-length-negative", lambda ws: quantize_args(ws, ws / "out", "--max-length", "-1"),
             r"--max-length: must be an integer >= 1, got '-1'"),
    BadInput("max-length-beyond-positions", lambda ws: quantize_args(ws, ws / "out", "--max-length", "4096"),
             r"--max-length 4096 exceeds the model's max_position_embeddings \(512\)"),
    BadInput("batch-size-zero", lambda ws: quantize_args(ws, ws / "out", "--batch-size", "0"),
             r"--batch-size: must be an integer >= 1, got '0'"),
    BadInput("num-batches-text", lambda ws: quantize_args(ws, ws / "out", "--num-calibration-batches", "many"),
             r"--num-calibration-batches: must be an integer >= 1, got 'many'"),
    BadInput("unknown-flag", lambda ws: quantize_args(ws, ws / "out", "--bitz", "8"), r"unrecognized arguments: --bitz"),
    BadInput("estimator", lambda ws: quantize_args(ws, ws / "out", "--activation-estimator", "max"),
             r"`activation_estimator` must be one of .*running_minmax"),
    BadInput("gated-context-value", lambda ws: quantize_args(ws, ws / "out", "--gated-context", "inside"),
             r"`gated_context` must be one of \('after_gate', 'before_gate'\), got 'inside'"),
    BadInput("gated-context-without-gate",
             lambda ws: [*_with_model("vanilla", _vanilla)(ws), "--gated-context", "before_gate"],
             r"--gated-context is read only by gated-attention models; .*vanilla has attn_impl='softmax'"),
    BadInput("config-json-list", _with_config("list.json", "[8, 8]"),
             r"list\.json must hold a JSON object of W8A8Config fields, not a list"),
    BadInput("config-garbage", _with_config("garbage.json", "weight_bits: 8"), r"garbage\.json is not valid JSON"),
    BadInput("config-binary", _with_config("binary.json", bytes(range(256))), r"binary\.json is not valid JSON"),
    BadInput("config-missing", lambda ws: quantize_args(ws, ws / "out", "--config", str(ws / "none.json")),
             r"--config file .*none\.json does not exist"),
    BadInput("config-unknown-field", _with_config("unknown.json", '{"bitz": 8}'), r"unknown W8A8Config field.*bitz"),
    BadInput("config-wrong-type", _with_config("type.json", '{"momentum": "high"}'),
             r"`momentum` must be a number, got 'high'"),
    BadInput("config-flag-type", _with_config("flag.json", '{"per_channel_weights": "yes"}'),
             r"`per_channel_weights` must be true or false"),
    BadInput("model-config-garbage", _with_model("garbage", lambda f: (f / "config.json").write_text("{oops")),
             r"garbage/config\.json is not valid JSON"),
    BadInput("model-config-list", _with_model("listcfg", lambda f: (f / "config.json").write_text("[]")),
             r"listcfg/config\.json must hold a JSON object, not a list"),
    BadInput("model-missing", lambda ws: [str(ws / "nothing"), *quantize_args(ws, ws / "out")[1:]],
             r"no model at .*nothing"),
    BadInput("weights-truncated", _with_model("trunc", _truncate),
             r"trunc/model\.safetensors is not a readable safetensors file"),
    BadInput("weights-pickle-only", _with_model("pickle", _pickle_only),
             r"pickle/? holds only pickle weights \(pytorch_model\.bin\)"),
    BadInput("weights-none", _with_model("empty", lambda f: (f / "model.safetensors").unlink()),
             r"no weights in .*empty: no \*\.safetensors file"),
    BadInput("model-without-tokenizer",
             _with_model("notok", lambda f: [p.unlink() for p in f.glob("*") if p.suffix in (".txt", ".json")
                                             and p.name != "config.json"]),
             r"cannot load the tokenizer of .*notok"),
    BadInput("calibration-binary",
             lambda ws: [*quantize_args(ws, ws / "out"), "--dataset", str(_file(ws, "bin.txt", bytes(range(256))))],
             r"bin\.txt is not UTF-8 text"),
    BadInput("calibration-folder", lambda ws: [*quantize_args(ws, ws / "out"), "--dataset", str(ws / "model")],
             r"calibration data .*model is a folder"),
    BadInput("percentile-without-its-estimator", lambda ws: quantize_args(ws, ws / "out", "--percentile", "99.9"),
             r"`percentile` is read only by the `percentile` activation estimator"),
    BadInput("momentum-with-mse", lambda ws: [*_with_config("m.json", '{"momentum": 0.5}')(ws), "--activation-estimator", "mse"],
             r"`momentum` is read only by the `running_minmax` activation estimator, not by 'mse'"),
    BadInput("clipping-without-clipping", _with_config("clip.json", '{"clipping_steps": 5}'),
             r"`clipping_steps` are read only with --token-wise-clipping"),
    BadInput("bits-overridden", lambda ws: quantize_args(ws, ws / "out", "--bits", "6", "--weight-bits", "8",
                                                        "--activation-bits", "8"),
             r"--bits would be ignored"),
    BadInput("output-is-input", lambda ws: quantize_args(ws, ws / "model"), r"output folder .*model is the input .*model: choose another folder"),
    BadInput("output-is-parent", lambda ws: quantize_args(ws, ws), r"output folder .*ws contains the input .*model"),
    BadInput("output-is-parent-overwrite", lambda ws: quantize_args(ws, ws, "--overwrite"),
             r"contains the input"),
    BadInput("output-foreign", lambda ws: quantize_args(ws, _foreign_output(ws)),
             r"mine is not empty and is not an INT8 checkpoint written by hf_quantizable\.quantize"),
    BadInput("output-foreign-overwrite", lambda ws: quantize_args(ws, _foreign_output(ws), "--overwrite"),
             r"mine is not empty and is not an INT8 checkpoint"),
    BadInput("output-previous-int8", lambda ws: quantize_args(ws, ws / "int8"),
             r"int8 already holds an INT8 checkpoint written by hf_quantizable\.quantize: pass --overwrite"),
    BadInput("output-int8-with-user-file", lambda ws: quantize_args(ws, _int8_plus_user_file(ws), "--overwrite"),
             r"int8 is not empty and is not an INT8 checkpoint"),
    BadInput("output-is-file", lambda ws: quantize_args(ws, ws / "calib.txt"), r"calib\.txt exists and is not a folder"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.id for case in BAD_INPUTS])
def test_bad_input_is_refused_cleanly(case, workspace):
    argv = case.argv(workspace)  # builds its files first: the tree is compared from here on
    line = assert_clean_refusal(main, BadInput(case.id, lambda _: argv, case.message), workspace)
    _, _, err = run_main(main, argv)
    assert err.strip() == line, f"more than the error line on stderr:\n{err}"


def test_max_length_is_refused_for_vit():
    args = Namespace(max_length=64)
    with pytest.raises(ValueError, match="--max-length applies to text models only"):
        max_length_for(args, {"image_size": 16}, "quantizable_vit")
    assert max_length_for(Namespace(max_length=None), {"image_size": 16}, "quantizable_vit") is None
    assert max_length_for(Namespace(max_length=None), {"max_position_embeddings": 64}, "quantizable_bert") == 64


def _tree_without(root: Path, skip: Path) -> dict:
    return {k: v for k, v in snapshot(root).items() if not (root / k).is_relative_to(skip)}


def test_overwrite_replaces_only_a_previous_output(workspace):
    out = workspace / "int8"
    before = json.loads((out / "config.json").read_text())["w8a8_config"]
    others = _tree_without(workspace, out)
    assert main(quantize_args(workspace, out, "--num-calibration-batches", "1", "--overwrite")) == 0
    after = json.loads((out / "config.json").read_text())["w8a8_config"]
    assert (before["num_calibration_batches"], after["num_calibration_batches"]) == (2, 1)
    assert sorted(p.name for p in out.iterdir()) == after["files"]
    assert _tree_without(workspace, out) == others  # the model and everything else untouched
    assert [p.name for p in workspace.iterdir() if p.name.startswith(".")] == []


def test_output_inside_the_model_folder_leaves_the_model_intact(workspace):
    """Allowed (nothing of the model is replaced); the checkpoint names the model as its source."""
    model = workspace / "model"
    fingerprint, files = model_fingerprint(model), snapshot(model)
    assert main(quantize_args(workspace, model / "w8a8")) == 0
    assert model_fingerprint(model) == fingerprint
    assert {k: v for k, v in snapshot(model).items() if not k.startswith(("w8a8", ".w8a8"))} == files
    settings = json.loads((model / "w8a8" / "config.json").read_text())["w8a8_config"]
    assert settings["source_fingerprint"] == fingerprint


def test_empty_output_folder_is_used_and_the_output_lists_its_files(workspace):
    (workspace / "new").mkdir()
    assert main(quantize_args(workspace, workspace / "new")) == 0
    settings = json.loads((workspace / "new" / "config.json").read_text())["w8a8_config"]
    assert settings["files"] == sorted(p.name for p in (workspace / "new").iterdir())
    assert {"config.json", "model.safetensors", "int8.py", "tokenizer.json"} <= set(settings["files"])


def test_output_gets_the_usual_permissions(workspace):
    umask = os.umask(0o022)
    try:
        assert main(quantize_args(workspace, workspace / "out")) == 0
    finally:
        os.umask(umask)
    assert (workspace / "out").stat().st_mode & 0o777 == 0o755  # not the temporary folder's 0700
    assert (workspace / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_stale_temp_folders_are_removed_live_ones_kept(workspace):
    stale = workspace / f".out.tmp-{DEAD_PID}-abc"
    stale_old = workspace / f".out.old-{DEAD_PID}-abc"
    legacy = workspace / ".out.tmp-4t7n54tw"  # the name earlier versions gave it (no process id)
    live = workspace / f".out.tmp-{os.getpid()}-xyz"
    for folder in (stale, stale_old, legacy, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    assert main(quantize_args(workspace, workspace / "out")) == 0
    assert not stale.exists() and not stale_old.exists() and not legacy.exists()
    assert live.exists()  # a running writer's folder is not touched


def test_source_fingerprint_is_recorded(workspace, template):
    settings = json.loads((template / "int8" / "config.json").read_text())["w8a8_config"]
    assert settings["source_fingerprint"] == model_fingerprint(template / "model")
    model, batches = tiny_model("bert")
    out = W8A8Quantizer(model).quantize(workspace / "obj", W8A8Config(num_calibration_batches=1), batches)
    assert json.loads((out / "config.json").read_text())["w8a8_config"]["source_fingerprint"] is None


# --- W8A8Quantizer.quantize(save_dir): the same rules, checked before calibrating -------------------


class _Batches:
    """Calibration batches that record whether anything read them."""

    def __init__(self, batches):
        self.batches, self.read = batches, False

    def __iter__(self):
        self.read = True
        return iter(self.batches)


@pytest.mark.parametrize(
    ("target", "overwrite", "message"),
    [
        (lambda ws: _foreign_output(ws), False, "is not empty and is not an INT8 checkpoint"),
        (lambda ws: _foreign_output(ws), True, "is not empty and is not an INT8 checkpoint"),
        (lambda ws: ws / "int8", False, "already holds an INT8 checkpoint"),
        (lambda ws: _int8_plus_user_file(ws), True, "is not empty and is not an INT8 checkpoint"),
        (lambda ws: ws / "model", True, "is the input"),
        (lambda ws: ws, True, "contains the input .*model"),
    ],
    ids=["foreign", "foreign-overwrite", "previous-int8", "int8-with-user-file", "input", "parent"],
)
def test_quantizer_refuses_outputs_it_did_not_write(workspace, target, overwrite, message):
    quantizer = W8A8Quantizer.from_pretrained(workspace / "model")
    save_dir = target(workspace)
    before = snapshot(workspace)
    batches = _Batches(tiny_model("bert")[1])
    with pytest.raises(ValueError, match=message):
        quantizer.quantize(save_dir, W8A8Config(num_calibration_batches=1), batches, overwrite=overwrite)
    assert snapshot(workspace) == before
    assert not batches.read  # refused before calibrating


def test_quantizer_overwrite_replaces_its_previous_output(workspace):
    model, batches = tiny_model("bert")
    out = workspace / "int8"
    W8A8Quantizer(model).quantize(out, W8A8Config(num_calibration_batches=1), batches, overwrite=True)
    settings = json.loads((out / "config.json").read_text())["w8a8_config"]
    assert settings["num_calibration_batches"] == 1 and "tokenizer.json" not in settings["files"]
    assert not (out / "tokenizer.json").exists()  # the previous output's files went with it


# --- faults: kill and Ctrl-C while the checkpoint is written ---------------------------------------

# The command, with a pause once the INT8 weights are written (into the temporary folder).
_SLOW_WRITE = """
import signal, sys, time
from transformers import PreTrainedModel

# Ctrl-C as in a terminal, also where the test runs in a background job (which starts with SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
from hf_quantizable.quantize import main

write = PreTrainedModel.save_pretrained

def slow_write(self, *args, **kwargs):
    write(self, *args, **kwargs)
    print("WRITTEN", flush=True)
    time.sleep(60)

PreTrainedModel.save_pretrained = slow_write
sys.exit(main(sys.argv[1:]))
"""


def _start_slow_quantize(ws: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SLOW_WRITE), *quantize_args(ws, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    for line in process.stdout:  # wait until the checkpoint is written to its temporary folder
        if line.startswith("WRITTEN"):
            return process
    process.wait()
    pytest.fail(f"quantize ended before writing (exit {process.returncode}):\n{process.stderr.read()}")


def test_kill_during_write_leaves_no_output_and_the_next_run_succeeds(workspace):
    out = workspace / "out"
    process = _start_slow_quantize(workspace, out)
    process.kill()
    process.wait(timeout=30)
    assert not out.exists()
    assert list(workspace.glob(".out.tmp-*"))  # the partial write stayed in its temporary folder
    assert main(quantize_args(workspace, out)) == 0
    assert not list(workspace.glob(".out.*"))
    AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)


def test_ctrl_c_during_write_exits_130_and_leaves_nothing(workspace):
    out = workspace / "out"
    process = _start_slow_quantize(workspace, out)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # progress bars aside
    assert process.returncode == 130
    assert lines == [f"error: interrupted; nothing was written to {out}"], err
    assert not out.exists() and not list(workspace.glob(".out.*"))


# --- INT8 checkpoints that would load silently wrong ------------------------------------------------


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_w8a8_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["w8a8_config"])
    (folder / "config.json").write_text(json.dumps(config))


def _set(name, value):
    return lambda tensors: tensors[name].fill_(value)


CORRUPTIONS = {
    "zero-activation-scale": (lambda f: _edit_tensors(f, _set(f"{PROBS}.scale", 0.0)), rf"{PROBS}\.scale holds 0\.0"),
    "nan-weight-scale": (lambda f: _edit_tensors(f, _set(f"{QUERY}.weight_scale", float("nan"))),
                         rf"{QUERY}\.weight_scale holds nan"),
    "inf-input-scale": (lambda f: _edit_tensors(f, _set(f"{QUERY}.input_scale", float("inf"))),
                        rf"{QUERY}\.input_scale holds inf"),
    "zero-point-off-grid": (lambda f: _edit_tensors(f, _set(f"{PROBS}.zero_point", 300.0)),
                            rf"{PROBS}\.zero_point holds 300\.0: zero points must be integers in \[0, 255\]"),
    "missing-tensor": (lambda f: _edit_tensors(f, lambda t: t.pop(f"{QUERY}.input_scale")),
                       rf"lacks the tensor {QUERY}\.input_scale"),
    "linear-missing-from-config": (
        lambda f: _edit_w8a8_config(f, lambda c: c["quantized_linears"].pop("encoder.layer.0.attention.self.query")),
        rf"holds {QUERY}\.\w+, but w8a8_config does not list the module {QUERY} as quantized",
    ),
    "unknown-linear-in-config": (
        lambda f: _edit_w8a8_config(f, lambda c: c["quantized_linears"].update({"encoder.layer.7.nothing": True})),
        r"w8a8_config\['quantized_linears'\] names 1 module\(s\) .*'encoder\.layer\.7\.nothing'",
    ),
    "unknown-activation-in-config": (
        lambda f: _edit_w8a8_config(f, lambda c: c["quantized_activations"].append("encoder.ghost_quant")),
        r"w8a8_config\['quantized_activations'\] names .*'encoder\.ghost_quant'",
    ),
    "truncated-weights": (_truncate, r"a weight file is not readable safetensors"),
}  # fmt: skip


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("remote_code", [False, True], ids=["registered", "remote-code"])
def test_corrupt_int8_checkpoint_is_refused_on_load(workspace, corruption, remote_code):
    edit, message = CORRUPTIONS[corruption]
    folder = workspace / "int8"
    edit(folder)
    with pytest.raises(ValueError, match=message):
        AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=remote_code)


# --- fp16 loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "dtype", "remote_code"),
    [("bert", torch.float16, False), ("bert", torch.float16, True), ("opt", torch.bfloat16, False)],
    ids=["bert-fp16", "bert-fp16-remote-code", "opt-bf16"],
)
def test_half_precision_load_keeps_quantization_parameters_fp32(workspace, family, dtype, remote_code):
    model, batches = tiny_model(family)
    config = W8A8Config(num_calibration_batches=2, per_channel_residuals=True, outlier_channels=2)
    out = W8A8Quantizer(model).quantize(workspace / "half", config, batches)
    auto = AutoModelForCausalLM if family == "opt" else AutoModelForMaskedLM
    fp32, info = auto.from_pretrained(out, trust_remote_code=remote_code, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    half = auto.from_pretrained(out, trust_remote_code=remote_code, dtype=dtype).eval()
    assert half.get_input_embeddings().weight.dtype == dtype
    pairs = [
        (a, b)
        for a, b in zip(fp32.modules(), half.modules())
        if type(a).__name__ in ("Int8Linear", "Int8ActivationQuantizer")
    ]
    assert pairs
    for expected, loaded in pairs:
        for (name, a), (_, b) in zip(expected.named_buffers(), loaded.named_buffers()):
            assert b.dtype == (torch.float32 if a.is_floating_point() else a.dtype), (type(loaded).__name__, name)
            assert torch.equal(a, b), name
    with torch.no_grad():
        for batch in batches:
            reference = fp32(**batch).logits
            logits = half(**batch).logits
            assert logits.dtype == dtype and torch.isfinite(logits).all()
            assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


# --- C++ shipped with a checkpoint is compiled only with consent ------------------------------------


@pytest.fixture
def kernel_would_compile(monkeypatch):
    """Pretend the CPU's int8 GEMM saturates (where `auto` runs the kernel) and the ops are not yet
    registered; record the source files a build would compile."""
    import torch.utils.cpp_extension

    compiled = []
    monkeypatch.setattr(int8_kernel, "_PAIRS_SATURATE", [True])
    monkeypatch.setattr(int8_kernel, "cpu_has_avx2", lambda: True)
    monkeypatch.setattr(int8_kernel, "ops_registered", lambda: False)
    monkeypatch.setattr(int8_kernel, "_BUILDS", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda sources, **kwargs: compiled.extend(sources))
    return compiled


def _int8_forward(folder: Path, **kwargs) -> None:
    model = AutoModelForMaskedLM.from_pretrained(folder, **kwargs)
    with torch.no_grad():
        model(input_ids=torch.tensor([[2, 7, 8, 3]]))


def test_onednn_switches_never_compile_the_kernel(template, monkeypatch, kernel_would_compile):
    monkeypatch.delenv("HF_QUANTIZABLE_INT8_KERNEL", raising=False)
    _int8_forward(template / "int8")
    # The default asks for it on such a CPU: the installed package's own source, never the checkpoint's.
    assert kernel_would_compile == [str(int8_kernel.package_kernel_source())]
    kernel_would_compile.clear()
    monkeypatch.setattr(int8_kernel, "_BUILDS", {})
    _int8_forward(template / "int8", int8_kernel="onednn")
    _int8_forward(template / "int8", int8_kernel="onednn", dtype=torch.float16)
    assert not kernel_would_compile
    monkeypatch.setenv("HF_QUANTIZABLE_INT8_KERNEL", "onednn")
    _int8_forward(template / "int8")
    assert not kernel_would_compile


def test_checkpoint_kernel_source_is_compiled_only_when_asked(template, monkeypatch, kernel_would_compile):
    """Without the package, `auto` runs oneDNN; `int8_kernel="avx2"` (or the environment's `avx2`) is
    the consent to build the `int8_avx2.cpp` the checkpoint ships."""
    folder = template / "int8"
    assert (folder / int8_kernel.SOURCE_FILE).read_bytes() == int8_kernel.package_kernel_source().read_bytes()
    monkeypatch.setattr(int8_kernel, "package_kernel_source", lambda: None)
    monkeypatch.delenv("HF_QUANTIZABLE_INT8_KERNEL", raising=False)
    _int8_forward(folder)
    assert kernel_would_compile == []
    _int8_forward(folder, int8_kernel="avx2")
    assert kernel_would_compile == [str((folder / int8_kernel.SOURCE_FILE).resolve())]
    kernel_would_compile.clear()
    monkeypatch.setattr(int8_kernel, "_BUILDS", {})
    monkeypatch.setenv("HF_QUANTIZABLE_INT8_KERNEL", "avx2")
    _int8_forward(folder)
    assert kernel_would_compile == [str((folder / int8_kernel.SOURCE_FILE).resolve())]


def test_int8_kernel_argument_is_validated(template, tmp_path):
    with pytest.raises(ValueError, match=r"int8_kernel='cuda' is not supported; allowed values: auto, avx2, onednn"):
        AutoModelForMaskedLM.from_pretrained(template / "int8", int8_kernel="cuda")
    with pytest.raises(ValueError, match="applies to INT8 checkpoints only"):
        AutoModelForMaskedLM.from_pretrained(template / "model", int8_kernel="onednn")
    model = AutoModelForMaskedLM.from_pretrained(template / "int8", int8_kernel="onednn")
    assert all(
        m.kernel_choice == "onednn" for m in model.modules() if isinstance(m, (Int8Linear, Int8ActivationQuantizer))
    )
