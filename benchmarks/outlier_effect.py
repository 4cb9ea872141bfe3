"""Outlier-effect search: train vanilla, clipped and gated variants of one setting for the same budget.

Each variant of a setting trains with the same seed, data and steps. Every `--track-every` steps it
checkpoints and records the probe perplexity on held-out text, the max inf norm, the average / max
kurtosis, He et al.'s kurtosis of per-neuron activation RMS, the location of the largest activation
(token position, channel, token id), gate statistics, and every `--w8a8-every` steps the perplexity
of a simulated-W8A8 copy (the papers' per-tensor setting). At the end it evaluates FP and W8A8
perplexity on `--eval-batches` held-out batches and checks the issue's bar.

Every attempt is appended to the search log (`--log`, JSON lines): a `started` record, then one of
`finished`, `aborted` (interrupt / SIGTERM), `failed` (exception) per variant, and a `comparison`
record once all variants of the setting are done. A killed process leaves a `started` record without
an end. Runs live under `--runs-dir/<label>/seed<seed>/<variant>`; `--resume` continues each variant
from its last checkpoint (or reuses a finished one), and a larger `--max-steps` extends them.

    python benchmarks/outlier_effect.py --setting opt-noop-bos --max-steps 1500 --resume
    python benchmarks/outlier_effect.py --preset opt-tiny --label my-try --bos model.num_hidden_layers=4
    python benchmarks/outlier_effect.py --summary          # table of the log's latest records
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import signal
import socket
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import hf_quantizable.quantization  # noqa: F401  (imported now: a long run must not pick up later edits)
from hf_quantizable.evaluation import compute_outlier_stats
from hf_quantizable.evaluation.results import cpu_description, package_versions
from hf_quantizable.paths import shared_data_dir, write_text_atomic
from hf_quantizable.training.callbacks import OutlierTrackingCallback, gate_statistics, probe_quality, record_gates
from hf_quantizable.training.presets import VARIANTS, apply_overrides, get_preset
from hf_quantizable.training.runner import (
    DataCollatorForLanguageModeling,
    build_run,
    default_data_collator,
    fixed_batches,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LOG = REPO / "benchmarks" / "results" / "outlier_search.jsonl"
DEFAULT_COMPARISON = REPO / "benchmarks" / "results" / "outlier_effect.json"
DEFAULT_RUNS = Path(os.environ.get("OUTLIER_RUNS_DIR", Path.home() / ".cache" / "hf_quantizable" / "outlier_runs"))
SEARCH_VARIANTS = (*VARIANTS, "vanilla-muon")
SETTING_FILE = "setting.json"
FINAL_FILE = "final.json"
WALL_FILE = "wall.json"
TRACKING_FILE = "outlier_tracking.jsonl"
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")

# The bar of issue 21 (held-out text, same budget).
BAR = {"vanilla_w8a8_ratio_min": 1.2, "method_w8a8_ratio_max": 1.02, "inf_norm_factor_min": 5.0, "fp_ppl_tol": 0.05}


@dataclasses.dataclass
class Setting:
    """One point of the search: a preset base, overrides applied to every variant, data options.

    `corpus` names a generated training text (`CORPORA`, written once under `--runs-dir/corpora`);
    it sets `data.dataset`.
    """

    preset: str
    overrides: list[str]
    bos: bool = False
    description: str = ""
    corpus: str | None = None


def bigram_backcopy_corpus(num_lines: int, seed: int = 0, words: int = 60, vocab: int = 64) -> list[str]:
    """The Bigram-Backcopy task of Guo et al. (2024, "Active-dormant attention heads"), as text.

    Tokens `w0..w{vocab-1}` follow a fixed sparse random bigram chain (6 successors per token),
    except after a trigger token (`w0..w3`), which is followed by the token before it. Only the
    token after a trigger needs attention; everywhere else a head is best dormant, which is where
    attention sinks and residual-state peaks on the first token form.
    """
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    successors = np.stack([rng.choice(vocab, size=6, replace=False) for _ in range(vocab)])
    weights = rng.dirichlet(np.ones(6), size=vocab)
    cumulative = weights.cumsum(axis=1).tolist()
    successors = successors.tolist()
    uniforms = rng.random((num_lines, words)).tolist()
    starts = rng.integers(vocab, size=num_lines).tolist()
    lines = []
    for start, draws in zip(starts, uniforms):
        tokens = [start]
        for u in draws[1:]:
            current = tokens[-1]
            if current < 4 and len(tokens) > 1:
                tokens.append(tokens[-2])
            else:
                row = cumulative[current]
                tokens.append(successors[current][next((i for i, c in enumerate(row) if u < c), 5)])
        lines.append(" ".join(f"w{t}" for t in tokens))
    return lines


def filler_pairs_corpus(
    num_lines: int, seed: int = 0, sentences: int = 5, fillers: int = 64, keys: int = 50, pair_probability: float = 0.15
) -> list[str]:
    """Sentences of unpredictable filler words with rare key-value pairs, each ended by a delimiter `.`.

    Each line holds `sentences` sentences of 4-12 slots. A slot is a filler `fN` drawn from a Zipf
    distribution over `fillers` words, independent of everything (attention cannot help predict it),
    or with probability `pair_probability` a pair `kN vM` (`vM` a fixed permutation of `kN`): the
    only tokens that need another token. Unlike `embedded-noop`, whose background token `.` is 80% of
    the text (so a no-op head's target, and its outliers, sit in almost every token), the delimiters
    here (`.`, `[CLS]`, `[SEP]`) are ~10% of the tokens: a head that learns to attend to them to do
    nothing puts its outliers on a few tokens, which is what per-tensor quantization cannot absorb.
    """
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    values = rng.permutation(keys)
    zipf = 1.0 / np.arange(1, fillers + 1)
    zipf /= zipf.sum()
    draws = iter(rng.choice(fillers, size=num_lines * sentences * 12, p=zipf).tolist())
    lines = []
    for _ in range(num_lines):
        words: list[str] = []
        for _ in range(sentences):
            for _ in range(int(rng.integers(4, 13))):
                if rng.random() < pair_probability:
                    key = int(rng.integers(keys))
                    words += [f"k{key}", f"v{values[key]}"]
                else:
                    words.append(f"f{next(draws)}")
            words.append(".")
        lines.append(" ".join(words))
    return lines


CORPORA = {"bigram-backcopy": (bigram_backcopy_corpus, 80_000), "filler-pairs": (filler_pairs_corpus, 60_000)}


def corpus_file(name: str, runs_dir: Path) -> Path:
    """Write the generated corpus `name` once (atomic) and return its path."""
    generate, lines = CORPORA[name]
    path = Path(runs_dir) / "corpora" / f"{name}-{lines}.txt"
    if not path.exists():
        write_text_atomic(path, "\n".join(generate(lines)) + "\n")
    return path


_OPT_NO_DROPOUT = ["model.dropout=0", "model.attention_dropout=0", "training.weight_decay=0"]
_OPT_4L_128 = [
    "model.num_hidden_layers=4",
    "model.hidden_size=128",
    "model.word_embed_proj_dim=128",
    "model.num_attention_heads=4",
    "model.ffn_dim=512",
    "model.max_position_embeddings=128",
    "data.seq_length=128",
]
_OPT_4L_256 = [
    "model.num_hidden_layers=4",
    "model.hidden_size=256",
    "model.word_embed_proj_dim=256",
    "model.num_attention_heads=8",
    "model.ffn_dim=1024",
    "model.max_position_embeddings=128",
    "data.seq_length=128",
]
_LR = ["training.learning_rate=3e-3", "training.warmup_steps=100"]


def _text(name: str) -> str:
    return f"data.dataset={shared_data_dir() / name}"


SETTINGS: dict[str, Setting] = {
    "opt-4l256-embedded": Setting(
        "opt-tiny",
        [*_OPT_4L_256, *_OPT_NO_DROPOUT, *_LR, "data.embedded_size=300000"],
        description="OUTLIER_NOTES run B: pre-LN OPT 4L/256 on the embedded grammar, packed, no BOS at position 0",
    ),
    "opt-4l128-embedded-bos": Setting(
        "opt-tiny",
        [*_OPT_4L_128, *_OPT_NO_DROPOUT, *_LR, "data.embedded_size=300000"],
        bos=True,
        description="pre-LN OPT 4L/128 on the embedded grammar, BOS at every sequence start",
    ),
    "opt-4l128-noop-bos": Setting(
        "opt-tiny",
        [*_OPT_4L_128, *_OPT_NO_DROPOUT, *_LR, "data.dataset=embedded-noop", "data.embedded_size=100000"],
        bos=True,
        description="pre-LN OPT 4L/128 on the no-op corpus (attention mostly useless), BOS at every sequence start",
    ),
    "opt-4l128-shakespeare-bos": Setting(
        "opt-tiny",
        [*_OPT_4L_128, *_OPT_NO_DROPOUT, *_LR, _text("tinyshakespeare/input.txt")],
        bos=True,
        description="pre-LN OPT 4L/128 on Tiny Shakespeare, BOS at every sequence start",
    ),
    "opt-4l128-wikitext-bos": Setting(
        "opt-tiny",
        [*_OPT_4L_128, *_OPT_NO_DROPOUT, *_LR, _text("wikitext-2")],
        bos=True,
        description="pre-LN OPT 4L/128 on WikiText-2 valid+test (train: valid, eval: test), BOS at every sequence start",
    ),
    "opt-4l128-backcopy-bos": Setting(
        "opt-tiny",
        [*_OPT_4L_128, *_OPT_NO_DROPOUT, *_LR],
        bos=True,
        corpus="bigram-backcopy",
        description="pre-LN OPT 4L/128 on Bigram-Backcopy (heads dormant except after triggers), BOS at every sequence start",
    ),
}


def machine() -> dict[str, Any]:
    """Host, CPU model and flags, thread settings and accelerator of this process."""
    model, flags = cpu_description()
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": model,
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def git_state() -> dict[str, Any]:
    """Commit of the repository and the tracked files modified in the working tree."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip() or None, "modified": git("diff", "--name-only").split()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def append_log(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the search log (created with its folder if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_tracking(path: Path) -> list[dict[str, Any]]:
    """Tracking records of a run, one per step (a step tracked again after a resume keeps its last record)."""
    by_step: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def variant_preset(setting: Setting, variant: str, max_steps: int, seed: int, runs_dir: Path = DEFAULT_RUNS):
    base, _, optimizer = variant.partition("-")
    overrides = [*setting.overrides, f"training.max_steps={max_steps}", f"training.seed={seed}"]
    if setting.corpus:  # a generated text file replaces the base's dataset (and its embedded size)
        overrides = [o for o in overrides if not o.startswith(("data.dataset=", "data.embedded_size="))]
        overrides.append(f"data.dataset={corpus_file(setting.corpus, runs_dir)}")
    if setting.bos:
        overrides.append("data.bos_at_block_start=true")
    overrides.append("tracking.outlier_every_n_steps=0")  # the benchmark tracks (after its data options)
    if optimizer:
        overrides.append(f"optimizer={optimizer}")
    return apply_overrides(get_preset(f"{setting.preset}-{base}"), overrides)


def check_setting_file(folder: Path, identity: dict[str, Any], resume: bool) -> None:
    """Write the setting's identity once; a resumed or repeated label must have the same one."""
    path = folder / SETTING_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        if changed:  # a field missing on one side counts as None (fields added later)
            raise ValueError(f"{folder} holds another setting (differs in {changed}): choose another --label")
        if not resume:
            raise ValueError(f"{folder} already holds this setting: pass --resume to continue it")
    else:
        write_text_atomic(path, json.dumps(identity, indent=1) + "\n")


# The papers' own W8A8 setting of each family (`W8A8Config.preset`), evaluated next to the default one.
PAPER_W8A8 = {"opt": "bondarenko2023-opt", "bert": "bondarenko2023-bert"}


def evaluate_variant(trainer, family: str, eval_batches: int, calibration_batches: int) -> dict[str, Any]:
    """FP and simulated-W8A8 quality on held-out batches, outlier statistics and gate statistics."""
    from hf_quantizable.quantization import W8A8Config, quantize_model

    model = trainer.model.eval()
    collator = _collator(family, trainer)
    batch_size = trainer.args.per_device_eval_batch_size
    batches = fixed_batches(trainer.eval_dataset, collator, batch_size, eval_batches)
    with record_gates(model) as gates:
        fp = probe_quality(model, batches)
    with torch.no_grad():
        outliers = compute_outlier_stats(model, [{k: v for k, v in b.items() if k != "labels"} for b in batches])
    calibration = fixed_batches(trainer.train_dataset, collator, batch_size, calibration_batches, keep_labels=False)
    quantized = quantize_model(copy.deepcopy(model), W8A8Config(), calibration).eval()
    w8a8 = probe_quality(quantized, batches)
    key = "perplexity" if "perplexity" in fp else "accuracy"
    paper = {}
    if family in PAPER_W8A8:
        config = W8A8Config.preset(PAPER_W8A8[family])
        paper_quality = probe_quality(quantize_model(copy.deepcopy(model), config, calibration).eval(), batches)
        paper = {
            "w8a8_paper": {"preset": config.preset_name, **paper_quality},
            "w8a8_paper_ratio": paper_quality[key] / fp[key],
        }
    return {
        "fp": fp,
        "w8a8": w8a8,
        "w8a8_ratio": w8a8[key] / fp[key],
        **paper,
        **{k: outliers[k] for k in ("max_inf_norm", "avg_kurtosis", "max_kurtosis", "avg_rms_kurtosis")},
        "max_rms_kurtosis": outliers["max_rms_kurtosis"],
        "max_inf_norm_by_kind": outliers["max_inf_norm_by_kind"],
        "max_location": outliers["max_location"],
        "per_layer": [{k: v for k, v in e.items() if k != "top_outlier_dims"} for e in outliers["per_layer"]],
        "gates": {k: v for k, v in gate_statistics(gates).items() if k != "gates/per_layer"},
        "eval_sequences": sum(len(b["labels"]) for b in batches),
    }


def _collator(family: str, trainer):
    processing = trainer.processing_class
    if family == "bert":
        return DataCollatorForLanguageModeling(processing, mlm_probability=0.15)
    if family == "opt":
        return DataCollatorForLanguageModeling(processing, mlm=False)
    return default_data_collator


class _Terminated(Exception):
    """SIGTERM arrived: the attempt is logged as aborted."""


def _raise_terminated(signum, frame):
    raise _Terminated(f"signal {signum}")


def run_variant(setting: Setting, label: str, variant: str, args, log: Path) -> dict[str, Any] | None:
    """Train (or resume, or reuse) one variant; log the attempt; return its final record or None."""
    folder = Path(args.runs_dir) / label / f"seed{args.seed}" / variant
    final_path = folder / FINAL_FILE
    if final_path.exists():
        final = json.loads(final_path.read_text())
        if final["steps"] >= args.max_steps and args.resume:
            print(f"{label}/{variant}: finished at step {final['steps']}, reused", file=sys.stderr)
            return final
    base_record = {
        "label": label,
        "variant": variant,
        "seed": args.seed,
        "max_steps": args.max_steps,
        "setting": dataclasses.asdict(setting),
        "tracking": {"track_every": args.track_every, "w8a8_every": args.w8a8_every, "probe_batches": 2},
        "run_dir": str(folder),
        "machine": machine(),
        "versions": package_versions(),
        "git": git_state(),
    }
    append_log(log, {**base_record, "status": "started", "time": _now()})
    start = time.perf_counter()
    wall_file = folder.parent / f"{variant}.{WALL_FILE}"  # beside the run folder, which the runner owns
    wall_before = json.loads(wall_file.read_text())["wall_time_s"] if wall_file.exists() else 0.0
    trainer = None
    status, error, final = "failed", None, None
    try:
        # inside the try: an override the preset refuses is logged as a failed attempt
        preset = variant_preset(setting, variant, args.max_steps, args.seed, Path(args.runs_dir))
        run = build_run(
            preset,
            folder,
            resume=args.resume and (folder / "training_recipe.json").exists(),  # a variant not started yet starts
            training_overrides={
                "disable_tqdm": True,
                "save_strategy": "steps",
                "save_steps": args.track_every,
                "save_total_limit": 2,
                "logging_steps": args.track_every,
            },
        )
        trainer = run.trainer
        if getattr(trainer, "optimizer_name", "adamw") != preset.optimizer:
            trainer.optimizer_name = preset.optimizer
        collator = _collator(preset.family, trainer)
        batch_size = trainer.args.per_device_eval_batch_size
        tracker = OutlierTrackingCallback(
            fixed_batches(trainer.eval_dataset, collator, batch_size, 2),
            args.track_every,
            args.w8a8_every,
            calibration_batches=fixed_batches(trainer.train_dataset, collator, batch_size, 16, keep_labels=False),
            log_file=folder / TRACKING_FILE,
        )
        trainer.add_callback(tracker)
        print(f"{label}/{variant}: training to step {args.max_steps} (resume from {run.resume_from})", file=sys.stderr)
        result = trainer.train(resume_from_checkpoint=run.resume_from)
        stats = evaluate_variant(trainer, preset.family, args.eval_batches, 16)
        final = {
            "label": label,
            "variant": variant,
            "preset": preset.name,
            "optimizer": preset.optimizer,
            "steps": trainer.state.global_step,
            "train_loss": result.metrics.get("train_loss"),
            **stats,
            "tracking": [
                {k: v for k, v in r.items() if k != "gates/per_layer"} for r in read_tracking(folder / TRACKING_FILE)
            ],
        }
        status = "finished"
    except (KeyboardInterrupt, _Terminated) as err:
        status, error = "aborted", repr(err)
        raise
    except Exception as err:  # logged, then the next variant runs
        status, error = "failed", "".join(traceback.format_exception(err))[-4000:]
        print(error, file=sys.stderr)
    finally:
        wall = time.perf_counter() - start
        write_text_atomic(wall_file, json.dumps({"wall_time_s": wall_before + wall}) + "\n")
        if final is not None:
            final["wall_time_s"] = round(wall_before + wall, 1)
            write_text_atomic(final_path, json.dumps(final, indent=1, default=float) + "\n")
        record = {
            **base_record,
            "status": status,
            "time": _now(),
            "steps_done": trainer.state.global_step if trainer is not None else 0,
            "wall_time_s": round(wall, 1),
            "wall_time_total_s": round(wall_before + wall, 1),
            "error": error,
        }
        if final is not None:
            record["result"] = {k: v for k, v in final.items() if k not in ("per_layer", "label", "variant")}
        append_log(log, record)
    return final


def check_bar(results: dict[str, dict[str, Any]], ratio: str = "w8a8_ratio") -> dict[str, Any]:
    """The issue's bar for vanilla against each of clipped and gated (the variants present).

    `ratio` names the W8A8/FP ratio checked (`w8a8_paper_ratio`: the papers' own W8A8 preset).
    """
    vanilla = results.get("vanilla")
    if vanilla is None:
        return {"met": False, "reason": "no vanilla run"}
    checks: dict[str, Any] = {f"vanilla_{ratio}": vanilla[ratio]}
    met = vanilla[ratio] >= BAR["vanilla_w8a8_ratio_min"]
    methods = [m for m in ("clipped", "gated") if m in results]
    for method in methods:
        r = results[method]
        factor = vanilla["max_inf_norm"] / r["max_inf_norm"]
        fp_change = r["fp"]["perplexity"] / vanilla["fp"]["perplexity"] - 1
        checks[method] = {
            ratio: r[ratio],
            "vanilla_inf_norm_factor": factor,
            "fp_ppl_change": fp_change,
            "ok": r[ratio] <= BAR["method_w8a8_ratio_max"]
            and factor >= BAR["inf_norm_factor_min"]
            and abs(fp_change) <= BAR["fp_ppl_tol"],
        }
        met = met and checks[method]["ok"]
    return {"met": met and len(methods) == 2, "bar": BAR, **checks}


def summary_row(label: str, variant: str, r: dict[str, Any]) -> str:
    fp, q = r["fp"]["perplexity"], r["w8a8"]["perplexity"]
    gate = r.get("gates", {}).get("gates/mean")
    loc = r.get("max_location", {})
    return (
        f"{label:28s} {variant:13s} {r['steps']:6d} {fp:9.3f} {q:9.3f} {q / fp:7.3f} {r['max_inf_norm']:9.1f} "
        f"{r['avg_kurtosis']:7.1f} {r['max_kurtosis']:7.1f} {r['max_rms_kurtosis']:7.2f} "
        f"{'' if gate is None else f'{gate:.3f}':>6s} {loc.get('first_token_share') or 0:5.2f} "
        f"{r.get('wall_time_s', float('nan')):7.0f}"
    )


HEADER = (
    f"{'label':28s} {'variant':13s} {'steps':>6s} {'FP ppl':>9s} {'W8A8':>9s} {'ratio':>7s} {'max inf':>9s} "
    f"{'avg k':>7s} {'max k':>7s} {'rms k':>7s} {'gate':>6s} {'pos0':>5s} {'wall s':>7s}"
)


def print_summary(log: Path) -> None:
    latest: dict[tuple[str, int, str], dict] = {}
    for record in read_log(log):
        if record.get("status") == "finished":
            latest[(record["label"], record["seed"], record["variant"])] = {
                **record["result"],
                "wall_time_s": record["wall_time_total_s"],
            }
    print(HEADER)
    for (label, seed, variant), r in sorted(latest.items()):
        print(summary_row(f"{label}/s{seed}", variant, r))


def write_comparison(path: Path, label: str, setting: Setting, seed: int, results: dict, bar: dict) -> None:
    document = json.loads(path.read_text()) if path.exists() else {"benchmark": "outlier_effect", "runs": []}
    entry = {
        "label": label,
        "seed": seed,
        "setting": dataclasses.asdict(setting),
        "machine": machine(),
        "versions": package_versions(),
        "timestamp": _now(),
        "bar": bar,
        "variants": {v: {k: x for k, x in r.items() if k != "per_layer"} for v, r in results.items()},
    }
    runs = [r for r in document["runs"] if not (r["label"] == label and r.get("seed") == seed)]
    document["runs"] = runs + [entry]
    write_text_atomic(path, json.dumps(document, indent=1, default=float) + "\n")


# --- diagnosis of one checkpoint: which quantizer costs the W8A8 loss, which tokens carry the maxima ---


def _latest_checkpoint(path: Path) -> Path:
    """`path` itself when it holds a model, else its newest `checkpoint-N` (under `checkpoints/`)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    found = sorted(path.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    found = found or sorted(path.glob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    if not found:
        raise FileNotFoundError(f"{path} holds no checkpoint")
    return found[-1]


def _diagnosis_batches(run_dir: Path, checkpoint: Path, eval_batches: int, calibration_batches: int):
    """Model, tokenizer, held-out and calibration batches of a run folder (its recipe, BOS as its setting)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from hf_quantizable.training.data import load_text_datasets
    from hf_quantizable.training.presets import TrainingPreset

    recipe = json.loads((run_dir / "training_recipe.json").read_text())
    setting_path = run_dir.parent / SETTING_FILE
    if setting_path.exists() and json.loads(setting_path.read_text()).get("bos"):
        recipe["data"]["bos_at_block_start"] = True  # runs made before the recipe had the field
    preset = TrainingPreset.from_dict(recipe)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    data = load_text_datasets(preset.data, preset.family, seed=preset.training.get("seed", 1000), tokenizer=tokenizer)
    train, validation = data.train, data.validation
    loader = AutoModelForMaskedLM if preset.family == "bert" else AutoModelForCausalLM
    model = loader.from_pretrained(checkpoint, trust_remote_code=True).eval()
    if preset.family == "bert":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=preset.data.mlm_probability)
    else:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    batch_size = preset.training.get("per_device_eval_batch_size", 32)
    held_out = fixed_batches(validation, collator, batch_size, eval_batches)
    calibration = fixed_batches(train, collator, batch_size, calibration_batches, keep_labels=False)
    return model, tokenizer, held_out, calibration


def token_profile(model, tokenizer, batches, top: int = 3) -> list[dict[str, Any]]:
    """Per quantization point (FP forward): how token-specific its largest values are.

    For each point: max |x|, the median over tokens of the per-token max |x| (`token_max_median`),
    the ratio of the two (large: a few tokens carry the maximum, ~1: a channel present in every
    token), the median over sequences of the first token's max |x| against the largest |x| of every
    later token (`position0_max_median`, `rest_max`, `position0_over_rest_max`: > 1 when a
    first-token massive activation sets the per-tensor range), the tokens with the largest per-token
    max (decoded) and the share of the tensor's top-1% per-token maxima sitting on each token string.
    """
    from hf_quantizable.modeling.int8 import QuantPoint

    per_token: dict[str, list[torch.Tensor]] = {}
    ids: list[torch.Tensor] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, QuantPoint):

            def hook(_m, _i, out, name=name):
                if out.dim() == 3 and out.shape[1] == ids[-1].shape[1]:
                    per_token.setdefault(name, []).append(out.detach().abs().amax(-1).flatten())

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                ids.append(batch["input_ids"])
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    flat_ids = torch.cat([i.flatten() for i in ids])
    positions = torch.cat([torch.arange(i.shape[1]).repeat(i.shape[0]) for i in ids])
    rows = []
    for name, values in per_token.items():
        v = torch.cat(values)
        if v.numel() != flat_ids.numel():
            continue
        median = float(v.median())
        k = max(1, v.numel() // 100)
        top_idx = v.topk(k).indices
        counts: dict[str, int] = {}
        for t in flat_ids[top_idx].tolist():
            s = tokenizer.convert_ids_to_tokens(t)
            counts[s] = counts.get(s, 0) + 1
        share = sorted(((s, c / k) for s, c in counts.items()), key=lambda x: -x[1])[:top]
        first, rest = v[positions == 0], v[positions != 0]
        rows.append(
            {
                "point": name,
                "max": float(v.max()),
                "token_max_median": median,
                # the first token (BOS when the setting adds one) against every later token
                "position0_max_median": float(first.median()) if first.numel() else None,
                "rest_max": float(rest.max()) if rest.numel() else None,
                "position0_over_rest_max": float(first.median()) / max(float(rest.max()), 1e-12)
                if first.numel() and rest.numel()
                else None,
                "max_over_median": float(v.max()) / max(median, 1e-12),
                "top1pct_over_median": float(v[top_idx].min()) / max(median, 1e-12),
                "top1pct_tokens": share,
                "top1pct_position0_share": float((positions[top_idx] == 0).float().mean()),
            }
        )
    return rows


def attention_sinks(model, tokenizer, batches) -> list[dict[str, Any]]:
    """Per layer and head: the share of attention mass on position 0 and on the token most attended.

    A sink head puts most of its mass on one token (the first, or a delimiter) whatever the query:
    `top_token_mass` far above that token's share of the keys (`top_token_key_share`).
    """
    vocab = int(model.config.vocab_size)
    mass: dict[int, torch.Tensor] = {}  # layer -> [H, vocab] attention mass received per key token id
    first: dict[int, torch.Tensor] = {}  # layer -> [H] mass received by position 0
    counts: dict[int, int] = {}  # layer -> number of queries
    with torch.no_grad():
        for batch in batches:
            out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_attentions=True)
            ids = batch["input_ids"].flatten()
            for layer, probs in enumerate(out.attentions):  # [B, H, T_q, T_k]
                received = probs[:, :, 1:].sum(2)  # [B, H, T_k], over the queries after the first
                heads = probs.shape[1]
                table = mass.setdefault(layer, torch.zeros(heads, vocab))
                table.index_add_(1, ids, received.permute(1, 0, 2).reshape(heads, -1))
                first[layer] = first.get(layer, 0) + received[:, :, 0].sum(0)
                counts[layer] = counts.get(layer, 0) + probs.shape[0] * (probs.shape[2] - 1)
    all_ids = torch.cat([b["input_ids"].flatten() for b in batches])
    frequency = torch.bincount(all_ids, minlength=vocab).float() / all_ids.numel()
    rows = []
    for layer in sorted(mass):
        share = mass[layer] / counts[layer]  # [H, vocab]
        for head in range(share.shape[0]):
            top = int(share[head].argmax())
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "position0_mass": float(first[layer][head] / counts[layer]),
                    "top_token": tokenizer.convert_ids_to_tokens(top),
                    "top_token_mass": float(share[head, top]),
                    "top_token_key_share": float(frequency[top]),
                }
            )
    return rows


def quantizer_ablation(model, held_out, calibration, paper_preset: str | None = None) -> dict[str, Any]:
    """W8A8/FP perplexity with everything quantized, weights only, and one activation-quantizer kind at a time.

    The ablation runs on the default `W8A8Config`; with `paper_preset` also the ratio of that named
    setting with everything quantized (`all_paper`).
    """
    from hf_quantizable.quantization import W8A8Config, quantize_model
    from hf_quantizable.quantization.calibration import activation_quantizers, weights_in_fp

    fp = probe_quality(model, held_out)["perplexity"]
    quantized = quantize_model(copy.deepcopy(model), W8A8Config(), calibration).eval()
    out: dict[str, Any] = {"fp_perplexity": fp, "all": probe_quality(quantized, held_out)["perplexity"] / fp}
    if paper_preset is not None:
        paper = quantize_model(copy.deepcopy(model), W8A8Config.preset(paper_preset), calibration).eval()
        out.update(paper_preset=paper_preset, all_paper=probe_quality(paper, held_out)["perplexity"] / fp)
    quantizers = activation_quantizers(quantized)
    modes = {n: q.mode for n, q in quantizers.items()}
    with torch.no_grad():
        for q in quantizers.values():
            q.mode = "fp"
        out["weights_only"] = probe_quality(quantized, held_out)["perplexity"] / fp
        kinds = sorted({n.rpartition(".")[2] for n in quantizers})
        grids = {}
        with weights_in_fp(quantized):
            for kind in kinds:
                for n, q in quantizers.items():
                    q.mode = modes[n] if n.rpartition(".")[2] == kind else "fp"
                out[f"only_{kind}"] = probe_quality(quantized, held_out)["perplexity"] / fp
        for n, q in quantizers.items():
            q.mode = modes[n]
            if q.scale.numel() == 1:
                grids[n] = float(q.scale)
    out["grid_step"] = grids
    return out


def diagnose(path: Path, eval_batches: int = 2, calibration_batches: int = 16) -> dict[str, Any]:
    """Where the W8A8 loss of a checkpoint comes from and which tokens carry its largest activations."""
    checkpoint = _latest_checkpoint(path)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    model, tokenizer, held_out, calibration = _diagnosis_batches(run_dir, checkpoint, eval_batches, calibration_batches)
    profile = token_profile(model, tokenizer, held_out)
    sinks = attention_sinks(model, tokenizer, held_out)
    family = "bert" if "bert" in model.config.model_type else "opt"
    ablation = quantizer_ablation(model, held_out, calibration, PAPER_W8A8[family])
    return {"checkpoint": str(checkpoint), "ablation": ablation, "attention_sinks": sinks, "token_profile": profile}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), help="a named setting of the search")
    parser.add_argument("--preset", help="preset base (without -vanilla/-clipped/-gated) for an ad-hoc setting")
    parser.add_argument("--label", help="name of the setting in the log (default: --setting)")
    parser.add_argument("--bos", action="store_true", help="ad-hoc setting: BOS token at every sequence start")
    parser.add_argument("--corpus", choices=sorted(CORPORA), help="ad-hoc setting: a generated training text")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=SEARCH_VARIANTS)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--track-every", type=int, default=100, help="tracking and checkpoint interval")
    parser.add_argument("--w8a8-every", type=int, default=300, help="simulated-W8A8 tracking interval (0: off)")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches of the final evaluation")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--runs-dir", default=str(DEFAULT_RUNS), help="checkpoints (outside the repository)")
    parser.add_argument("--resume", action="store_true", help="continue (or reuse) the runs of this label")
    parser.add_argument("--log", default=str(DEFAULT_LOG), help="search log (JSON lines)")
    parser.add_argument("--comparison", default=str(DEFAULT_COMPARISON), help="comparison JSON of finished settings")
    parser.add_argument("--summary", action="store_true", help="print the log's finished runs and exit")
    parser.add_argument("--list-settings", action="store_true")
    parser.add_argument(
        "--diagnose",
        metavar="RUN_DIR",
        help="ablate the quantizers of a run folder's latest checkpoint (or a checkpoint folder), profile "
        "which tokens carry the maxima, print JSON and exit (with --log-diagnosis: also log it)",
    )
    parser.add_argument("--log-diagnosis", action="store_true", help="append the --diagnose result to --log")
    parser.add_argument("overrides", nargs="*", help="preset overrides field=value, applied to every variant")
    args = parser.parse_args(argv)
    log = Path(args.log)
    if args.summary:
        print_summary(log)
        return 0
    if args.diagnose:
        torch.set_num_threads(args.threads)
        result = diagnose(Path(args.diagnose), eval_batches=args.eval_batches)
        if args.log_diagnosis:
            append_log(log, {"status": "diagnosis", "time": _now(), **result})
        print(json.dumps(result, indent=1, default=float))
        return 0
    if args.list_settings:
        for name, s in SETTINGS.items():
            print(f"{name}: {s.description}\n    preset {s.preset}, bos={s.bos}, {' '.join(s.overrides)}")
        return 0
    if bool(args.setting) == bool(args.preset):
        parser.error("give exactly one of --setting and --preset")
    if args.setting:
        setting = copy.deepcopy(SETTINGS[args.setting])
        setting.overrides += args.overrides
        setting.bos = setting.bos or args.bos
        setting.corpus = args.corpus or setting.corpus
        label = args.label or args.setting
    else:
        if not args.label:
            parser.error("--preset needs --label")
        setting, label = Setting(args.preset, list(args.overrides), args.bos, corpus=args.corpus), args.label
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _raise_terminated)
    folder = Path(args.runs_dir) / label / f"seed{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    identity = {**dataclasses.asdict(setting), "track_every": args.track_every, "w8a8_every": args.w8a8_every}
    check_setting_file(folder, identity, args.resume)
    results = {}
    for variant in args.variants:
        final = run_variant(setting, label, variant, args, log)
        if final is not None:
            results[variant] = final
            print(HEADER + "\n" + summary_row(label, variant, final), file=sys.stderr, flush=True)
    if results:
        print(HEADER)
        for variant, r in results.items():
            print(summary_row(label, variant, r))
    if {"vanilla", "clipped", "gated"} <= set(results):
        bar = check_bar(results)
        if all("w8a8_paper_ratio" in r for r in results.values()):
            bar["paper_w8a8"] = check_bar(results, "w8a8_paper_ratio")
        append_log(log, {"label": label, "seed": args.seed, "status": "comparison", "time": _now(), **bar})
        write_comparison(Path(args.comparison), label, setting, args.seed, results, bar)
        print(json.dumps(bar, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
