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
from pathlib import Path

from .cli import DataArguments, OneLineErrorParser, one_line, positive_int
from .training.presets import PRESETS, allowed_fields, apply_overrides, get_preset, list_presets, validate_preset


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="python -m hf_quantizable.train",
        description="Pre-train a quantizable BERT / OPT / ViT with the papers' recipes (transformers Trainer).",
        epilog="Presets: " + ", ".join(list_presets()),
    )
    parser.add_argument("--preset", help="recipe name (see --list-presets)")
    parser.add_argument("--output", help="run folder: checkpoints, tracking log and the final Hub-ready model")
    parser.add_argument("--max-steps", type=positive_int, help="override the preset's number of optimizer steps")
    parser.add_dataclass_arguments(
        DataArguments,
        ("dataset",),
        helps={"dataset": "local text file / folder / image folder (sets data.dataset)"},
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    parser.add_argument("--list-fields", metavar="PRESET", help="print every overridable field of PRESET and exit")
    parser.add_argument("--show", action="store_true", help="print the resolved recipe as JSON and exit")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    parser.add_argument("overrides", nargs="*", metavar="field=value", help="recipe overrides")
    parser.add_deprecated_alias("--dataset-path", "--dataset")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags the chosen mode would ignore (listing, --show, or training)."""
    recipe = {"--preset": args.preset, "--max-steps": args.max_steps, "--dataset": args.dataset}
    recipe["field=value"] = args.overrides or None
    run = {"--output": args.output, "--resume": args.resume or None, "--no-progress": args.no_progress or None}
    modes = [m for m, on in (("--list-presets", args.list_presets), ("--list-fields", args.list_fields)) if on]
    modes += ["--show"] if args.show else []
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} cannot be combined: pass one of them")
    ignored = {**recipe, **run} if modes and modes[0] != "--show" else run if modes else {}
    given = [flag for flag, value in ignored.items() if value is not None]
    if given:
        raise ValueError(f"{modes[0]} does not use {', '.join(given)}: drop it")
    if args.dataset and not Path(args.dataset).expanduser().exists():
        raise ValueError(f"--dataset {args.dataset} does not exist")


def rerun_hint(run) -> str:
    """What to do after a failed write: resume from the newest complete checkpoint, or start again."""
    from .training.runner import CHECKPOINT_DIR
    from .training.trainer import latest_complete_checkpoint

    root = run.output_dir / CHECKPOINT_DIR
    checkpoint = latest_complete_checkpoint(root)[0] if root.is_dir() else None
    if checkpoint is None:
        return "no checkpoint was completed: fix the cause and rerun the same command"
    return (
        f"fix the cause and rerun with --resume (it continues from {checkpoint.name}, the newest complete checkpoint)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_flags(args)
        if args.list_presets:
            for name in list_presets():
                print(f"{name:24s} {PRESETS[name].description}")
            return 0
        if args.list_fields:
            print("\n".join(allowed_fields(get_preset(args.list_fields).family)))
            return 0
        if not args.preset:
            raise ValueError("--preset is required (see --list-presets)")
        overrides = list(args.overrides)
        if args.max_steps is not None:
            overrides.append(f"training.max_steps={args.max_steps}")
        if args.dataset:
            overrides.append(f"data.dataset={json.dumps(args.dataset)}")
        preset = apply_overrides(get_preset(args.preset), overrides)
        validate_preset(preset)
        if args.show:
            print(json.dumps(preset.to_dict(), indent=2))
            return 0
        if not args.output:
            raise ValueError("--output is required")
        from .training.runner import build_run, finish_run

        extra_args = {"disable_tqdm": True} if args.no_progress else {}
        run = build_run(preset, args.output, resume=args.resume, training_overrides=extra_args)
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # reading the data or writing the recipe failed (a full disk, an unreadable file)
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    if run.resume_from:
        skipped = f" (skipped {'; '.join(run.skipped_checkpoints)})" if run.skipped_checkpoints else ""
        print(f"resuming from {run.resume_from}, the newest complete checkpoint{skipped}", file=sys.stderr)
    try:
        result = run.trainer.train(resume_from_checkpoint=run.resume_from)
        metrics = finish_run(run, result.metrics)
    except OSError as err:  # a full disk, a folder made read-only, an unreachable streamed dataset
        print(f"error: training stopped: {one_line(err)}; {rerun_hint(run)}", file=sys.stderr)
        return 1
    if run.trainer.is_world_process_zero():
        print(json.dumps({"output": str(run.output_dir), "train": result.metrics, "eval": metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
