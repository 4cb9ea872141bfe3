"""Inference latency of floating-point models under torch.compile (inductor, CPU) against eager.

    python benchmarks/compile_speed.py [--layers 4 --hidden 256 --seq 128 --batch 8 --repeats 7]
        [--families bert opt vit] [--output benchmarks/results/compile_speed.json]

For each family and attention setting (vanilla with SDPA and with eager, gated with SDPA, clipped and
normalized clipped softmax with their registered functions), a randomly initialised fp32 model in
eval mode runs a no-grad forward of `--batch` x `--seq` tokens (ViT: `--batch` images with about
`--seq` patches). `compile_s` is the first compiled call (compilation included); then eager and
compiled forwards alternate for `--repeats` rounds, and the medians, their ratio and the largest
absolute logit difference between compiled and eager are printed and written as JSON.
"""

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from hf_quantizable import (
    QuantizableBertConfig,
    QuantizableBertForMaskedLM,
    QuantizableOPTConfig,
    QuantizableOPTForCausalLM,
    QuantizableViTConfig,
    QuantizableViTForImageClassification,
)
from hf_quantizable.evaluation.results import package_versions
from hf_quantizable.paths import write_text_atomic

RESULTS = Path(__file__).parent / "results" / "compile_speed.json"
SETTINGS = {  # label -> (attn_impl, attn_implementation)
    "softmax (sdpa)": ("softmax", "sdpa"),
    "softmax (eager)": ("softmax", "eager"),
    "gated (sdpa)": ("gated", "sdpa"),
    "clipped_softmax": ("clipped_softmax", None),
    "normalized_clipped_softmax": ("normalized_clipped_softmax", None),
}


def build(family: str, attn_impl: str, attn_implementation: str | None, args: argparse.Namespace):
    """A model of `family` and one batch of inputs for it."""
    size = dict(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        attn_impl=attn_impl,
        **({} if attn_implementation is None else {"attn_implementation": attn_implementation}),
    )
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if family == "vit":
        side = 16 * math.isqrt(args.seq)  # 16-pixel patches: about `seq` of them
        config = QuantizableViTConfig(**size, intermediate_size=4 * args.hidden, image_size=side, patch_size=16)
        model = QuantizableViTForImageClassification(config)
        return model, {"pixel_values": torch.randn(args.batch, 3, side, side, generator=generator)}
    input_ids = torch.randint(5, 1000, (args.batch, args.seq), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if family == "bert":
        config = QuantizableBertConfig(**size, vocab_size=1000, intermediate_size=4 * args.hidden)
        return QuantizableBertForMaskedLM(config), inputs
    config = QuantizableOPTConfig(
        **size, vocab_size=1000, ffn_dim=4 * args.hidden, word_embed_proj_dim=args.hidden, use_cache=False
    )
    return QuantizableOPTForCausalLM(config), inputs


def forward_time(model, inputs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    logits = model(**inputs).logits
    return time.perf_counter() - start, logits


@torch.no_grad()
def measure(family: str, label: str, args: argparse.Namespace) -> dict:
    attn_impl, attn_implementation = SETTINGS[label]
    torch._dynamo.reset()
    model, inputs = build(family, attn_impl, attn_implementation, args)
    model.eval()
    compiled = torch.compile(model)
    forward_time(model, inputs)  # eager warm-up
    compile_s, compiled_logits = forward_time(compiled, inputs)
    eager_times, compiled_times = [], []
    for _ in range(args.repeats):
        seconds, eager_logits = forward_time(model, inputs)
        eager_times.append(seconds)
        seconds, compiled_logits = forward_time(compiled, inputs)
        compiled_times.append(seconds)
    eager, fast = statistics.median(eager_times), statistics.median(compiled_times)
    return {
        "family": family,
        "setting": label,
        "attn_implementation": model.config._attn_implementation,
        "compile_s": compile_s,
        "eager_median_s": eager,
        "compiled_median_s": fast,
        "speedup": eager / fast,
        "max_abs_logit_diff": (compiled_logits - eager_logits).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (one eager + one compiled forward)")
    parser.add_argument("--families", nargs="+", choices=("bert", "opt", "vit"), default=["bert", "opt", "vit"])
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = []
    print(
        f"{'family':6s} {'setting':28s} {'compile s':>10s} {'eager s':>9s} {'compiled s':>11s} {'x':>6s} {'max diff':>9s}"
    )
    for family in args.families:
        for label in args.settings:
            row = measure(family, label, args)
            rows.append(row)
            print(
                f"{family:6s} {label:28s} {row['compile_s']:10.1f} {row['eager_median_s']:9.4f} "
                f"{row['compiled_median_s']:11.4f} {row['speedup']:6.2f} {row['max_abs_logit_diff']:9.2e}"
            )
    result = {
        "benchmark": "compile_speed",
        "setting": vars(args) | {"output": str(args.output), "mode": "no-grad forward, fp32, inductor (CPU)"},
        "results": rows,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": package_versions(),
    }
    write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
