"""Quantize a trained quantizable model to a W8A8 INT8 checkpoint.

    python -m hf_quantizable.quantize runs/bert-gated --output runs/bert-gated-w8a8
    python -m hf_quantizable.quantize MODEL_DIR --output OUT --bits 6 --estimator percentile
    python -m hf_quantizable.quantize MINILM_DIR --output OUT --gamma-migration --token-wise-clipping

The output folder reloads with `AutoModel*.from_pretrained(OUT, trust_remote_code=True)`; it is
written to a temporary folder and renamed, so a failed run leaves nothing behind.
"""

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .quantization.config import ACTIVATION_ESTIMATORS, WEIGHT_ESTIMATORS, W8A8Config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hf_quantizable.quantize",
        description="W8A8 post-training quantization (static ranges from calibration) to an INT8 checkpoint.",
    )
    parser.add_argument("model_dir", help="save_pretrained folder of a quantizable (or stock BERT/OPT/ViT) model")
    parser.add_argument("--output", required=True, help="folder of the INT8 checkpoint")
    parser.add_argument(
        "--calibration-data",
        help="text file, one example per line (default: WikiText-2 validation), or an image folder for ViT",
    )
    parser.add_argument("--bits", type=int, help="weight and activation bits (sets both)")
    parser.add_argument("--weight-bits", type=int, help="weight bits (default 8)")
    parser.add_argument("--activation-bits", type=int, help="activation bits (default 8)")
    parser.add_argument("--estimator", help=f"activation range estimator: {', '.join(ACTIVATION_ESTIMATORS)}")
    parser.add_argument("--weight-estimator", help=f"weight range estimator: {', '.join(WEIGHT_ESTIMATORS)}")
    parser.add_argument("--percentile", type=float, help="percentile of the `percentile` estimator (99.99)")
    parser.add_argument("--num-batches", type=int, help="calibration batches (default 16)")
    parser.add_argument("--batch-size", type=int, default=16, help="calibration batch size (default 16)")
    parser.add_argument("--max-length", type=int, default=128, help="calibration sequence length (default 128)")
    parser.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
    parser.add_argument(
        "--per-channel-residuals", action="store_true", help="per-channel grids for the residual-stream activations"
    )
    parser.add_argument(
        "--outlier-channels", type=int, help="channels per linear input on a second grid of their own (default 0)"
    )
    parser.add_argument("--gamma-migration", action="store_true", help="Outlier Suppression gamma migration")
    parser.add_argument("--token-wise-clipping", action="store_true", help="Outlier Suppression token-wise clipping")
    parser.add_argument("--config", help="JSON file with W8A8Config fields (command-line flags win)")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> W8A8Config:
    """W8A8Config from `--config` and the flags (raises ValueError on bad values)."""
    fields = json.loads(Path(args.config).read_text()) if args.config else {}
    flags = {
        "weight_bits": args.weight_bits if args.weight_bits is not None else args.bits,
        "activation_bits": args.activation_bits if args.activation_bits is not None else args.bits,
        "activation_estimator": args.estimator,
        "weight_estimator": args.weight_estimator,
        "percentile": args.percentile,
        "num_calibration_batches": args.num_batches,
        "per_channel_weights": args.per_channel or None,
        "per_channel_residuals": args.per_channel_residuals or None,
        "outlier_channels": args.outlier_channels,
        "gamma_migration": args.gamma_migration or None,
        "token_wise_clipping": args.token_wise_clipping or None,
    }
    fields.update({k: v for k, v in flags.items() if v is not None})
    return W8A8Config.from_dict(fields)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


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
        f"W{config.weight_bits}A{config.activation_bits} INT8 checkpoint -> {output}",
        f"  weights: {config.weight_estimator}, {'per-channel' if config.per_channel_weights else 'per-tensor'}"
        f" symmetric; activations: {config.activation_estimator}, asymmetric, {_activation_grids(config)}",
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
        model_dir = Path(args.model_dir)
        from .quantization.data import calibration_batches
        from .quantization.quantizer import W8A8Quantizer, model_class_for

        model_type = model_class_for(model_dir).config_class.model_type
        batches, processor = calibration_batches(
            model_dir,
            args.calibration_data,
            args.batch_size,
            args.max_length,
            config.num_calibration_batches,
            model_type,
        )
        if not batches:
            raise ValueError(f"the calibration set is empty: no usable example in {args.calibration_data!s}")
        quantizer = W8A8Quantizer.from_pretrained(model_dir)
        with tqdm(total=len(batches), desc="calibrating", unit="batch") as bar:
            output = quantizer.quantize(
                args.output, quantization_config=config, calibration_dataset=batches, progress=bar, processor=processor
            )
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    source_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print(summary(quantizer.report, config, output, source_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
