"""Named training recipes: the papers' settings and small presets for CPU runs.

A preset holds three groups of fields: `model` (config kwargs of the family's config class),
`training` (`transformers.TrainingArguments` kwargs) and `data` (a [`DataSpec`]). Every field can be
overridden by name from the command line (`learning_rate=3e-4`, `model.num_hidden_layers=2`).

Sources: Bondarenko et al. 2023 and the official scripts (github.com/qualcomm-ai-research/
outlier-free-transformers: `scripts/*.sh`, `model_configs/*.yaml`), Liao & Monz 2024.
"""

import copy
import dataclasses
import difflib
import enum
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import TrainingArguments

from .. import families
from ..modeling.configuration_quantizable import ATTENTION_VARIANTS

# Image augmentations (`DataSpec.augmentation`); `auto`: timm's pipeline when timm imports, else `basic` (the
# paper presets use it: they run without timm).
AUGMENTATIONS = ("auto", "timm", "basic", "none")
OPTIMIZERS = ("adamw", "muon")  # muon: torch.optim.Muon on hidden matrices, AdamW on the rest (Park et al. 2025)


@dataclass
class DataSpec:
    """Where the training data comes from and how it is prepared.

    Args:
        dataset: `embedded` (generated offline, see `hf_quantizable.training.embedded`; text models
            also accept `embedded-noop`, the synthetic outlier-effect corpus), a Hub dataset
            name (`bookcorpus+wikipedia`, `wikitext-103`, `imagenet-1k`, or any `load_dataset` name),
            or a local file / folder (`.txt`, `.json`/`.jsonl`, an image folder).
        dataset_config: Hub dataset configuration name.
        streaming: stream the training split instead of downloading it first.
        text_column / image_column / label_column: column names (auto-detected when None).
        tokenizer: `train` (train a tokenizer on the training text with `tokenizers`, offline) or a
            tokenizer name/path for `AutoTokenizer`.
        vocab_size: vocabulary size of a trained tokenizer.
        seq_length: MLM sequence length / CLM block size (group-texts packing).
        bos_at_block_start: causal LM: every packed block starts with the tokenizer's BOS token
            (`[bos] + block[:-1]`), a fixed first token for attention sinks to form on; evaluation and
            calibration of the trained model build their blocks the same way (its training recipe).
        mlm_probability: masking probability of the MLM collator.
        image_size: square input size of image models.
        augmentation: `timm` (the paper's pipeline, needs an importable timm), `auto` (timm's when it
            imports, else `basic`), `basic` (built-in random resized crop + flip) or `none` (None).
        eval_fraction: share of a training set held out for evaluation when there is no eval split.
        stream_eval_examples: examples held out from the head of a streamed training set without an
            eval split.
        max_train_samples: cap the number of training examples (before packing); None = all.
        num_proc: worker processes for `datasets.map`.
        embedded_size: number of examples the embedded generator writes (lines / images).
    """

    dataset: str = "embedded"
    dataset_config: str | None = None
    streaming: bool = False
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    tokenizer: str = "train"
    vocab_size: int = 2000
    seq_length: int = 128
    bos_at_block_start: bool = False
    mlm_probability: float = 0.15
    image_size: int = 224
    augmentation: str | None = "basic"
    eval_fraction: float = 0.05
    stream_eval_examples: int = 1000
    max_train_samples: int | None = None
    num_proc: int | None = None
    embedded_size: int = 20000


@dataclass
class TrackingSpec:
    """Outlier tracking during training (see `OutlierTrackingCallback`).

    Args:
        outlier_every_n_steps: log gate probabilities, outlier statistics and the probe loss every N
            optimizer steps (0 = off).
        w8a8_every_n_steps: also evaluate a simulated-W8A8 copy every N steps (0 = off).
        probe_batches: number of fixed evaluation batches (fixed masking) the statistics use.
        calibration_batches: training batches used to calibrate the W8A8 copy (the papers use 16).
    """

    outlier_every_n_steps: int = 0
    w8a8_every_n_steps: int = 0
    probe_batches: int = 2
    calibration_batches: int = 16


@dataclass
class TrainingPreset:
    """One named recipe."""

    name: str
    family: str
    description: str
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    data: DataSpec = field(default_factory=DataSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    optimizer: str = "adamw"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingPreset":
        return cls(**{**d, "data": DataSpec(**d["data"]), "tracking": TrackingSpec(**d["tracking"])})


# --- attention variants (Bondarenko et al. Tables 2-4 and the official scripts) ---
# family -> variant (a name of `ATTENTION_VARIANTS`, which gives its `attn_impl`) -> the variant's fields.
_ATTN = {
    "bert": {
        "vanilla": {},
        "clipped": {"clip_gamma": -0.025, "clip_zeta": 1.0},
        # gate_n_hid: d_head // 4 (16 at BERT-base), set per model in `_build_presets` as the official
        # `BertSelfAttentionWithExtras` (transformers_language/models/bert_attention.py, attn_gate_mlp).
        "gated": {"gate_type": "mlp", "pi_init": 0.5},
    },
    "opt": {
        "vanilla": {},
        "clipped": {"clip_alpha": 12.0, "clip_zeta": 1.0},
        "gated": {"gate_type": "linear", "pi_init": 0.25},
    },
    "vit": {
        "vanilla": {},
        "clipped": {"clip_gamma": -0.003, "clip_zeta": 1.0},
        "gated": {"gate_type": "linear", "pi_init": 0.25},
    },
}
# The variants with presets (every family's), in the order of `ATTENTION_VARIANTS`: vanilla, clipped, gated.
VARIANTS = tuple(v for v in ATTENTION_VARIANTS if all(v in variants for variants in _ATTN.values()))
# Liao & Monz 2024 compare vanilla, clipped softmax (the family's Bondarenko setting above) and
# normalized clipped softmax with the paper's values: zeta = 1 and beta = 1 - 3.2 * 127/128 = -2.175
# (BERT) or 0.9 (OPT). (The authors' code defaults to zeta = 1.03, beta = 1.0; the presets follow the paper.)
_NCS = {"bert": {"ncs_zeta": 1.0, "ncs_beta": -2.175}, "opt": {"ncs_zeta": 1.0, "ncs_beta": 0.9}}
LIAO_VARIANTS = ("vanilla", "clipped", "normalized_clipped")

_COMMON_TRAINING = {"lr_scheduler_type": "linear", "max_grad_norm": 1.0, "seed": 1000, "save_total_limit": 2}

_BERT_BASE_MODEL = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}
_BERT_PAPER_TRAINING = {
    **_COMMON_TRAINING,
    "learning_rate": 1e-4,
    "warmup_steps": 10_000,
    "max_steps": 1_000_000,
    "per_device_train_batch_size": 256,
    "per_device_eval_batch_size": 256,
    "weight_decay": 0.01,
    "fp16": True,
    "save_steps": 100_000,
    "logging_steps": 2000,
}
_BERT_PAPER_DATA = {"dataset": "bookcorpus+wikipedia", "tokenizer": "bert-base-uncased", "seq_length": 128}

_OPT_125M_MODEL = {
    "vocab_size": 50272,
    "hidden_size": 768,
    "word_embed_proj_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "ffn_dim": 3072,
    "max_position_embeddings": 512,
    "dropout": 0.1,
    "init_std": 0.006,  # model_configs/opt-12L12H.yaml
    "wd_ln_gamma": True,
    # run_clm.py replaces every attention module after the model's init: their projections keep
    # nn.Linear's default init (std 1 / sqrt(3 * 768) ~ 0.021, 3.5x init_std).
    "attention_init": "torch_default",
}
_OPT_PAPER_TRAINING = {
    **_COMMON_TRAINING,
    "learning_rate": 4e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "warmup_steps": 2000,
    "max_steps": 125_000,
    "per_device_train_batch_size": 48,
    "per_device_eval_batch_size": 48,
    "gradient_accumulation_steps": 4,  # effective batch 192 on one device
    "weight_decay": 0.1,
    "fp16": True,
    "save_steps": 10_000,
    "logging_steps": 2000,
}
_OPT_PAPER_DATA = {"dataset": "bookcorpus+wikipedia", "tokenizer": "facebook/opt-350m", "seq_length": 512}
# scripts/opt_350m_vanilla.sh with model_configs/opt-350m.yaml: pre-LN (the yaml keeps OPTConfig's
# `do_layer_norm_before`), word embeddings of the hidden width, no weight decay on LayerNorm weights.
_OPT_350M_MODEL = {
    **_OPT_125M_MODEL,
    "hidden_size": 1024,
    "word_embed_proj_dim": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "ffn_dim": 4096,
    "max_position_embeddings": 1024,
    "wd_ln_gamma": False,
}
_OPT_350M_TRAINING = {
    **_OPT_PAPER_TRAINING,
    "max_steps": 100_000,
    "per_device_train_batch_size": 24,
    "per_device_eval_batch_size": 24,
    "gradient_accumulation_steps": 11,  # effective batch 264 on one device
    "save_steps": 1000,
}

# Liao & Monz 2024 (arXiv:2402.12102), Appendix A, BERT pre-training: seq 128, 125K steps, batch
# 2048, peak lr 7e-4 (1e-4 for large), AdamW (0.9, 0.98), weight decay 0.01. The warmup is not among
# those settings: the presets take 6% of the steps (the ratio of their GLUE recipe), our choice.
_LIAO_BERT_TRAINING = {
    **_COMMON_TRAINING,
    "learning_rate": 7e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.98,
    "warmup_steps": 0.06,
    "max_steps": 125_000,
    "per_device_train_batch_size": 256,
    "per_device_eval_batch_size": 256,
    "gradient_accumulation_steps": 8,  # effective batch 2048 on one device
    "weight_decay": 0.01,
    "fp16": True,
    "save_steps": 10_000,
    "logging_steps": 2000,
}
_LIAO_BERT_SIZES = {  # name -> hidden, layers, heads (FFN 4x hidden)
    "small": (512, 6, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

_VIT_S16_MODEL = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "image_size": 224,
    "patch_size": 16,
    "num_labels": 1000,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
# DeiT / timm ViT-S/16 ImageNet recipe (300 epochs, AdamW, cosine, label smoothing 0.1).
_VIT_PAPER_TRAINING = {
    **_COMMON_TRAINING,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 6250,  # 5 epochs at batch 1024
    "num_train_epochs": 300,
    "max_steps": -1,
    "per_device_train_batch_size": 1024,
    "per_device_eval_batch_size": 256,
    "weight_decay": 0.05,
    "label_smoothing_factor": 0.1,
    "fp16": True,
    "save_strategy": "epoch",
    "logging_steps": 500,
}
_VIT_PAPER_DATA = {"dataset": "imagenet-1k", "image_size": 224, "augmentation": "auto"}

# --- small CPU presets: 2 cores, minutes ---
_BERT_TINY_MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 128,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}
_TINY_TRAINING = {
    **_COMMON_TRAINING,
    "learning_rate": 1e-3,
    "warmup_steps": 50,
    "max_steps": 500,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 32,
    "weight_decay": 0.01,
    "save_steps": 100,
    "logging_steps": 25,
}
_OPT_TINY_MODEL = {
    "hidden_size": 128,
    "word_embed_proj_dim": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "ffn_dim": 512,
    "max_position_embeddings": 128,
    "dropout": 0.1,
    "init_std": 0.02,
    "wd_ln_gamma": True,
}
_VIT_TINY_MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "image_size": 32,
    "patch_size": 4,
    "num_channels": 3,
    "num_labels": 10,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

_BASES: dict[str, tuple[str, str, dict, dict, dict]] = {  # family, description, model, training, data
    "bert-base": (
        "bert",
        "BERT-base MLM on BookCorpus + Wikipedia (Bondarenko et al. Table 2; 1M steps, batch 256).",
        _BERT_BASE_MODEL,
        _BERT_PAPER_TRAINING,
        _BERT_PAPER_DATA,
    ),
    "bert-6l": (
        "bert",
        "Official 6-layer BERT (model_configs/bert-6L12H.yaml) with the BERT-base recipe.",
        {**_BERT_BASE_MODEL, "num_hidden_layers": 6, "max_position_embeddings": 256},
        _BERT_PAPER_TRAINING,
        _BERT_PAPER_DATA,
    ),
    "bert-tiny": (
        "bert",
        "2-layer hidden-128 BERT MLM on the embedded corpus; minutes on 2 CPU cores.",
        _BERT_TINY_MODEL,
        _TINY_TRAINING,
        {"seq_length": 64},
    ),
    "bert-noop": (
        "bert",
        "4-layer hidden-128 BERT, no dropout, on the synthetic no-op corpus (embedded-noop): the CPU "
        "setting of benchmarks/outlier_effect.py where vanilla starts growing outliers.",
        {**_BERT_TINY_MODEL, "num_hidden_layers": 4, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        {
            **_TINY_TRAINING,
            "max_steps": 1000,
            "warmup_steps": 100,
            "weight_decay": 0.0,
            "save_steps": 250,
            "logging_steps": 250,
        },
        {"dataset": "embedded-noop", "seq_length": 64},
    ),
    "opt-125m": (
        "opt",
        "OPT-125m CLM on BookCorpus + Wikipedia (Bondarenko et al. Table 3; 125k steps, batch 192).",
        _OPT_125M_MODEL,
        _OPT_PAPER_TRAINING,
        _OPT_PAPER_DATA,
    ),
    "opt-6l": (
        "opt",
        "Official 6-layer OPT (model_configs/opt-6L12H.yaml) with the OPT-125m recipe.",
        {**_OPT_125M_MODEL, "num_hidden_layers": 6},
        _OPT_PAPER_TRAINING,
        _OPT_PAPER_DATA,
    ),
    "opt-350m": (
        "opt",
        "OPT-350m CLM on BookCorpus + Wikipedia (Bondarenko et al. Table 3; scripts/opt_350m_vanilla.sh).",
        _OPT_350M_MODEL,
        _OPT_350M_TRAINING,
        _OPT_PAPER_DATA,
    ),
    "opt-tiny": (
        "opt",
        "2-layer hidden-128 OPT CLM on the embedded corpus; minutes on 2 CPU cores.",
        _OPT_TINY_MODEL,
        {**_TINY_TRAINING, "adam_beta1": 0.9, "adam_beta2": 0.95, "weight_decay": 0.1},
        {"seq_length": 64},
    ),
    "opt-outlier": (
        "opt",
        "4-layer hidden-128 pre-LN OPT on the synthetic no-op corpus, a BOS token at every block start, "
        "lr 2e-3, no dropout or weight decay: the setting of benchmarks/outlier_effect.py closest to the "
        "papers' effect (the main job's shipped checkpoints; about 30 minutes per variant on one core).",
        {
            **_OPT_TINY_MODEL,
            "num_hidden_layers": 4,
            "max_position_embeddings": 256,
            "dropout": 0,
            "attention_dropout": 0,
        },
        {
            **_TINY_TRAINING,
            "adam_beta1": 0.9,
            "adam_beta2": 0.95,
            "learning_rate": 2e-3,
            "warmup_steps": 100,
            "max_steps": 3200,
            "per_device_train_batch_size": 16,
            "per_device_eval_batch_size": 16,
            "weight_decay": 0,
            "logging_steps": 100,
        },
        {"dataset": "embedded-noop", "embedded_size": 100000, "seq_length": 256, "bos_at_block_start": True},
    ),
    "vit-s16": (
        "vit",
        "ViT-S/16 on ImageNet-1k (Bondarenko et al. Table 4; timm/DeiT pipeline when timm is installed).",
        _VIT_S16_MODEL,
        _VIT_PAPER_TRAINING,
        _VIT_PAPER_DATA,
    ),
    "vit-tiny": (
        "vit",
        "2-layer hidden-128 ViT (patch 4, 32x32) on embedded synthetic shapes; minutes on 2 CPU cores.",
        _VIT_TINY_MODEL,
        {**_TINY_TRAINING, "weight_decay": 0.05},
        {"image_size": 32, "embedded_size": 4000},
    ),
}


_LIAO_BASES: dict[str, tuple[str, str, dict, dict, dict]] = {
    **{
        f"liao-bert-{size}": (
            "bert",
            f"BERT-{size} MLM (Liao & Monz 2024, Appendix A: hidden {hidden}, {layers} layers, seq 128, "
            "125K steps, batch 2048, AdamW (0.9, 0.98)).",
            {
                **_BERT_BASE_MODEL,
                "hidden_size": hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "intermediate_size": 4 * hidden,
            },
            {**_LIAO_BERT_TRAINING, "learning_rate": 1e-4 if size == "large" else 7e-4},
            _BERT_PAPER_DATA,
        )
        for size, (hidden, layers, heads) in _LIAO_BERT_SIZES.items()
    },
    **{
        f"liao-{base}": (
            family,
            f"{description} As Liao & Monz 2024 (Appendix A: the Bondarenko et al. recipe).",
            *rest,
        )
        for base, (family, description, *rest) in _BASES.items()
        if base in ("opt-125m", "opt-350m")
    },
}


def _variant_fields(family: str, variant: str, model: dict, data: dict) -> dict:
    """The model fields of attention `variant` in a preset of `family` with `model` and `data`."""
    fields = _NCS[family] if variant == "normalized_clipped" else _ATTN[family][variant]
    attention = {"attn_impl": ATTENTION_VARIANTS[variant], **fields}
    if attention.get("gate_type") == "mlp":
        attention["gate_n_hid"] = max(1, model["hidden_size"] // model["num_attention_heads"] // 4)
    if "clip_alpha" in attention:  # gamma = -alpha / training length, fixed as the official code
        attention.update(clip_alpha_length="fixed", clip_max_length=data["seq_length"])
    return attention


def _build_presets() -> dict[str, TrainingPreset]:
    presets = {}
    bases = [(base, spec, VARIANTS) for base, spec in _BASES.items()]
    bases += [(base, spec, LIAO_VARIANTS) for base, spec in _LIAO_BASES.items()]
    for base, (family, description, model, training, data), variants in bases:
        for variant in variants:
            name = f"{base}-{variant}"
            attention = _variant_fields(family, variant, model, data)
            presets[name] = TrainingPreset(
                name=name,
                family=family,
                description=f"{description} Attention: {variant}.",
                model={**model, **attention},
                training=dict(training),
                data=DataSpec(**data),
                tracking=TrackingSpec(outlier_every_n_steps=training["logging_steps"]),
            )
    return presets


PRESETS: dict[str, TrainingPreset] = _build_presets()
# The search run behind the shipped opt-outlier checkpoints clipped with gamma = -alpha / 64 (its base
# preset's training length) while training on 256 tokens; the preset keeps that gamma (-0.1875).
PRESETS["opt-outlier-clipped"].model["clip_max_length"] = 64


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> TrainingPreset:
    """A fresh copy of the preset `name`; raises ValueError listing the allowed names."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}.{hint} Allowed presets: {', '.join(list_presets())}")
    return copy.deepcopy(PRESETS[name])


def _field_names(family: str) -> dict[str, set[str]]:
    config_fields = {f.name for f in dataclasses.fields(families.config_class(family))}
    return {
        "data": {f.name for f in dataclasses.fields(DataSpec)},
        "tracking": {f.name for f in dataclasses.fields(TrackingSpec)},
        "model": config_fields,
        "training": {f.name for f in dataclasses.fields(TrainingArguments)} - {"output_dir"},
    }


def parse_value(text: str) -> Any:
    """`3e-4` -> 0.0003, `true` -> True, `null` -> None, `[0.9, 0.95]` -> list, otherwise the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(preset: TrainingPreset, overrides: list[str] | dict[str, Any]) -> TrainingPreset:
    """Apply `field=value` overrides (or a dict) to a copy of `preset`.

    A field is `group.name` (group in `data`, `tracking`, `model`, `training`) or a bare name found in exactly
    one group. Unknown or ambiguous names raise ValueError naming the allowed fields.
    """
    if isinstance(overrides, list):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like field=value (e.g. learning_rate=3e-4)")
            key, value = item.split("=", 1)
            parsed[key.strip()] = parse_value(value)
        overrides = parsed
    preset = copy.deepcopy(preset)
    groups = _field_names(preset.family)
    applied = []
    for key, value in overrides.items():
        if key == "optimizer":  # a top-level field of the preset
            if value not in OPTIMIZERS:
                raise ValueError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}, got {value!r}")
            preset.optimizer = value
            continue
        group, _, name = key.rpartition(".")
        if group:
            if group not in groups:
                raise ValueError(f"unknown override group {group!r} in {key!r}; allowed: {', '.join(groups)}")
            if name not in groups[group]:
                raise ValueError(_unknown_field_message(key, name, {group: groups[group]}))
        else:
            owners = [g for g, names in groups.items() if name in names]
            if not owners:
                raise ValueError(_unknown_field_message(key, name, groups))
            if len(owners) > 1:
                raise ValueError(
                    f"override {key!r} is ambiguous: prefix it with one of {owners} (e.g. {owners[0]}.{name})"
                )
            group = owners[0]
        if group in ("data", "tracking"):
            setattr(getattr(preset, group), name, value)
        else:
            getattr(preset, group)[name] = value
        applied.append((group, name))
    for group, name in applied:
        reason = _unused_reason(preset, group, name)
        if reason:
            raise ValueError(f"override {group}.{name} would be ignored: {reason}")
    return preset


def _unknown_field_message(key: str, name: str, groups: dict[str, set[str]]) -> str:
    every = sorted({f"{g}.{n}" for g, names in groups.items() for n in names})
    close = difflib.get_close_matches(name, sorted({n for names in groups.values() for n in names}), n=5)
    lines = [f"unknown override field {key!r}."]
    if close:
        lines.append(f"Did you mean: {', '.join(close)}?")
    for group in ("data", "tracking"):
        if group in groups:
            lines.append(f"{group.capitalize()} fields: {', '.join(sorted(groups[group]))}.")
    lines.append(
        "Model fields are those of the family's config class and training fields those of "
        f"transformers.TrainingArguments ({len(every)} allowed names; `--list-fields` prints them all)."
    )
    return " ".join(lines)


def allowed_fields(family: str) -> list[str]:
    """Every `group.name` override accepted for `family`."""
    return sorted(f"{g}.{n}" for g, names in _field_names(family).items() for n in names)


# --- validation: every field is checked before a run writes anything ---

_TEXT_ONLY_DATA = {
    "tokenizer",
    "vocab_size",
    "seq_length",
    "bos_at_block_start",
    "mlm_probability",
    "text_column",
    "num_proc",
}
_IMAGE_ONLY_DATA = {"image_size", "augmentation", "image_column", "label_column"}
_HUB_ONLY_DATA = {"dataset_config"}
_ATTENTION_FIELDS = {
    "gated": {"gate_type", "gate_n_hid", "pi_init"},
    "clipped_softmax": {"clip_gamma", "clip_alpha", "clip_alpha_length", "clip_max_length", "clip_zeta"},
    "normalized_clipped_softmax": {"ncs_zeta", "ncs_beta"},
}
# What each pre-training objective is, for messages.
_OBJECTIVES = {"mlm": "a masked LM", "clm": "a causal LM", "image-classification": "an image classifier"}


def set_from_data(family: str) -> dict[str, str]:
    """The model fields a run sets from its data (field -> where from): the vocabulary and the family's
    `_tokenizer_fields` for text, the image size and the label set for images."""
    config_class = families.config_class(family)
    if config_class._modality == "image":
        return {
            "image_size": "data.image_size",
            **dict.fromkeys(("num_labels", "id2label", "label2id"), "the dataset's labels"),
        }
    return {
        "vocab_size": "data.vocab_size / the tokenizer",
        **dict.fromkeys(config_class._tokenizer_fields, "the tokenizer"),
    }


# TrainingArguments fields that only example scripts read; Trainer itself ignores them.
_SCRIPT_ONLY_TRAINING = {
    "do_train": "training always runs",
    "do_eval": "the run evaluates at the end (set eval_strategy for periodic evaluation)",
    "do_predict": "there is no prediction step",
    "resume_from_checkpoint": "use --resume to continue the run in --output",
}
FSDP_REFUSAL = (
    "FSDP is not supported: the outlier tracking, the periodic W8A8 check and the checkpoints need the full, "
    "unsharded model in every process, so multi-process runs use DDP (torchrun, or accelerate launch without "
    "--use_fsdp)"
)


def is_local_path(dataset: str) -> bool:
    """Whether `dataset` names a local file or folder (it exists, or it is written like a path)."""
    return (
        Path(dataset).expanduser().exists()
        or dataset.startswith(("/", "./", "../", "~"))
        or (Path(dataset).suffix.lower() in (".txt", ".json", ".jsonl", ".csv", ".tokens", ".raw"))
    )


def _unused_reason(preset: TrainingPreset, group: str, name: str) -> str | None:
    """Why the override `group.name` would have no effect on this preset (None when it is used)."""
    family, data, tracking = preset.family, preset.data, preset.tracking
    modality = families.modality(family)
    if group == "data":
        if modality == "image" and name in _TEXT_ONLY_DATA:
            return f"it is a text-model field and this preset trains an image model ({family})"
        if modality == "text" and name in _IMAGE_ONLY_DATA:
            return f"it is an image-model field and this preset trains a text model ({family})"
        objective = families.training_objective(family) if name == "mlm_probability" else None
        if objective not in (None, "mlm"):
            masked = ", ".join(f for f in families.names() if families.training_objective(f) == "mlm")
            return f"it is the masking rate of masked-LM ({masked}); {family} trains {_OBJECTIVES[objective]}"
        if name == "bos_at_block_start" and families.training_objective(family) != "clm":
            return f"it shapes causal-LM blocks; {family} trains {_OBJECTIVES[families.training_objective(family)]}"
        if name == "vocab_size" and data.tokenizer != "train":
            return f"it sizes a trained tokenizer, and data.tokenizer={data.tokenizer!r} is loaded"
        embedded = str(data.dataset).startswith("embedded")
        if name == "embedded_size" and not embedded:
            return f"it sizes the embedded dataset, and data.dataset={data.dataset!r}"
        if embedded and name in _HUB_ONLY_DATA | {"streaming", "text_column", "image_column", "label_column"}:
            return f"data.dataset={data.dataset!r} is generated in memory"
        if name in _HUB_ONLY_DATA and is_local_path(str(data.dataset)):
            return "it selects a Hub dataset configuration and data.dataset is a local path"
        if name == "stream_eval_examples" and not data.streaming:
            return "it applies to data.streaming=true only"
        if name == "num_proc" and data.streaming:
            return "streamed datasets are tokenized on the fly, without worker processes"
    if group == "tracking" and name != "outlier_every_n_steps" and not tracking.outlier_every_n_steps:
        return "tracking is off (tracking.outlier_every_n_steps=0)"
    if group == "tracking" and name == "calibration_batches" and not tracking.w8a8_every_n_steps:
        return "it calibrates the periodic W8A8 check, which is off (tracking.w8a8_every_n_steps=0)"
    if group == "model":
        sources = set_from_data(family)
        if name in sources:
            return f"it is set from {sources[name]}"
        attn_impl = preset.model.get("attn_impl", "softmax")
        for impl, names in _ATTENTION_FIELDS.items():
            if name in names and attn_impl != impl:
                return f"it is a field of attn_impl={impl!r} and this run uses attn_impl={attn_impl!r}"
        if name == "gate_n_hid" and preset.model.get("gate_type") != "mlp":
            return f"it sizes the `mlp` gate and this run uses gate_type={preset.model.get('gate_type')!r}"
    if group == "training":
        return _unused_training_reason(preset.training, name)
    return None


def _unused_training_reason(training: dict[str, Any], name: str) -> str | None:
    if name in _SCRIPT_ONLY_TRAINING:
        return f"Trainer does not read it ({_SCRIPT_ONLY_TRAINING[name]})"
    max_steps = training.get("max_steps", -1)
    if name == "num_train_epochs" and isinstance(max_steps, int) and max_steps > 0:
        return f"training.max_steps={training['max_steps']} takes precedence (set max_steps=-1 to train by epochs)"
    defaults = {"save": "steps", "eval": "no", "logging": "steps"}  # the runner saves every save_steps
    for kind, default in defaults.items():
        strategy = str(training.get(f"{kind}_strategy", default))
        if name == f"{kind}_steps" and strategy.lower().rsplit(".", 1)[-1] != "steps":
            return f"training.{kind}_strategy={strategy!r} (set it to 'steps' to use {name})"
    return None


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return f"one of {[m.value for m in annotation]}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(annotation, getattr(typing.get_origin(annotation) or annotation, "__name__", str(annotation)))


def _matches(value: Any, annotation: Any) -> bool:
    """Whether `value` (parsed from the command line) fits a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {m.value for m in annotation}
    if origin is not None:
        return isinstance(value, origin)
    return not isinstance(annotation, type) or isinstance(value, annotation)


def _check_types(group: str, values: dict[str, Any], cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _matches(value, hints[name]):
            raise ValueError(f"{group}.{name} must be {_describe(hints[name])}, got {value!r}")


def _check_range(label: str, value: Any, low: float, *, strict: bool = True, high: float | None = None) -> None:
    if value is None:
        return
    if (value <= low if strict else value < low) or (high is not None and value >= high):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{label} must be {bound}{f' and < {high}' if high is not None else ''}, got {value!r}")


def _check_training(training: dict[str, Any]) -> None:
    if training.get("fsdp") or training.get("fsdp_config"):
        raise ValueError(f"training.fsdp / training.fsdp_config: {FSDP_REFUSAL}")
    _check_types("training", training, TrainingArguments)
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
    for name in (*positive, "learning_rate", "num_train_epochs", "save_steps", "logging_steps", "eval_steps"):
        _check_range(f"training.{name}", training.get(name), 0)
    for name in ("weight_decay", "max_grad_norm", "warmup_steps"):
        _check_range(f"training.{name}", training.get(name), 0, strict=False)
    max_steps = training.get("max_steps", -1)
    if max_steps <= 0 and max_steps != -1:
        raise ValueError(f"training.max_steps must be > 0 (or -1: train num_train_epochs epochs), got {max_steps}")


def _check_data(data: DataSpec, family: str) -> None:
    _check_types("data", dataclasses.asdict(data), DataSpec)
    positive = ("vocab_size", "seq_length", "image_size", "embedded_size", "stream_eval_examples")
    for name in (*positive, "max_train_samples", "num_proc"):  # the last two may be None (all / no workers)
        _check_range(f"data.{name}", getattr(data, name), 0)
    _check_range("data.mlm_probability", data.mlm_probability, 0, high=1)
    _check_range("data.eval_fraction", data.eval_fraction, 0, high=1)
    if not data.dataset:
        raise ValueError("data.dataset must name a dataset (embedded, a Hub dataset or a local path)")
    if families.modality(family) == "image" and data.augmentation not in (*AUGMENTATIONS, None):
        raise ValueError(f"data.augmentation must be one of auto, timm, basic, none; got {data.augmentation!r}")


def _check_tracking(tracking: TrackingSpec) -> None:
    _check_types("tracking", dataclasses.asdict(tracking), TrackingSpec)
    for name in ("outlier_every_n_steps", "w8a8_every_n_steps"):
        _check_range(f"tracking.{name}", getattr(tracking, name), 0, strict=False)
    for name in ("probe_batches", "calibration_batches"):
        _check_range(f"tracking.{name}", getattr(tracking, name), 0)


_POSITIVE_MODEL_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "ffn_dim",
    "word_embed_proj_dim", "max_position_embeddings", "patch_size", "num_channels",
)  # fmt: skip
_PROBABILITY_MODEL_FIELDS = (
    "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "activation_dropout",
)  # fmt: skip


def _check_model(config: Any) -> None:
    """Ranges the config classes leave open: sizes > 0, dropout probabilities in [0, 1)."""
    for name in _POSITIVE_MODEL_FIELDS:
        _check_range(f"model.{name}", getattr(config, name, None), 0)
    for name in _PROBABILITY_MODEL_FIELDS:
        _check_range(f"model.{name}", getattr(config, name, None), 0, strict=False, high=1)


def build_config(preset: TrainingPreset, **fields: Any):
    """The family's config from the preset's model fields (and `fields`); ValueError names a bad field."""
    try:
        return families.config_class(preset.family)(**{**preset.model, **fields})
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise ValueError(f"model: {' '.join(str(err).split())}") from None


def validate_preset(preset: TrainingPreset) -> None:
    """Check every field of `preset` (types, ranges, the model config); raise ValueError naming the field.

    Runs before anything is written, so a bad value never leaves a half-started run behind.
    """
    _check_training(preset.training)
    _check_data(preset.data, preset.family)
    _check_tracking(preset.tracking)
    config = build_config(preset)
    _check_model(config)
    limit = getattr(config, "max_position_embeddings", None)
    if families.modality(preset.family) == "text" and preset.data.seq_length > limit:
        raise ValueError(
            f"data.seq_length={preset.data.seq_length} exceeds model.max_position_embeddings={limit}: "
            "lower data.seq_length or raise model.max_position_embeddings"
        )
