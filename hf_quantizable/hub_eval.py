"""Re-evaluate published models (FP and their INT8 siblings) and refresh their model cards.

    python -m hf_quantizable.hub_eval --repos org/bert-gated=org/bert-gated-w8a8 org/bert-vanilla [--push]
    python -m hf_quantizable.hub_eval --repos org/bert-gated=org/bert-gated-w8a8 --models-dir out/  # offline

Each entry is an FP repo id, optionally `=INT8_REPO_ID`. Models come from the Hub
(`snapshot_download`), or from `--models-dir/NAME` (folders written by `push --local-dir` or the main
job). The evaluation harness writes `results.json` and plots under `--output/NAME`; the refreshed
repo folders go to `--output/NAME/repos`, and with `--push` their card, results and plots are uploaded.
The CI workflow `.github/workflows/evaluate-hub.yml` runs this same command.
"""

import argparse
import sys
from pathlib import Path

from huggingface_hub import snapshot_download

from .hub.evaluate import evaluate_for_card
from .hub.folder import PLOTS_DIR, RESULTS_FILE
from .hub.publish import plan_push, write_plan
from .hub.upload import check_repo_id, resolve_token, upload_repo_folder

REFRESHED_FILES = ["README.md", RESULTS_FILE, f"{PLOTS_DIR}/*"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_quantizable.hub_eval",
        description="Evaluate Hub models FP vs INT8 with the hf_quantizable harness and refresh their cards.",
    )
    parser.add_argument("--repos", nargs="+", required=True, metavar="FP_REPO[=INT8_REPO]", help="repos to evaluate")
    parser.add_argument("--models-dir", type=Path, help="read each repo from MODELS_DIR/NAME instead of the Hub")
    parser.add_argument("--output", type=Path, default=Path("hub-eval"), help="results, plots and refreshed folders")
    parser.add_argument("--max-sequences", type=int, default=256, help="evaluation sequences per dataset")
    parser.add_argument(
        "--dataset", help="evaluation data: Hub name or local file/folder (default: WikiText-2 / MNIST)"
    )
    parser.add_argument("--split", help="evaluation split (default: test)")
    parser.add_argument("--push", action="store_true", help="upload the refreshed card, results and plots")
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
    return Path(snapshot_download(repo_id=repo_id, repo_type="model"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pairs = [parse_entry(entry) for entry in args.repos]
        token = resolve_token() if args.push else None
        folders = {repo: fetch(repo, args.models_dir) for pair in pairs for repo in pair if repo}
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for fp_repo, int8_repo in pairs:
        work = args.output / fp_repo.split("/")[-1]
        int8_dir = folders[int8_repo] if int8_repo else None
        results = evaluate_for_card(
            folders[fp_repo], int8_dir, work, max_sequences=args.max_sequences, dataset=args.dataset, split=args.split
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
            print(f"refreshed {plan.repo_id} -> {folder}")
            if args.push:
                commit = upload_repo_folder(
                    folder,
                    plan.repo_id,
                    token=token,
                    allow_patterns=REFRESHED_FILES,
                    commit_message="Refresh evaluation results and model card (hf_quantizable.hub_eval)",
                )
                print(f"pushed {plan.repo_id}: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
