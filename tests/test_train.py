"""Training: presets, Trainer subclasses, LN-gamma decay, outlier tracking, resume, Hub-ready output."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from hf_quantizable import families
from hf_quantizable.modeling.attention import AttentionGate
from hf_quantizable.train import main
from hf_quantizable.training import (
    apply_overrides,
    build_model,
    build_run,
    get_preset,
    list_presets,
)
from hf_quantizable.training.callbacks import TRACKING_FILE, probe_quality
from hf_quantizable.training.presets import PRESETS
from tests.isolation import run_without_package

# Small enough for 2 shared CPU cores: one layer of width 32, a few hundred lines of embedded data.
TINY = [
    "hidden_size=32",
    "num_attention_heads=2",
    "per_device_train_batch_size=8",
    "per_device_eval_batch_size=8",
    "learning_rate=3e-3",
    "warmup_steps=0",
    "logging_steps=5",
    "data.embedded_size=600",
    "tracking.outlier_every_n_steps=0",
]
TINY_TEXT = ["data.vocab_size=400", "data.seq_length=32"]
TINY_FAMILY = {
    "bert": ["model.num_hidden_layers=1", "intermediate_size=64", *TINY_TEXT],
    "opt": ["model.num_hidden_layers=1", "ffn_dim=64", "word_embed_proj_dim=32", *TINY_TEXT],
    "vit": [
        "model.num_hidden_layers=1",
        "hidden_size=64",
        "num_attention_heads=4",
        "intermediate_size=64",
        "learning_rate=2e-3",
        "per_device_train_batch_size=16",
        "data.image_size=16",
        "data.embedded_size=400",
        "data.eval_fraction=0.1",
        "data.augmentation=none",
    ],
}
STEPS = {"bert": 15, "opt": 15, "vit": 40}
NO_PROGRESS = {"disable_tqdm": True}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, *extra: str):
    family = get_preset(name).family
    return apply_overrides(get_preset(name), TINY + TINY_FAMILY[family] + list(extra))


def test_every_preset_builds_a_valid_config():
    assert {"bert-base-gated", "opt-125m-vanilla", "vit-s16-clipped", "bert-6l-gated", "opt-6l-gated"} <= set(PRESETS)
    assert {"bert-tiny-vanilla", "bert-tiny-clipped", "bert-tiny-gated", "opt-tiny-gated", "vit-tiny-gated"} <= set(
        PRESETS
    )
    for name in list_presets():
        preset = get_preset(name)
        config = families.config_class(preset.family)(**preset.model)
        variant = name.rsplit("-", 1)[1]
        assert (
            config.attn_impl
            == {
                "vanilla": "softmax",
                "clipped": "clipped_softmax",
                "gated": "gated",
                "normalized_clipped": "normalized_clipped_softmax",
            }[variant]
        )


def test_paper_recipes():
    bert = get_preset("bert-base-clipped")
    expected = {
        "learning_rate": 1e-4, "warmup_steps": 10_000, "max_steps": 1_000_000, "per_device_train_batch_size": 256,
        "weight_decay": 0.01, "max_grad_norm": 1.0, "fp16": True,
    }  # fmt: skip
    assert {k: bert.training[k] for k in expected} == expected
    assert (bert.data.seq_length, bert.data.mlm_probability, bert.model["hidden_dropout_prob"]) == (128, 0.15, 0.1)
    assert bert.model["clip_gamma"] == -0.025
    opt = get_preset("opt-125m-gated")
    assert (opt.training["adam_beta1"], opt.training["adam_beta2"], opt.training["learning_rate"]) == (0.9, 0.95, 4e-4)
    effective = opt.training["per_device_train_batch_size"] * opt.training["gradient_accumulation_steps"]
    assert (effective, opt.training["max_steps"], opt.training["warmup_steps"], opt.training["weight_decay"]) == (
        192,
        125_000,
        2000,
        0.1,
    )
    assert (opt.model["init_std"], opt.model["wd_ln_gamma"], opt.data.seq_length, opt.model["pi_init"]) == (
        0.006,
        True,
        512,
        0.25,
    )
    assert get_preset("bert-6l-vanilla").model["num_hidden_layers"] == 6
    # run_clm.py's attention modules keep nn.Linear's init; the tiny CPU presets use OPT's
    assert opt.model["attention_init"] == "torch_default"
    assert get_preset("opt-tiny-gated").model.get("attention_init", "opt") == "opt"
    opt_350m = get_preset("opt-350m-vanilla")  # scripts/opt_350m_vanilla.sh + model_configs/opt-350m.yaml
    steps = opt_350m.training
    assert (opt_350m.model["hidden_size"], opt_350m.model["num_hidden_layers"], opt_350m.model["ffn_dim"]) == (
        1024,
        24,
        4096,
    )
    assert (steps["per_device_train_batch_size"] * steps["gradient_accumulation_steps"], steps["max_steps"]) == (
        264,
        100_000,
    )
    assert opt_350m.model["wd_ln_gamma"] is False


def test_liao_monz_recipes():
    """Liao & Monz 2024, Appendix A, written out: BERT sizes and recipe, OPT as Bondarenko et al., NCS values."""
    sizes = {"small": (512, 6, 8, 2048), "base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}
    for size, shape in sizes.items():
        preset = get_preset(f"liao-bert-{size}-normalized_clipped")
        model, training = preset.model, preset.training
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        assert tuple(model[k] for k in keys) == shape
        assert (model["attn_impl"], model["ncs_zeta"], model["ncs_beta"]) == ("normalized_clipped_softmax", 1.0, -2.175)
        assert training["learning_rate"] == (1e-4 if size == "large" else 7e-4)
        assert (training["adam_beta1"], training["adam_beta2"], training["weight_decay"]) == (0.9, 0.98, 0.01)
        batch = training["per_device_train_batch_size"] * training["gradient_accumulation_steps"]
        assert (batch, training["max_steps"], preset.data.seq_length) == (2048, 125_000, 128)
    opt = get_preset("liao-opt-125m-normalized_clipped")
    assert (opt.model["ncs_zeta"], opt.model["ncs_beta"]) == (1.0, 0.9)
    bondarenko = get_preset("opt-125m-vanilla")
    assert opt.training == bondarenko.training
    assert {k: v for k, v in opt.model.items() if not k.startswith("ncs") and k != "attn_impl"} == {
        k: v for k, v in bondarenko.model.items() if k != "attn_impl"
    }
    assert get_preset("liao-opt-350m-clipped").model["clip_alpha"] == get_preset("opt-350m-clipped").model["clip_alpha"]


def test_bad_presets_and_overrides_get_clear_errors():
    with pytest.raises(
        ValueError, match="unknown preset 'bert-tiny-gatd'.*Did you mean bert-tiny-gated.*Allowed presets:"
    ):
        get_preset("bert-tiny-gatd")
    with pytest.raises(ValueError, match="unknown override field 'learning_rat'.*Did you mean: learning_rate"):
        apply_overrides(get_preset("bert-tiny-gated"), ["learning_rat=1e-3"])
    with pytest.raises(ValueError, match="unknown override group 'modle'"):
        apply_overrides(get_preset("bert-tiny-gated"), ["modle.hidden_size=3"])
    with pytest.raises(ValueError, match="field=value"):
        apply_overrides(get_preset("bert-tiny-gated"), ["learning_rate"])
    preset = apply_overrides(
        get_preset("opt-tiny-gated"), ["learning_rate=3e-4", "model.num_hidden_layers=3", "fp16=true"]
    )
    assert preset.training["learning_rate"] == 3e-4 and preset.training["fp16"] is True
    assert preset.model["num_hidden_layers"] == 3
    assert get_preset("opt-tiny-gated").model["num_hidden_layers"] == 2  # the registry is untouched


def test_cli_errors(tmp_path, capsys):
    assert main(["--preset", "nope", "--output", str(tmp_path / "a")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["--preset", "bert-tiny-gated", "--output", str(tmp_path / "a"), "hiden_size=3"]) == 2
    assert "unknown override field 'hiden_size'" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    assert main(["--preset", "bert-tiny-gated", "--output", str(tmp_path / "other")]) == 2
    assert "holds no training_recipe.json" in capsys.readouterr().err
    assert (
        main(["--preset", "bert-base-gated", "--output", str(tmp_path / "gpu"), "--max-steps", "1"]) == 2
        or torch.cuda.is_available()
    )
    assert "fp16=false" in capsys.readouterr().err or torch.cuda.is_available()


def test_wd_ln_gamma_moves_layernorm_weights_into_the_decay_group(tmp_path):
    preset = tiny("opt-tiny-gated")
    groups = {}
    for flag in (False, True):
        run = build_run(
            apply_overrides(preset, [f"model.wd_ln_gamma={str(flag).lower()}"]),
            tmp_path / str(flag),
            training_overrides=NO_PROGRESS,
        )
        trainer = run.trainer
        assert trainer.wd_ln_gamma is flag  # read from the model config
        optimizer = trainer.create_optimizer()
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        groups[flag] = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    ln_weights = {
        n for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.LayerNorm) for n in [f"{n}.weight"]
    }
    ln_biases = {w[: -len("weight")] + "bias" for w in ln_weights}
    assert ln_weights and ln_weights <= groups[False][0.0] and not ln_weights & groups[False][0.1]
    assert ln_weights <= groups[True][0.1] and not ln_weights & groups[True][0.0]
    assert ln_biases <= groups[True][0.0]
    assert groups[True][0.1] - groups[False][0.1] == ln_weights


@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
@pytest.mark.parametrize("variant", ["vanilla", "clipped", "gated"])
def test_a_few_steps_decrease_the_loss(tmp_path, family, variant):
    preset = tiny(f"{family}-tiny-{variant}", f"max_steps={STEPS[family]}", "save_steps=100")
    run = build_run(preset, tmp_path / "run", training_overrides=NO_PROGRESS)
    trainer = run.trainer
    assert (
        type(trainer).__name__
        == {"bert": "MaskedLMTrainer", "opt": "CausalLMTrainer", "vit": "ImageClassificationTrainer"}[family]
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before - 0.02, (before, after)
    if family != "vit":
        assert after["eval_perplexity"] == pytest.approx(math.exp(after["eval_loss"]))


def _gates_by_hand(model, batches):
    means = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: means.append(out.mean(dim=(0, 2, 3))))
        for m in model.modules()
        if isinstance(m, AttentionGate)
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    n_layers = len(handles)
    per_layer = [torch.stack(means[i::n_layers]).mean(0) for i in range(n_layers)]
    return torch.cat(per_layer)


def test_outlier_callback_logs_the_right_values(tmp_path):
    from hf_quantizable.evaluation import compute_outlier_stats

    preset = tiny(
        "bert-tiny-gated", "max_steps=10", "save_steps=100", "tracking.outlier_every_n_steps=5", "gate_type=linear"
    )
    run = build_run(preset, tmp_path / "run", training_overrides=NO_PROGRESS)
    run.trainer.train()
    tracker = run.tracker
    assert [r["step"] for r in tracker.history] == [5, 10]
    logged = [json.loads(line) for line in (tmp_path / "run" / TRACKING_FILE).read_text().splitlines()]
    assert logged == json.loads(json.dumps(tracker.history))
    assert [h for h in run.trainer.state.log_history if "outliers/max_inf_norm" in h] == tracker.history
    record = tracker.history[-1]
    model = run.trainer.model.eval()
    heads = _gates_by_hand(model, [{k: v for k, v in b.items() if k != "labels"} for b in tracker.probe_batches])
    assert record["gates/mean"] == pytest.approx(float(heads.mean()), rel=1e-5)
    assert record["gates/min"] == pytest.approx(float(heads.min()), rel=1e-5)
    assert record["gates/mean"] != pytest.approx(0.5, abs=1e-4)  # the gates trained away from pi_init
    losses = []
    with torch.no_grad():
        for batch in tracker.probe_batches:
            losses.append(float(model(**batch).loss))
    assert record["probe/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    stats = compute_outlier_stats(model, [{k: v for k, v in b.items() if k != "labels"} for b in tracker.probe_batches])
    assert record["outliers/max_inf_norm"] == pytest.approx(stats["max_inf_norm"], rel=1e-5)
    assert record["outliers/avg_kurtosis"] == pytest.approx(stats["avg_kurtosis"], rel=1e-5)
    # Probe batches keep their masking: the same numbers again.
    assert probe_quality(model, tracker.probe_batches)["loss"] == pytest.approx(record["probe/loss"], rel=1e-6)


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_without_losing_steps(tmp_path, capsys):
    out = tmp_path / "run"
    cli = [
        "--preset",
        "bert-tiny-vanilla",
        "--output",
        str(out),
        "--no-progress",
        *TINY,
        *TINY_FAMILY["bert"],
        "save_steps=2",
        "logging_steps=2",
    ]
    preset = apply_overrides(get_preset("bert-tiny-vanilla"), cli[5:] + ["max_steps=8"])
    run = build_run(preset, out, training_overrides=NO_PROGRESS)
    run.trainer.add_callback(_Interrupt())
    with pytest.raises(KeyboardInterrupt):
        run.trainer.train()
    first_losses = {h["step"]: h["loss"] for h in run.trainer.state.log_history if "loss" in h}
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    assert main([*cli, "--max-steps", "8"]) == 2  # same run, no --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main(["--preset", "bert-tiny-gated", "--output", str(out), "--resume"]) == 2
    assert "holds another run" in capsys.readouterr().err

    assert main([*cli, "--max-steps", "8", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.err and "checkpoint-4" in captured.err
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    resumed_losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    assert sorted(first_losses) == [2, 4] and sorted(resumed_losses) == [2, 4, 6, 8]
    assert all(resumed_losses[s] == first_losses[s] for s in (2, 4))  # steps 1-4 came from checkpoint-4
    # The final folder is Hub-ready: config with auto_map, weights, tokenizer, modeling code, recipe.
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMaskedLM"].endswith("QuantizableBertForMaskedLM")
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "training_recipe.json",
        "modeling_quantizable_bert.py",
        "eval_results.json",
    ):
        assert (out / name).exists(), name
    assert json.loads((out / "training_recipe.json").read_text())["training"]["max_steps"] == 8
    printed = run_without_package(
        f"""
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        m = AutoModelForMaskedLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        t = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        print(type(m).__name__, t("the old farmer .", return_tensors="pt")["input_ids"].shape[0])
        """
    )
    assert printed.strip().splitlines()[-1].split() == ["QuantizableBertForMaskedLM", "1"]


def test_build_model_sizes_to_the_tokenizer():
    from hf_quantizable.training.data import train_tokenizer
    from hf_quantizable.training.embedded import generate_corpus

    tokenizer = train_tokenizer("bert", iter(generate_corpus(200)), vocab_size=300)
    model = build_model(tiny("bert-tiny-gated"), tokenizer)
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id == tokenizer.pad_token_id
    with pytest.raises(ValueError, match="seq_length=4096 exceeds model.max_position_embeddings"):
        build_model(tiny("bert-tiny-gated", "data.seq_length=4096"), tokenizer)


def _loss_curve(run_dir) -> tuple[dict[int, float], float]:  # (loss per step, epoch)
    state = json.loads((run_dir / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}, state["epoch"]


def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun (gloo on CPU) with 2 x 4 sequences per step vs 1 process with 8: same curve shape."""
    common = [
        *TINY,
        *TINY_FAMILY["bert"],
        "max_steps=12",
        "logging_steps=3",
        "save_steps=12",
        "seed=3",
        "log_level=info",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    train = ["-m", "hf_quantizable.train", "--preset", "bert-tiny-vanilla", "--no-progress"]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    logs = {}
    for name, command in (
        ("ddp", [*ddp, *train, "--output", str(tmp_path / "ddp"), *common, "per_device_train_batch_size=4"]),
        (
            "single",
            [sys.executable, *train, "--output", str(tmp_path / "single"), *common, "per_device_train_batch_size=8"],
        ),
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        logs[name] = done.stdout + done.stderr
    assert logs["ddp"].count('"output":') == 1  # only the main process prints the summary
    assert _loss_curve(tmp_path / "ddp")[1] == pytest.approx(_loss_curve(tmp_path / "single")[1])  # same epoch progress
    ddp_curve, _ = _loss_curve(tmp_path / "ddp")
    single_curve, _ = _loss_curve(tmp_path / "single")
    assert sorted(ddp_curve) == sorted(single_curve) == [3, 6, 9, 12]
    for curve in (ddp_curve, single_curve):
        assert curve[12] < curve[3] - 0.1
    for step in ddp_curve:
        assert ddp_curve[step] == pytest.approx(single_curve[step], rel=0.05)


@pytest.mark.parametrize("streaming", [False, True])
def test_local_text_file_and_streaming(tmp_path, streaming):
    from hf_quantizable.training.embedded import generate_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(generate_corpus(400, seed=5)))
    overrides = [
        "max_steps=4",
        "save_steps=100",
        f"data.dataset={corpus}",
        f"data.streaming={str(streaming).lower()}",
        *(["data.stream_eval_examples=40"] if streaming else []),
    ]
    local = [o for o in TINY + TINY_FAMILY["bert"] if not o.startswith("data.embedded_size")]  # not generated
    preset = apply_overrides(get_preset("bert-tiny-gated"), local + overrides)
    run = build_run(preset, tmp_path / "run", training_overrides=NO_PROGRESS)
    assert type(run.trainer.train_dataset).__name__ == ("IterableDataset" if streaming else "Dataset")
    assert all(len(row["input_ids"]) == 32 for row in run.trainer.eval_dataset)  # packed blocks
    result = run.trainer.train()
    assert run.trainer.state.global_step == 4 and math.isfinite(result.training_loss)


def test_periodic_w8a8_check_leaves_the_trained_model_untouched(tmp_path):
    from hf_quantizable.modeling.int8 import QuantPoint

    overrides = ["max_steps=2", "save_steps=100", "tracking.outlier_every_n_steps=1", "tracking.w8a8_every_n_steps=2"]
    run = build_run(
        tiny("bert-tiny-clipped", *overrides, "tracking.calibration_batches=2"),
        tmp_path / "run",
        training_overrides=NO_PROGRESS,
    )
    run.trainer.train()
    first, second = run.tracker.history
    assert "w8a8/loss" not in first and second["step"] == 2
    assert math.isfinite(second["w8a8/loss"]) and second["w8a8/perplexity"] == pytest.approx(
        math.exp(second["w8a8/loss"])
    )
    assert second["w8a8/loss"] != second["probe/loss"]  # 8-bit rounding changes the outputs
    modules = list(run.trainer.model.modules())
    assert sum(type(m) is QuantPoint for m in modules) > 10  # the quantized model was a deep copy
    assert not [m for m in modules if type(m).__module__.startswith("hf_quantizable.quantization")]


def test_bos_at_block_start_shifts_every_packed_block_behind_the_bos_token():
    from hf_quantizable.training.data import load_text_datasets

    spec = apply_overrides(get_preset("opt-tiny-vanilla"), ["data.embedded_size=300", "data.seq_length=16"]).data
    plain = load_text_datasets(spec, "opt", seed=0)
    spec.bos_at_block_start = True
    shifted = load_text_datasets(spec, "opt", seed=0, tokenizer=plain.tokenizer)
    bos = plain.tokenizer.bos_token_id
    for split in ("train", "validation"):
        before, after = plain.__dict__[split]["input_ids"], shifted.__dict__[split]["input_ids"]
        assert len(before) == len(after) > 0
        assert all(a == [bos] + b[:-1] for a, b in zip(after, before))


def test_bos_at_block_start_is_refused_for_masked_lm_presets():
    with pytest.raises(ValueError, match="bos_at_block_start.*causal-LM"):
        apply_overrides(get_preset("bert-tiny-vanilla"), ["data.bos_at_block_start=true"])
