"""Re-evaluate published models (FP and their INT8 siblings) and refresh their model cards.

    python -m hf_quantizable.hub_eval --repos org/bert-gated=org/bert-gated-w8a8 org/bert-vanilla [--push]
    python -m hf_quantizable.hub_eval --repos org/bert-gated=org/bert-gated-w8a8 --models-dir out/  # offline
    python -m hf_quantizable.hub_eval --upload-from hub-eval   # upload what an earlier run refreshed

Each entry is an FP repo id, optionally `=INT8_REPO_ID`. Models come from the Hub
(`snapshot_download`), or from `--models-dir/NAME` (folders written by `push --local-dir`, the main
job or `hf download`). The evaluation harness writes `results.json` and plots under `--output/NAME`;
the refreshed repo folders go to `--output/NAME/repos`, listed in `--output/refreshed.json`. With
`--push` their card, results and plots are uploaded right away; `--upload-from` uploads them later,
in a step that evaluates nothing (the CI workflow `.github/workflows/evaluate-hub.yml` gives its
token only to that step and to the download). No repo's own code runs unless `--trust-remote-code`.
"""

import argparse
import json
import sys
from pathlib import Path

import httpx2
from huggingface_hub import snapshot_download

from .cli import DataArguments, OneLineErrorParser
from .hub.evaluate import evaluate_for_card
from .hub.folder import PLOTS_DIR, RESULTS_FILE
from .hub.publish import plan_push, write_plan
from .hub.upload import check_repo_id, hub_error_line, resolve_token, upload_repo_folder
from .paths import check_output_folder, write_text_atomic

REFRESHED_FILES = ["README.md", RESULTS_FILE, f"{PLOTS_DIR}/*"]
MANIFEST = "refreshed.json"
COMMIT_MESSAGE = "Refresh evaluation results and model card (hf_quantizable.hub_eval)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m hf_quantizable.hub_eval",
        description="Evaluate Hub models FP vs INT8 with the hf_quantizable harness and refresh their cards.",
    )
    parser.add_argument("--repos", nargs="+", metavar="FP_REPO[=INT8_REPO]", help="repos to evaluate")
    parser.add_argument("--models-dir", type=Path, help="read each repo from MODELS_DIR/NAME instead of the Hub")
    parser.add_argument("--output", type=Path, default=Path("hub-eval"), help="results, plots and refreshed folders")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier hub_eval output in --output")
    parser.add_dataclass_arguments(
        DataArguments,
        ("max_sequences", "dataset", "split"),
        defaults={"max_sequences": 256},
        helps={
            "max_sequences": "evaluation sequences per dataset",
            "dataset": "evaluation data: Hub name or local file/folder (default: WikiText-2 / MNIST)",
            "split": "evaluation split (default: test)",
        },
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the repos to run their own Python code (needed only for model types this package does not register)",
    )
    parser.add_argument("--push", action="store_true", help="upload the refreshed card, results and plots")
    parser.add_argument(
        "--upload-from",
        type=Path,
        metavar="OUTPUT",
        help="upload the folders an earlier run refreshed into OUTPUT (its refreshed.json); evaluates nothing",
    )
    return parser


def parse_entry(entry: str) -> tuple[str, str | None]:
    """`FP_REPO[=INT8_REPO]` -> (fp repo id, int8 repo id or None), both checked."""
    fp, _, int8 = entry.partition("=")
    check_repo_id(fp, "--repos")
    if int8:
        check_repo_id(int8, "--repos (INT8 part)")
    return fp, int8 or None


def fetch(repo_id: str, models_dir: Path | None) -> Path:
    """The local folder of `repo_id`: `models_dir/NAME`, else a snapshot from the Hub."""
    if models_dir is not None:
        folder = models_dir / repo_id.split("/")[-1]
        if not folder.is_dir():
            raise ValueError(f"no folder {folder} for {repo_id} in --models-dir")
        return folder
    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="model"))
    except (OSError, httpx2.HTTPError) as error:  # offline, 401/404, unreachable
        raise ValueError(f"cannot download {repo_id}: {hub_error_line(error)}") from None


def check_pair(fp_repo: str, int8_repo: str | None, folders: dict[str, Path], trust_remote_code: bool) -> None:
    """Refuse an INT8 part that is not an INT8 checkpoint, an FP part that is one, or foreign code."""
    from .evaluation.harness import load_config

    for repo, want_int8 in ((fp_repo, False), (int8_repo, True)):
        if repo is None:
            continue
        config = load_config(str(folders[repo]), repo, trust_remote_code)
        if bool(getattr(config, "w8a8_config", None)) != want_int8:
            part = "INT8 part" if want_int8 else "FP part"
            kind = "is not an INT8 checkpoint (no `w8a8_config`)" if want_int8 else "is an INT8 checkpoint"
            raise ValueError(f"--repos {part} {repo} {kind}")


def check_args(args: argparse.Namespace) -> None:
    """Refuse missing or contradictory options before anything is downloaded or written."""
    if args.upload_from is not None:
        given = [name for name in ("repos", "models_dir", "dataset", "split") if getattr(args, name)]
        given += [name for name in ("push", "overwrite", "trust_remote_code") if getattr(args, name)]
        if given:
            raise ValueError(f"--upload-from evaluates nothing: drop --{given[0].replace('_', '-')}")
        if not (args.upload_from / MANIFEST).is_file():
            raise ValueError(f"--upload-from {args.upload_from} has no {MANIFEST}: run hub_eval --output there first")
        return
    if not args.repos:
        raise ValueError("--repos is required (or --upload-from OUTPUT)")
    if args.max_sequences < 1:
        raise ValueError(f"--max-sequences must be >= 1, got {args.max_sequences}")
    check_output_folder(
        args.output, option="--output", is_own_output=lambda f: (f / MANIFEST).is_file(), overwrite=args.overwrite
    )


def upload_refreshed(output: Path, token: str) -> None:
    """Upload the card, results and plots of every folder listed in `output/refreshed.json`."""
    for entry in json.loads((output / MANIFEST).read_text())["folders"]:
        commit = upload_repo_folder(
            output / entry["folder"],
            entry["repo_id"],
            token=token,
            allow_patterns=REFRESHED_FILES,
            commit_message=COMMIT_MESSAGE,
        )
        print(f"pushed {entry['repo_id']}: {commit.commit_url}")


def refresh(args: argparse.Namespace, pairs: list[tuple[str, str | None]], folders: dict[str, Path]) -> None:
    """Evaluate every pair and write its refreshed repo folders, listed in `--output/refreshed.json`."""
    refreshed = []
    write_text_atomic(args.output / MANIFEST, json.dumps({"folders": refreshed}) + "\n")
    for fp_repo, int8_repo in pairs:
        work = args.output / fp_repo.split("/")[-1]
        int8_dir = folders[int8_repo] if int8_repo else None
        results = evaluate_for_card(
            folders[fp_repo],
            int8_dir,
            work,
            max_sequences=args.max_sequences,
            dataset=args.dataset,
            split=args.split,
            trust_remote_code=args.trust_remote_code,
        )
        plans = plan_push(
            folders[fp_repo],
            fp_repo,
            int8_repo_id=int8_repo,
            int8_dir=int8_dir,
            results_path=results,
            plots_dir=work / PLOTS_DIR,
        )
        for plan in plans:
            folder = write_plan(plan, work / "repos" / plan.name)
            refreshed.append({"repo_id": plan.repo_id, "folder": str(folder.relative_to(args.output))})
            print(f"refreshed {plan.repo_id} -> {folder}")
        write_text_atomic(args.output / MANIFEST, json.dumps({"folders": refreshed}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if args.upload_from is not None:
            upload_refreshed(args.upload_from, resolve_token())
            return 0
        pairs = [parse_entry(entry) for entry in args.repos]
        token = resolve_token() if args.push else None
        folders = {repo: fetch(repo, args.models_dir) for pair in pairs for repo in pair if repo}
        for pair in pairs:
            check_pair(*pair, folders, args.trust_remote_code)
        refresh(args, pairs, folders)
        if args.push:
            upload_refreshed(args.output, token)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
