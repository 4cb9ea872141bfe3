"""FP vs simulated W8A8 vs real INT8 on identical inputs: one call, result records and plots.

`evaluate_model` loads the floating-point model (a quantizable checkpoint, or a stock BERT/OPT/ViT
one loaded into its quantizable class), builds the evaluation batches once (fixed masking seed),
evaluates the FP model, its simulated W8A8 version (calibrated on separate data), optionally its
W8A8 version with Outlier Suppression, and the real INT8 checkpoint given with `int8`. Every variant
records its task metric and its outlier statistics.
"""

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from .. import families
from ..provenance import model_fingerprint
from .attention_view import attention_mass, attention_probabilities, delimiter_token_ids
from .data import load_split
from .outliers import OutlierStatsCollector
from .quality import (
    clm_batches,
    embedding_cosine_similarity,
    evaluate_batches,
    image_batches,
    mlm_batches,
    sentence_embeddings,
)
from .results import ResultRecord

# task -> metric task name of its records. The model class that runs a task is the family's class whose
# `_evaluation_task` it is (glue: `evaluation.glue`); the families of a task come from the registry.
TASKS = {"mlm": "mlm", "clm": "clm", "image": "image-classification", "embedding": "embedding-fidelity"}
PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = {name: dtype for dtype, name in PRECISIONS.items()}
OUTLIER_METRICS = ("max_inf_norm", "avg_kurtosis", "max_kurtosis")


@dataclasses.dataclass
class EvalSettings:
    """What to evaluate and on which data (see `python -m hf_quantizable.evaluate --help`)."""

    task: str
    dataset: str
    dataset_config: str | None = None
    split: str = "test"
    calibration_split: str | None = None
    data_files: str | None = None
    text_column: str = "text"
    image_column: str = "image"
    label_column: str = "label"
    max_sequences: int = 128
    max_length: int = 128
    # causal LM: every block starts with the BOS token (the model's `data.bos_at_block_start`)
    bos_at_block_start: bool = False
    batch_size: int = 8
    mlm_probability: float = 0.15
    seed: int = 0
    w8a8: bool = True
    outlier_suppression: bool = False
    w8a8_config: dict | None = None
    # Floating-point precisions evaluated besides fp32 (the reference of every quantized variant).
    extra_precisions: tuple[str, ...] = ()

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {sorted(TASKS)} (or glue), got {self.task!r}")
        unknown = sorted(set(self.extra_precisions) - {"fp16", "bf16"})
        if unknown:
            raise ValueError(f"`extra_precisions` may hold fp16 and bf16 (fp32 is always evaluated), got {unknown}")
        for name in ("max_sequences", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass
class Variant:
    """One evaluated model variant."""

    name: str  # fp32, w8a8-sim, w8a8-sim+os, int8
    precision: str
    result: dict[str, Any]


def _family_names(families_of_task: list[str]) -> str:
    return " or ".join(family.upper() for family in families_of_task)


def family_tasks(family: str | None) -> str:
    """The tasks a model of `family` runs (`mlm, embedding or glue`), in the order of `TASKS`."""
    tasks = [task for task in (*TASKS, "glue") if families.class_for_task(family, task) is not None]
    if not tasks:
        return f"none (supported model types: {', '.join(families.names())} and quantizable_*)"
    return tasks[0] if len(tasks) == 1 else f"{', '.join(tasks[:-1])} or {tasks[-1]}"


def load_config(model_name_or_path: str, option: str = "MODEL", trust_remote_code: bool = False) -> Any:
    """The config of a local folder or Hub id, with one-line errors for a missing folder or foreign code.

    Model types of this package (and stock BERT/OPT/ViT) load without remote code; a config whose
    `auto_map` needs code from the folder or repo loads only with `trust_remote_code=True`.
    """
    path = Path(model_name_or_path)
    if not path.is_dir():
        if path.exists():
            raise ValueError(f"{option} {model_name_or_path} is a file; expected a model folder or a Hub repo id")
        looks_like_path = model_name_or_path.startswith((".", "/", "~")) or model_name_or_path.count("/") > 1
        if looks_like_path:
            raise FileNotFoundError(f"{option} folder {model_name_or_path} does not exist")
    try:
        return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ValueError(
                f"{option} {model_name_or_path} needs its own Python code to load (config `auto_map` of an "
                "unregistered model type); pass --trust-remote-code if you trust it"
            ) from None
        raise ValueError(f"{option} {model_name_or_path}: {error}") from None
    except OSError as error:  # missing config.json, unreachable Hub, unknown repo
        where = "" if path.is_dir() else "no such local folder, and as a Hub repo id: "
        raise OSError(f"{option} {model_name_or_path}: {where}{str(error).splitlines()[0]}") from None


def check_model_for_task(model_name_or_path: str, task: str, trust_remote_code: bool = False) -> Any:
    """Fail fast when `model_name_or_path` cannot run `task` (wrong family, or an INT8 checkpoint)."""
    config = load_config(model_name_or_path, "MODEL", trust_remote_code)
    family = families.family_of(config.model_type)
    if task not in TASKS and task != "glue":
        raise ValueError(f"unknown task {task!r}; choose one of {sorted([*TASKS, 'glue'])}")
    if families.class_for_task(family, task) is None:
        raise ValueError(
            f"task {task!r} needs a {_family_names(families.families_for_task(task))} model, but "
            f"{model_name_or_path} is model_type {config.model_type!r}; tasks for this model: {family_tasks(family)}"
        )
    if getattr(config, "w8a8_config", None):
        raise ValueError(f"{model_name_or_path} is an INT8 checkpoint: give its FP model as MODEL and it as --int8")
    return config


def check_int8_source(model_name_or_path: str, int8_path: str, int8_config: dict) -> bool:
    """Refuse an INT8 checkpoint made from another model than `model_name_or_path`.

    Returns True when verified, False when it cannot be (a Hub id as MODEL, or a checkpoint that
    records no `source_fingerprint`).
    """
    recorded = int8_config.get("source_fingerprint")
    if not recorded or not Path(model_name_or_path).is_dir():
        return False
    if model_fingerprint(model_name_or_path) != recorded:
        raise ValueError(
            f"--int8 {int8_path} was not quantized from {model_name_or_path} (its `source_fingerprint` differs "
            "from the model's): give the INT8 checkpoint of this model"
        )
    return True


def load_fp_model(model_name_or_path: str, task: str, trust_remote_code: bool = False) -> nn.Module:
    """The FP model in its quantizable class; fails when the task head is missing from the checkpoint."""
    config = check_model_for_task(model_name_or_path, task, trust_remote_code)
    model_class = families.class_for_task(families.family_of(config.model_type), task)
    model, info = model_class.from_pretrained(model_name_or_path, output_loading_info=True)
    # a stock checkpoint keeps its model_type: it is now a quantizable model (and saves as one)
    model.config.model_type = model_class.config_class.model_type
    missing = [k for k in info["missing_keys"] if "gate" not in k]  # gates are new in stock checkpoints
    if missing:
        raise ValueError(
            f"{model_name_or_path} lacks weights that task {task!r} needs ({missing[:3]}...): "
            "it has no such head (use --task embedding for an encoder without a head)"
        )
    return model.eval()


def load_int8_model(path: str, task: str, trust_remote_code: bool = False) -> nn.Module:
    """The real INT8 checkpoint, in our class (its own copy of the code runs only with `trust_remote_code`)."""
    config = load_config(path, "--int8", trust_remote_code)
    if not getattr(config, "w8a8_config", None):
        raise ValueError(f"--int8 {path} is not an INT8 checkpoint: its config.json has no `w8a8_config`")
    model_class = families.class_for_task(families.family_of(config.model_type), task)
    if model_class is None:
        expected = _family_names(families.families_for_task(task))
        raise ValueError(f"--int8 {path} is model_type {config.model_type!r}; task {task!r} needs {expected}")
    return model_class.from_pretrained(path).eval()


def w8a8_config_from(int8_config: dict | None, outlier_suppression: bool):
    """The W8A8Config of an INT8 checkpoint's `w8a8_config` (quantizer fields only), or the default."""
    from ..quantization import W8A8Config

    fields = {f.name for f in dataclasses.fields(W8A8Config)}
    settings = {k: v for k, v in (int8_config or {}).items() if k in fields}
    if outlier_suppression:
        settings.update(gamma_migration=True, token_wise_clipping=True)
    return W8A8Config(**settings)


def _processor(model_name_or_path: str, task: str):
    loader = AutoImageProcessor if task == "image" else AutoTokenizer
    try:
        return loader.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        kind = "image processor" if task == "image" else "tokenizer"
        raise ValueError(f"{model_name_or_path} has no {kind} (save one with save_pretrained): {error}") from error


def build_batches(settings: EvalSettings, processor, split: str, skip: int = 0) -> list[dict]:
    """Evaluation (or calibration) batches of `split`; `skip` drops the first sequences/images."""
    limit = settings.max_sequences + skip
    if settings.task == "image":
        dataset = load_split(settings.dataset, settings.dataset_config, split, settings.data_files, limit=limit)
        dataset = dataset.select(range(min(skip, len(dataset)), len(dataset)))
        return image_batches(processor, dataset, settings.batch_size, settings.image_column, settings.label_column)
    dataset = load_split(settings.dataset, settings.dataset_config, split, settings.data_files)
    if settings.text_column not in dataset.column_names:
        raise ValueError(f"dataset has no text column {settings.text_column!r}; columns: {dataset.column_names}")
    texts = dataset[settings.text_column]
    if settings.task == "clm":
        bos = processor.bos_token_id if settings.bos_at_block_start else None
        batches = clm_batches(processor, texts, settings.max_length, settings.batch_size, limit, bos_token_id=bos)
    elif settings.task == "mlm":
        batches = mlm_batches(
            processor, texts, settings.max_length, settings.batch_size, settings.mlm_probability, settings.seed, limit
        )
    else:  # embedding: one padded sentence per non-empty line
        lines = [t.strip() for t in texts if t.strip()][:limit]
        batches = [
            dict(
                processor(
                    lines[i : i + settings.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=settings.max_length,
                    return_tensors="pt",
                )
            )
            for i in range(0, len(lines), settings.batch_size)
        ]
    return _skip_sequences(batches, skip)


def _skip_sequences(batches: list[dict], skip: int) -> list[dict]:
    kept, seen = [], 0
    for batch in batches:
        size = next(iter(batch.values())).shape[0]
        if seen >= skip:
            kept.append(batch)
        elif seen + size > skip:
            kept.append({k: v[skip - seen :] for k, v in batch.items()})
        seen += size
    return kept


def _calibration(settings: EvalSettings, processor, count: int) -> tuple[list[dict], str, int]:
    """Calibration batches: `calibration_split` (default: validation when evaluating test, else the
    evaluation split) without the evaluated sequences."""
    split = settings.calibration_split or ("validation" if settings.split == "test" else settings.split)
    skip = settings.max_sequences if split == settings.split else 0
    calibration = dataclasses.replace(settings, max_sequences=count * settings.batch_size)
    batches = build_batches(calibration, processor, split, skip=skip)
    if not batches:
        raise ValueError(f"no calibration data in split {split!r} (after the {skip} evaluated sequences)")
    return batches, split, skip


def _precision(model: nn.Module) -> str:
    return PRECISIONS.get(next(model.parameters()).dtype, "fp32")


def _evaluate_variant(
    model: nn.Module, settings: EvalSettings, batches: list[dict], reference: nn.Module | None, name: str
):
    if settings.task == "embedding":
        with OutlierStatsCollector(model) as collector:
            embeddings = sentence_embeddings(model, batches)
        result = {
            "metric": "cosine_similarity",
            "value": None,
            "n": embeddings.shape[0],
            "outliers": collector.summary(),
        }
        if reference is not None:
            similarity = embedding_cosine_similarity(reference, model, batches)
            result.update(value=similarity.mean().item(), min_cosine_similarity=similarity.min().item())
        return result
    return evaluate_batches(model, TASKS[settings.task], batches, desc=name)


def _records(
    model_name: str, fingerprint: str | None, attn_impl: str, settings: EvalSettings, variant: Variant, extra: dict
) -> list[ResultRecord]:
    common = dict(
        model=model_name,
        model_fingerprint=fingerprint,
        attn_impl=attn_impl,
        precision=variant.precision,
        dataset=settings.dataset,
        dataset_config=settings.dataset_config,
        split=settings.split,
        n=variant.result["n"],
        seed=settings.seed if settings.task == "mlm" else None,
    )
    extra = {**extra, "variant": variant.name}
    records = []
    if variant.result["value"] is not None:
        quality_extra = {
            k: variant.result[k] for k in ("tokens", "min_cosine_similarity") if variant.result.get(k) is not None
        }
        records.append(
            ResultRecord(
                task=TASKS[settings.task],
                metric=variant.result["metric"],
                value=variant.result["value"],
                extra={**extra, **quality_extra},
                **common,
            )
        )
    outliers = variant.result["outliers"]
    for metric in OUTLIER_METRICS:
        detail = (
            {"max_inf_norm_by_kind": outliers["max_inf_norm_by_kind"], "per_layer": outliers["per_layer"]}
            if metric == "max_inf_norm"
            else {}
        )
        records.append(
            ResultRecord(task="outliers", metric=metric, value=outliers[metric], extra={**extra, **detail}, **common)
        )
    return records


def evaluate_model(
    model_name_or_path: str,
    settings: EvalSettings,
    int8: str | None = None,
    plots_dir: str | Path | None = None,
    attention_layer: int | None = None,
    attention_head: int | None = None,
    trust_remote_code: bool = False,
) -> tuple[list[ResultRecord], list[Variant]]:
    """Evaluate FP, simulated W8A8 (optionally + Outlier Suppression) and the INT8 checkpoint `int8`.

    Every record names the evaluated model by path and, for a local folder, by `model_fingerprint`.
    Returns the result records and the evaluated variants. With `plots_dir`, writes
    `layers.png`, `outlier_dims.png`, `head_mass.png` and (for text or images) `attention.png`.
    """
    fp_model = load_fp_model(model_name_or_path, settings.task, trust_remote_code)
    positions = getattr(fp_model.config, "max_position_embeddings", None)
    if settings.task != "image" and positions is not None and settings.max_length > positions:
        raise ValueError(
            f"--max-length {settings.max_length} exceeds the model's max_position_embeddings ({positions})"
        )
    int8_model = load_int8_model(int8, settings.task, trust_remote_code) if int8 else None
    int8_verified = check_int8_source(model_name_or_path, int8, int8_model.config.w8a8_config) if int8 else None
    if int8 and not int8_verified:
        print(f"warning: cannot check that --int8 {int8} was made from {model_name_or_path}", file=sys.stderr)
    fingerprint = model_fingerprint(model_name_or_path) if Path(model_name_or_path).is_dir() else None
    processor = _processor(model_name_or_path, settings.task)
    if settings.task in ("clm", "embedding") and getattr(processor, "pad_token", "x") is None:
        processor.pad_token = processor.eos_token
    batches = build_batches(settings, processor, settings.split)
    if not batches:
        raise ValueError(f"no evaluation data in split {settings.split!r} of {settings.dataset}")
    attn_impl = getattr(fp_model.config, "attn_impl", "softmax")
    extra: dict[str, Any] = {"max_length": settings.max_length, "batch_size": settings.batch_size}
    if settings.task == "mlm":
        extra["mlm_probability"] = settings.mlm_probability

    variants = [
        Variant(_precision(fp_model), _precision(fp_model), _evaluate_variant(fp_model, settings, batches, None, "fp"))
    ]
    if settings.task == "embedding":
        variants[0].result.update(value=1.0, min_cosine_similarity=1.0)
    for precision in settings.extra_precisions:  # the same model and batches, computed in fp16 / bf16
        cast = copy.deepcopy(fp_model).to(DTYPES[precision])
        variants.append(Variant(precision, precision, _evaluate_variant(cast, settings, batches, fp_model, precision)))
    if settings.w8a8:
        from ..quantization import quantize_model

        base = int8_model.config.w8a8_config if int8_model is not None else {}
        int8_settings = {**base, **(settings.w8a8_config or {})}
        options = [False, True] if settings.outlier_suppression else [False]
        for suppress in options:
            config = w8a8_config_from(int8_settings, suppress)
            calibration, split, skip = _calibration(settings, processor, config.num_calibration_batches)
            simulated = quantize_model(copy.deepcopy(fp_model), config, calibration)
            name = "w8a8-sim+os" if suppress else "w8a8-sim"
            result = _evaluate_variant(simulated, settings, batches, fp_model, name)
            result["w8a8"] = {"config": config.to_dict(), "calibration_split": split, "calibration_skip": skip}
            variants.append(Variant(name, "w8a8-sim", result))
    if int8_model is not None:
        variants.append(Variant("int8", "int8", _evaluate_variant(int8_model, settings, batches, fp_model, "int8")))

    records = []
    for variant in variants:
        variant_extra = {**extra, **({"w8a8": variant.result["w8a8"]} if "w8a8" in variant.result else {})}
        if variant.name == "int8":
            variant_extra.update(int8_checkpoint=str(int8), int8_source_verified=int8_verified)
        records += _records(str(model_name_or_path), fingerprint, attn_impl, settings, variant, variant_extra)
    if plots_dir is not None:
        write_plots(fp_model, variants, batches, processor, settings, Path(plots_dir), attention_layer, attention_head)
    return records, variants


def write_plots(
    model, variants, batches, processor, settings, plots_dir: Path, layer: int | None, head: int | None
) -> list[Path]:
    """The evaluation's figures (see `evaluate_model`)."""
    from .plots import plot_attention_heatmap, plot_head_mass, plot_layer_stats, plot_outlier_dims

    written = [
        plot_layer_stats(
            {v.name: v.result["outliers"] for v in variants},
            plots_dir / "layers.png",
            title=f"{settings.task}: outliers per layer",
        )
    ]
    with OutlierStatsCollector(model) as collector, torch.no_grad():
        for batch in batches[:4]:
            model(**{k: v for k, v in batch.items() if k not in ("labels", "special_tokens_mask")})
    layer_outputs = collector.outlier_counts(kinds=("layernorm_output", "layer_output"))
    written.append(
        plot_outlier_dims(
            layer_outputs, plots_dir / "outlier_dims.png", title="FP outliers per hidden dimension (layer outputs)"
        )
    )
    inputs = {k: v for k, v in batches[0].items() if k not in ("labels", "special_tokens_mask")}
    delimiters = delimiter_token_ids(processor) if settings.task != "image" else None
    view = attention_mass(model, batches[:4], delimiter_ids=delimiters)
    written.append(plot_head_mass(view["mass"], plots_dir / "head_mass.png", title="FP attention mass per head"))
    layer = model.config.num_hidden_layers - 1 if layer is None else layer
    head = 0 if head is None else head
    probs = attention_probabilities(model, inputs, layer, head)
    tokens = None
    if settings.task != "image":
        ids = (
            inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
            if "attention_mask" in inputs
            else inputs["input_ids"][0]
        )
        tokens = processor.convert_ids_to_tokens(ids.tolist())
    written.append(
        plot_attention_heatmap(probs, plots_dir / "attention.png", tokens=tokens, title=f"layer {layer}, head {head}")
    )
    return written
