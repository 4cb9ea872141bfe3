"""Forward+backward step time of each attention variant against vanilla SDPA, measured side by side.

    python benchmarks/attention_overhead.py [--layers 4 --hidden 512 --seq 128 --batch 16 --repeats 7]

Every variant is timed in interleaved rounds (variant order rotates each round) so that machine
noise hits all of them alike; the median step time per variant and its ratio to our vanilla SDPA
model are printed and written to benchmarks/results/attention_overhead.json.
Targets (issue 2): gated <= 1.05x vanilla, clipped <= 1.3x.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import BertConfig, BertForMaskedLM

from hf_quantizable import QuantizableBertConfig, QuantizableBertForMaskedLM
from hf_quantizable.paths import write_text_atomic

RESULTS = Path(__file__).parent / "results" / "attention_overhead.json"

VARIANTS = {
    "softmax (SDPA)": {"attn_impl": "softmax"},
    "gated linear": {"attn_impl": "gated", "gate_type": "linear"},
    "gated mlp": {"attn_impl": "gated", "gate_type": "mlp"},
    "gated all_heads_linear": {"attn_impl": "gated", "gate_type": "all_heads_linear"},
    "clipped_softmax": {"attn_impl": "clipped_softmax"},
    "normalized_clipped_softmax": {"attn_impl": "normalized_clipped_softmax"},
}


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    size = dict(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(512, args.seq),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    models = {}
    for name, options in VARIANTS.items():
        torch.manual_seed(0)
        models[name] = QuantizableBertForMaskedLM(QuantizableBertConfig(**size, **options)).train()
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        models[f"stock transformers ({impl})"] = BertForMaskedLM(BertConfig(**size, attn_implementation=impl)).train()
    return models


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    models = build_models(args)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    names = list(models)
    for name in names:  # warm-up
        step(models[name], batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            step(models[name], batch)
            times[name].append(time.perf_counter() - start)

    baseline = statistics.median(times["softmax (SDPA)"])
    rows = []
    print(f"{'variant':32s} {'median s/step':>14s} {'x vanilla SDPA':>15s}")
    for name in names:
        median = statistics.median(times[name])
        rows.append({"variant": name, "median_step_s": median, "ratio_vs_vanilla_sdpa": median / baseline})
        print(f"{name:32s} {median:14.4f} {median / baseline:15.3f}")

    result = {
        "benchmark": "attention_overhead",
        "setting": vars(args) | {"output": str(args.output), "mode": "forward+backward, MLM loss, fp32"},
        "targets": {"gated": 1.05, "clipped": 1.3},
        "results": rows,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
