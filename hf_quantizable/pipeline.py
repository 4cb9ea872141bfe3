"""The main job, end to end and offline: quantize, evaluate and package quantizable transformers.

    python -m hf_quantizable.pipeline --local-dir out/

Setting `opt-outlier` (the default) starts from the shipped checkpoints in
`hf_quantizable/checkpoints/opt-outlier/`: 4-layer pre-LN OPTs with vanilla softmax, gated attention
and clipped softmax, trained once with the `opt-outlier-*` presets by `benchmarks/outlier_effect.py`
(about half an hour per variant on one core; `benchmarks/ship_outlier_checkpoints.py` copied them
in), the setting where vanilla's W8A8 degrades most against the methods'. Setting `bert-tiny` trains
tiny BERTs live on the embedded corpus (`python -m hf_quantizable.train --preset bert-tiny-VARIANT`,
minutes), which develop no outliers.

For each variant it quantizes the model to a W8A8 INT8 checkpoint (`python -m hf_quantizable.quantize`,
calibrated on training text), evaluates FP (fp32) vs INT8 on the same held-out batches with outlier
statistics, and writes the Hub-ready FP and INT8 repo folders with their model cards into
`--local-dir` (nothing is uploaded; `python -m hf_quantizable.push` does that). It ends with the
FP-vs-INT8 table.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import quantize, train
from .cli import DataArguments, OneLineErrorParser, given_options, refuse_unused
from .evaluation.results import read_results
from .hub.card import variant_of
from .hub.evaluate import evaluate_for_card
from .hub.folder import PLOTS_DIR, PROVENANCE_FILE, RECIPE_FILE, is_repo_folder
from .hub.publish import plan_push, write_plan
from .hub.upload import check_repo_id
from .paths import check_output_folder, recipe_data_field, write_text_atomic
from .quantization.config import W8A8Config
from .training import embedded
from .training.presets import VARIANTS as PRESET_VARIANTS
from .training.presets import get_preset
from .training.runner import CHECKPOINT_DIR
from .training.trainer import latest_complete_checkpoint

# The presets' attention variants (`training.presets.VARIANTS`), in the order the main job runs them: the
# baseline first, then gated attention, then clipped softmax.
VARIANTS = tuple(sorted(PRESET_VARIANTS, key=lambda variant: (variant != "vanilla", variant != "gated")))
WORK_DIR_MARK = ".hf_quantizable-main-job"  # marks a --work-dir this command made (and may reuse)
SETTINGS = ("opt-outlier", "bert-tiny")
SHIPPED_DIR = Path(__file__).parent / "checkpoints" / "opt-outlier"  # the opt-outlier models, one folder a variant
SHIPPED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    RECIPE_FILE,
    PROVENANCE_FILE,
)
TRAIN_SEED_LINES = 1000  # calibration lines drawn from the training corpus generator
# Old flag names, accepted (with a deprecation line) for one release (see `hf_quantizable.cli`).
DEPRECATED_FLAGS = {"--eval-sequences": "--max-sequences", "--calibration-batches": "--num-calibration-batches"}
EVAL_SEED = 12345  # held-out evaluation text: the embedded generator with a seed training does not use


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m hf_quantizable.pipeline",
        description="Main job: quantize vanilla / gated / clipped models to W8A8 INT8 (the shipped opt-outlier "
        "OPTs, or tiny BERTs trained live), evaluate FP vs INT8 with outlier statistics, write Hub-ready "
        "folders with cards.",
    )
    parser.add_argument("--local-dir", type=Path, required=True, help="where the Hub-ready repo folders go")
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default=SETTINGS[0],
        help="opt-outlier: the shipped OPT checkpoints (no training); bert-tiny: train tiny BERTs live",
    )
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
    parser.add_argument("--max-steps", type=int, default=150, help="bert-tiny: training steps per model")
    parser.add_argument("--corpus-size", type=int, default=20000, help="bert-tiny: lines of the training corpus")
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


def check_args(args: argparse.Namespace, given: set[str]) -> None:
    args.variants = list(dict.fromkeys(args.variants))
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    for name in ("max_steps", "corpus_size", "max_sequences", "num_calibration_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.setting == "opt-outlier":
        trains = "applies to --setting bert-tiny (opt-outlier starts from shipped checkpoints, nothing is trained)"
        refuse_unused(given, {"max_steps": trains, "corpus_size": trains})
        for variant in args.variants:
            missing = [name for name in SHIPPED_FILES if not (SHIPPED_DIR / variant / name).is_file()]
            if missing:
                raise ValueError(
                    f"the shipped checkpoint {SHIPPED_DIR / variant} lacks {missing}; reinstall the package"
                )
    check_repo_id(f"{args.namespace}/{args.setting}-gated", "--namespace")
    if args.local_dir.exists() and not args.local_dir.is_dir():
        raise ValueError(f"--local-dir {args.local_dir} exists and is not a folder")
    check_output_folder(
        args.work_dir, option="--work-dir", is_own_output=lambda f: (f / WORK_DIR_MARK).is_file(), overwrite=True
    )
    for variant in args.variants:
        for name in (f"{args.setting}-{variant}", f"{args.setting}-{variant}-w8a8"):
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


def train_variant(name: str, run_dir: Path, args: argparse.Namespace) -> None:
    """bert-tiny: train (or resume) the preset `name` into `run_dir`."""
    train_args = ["--preset", name, "--output", str(run_dir), "--max-steps", str(args.max_steps)]
    train_args += [f"data.embedded_size={args.corpus_size}"]
    if args.no_progress:
        train_args.append("--no-progress")
    state = training_state(run_dir, args.max_steps)
    if state == "resume":
        train_args.append("--resume")
    if state != "done":
        _run(f"training {name}", train.main(train_args))


def unpack_shipped(variant: str, run_dir: Path) -> None:
    """opt-outlier: the shipped checkpoint of `variant` as a run folder, through `save_pretrained` (which
    adds the modeling code a Hub folder needs for `trust_remote_code`); the weights stay the same bits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = SHIPPED_DIR / variant
    model = AutoModelForCausalLM.from_pretrained(source, dtype="float32")
    shutil.rmtree(run_dir, ignore_errors=True)  # a folder of this job's --work-dir (its mark was checked)
    model.save_pretrained(run_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(run_dir)
    for name in (RECIPE_FILE, PROVENANCE_FILE):
        shutil.copy2(source / name, run_dir / name)


def run_variant(variant: str, args: argparse.Namespace, calibration: Path, evaluation: Path) -> list[Path]:
    """Train (bert-tiny) or unpack (opt-outlier), quantize, evaluate and package one variant; return its repo folders."""
    name = f"{args.setting}-{variant}"
    run_dir, int8_dir = args.work_dir / name, args.work_dir / f"{name}-w8a8"
    if args.setting == "opt-outlier":
        unpack_shipped(variant, run_dir)
    else:
        train_variant(name, run_dir, args)
    seq_length = recipe_data_field(run_dir, "seq_length")
    quantize_args = [str(run_dir), "--output", str(int8_dir), "--dataset", str(calibration), "--overwrite"]
    quantize_args += ["--num-calibration-batches", str(args.num_calibration_batches), "--max-length", str(seq_length)]
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


def data_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """Calibration text from the training distribution (the papers calibrate on training data) and
    held-out evaluation text the training corpus does not contain, written into the work dir."""
    data_dir = args.work_dir / "data"
    if args.setting == "opt-outlier":
        # The no-op corpus's pairing rule depends on the generator's seed: held out are the lines the
        # same generator writes after the training corpus.
        trained = get_preset("opt-outlier-vanilla").data.embedded_size
        lines = embedded.generate_noop_corpus(trained + 2000, seed=0)
        calibration = write_texts(data_dir / "calibration.txt", lines[:TRAIN_SEED_LINES])
        return calibration, write_texts(data_dir / "embedded-noop-heldout" / "validation.txt", lines[trained:])
    calibration = write_texts(data_dir / "calibration.txt", embedded.generate_corpus(TRAIN_SEED_LINES, seed=0))
    evaluation = write_texts(
        data_dir / "embedded-heldout" / "validation.txt",
        embedded.generate_corpus(4 * args.max_sequences * 8, EVAL_SEED),
    )
    return calibration, evaluation


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args, given_options(parser, argv))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results, folders = {}, []
    try:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        (args.work_dir / WORK_DIR_MARK).touch()
        calibration, evaluation = data_files(args)
        for variant in tqdm(args.variants, desc="main job", unit="model"):
            folders += run_variant(variant, args, calibration, evaluation)
            results[variant] = args.work_dir / f"{args.setting}-{variant}" / "results.json"
    except (RuntimeError, ValueError, OSError) as error:  # a failed step, a full disk
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\nHub-ready repo folders (upload with python -m hf_quantizable.push):")
    for folder in folders:
        print(f"  {folder}")
    corpus = "no-op corpus" if args.setting == "opt-outlier" else "embedded text"
    print(f"\nFP vs INT8 (W8A8), {args.setting}, held-out {corpus}, {args.max_sequences} sequences:\n")
    print(summary_table(results))
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
