"""Pre-training the quantizable models: paper recipes as presets, Trainer subclasses, outlier tracking."""

from .callbacks import OutlierTrackingCallback, gate_statistics, record_gates
from .data import group_texts, load_image_datasets, load_text_datasets, train_tokenizer
from .presets import DataSpec, TrackingSpec, TrainingPreset, apply_overrides, get_preset, list_presets
from .runner import build_model, build_run, finish_run
from .trainer import CausalLMTrainer, ImageClassificationTrainer, MaskedLMTrainer, QuantizableTrainer

__all__ = [
    "CausalLMTrainer",
    "DataSpec",
    "ImageClassificationTrainer",
    "MaskedLMTrainer",
    "OutlierTrackingCallback",
    "QuantizableTrainer",
    "TrackingSpec",
    "TrainingPreset",
    "apply_overrides",
    "build_model",
    "build_run",
    "finish_run",
    "gate_statistics",
    "get_preset",
    "group_texts",
    "list_presets",
    "load_image_datasets",
    "load_text_datasets",
    "record_gates",
    "train_tokenizer",
]
