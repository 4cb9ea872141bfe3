"""Train vanilla, clipped and gated variants of one preset for the same budget and compare them.

Side by side per variant: FP quality and simulated-W8A8 quality on fixed evaluation batches (the
quantizer's paper setting, 16 calibration batches), max inf norm, average / max kurtosis, gate
statistics, wall time, and the tracked curve of the statistics during training.

    python benchmarks/outlier_effect.py --preset bert-tiny --max-steps 2000 \
        --label noop-lr1e-3 data.dataset=embedded-noop hidden_dropout_prob=0 --output benchmarks/results/outlier_effect.json

Each call adds one entry (`--label`) to the `runs` list of `--output`.
"""

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from hf_quantizable.evaluation import compute_outlier_stats
from hf_quantizable.evaluation.results import package_versions
from hf_quantizable.paths import write_text_atomic
from hf_quantizable.training.callbacks import gate_statistics, probe_quality, record_gates
from hf_quantizable.training.presets import VARIANTS, apply_overrides, get_preset
from hf_quantizable.training.runner import (
    DataCollatorForLanguageModeling,
    build_run,
    default_data_collator,
    fixed_batches,
)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def final_stats(run, preset, eval_batches: int, w8a8: bool) -> dict:
    trainer = run.trainer
    model = trainer.model.eval()
    family = preset.family
    processing = trainer.processing_class
    if family == "bert":
        collator = DataCollatorForLanguageModeling(processing, mlm_probability=preset.data.mlm_probability)
    elif family == "opt":
        collator = DataCollatorForLanguageModeling(processing, mlm=False)
    else:
        collator = default_data_collator
    batch_size = trainer.args.per_device_eval_batch_size
    batches = fixed_batches(trainer.eval_dataset, collator, batch_size, eval_batches)
    with record_gates(model) as gates:
        fp = probe_quality(model, batches)
    with torch.no_grad():
        outliers = compute_outlier_stats(model, [{k: v for k, v in b.items() if k != "labels"} for b in batches])
    stats = {
        "fp": fp,
        "max_inf_norm": outliers["max_inf_norm"],
        "avg_kurtosis": outliers["avg_kurtosis"],
        "max_kurtosis": outliers["max_kurtosis"],
        "gates": gate_statistics(gates),
        "eval_sequences": sum(len(b["labels"]) for b in batches),
    }
    if w8a8:
        from hf_quantizable.quantization import W8A8Config, quantize_model

        calibration = fixed_batches(trainer.train_dataset, collator, batch_size, 16, keep_labels=False)
        quantized = quantize_model(copy.deepcopy(model), W8A8Config(), calibration).eval()
        stats["w8a8"] = probe_quality(quantized, batches)
    return stats


def run_variant(base: str, variant: str, overrides: list[str], max_steps: int, track_every: int, args) -> dict:
    preset = apply_overrides(
        get_preset(f"{base}-{variant}"),
        overrides + [f"training.max_steps={max_steps}", f"tracking.outlier_every_n_steps={track_every}"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(
            preset,
            Path(tmp) / "run",
            training_overrides={"disable_tqdm": True, "save_strategy": "no", "logging_steps": track_every},
        )
        start = time.perf_counter()
        result = run.trainer.train()
        wall = time.perf_counter() - start
        stats = final_stats(run, preset, args.eval_batches, not args.no_w8a8)
    losses = [(h["step"], h["loss"]) for h in run.trainer.state.log_history if "loss" in h]
    curve = [
        {k: v for k, v in h.items() if not k.startswith("gates/per_layer")}
        for h in (run.tracker.history if run.tracker else [])
    ]
    return {
        "preset": preset.name,
        "model": preset.model,
        "wall_time_s": round(wall, 1),
        "train_loss": result.metrics["train_loss"],
        "loss_curve": losses,
        "tracking": curve,
        **stats,
    }


def print_table(label: str, results: dict[str, dict]) -> None:
    print(f"\n== {label}")
    header = f"{'variant':10s} {'FP':>10s} {'W8A8':>10s} {'W8A8/FP':>8s} {'maxinf':>8s} {'avg kurt':>9s} {'max kurt':>9s} {'gate mean':>9s} {'time s':>7s}"
    print(header)
    vanilla = results.get("vanilla")
    for variant, r in results.items():
        key = "accuracy" if "accuracy" in r["fp"] else "perplexity"
        fp = r["fp"][key]
        q = r.get("w8a8", {}).get(key, float("nan"))
        print(
            f"{variant:10s} {fp:10.3f} {q:10.3f} {q / fp:8.3f} {r['max_inf_norm']:8.2f} {r['avg_kurtosis']:9.2f} "
            f"{r['max_kurtosis']:9.2f} {r['gates'].get('gates/mean', float('nan')):9.3f} {r['wall_time_s']:7.0f}"
        )
    if vanilla:
        for variant, r in results.items():
            if variant != "vanilla":
                print(
                    f"  {variant} vs vanilla: max inf norm x{r['max_inf_norm'] / vanilla['max_inf_norm']:.2f}, "
                    f"avg kurtosis x{r['avg_kurtosis'] / vanilla['avg_kurtosis']:.2f}, time x{r['wall_time_s'] / vanilla['wall_time_s']:.2f}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-tiny", help="preset base name (without -vanilla/-clipped/-gated)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--track-every", type=int, default=250)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-w8a8", action="store_true", help="skip the simulated W8A8 evaluation")
    parser.add_argument("--label", required=True, help="name of this setting in the results file")
    parser.add_argument("--note", default="", help="free text stored with the run")
    parser.add_argument("--output", default="benchmarks/results/outlier_effect.json")
    parser.add_argument("overrides", nargs="*", help="preset overrides field=value, applied to every variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for variant in args.variants:
        results[variant] = run_variant(args.preset, variant, args.overrides, args.max_steps, args.track_every, args)
        print(f"{variant}: done in {results[variant]['wall_time_s']} s", file=sys.stderr, flush=True)
    print_table(args.label, results)
    output = Path(args.output)
    document = json.loads(output.read_text()) if output.exists() else {"benchmark": "outlier_effect", "runs": []}
    document["runs"] = [r for r in document["runs"] if r["label"] != args.label] + [
        {
            "label": args.label,
            "note": args.note,
            "preset": args.preset,
            "overrides": args.overrides,
            "max_steps": args.max_steps,
            "machine": machine(),
            "versions": package_versions(),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "variants": results,
        }
    ]
    write_text_atomic(output, json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
