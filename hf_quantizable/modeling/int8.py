"""Quantization points, the shared quantization arithmetic, and the INT8 modules of quantized checkpoints.

Models mark every activation the W8A8 setting quantizes with a `QuantPoint` (an identity in
floating point). The quantizer swaps those points and the linear layers for calibrating modules
(`quantization.modules`: subclasses of the modules below, which they become when frozen); a
checkpoint whose config holds `w8a8_config` is rebuilt by `convert_to_int8` with:

- `Int8ActivationQuantizer`: rounds and clamps an activation to its calibrated asymmetric grid
  (the same arithmetic as the simulation); its output, a `QuantizedActivation`, carries the grid
  and the uint8 codes to the linear layers reading it;
- `Int8Linear`: int8 weights with their scales; integer matrix products (uint8 activations x int8
  weights, int32 accumulation: the AVX2 kernel of `int8_kernel` or oneDNN, whichever is faster on
  the CPU), then the simulation's rescaling and bias.

`grid_matmul` computes the attention products of quantized activations (Q.K^T, P.V) as exact integer
products of their grid steps, in the simulation and the runtime alike. The INT8 modules read their
scales and zero points as Python numbers, cached until a buffer changes (under `torch.compile` the
cache is taken as it is: `prepare_int8_runtime` fills it), so a forward neither synchronises on
`.item()` nor breaks a compiled graph.

Self-contained: torch and relative imports only (this file is copied into checkpoints).
"""

import time
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .int8_kernel import (
    PackedInt8Weight,
    avx2_ops,
    fake_quantize,
    int8_gemm_saturates,
    kernel_choice,
    onednn_int8_accumulator,
    split_for_int16_lanes,
)


def _version(x: torch.Tensor) -> int | None:
    """`x`'s version counter; None for inference tensors, which have none (in-place changes to them
    go unnoticed: the model code changes no activation in place before a linear reads it)."""
    return None if x.is_inference() else x._version


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def cached_numbers(module: nn.Module, names: tuple[str, ...]) -> tuple:
    """The one-element buffers `names` of `module` as Python numbers, read again only after one changes.

    Under `torch.compile` the cached numbers are used as they are (constants of the graph).
    """
    cache = module.__dict__.get("_numbers")
    if _compiling() and cache is not None:
        return cache[1]
    buffers = [getattr(module, name) for name in names]
    key = tuple((b.data_ptr(), b._version) for b in buffers)
    if cache is None or cache[0] != key:
        cache = (key, tuple(b.item() for b in buffers))
        module.__dict__["_numbers"] = cache
    return cache[1]


def uses_avx2(module: nn.Module) -> bool:
    """Whether `module` (an activation quantizer, or attention reading one) runs the AVX2 kernel's
    elementwise and attention ops: `avx2_ops` for its `kernel_choice` (else the environment's), decided
    once per choice. Never under `torch.compile`: inductor fuses their torch form with the operations
    around them, which the kernel's opaque ops would prevent (measured faster there)."""
    if _compiling():
        return False
    cached = module.__dict__.get("_avx2_route")
    choice = kernel_choice(module.kernel_choice)
    if cached is None or cached[0] != choice:
        cached = (choice, avx2_ops(choice))
        module.__dict__["_avx2_route"] = cached
    return cached[1]


class QuantizedActivation(torch.Tensor):
    """An activation on a per-tensor grid, as an INT8 activation quantizer outputs it.

    The tensor holds the dequantized values (what every floating-point operation reads; operations
    on it return plain tensors) and carries its `grid` `(scale, zero_point)`, its `bits` and its
    uint8 codes: those the fused quantizer wrote, or those the first `Int8Linear` reading it computed,
    shared with the other linear layers reading it (Q, K and V read one input). An in-place change
    of the values makes the codes stale: they are computed again.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    grid: tuple[float, int]
    bits: int
    _codes: tuple[torch.Tensor, int | None] | None

    @classmethod
    def wrap(
        cls, values: torch.Tensor, grid: tuple[float, int], bits: int, codes: torch.Tensor | None = None
    ) -> "QuantizedActivation":
        out = values.as_subclass(cls)
        out.grid, out.bits = grid, bits
        out._codes = None if codes is None else (codes, _version(out))
        return out

    def codes(self) -> torch.Tensor:
        """The uint8 codes `round(x / scale) + zero_point` `[..., K]`, computed once per version."""
        if self._codes is None or self._codes[1] != _version(self):
            self._codes = (grid_codes(self, *self.grid, self.bits), _version(self))
        return self._codes[0]


class QuantPoint(nn.Identity):
    """Marks an activation that W8A8 quantizes; the identity in floating point.

    `residual_stream` marks the activations of the residual stream that no matrix product reads
    (residual sums and the layer outputs added into them): only LayerNorms and additions consume
    them, so they may also be quantized with one grid per hidden channel. `w8a8_option`
    `(field, value)`: the point is quantized only where that `W8A8Config` field has that value.
    """

    def __init__(self, residual_stream: bool = False, w8a8_option: tuple[str, object] | None = None):
        super().__init__()
        self.residual_stream = residual_stream
        self.w8a8_option = w8a8_option


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


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Round and clamp `x` to its asymmetric `bits`-bit grid, back in floating point.

    `(clamp(round(x / s) + z, 0, 2^b - 1) - z) * s` in in-place passes over one new tensor (several
    times faster on CPU than `torch.fake_quantize_*`). With one zero point, as
    `clamp(round(x / s), -z, 2^b - 1 - z) * s`: the same values (the rounded codes are integers, exact
    in float) in four passes instead of six. (torch's fused quantize / dequantize would save two
    passes, but rounds `x * (1 / s)` rather than `x / s` as ONNX's `QuantizeLinear` does; in a model
    as sensitive as the MiniLM that moved the ONNX export 10x further from this runtime.) With one
    grid, `fake_quantize_on_grid`.
    """
    levels = 2**bits - 1
    if zero_point.numel() == 1 and not _compiling():  # clamp to numbers: tensor bounds take a slow path
        z = zero_point.item()
        if scale.numel() == 1 and not scale.requires_grad:
            return fake_quantize_on_grid(x, scale.item(), int(z), levels, avx2_ops())
        return x.div(scale).round_().clamp_(-z, levels - z).mul_(scale)
    return x.div(scale).round_().add_(zero_point).clamp_(0, levels).sub_(zero_point).mul_(scale)


def fake_quantize_on_grid(x: torch.Tensor, scale: float, zero_point: int, levels: int, kernel: bool) -> torch.Tensor:
    """`fake_quantize_activation` on one grid given as numbers: division by a number is the same
    float32 division as by a 0-dim tensor, ~4x faster. With `kernel` (`avx2_ops`), in one pass where
    the AVX2 kernel takes `x`."""
    fused = fake_quantize(x, scale, zero_point, levels) if kernel else None
    if fused is not None:
        return fused
    return x.div(scale).round_().clamp_(-zero_point, levels - zero_point).mul_(scale)


def grid_codes(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """uint8 codes of `x`, a tensor already on the grid (the output of `fake_quantize_activation`).

    On the grid `x / scale` is an integer up to float rounding, so every rounding rule gives the same
    code: `torch.quantize_per_tensor` (the fastest CPU route) where it applies.
    """
    if bits <= 8 and x.dtype == torch.float32 and not _compiling() and hasattr(torch, "quantize_per_tensor"):
        with warnings.catch_warnings():  # its deprecation notice says nothing actionable to our users
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
        # The codes as a uint8 view of the quantized tensor's storage (`int_repr` copies them, slowly).
        codes = torch.empty(0, dtype=torch.uint8, device=x.device)
        return codes.set_(quantized.untyped_storage(), quantized.storage_offset(), quantized.size(), quantized.stride())
    return x.div(scale).round_().add_(zero_point).clamp_(0, 2**bits - 1).to(torch.uint8)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric integer codes of `w` (scale per tensor, or `[out, 1]` per output channel), as float."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / scale), -qmax, qmax)


class TensorGrid(NamedTuple):
    """One asymmetric grid for a whole tensor: values `(code - zero_point) * scale`, codes 0..levels."""

    scale: float
    zero_point: int
    levels: int

    @property
    def max_step(self) -> int:
        """The largest `|code - zero_point|`."""
        return max(self.zero_point, self.levels - self.zero_point)


def grid_matmul(
    a: torch.Tensor,
    a_grid: TensorGrid,
    b: torch.Tensor,
    b_grid: TensorGrid,
    out_scale: float,
    kernel: bool | None = None,
    heads_last: bool = False,
) -> torch.Tensor:
    """`a @ b` (`[..., M, K] x [..., K, N]`) of two activations on their grids (the attention products
    of quantized Q, K, probabilities and V): the exact integer product of their grid steps
    `round(x / scale)`, times `out_scale` (the product of the scales and any constant factor).

    Exact in float32 while every partial sum stays below 2^24 (in any summation order, so any BLAS
    gives the same result); in float64 beyond. The simulation and the INT8 runtime therefore agree
    bit for bit, whichever computes it: with `kernel` (the INT8 runtime's route, `uses_avx2`; None:
    the environment's, `avx2_ops`), 4-D products run on the AVX2 kernel in int16 (`vpmaddwd`, int32
    sums; the heads of Q, K and V read in place, without copies); with `heads_last` its memory is
    `[B, M, H, N]` (the context's layout once the heads are merged).
    """
    if a.dtype != torch.float32 or b.dtype != torch.float32:  # fp16 would overflow: exact in float32
        return grid_matmul(a.float(), a_grid, b.float(), b_grid, out_scale, kernel, heads_last).to(a.dtype)
    bound = a_grid.max_step * b_grid.max_step * a.shape[-1]
    if kernel is None:
        kernel = not _compiling() and avx2_ops()
    if (
        kernel
        and bound < 2**31
        and max(a_grid.max_step, b_grid.max_step) < 2**15
        and a.dim() == b.dim() == 4
        and a.shape[:2] == b.shape[:2]
        and a.dtype == b.dtype == torch.float32
        and a.device.type == b.device.type == "cpu"
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        and not torch.jit.is_tracing()
    ):
        a = a if a.stride(-1) == 1 else a.contiguous()
        b = b if 1 in (b.stride(-1), b.stride(-2)) else b.contiguous()
        return torch.ops.hf_quantizable.grid_matmul(a, a_grid.scale, b, b_grid.scale, out_scale, heads_last)
    steps_a = a.div(a_grid.scale).round_()
    steps_b = b.div(b_grid.scale).round_()
    if bound < 2**24:
        return torch.matmul(steps_a, steps_b).mul_(out_scale)
    return torch.matmul(steps_a.double(), steps_b.double()).float().mul_(out_scale)


class Int8ActivationQuantizer(nn.Module):
    """Static asymmetric activation quantizer of an INT8 checkpoint (the simulation's arithmetic).

    One grid per tensor, or one per hidden channel (`channels`, residual-stream points only). The
    output is the dequantized activation; on one grid per tensor (and 8 bits or fewer) a
    `QuantizedActivation`, whose codes the `Int8Linear`s reading it share. Where it runs the AVX2
    kernel (`uses_avx2`), the same pass writes those codes. Under `torch.compile` the output is a
    plain tensor (the linear layers compute the codes in the graph).
    """

    def __init__(self, bits: int, channels: int | None = None):
        super().__init__()
        self.bits = bits
        shape = () if channels is None else (channels,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.kernel_choice: str | None = None  # `set_kernel_choice`; None: the environment's

    def grid(self) -> tuple[float, int]:
        """`(scale, zero_point)` of the one grid per tensor, as numbers."""
        scale, zero_point = cached_numbers(self, ("scale", "zero_point"))
        return scale, int(zero_point)

    def tensor_grid(self) -> TensorGrid | None:
        """The grid of the output where it is one per tensor (for `grid_matmul`), else None."""
        if self.scale.dim():
            return None
        return TensorGrid(*self.grid(), 2**self.bits - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # fp16 / bf16 models: the grid arithmetic in float32, as calibrated
            return self.forward(x.float()).to(x.dtype)
        if self.scale.dim():
            return fake_quantize_activation(x, self.scale, self.zero_point, self.bits)
        grid, levels = self.grid(), 2**self.bits - 1
        kernel = uses_avx2(self)
        if _compiling() or self.bits > 8:
            return fake_quantize_on_grid(x, *grid, levels, kernel)
        fused = fake_quantize(x, *grid, levels, codes=True) if kernel else None
        if fused is not None:
            return QuantizedActivation.wrap(fused[0], grid, self.bits, codes=fused[1])
        return QuantizedActivation.wrap(fake_quantize_on_grid(x, *grid, levels, kernel), grid, self.bits)


def rescale_accumulator(
    acc: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Output of a quantized linear layer from its integer accumulator `sum_k (x_k - z) * w_k`.

    Shared by the simulation and the INT8 runtime (same float operations, so the same result).
    Works in place on `acc`.
    """
    out = acc.mul_(input_scale * weight_scale)
    return out if bias is None else out.add_(bias)


def add_outlier_channels(
    out: torch.Tensor,
    x: torch.Tensor,
    channels: torch.Tensor,
    scale: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
) -> torch.Tensor:
    """Add the product of the outlier channels of `x` (on their own grid, step `scale`) to `out`.

    `weight_codes` `[N, k]` are the weight codes of those input channels (as float). On the grid,
    `x / scale` rounds to the centred integer codes exactly; their product with the weight codes
    has integer partial sums far below 2^24 (k is small), so it is exact in float32 whatever the
    summation order. Shared by the simulation and the INT8 runtime. Works in place on `out`.
    """
    centred = x.index_select(-1, channels).div_(scale).round_()  # [..., k]
    return out.add_(torch.matmul(centred, weight_codes.t()).mul_(scale * weight_scale))


def integer_matmul_reference(x_codes: torch.Tensor, zero_point: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """Exact `(x_codes - zero_point) @ w_codes.T` as float32.

    float32 matmuls are exact while every partial sum stays below 2^24, so the inner dimension is
    cut into chunks short enough for that, and the chunk products are added in float64.
    """
    x = x_codes.float() - zero_point
    w = w_codes.float()
    largest_term = (x.abs().max() * w.abs().max()).item()
    chunk = int(2**24 // max(largest_term, 1.0))
    if chunk >= x.shape[-1]:
        return torch.matmul(x, w.t())
    acc = None
    for start in range(0, x.shape[-1], chunk):
        part = torch.matmul(x[..., start : start + chunk], w[:, start : start + chunk].t()).double()
        acc = part if acc is None else acc.add_(part)
    return acc.float()


# Measured on CPU (one thread): adding one sparse entry to every row of the accumulator costs about as
# much as 80 multiply-adds of a float matrix product.
_ENTRY_COST_IN_MACS = 80


def saturation_correction(
    rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, out_features: int, max_code: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """How to add back the entries `split_for_int16_lanes` removed: `(columns, removed)`.

    `removed` `[len(columns), out_features]` is the dense matrix over the input channels the entries
    sit in, when one product with it is cheaper than the entries one by one (many entries in few
    channels, as per-channel weight scales give) and its integer sums stay exact in float32;
    otherwise None and `columns` are the entries' own.
    """
    used, slot = torch.unique(columns, return_inverse=True)
    if len(used) * out_features >= _ENTRY_COST_IN_MACS * len(rows):
        return columns, None
    removed = torch.zeros(len(used), out_features)
    removed[slot, rows] = values
    if max_code * removed.abs().sum(0).max() >= 2**24:
        return columns, None
    return used, removed


class Int8Linear(nn.Module):
    """Linear layer with int8 weights.

    With a calibrated input grid (`has_input_quant`), the input is taken as uint8 codes and the
    product runs as an integer GEMM (uint8 x int8 with int32 accumulation: the AVX2 kernel of
    `int8_kernel` or oneDNN `qlinear`, as `gemm_route` decides), then `rescale_accumulator`.
    Without one, the weights are dequantized and the product runs in float.

    With `outlier_channels` (k > 0), k input channels have their own grid (`outlier_scale`): the
    GEMM skips them (their weight columns are zero in the packed weight) and `add_outlier_channels`
    adds their exact product.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        per_channel: bool,
        has_input_quant: bool,
        input_bits: int,
        outlier_channels: int = 0,
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
        if outlier_channels:
            self.register_buffer("outlier_channels", torch.zeros(outlier_channels, dtype=torch.long))
            self.register_buffer("outlier_scale", torch.ones(()))
        else:
            self.outlier_channels = None
        self.kernel_choice: str | None = None  # `set_kernel_choice`; None: the environment's
        # The weight prepared for a GEMM, with the key of the weight it was prepared from: oneDNN's
        # (prepacked, saturation correction: rows, columns, values, removed), the AVX2 kernel's.
        self._packed = None
        self._avx2 = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8_gemm={self.has_input_quant}"

    def __getstate__(self) -> dict:
        # Pickling and deepcopy leave the prepared weights behind (rebuilt on first use).
        return {**self.__dict__, "_packed": None, "_avx2": None}

    def dequantized_weight(self) -> torch.Tensor:
        scale = self.weight_scale.reshape(-1, 1) if self.weight_scale.dim() else self.weight_scale
        return self.weight.float() * scale

    def gemm_weight(self) -> torch.Tensor:
        """The int8 weight the GEMM multiplies: zero in the columns of the outlier channels."""
        if self.outlier_channels is None:
            return self.weight
        return self.weight.index_fill(1, self.outlier_channels, 0)

    def _weight_key(self) -> tuple:
        return (self.weight.data_ptr(), self.weight._version, self.input_bits)

    def _packed_weight(self, input_rows: int | None) -> tuple:
        """Prepacked weight for oneDNN (for inputs of about `input_rows` rows; None: any); where the
        GEMM saturates, split so it cannot (`split_for_int16_lanes`)."""
        if not (_compiling() and self._packed is not None) and (
            self._packed is None or self._packed[0] != self._weight_key()
        ):
            self._prepare_onednn(input_rows)
        return self._packed[1:]

    @torch.compiler.disable
    def _prepare_onednn(self, input_rows: int | None) -> None:
        weight = self.gemm_weight()
        rows, columns, values, removed = torch.zeros(0, dtype=torch.long), None, None, None
        if int8_gemm_saturates():
            max_code = 2**self.input_bits - 1
            weight, rows, columns, values = split_for_int16_lanes(weight, max_code, padded=False)
            values = values.float()
            columns, removed = saturation_correction(rows, columns, values, self.out_features, max_code)
        shape = None if input_rows is None else [input_rows, self.in_features]
        packed = torch.ops.onednn.qlinear_prepack(weight, shape)
        self._packed = (self._weight_key(), packed, rows, columns, values, removed)

    def gemm_route(self) -> str:
        """The GEMM this layer runs on CPU: `"avx2"` (the AVX2 kernel) or `"onednn"`.

        `avx2` and `onednn` ask for one; `auto` takes the faster of the two for this layer's shape,
        timed once per process (`fastest_gemm`): both are exact, so the choice changes speed only.
        Decided once per kernel choice; under `torch.compile`, the cached decision.
        """
        cached = self.__dict__.get("_gemm_route")
        if _compiling() and cached is not None:
            return cached[1]
        choice = kernel_choice(self.kernel_choice)
        if cached is None or cached[0] != choice:
            if not avx2_ops(choice):
                route = "onednn"
            else:
                route = "avx2" if choice == "avx2" else fastest_gemm(self)
            cached = (choice, route)
            self.__dict__["_gemm_route"] = cached
        return cached[1]

    def avx2_weight(self) -> PackedInt8Weight | None:
        """The weight prepared for the AVX2 kernel where this layer runs it (`gemm_route`), else None."""
        if self.gemm_route() != "avx2":
            return None
        return self._avx2_packed()

    def _avx2_packed(self) -> PackedInt8Weight:
        if not (_compiling() and self._avx2 is not None) and (
            self._avx2 is None or self._avx2[0] != self._weight_key()
        ):
            self._prepare_avx2()
        return self._avx2[1]

    @torch.compiler.disable
    def _prepare_avx2(self) -> None:
        self._avx2 = (self._weight_key(), PackedInt8Weight(self.gemm_weight(), 2**self.input_bits - 1))

    def input_grid(self) -> tuple[float, int]:
        """`(scale, zero_point)` of the input grid, as numbers."""
        scale, zero_point = cached_numbers(self, ("input_scale", "input_zero_point"))
        return scale, int(zero_point)

    def _input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of `x` on the input grid: a `QuantizedActivation`'s own where it is on that grid
        (shared with the other layers reading it), else computed here."""
        grid = self.input_grid()
        if isinstance(x, QuantizedActivation) and x.grid == grid and x.bits == self.input_bits:
            return x.codes()
        return grid_codes(x, *grid, self.input_bits)

    def accumulator(self, codes: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """`(codes - z) @ weight.T` as float32: an int8 GEMM on CPU, the exact reference elsewhere.

        `x`, the input on its grid as float `[M, K]` (optional), is where the sparse saturation
        correction reads its `codes - z` from (`x / s` rounds to them exactly; gathering float columns
        is several times faster than gathering uint8 ones).
        """
        if codes.device.type != "cpu":
            return integer_matmul_reference(codes, self.input_zero_point, self.gemm_weight())
        scale, zero_point = self.input_grid()
        packed, rows, columns, values, removed = self._packed_weight(codes.shape[0])
        acc = onednn_int8_accumulator(codes, zero_point, packed, self.out_features)
        if rows.numel():  # the removed entries; integer-valued float sums, exact below 2^24
            if x is not None and x.dtype == torch.float32:
                centred = x.index_select(1, columns).div_(scale).round_()
            else:
                centred = codes.index_select(1, columns).float().sub_(zero_point)
            if removed is None:
                acc.index_add_(1, rows, centred.mul_(values))
            else:
                acc.addmm_(centred, removed)
        return acc

    def integer_linear(self, codes: torch.Tensor, x: torch.Tensor | None, route: str | None) -> torch.Tensor:
        """`((codes - z) @ W.T) * scales (+ bias)` `[M, N]` on the GEMM `route` (None: not on CPU), before
        the outlier channels; `x` as in `accumulator`."""
        if route == "avx2":  # the same arithmetic as below, in one kernel
            return self._avx2_packed().linear(
                codes, self.input_grid()[1], self.input_scale * self.weight_scale, self.bias
            )
        acc = self.accumulator(codes, x)
        return rescale_accumulator(acc, self.input_scale, self.weight_scale, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_input_quant:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        if x.dtype != torch.float32:  # fp16 / bf16 models: codes and rescaling in float32
            return self.forward(x.float()).to(x.dtype)
        leading = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        codes = self._input_codes(x).reshape(-1, self.in_features)
        route = self.gemm_route() if codes.device.type == "cpu" else None
        out = self.integer_linear(codes, flat, route)
        if self.outlier_channels is not None:
            outlier_weight = self.weight.index_select(1, self.outlier_channels).float()
            out = add_outlier_channels(
                out, flat, self.outlier_channels, self.outlier_scale, outlier_weight, self.weight_scale
            )
        return out.reshape(*leading, self.out_features).to(x.dtype)


_FASTEST_GEMM: dict[tuple, str] = {}  # (out_features, in_features, input_bits) -> the faster route here
_PROBE_ROWS = 256  # rows of the timed products (few, so that the timing at load stays short)


@torch.compiler.disable
def fastest_gemm(layer: Int8Linear) -> str:
    """`"avx2"` or `"onednn"`, whichever computes `layer`'s product faster on this CPU: both timed on its
    own weight (best of three after a warm-up), once per process and layer shape. The prepared weight
    of the slower route is let go."""
    key = (layer.out_features, layer.in_features, layer.input_bits)
    if key not in _FASTEST_GEMM:
        generator = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 2**layer.input_bits, (_PROBE_ROWS, layer.in_features), generator=generator)
        codes = codes.to(torch.uint8)
        times = {}
        layer._packed_weight(None)  # oneDNN's weight packed as the runtime packs it (for any input rows)
        with torch.no_grad():
            for route in ("avx2", "onednn"):
                layer.integer_linear(codes, None, route)  # prepares the weight, warms the GEMM up
                best = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    layer.integer_linear(codes, None, route)
                    best = min(best, time.perf_counter() - start)
                times[route] = best
        _FASTEST_GEMM[key] = min(times, key=times.get)
    if _FASTEST_GEMM[key] == "avx2":
        layer._packed = None
    else:
        layer._avx2 = None
    return _FASTEST_GEMM[key]


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
    has a calibrated grid), `quantized_activations` (names of the quantized `QuantPoint`s) and
    `per_channel_activations` (name -> channels, for the points with one grid per channel) and
    `outlier_channel_linears` (name -> number of input channels on their own grid), names relative
    to the base model (without its `base_model_prefix`).
    """
    prefix = getattr(model, "base_model_prefix", "")
    linears = w8a8_config["quantized_linears"]
    activations = set(w8a8_config["quantized_activations"])
    per_channel = bool(w8a8_config.get("per_channel_weights", False))
    shortcut_modules = set(w8a8_config.get("shortcut_scales", []))
    channels = w8a8_config.get("per_channel_activations", {})
    outliers = w8a8_config.get("outlier_channel_linears", {})
    for name, module in list(model.named_modules()):
        key = _strip_prefix(name, prefix)
        if key in shortcut_modules and not hasattr(module, "shortcut_scale"):
            install_shortcut_scale(module, torch.ones(module.LayerNorm.normalized_shape))
        if isinstance(module, QuantPoint) and key in activations:
            replacement = Int8ActivationQuantizer(w8a8_config["activation_bits"], channels.get(key))
        elif type(module) is nn.Linear and key in linears:
            replacement = Int8Linear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                per_channel,
                linears[key],
                w8a8_config["activation_bits"],
                outliers.get(key, 0),
            )
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
    from .int8_embedding import convert_embeddings_to_int8  # `quantized_embeddings`: int8 tables

    convert_embeddings_to_int8(model, w8a8_config)


# Floating-point tensors of the INT8 modules: quantization parameters (and the bias added to the
# float32 accumulator), kept in float32 whatever dtype the rest of the model loads in.
_FP32_TENSORS = {
    "Int8Linear": ("weight_scale", "bias", "input_scale", "input_zero_point", "outlier_scale"),
    "Int8ActivationQuantizer": ("scale", "zero_point"),
    "Int8Embedding": ("weight_scale",),
}


def int8_fp32_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names of the INT8 modules' floating-point tensors (to load in float32)."""
    names = set()
    for name, module in model.named_modules():
        for tensor in _FP32_TENSORS.get(type(module).__name__, ()):
            if getattr(module, tensor, None) is not None:
                names.add(f"{name}.{tensor}" if name else tensor)
    return names


def check_int8_config(model: nn.Module, w8a8_config: dict) -> None:
    """Refuse a `w8a8_config` naming modules the model lacks (or that are not linears / quantization points).

    Run on the full model after `convert_to_int8`: each name must have become an INT8 module.
    """
    prefix = getattr(model, "base_model_prefix", "")
    found = {"Int8Linear": set(), "Int8ActivationQuantizer": set(), "Int8Embedding": set()}
    for name, module in model.named_modules():
        if type(module).__name__ in found:
            found[type(module).__name__].add(_strip_prefix(name, prefix))
    expected = {
        "quantized_linears": (w8a8_config.get("quantized_linears", {}), found["Int8Linear"]),
        "quantized_activations": (w8a8_config.get("quantized_activations", []), found["Int8ActivationQuantizer"]),
        "per_channel_activations": (w8a8_config.get("per_channel_activations", {}), found["Int8ActivationQuantizer"]),
        "outlier_channel_linears": (w8a8_config.get("outlier_channel_linears", {}), found["Int8Linear"]),
        "quantized_embeddings": (w8a8_config.get("quantized_embeddings", {}), found["Int8Embedding"]),
    }
    for field, (names, modules) in expected.items():
        unknown = sorted(set(names) - modules)
        if unknown:
            raise ValueError(
                f"w8a8_config[{field!r}] names {len(unknown)} module(s) that {type(model).__name__} has no "
                f"quantizable module for, e.g. {unknown[0]!r}: the checkpoint's config.json does not match its model"
            )
    modules = {name for name, _ in model.named_modules()}
    unknown = sorted(
        n for n in w8a8_config.get("shortcut_scales", []) if n not in modules and f"{prefix}.{n}" not in modules
    )
    if unknown:
        raise ValueError(f"w8a8_config['shortcut_scales'] names modules that do not exist, e.g. {unknown[0]!r}")


def _check_scale(name: str, scale: torch.Tensor) -> None:
    valid = torch.isfinite(scale) & (scale > 0)
    if not bool(valid.all()):
        bad = scale[~valid].flatten()[0].item()
        raise ValueError(f"INT8 tensor {name} holds {bad}: quantization scales must be finite and > 0")


def _check_zero_point(name: str, zero_point: torch.Tensor, bits: int) -> None:
    levels = 2**bits - 1
    valid = torch.isfinite(zero_point) & (zero_point == zero_point.round()) & (zero_point >= 0) & (zero_point <= levels)
    if not bool(valid.all()):
        bad = zero_point[~valid].flatten()[0].item()
        raise ValueError(f"INT8 tensor {name} holds {bad}: zero points must be integers in [0, {levels}]")


def check_int8_tensors(model: nn.Module) -> None:
    """Refuse INT8 modules whose loaded tensors would give wrong outputs: non-positive or non-finite
    scales, zero points off the grid, weights that are not int8 codes, outlier channels out of range."""
    from .int8_embedding import Int8Embedding, check_int8_embedding

    for name, module in model.named_modules():
        if isinstance(module, Int8Embedding):
            check_int8_embedding(name, module)
        if isinstance(module, Int8ActivationQuantizer):
            _check_scale(f"{name}.scale", module.scale)
            _check_zero_point(f"{name}.zero_point", module.zero_point, module.bits)
        elif isinstance(module, Int8Linear):
            if module.weight.dtype != torch.int8:
                raise ValueError(f"INT8 tensor {name}.weight is {module.weight.dtype}, not int8 codes")
            _check_scale(f"{name}.weight_scale", module.weight_scale)
            if module.has_input_quant:
                _check_scale(f"{name}.input_scale", module.input_scale)
                _check_zero_point(f"{name}.input_zero_point", module.input_zero_point, module.input_bits)
            if module.outlier_channels is not None:
                _check_scale(f"{name}.outlier_scale", module.outlier_scale)
                channels = module.outlier_channels
                if bool(((channels < 0) | (channels >= module.in_features)).any()):
                    raise ValueError(
                        f"INT8 tensor {name}.outlier_channels holds channels outside [0, {module.in_features})"
                    )


def check_int8_loading(model: nn.Module, missing: list[str], unexpected: list[str]) -> None:
    """Refuse an INT8 checkpoint whose tensors do not fit the modules its `w8a8_config` describes:
    INT8 tensors missing (they would keep their initial values), or quantization tensors of modules the
    config does not list as quantized (their int8 codes would load as float weights)."""
    from .int8_embedding import Int8Embedding

    kinds = (Int8Linear, Int8ActivationQuantizer, Int8Embedding)
    int8_modules = {name for name, m in model.named_modules() if isinstance(m, kinds)}
    for key in missing:
        if key.rpartition(".")[0] in int8_modules:
            raise ValueError(f"INT8 checkpoint lacks the tensor {key}: the checkpoint is incomplete")
    suffixes = {tensor for tensors in _FP32_TENSORS.values() for tensor in tensors} - {"bias"}
    for key in unexpected:
        module, _, tensor = key.rpartition(".")
        if tensor in suffixes | {"outlier_channels"}:
            raise ValueError(
                f"INT8 checkpoint holds {key}, but w8a8_config does not list the module {module} as quantized: "
                "the checkpoint's config.json does not match its weights"
            )


def set_kernel_choice(model: nn.Module, choice: str) -> None:
    """Run the INT8 modules of `model` on the GEMM `choice` (`auto`, `avx2`, `onednn`), whatever the environment says."""
    choice = kernel_choice(choice)
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int8ActivationQuantizer)):
            module.kernel_choice = choice


def prepare_int8_runtime(model: nn.Module) -> None:
    """Read every INT8 module's numbers, decide its route and prepare its weights now (as its first
    forward would), so that `torch.compile` finds them cached and a compiled forward needs no
    `.item()`, timing or packing."""
    for module in model.modules():
        if isinstance(module, Int8ActivationQuantizer):
            uses_avx2(module)
            if not module.scale.dim():
                module.grid()
        elif isinstance(module, Int8Linear) and module.has_input_quant and module.weight.device.type == "cpu":
            module.input_grid()
            if module.gemm_route() == "avx2":
                module._avx2_packed()
            else:
                module._packed_weight(None)
