"""The calibrating state of the INT8 modules: an activation quantizer, a linear layer, and the
embedding table and LayerNorm of the Bondarenko et al. BERT node set.

Each calibrating module subclasses the INT8 runtime module it becomes (`modeling.int8`,
`modeling.int8_embedding`; a plain `nn.LayerNorm`): it holds the floating-point weights and the
calibration state (range estimators, modes, LSQ+ parameters) and simulates the runtime's arithmetic
bit for bit. `freeze()` moves one module to its frozen state in place (quanto's `quantize ->
Calibration -> freeze`): the weights become their int8 codes, the calibration state goes, and the
module is then of its runtime class, with the tensors an INT8 checkpoint loads into it. The runtime
classes stay free of calibration code (they are copied into checkpoints).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.int8 import (
    Int8ActivationQuantizer,
    Int8Linear,
    TensorGrid,
    activation_qparams,
    add_outlier_channels,
    fake_quantize_activation,
    grid_codes,
    integer_matmul_reference,
    quantize_weight,
    rescale_accumulator,
    weight_scale,
)
from ..modeling.int8_embedding import Int8Embedding, embedding_codes, lookup_rows
from .ranges import ActivationRangeEstimator, weight_absmax


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` in the forward pass, its gradient times `factor` in the backward pass (LSQ)."""
    return (x - x * factor).detach() + x * factor


def token_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of `x` at the non-padding tokens of `token_mask` (`[B, T]`, True at real tokens).

    `[B, T, ...]` activations give `[N, ...]`; attention probabilities `[B, H, T, T_k]` give
    `[N, H, T_k]` (the queries at real tokens, every key). Anything else is returned as is.
    """
    if token_mask is None:
        return x
    if x.dim() >= 3 and x.shape[:2] == token_mask.shape:
        return x[token_mask]
    if x.dim() == 4 and x.shape[0] == token_mask.shape[0] and x.shape[2] == token_mask.shape[1]:
        return x.transpose(1, 2)[token_mask]
    return x


def _become(module: nn.Module, frozen_class: type, calibration_state: tuple[str, ...]) -> None:
    """Drop `module`'s calibration attributes and make it an instance of `frozen_class` (in place)."""
    for name in calibration_state:
        module.__dict__.pop(name, None)
    module.__class__ = frozen_class


class TracedActivation(torch.Tensor):
    """An activation tagged with the `ActivationQuantizer` that output it (`trace` mode): how a linear
    layer learns which quantizer produces its input. Operations on it return plain tensors, so only
    a layer reading the quantizer's output itself sees the tag."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    producer: "ActivationQuantizer"


class ActivationQuantizer(Int8ActivationQuantizer):
    """Calibrating asymmetric fake-quantizer of one activation: one grid per tensor, one per channel
    of the last axis when its range estimator is `per_channel`, or two (see `set_outlier_channels`).

    Modes: `calibrate` (feeds the range estimator; identity, or with `quantize_while_calibrating`
    the fake quantization with the range estimated so far), `quantize` (the INT8 runtime's
    quantizer with the calibrated scale and zero point), `fp` (identity), `observe` (identity; calls
    `observers`), `trace` (identity, as a `TracedActivation` naming this quantizer).
    `token_mask` (`[B, T]`, set per batch) restricts calibration and observers to the real tokens.
    With `learned` (scale, zero point parameters), `quantize` is LSQ+'s learnable fake quantization
    (token-wise clipping's fine stage). `freeze()` makes it the runtime's `Int8ActivationQuantizer`.
    """

    _calibration_state = (
        "estimator",
        "mode",
        "learned",
        "quantize_while_calibrating",
        "token_mask",
        "outlier_channels",
        "observers",
        "residual_stream",
    )

    def __init__(self, bits: int, estimator: ActivationRangeEstimator, residual_stream: bool = False):
        super().__init__(bits)
        self.estimator = estimator
        self.mode = "calibrate"
        self.learned: tuple[nn.Parameter, nn.Parameter] | None = None
        self.quantize_while_calibrating = False
        self.token_mask: torch.Tensor | None = None
        self.outlier_channels: torch.Tensor | None = None  # channels on the second grid
        self.observers: list = []  # callables seeing the FP input in observe mode
        self.residual_stream = residual_stream  # what its `QuantPoint` said (kept when it becomes one again)

    def extra_repr(self) -> str:
        if self.per_channel:
            return f"bits={self.bits}, mode={self.mode}, per_channel={self.scale.numel()}"
        return (
            f"bits={self.bits}, mode={self.mode}, scale={self.scale.item():.4g}, zero_point={self.zero_point.item():g}"
        )

    @property
    def calibrated(self) -> bool:
        """Whether it quantizes with a calibrated grid of its own (what `freeze` keeps)."""
        return self.mode == "quantize" and self.learned is None

    @property
    def per_channel(self) -> bool:
        """Whether the grid varies along the last axis (per channel, or with outlier channels)."""
        return self.estimator.per_channel or self.outlier_channels is not None

    def set_outlier_channels(self, channels: torch.Tensor, num_channels: int) -> None:
        """Put `channels` (of `num_channels`) on a grid of their own; the others share one grid.

        The scale and zero point stay per channel (two distinct values) for the fake quantization;
        `group_grids` gives the two grids for the integer products.
        """
        self.outlier_channels = channels.sort().values
        mask = torch.zeros(num_channels, dtype=torch.bool, device=channels.device)
        mask[channels] = True
        self.estimator.outlier_mask = mask

    def group_grids(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale and zero point of the shared grid, and the scale of the outlier channels' grid."""
        regular = torch.nonzero(~self.estimator.outlier_mask)[0, 0]
        return self.scale[regular], self.zero_point[regular], self.scale[self.outlier_channels[0]]

    def set_range(self, x_min: torch.Tensor, x_max: torch.Tensor) -> None:
        scale, zero_point = activation_qparams(torch.as_tensor(x_min), torch.as_tensor(x_max), self.bits)
        self.scale = scale.to(self.scale.device)
        self.zero_point = zero_point.to(self.zero_point.device)

    def finalize(self) -> None:
        """Take the calibrated range and switch to `quantize`."""
        self.set_range(*self.estimator.range())
        self.mode = "quantize"

    def quant_range(self) -> tuple[float, float]:
        """The representable range `[min, max]` of the current grid (over all channels)."""
        levels = 2**self.bits - 1
        return (-self.zero_point * self.scale).min().item(), ((levels - self.zero_point) * self.scale).max().item()

    def tensor_grid(self) -> TensorGrid | None:
        """The calibrated grid of the output while quantizing with one grid per tensor, else None."""
        if not self.calibrated or self.per_channel:
            return None
        return super().tensor_grid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "calibrate":
            self.estimator.update(token_rows(x, self.token_mask))
            if not self.quantize_while_calibrating:
                return x
            scale, zero_point = activation_qparams(*self.estimator.range(), self.bits)
            return fake_quantize_activation(x, scale, zero_point, self.bits)
        if self.mode == "observe":
            for observer in self.observers:
                observer(token_rows(x, self.token_mask))
            return x
        if self.mode == "fp":
            return x
        if self.mode == "trace":
            traced = x.as_subclass(TracedActivation)
            traced.producer = self
            return traced
        if self.learned is None:
            return super().forward(x)
        # LSQ+ (as the official Outlier Suppression `fake_quantize_learnableplus_per_tensor_affine_training`).
        levels = 2**self.bits - 1
        factor = 1.0 / (x.numel() * levels) ** 0.5
        scale = _grad_scale(self.learned[0], factor)
        zero_point = _grad_scale(_round_ste(self.learned[1]), factor)
        codes = torch.clamp(_round_ste(x / scale) + zero_point, 0, levels)
        return (codes - zero_point) * scale

    @torch.no_grad()
    def freeze(self) -> Int8ActivationQuantizer:
        """Become the INT8 runtime's quantizer with the calibrated grid (in place; returns `self`)."""
        if not self.calibrated:
            raise RuntimeError(f"an activation quantizer in mode {self.mode!r} is not calibrated: nothing to freeze")
        self.scale, self.zero_point = self.scale.detach().float().clone(), self.zero_point.detach().float().clone()
        _become(self, Int8ActivationQuantizer, self._calibration_state)
        return self


class QuantizedLinear(Int8Linear):
    """Calibrating linear layer: the floating-point weight, fake-quantized on a symmetric grid (per
    tensor or per output channel).

    `input_quantizer` names the activation quantizer that produces this layer's input (found during
    calibration); the frozen layer runs an integer GEMM for such layers. Once that quantizer is
    calibrated, the simulation computes the integer accumulator exactly and rescales it with the
    same float operations as the INT8 runtime, so both give the same outputs. `freeze()` makes it
    the runtime's `Int8Linear`.
    """

    _calibration_state = (
        "bits",
        "per_channel",
        "estimator",
        "input_quantizer",
        "_source",
        "_cache",
        "quantize_weights",
    )

    def __init__(self, linear: nn.Linear, bits: int, estimator: str, per_channel: bool):
        super().__init__(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            per_channel,
            has_input_quant=False,
            input_bits=bits,
        )
        del self.weight, self.bias  # the runtime's int8 buffers: this state holds the FP parameters
        self.weight = linear.weight
        self.bias = linear.bias
        self.bits = bits
        self.per_channel = per_channel
        self.estimator = estimator
        self.input_quantizer: str | None = None
        self._source: list[ActivationQuantizer] = []  # the input quantizer (not a submodule)
        self._cache: tuple | None = None  # (weight version, scale version, codes)
        self.quantize_weights = True  # False: plain nn.Linear (floating-point reference)
        self.update_weight_scale()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, per_channel={self.per_channel}"
        )

    @torch.no_grad()
    def update_weight_scale(self) -> None:
        """(Re)compute the weight scale from the current weights."""
        absmax = weight_absmax(self.weight.detach().float(), self.bits, self.estimator, self.per_channel)
        self.weight_scale.copy_(weight_scale(absmax, self.bits))

    def _scale(self) -> torch.Tensor:
        return self.weight_scale[:, None] if self.per_channel else self.weight_scale

    def weight_codes(self) -> torch.Tensor:
        """Integer weight codes (as float) on the symmetric grid (cached while weight and scale are unchanged)."""
        return self._cached()[0]

    def dequantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (cached like `weight_codes`)."""
        return self._cached()[1]

    @torch.no_grad()
    def _cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.weight._version, self.weight.data_ptr(), self.weight_scale._version)
        if self._cache is None or self._cache[0] != key:
            codes = quantize_weight(self.weight, self._scale(), self.bits)
            self._cache = (key, codes, codes * self._scale())
        return self._cache[1:]

    def set_input_quantizer(self, name: str | None, quantizer: "ActivationQuantizer | None") -> None:
        self.input_quantizer = name
        self._source = [quantizer] if quantizer is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_weights:
            return F.linear(x, self.weight, self.bias)
        source = self._source[0] if self._source else None
        if source is None or not source.calibrated:
            return F.linear(x, self.dequantized_weight(), self.bias)
        channels = source.outlier_channels
        if channels is None:
            scale, zero_point, weight = source.scale, source.zero_point, self.weight_codes()
        else:  # the shared grid through the integer product (outlier columns zeroed), as the INT8 runtime
            scale, zero_point, outlier_scale = source.group_grids()
            weight = self.weight_codes().index_fill(1, channels, 0)
        codes = grid_codes(x, scale, zero_point, source.bits)
        out = rescale_accumulator(
            integer_matmul_reference(codes, zero_point, weight), scale, self.weight_scale, self.bias
        )
        if channels is None:
            return out
        outlier_weight = self.weight_codes().index_select(1, channels)
        return add_outlier_channels(out, x, channels, outlier_scale, outlier_weight, self.weight_scale)

    @torch.no_grad()
    def freeze(self) -> Int8Linear:
        """Become the runtime's `Int8Linear` (in place; returns `self`): the weight becomes its int8 codes,
        the bias and weight scale float32 buffers, and a calibrated input quantizer's grid (two grids
        with outlier channels) the layer's input grid. Freeze before the input quantizer."""
        source = self._source[0] if self._source else None
        if source is not None and not source.calibrated:
            raise RuntimeError(f"the input quantizer {self.input_quantizer!r} is not calibrated: nothing to freeze")
        codes = self.weight_codes().to(torch.int8)
        bias = None if self.bias is None else self.bias.detach().float().clone()
        del self.weight, self.bias  # the FP parameters (a tied module keeps its own reference)
        self.register_buffer("weight", codes)
        self.register_buffer("bias", bias)
        self.weight_scale = self.weight_scale.float()
        self.has_input_quant = source is not None
        if source is not None:
            self.input_bits = source.bits
            if source.outlier_channels is None:
                scale, zero_point = source.scale, source.zero_point
            else:
                scale, zero_point, outlier_scale = source.group_grids()
                del self.outlier_channels  # None until now
                self.register_buffer("outlier_channels", source.outlier_channels.clone())
                self.register_buffer("outlier_scale", outlier_scale.detach().float().clone())
            self.register_buffer("input_scale", scale.detach().float().clone())
            self.register_buffer("input_zero_point", zero_point.detach().float().clone())
        _become(self, Int8Linear, self._calibration_state)
        return self


class QuantizedEmbedding(Int8Embedding):
    """Calibrating embedding table: the floating-point table, fake-quantized on a symmetric grid, per
    table or per row.

    As the official `QuantEmbedding` (Qualcomm-AI-research/outlier-free-transformers,
    `quantization/autoquant_utils.py`): the table goes through the weight quantizer (symmetric,
    range from the weight estimator, per tensor unless per-channel weights: then one scale per row)
    and the looked-up rows are not quantized again. The table stays the original parameter (a task
    head tied to it keeps reading the FP weights, as the official head does). Rows are looked up with
    `int8_embedding.lookup_rows`, as `Int8Embedding` does, so both give the same bits. `freeze()`
    makes it the runtime's `Int8Embedding`.
    """

    _calibration_state = ("estimator", "per_row", "_cache", "quantize_weights")

    def __init__(self, embedding: nn.Embedding, bits: int, estimator: str, per_row: bool):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, per_row, bits)
        del self.weight  # the runtime's int8 codes: this state holds the FP table
        self.weight = embedding.weight  # the same parameter (a tied head keeps it)
        self.estimator = estimator
        self.per_row = per_row
        self._cache: tuple | None = None
        self.quantize_weights = True  # False: plain nn.Embedding (floating-point reference)
        self.update_weight_scale()

    @torch.no_grad()
    def update_weight_scale(self) -> None:
        absmax = weight_absmax(self.weight.detach().float(), self.bits, self.estimator, self.per_row)
        self.weight_scale.copy_(weight_scale(absmax, self.bits))

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """Integer codes of the table (as float), cached while the table and its scale are unchanged."""
        key = (self.weight._version, self.weight.data_ptr(), self.weight_scale._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, embedding_codes(self.weight, self.weight_scale, self.bits))
        return self._cache[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.quantize_weights:
            return F.embedding(input_ids, self.weight, self.padding_idx)
        return lookup_rows(input_ids, self.weight_codes(), self.weight_scale, self.padding_idx)

    @torch.no_grad()
    def freeze(self) -> Int8Embedding:
        """Become the runtime's `Int8Embedding` (in place; returns `self`): the table becomes its int8
        codes; a head tied to it keeps the FP parameter (`untie_int8_tables` unties the config)."""
        codes = self.weight_codes().to(torch.int8)
        del self.weight
        self.register_buffer("weight", codes)
        self.weight_scale = self.weight_scale.float()
        _become(self, Int8Embedding, self._calibration_state)
        return self


class QuantizedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose weight (gamma) is fake-quantized on a symmetric per-tensor grid; bias in FP.

    As the official `QuantLayerNorm` (`quantization/autoquant_utils.py`, a `QuantizationHijacker`:
    `get_params` quantizes the weight only, with the weight quantizer: 8-bit symmetric per tensor,
    current min-max for BERT). Always per tensor here (the official hijacker would give a
    per-channel setting one scale per element, i.e. no quantization). Frozen, it is a plain
    LayerNorm holding the dequantized weight (the same float values, so the same outputs), as the
    INT8 checkpoint stores it.
    """

    _calibration_state = ("bits", "estimator", "_cache", "quantize_weights")

    def __init__(self, layer_norm: nn.LayerNorm, bits: int, estimator: str):
        super().__init__(layer_norm.normalized_shape, eps=layer_norm.eps, elementwise_affine=True, device="meta")
        self.weight = layer_norm.weight
        self.bias = layer_norm.bias
        self.bits = bits
        self.estimator = estimator
        self.register_buffer("weight_scale", torch.ones(()))
        self._cache: tuple | None = None
        self.quantize_weights = True
        self.update_weight_scale()

    @torch.no_grad()
    def update_weight_scale(self) -> None:
        absmax = weight_absmax(self.weight.detach().float(), self.bits, self.estimator, False)
        self.weight_scale.copy_(weight_scale(absmax, self.bits))

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        key = (self.weight._version, self.weight.data_ptr(), self.weight_scale._version)
        if self._cache is None or self._cache[0] != key:
            codes = quantize_weight(self.weight, self.weight_scale, self.bits)
            self._cache = (key, (codes * self.weight_scale).to(self.weight.dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight() if self.quantize_weights else self.weight
        return F.layer_norm(x, self.normalized_shape, weight, self.bias, self.eps)

    @torch.no_grad()
    def freeze(self) -> nn.LayerNorm:
        """Become a plain `nn.LayerNorm` with the dequantized weight (in place; returns `self`)."""
        self.weight.copy_(self.dequantized_weight())
        del self.weight_scale
        _become(self, nn.LayerNorm, self._calibration_state)
        return self
