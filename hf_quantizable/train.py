"""Pre-train a quantizable model from a named recipe.

    python -m hf_quantizable.train --preset bert-tiny-gated --output runs/bert-gated
    python -m hf_quantizable.train --preset opt-125m-gated --output runs/opt fp16=false max_steps=1000
    accelerate launch -m hf_quantizable.train --preset bert-6l-gated --output runs/bert6

Overrides are `field=value` (`learning_rate=3e-4`, `model.num_hidden_layers=4`,
`data.dataset=/path/to/text.txt`); `--list-presets` and `--list-fields PRESET` show what exists.
An interrupted run continues with the same command plus `--resume`.
"""

import argparse
import json
import sys

from .training.presets import PRESETS, allowed_fields, apply_overrides, get_preset, list_presets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hf_quantizable.train",
        description="Pre-train a quantizable BERT / OPT / ViT with the papers' recipes (transformers Trainer).",
        epilog="Presets: " + ", ".join(list_presets()),
    )
    parser.add_argument("--preset", help="recipe name (see --list-presets)")
    parser.add_argument("--output", help="run folder: checkpoints, tracking log and the final Hub-ready model")
    parser.add_argument("--max-steps", type=int, help="override the preset's number of optimizer steps")
    parser.add_argument("--dataset-path", help="local text file / folder / image folder (sets data.dataset)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    parser.add_argument("--list-fields", metavar="PRESET", help="print every overridable field of PRESET and exit")
    parser.add_argument("--show", action="store_true", help="print the resolved recipe as JSON and exit")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    parser.add_argument("overrides", nargs="*", metavar="field=value", help="recipe overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_presets:
        for name in list_presets():
            print(f"{name:24s} {PRESETS[name].description}")
        return 0
    try:
        if args.list_fields:
            print("\n".join(allowed_fields(get_preset(args.list_fields).family)))
            return 0
        if not args.preset:
            raise ValueError("--preset is required (see --list-presets)")
        overrides = list(args.overrides)
        if args.max_steps is not None:
            overrides.append(f"training.max_steps={args.max_steps}")
        if args.dataset_path:
            overrides.append(f"data.dataset={json.dumps(args.dataset_path)}")
        preset = apply_overrides(get_preset(args.preset), overrides)
        if args.show:
            print(json.dumps(preset.to_dict(), indent=2))
            return 0
        if not args.output:
            raise ValueError("--output is required")
        from .training.runner import build_run, finish_run

        run = build_run(preset, args.output, resume=args.resume, training_overrides={"disable_tqdm": args.no_progress})
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if run.resume_from:
        print(f"resuming from {run.resume_from}", file=sys.stderr)
    result = run.trainer.train(resume_from_checkpoint=run.resume_from)
    metrics = finish_run(run, result.metrics)
    if run.trainer.is_world_process_zero():
        print(json.dumps({"output": str(run.output_dir), "train": result.metrics, "eval": metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
