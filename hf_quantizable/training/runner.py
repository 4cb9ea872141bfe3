"""Assemble a training run from a preset: data, model, TrainingArguments, Trainer, callbacks.

Every field and input is checked, and the data, tokenizer and model are built, before the first
byte is written: a refused run leaves the output folder as it was, so the corrected command runs.

Output layout (`output_dir`):
    training_recipe.json   the preset after overrides (the run's identity, written before training)
    checkpoints/           Trainer checkpoints, written atomically (resumable; `save_total_limit` kept)
    outlier_tracking.jsonl one record per tracking step
    config.json, model.safetensors, tokenizer / image processor files, modeling code (auto_map),
    training_args.bin, train_results.json, eval_results.json   written when training finishes
"""

import itertools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

# Re-exported: benchmarks/outlier_effect.py imports the collators from here.
from transformers import DataCollatorForLanguageModeling as DataCollatorForLanguageModeling
from transformers import default_data_collator as default_data_collator

from .. import families
from ..paths import apply_umask, write_text_atomic
from .callbacks import TRACKING_FILE, OutlierTrackingCallback
from .data import load_image_datasets, load_text_datasets
from .presets import FSDP_REFUSAL, TrainingPreset, build_config, validate_preset
from .trainer import TRAINERS, latest_complete_checkpoint

logger = logging.getLogger(__name__)

RECIPE_FILE = "training_recipe.json"
CHECKPOINT_DIR = "checkpoints"
FINAL_TMP_PREFIX = ".final.tmp"


class RunDirectoryError(ValueError):
    """The output directory cannot hold this run."""


def check_writable(output_dir: Path) -> None:
    """Refuse an `output_dir` that is a file, lies under a file, or cannot be written (without writing)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirectoryError(f"--output {output_dir} is a file, not a folder: choose a folder")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirectoryError(f"--output {output_dir} lies under the file {existing}: choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise RunDirectoryError(f"--output {output_dir} is not writable ({existing} is read-only)")


def check_output_dir(output_dir: Path, recipe: dict[str, Any], resume: bool) -> tuple[str | None, list[str]]:
    """Validate `output_dir` for `recipe`; return the checkpoint to resume from and the ones skipped.

    Raises RunDirectoryError when the folder cannot be written, holds another run or unrelated
    files, holds this run without `resume` (unless an earlier attempt saved nothing: it starts
    over), or has nothing to resume. A run may be resumed with a different `max_steps` (to extend
    it), from its newest complete checkpoint.
    """
    check_writable(output_dir)
    if not output_dir.exists() or not any(output_dir.iterdir()):
        if resume:
            raise RunDirectoryError(f"--resume: {output_dir} holds no run to resume; drop --resume to start one")
        return None, []
    recipe_path = output_dir / RECIPE_FILE
    if not recipe_path.exists():
        raise RunDirectoryError(f"{output_dir} is not empty and holds no {RECIPE_FILE}: choose a new or empty --output")
    try:
        previous = json.loads(recipe_path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirectoryError(f"{recipe_path} is unreadable ({err}): choose another --output") from None

    def identity(r: dict) -> dict:
        return {**r, "training": {k: v for k, v in r.get("training", {}).items() if k != "max_steps"}}

    if identity(previous) != identity(recipe):
        diff = sorted(
            f"{group}.{k}"
            for group in ("model", "training", "data", "tracking")
            for k in set(previous.get(group, {})) | set(recipe.get(group, {}))
            if previous.get(group, {}).get(k) != recipe.get(group, {}).get(k) and k != "max_steps"
        )
        raise RunDirectoryError(
            f"{output_dir} holds another run (preset {previous.get('name')!r}; differing fields: "
            f"{', '.join(diff) or 'name'}): choose another --output"
        )
    checkpoint_root = output_dir / CHECKPOINT_DIR
    checkpoint, skipped = latest_complete_checkpoint(checkpoint_root) if checkpoint_root.is_dir() else (None, [])
    kept = checkpoint is not None or (output_dir / "config.json").exists()
    if not resume:
        if not kept:  # an earlier attempt stopped before saving anything: start over
            return None, skipped
        raise RunDirectoryError(
            f"{output_dir} already holds this run: pass --resume to continue it, or choose another --output"
        )
    if checkpoint is None:
        found = f" ({'; '.join(skipped)})" if skipped else ""
        raise RunDirectoryError(f"--resume: {checkpoint_root} holds no complete checkpoint to resume from{found}")
    return str(checkpoint), skipped


def remove_leftovers(output_dir: Path) -> None:
    """Remove what an interrupted earlier attempt of this run left half-written (its temporary folders)."""
    leftovers = [
        *output_dir.glob(f"{FINAL_TMP_PREFIX}*"),
        *(output_dir / CHECKPOINT_DIR).glob(".checkpoint-*.incomplete"),
    ]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_model(preset: TrainingPreset, processing: Any, labels: list[str] | None = None) -> PreTrainedModel:
    """A freshly initialised pre-training model of the preset's family sized to the tokenizer / label set.

    A text model takes its vocabulary size and the config's `_tokenizer_fields` (special-token ids) from
    the tokenizer; a tokenizer's `model_max_length` is set to the model's position limit, so the saved
    tokenizer truncates to what the model can read. An image model takes its labels and image size from
    the data.
    """
    kwargs = dict(preset.model)
    text = families.modality(preset.family) == "text"
    if text:
        kwargs["vocab_size"] = len(processing)
        for name in families.config_class(preset.family)._tokenizer_fields:
            kwargs[name] = getattr(processing, name)
    else:
        kwargs.update(
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
        )
        kwargs["image_size"] = preset.data.image_size
    config = build_config(preset, **kwargs)
    if text:
        limit = config.max_position_embeddings
        if preset.data.seq_length > limit:
            raise ValueError(f"data.seq_length={preset.data.seq_length} exceeds model.max_position_embeddings={limit}")
        trained = preset.data.tokenizer == "train"
        processing.model_max_length = limit if trained else min(processing.model_max_length, limit)
    return families.pretraining_class(preset.family)(config)


def _take(dataset, n: int) -> list[dict]:
    if hasattr(dataset, "__len__"):
        return [dataset[i] for i in range(min(n, len(dataset)))]
    return list(itertools.islice(iter(dataset), n))


def fixed_batches(dataset, collator, batch_size: int, num_batches: int, keep_labels: bool = True) -> list[dict]:
    """`num_batches` batches from the head of `dataset`, collated once (MLM masking fixed by seed 0)."""
    examples = _take(dataset, batch_size * num_batches)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        batches = [collator(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    finally:
        torch.random.set_rng_state(state)
    batches = [{k: v for k, v in dict(b).items() if k != "special_tokens_mask"} for b in batches]
    if not keep_labels:
        batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    return batches


@dataclass
class TrainingRun:
    trainer: Trainer
    tracker: OutlierTrackingCallback | None
    output_dir: Path
    resume_from: str | None
    skipped_checkpoints: list[str]


def build_run(
    preset: TrainingPreset,
    output_dir: str | os.PathLike,
    resume: bool = False,
    training_overrides: dict[str, Any] | None = None,
) -> TrainingRun:
    """Validate the preset and the output folder, load data, build the model, then write and set up the Trainer.

    Nothing is written until every check has passed and the data and model are built.
    `training_overrides` are extra TrainingArguments kwargs that are not part of the run's
    identity (e.g. `disable_tqdm`, `report_to`).
    """
    output_dir = Path(output_dir)
    validate_preset(preset)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        raise ValueError(f"accelerate launch --use_fsdp: {FSDP_REFUSAL}")
    recipe = preset.to_dict()
    resume_from, skipped = check_output_dir(output_dir, recipe, resume)
    training = {
        "report_to": "none",
        "save_strategy": "steps",
        "dataloader_pin_memory": torch.cuda.is_available(),
        # Without an accelerator, `use_cpu` makes accelerate set up multi-CPU DDP (gloo) under torchrun.
        "use_cpu": not torch.accelerator.is_available(),
        # images are decoded from raw columns on the fly
        "remove_unused_columns": families.modality(preset.family) != "image",
        **preset.training,
        **(training_overrides or {}),
    }
    if training.get("fp16") and not torch.cuda.is_available():
        raise ValueError(
            f"preset {preset.name!r} trains in fp16, which needs a CUDA GPU: add the override fp16=false to run on CPU"
        )
    try:
        args = TrainingArguments(output_dir=str(output_dir / CHECKPOINT_DIR), **training)
    except (ValueError, TypeError) as err:
        raise ValueError(f"training: {' '.join(str(err).split())}") from None
    set_seed(args.seed)
    family = preset.family
    with args.main_process_first(desc="dataset preparation"):
        if families.modality(family) == "image":
            data = load_image_datasets(preset.data, seed=args.seed)
            processing = AutoImageProcessor.from_pretrained(resume_from) if resume_from else data.image_processor
            model = build_model(preset, processing, data.labels)
        else:
            tokenizer = AutoTokenizer.from_pretrained(resume_from) if resume_from else None
            data = load_text_datasets(preset.data, family, seed=args.seed, tokenizer=tokenizer)
            processing = data.tokenizer
            model = build_model(preset, processing)
    if args.process_index == 0:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirectoryError(f"cannot create --output {output_dir}: {err.strerror}") from None
        remove_leftovers(output_dir)
        if resume_from is None:  # a fresh start: no tracking records of an earlier, failed attempt
            (output_dir / TRACKING_FILE).unlink(missing_ok=True)
        write_json_atomic(output_dir / RECIPE_FILE, recipe)
    trainer_class = TRAINERS[families.training_objective(family)]
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        processing_class=processing,
        optimizer_name=preset.optimizer,
        data_collator=trainer_class.build_collator(processing, preset.data.mlm_probability),
    )
    tracker = None
    tracking = preset.tracking
    if tracking.outlier_every_n_steps:
        probe_collator = trainer_class.build_collator(processing, preset.data.mlm_probability)
        batch_size = args.per_device_eval_batch_size
        probes = fixed_batches(data.validation, probe_collator, batch_size, tracking.probe_batches)
        calibration = (
            fixed_batches(data.train, probe_collator, batch_size, tracking.calibration_batches, keep_labels=False)
            if tracking.w8a8_every_n_steps
            else None
        )
        tracker = OutlierTrackingCallback(
            probes,
            tracking.outlier_every_n_steps,
            tracking.w8a8_every_n_steps,
            calibration_batches=calibration,
            log_file=output_dir / TRACKING_FILE,
        )
        trainer.add_callback(tracker)
    return TrainingRun(
        trainer=trainer, tracker=tracker, output_dir=output_dir, resume_from=resume_from, skipped_checkpoints=skipped
    )


def save_final_model(trainer: Trainer, output_dir: Path, results: dict[str, Any]) -> None:
    """Write the Hub-ready model folder into `output_dir` through a temporary folder: the model (with
    `auto_map` and its modeling code), processor and `training_args.bin`, plus `results` (file name ->
    JSON data). A failure leaves `output_dir` as it was and no temporary folder."""
    tmp = output_dir / f"{FINAL_TMP_PREFIX}{os.getpid()}"
    try:
        trainer.save_model(str(tmp))
        for name, data in results.items():
            write_json_atomic(tmp / name, data)
        apply_umask(tmp)
        for item in tmp.iterdir():
            target = output_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish_run(run: TrainingRun, train_metrics: dict[str, float]) -> dict[str, float]:
    """Evaluate, then write the Hub-ready model folder into `output_dir` (via a temporary folder)."""
    trainer = run.trainer
    eval_metrics = trainer.evaluate()
    if not trainer.is_world_process_zero():
        return eval_metrics
    save_final_model(trainer, run.output_dir, {"train_results.json": train_metrics, "eval_results.json": eval_metrics})
    return eval_metrics
