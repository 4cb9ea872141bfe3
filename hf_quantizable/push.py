"""Push a trained (and quantized) run to the Hugging Face Hub with its model card.

    python -m hf_quantizable.push RUN_DIR --repo-id ORG/NAME [--int8-repo-id ORG/NAME-w8a8]
        [--int8-dir DIR] [--results FILE] [--plots DIR] [--private] [--local-dir DIR] [--dry-run]

Every input is checked (repo ids, model folders, results, token) before anything is written or
uploaded. `--local-dir` writes the exact repo folders (one per repo, named after it) without
uploading; `--dry-run` lists what would be uploaded.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from .cli import OneLineErrorParser
from .hub.publish import RepoPlan, check_plan_targets, default_int8_dir, plan_push, write_plan
from .hub.upload import resolve_token, upload_repo_folder


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m hf_quantizable.push",
        description="Assemble the Hub repo folder(s) of a run (weights, modeling code, tokenizer, card, "
        "results, plots) and upload them, or write them locally.",
    )
    parser.add_argument("run_dir", type=Path, help="training output folder (save_pretrained + results.json)")
    parser.add_argument("--repo-id", required=True, help="Hub repo of the floating-point model, ORG/NAME")
    parser.add_argument("--int8-repo-id", help="Hub repo of the INT8 sibling, ORG/NAME (pushes the INT8 checkpoint)")
    parser.add_argument("--int8-dir", type=Path, help="INT8 checkpoint folder (default: RUN_DIR-w8a8)")
    parser.add_argument("--results", type=Path, help="results file (default: RUN_DIR/results.json)")
    parser.add_argument("--plots", type=Path, help="folder of plots for the card (default: RUN_DIR/plots)")
    parser.add_argument("--private", action="store_true", help="create the repos as private")
    parser.add_argument("--local-dir", type=Path, help="write the repo folders here instead of uploading")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace repo folders an earlier push wrote in --local-dir"
    )
    parser.add_argument("--dry-run", action="store_true", help="check everything and list the files; upload nothing")
    return parser


def _describe(plan: RepoPlan, folder: Path) -> str:
    lines = [f"{plan.repo_id}:"]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        lines.append(f"  {path.relative_to(folder)} ({path.stat().st_size:,} bytes)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.int8_repo_id and args.int8_dir is None:
        args.int8_dir = default_int8_dir(args.run_dir)
    try:
        if args.overwrite and args.local_dir is None:
            raise ValueError("--overwrite applies to --local-dir only (an upload adds a commit, it replaces nothing)")
        if args.local_dir is not None and args.dry_run:
            raise ValueError("--dry-run and --local-dir exclude each other: --local-dir already uploads nothing")
        if args.private and (args.local_dir is not None or args.dry_run):
            raise ValueError("--private applies only when uploading (not with --local-dir or --dry-run)")
        plans = plan_push(
            args.run_dir,
            args.repo_id,
            int8_repo_id=args.int8_repo_id,
            int8_dir=args.int8_dir,
            results_path=args.results,
            plots_dir=args.plots,
        )
        upload = args.local_dir is None and not args.dry_run
        token = resolve_token() if upload else None
        if args.local_dir is not None:
            check_plan_targets(plans, args.local_dir, args.overwrite)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.local_dir is not None:
        for plan in plans:
            try:
                folder = write_plan(plan, args.local_dir / plan.name)
            except OSError as error:  # a full disk, a folder that turned read-only
                print(f"error: writing {args.local_dir / plan.name} failed: {error}", file=sys.stderr)
                return 1
            print(_describe(plan, folder))
            print(f"wrote {folder}")
        return 0

    with tempfile.TemporaryDirectory(prefix="hf_quantizable_push_") as tmp:
        folders = [write_plan(plan, Path(tmp) / plan.name) for plan in plans]  # all written before any upload
        for plan, folder in zip(plans, folders):
            print(_describe(plan, folder))
            if upload:
                try:
                    commit = upload_repo_folder(folder, plan.repo_id, token=token, private=args.private)
                except OSError as error:
                    print(f"error: {error}", file=sys.stderr)
                    return 1
                print(f"uploaded {plan.repo_id}: {commit.commit_url}")
            else:
                print(f"dry run: nothing uploaded to {plan.repo_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
