"""What the Bondarenko et al. BERT node set's embedding tables and LayerNorm weights cost on MiniLM.

The `bondarenko2023-bert` preset quantizes the embedding tables (int8 in the checkpoint), the word +
token-type partial sum and every LayerNorm weight, as the official code does. This runs the preset
with and without those two options on all-MiniLM-L6-v2 (W8A8 and W6A6) and records, side by side,
the cosine similarity of FP vs quantized mean-pooled embeddings on WikiText-2 test lines
(calibration on WikiText-2 validation, batches of 32 lines, at most 128 tokens, as
benchmarks/paper_settings.py) and the INT8 checkpoint's size relative to the fp32 safetensors file.

    python benchmarks/embedding_quantization.py [--output benchmarks/results/embedding_quantization.json] [--lines 192]
"""

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers
from minilm_setup import MODEL_DESCRIPTION, eval_description, load_minilm

import hf_quantizable
from hf_quantizable.evaluation.results import cpu_description
from hf_quantizable.paths import write_text_atomic
from hf_quantizable.quantization import W8A8Config, W8A8Quantizer

VARIANTS = {
    "tables + partial sum + LayerNorm weights (the preset)": {},
    "tables + partial sum only": {"quantize_layernorm_weights": False},
    "LayerNorm weights only": {"quantize_embeddings": False},
    "neither (the preset before, FP tables)": {"quantize_embeddings": False, "quantize_layernorm_weights": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/embedding_quantization.json")
    parser.add_argument("--lines", type=int, default=192, help="WikiText-2 test lines evaluated")
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 6])
    args = parser.parse_args()
    torch.manual_seed(0)
    bench = load_minilm(args.lines)
    fp32_bytes = (bench.path / "model.safetensors").stat().st_size
    results = {}
    for bits in args.bits:
        preset = "bondarenko2023-bert" if bits == 8 else f"bondarenko2023-bert-{bits}bit"
        for variant, overrides in VARIANTS.items():
            config = W8A8Config.preset(preset, **overrides)
            calibration = bench.calibration(32, config.num_calibration_batches)
            quantizer = W8A8Quantizer(copy.deepcopy(bench.fp_model))
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                out = quantizer.quantize(Path(tmp) / "int8", config, calibration)
                checkpoint_bytes = (out / "model.safetensors").stat().st_size
            seconds = time.perf_counter() - start
            cosine = bench.cosine(quantizer.simulated_model)
            name = f"W{bits}A{bits} {variant}"
            results[name] = {
                "mean_cosine": cosine.mean().item(),
                "min_cosine": cosine.min().item(),
                "checkpoint_bytes": checkpoint_bytes,
                "checkpoint_over_fp32": checkpoint_bytes / fp32_bytes,
                "quantize_seconds": seconds,
                "config": config.to_dict(),
            }
            print(
                f"{name:70s} mean cos {cosine.mean():.4f}  min {cosine.min():.4f}  "
                f"checkpoint {checkpoint_bytes / fp32_bytes:.3f}x  ({seconds:.0f} s)",
                flush=True,
            )
            record = {
                "benchmark": "embedding_quantization",
                "model": MODEL_DESCRIPTION,
                "metric": "cosine similarity of FP vs quantized (simulated = INT8, bit-exact) mean-pooled embeddings",
                "eval_data": eval_description(args.lines),
                "calibration_data": "WikiText-2 validation, batches of 32 lines (max 128 tokens), 16 batches",
                "fp32_checkpoint_bytes": fp32_bytes,
                "results": results,
                "machine": {"platform": platform.platform(), "cpu": cpu_description()[0]},
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "hf_quantizable": hf_quantizable.__version__,
                },
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            write_text_atomic(args.output, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
