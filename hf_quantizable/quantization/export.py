"""Export a calibrated (simulated) model as a real INT8 checkpoint."""

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .calibration import activation_quantizers, quantized_linears

FORMAT_VERSION = 1


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def int8_config_dict(model: nn.Module) -> dict:
    """The `w8a8_config` stored in config.json: quantizer settings plus which modules are quantized."""
    prefix = model.base_model_prefix
    sources = activation_quantizers(model)
    return {
        **model.w8a8_config.to_dict(),
        "format_version": FORMAT_VERSION,
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
    }


@torch.no_grad()
def int8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the INT8 model: int8 weight codes, weight scales, activation grids, FP rest."""
    state = {k: v for k, v in model.state_dict().items()}
    quantizers = activation_quantizers(model)
    for name, quantizer in quantizers.items():
        state[f"{name}.scale"] = quantizer.scale.detach().clone()
        state[f"{name}.zero_point"] = quantizer.zero_point.detach().clone()
    for name, linear in quantized_linears(model).items():
        state[f"{name}.weight"] = linear.weight_codes().to(torch.int8)
        state[f"{name}.weight_scale"] = linear.weight_scale.detach().clone()
        if linear.input_quantizer is not None:
            source = quantizers[linear.input_quantizer]
            if source.outlier_channels is None:
                scale, zero_point = source.scale, source.zero_point
            else:
                scale, zero_point, state[f"{name}.outlier_scale"] = source.group_grids()
                state[f"{name}.outlier_channels"] = source.outlier_channels
            state[f"{name}.input_scale"] = scale.detach().clone()
            state[f"{name}.input_zero_point"] = zero_point.detach().clone()
    return state


def build_int8_model(model: nn.Module) -> nn.Module:
    """An INT8 model (same class, `config.w8a8_config` set) holding the calibrated quantization of `model`."""
    config = copy.deepcopy(model.config)
    config.w8a8_config = int8_config_dict(model)
    # A BERT base model built without its pooler is rebuilt the same way.
    kwargs = {"add_pooling_layer": False} if getattr(model, "pooler", True) is None else {}
    int8_model = type(model)(config, **kwargs)
    state = int8_state_dict(model)
    expected = int8_model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise RuntimeError(f"INT8 export is missing tensors: {missing[:5]}")
    int8_model.load_state_dict({k: state[k] for k in expected}, strict=True)
    return int8_model.eval()


def save_atomically(save_fn, save_dir: str | Path) -> Path:
    """Run `save_fn(tmp_dir)` in a temporary folder beside `save_dir`, then rename it into place.

    An existing `save_dir` is replaced only after the new folder is complete.
    """
    save_dir = Path(save_dir).resolve()
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.tmp-", dir=save_dir.parent))
    try:
        save_fn(tmp_dir)
        if save_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.old-", dir=save_dir.parent))
            os.replace(save_dir, old / save_dir.name)
            os.replace(tmp_dir, save_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp_dir, save_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return save_dir


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the quantized linear weights in fp32 and as int8 codes + scales."""
    linears = quantized_linears(model).values()
    fp32 = sum(linear.weight.numel() * 4 for linear in linears)
    int8 = sum(linear.weight.numel() + linear.weight_scale.numel() * 4 for linear in linears)
    return {"linear_weights_fp32": fp32, "linear_weights_int8": int8}
