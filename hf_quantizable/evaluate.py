"""Evaluate a model in floating point, simulated W8A8 and real INT8 on identical inputs.

    python -m hf_quantizable.evaluate runs/bert-gated --int8 runs/bert-gated-w8a8 --task mlm \\
        --dataset ../shared/data/wikitext-2
    python -m hf_quantizable.evaluate runs/opt-gated --task clm --dataset wikitext --dataset-config wikitext-2-raw-v1
    python -m hf_quantizable.evaluate runs/vit-gated --task image --dataset ../shared/data/mnist --calibration-split test
    python -m hf_quantizable.evaluate MINILM_DIR --task embedding --dataset ../shared/data/wikitext-2 --outlier-suppression
    python -m hf_quantizable.evaluate MINILM_DIR --task glue --glue-task sst2 --glue-data ../shared/data/glue
    python -m hf_quantizable.evaluate MINILM_DIR --task embedding --w8a8-preset wei2022-os-6bit

Writes `OUTPUT/results.json` (the result records: task metric and outlier statistics per variant)
and `OUTPUT/plots/*.png`; OUTPUT defaults to MODEL when it is a local folder. Prints a table.
"""

import argparse
import sys
from pathlib import Path

from .cli import DataArguments, OneLineErrorParser, given_options, positive_int, refuse_unused
from .evaluation.results import ResultRecord, read_results, write_results
from .paths import recipe_data_field
from .quantization.config import W8A8Config

TASK_CHOICES = ("mlm", "clm", "image", "embedding", "glue")
# Options of one kind of task that another kind would accept and ignore: refused there instead.
GLUE_ONLY = ("glue_task", "glue_data", "preset", "max_train_samples", "max_eval_samples", "max_steps")
NOT_GLUE = (
    "int8", "append", "dataset", "dataset_config", "data_files", "split", "calibration_split", "text_column",
    "image_column", "label_column", "max_sequences", "max_length", "batch_size", "mlm_probability",
    "no_plots", "attention_layer", "attention_head", "fp16", "bf16",
)  # fmt: skip
# The W8A8Config fields this command sets (each a flag generated from the dataclass).
W8A8_FLAGS = (
    "per_channel_weights",
    "per_channel_residuals",
    "outlier_channels",
    "num_calibration_batches",
    "clipping_steps",
)
W8A8_OPTIONS = ("outlier_suppression", *W8A8_FLAGS, "calibration_split", "w8a8_preset")
DEFAULT_DATASETS = {
    "mlm": ("wikitext", "wikitext-2-raw-v1"),
    "clm": ("wikitext", "wikitext-2-raw-v1"),
    "embedding": ("wikitext", "wikitext-2-raw-v1"),
    "image": ("mnist", None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m hf_quantizable.evaluate",
        description="FP vs simulated W8A8 vs INT8: perplexity / accuracy / GLUE plus outlier statistics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    parser.add_argument(
        "model", help="FP model: local save_pretrained folder or Hub id (quantizable or stock BERT/OPT/ViT)"
    )
    parser.add_argument(
        "--int8", metavar="QUANT_DIR", help="real INT8 checkpoint of MODEL (python -m hf_quantizable.quantize)"
    )
    parser.add_argument(
        "--task",
        required=True,
        choices=TASK_CHOICES,
        help="mlm (BERT), clm (OPT), image (ViT), embedding (BERT encoder), glue (BERT)",
    )
    parser.add_argument(
        "--output", type=Path, help="folder for results.json and plots/ (default: MODEL if a local folder)"
    )
    parser.add_argument("--append", action="store_true", help="add to the records already in OUTPUT/results.json")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier OUTPUT/results.json (or GLUE output folder)"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow MODEL / --int8 folders or repos to run their own Python code (needed only for model types "
        "this package does not register)",
    )
    data = parser.add_argument_group("data (mlm, clm, image, embedding)")
    parser.add_dataclass_arguments(
        DataArguments,
        ("dataset", "dataset_config"),
        group=data,
        helps={
            "dataset": "Hub dataset name or local file/folder (default: wikitext / mnist from the Hub)",
            "dataset_config": "Hub dataset configuration (default wikitext-2-raw-v1 for wikitext)",
        },
    )
    parser.add_dataclass_arguments(DataArguments, ("data_files",), group=data)
    parser.add_dataclass_arguments(DataArguments, ("split",), group=data, defaults={"split": "test"})
    data.add_argument(
        "--calibration-split",
        help="W8A8 calibration split (default: validation for test, else the evaluation split minus the evaluated examples)",
    )
    parser.add_dataclass_arguments(
        DataArguments,
        ("text_column", "image_column", "label_column", "max_sequences", "max_length", "batch_size"),
        group=data,
        helps={"max_length": "tokens per sequence (the papers: BERT 128, OPT 512)"},
    )
    data.add_argument(
        "--mlm-probability", type=float, default=0.15, help="masked-token probability of --task mlm (default 0.15)"
    )
    data.add_argument("--seed", type=int, default=0, help="masking seed (mlm) and GLUE training seed")
    data.add_argument("--fp16", action="store_true", help="also evaluate MODEL in float16 (a real fp16 forward)")
    data.add_argument("--bf16", action="store_true", help="also evaluate MODEL in bfloat16")
    quant = parser.add_argument_group("quantization (W8A8Config fields, defaults are W8A8Config's)")
    quant.add_argument("--no-w8a8", action="store_true", help="skip the simulated W8A8 variant")
    quant.add_argument("--outlier-suppression", action="store_true", help="also evaluate W8A8 with Outlier Suppression")
    parser.add_dataclass_arguments(
        W8A8Config,
        W8A8_FLAGS,
        group=quant,
        optional=True,
        types={"num_calibration_batches": positive_int},
        helps={"clipping_steps": "Outlier Suppression: steps of the fine token-wise clipping stage (0: coarse only)"},
    )
    quant.add_argument(
        "--w8a8-preset",
        metavar="NAME",
        help="W8A8: a named paper setting (W8A8Config.preset, e.g. bondarenko2023-bert, wei2022-os-6bit); the "
        "other quantization flags apply on top (--preset is the GLUE fine-tuning preset)",
    )
    plots = parser.add_argument_group("plots")
    plots.add_argument("--no-plots", action="store_true", help="do not write plots/")
    plots.add_argument("--attention-layer", type=int, help="layer of the attention heatmap (default: last)")
    plots.add_argument("--attention-head", type=int, help="head of the attention heatmap (default 0)")
    glue = parser.add_argument_group("glue")
    glue.add_argument("--glue-task", help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli")
    glue.add_argument("--glue-data", help="folder of the original GLUE TSVs (<folder>/<Task>/*.tsv); default: Hub glue")
    glue.add_argument(
        "--preset",
        default="bondarenko",
        help="fine-tuning preset: bondarenko, liao-monz (MNLI/QNLI/QQP/SST-2), liao-monz-lr{1e-5,2e-5,3e-5}-bs{16,32} "
        "(their grid for CoLA/RTE/MRPC/STS-B), liao-monz-cpu (3 epochs) or cpu-smoke",
    )
    glue.add_argument("--max-train-samples", type=int, help="training examples used (default: all)")
    glue.add_argument("--max-eval-samples", type=int, help="evaluation examples used (default: all)")
    glue.add_argument("--max-steps", type=int, default=-1, help="fine-tuning steps (default -1: the preset's epochs)")
    return parser


def format_table(records: list[ResultRecord]) -> str:
    """Variants as rows, metrics as columns."""
    rows: dict[str, dict[str, float | None]] = {}
    metrics: list[str] = []
    for record in records:
        row = record.extra.get("variant", record.precision)
        rows.setdefault(row, {})[record.metric] = record.value
        if record.metric not in metrics:
            metrics.append(record.metric)
    width = max(len("variant"), *(len(r) for r in rows))
    lines = ["  ".join(["variant".ljust(width), *(m.rjust(14) for m in metrics)])]
    for row, values in rows.items():
        cells = [("-" if values.get(m) is None else f"{values[m]:.4g}").rjust(14) for m in metrics]
        lines.append("  ".join([row.ljust(width), *cells]))
    return "\n".join(lines)


def check_options(args: argparse.Namespace, given: set[str]) -> None:
    """Refuse every option the chosen task (or --no-w8a8) would ignore."""
    unused = {}
    if args.task == "glue":
        unused.update({name: "does not apply to --task glue" for name in NOT_GLUE})
    else:
        unused.update({name: f"applies to --task glue only, not {args.task}" for name in GLUE_ONLY})
        if args.task != "mlm":
            unused["mlm_probability"] = f"applies to --task mlm only, not {args.task}"
        if args.task == "image":
            unused["text_column"] = "applies to text tasks, not --task image"
        else:
            unused.update(
                {name: f"applies to --task image only, not {args.task}" for name in ("image_column", "label_column")}
            )
    if args.no_w8a8:
        unused.update({name: "has no effect with --no-w8a8" for name in W8A8_OPTIONS})
    elif not args.outlier_suppression and not _clips(args.w8a8_preset):
        unused["clipping_steps"] = "applies only with --outlier-suppression or a token-wise clipping --w8a8-preset"
    if args.append and args.overwrite:
        unused["overwrite"] = "and --append exclude each other: keep the earlier records or replace them"
    refuse_unused(given, unused)
    if args.w8a8_preset is not None:
        w8a8_overrides(args)  # an unknown preset name fails here, before any model is loaded


def _clips(preset: str | None) -> bool:
    """Whether the W8A8 preset `preset` runs token-wise clipping (False for none or an unknown name)."""
    if preset is None:
        return False
    from .quantization.config import PRESETS

    return any(preset.startswith(name) and fields.get("token_wise_clipping") for name, fields in PRESETS.items())


def w8a8_overrides(args: argparse.Namespace) -> dict:
    """W8A8Config fields set on the command line (all of the preset's, with --w8a8-preset)."""
    given = {name: getattr(args, name) for name in W8A8_FLAGS if getattr(args, name) is not None}
    if args.w8a8_preset is None:
        return given
    return W8A8Config.preset(args.w8a8_preset, **given).to_dict()


def check_results_file(path: Path, args: argparse.Namespace) -> None:
    """An existing results file is extended (--append) or replaced (--overwrite) only when it is ours."""
    if not path.exists():
        return
    read_results(path)  # ValueError naming the file when it is not a results file of this package
    if not (args.append or args.overwrite):
        raise ValueError(f"{path} exists: pass --append to add to its records or --overwrite to replace them")


def _output_dir(args: argparse.Namespace) -> Path:
    if args.output is not None:
        return args.output
    if Path(args.model).is_dir():
        return Path(args.model)
    return Path("eval-results") / args.model.replace("/", "--")


def run(args: argparse.Namespace) -> tuple[list[ResultRecord], Path]:
    from .evaluation.harness import EvalSettings, check_model_for_task, evaluate_model

    check_model_for_task(args.model, args.task, args.trust_remote_code)
    output = _output_dir(args)
    if args.task == "glue":
        return run_glue(args)
    check_results_file(output / "results.json", args)
    dataset, dataset_config = args.dataset, args.dataset_config
    if dataset is None:
        dataset, default_config = DEFAULT_DATASETS[args.task]
        dataset_config = dataset_config or default_config
    settings = EvalSettings(
        task=args.task,
        dataset=dataset,
        dataset_config=dataset_config,
        split=args.split,
        calibration_split=args.calibration_split,
        data_files=args.data_files,
        text_column=args.text_column,
        image_column=args.image_column,
        label_column=args.label_column,
        max_sequences=args.max_sequences,
        max_length=args.max_length,
        bos_at_block_start=args.task == "clm" and bool(recipe_data_field(args.model, "bos_at_block_start", False)),
        batch_size=args.batch_size,
        mlm_probability=args.mlm_probability,
        seed=args.seed,
        w8a8=not args.no_w8a8,
        outlier_suppression=args.outlier_suppression,
        w8a8_config=w8a8_overrides(args) or None,
        extra_precisions=tuple(name for name in ("fp16", "bf16") if getattr(args, name)),
    )
    records, _ = evaluate_model(
        args.model,
        settings,
        int8=args.int8,
        plots_dir=None if args.no_plots else output / "plots",
        attention_layer=args.attention_layer,
        attention_head=args.attention_head,
        trust_remote_code=args.trust_remote_code,
    )
    return records, write_results(records, output / "results.json", append=args.append)


def run_glue(args: argparse.Namespace) -> tuple[list[ResultRecord], Path]:
    """Fine-tune MODEL on a GLUE task and evaluate it FP and W8A8 (the quantization flags apply)."""
    from .evaluation.glue import finetune_glue, get_preset, get_task, is_glue_output
    from .paths import check_output_folder

    if not args.glue_task:
        raise ValueError("--task glue needs --glue-task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli)")
    get_task(args.glue_task), get_preset(args.preset)  # fail fast on bad names
    if args.glue_data and not Path(args.glue_data).is_dir():
        raise FileNotFoundError(f"--glue-data folder {args.glue_data!r} does not exist")
    target = args.output or Path("glue-runs") / f"{Path(args.model).name}-{args.glue_task}"
    check_output_folder(
        target, option="--output", is_own_output=is_glue_output, overwrite=args.overwrite, inputs=[args.model]
    )
    w8a8 = False
    if not args.no_w8a8:
        from .quantization import W8A8Config

        suppression = dict(gamma_migration=True, token_wise_clipping=True) if args.outlier_suppression else {}
        w8a8 = W8A8Config(**{**w8a8_overrides(args), **suppression})
    records = finetune_glue(
        args.model,
        args.glue_task,
        target,
        args.preset,
        args.glue_data,
        args.max_train_samples,
        args.max_eval_samples,
        args.max_steps,
        args.seed,
        w8a8,
    )
    return records, target / "results.json"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_options(args, given_options(parser, argv))
        records, path = run(args)
    except (ValueError, OSError) as error:  # bad input, missing files, unreachable Hub
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(records))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
