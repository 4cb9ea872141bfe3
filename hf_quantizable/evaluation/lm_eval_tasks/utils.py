"""Local data for the lm-eval tasks of this folder (`TaskManager(include_path=LM_EVAL_TASKS_DIR)`).

The data comes from the offline data folder (`$HF_QUANTIZABLE_DATA`, default `../shared/data`
beside the repository, as `hf_quantizable.paths.shared_data_dir`); nothing is copied into the
repository. `wikitext2_local` needs only lm-eval and datasets, so the stock `lm_eval --model hf`
can run it where hf_quantizable is not installed; the GLUE tasks read the TSVs with
`hf_quantizable.evaluation.glue` (imported when they load).
"""

import os
import re
from pathlib import Path

from datasets import Dataset, DatasetDict
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

__all__ = ["load_glue", "load_wikitext2", "process_results", "wikitext_detokenizer"]

ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")  # " = Title = ": a new article (" = = Section = = " is not)


def shared_data_dir() -> Path:
    """`$HF_QUANTIZABLE_DATA`, else `../shared/data` beside the repository (`hf_quantizable.paths`'s rule)."""
    env = os.environ.get("HF_QUANTIZABLE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "data"


def _articles(path) -> list[str]:
    articles: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if ARTICLE_TITLE.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(lines) for lines in articles]


def load_wikitext2(**kwargs) -> DatasetDict:
    """WikiText-2 validation and test, one document (`page`) per article, as the Hub's document-level set."""
    folder = shared_data_dir() / "wikitext-2"
    return DatasetDict(
        {
            split: Dataset.from_dict({"page": _articles(folder / f"{name}.txt")})
            for split, name in (("validation", "valid"), ("test", "test"))
        }
    )


def load_glue(task: str, **kwargs) -> DatasetDict:
    """A GLUE dev set from the original TSV files, with the Hub `glue` columns and label ids."""
    from hf_quantizable.evaluation.glue import get_task, read_glue_tsv

    glue_task = get_task(task)
    return DatasetDict(
        {
            "validation": read_glue_tsv(
                glue_task, shared_data_dir() / "glue" / glue_task.folder / glue_task.validation_file
            )
        }
    )
