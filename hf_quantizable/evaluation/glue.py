"""GLUE: data (Hub `glue` or the original TSV files), official metrics, Trainer fine-tuning, FP vs W8A8.

Local TSVs are read without quote processing (`csv.QUOTE_NONE`: GLUE text holds unbalanced quotes),
with `utf-8-sig` (MRPC's header has a byte order mark); CoLA has no header. Labels are mapped to the
Hub `glue` dataset's label ids, and columns get the Hub names, so both sources give the same rows.
"""

import copy
import csv
import dataclasses
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Value, load_dataset
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from ..paths import atomic_folder
from ..provenance import model_fingerprint
from .results import ResultRecord, write_results

csv.field_size_limit(1 << 24)


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE task: Hub config, local folder and files, columns, labels, metrics."""

    name: str
    folder: str
    text_columns: tuple[str, ...]  # Hub column names of the input texts
    tsv_columns: tuple[str | int, ...]  # local TSV header names (or indices without header) of texts + label
    label_names: tuple[str, ...] | None  # None: regression (STS-B)
    metrics: tuple[str, ...]
    validation_file: str = "dev.tsv"
    has_header: bool = True
    tsv_label_values: tuple[str, ...] | None = None  # label strings in the TSV, in label-id order

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


GLUE_TASKS = {
    "cola": GlueTask(
        "cola",
        "CoLA",
        ("sentence",),
        (3, 1),
        ("unacceptable", "acceptable"),
        ("matthews_correlation",),
        has_header=False,
        tsv_label_values=("0", "1"),
    ),
    "sst2": GlueTask(
        "sst2",
        "SST-2",
        ("sentence",),
        ("sentence", "label"),
        ("negative", "positive"),
        ("accuracy",),
        tsv_label_values=("0", "1"),
    ),
    "mrpc": GlueTask(
        "mrpc",
        "MRPC",
        ("sentence1", "sentence2"),
        ("#1 String", "#2 String", "Quality"),
        ("not_equivalent", "equivalent"),
        ("accuracy", "f1"),
        tsv_label_values=("0", "1"),
    ),
    "stsb": GlueTask(
        "stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2", "score"), None, ("pearson", "spearmanr")
    ),
    "qqp": GlueTask(
        "qqp",
        "QQP",
        ("question1", "question2"),
        ("question1", "question2", "is_duplicate"),
        ("not_duplicate", "duplicate"),
        ("accuracy", "f1"),
        tsv_label_values=("0", "1"),
    ),
    "mnli": GlueTask(
        "mnli",
        "MNLI",
        ("premise", "hypothesis"),
        ("sentence1", "sentence2", "gold_label"),
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        validation_file="dev_matched.tsv",
        tsv_label_values=("entailment", "neutral", "contradiction"),
    ),
    "qnli": GlueTask(
        "qnli",
        "QNLI",
        ("question", "sentence"),
        ("question", "sentence", "label"),
        ("entailment", "not_entailment"),
        ("accuracy",),
        tsv_label_values=("entailment", "not_entailment"),
    ),
    "rte": GlueTask(
        "rte",
        "RTE",
        ("sentence1", "sentence2"),
        ("sentence1", "sentence2", "label"),
        ("entailment", "not_entailment"),
        ("accuracy",),
        tsv_label_values=("entailment", "not_entailment"),
    ),
    "wnli": GlueTask(
        "wnli",
        "WNLI",
        ("sentence1", "sentence2"),
        ("sentence1", "sentence2", "label"),
        ("not_entailment", "entailment"),
        ("accuracy",),
        tsv_label_values=("0", "1"),
    ),
}
HUB_VALIDATION_SPLIT = {"mnli": "validation_matched"}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


# ---------------------------------------------------------------------------------------------- data


def read_glue_tsv(task: GlueTask, path: str | os.PathLike) -> Dataset:
    """Read one original GLUE TSV file (no quote processing) into Hub-style columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE {task.name} file {str(path)!r} does not exist")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.has_header:
        header, rows = rows[0], rows[1:]
        missing = [c for c in task.tsv_columns if c not in header]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing}; header: {header}")
        indices = [header.index(c) for c in task.tsv_columns]
        width = len(header)
    else:
        indices, width = list(task.tsv_columns), None
    columns: dict[str, list] = {name: [] for name in (*task.text_columns, "label")}
    for line, row in enumerate(rows, start=2 if task.has_header else 1):
        if width is not None and len(row) != width:
            raise ValueError(f"{path}:{line}: expected {width} tab-separated fields, got {len(row)}")
        *texts, label = (row[i] for i in indices)
        for name, text in zip(task.text_columns, texts):
            columns[name].append(text)
        if task.label_names is None:
            columns["label"].append(float(label))
        else:
            if label not in task.tsv_label_values:
                raise ValueError(f"{path}:{line}: label {label!r} not in {list(task.tsv_label_values)}")
            columns["label"].append(task.tsv_label_values.index(label))
    label_feature = Value("float32") if task.label_names is None else ClassLabel(names=list(task.label_names))
    features = Features({**{name: Value("string") for name in task.text_columns}, "label": label_feature})
    return Dataset.from_dict(columns, features=features)


def load_glue_split(task: GlueTask, split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """`train` or `validation` of a GLUE task, from `data_dir/<Task>/*.tsv` or the Hub `glue` dataset."""
    if split not in ("train", "validation"):
        raise ValueError(f"GLUE `split` must be 'train' or 'validation', got {split!r}")
    if data_dir is not None:
        filename = "train.tsv" if split == "train" else task.validation_file
        return read_glue_tsv(task, Path(data_dir) / task.folder / filename)
    hub_split = HUB_VALIDATION_SPLIT.get(task.name, "validation") if split == "validation" else split
    return load_dataset("glue", task.name, split=hub_split)


# ------------------------------------------------------------------------------------------- metrics


def glue_metrics(task: GlueTask, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The task's official metrics (names as the `glue` metric of `evaluate`)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    computed = {
        "accuracy": lambda: accuracy_score(references, predictions),
        "f1": lambda: f1_score(references, predictions),
        "matthews_correlation": lambda: matthews_corrcoef(references, predictions),
        "pearson": lambda: pearsonr(predictions, references)[0],
        "spearmanr": lambda: spearmanr(predictions, references)[0],
    }
    return {name: float(computed[name]()) for name in task.metrics}


def _predictions(task: GlueTask, logits: np.ndarray) -> np.ndarray:
    return logits[:, 0] if task.label_names is None else logits.argmax(axis=-1)


# ------------------------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class GluePreset:
    """Fine-tuning settings.

    `unverified` names the fields that could not be checked against the cited source (placeholders:
    the documented defaults named in `source`); using such a preset warns, and the list is stored with
    the preset in every result record.
    """

    name: str
    max_length: int
    num_train_epochs: float
    learning_rate: float
    batch_size: int
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    source: str = ""
    unverified: tuple[str, ...] = ()

    def __post_init__(self):
        fields = {f.name for f in dataclasses.fields(self)} - {"name", "source", "unverified"}
        unknown = sorted(set(self.unverified) - fields)
        if unknown:
            raise ValueError(f"GLUE preset {self.name!r}: `unverified` names unknown fields {unknown}")


LIAO_MONZ_SOURCE = (
    "Liao & Monz 2024, arXiv:2402.12102 (https://arxiv.org/abs/2402.12102), Appendix A, Table 4 (GLUE "
    "fine-tuning): MNLI, QNLI, QQP, SST-2 with lr 1e-5 and batch 32; CoLA, RTE, MRPC, STS-B with lr in "
    "{1e-5, 2e-5, 3e-5} and batch in {16, 32}, the best on dev (the presets liao-monz-lr<lr>-bs<batch>); "
    "weight decay 0.1, at most 10 epochs, linear decay, warmup ratio 0.06. Max length 128 is not in the table: "
    "it is the default of the authors' GLUE script (github.com/BaohaoLiao/improved_transformer_v3, run_glue.py, "
    "max_seq_length)"
)


def _liao_monz(name: str, learning_rate: float, batch_size: int, epochs: float = 10.0) -> GluePreset:
    return GluePreset(
        name,
        max_length=128,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        weight_decay=0.1,
        warmup_ratio=0.06,
        source=LIAO_MONZ_SOURCE + ("" if epochs == 10.0 else f"; epochs capped at {epochs:g} for CPU runs"),
        unverified=("max_length",),
    )


GLUE_PRESETS = {
    "bondarenko": GluePreset(
        "bondarenko", 128, 3.0, 2e-5, 16, source="Bondarenko et al. 2023: max length 128, 3 epochs, lr 2e-5, batch 16"
    ),
    "liao-monz": _liao_monz("liao-monz", 1e-5, 32),
    **{
        f"liao-monz-lr{lr}-bs{batch}": _liao_monz(f"liao-monz-lr{lr}-bs{batch}", float(lr), batch)
        for lr in ("1e-5", "2e-5", "3e-5")
        for batch in (16, 32)
    },
    "liao-monz-cpu": _liao_monz("liao-monz-cpu", 1e-5, 32, epochs=3.0),
    "cpu-smoke": GluePreset(
        "cpu-smoke", 64, 1.0, 5e-5, 16, source="short CPU check (a few hundred examples, one epoch)"
    ),
}


def get_preset(name: str) -> GluePreset:
    if name not in GLUE_PRESETS:
        raise ValueError(f"unknown GLUE preset {name!r}; choose one of {sorted(GLUE_PRESETS)}")
    return GLUE_PRESETS[name]


# ------------------------------------------------------------------------------------------ training


def load_classifier(model_name_or_path: str, task: GlueTask) -> torch.nn.Module:
    """A sequence classifier for `task`. A stock checkpoint of a registered family loads into the
    family's GLUE class (`QuantizableBertForSequenceClassification` for BERT: same weights), so it can
    be quantized; any other model through `AutoModelForSequenceClassification`."""
    from .. import families

    config = AutoConfig.from_pretrained(model_name_or_path)
    kwargs: dict[str, Any] = {"num_labels": task.num_labels}
    if task.label_names is not None:
        kwargs["id2label"] = dict(enumerate(task.label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    model_class = families.class_for_task(families.family_of(config.model_type), "glue")
    if model_class is not None:
        return model_class.from_pretrained(model_name_or_path, **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(model_name_or_path, **kwargs)


def tokenize_glue(dataset: Dataset, task: GlueTask, tokenizer, max_length: int) -> Dataset:
    def tokenize(batch):
        texts = [batch[column] for column in task.text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    return dataset.map(tokenize, batched=True, remove_columns=list(task.text_columns), desc=f"tokenize {task.name}")


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, tokenizer, batch_size: int = 64) -> np.ndarray:
    """Logits `[N, num_labels]` for a tokenized dataset (dynamic padding, eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    collator = DataCollatorWithPadding(tokenizer)
    features = [dict(row) for row in dataset.remove_columns(["label"])]
    logits = []
    for start in range(0, len(features), batch_size):
        batch = collator(features[start : start + batch_size])
        logits.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    return torch.cat(logits).numpy()


def calibration_batches(dataset: Dataset, tokenizer, batch_size: int, num_batches: int) -> list[dict]:
    """The first `num_batches` padded batches of a tokenized dataset (labels dropped)."""
    collator = DataCollatorWithPadding(tokenizer)
    features = [
        dict(row)
        for row in dataset.remove_columns(["label"]).select(range(min(len(dataset), batch_size * num_batches)))
    ]
    return [collator(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]


def training_arguments(
    settings: GluePreset, output_dir: str | os.PathLike, max_steps: int = -1, seed: int = 42, progress: bool = True
) -> TrainingArguments:
    """The `TrainingArguments` of a GLUE fine-tune with `settings` (no checkpoints, no reporting)."""
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        max_steps=max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=64,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        seed=seed,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=not progress,
        logging_steps=50,
        use_cpu=not torch.cuda.is_available(),
    )


def is_glue_output(folder: Path) -> bool:
    """Whether `folder` is an earlier `finetune_glue` output (a saved classifier with its results)."""
    return (folder / "results.json").is_file() and (folder / "config.json").is_file()


def finetune_glue(
    model_name_or_path: str,
    task_name: str,
    output_dir: str | os.PathLike,
    preset: str = "bondarenko",
    data_dir: str | os.PathLike | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_steps: int = -1,
    seed: int = 42,
    w8a8_config=None,
    progress: bool = True,
) -> list[ResultRecord]:
    """Fine-tune on a GLUE task with `Trainer`, evaluate FP and W8A8 (simulated) on the dev set.

    Writes to `output_dir` (atomically: a temporary folder that replaces it at the end; callers check
    it with `paths.check_output_folder` first) the fine-tuned model
    and tokenizer (`save_pretrained`) and `results.json` with one record per metric and precision.

    Args:
        data_dir: folder with the original GLUE TSVs (`<data_dir>/<Task>/train.tsv`, `dev.tsv`); None:
            the Hub `glue` dataset.
        w8a8_config: a `W8A8Config` (default: the papers' W8A8 setting); False skips W8A8.
    """
    task = get_task(task_name)
    settings = get_preset(preset)
    if settings.unverified:
        warnings.warn(
            f"GLUE preset {settings.name!r}: {', '.join(settings.unverified)} "
            f"{'is a placeholder' if len(settings.unverified) == 1 else 'are placeholders'}, not the cited source's "
            f"values ({settings.source})",
            stacklevel=2,
        )
    output_dir = Path(output_dir)
    train = load_glue_split(task, "train", data_dir)
    validation = load_glue_split(task, "validation", data_dir)
    if max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        validation = validation.select(range(min(max_eval_samples, len(validation))))

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model = load_classifier(model_name_or_path, task)
    train_tokenized = tokenize_glue(train, task, tokenizer, settings.max_length)
    validation_tokenized = tokenize_glue(validation, task, tokenizer, settings.max_length)

    fingerprint = model_fingerprint(model_name_or_path) if Path(model_name_or_path).is_dir() else None
    with atomic_folder(output_dir) as tmp_dir:
        args = training_arguments(settings, tmp_dir / "trainer", max_steps=max_steps, seed=seed, progress=progress)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_tokenized,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
        )
        trainer.train()
        model = trainer.model.eval()
        shutil.rmtree(tmp_dir / "trainer", ignore_errors=True)

        dataset_name = str(data_dir) if data_dir is not None else "glue"
        references = np.asarray(validation["label"])
        common = dict(
            model=str(model_name_or_path),
            model_fingerprint=fingerprint,
            attn_impl=getattr(model.config, "attn_impl", "softmax"),
            task="glue",
            dataset=dataset_name,
            dataset_config=task.name,
            split="validation",
            n=len(validation),
            seed=seed,
        )
        preset_record = {**dataclasses.asdict(settings), "unverified": list(settings.unverified)}  # JSON-native
        extra = {"preset": preset_record, "train_examples": len(train), "max_steps": max_steps}
        records = [
            ResultRecord(precision="fp32", metric=name, value=value, extra=extra, **common)
            for name, value in glue_metrics(
                task, _predictions(task, predict(model, validation_tokenized, tokenizer)), references
            ).items()
        ]
        if w8a8_config is not False:
            from ..quantization import W8A8Config, quantize_model

            config = w8a8_config or W8A8Config()
            quantized = quantize_model(
                copy.deepcopy(model),
                config,
                calibration_batches(train_tokenized, tokenizer, settings.batch_size, config.num_calibration_batches),
            )
            logits = predict(quantized, validation_tokenized, tokenizer)
            records += [
                ResultRecord(
                    precision="w8a8-sim",
                    metric=name,
                    value=value,
                    extra={**extra, "w8a8_config": config.to_dict()},
                    **common,
                )
                for name, value in glue_metrics(task, _predictions(task, logits), references).items()
            ]
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        write_results(records, tmp_dir / "results.json")
    return records
