"""Quantization points, the shared quantization arithmetic, and the INT8 modules of quantized checkpoints.

Models mark every activation the W8A8 setting quantizes with a `QuantPoint` (an identity in
floating point). The quantizer swaps those points and the linear layers for fake-quantizers; a
checkpoint whose config holds `w8a8_config` is rebuilt by `convert_to_int8` with:

- `Int8ActivationQuantizer`: rounds and clamps an activation to its calibrated asymmetric grid
  (the same arithmetic as the simulation), and keeps the integer codes with the tensor so the next
  linear layer does not quantize it again;
- `Int8Linear`: int8 weights with their scales; integer matrix products (uint8 activations x int8
  weights, int32 accumulation) with dequantization and bias fused into the kernel.

Self-contained: torch and relative imports only (this file is copied into checkpoints).
"""

import torch
import torch.nn.functional as F
from torch import nn

# Attribute under which an activation quantizer leaves the integer codes on its output tensor.
_CODES = "_w8a8_codes"


class QuantPoint(nn.Identity):
    """Marks an activation that W8A8 quantizes; the identity in floating point."""


def activation_qparams(x_min: torch.Tensor, x_max: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of an asymmetric `bits`-bit grid covering `[x_min, x_max]` (and 0)."""
    levels = 2**bits - 1
    x_min = torch.clamp(x_min, max=0.0)
    x_max = torch.clamp(x_max, min=0.0)
    scale = torch.clamp((x_max - x_min) / levels, min=1e-8)
    zero_point = torch.clamp(torch.round(-x_min / scale), 0, levels)
    return scale, zero_point


def weight_scale(w_absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale of a symmetric `bits`-bit grid `[-(2^(b-1) - 1), 2^(b-1) - 1]` covering `+-w_absmax`."""
    return torch.clamp(w_absmax / (2 ** (bits - 1) - 1), min=1e-12)


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in `[0, 2^bits - 1]` (as float) of `x` on an asymmetric grid."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Round and clamp `x` to its asymmetric grid, back in floating point."""
    return (quantize_activation(x, scale, zero_point, bits) - zero_point) * scale


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric integer codes of `w` (scale per tensor, or `[out, 1]` per output channel), as float."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / scale), -qmax, qmax)


class Int8ActivationQuantizer(nn.Module):
    """Static asymmetric activation quantizer of an INT8 checkpoint.

    The output is the dequantized activation (exactly the simulated value); its integer codes ride
    along as an attribute of the output tensor, for the `Int8Linear` that consumes it.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = quantize_activation(x, self.scale, self.zero_point, self.bits)
        out = (codes - self.zero_point) * self.scale
        setattr(out, _CODES, (codes, self))
        return out


class Int8Linear(nn.Module):
    """Linear layer with int8 weights.

    With a calibrated input grid (`has_input_quant`), the input is taken as uint8 codes and the
    product runs as an integer GEMM (oneDNN `qlinear`: uint8 x int8 -> int32, rescaled and biased in
    the kernel). Without one, the weights are dequantized and the product runs in floating point.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, per_channel: bool, has_input_quant: bool, input_bits: int
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_input_quant = has_input_quant
        self.input_bits = input_bits
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features if per_channel else ()))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if has_input_quant:
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero_point", torch.zeros(()))
        self._packed = None  # (weight version key, prepacked weight, per-channel scales, zero points)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8_gemm={self.has_input_quant}"

    def _packed_weight(self, x_shape: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[0] != key:
            packed = torch.ops.onednn.qlinear_prepack(self.weight, x_shape)
            scales = self.weight_scale.float().expand(self.out_features).contiguous()
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            self._packed = (key, packed, scales, zero_points)
        return self._packed[1:]

    def _input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of `x` on the input grid (reused from the producing quantizer when possible)."""
        codes, producer = getattr(x, _CODES, (None, None))
        if codes is None or producer.scale.item() != self.input_scale.item():
            codes = quantize_activation(x, self.input_scale, self.input_zero_point, self.input_bits)
        return codes.to(torch.uint8)

    def dequantized_weight(self) -> torch.Tensor:
        scale = self.weight_scale.reshape(-1, 1) if self.weight_scale.dim() else self.weight_scale
        return self.weight.float() * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_input_quant or x.device.type != "cpu":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        leading = x.shape[:-1]
        codes = self._input_codes(x).reshape(-1, self.in_features)
        packed, scales, zero_points = self._packed_weight(list(codes.shape))
        out = torch.ops.onednn.qlinear_pointwise(
            codes,
            self.input_scale.item(),
            int(self.input_zero_point.item()),
            packed,
            scales,
            zero_points,
            self.bias,
            1.0,
            0,
            torch.float32,
            "none",
            [None],
            "",
        )
        return out.reshape(*leading, self.out_features).to(x.dtype)


def _scale_shortcut(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: multiply the shortcut argument (the second one) by `module.shortcut_scale`."""
    return (args[0], args[1] * module.shortcut_scale, *args[2:])


def install_shortcut_scale(module: nn.Module, scale: torch.Tensor) -> None:
    """Scale the shortcut input of a residual block by `scale` (where a LayerNorm gamma migrated out)."""
    module.register_buffer("shortcut_scale", scale.detach().clone())
    module.register_forward_pre_hook(_scale_shortcut)


def _strip_prefix(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def convert_to_int8(model: nn.Module, w8a8_config: dict) -> None:
    """Rebuild `model` with the INT8 modules described by `w8a8_config` (in place, idempotent).

    `w8a8_config` holds the quantizer settings plus `quantized_linears` (name -> whether its input
    has a calibrated grid) and `quantized_activations` (names of the quantized `QuantPoint`s),
    names relative to the base model (without its `base_model_prefix`).
    """
    prefix = getattr(model, "base_model_prefix", "")
    linears = w8a8_config["quantized_linears"]
    activations = set(w8a8_config["quantized_activations"])
    per_channel = bool(w8a8_config.get("per_channel_weights", False))
    shortcut_modules = set(w8a8_config.get("shortcut_scales", []))
    for name, module in list(model.named_modules()):
        key = _strip_prefix(name, prefix)
        if key in shortcut_modules and not hasattr(module, "shortcut_scale"):
            install_shortcut_scale(module, torch.ones(module.LayerNorm.normalized_shape))
        if isinstance(module, QuantPoint) and key in activations:
            replacement = Int8ActivationQuantizer(w8a8_config["activation_bits"])
        elif type(module) is nn.Linear and key in linears:
            replacement = Int8Linear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                per_channel,
                linears[key],
                w8a8_config["activation_bits"],
            )
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
