"""The main job, end to end and offline: train, quantize, evaluate and package tiny quantizable BERTs.

    python -m hf_quantizable.pipeline --local-dir out/

For each attention variant (default: vanilla softmax, gated, clipped softmax) it trains a tiny BERT
on the embedded corpus (`python -m hf_quantizable.train --preset bert-tiny-VARIANT`), quantizes it to
a W8A8 INT8 checkpoint (`python -m hf_quantizable.quantize`), evaluates FP (fp32) vs INT8 on the same
held-out batches with outlier statistics, and writes the Hub-ready FP and INT8 repo folders with
their model cards into `--local-dir` (nothing is uploaded; `python -m hf_quantizable.push` does that).
It ends with the FP-vs-INT8 table.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import quantize, train
from .cli import DataArguments, OneLineErrorParser
from .evaluation.results import read_results
from .hub.card import variant_of
from .hub.evaluate import evaluate_for_card
from .hub.folder import PLOTS_DIR, RECIPE_FILE, is_repo_folder
from .hub.publish import plan_push, write_plan
from .hub.upload import check_repo_id
from .paths import check_output_folder, write_text_atomic
from .quantization.config import W8A8Config
from .training import embedded
from .training.presets import VARIANTS as PRESET_VARIANTS
from .training.runner import CHECKPOINT_DIR
from .training.trainer import latest_complete_checkpoint

# The presets' attention variants (`training.presets.VARIANTS`), in the order the main job runs them: the
# baseline first, then gated attention, then clipped softmax.
VARIANTS = tuple(sorted(PRESET_VARIANTS, key=lambda variant: (variant != "vanilla", variant != "gated")))
WORK_DIR_MARK = ".hf_quantizable-main-job"  # marks a --work-dir this command made (and may reuse)
TRAIN_SEED_LINES = 1000  # calibration lines drawn from the training corpus generator
# Old flag names, accepted (with a deprecation line) for one release (see `hf_quantizable.cli`).
DEPRECATED_FLAGS = {"--eval-sequences": "--max-sequences", "--calibration-batches": "--num-calibration-batches"}
EVAL_SEED = 12345  # held-out evaluation text: the embedded generator with a seed training does not use


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m hf_quantizable.pipeline",
        description="Main job: train tiny vanilla / gated / clipped BERTs on the embedded corpus, quantize "
        "them to W8A8 INT8, evaluate FP vs INT8 with outlier statistics, write Hub-ready folders with cards.",
    )
    parser.add_argument("--local-dir", type=Path, required=True, help="where the Hub-ready repo folders go")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the repo folders an earlier main job wrote in --local-dir"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("runs/main-job"),
        help="training runs and results (a new folder, or one an earlier main job made: its runs are resumed)",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--namespace", default="hf-quantizable", help="Hub user or organization named in the cards")
    parser.add_argument("--max-steps", type=int, default=150, help="training steps per model")
    parser.add_argument("--corpus-size", type=int, default=20000, help="lines of the embedded training corpus")
    parser.add_dataclass_arguments(
        DataArguments,
        ("max_sequences",),
        defaults={"max_sequences": 64},
        helps={"max_sequences": "held-out sequences for FP vs INT8"},
    )
    parser.add_dataclass_arguments(W8A8Config, ("num_calibration_batches",))
    parser.add_argument("--no-progress", action="store_true", help="disable the training progress bars")
    for old, new in DEPRECATED_FLAGS.items():
        parser.add_deprecated_alias(old, new)
    return parser


def check_args(args: argparse.Namespace) -> None:
    args.variants = list(dict.fromkeys(args.variants))
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    for name in ("max_steps", "corpus_size", "max_sequences", "num_calibration_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    check_repo_id(f"{args.namespace}/bert-tiny-gated", "--namespace")
    if args.local_dir.exists() and not args.local_dir.is_dir():
        raise ValueError(f"--local-dir {args.local_dir} exists and is not a folder")
    check_output_folder(
        args.work_dir, option="--work-dir", is_own_output=lambda f: (f / WORK_DIR_MARK).is_file(), overwrite=True
    )
    for variant in args.variants:
        for name in (f"bert-tiny-{variant}", f"bert-tiny-{variant}-w8a8"):
            check_output_folder(
                args.local_dir / name,
                option="--local-dir",
                is_own_output=is_repo_folder,
                overwrite=args.overwrite,
                inputs=[args.work_dir],
            )


def write_texts(path: Path, lines: list[str]) -> Path:
    return write_text_atomic(path, "\n".join(lines) + "\n")


def _run(step: str, code: int) -> None:
    if code != 0:
        raise RuntimeError(f"{step} failed (exit status {code}); see the messages above")


def training_state(run_dir: Path, max_steps: int) -> str:
    """`done` (an earlier main job trained this run to `max_steps`), `resume` (it left a complete
    checkpoint) or `train` (nothing to reuse)."""
    recipe = run_dir / RECIPE_FILE
    if not recipe.is_file():
        return "train"
    trained_steps = json.loads(recipe.read_text()).get("training", {}).get("max_steps")
    if (run_dir / "config.json").is_file() and trained_steps == max_steps:
        return "done"
    checkpoints = run_dir / CHECKPOINT_DIR
    return "resume" if checkpoints.is_dir() and latest_complete_checkpoint(checkpoints)[0] else "train"


def run_variant(variant: str, args: argparse.Namespace, calibration: Path, evaluation: Path) -> list[Path]:
    """Train, quantize, evaluate and package one variant; return its repo folders."""
    name = f"bert-tiny-{variant}"
    run_dir, int8_dir = args.work_dir / name, args.work_dir / f"{name}-w8a8"
    train_args = ["--preset", name, "--output", str(run_dir), "--max-steps", str(args.max_steps)]
    train_args += [f"data.embedded_size={args.corpus_size}"]
    if args.no_progress:
        train_args.append("--no-progress")
    state = training_state(run_dir, args.max_steps)
    if state == "resume":
        train_args.append("--resume")
    if state != "done":
        _run(f"training {name}", train.main(train_args))
    quantize_args = [str(run_dir), "--output", str(int8_dir), "--dataset", str(calibration), "--overwrite"]
    quantize_args += ["--num-calibration-batches", str(args.num_calibration_batches), "--max-length", "64"]
    _run(f"quantizing {name}", quantize.main(quantize_args))
    shutil.rmtree(run_dir / PLOTS_DIR, ignore_errors=True)
    results = evaluate_for_card(
        run_dir, int8_dir, run_dir, dataset=str(evaluation), split="validation", max_sequences=args.max_sequences
    )
    plans = plan_push(
        run_dir,
        f"{args.namespace}/{name}",
        int8_repo_id=f"{args.namespace}/{name}-w8a8",
        int8_dir=int8_dir,
        results_path=results,
    )
    return [write_plan(plan, args.local_dir / plan.name) for plan in plans]


def summary_table(results: dict[str, Path]) -> str:
    """FP-vs-INT8 table over the variants, from their results files."""
    header = ["attention", "FP32 ppl", "W8A8-sim ppl", "INT8 ppl", "INT8/FP32", "max inf norm", "avg kurtosis"]
    rows = []
    for variant, path in results.items():
        values = {(variant_of(r), r.metric): r.value for r in read_results(path)}
        fp, int8 = values.get(("fp32", "perplexity")), values.get(("int8", "perplexity"))
        cells = [fp, values.get(("w8a8-sim", "perplexity")), int8, int8 / fp if fp and int8 else None]
        cells += [values.get(("fp32", "max_inf_norm")), values.get(("fp32", "avg_kurtosis"))]
        rows.append([variant] + ["–" if v is None else f"{v:.4g}" for v in cells])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results, folders = {}, []
    try:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        (args.work_dir / WORK_DIR_MARK).touch()
        data_dir = args.work_dir / "data"
        # Calibration from the training distribution (the papers calibrate on training data); evaluation on
        # text the training corpus does not contain (another seed of the same generator).
        calibration = write_texts(data_dir / "calibration.txt", embedded.generate_corpus(TRAIN_SEED_LINES, seed=0))
        evaluation = write_texts(
            data_dir / "embedded-heldout" / "validation.txt",
            embedded.generate_corpus(4 * args.max_sequences * 8, EVAL_SEED),
        )
        for variant in tqdm(args.variants, desc="main job", unit="model"):
            folders += run_variant(variant, args, calibration, evaluation)
            results[variant] = args.work_dir / f"bert-tiny-{variant}" / "results.json"
    except (RuntimeError, ValueError, OSError) as error:  # a failed step, a full disk
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\nHub-ready repo folders (upload with python -m hf_quantizable.push):")
    for folder in folders:
        print(f"  {folder}")
    print(f"\nFP vs INT8 (W8A8), held-out embedded text, {args.max_sequences} sequences:\n")
    print(summary_table(results))
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
