"""Export an INT8 model (the PyTorch runtime of `hf_quantizable.modeling.int8`) as an ONNX QDQ graph.

The graph is standard ONNX (opset 17) in the QDQ format that ONNX Runtime's graph optimizer fuses
into integer kernels:

- every `Int8ActivationQuantizer` becomes `QuantizeLinear -> DequantizeLinear` with its calibrated
  scale and uint8 zero point; grids per hidden channel (the residual stream's) become the same
  arithmetic in float ops (`_channel_qdq`);
- every `Int8Linear` with a calibrated input grid becomes `MatMul(DequantizeLinear(x_q),
  DequantizeLinear(W))` (+ bias), which ONNX Runtime runs as `MatMulIntegerToFloat` (uint8
  activations x int8 weights, int32 accumulation); with outlier channels (`outlier_channels=k`)
  their weight columns are zero there, and `Gather -> Div -> Round -> MatMul` adds their product on
  their own grid (`add_outlier_channels`);
- everything else (embeddings, LayerNorm, attention arithmetic, GELU, FP linears and heads) is
  traced as float ops. The attention products of quantized Q/K/V/probabilities also become
  integer kernels in ONNX Runtime (`MatMulIntegerToFloat` / `QLinearMatMul`, uint8 x uint8).

Saturation. Without VNNI, x86 uint8 x int8 kernels (ONNX Runtime's MLAS like oneDNN) add the
products of input pairs `(2i, 2i+1)` in int16 (`vpmaddubsw`), which saturates for large same-sign
weight pairs. The linears that read one input (e.g. Q, K and V) therefore get one order of their
input channels in which no pair saturates (`pairing.safe_pairing`): the uint8 codes are gathered
into that order once (`Transpose -> Gather -> Transpose`, a small cost beside the GEMMs) and the
weight columns stored in it. Where no such order exists, the exported weight is the part
`split_for_int16_lanes` proves safe (the split every route uses), and the removed entries are added back by a correction: a float
`MatMul` over the input channels they sit in (`Gather` of those channels, then `[..., k] x [k, N]`). (ONNX Runtime's uint8 x
uint8 kernel is exact too, but on AVX2 it is much slower than the uint8 x int8 one.)

Agreement with the PyTorch runtime. The integer products are exact in both; the float ops around
them (LayerNorm, softmax, GELU, requantization of residual sums, which ONNX Runtime fuses into
`QLinearAdd`) round differently in the last bit, which moves a few activations to the neighbouring
grid step, and such flips spread through later layers. The outputs are therefore close, not equal
(see tests/test_quant_onnx.py for the measured agreement).

Run it with `inference_session`, which disables ONNX Runtime's `MatMulAddFusion`: that pass turns
`MatMul + Add(bias)` into a float `Gemm` before the QDQ fusion sees it, leaving the product in fp32.

The PyTorch checkpoint stays the primary artefact; this is a second CPU route to the same model
(ONNX Runtime, or any runtime that reads QDQ graphs). `benchmarks/int8_speed.py` times both: on an
AVX2 CPU without VNNI the two run about equally fast: the PyTorch runtime's own int8 GEMM
(`modeling.int8_kernel`) is faster than ONNX Runtime's, whose graph fuses more of what surrounds it.
"""

import collections
import contextlib
import inspect
import os
import types
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.int8 import Int8ActivationQuantizer, Int8Linear, fake_quantize_activation
from ..modeling.int8_kernel import split_for_int16_lanes
from ..paths import atomic_path
from .modules import ActivationQuantizer, QuantizedLinear
from .pairing import safe_pairing

OPSET = 17
# ONNX Runtime passes that must stay off for the QDQ linears to run as integer kernels (see above).
DISABLED_ORT_OPTIMIZERS = ("MatMulAddFusion",)
# Largest uint8 activation code: what the int16 pair sums of the integer kernel must stay safe for.
_MAX_CODE = 255
# Attribute under which an exported quantizer leaves its grid on its output tensor while tracing.
_GRID = "_w8a8_onnx_grid"
# The INT8 modules being exported, by id: traced autograd functions take the id (a Python int), as
# the tracer accepts no module arguments.
_MODULES: dict[int, nn.Module] = {}


class _InputOrder:
    """The input-channel order shared by the integer linears that read one input (`safe_pairing`)."""

    def __init__(self, perm: torch.Tensor):
        self.perm = perm
        # (codes reordered as [K, ...], DequantizeLinear of the reordered codes): built by the first
        # linear of the group that is traced, reused by the others.
        self.values: tuple | None = None


# The orders of the INT8 linears being exported, by module id (linears without one keep theirs).
_ORDERS: dict[int, _InputOrder] = {}


def _constant(g, tensor: torch.Tensor):
    return g.op("Constant", value_t=tensor.detach().clone())


def _quantize(g, x, scale: torch.Tensor, zero_point: torch.Tensor):
    """`QuantizeLinear(x)` on an asymmetric per-tensor uint8 grid, and its qparams."""
    s = _constant(g, scale.float())
    z = _constant(g, zero_point.to(torch.uint8))
    return g.op("QuantizeLinear", x, s, z), s, z


def _channel_qdq(g, x, scale: torch.Tensor, zero_point: torch.Tensor):
    """`DequantizeLinear(QuantizeLinear(x))` with one uint8 grid per last-axis channel, as float ops.

    The same arithmetic as the two ops (`(clamp(round(x / s) + z, 0, 255) - z) * s`, written
    `clamp(round(x / s), -z, 255 - z) * s`: exact for integer-valued floats), several times faster in
    ONNX Runtime, whose per-axis kernels take one element at a time along the last axis. These grids
    sit on the residual stream, which no integer kernel reads.
    """
    z = zero_point.float()
    rounded = g.op("Round", g.op("Div", x, _constant(g, scale.float())))
    clamped = g.op("Min", g.op("Max", rounded, _constant(g, -z)), _constant(g, _MAX_CODE - z))
    return g.op("Mul", clamped, _constant(g, scale.float()))


class _ActivationQDQ(torch.autograd.Function):
    """An `Int8ActivationQuantizer` while tracing: its own arithmetic forward, `Q -> DQ` in ONNX
    (per tensor; per channel as the equivalent float ops)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, key, axis):
        return fake_quantize_activation(x, scale, zero_point, _MODULES[key].bits)

    @staticmethod
    def symbolic(g, x, scale, zero_point, key, axis):
        quantizer = _MODULES[key]
        if axis is not None:
            return _channel_qdq(g, x, quantizer.scale, quantizer.zero_point)
        q, s, z = _quantize(g, x, quantizer.scale, quantizer.zero_point)
        return g.op("DequantizeLinear", q, s, z)


def _input_codes(g, x, layer: Int8Linear, on_grid: bool):
    """`(codes, dequantized)`: the uint8 codes of the linear input and `DequantizeLinear` of them.

    When the input comes straight from a quantizer with the layer's grid, its `QuantizeLinear` is
    reused (the graph holds one `Q -> DQ` per activation); otherwise the input is quantized here.
    """
    node = x.node()
    if on_grid and node.kind() == "onnx::DequantizeLinear":
        return next(iter(node.inputs())), x
    q, s, z = _quantize(g, x, layer.input_scale, layer.input_zero_point)
    return q, g.op("DequantizeLinear", q, s, z)


def _outlier_product(g, x, layer: Int8Linear):
    """The product of the outlier channels on their own grid (`add_outlier_channels`, as ONNX ops)."""
    picked = g.op("Gather", x, _constant(g, layer.outlier_channels), axis_i=-1)  # [..., k]
    centred = g.op("Round", g.op("Div", picked, _constant(g, layer.outlier_scale.float())))
    weight_codes = layer.weight.index_select(1, layer.outlier_channels).float().t().contiguous()  # [k, out]
    product = g.op("MatMul", centred, _constant(g, weight_codes))
    return g.op("Mul", product, _constant(g, (layer.outlier_scale * layer.weight_scale).float()))


class _LinearQDQ(torch.autograd.Function):
    """An `Int8Linear` with an input grid while tracing: `MatMul(DQ(x_q), DQ(W)) (+ bias)` in ONNX."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, key, input_on_grid, rank):
        # The traced values only need the right shape; the exact product is what the graph computes.
        scale = weight_scale.reshape(-1, 1) if weight_scale.dim() else weight_scale
        return F.linear(x, weight.float() * scale)

    @staticmethod
    def symbolic(g, x, weight, weight_scale, key, input_on_grid, rank):
        layer = _MODULES[key]
        codes, x_dq = _input_codes(g, x, layer, input_on_grid)
        leading = list(range(rank - 1))

        def dequantize(input_codes):
            scale, zero_point = layer.input_scale.float(), layer.input_zero_point.to(torch.uint8)
            return g.op("DequantizeLinear", input_codes, _constant(g, scale), _constant(g, zero_point))

        weight_codes = layer.gemm_weight()
        codes_t = None  # the codes as [K, ...] (in the order of weight_codes' columns), once needed
        order = _ORDERS.get(key)
        if order is not None:
            if order.values is None:
                # A gather along the first axis of the transposed codes: contiguous rows, far faster
                # in ONNX Runtime than a gather along the last axis.
                codes_t = g.op(
                    "Gather", g.op("Transpose", codes, perm_i=[rank - 1, *leading]), _constant(g, order.perm)
                )
                ordered = g.op("Transpose", codes_t, perm_i=[i + 1 for i in leading] + [0])
                order.values = codes_t, dequantize(ordered)
            codes_t, x_dq = order.values
            weight_codes = weight_codes[:, order.perm]
        safe, rows, columns, values = split_for_int16_lanes(weight_codes, _MAX_CODE, padded=False)
        values = values.float()
        per_channel = layer.weight_scale.dim() > 0
        w_scale = layer.weight_scale.float()
        weight = g.op(
            "DequantizeLinear",
            _constant(g, safe.t().contiguous()),  # int8 [in, out]
            _constant(g, w_scale),
            _constant(g, torch.zeros(w_scale.shape, dtype=torch.int8)),
            **({"axis_i": 1} if per_channel else {}),
        )
        out = g.op("MatMul", x_dq, weight)
        if rows.numel():
            # The removed weight entries, as a float product over the input channels they sit in:
            # out += x[..., used] @ removed, removed[j, row] = value * weight_scale[row]. The
            # channels are gathered from the transposed codes as above (Q, K, V share the transpose).
            used, slot = torch.unique(columns, return_inverse=True)
            removed = torch.zeros(len(used), layer.out_features)
            removed[slot, rows] = values * (w_scale[rows] if per_channel else w_scale)
            if codes_t is None:
                codes_t = g.op("Transpose", codes, perm_i=[rank - 1, *leading])
            picked = dequantize(g.op("Gather", codes_t, _constant(g, used)))  # [k, ...]
            picked = g.op("Transpose", picked, perm_i=[i + 1 for i in leading] + [0])  # [..., k]
            out = g.op("Add", out, g.op("MatMul", picked, _constant(g, removed)))
        if layer.outlier_channels is not None:
            out = g.op("Add", out, _outlier_product(g, x, layer))
        # The bias last, where ONNX Runtime can fuse it into what follows (e.g. `BiasGelu`).
        return out if layer.bias is None else g.op("Add", out, _constant(g, layer.bias.float()))


def _quantizer_forward(self: Int8ActivationQuantizer, x: torch.Tensor) -> torch.Tensor:
    axis = None if self.scale.dim() == 0 else x.dim() - 1
    out = _ActivationQDQ.apply(x, self.scale, self.zero_point, id(self), axis)
    setattr(out, _GRID, self)
    return out


def _linear_forward(self: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    if not self.has_input_quant:
        return Int8Linear.forward(self, x)  # dequantized weight, float product
    source = getattr(x, _GRID, None)
    on_grid = (
        source is not None
        and source.scale.dim() == 0
        and torch.equal(source.scale, self.input_scale)
        and torch.equal(source.zero_point, self.input_zero_point)
    )
    return _LinearQDQ.apply(x, self.weight, self.weight_scale, id(self), on_grid, x.dim())


def check_exportable(model: nn.Module) -> None:
    """Raise `ValueError` (naming the module) for what the ONNX export cannot express exactly.

    Supported: float models of this package, and INT8 models with 8-bit activation grids (uint8
    codes); weights may have any width up to 8 bits. Simulated (fake-quant) models are refused:
    export their INT8 model (`build_int8_model`, or an INT8 checkpoint loaded with `from_pretrained`).
    """
    for name, module in model.named_modules():
        if isinstance(module, (ActivationQuantizer, QuantizedLinear)):
            raise ValueError(
                f"ONNX export takes INT8 models, not simulated (fake-quant) ones ({name or 'model'} is "
                f"{type(module).__name__}): export build_int8_model(model) or a loaded INT8 checkpoint"
            )
        bits = getattr(module, "bits", None) if isinstance(module, Int8ActivationQuantizer) else None
        if isinstance(module, Int8Linear) and module.has_input_quant:
            bits = module.input_bits
        if bits is not None and bits != 8:
            raise ValueError(
                f"ONNX export supports 8-bit activation grids only (uint8 QuantizeLinear); "
                f"{name} has {bits}-bit activations"
            )
        if isinstance(module, Int8Linear) and module.weight.dtype != torch.int8:
            raise ValueError(f"ONNX export needs int8 weight codes; {name}.weight is {module.weight.dtype}")


def _input_orders(model: nn.Module, inputs: dict, extra: dict) -> tuple[object, dict[int, _InputOrder]]:
    """Run `model` once: its output, and an input order (`safe_pairing`) for each group of integer
    linears that read the same input on the same grid, by module id (none where the natural order is safe).
    """
    readers: dict[tuple, list[Int8Linear]] = {}
    inputs_seen = []  # kept alive, so no two inputs share an address

    def record(module: Int8Linear, args: tuple) -> None:
        x = args[0]
        inputs_seen.append(x)
        grid = (module.input_scale.item(), module.input_zero_point.item())
        readers.setdefault((x.data_ptr(), tuple(x.shape), x.stride(), grid), []).append(module)

    linears = [m for m in model.modules() if isinstance(m, Int8Linear) and m.has_input_quant]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    try:
        with torch.no_grad():
            output = model(**inputs, **extra, return_dict=True)
    finally:
        for hook in hooks:
            hook.remove()
    groups = list(readers.values())
    calls = collections.Counter(id(m) for group in groups for m in group)
    orders = {}
    for group in groups:
        if any(calls[id(m)] > 1 for m in group):
            continue  # a linear called on several inputs keeps the natural order (and the correction)
        perm = safe_pairing(torch.cat([m.gemm_weight() for m in group]), _MAX_CODE)
        if perm is not None:
            orders.update(dict.fromkeys(map(id, group), _InputOrder(perm)))
    return output, orders


@contextlib.contextmanager
def _exportable(model: nn.Module, orders: dict[int, _InputOrder]) -> Iterator[None]:
    """Swap the forwards of the INT8 modules of `model` for their ONNX-traceable versions (restored
    after); the integer linears in `orders` read their input in that order."""
    patched = []
    _ORDERS.update(orders)
    try:
        for module in model.modules():
            if isinstance(module, Int8ActivationQuantizer):
                module.forward = types.MethodType(_quantizer_forward, module)
            elif isinstance(module, Int8Linear):
                module.forward = types.MethodType(_linear_forward, module)
            else:
                continue
            patched.append(module)
            _MODULES[id(module)] = module
        yield
    finally:
        for module in patched:
            del module.forward
            _MODULES.pop(id(module), None)
        _ORDERS.clear()


class _FirstOutput(nn.Module):
    """`model(**inputs)[0]` with the inputs passed by position (what `torch.onnx.export` traces)."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        # No KV cache in the graph (decoders): the export is the full-sequence forward.
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, *inputs):
        return self.model(**dict(zip(self.input_names, inputs)), **self.extra, return_dict=False)[0]


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs: dict[str, torch.Tensor]) -> Path:
    """Write `model` (an INT8 model, or any float model of this package) to `path` as ONNX.

    `example_inputs` (e.g. `{"input_ids": ..., "attention_mask": ...}`) names the graph inputs. The
    batch dimension of every input, and the sequence dimension of 2-D inputs (token ids, masks),
    stay dynamic; pass `attention_mask` for a graph that takes one. The graph output is the model's
    first output (`last_hidden_state` or `logits`). Raises `ValueError` for models the export
    cannot express (see `check_exportable`). The file is written atomically (a single file: weights
    included, so the model must stay below protobuf's 2 GiB limit).
    """
    example_inputs = dict(example_inputs)
    mask = example_inputs.get("attention_mask")
    if mask is not None and mask.shape[-1] > 1 and bool(mask.all()):
        # An all-ones mask is skipped in Python (no masking op), which the tracer would bake in: trace
        # with one padded position so the graph applies the mask (a no-op for all-ones masks).
        mask = mask.clone()
        mask[0, -1] = 0
        example_inputs["attention_mask"] = mask
    names = list(example_inputs)
    inputs = tuple(example_inputs[name] for name in names)
    wrapper = _FirstOutput(model, names).eval()
    check_exportable(model)
    first, orders = _input_orders(model, example_inputs, wrapper.extra)
    output_name = next(iter(first.keys())) if hasattr(first, "keys") else "output"
    first_output = first[0]
    dynamic_axes = {}
    for name in names:
        tensor = example_inputs[name]
        dynamic_axes[name] = {0: "batch", 1: "sequence"} if tensor.dim() == 2 else {0: "batch"}
    sequence = next((example_inputs[n].shape[1] for n in names if example_inputs[n].dim() == 2), None)
    dynamic_axes[output_name] = {0: "batch"}
    if first_output.dim() >= 3 and first_output.shape[1] == sequence:
        dynamic_axes[output_name][1] = "sequence"
    with atomic_path(path) as tmp, _exportable(model, orders), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter is chosen on purpose (`symbolic` functions); its notices are noise.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            inputs,
            str(tmp),
            input_names=names,
            output_names=[output_name],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
            external_data=False,
        )
    return Path(path)


def inference_session(
    path: str | os.PathLike, threads: int | None = None, optimized_model_path: str | os.PathLike | None = None
):
    """An ONNX Runtime CPU session for an exported model, with the settings its QDQ graph needs.

    `threads` sets the intra-op threads (default: ONNX Runtime's); `optimized_model_path` saves the
    graph as ONNX Runtime optimized it (to check which kernels run).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(
        str(path),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS),
    )
