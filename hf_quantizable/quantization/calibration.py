"""`quantize_model`: insert fake-quantizers into a quantizable model and calibrate them."""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from itertools import islice

import torch
from torch import nn

from ..modeling.attention import AttentionGate
from ..modeling.int8 import QuantPoint
from .config import W8A8Config
from .modules import ActivationQuantizer, QuantizedEmbedding, QuantizedLayerNorm, QuantizedLinear, TracedActivation
from .ranges import ActivationRangeEstimator


def is_kept_fp(name: str, config: W8A8Config) -> bool:
    """Whether module `name` lies in one of the modules kept in floating point."""
    return any(part in config.keep_fp_modules for part in name.split("."))


def _gate_modules(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, AttentionGate)}


def insert_quantizers(model: nn.Module, config: W8A8Config) -> None:
    """Replace every `QuantPoint` by an `ActivationQuantizer` and every `nn.Linear` outside the kept
    floating-point modules (task head, gates) by a `QuantizedLinear` (in place); with
    `quantize_embeddings` every `nn.Embedding` by a `QuantizedEmbedding`, with
    `quantize_layernorm_weights` every `nn.LayerNorm` by a `QuantizedLayerNorm`.

    A `QuantPoint` with a `w8a8_option` `(field, value)` is quantized only where that W8A8Config field
    has that value (BERT's word + token-type partial sum under `quantize_embeddings`, the two context
    points of gated attention under `gated_context`)."""
    points = [name for name, module in model.named_modules() if isinstance(module, QuantPoint)]
    if not points:
        raise ValueError(
            f"{type(model).__name__} has no quantization points: only hf_quantizable models "
            "(quantizable_bert, quantizable_opt, quantizable_vit) can be quantized"
        )
    gates = _gate_modules(model)
    for name, module in list(model.named_modules()):
        if is_kept_fp(name, config) or any(name.startswith(gate + ".") for gate in gates):
            continue
        if isinstance(module, QuantPoint):
            option = getattr(module, "w8a8_option", None)
            if option is not None and getattr(config, option[0]) != option[1]:
                continue
            per_channel = config.per_channel_residuals and module.residual_stream
            estimator = ActivationRangeEstimator(
                config.activation_estimator, config.activation_bits, config.momentum, config.percentile, per_channel
            )
            replacement = ActivationQuantizer(config.activation_bits, estimator, module.residual_stream)
        elif type(module) is nn.Linear:
            replacement = QuantizedLinear(
                module, config.weight_bits, config.weight_estimator, config.per_channel_weights
            )
        elif type(module) is nn.Embedding and config.quantize_embeddings:
            replacement = QuantizedEmbedding(
                module, config.weight_bits, config.weight_estimator, config.per_channel_weights
            )
        elif type(module) is nn.LayerNorm and config.quantize_layernorm_weights and module.weight is not None:
            replacement = QuantizedLayerNorm(module, config.weight_bits, config.weight_estimator)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)}


# Quantization points read by the attention matrix products (Q K^T and P V) in every model family.
_ATTENTION_MATMUL_INPUTS = ("query_quant", "key_quant", "value_quant", "q_quant", "k_quant", "v_quant", "probs_quant")


def select_activation_nodes(model: nn.Module, config: W8A8Config) -> None:
    """Keep the activation quantizers of `config.activation_nodes`; the others become identities again.

    `matmul_inputs` keeps what an integer matrix product reads: the inputs of the quantized linear
    layers (found by `_find_linear_inputs`) and the operands of the two attention products. As in
    the official Outlier Suppression `model/quant_bert.py`, a LayerNorm output that only the
    floating-point task head reads (the last BERT layer's) stays in floating point.
    """
    if config.activation_nodes == "all":
        return
    keep = set()
    if config.activation_nodes == "matmul_inputs":
        keep = {linear.input_quantizer for linear in quantized_linears(model).values()} - {None}
        keep |= {name for name in activation_quantizers(model) if name.endswith(_ATTENTION_MATMUL_INPUTS)}
    for linear in quantized_linears(model).values():
        if linear.input_quantizer not in keep:
            linear.set_input_quantizer(None, None)
    for name, quantizer in activation_quantizers(model).items():
        if name not in keep:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, QuantPoint(residual_stream=quantizer.residual_stream))


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantized_embeddings(model: nn.Module) -> dict[str, QuantizedEmbedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}


def quantized_layernorms(model: nn.Module) -> dict[str, QuantizedLayerNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayerNorm)}


def weight_quantized_modules(model: nn.Module) -> list[nn.Module]:
    """Every module with fake-quantized weights (`quantize_weights` switches them off)."""
    kinds = (QuantizedLinear, QuantizedEmbedding, QuantizedLayerNorm)
    return [m for m in model.modules() if isinstance(m, kinds)]


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every activation quantizer in `calibrate`, `observe`, `quantize`, `fp` or `trace` mode."""
    for quantizer in activation_quantizers(model).values():
        quantizer.mode = mode


@contextmanager
def weights_in_fp(model: nn.Module):
    """Run the linear layers (and quantized embedding tables / LayerNorms) with their floating-point
    weights inside the block (activations unchanged)."""
    linears = weight_quantized_modules(model)
    for linear in linears:
        linear.quantize_weights = False
    try:
        yield model
    finally:
        for linear in linears:
            linear.quantize_weights = True


@contextmanager
def full_precision(model: nn.Module):
    """Run the simulated model as its floating-point original (activations and weights) inside the block."""
    quantizers = activation_quantizers(model)
    modes = {name: q.mode for name, q in quantizers.items()}
    linears = weight_quantized_modules(model)
    set_mode(model, "fp")
    for linear in linears:
        linear.quantize_weights = False
    try:
        yield model
    finally:
        for name, quantizer in quantizers.items():
            quantizer.mode = modes[name]
        for linear in linears:
            linear.quantize_weights = True


def run_batches(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], remove_padding: bool = False) -> Iterator:
    """Forward each batch (moved to the model's device); yield the outputs.

    With `remove_padding`, the activation quantizers see the batch's `attention_mask` as their
    `token_mask` during its forward pass (statistics over the real tokens only).
    """
    device = next(model.parameters()).device
    quantizers = list(activation_quantizers(model).values()) if remove_padding else []
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mask = batch.get("attention_mask")
        for quantizer in quantizers:
            quantizer.token_mask = mask.bool() if mask is not None else None
        try:
            output = model(**batch)
        finally:
            for quantizer in quantizers:
                quantizer.token_mask = None
        yield output


def _find_linear_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Record, for every QuantizedLinear, which activation quantizer produced its input.

    One forward pass in `trace` mode: each quantizer tags its output (`TracedActivation`), and a
    linear layer reading a tagged tensor itself (no operation in between) reads that quantizer's grid.
    A quantizer read by a linear layer gets one grid per tensor (the integer GEMM needs it), even
    where `per_channel_residuals` asked for channels (e.g. the embeddings of post-LayerNorm OPT).
    """
    quantizers = activation_quantizers(model)
    names = {quantizer: name for name, quantizer in quantizers.items()}

    def find_producer(module, args):
        producer = args[0].producer if isinstance(args[0], TracedActivation) else None
        module.set_input_quantizer(names.get(producer), producer)
        if producer is not None:
            producer.estimator.per_channel = False

    handles = [linear.register_forward_pre_hook(find_producer) for linear in quantized_linears(model).values()]
    set_mode(model, "trace")
    try:
        for _ in run_batches(model, [batch]):
            pass
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def select_outlier_channels(model: nn.Module, batches: list[dict[str, torch.Tensor]], k: int) -> None:
    """Give the `k` channels with the widest grids (per-channel running min-max over `batches`, with
    zero included) of every linear layer's input quantizer a grid of their own."""
    quantizers = activation_quantizers(model)
    names = sorted({linear.input_quantizer for linear in quantized_linears(model).values()} - {None})
    estimators = {name: ActivationRangeEstimator("running_minmax", 8, per_channel=True) for name in names}
    set_mode(model, "fp")
    for name in names:
        quantizers[name].mode = "observe"
        quantizers[name].observers.append(estimators[name].update)
    try:
        for _ in run_batches(model, batches):
            pass
    finally:
        for name in names:
            quantizers[name].observers.remove(estimators[name].update)
    for name in names:
        x_min, x_max = estimators[name].range()
        if k >= x_min.numel():
            raise ValueError(f"`outlier_channels` ({k}) must be smaller than the {x_min.numel()} channels of {name}")
        width = x_max.clamp(min=0) - x_min.clamp(max=0)  # what each channel's own grid would span
        quantizers[name].set_outlier_channels(width.topk(k).indices, x_min.numel())


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], progress=None, config: W8A8Config | None = None
) -> None:
    """Estimate every activation range on `batches`, then quantize.

    `config.calibration_quantized` says what the calibration passes fake-quantize (weights by
    default) and `config.remove_padding` whether padding tokens count.
    """
    config = config or W8A8Config()
    quantizers = activation_quantizers(model).values()
    set_mode(model, "calibrate")
    for quantizer in quantizers:
        quantizer.quantize_while_calibrating = config.calibration_quantized == "all"
    context = weights_in_fp(model) if config.calibration_quantized == "none" else nullcontext()
    try:
        with context:
            for _ in run_batches(model, batches, config.remove_padding):
                if progress is not None:
                    progress.update(1)
    finally:
        for quantizer in quantizers:
            quantizer.quantize_while_calibrating = False
    for quantizer in quantizers:
        quantizer.finalize()


def take_batches(calibration_batches: Iterable[dict[str, torch.Tensor]], config: W8A8Config) -> list[dict]:
    batches = list(islice(iter(calibration_batches), config.num_calibration_batches))
    if not batches:
        raise ValueError("the calibration set is empty: pass at least one batch in `calibration_batches`")
    return batches


def quantize_model(
    model: nn.Module,
    config: W8A8Config | None = None,
    calibration_batches: Iterable[dict[str, torch.Tensor]] = (),
    progress=None,
) -> nn.Module:
    """Turn `model` into its simulated W8A8 version (in place) and return it.

    Applies Outlier Suppression gamma migration if configured, inserts the fake-quantizers, picks
    the outlier channels of the linear inputs if configured, calibrates activation ranges on the
    first `config.num_calibration_batches` batches, and applies token-wise clipping if configured.
    `progress` (e.g. a tqdm bar) is advanced once per batch.
    """
    from .outlier_suppression import migrate_gamma, token_wise_clipping

    config = config or W8A8Config()
    batches = take_batches(calibration_batches, config)
    was_training = model.training
    model.eval()
    if config.gamma_migration:
        migrate_gamma(model)
    insert_quantizers(model, config)
    with torch.no_grad():
        _find_linear_inputs(model, batches[0])
    select_activation_nodes(model, config)
    if config.outlier_channels:
        select_outlier_channels(model, batches, config.outlier_channels)
    calibrate(model, batches, progress, config)
    if config.token_wise_clipping:
        model.w8a8_clipping_report = token_wise_clipping(model, batches, config)
    model.w8a8_config = config
    model.train(was_training)
    return model
