"""`W8A8Quantizer`: the optimum quantizer interface for W8A8 post-training quantization."""

import copy
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn
from transformers import PreTrainedModel

from ..modeling.int8 import QuantPoint
from ..paths import read_model_config
from ..provenance import model_fingerprint
from .calibration import activation_quantizers, quantize_model, quantized_linears, take_batches
from .config import W8A8Config
from .export import build_int8_model, check_output_dir, freeze, save_atomically, save_int8_checkpoint, weight_bytes


def check_weight_files(path: str | Path) -> list[Path]:
    """The safetensors weight files of the model folder `path`, each checked to open (not truncated).

    Pickle-only folders (`pytorch_model.bin`) are refused: unpickling can run arbitrary code.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        if pickles:
            raise ValueError(
                f"{path!s} holds only pickle weights ({', '.join(pickles)}); only safetensors weights are "
                "loaded (unpickling can run code): save the model with `save_pretrained` (safetensors)"
            )
        raise FileNotFoundError(f"no weights in {path!s}: no *.safetensors file")
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    return files


def model_class_for(path: str | Path) -> type[PreTrainedModel]:
    """The hf_quantizable class for the checkpoint at `path` (quantizable or stock BERT/OPT/ViT)."""
    from .. import families

    # Every registered family's classes, also under the stock transformers name (ours add `Quantizable`).
    classes = {cls.__name__: cls for family in families.FAMILIES.values() for cls in family}
    classes.update({name.removeprefix("Quantizable"): cls for name, cls in list(classes.items())})
    config = read_model_config(path)
    if config.get("w8a8_config"):
        raise ValueError(f"{path!s} is already an INT8 checkpoint (its config.json has `w8a8_config`)")
    architectures = config.get("architectures") or []
    for architecture in architectures:
        if architecture in classes:
            return classes[architecture]
    supported = sorted(classes)
    raise ValueError(
        f"cannot quantize model type {config.get('model_type')!r} (architectures {architectures}); "
        f"supported architectures: {supported}"
    )


class W8A8Quantizer(OptimumQuantizer):
    """W8A8 post-training quantization (Bondarenko et al. setting, optional Outlier Suppression).

    Example:
        >>> quantizer = W8A8Quantizer.from_pretrained("runs/bert-gated")
        >>> quantizer.quantize("runs/bert-gated-w8a8", W8A8Config(), calibration_dataset=batches)
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        if not any(isinstance(m, QuantPoint) for m in model.modules()):
            raise ValueError(
                f"{type(model).__name__} has no quantization points: only hf_quantizable models "
                "(quantizable_bert, quantizable_opt, quantizable_vit) can be quantized"
            )
        self.model = model
        self.report: dict = {}
        # The folder the model was loaded from and its `model_fingerprint` (None for a model object).
        self.source_dir: Path | None = None
        self.source_fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, model_or_path: str | Path | PreTrainedModel, file_name: str | None = None):
        """Load a quantizable (or stock BERT/OPT/ViT) checkpoint folder, or wrap a model object.

        A folder must hold safetensors weights (pickle files are refused); its fingerprint is recorded
        in the INT8 checkpoint (`w8a8_config["source_fingerprint"]`).
        """
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path)
        model_or_path = local_folder(model_or_path)
        model_class = model_class_for(model_or_path)
        check_weight_files(model_or_path)
        fingerprint = model_fingerprint(model_or_path)
        try:
            model = model_class.from_pretrained(model_or_path, dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"cannot load the model in {model_or_path!s}: {error}") from None
        quantizer = cls(model)
        quantizer.source_dir, quantizer.source_fingerprint = Path(model_or_path), fingerprint
        return quantizer

    def quantize(
        self,
        save_dir: str | Path,
        quantization_config: W8A8Config | None = None,
        calibration_dataset: Iterable[dict[str, torch.Tensor]] = (),
        *,
        file_prefix: str | None = None,
        progress=None,
        processor=None,
        overwrite: bool = False,
        batch_size: int = 8,
    ) -> Path:
        """Calibrate, then write an INT8 checkpoint to `save_dir` (atomically: temp folder, then rename).

        `save_dir` must be new or empty, or (with `overwrite`) a previous output of this method; it is
        checked before calibrating, and nothing else is ever deleted or overwritten (`check_output_dir`).

        Args:
            save_dir: output folder (`save_pretrained` layout, reloads with `trust_remote_code=True`).
            file_prefix: unused (kept for the optimum interface).
            quantization_config: settings (default `W8A8Config()`).
            calibration_dataset: batches (dicts of tensors the model's forward accepts, `BatchEncoding`s),
                a `DataLoader` yielding them, or a `datasets.Dataset` of equal-length rows (batched by
                `batch_size`); see `calibration_batches_of`.
            progress: optional tqdm-like bar advanced once per calibration batch.
            processor: optional tokenizer / image processor saved with the checkpoint.
            overwrite: replace `save_dir` when it holds a previous INT8 output (only then).
            batch_size: rows per calibration batch of a `datasets.Dataset`.
        Returns:
            the checkpoint folder. `self.report` holds nodes, ranges, sizes and timings;
            `self.simulated_model` / `self.int8_model` the fake-quant and INT8 models. The wrapped FP
            model is left as it was, so one quantizer can quantize again with other settings.
        """
        check_output_dir(save_dir, self.source_dir, overwrite)
        config = quantization_config or W8A8Config()
        batches = take_batches(calibration_batches_of(calibration_dataset, batch_size), config)
        start = time.perf_counter()
        model = quantize_model(copy.deepcopy(self.model), config, batches, progress=progress)  # self.model stays FP
        calibration_s = time.perf_counter() - start
        int8_model = build_int8_model(model, self.source_fingerprint)
        sizes = weight_bytes(model)
        save_dir = save_atomically(
            lambda tmp_dir: save_int8_checkpoint(int8_model, tmp_dir, processor), save_dir, overwrite
        )
        self.simulated_model, self.int8_model = model, int8_model
        self.report = {
            "calibration_batches": len(batches),
            "calibration_seconds": calibration_s,
            "quantized_activations": {
                name: quantizer.quant_range() for name, quantizer in activation_quantizers(model).items()
            },
            "quantized_linears": {name: linear.input_quantizer for name, linear in quantized_linears(model).items()},
            **sizes,
            "checkpoint_bytes": sum(f.stat().st_size for f in save_dir.glob("*.safetensors")),
        }
        return save_dir


def local_folder(model_or_path: str | Path) -> Path:
    """A local model folder for `model_or_path`: the folder itself, else a snapshot of that Hub repo
    (config, safetensors weights, tokenizer / image processor files). ValueError when it is neither."""
    path = Path(model_or_path)
    if path.is_dir() or path.exists() or str(model_or_path).startswith((".", "/", "~")):
        return path  # a local path: checked by model_class_for (errors name the file)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.py", "*.jinja"]
    try:
        return Path(snapshot_download(str(model_or_path), allow_patterns=patterns))
    except HFValidationError:
        raise ValueError(f"{model_or_path!s} is neither a model folder nor a Hub repo id") from None
    except OSError as error:  # offline, unknown repo, 401
        raise ValueError(f"no local folder {model_or_path!s}, and it cannot be downloaded: {error}") from None


def calibration_batches_of(dataset: Any, batch_size: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """Calibration batches (dicts of tensors) from what optimum users pass.

    Accepts an iterable of dicts or `BatchEncoding`s (a list, a `DataLoader`), or a `datasets.Dataset`
    whose rows have equal lengths (batched here by `batch_size`); non-tensor columns (text) are dropped.
    """
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        dataset = dataset.with_format("torch")
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            ragged = [k for k, v in rows.items() if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)]
            if ragged:
                raise ValueError(
                    f"calibration dataset column {ragged[0]!r} has rows of different lengths: pad them "
                    "(tokenizer(..., padding='max_length')) or pass a DataLoader with a collator"
                )
            yield {k: v for k, v in rows.items() if isinstance(v, torch.Tensor)}
        return
    for batch in dataset:
        if not isinstance(batch, Mapping):
            raise ValueError(f"calibration batches must be dicts of tensors, got {type(batch).__name__}")
        yield {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def quantize_in_place(model: PreTrainedModel, settings: dict, calibration_dataset: Iterable[dict]) -> None:
    """Calibrate the FP `model` on `calibration_dataset` with the W8A8Config `settings`, then turn it
    into its INT8 model in place (what `from_pretrained(..., quantization_config=W8A8QuantizationConfig(...))`
    returns): the same modules and state as the INT8 checkpoint `W8A8Quantizer` would write."""
    if not any(isinstance(m, QuantPoint) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no quantization points: load stock checkpoints with the hf_quantizable "
            "class (e.g. QuantizableBertForMaskedLM.from_pretrained(path, quantization_config=...))"
        )
    config = W8A8Config.from_dict(settings)
    source = Path(model.name_or_path) if model.name_or_path else None
    fingerprint = model_fingerprint(source) if source is not None and source.is_dir() else None
    loading_config = model.config.quantization_config  # what transformers set while loading
    freeze(quantize_model(model, config, calibration_batches_of(calibration_dataset)), fingerprint)
    model.config.quantization_config = loading_config
