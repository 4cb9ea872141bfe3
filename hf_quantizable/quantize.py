"""Quantize a trained quantizable model to a W8A8 INT8 checkpoint.

    python -m hf_quantizable.quantize runs/bert-gated --output runs/bert-gated-w8a8
    python -m hf_quantizable.quantize MODEL_DIR --output OUT --bits 6 --activation-estimator percentile
    python -m hf_quantizable.quantize MINILM_DIR --output OUT --gamma-migration --token-wise-clipping
    python -m hf_quantizable.quantize MINILM_DIR --output OUT --preset wei2022-os-6bit

Every W8A8Config field but `preset_name` is a flag of its name (`--per-channel-weights`,
`--num-calibration-batches`, ...), generated from the dataclass; the calibration data flags come from
`cli.DataArguments` (see `hf_quantizable.cli` for the names and their deprecated aliases).

The output folder reloads with `AutoModel*.from_pretrained(OUT, trust_remote_code=True)`; it is
written to a temporary folder and renamed, so a failed or interrupted run leaves nothing behind.
OUT must be new or empty; `--overwrite` replaces a previous output of this command, never anything
else. Bad input exits with status 2 and one `error: ...` line, Ctrl-C with status 130.
"""

import argparse
import json
import sys
from dataclasses import fields as dataclass_fields
from pathlib import Path

from tqdm.auto import tqdm

from . import families
from .cli import DataArguments, OneLineErrorParser, positive_int
from .quantization.config import W8A8Config, preset_names

DEFAULT_MAX_LENGTH = 128
# Fields only some settings read: accepted only with those settings (no value is silently ignored).
_ESTIMATOR_OF_FIELD = {"percentile": ("percentile",), "momentum": ("running_minmax", "percentile")}
_CLIPPING_FIELDS = ("clipping_quantiles", "clipping_steps", "clipping_lr")


# W8A8Config fields the command line does not set (`preset_name` records where a setting came from);
# every other field is a flag of its own name, generated from the dataclass.
NOT_FLAGS = ("preset_name",)
W8A8_FLAGS = tuple(f.name for f in dataclass_fields(W8A8Config) if f.name not in NOT_FLAGS)
# Old flag names, accepted (with a deprecation line) for one release.
DEPRECATED_FLAGS = {
    "--num-batches": "--num-calibration-batches",
    "--per-channel": "--per-channel-weights",
    "--estimator": "--activation-estimator",
    "--calibration-data": "--dataset",
}


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="python -m hf_quantizable.quantize",
        description="W8A8 post-training quantization (static ranges from calibration) to an INT8 checkpoint.",
    )
    parser.add_argument("model_dir", help="save_pretrained folder of a quantizable (or stock BERT/OPT/ViT) model")
    parser.add_argument("--output", required=True, help="folder of the INT8 checkpoint (new or empty)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output if it holds a previous INT8 output of this command"
    )
    data = parser.add_argument_group("calibration data")
    parser.add_dataclass_arguments(
        DataArguments,
        ("dataset", "batch_size", "max_length"),
        group=data,
        defaults={"batch_size": 16, "max_length": None},
        types={"batch_size": positive_int, "max_length": positive_int},
        helps={
            "dataset": "calibration text file, one example per line (default: WikiText-2 validation), or an image "
            "folder for ViT",
            "batch_size": "calibration batch size",
            "max_length": f"calibration sequence length of text models (default {DEFAULT_MAX_LENGTH}, at most the "
            "model's positions)",
        },
    )
    quant = parser.add_argument_group(
        "quantization (W8A8Config fields; a flag given overrides --preset and --config, defaults are W8A8Config's)"
    )
    parser.add_dataclass_arguments(
        W8A8Config, W8A8_FLAGS, group=quant, optional=True, types={"num_calibration_batches": positive_int}
    )
    quant.add_argument("--bits", type=int, help="weight and activation bits (sets both)")
    quant.add_argument(
        "--weights-only",
        action="store_true",
        help="quantize the weights only, activations stay in floating point (--activation-nodes none)",
    )
    quant.add_argument(
        "--preset",
        choices=preset_names(),
        metavar="NAME",
        help=f"a named paper setting (W8A8Config.preset), under --config and the flags: {', '.join(preset_names())}",
    )
    quant.add_argument("--config", help="JSON file with W8A8Config fields (command-line flags win)")
    for old, new in DEPRECATED_FLAGS.items():
        parser.add_deprecated_alias(old, new)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def read_config_file(path: str) -> dict:
    """The W8A8Config fields of a `--config` JSON file (errors name the file)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--config file {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"--config file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"--config file {path} must hold a JSON object of W8A8Config fields, not a {type(data).__name__}"
        )
    return data


def check_fields_used(given: set[str], config: W8A8Config) -> None:
    """Refuse settings given explicitly that this configuration would not read."""
    for name, estimators in _ESTIMATOR_OF_FIELD.items():
        if name in given and config.activation_estimator not in estimators:
            also = "".join(f" (and by `{e}`)" for e in estimators[1:])
            raise ValueError(
                f"`{name}` is read only by the `{estimators[0]}` activation estimator, not by "
                f"{config.activation_estimator!r}{also}: pass --activation-estimator {estimators[0]} or drop it"
            )
    unused = [name for name in _CLIPPING_FIELDS if name in given and not config.token_wise_clipping]
    if unused:
        raise ValueError(f"{', '.join(f'`{n}`' for n in unused)} are read only with --token-wise-clipping")


def build_config(args: argparse.Namespace) -> W8A8Config:
    """W8A8Config from `--config` and the flags (raises ValueError on bad or unused values)."""
    if args.bits is not None and args.weight_bits is not None and args.activation_bits is not None:
        raise ValueError("--bits would be ignored: --weight-bits and --activation-bits are both given")
    fields = read_config_file(args.config) if args.config else {}
    if args.weights_only and args.activation_nodes is not None:
        raise ValueError("--weights-only is --activation-nodes none: pass one of them")
    flags = {name: getattr(args, name) for name in W8A8_FLAGS}
    for name in ("weight_bits", "activation_bits"):
        flags[name] = flags[name] if flags[name] is not None else args.bits
    if args.weights_only:
        flags["activation_nodes"] = "none"
    fields.update({k: v for k, v in flags.items() if v is not None})
    if args.preset:
        unknown = sorted(set(fields) - set(W8A8Config().to_dict()))
        if unknown:
            W8A8Config.from_dict(fields)  # the error naming the unknown fields
        config = W8A8Config.preset(args.preset, **fields)
    else:
        config = W8A8Config.from_dict(fields)
    check_fields_used(set(fields), config)
    return config


def max_length_for(args: argparse.Namespace, model_config: dict, model_type: str) -> int | None:
    """The calibration sequence length: refused for image models (ViT), bounded by the positions."""
    if families.modality(families.family_of(model_type)) == "image":
        if args.max_length is not None:
            raise ValueError(f"--max-length applies to text models only; {model_type} calibrates on whole images")
        return None
    positions = model_config.get("max_position_embeddings")
    if args.max_length is not None and positions is not None and args.max_length > positions:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's max_position_embeddings ({positions})")
    return args.max_length or min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _activations(config: W8A8Config) -> str:
    if config.activation_nodes == "none":
        return "floating point (weights only)"
    nodes = "every quantization point" if config.activation_nodes == "all" else "matrix-product inputs only"
    return f"{config.activation_estimator}, asymmetric, {_activation_grids(config)}; {nodes}"


def _activation_grids(config: W8A8Config) -> str:
    grids = ["per tensor"]
    if config.per_channel_residuals:
        grids.append("per channel in the residual stream")
    if config.outlier_channels:
        grids.append(f"{config.outlier_channels} outlier channels per linear input on their own grid")
    return ", ".join(grids)


def summary(report: dict, config: W8A8Config, output: Path, source_bytes: int) -> str:
    """One screen: settings, nodes, widest ranges, sizes, time."""
    ranges = report["quantized_activations"]
    widest = sorted(ranges.items(), key=lambda item: item[1][0] - item[1][1])[:5]
    int8_gemm = sum(source is not None for source in report["quantized_linears"].values())
    lines = [
        f"W{config.weight_bits}A{config.activation_bits} INT8 checkpoint -> {output}"
        + (f" (preset {config.preset_name})" if config.preset_name else ""),
        f"  weights: {config.weight_estimator}, {'per-channel' if config.per_channel_weights else 'per-tensor'}"
        f" symmetric; activations: {_activations(config)}",
        f"  outlier suppression: gamma migration={config.gamma_migration}, "
        f"token-wise clipping={config.token_wise_clipping}",
        f"  quantized activations: {len(ranges)}; quantized linear layers: {len(report['quantized_linears'])} "
        f"({int8_gemm} with int8 GEMM); kept in FP: {', '.join(config.keep_fp_modules)}, gates, LayerNorms",
        "  widest activation ranges:",
        *(f"    {name}: [{lo:.3g}, {hi:.3g}]" for name, (lo, hi) in widest),
        f"  linear weights: {_mib(report['linear_weights_fp32'])} fp32 -> {_mib(report['linear_weights_int8'])} int8"
        f" ({report['linear_weights_fp32'] / report['linear_weights_int8']:.2f}x smaller)",
        f"  checkpoint: {_mib(source_bytes)} -> {_mib(report['checkpoint_bytes'])}",
        f"  calibration: {report['calibration_batches']} batches in {report['calibration_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
        model_dir = Path(args.model_dir)
        from .paths import read_model_config
        from .quantization.data import calibration_batches
        from .quantization.export import check_output_dir
        from .quantization.quantizer import W8A8Quantizer, check_weight_files, model_class_for

        model_type = model_class_for(model_dir).config_class.model_type
        model_config = read_model_config(model_dir)
        if args.gated_context is not None and model_config.get("attn_impl") != "gated":
            raise ValueError(
                f"--gated-context is read only by gated-attention models; {model_dir} has attn_impl="
                f"{model_config.get('attn_impl', 'softmax')!r}: drop it"
            )
        max_length = max_length_for(args, model_config, model_type)
        check_weight_files(model_dir)
        check_output_dir(args.output, model_dir, args.overwrite)
        batches, processor = calibration_batches(
            model_dir,
            args.dataset,
            args.batch_size,
            max_length,
            config.num_calibration_batches,
            model_type,
        )
        if not batches:
            raise ValueError(f"the calibration set is empty: no usable example in {args.dataset!s}")
        quantizer = W8A8Quantizer.from_pretrained(model_dir)
        with tqdm(total=len(batches), desc="calibrating", unit="batch") as bar:
            output = quantizer.quantize(
                args.output,
                quantization_config=config,
                calibration_dataset=batches,
                progress=bar,
                processor=processor,
                overwrite=args.overwrite,
            )
    except (ValueError, OSError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.output}", file=sys.stderr)
        return 130
    source_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print(summary(quantizer.report, config, output, source_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
