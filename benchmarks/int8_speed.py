"""CPU latency of W8A8 INT8 inference: fp32 eager vs our INT8 runtime vs torch.ao dynamic int8 vs quanto W8A8.

BERT-base size (12 layers, hidden 768, FFN 3072) and OPT-125m size (same body), batch 8, seq 128,
random weights (latency does not depend on the values; our runtime's sparse saturation correction
is measured with the entries random weights produce). Base models without task heads, so every
method quantizes the same linear layers.

    python benchmarks/int8_speed.py [--repeats 5] [--threads N] [--output benchmarks/results/int8_speed.json]
"""

import argparse
import copy
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
import transformers
from torch import nn

import hf_quantizable
from hf_quantizable import QuantizableBertConfig, QuantizableBertModel, QuantizableOPTConfig, QuantizableOPTModel
from hf_quantizable.quantization import W8A8Config, quantize_model
from hf_quantizable.quantization.export import build_int8_model

BATCH, SEQ = 8, 128


class PeakRSS:
    """Peak resident memory (bytes) of this process while the block runs, sampled every 2 ms."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def models() -> dict[str, tuple[nn.Module, dict]]:
    torch.manual_seed(0)
    bert = QuantizableBertModel(QuantizableBertConfig(), add_pooling_layer=False)
    opt = QuantizableOPTModel(
        QuantizableOPTConfig(
            hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, word_embed_proj_dim=768
        )
    )
    return {"bert-base": (bert.eval(), {"vocab": 30522}), "opt-125m": (opt.eval(), {"vocab": 50272})}


def batches(vocab: int, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(4, vocab, (BATCH, SEQ), generator=generator),
            "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
        }
        for _ in range(n)
    ]


def latency(model: nn.Module, batch: dict, repeats: int) -> dict:
    """Median / min seconds per forward (after one warm-up), and the peak RSS growth during them."""
    times = []
    with torch.inference_mode():
        model(**batch)
        with PeakRSS() as memory:
            for _ in range(repeats):
                start = time.perf_counter()
                model(**batch)
                times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_growth_mib": (memory.peak - memory.start) / 2**20,
    }


def ours(model: nn.Module, calibration: list[dict]) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    simulated = quantize_model(copy.deepcopy(model), W8A8Config(num_calibration_batches=len(calibration)), calibration)
    int8 = build_int8_model(simulated)
    return int8, time.perf_counter() - start


def torch_dynamic(model: nn.Module) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    return quantized, time.perf_counter() - start


def quanto_w8a8(model: nn.Module, calibration: list[dict]) -> tuple[nn.Module, float]:
    from optimum.quanto import Calibration, freeze, qint8, quantize

    start = time.perf_counter()
    quantized = copy.deepcopy(model)
    quantize(quantized, weights=qint8, activations=qint8)
    with torch.inference_mode(), Calibration(momentum=0.9):
        for batch in calibration:
            quantized(**batch)
    freeze(quantized)
    return quantized, time.perf_counter() - start


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--models", nargs="*", default=["bert-base", "opt-125m"])
    parser.add_argument("--skip-quanto", action="store_true", help="leave out quanto W8A8 (very slow on CPU)")
    parser.add_argument("--output", default="benchmarks/results/int8_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name, (model, info) in models().items():
        if name not in args.models:
            continue
        calibration = batches(info["vocab"], args.calibration_batches, seed=1)
        batch = batches(info["vocab"], 1, seed=2)[0]
        rows = {"fp32 eager": (model, 0.0)}
        rows["ours int8 (W8A8 static)"] = ours(model, calibration)
        rows["torch.ao dynamic int8"] = torch_dynamic(model)
        if not args.skip_quanto:
            rows["quanto W8A8"] = quanto_w8a8(model, calibration)
        entry = {}
        for label, (variant, prepare_s) in rows.items():
            entry[label] = {
                **latency(variant, batch, args.repeats),
                "prepare_s": prepare_s,
                "state_bytes": state_bytes(variant),
            }
            print(
                f"{name} {label:26s} {entry[label]['median_s'] * 1e3:8.1f} ms  (prepare {prepare_s:.1f} s)", flush=True
            )
        fp32 = entry["fp32 eager"]["median_s"]
        for row in entry.values():
            row["speedup_vs_fp32"] = fp32 / row["median_s"]
        ours_s = entry["ours int8 (W8A8 static)"]["median_s"]
        entry["ours_vs_peers"] = {
            label: entry[label]["median_s"] / ours_s
            for label in ("torch.ao dynamic int8", "quanto W8A8")
            if label in entry
        }
        results[name] = entry
        print(
            f"{name}: speed-up vs fp32 "
            + ", ".join(f"{k} {v['speedup_vs_fp32']:.2f}x" for k, v in entry.items() if "median_s" in v)
        )

    record = {
        "benchmark": "int8_speed",
        "setting": f"batch {BATCH}, seq {SEQ}, base models (no task head), random weights, median of {args.repeats} after a warm-up",
        "calibration_batches": args.calibration_batches,
        "results": results,
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "hf_quantizable": hf_quantizable.__version__,
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
