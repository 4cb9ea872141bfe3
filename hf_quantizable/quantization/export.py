"""Export a calibrated (simulated) model as a real INT8 checkpoint."""

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..modeling.int8 import check_int8_config, check_int8_tensors
from ..modeling.int8_embedding import untie_int8_tables
from ..modeling.quantization_method import W8A8QuantizationConfig, quantization_settings
from ..paths import atomic_folder, check_output_folder
from .calibration import activation_quantizers, quantized_embeddings, quantized_layernorms, quantized_linears

FORMAT_VERSION = 1


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def int8_config_dict(model: nn.Module, source_fingerprint: str | None = None) -> dict:
    """The `w8a8_config` stored in config.json: quantizer settings plus which modules are quantized.

    `source_fingerprint` (`provenance.model_fingerprint` of the folder the FP model came from, None
    for a model object) ties the checkpoint to its source model.
    """
    prefix = model.base_model_prefix
    sources = activation_quantizers(model)
    return {
        **model.w8a8_config.to_dict(),
        "format_version": FORMAT_VERSION,
        "source_fingerprint": source_fingerprint,
        "quantized_linears": {
            _strip(name, prefix): linear.input_quantizer is not None
            for name, linear in quantized_linears(model).items()
        },
        "quantized_activations": sorted(_strip(name, prefix) for name in sources),
        "per_channel_activations": {
            _strip(name, prefix): quantizer.scale.numel()
            for name, quantizer in sources.items()
            if quantizer.per_channel
        },
        "outlier_channel_linears": {
            _strip(name, prefix): sources[linear.input_quantizer].outlier_channels.numel()
            for name, linear in quantized_linears(model).items()
            if linear.input_quantizer is not None and sources[linear.input_quantizer].outlier_channels is not None
        },
        "shortcut_scales": sorted(_strip(name, prefix) for name in getattr(model, "w8a8_shortcut_scales", [])),
        # name -> whether the table has one scale per row (`Int8Embedding`)
        "quantized_embeddings": {
            _strip(name, prefix): table.per_row for name, table in quantized_embeddings(model).items()
        },
        # LayerNorms whose weight is on its grid (stored dequantized, in float)
        "quantized_layernorms": sorted(_strip(name, prefix) for name in quantized_layernorms(model)),
    }


@torch.no_grad()
def freeze(model: nn.Module, source_fingerprint: str | None = None) -> nn.Module:
    """Turn calibrated `model` into its INT8 runtime in place (calibrating -> frozen) and return it.

    Every calibrating module freezes itself (`QuantizedLinear.freeze` and the others): the same
    module objects become the runtime's INT8 modules, holding the int8 codes and calibrated grids.
    The `w8a8_config` that describes them goes into `model.config`, so a frozen model has the
    modules and tensors its saved checkpoint loads with (`convert_to_int8`). `source_fingerprint`
    as in `int8_config_dict`.
    """
    if not hasattr(model, "w8a8_config"):
        raise ValueError(f"freeze takes a model calibrated by quantize_model; this {type(model).__name__} is not")
    quantizers = activation_quantizers(model)
    uncalibrated = sorted(name for name, quantizer in quantizers.items() if not quantizer.calibrated)
    if uncalibrated:
        raise ValueError(
            f"freeze needs every activation quantizer in mode 'quantize'; {uncalibrated[0]!r} is in mode "
            f"{quantizers[uncalibrated[0]].mode!r} (leave the calibration context first)"
        )
    w8a8_config = int8_config_dict(model, source_fingerprint)
    tables = list(quantized_embeddings(model).values())
    # linear layers first: they take their input grids from the still calibrating quantizers
    for module in [*quantized_linears(model).values(), *tables, *quantized_layernorms(model).values()]:
        module.freeze()
    for quantizer in quantizers.values():
        quantizer.freeze()
    untie_int8_tables(model, tables)
    model.config.w8a8_config = w8a8_config
    # the standard field transformers reads (`model.is_quantized`, `model.hf_quantizer` on load)
    model.config.quantization_config = W8A8QuantizationConfig(**quantization_settings(w8a8_config)).to_dict()
    check_int8_config(model, w8a8_config)
    check_int8_tensors(model)
    del model.w8a8_config  # the calibration settings; the frozen model's are in its config
    return model.eval()


def build_int8_model(model: nn.Module, source_fingerprint: str | None = None) -> nn.Module:
    """An INT8 copy of calibrated `model` (`freeze` of a deep copy: `model` stays simulated)."""
    return freeze(copy.deepcopy(model), source_fingerprint)


def save_int8_checkpoint(int8_model: nn.Module, folder: Path, processor=None) -> None:
    """`save_pretrained` the INT8 model (and `processor`) into `folder`, listing the files written in
    `w8a8_config["files"]` (how `is_int8_output` recognises the folder later)."""
    int8_model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    files = sorted(entry.name for entry in folder.iterdir() if entry.is_file())
    config["w8a8_config"]["files"] = int8_model.config.w8a8_config["files"] = files
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_int8_output(folder: str | Path) -> bool:
    """Whether `folder` holds an INT8 checkpoint written by `W8A8Quantizer` and nothing else.

    Its config.json has a `w8a8_config` listing the files the quantizer wrote (`files`); any other
    entry (a file the user added, a sub-folder) makes it foreign, so it is never replaced.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        written = set(config["w8a8_config"]["files"])
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return all(entry.name in written and entry.is_file() and not entry.is_symlink() for entry in folder.iterdir())


def check_output_dir(save_dir: str | Path, source_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Refuse an output folder whose writing would delete or overwrite anything the quantizer did not write.

    Allowed: a missing or empty folder, or (with `overwrite`) a previous INT8 output (`is_int8_output`).
    Refused: the source model's folder or a folder containing it, a file, any other non-empty folder.
    Raises ValueError naming the folder and the reason; returns the resolved path.
    """
    check_output_folder(
        save_dir,
        option="the output folder",
        is_own_output=is_int8_output,
        overwrite=overwrite,
        inputs=[source_dir],
        own_output="an INT8 checkpoint written by hf_quantizable.quantize",
    )
    return Path(save_dir).resolve()


def save_atomically(save_fn, save_dir: str | Path, overwrite: bool = False) -> Path:
    """Run `save_fn(tmp_dir)` in a temporary folder beside `save_dir`, then rename it into place.

    `save_dir` must pass `check_output_dir` (checked again just before the rename); a previous INT8
    output is replaced (with `overwrite`) only once the new folder is complete.
    """
    save_dir = check_output_dir(save_dir, overwrite=overwrite)
    with atomic_folder(save_dir, before_swap=lambda: check_output_dir(save_dir, overwrite=overwrite)) as tmp_dir:
        save_fn(tmp_dir)
    return save_dir


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the quantized linear weights (and embedding tables) in fp32 and as int8 codes + scales."""
    linears = quantized_linears(model).values()
    fp32 = sum(linear.weight.numel() * 4 for linear in linears)
    int8 = sum(linear.weight.numel() + linear.weight_scale.numel() * 4 for linear in linears)
    tables = quantized_embeddings(model).values()
    sizes = {"linear_weights_fp32": fp32, "linear_weights_int8": int8}
    if tables:
        sizes["embedding_tables_fp32"] = sum(table.weight.numel() * 4 for table in tables)
        sizes["embedding_tables_int8"] = sum(table.weight.numel() + table.weight_scale.numel() * 4 for table in tables)
    return sizes
