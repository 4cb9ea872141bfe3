"""Outlier Suppression (Wei et al., NeurIPS 2022) as a post-training option.

- Gamma migration: a LayerNorm `gamma * x_hat + beta` becomes the non-scaling `x_hat + beta / gamma`
  (so its quantized output loses the outlier channels that gamma amplifies); gamma moves into the
  weights of the linear layers that read it and, in post-LN BERT, onto the residual shortcut.
  An exact transformation in floating point.
- Token-wise clipping: coarse stage picks clipping ranges from a quantile grid over the per-token
  max/min of every quantized activation (by final-output MSE); the fine stage learns the step sizes
  on the final-output MSE (straight-through rounding).
"""

import torch
from torch import nn

from ..modeling.int8 import install_shortcut_scale
from .calibration import activation_quantizers, full_precision, run_batches, set_mode
from .config import W8A8Config


def _migration_plan(model: nn.Module) -> list[tuple[str, list[str], str | None]]:
    """(LayerNorm, linear layers reading its output, residual module whose shortcut reads it) triples.

    LayerNorms whose output leaves the model (last BERT layer, final LayerNorm of OPT/ViT) stay as they are.
    """
    model_type = type(model).config_class.model_type
    plan = []
    if model_type == "quantizable_bert":
        base = model.get_submodule(model.base_model_prefix) if hasattr(model, model.base_model_prefix) else model
        prefix = model.base_model_prefix + "." if base is not model else ""
        layers = [f"{prefix}encoder.layer.{i}" for i in range(len(base.encoder.layer))]
        sources = [f"{prefix}embeddings.LayerNorm"] + [f"{layer}.output.LayerNorm" for layer in layers[:-1]]
        for source, layer in zip(sources, layers):
            qkv = [f"{layer}.attention.self.{p}" for p in ("query", "key", "value")]
            plan.append((source, qkv, f"{layer}.attention.output"))
            plan.append((f"{layer}.attention.output.LayerNorm", [f"{layer}.intermediate.dense"], f"{layer}.output"))
    elif model_type == "quantizable_opt":
        decoder = model.get_submodule("model.decoder" if hasattr(model, "model") else "decoder")
        if not model.config.do_layer_norm_before:
            raise ValueError("gamma migration supports pre-LayerNorm OPT only (`do_layer_norm_before=True`)")
        prefix = "model.decoder" if hasattr(model, "model") else "decoder"
        for i in range(len(decoder.layers)):
            layer = f"{prefix}.layers.{i}"
            qkv = [f"{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            plan.append((f"{layer}.self_attn_layer_norm", qkv, None))
            plan.append((f"{layer}.final_layer_norm", [f"{layer}.fc1"], None))
    elif model_type == "quantizable_vit":
        for layer, module in model.named_modules():
            if not hasattr(module, "layernorm_before"):
                continue
            linears = [n for n, m in module.named_modules() if type(m) is nn.Linear]
            qkv = [
                f"{layer}.{n}" for n in linears if n.endswith(("query", "key", "value", "q_proj", "k_proj", "v_proj"))
            ]
            fc1 = [f"{layer}.{n}" for n in linears if n.endswith(("intermediate.dense", "fc1"))]
            plan.append((f"{layer}.layernorm_before", qkv, None))
            plan.append((f"{layer}.layernorm_after", fc1, None))
    else:
        raise ValueError(f"gamma migration supports quantizable_bert/opt/vit models, got {model_type!r}")
    return plan


@torch.no_grad()
def migrate_gamma(model: nn.Module) -> list[str]:
    """Apply gamma migration in place (floating point, before quantizers are inserted).

    Returns the names of the residual modules that got a shortcut scale.
    """
    if getattr(model.config, "attn_impl", "softmax") == "gated":
        raise ValueError("gamma migration needs `attn_impl` other than 'gated': the gates read the LayerNorm output")
    shortcuts = []
    for norm_name, linear_names, shortcut_name in _migration_plan(model):
        norm = model.get_submodule(norm_name)
        gamma = norm.weight.detach().clone()
        if bool((gamma == 0).any()):
            raise ValueError(f"gamma migration needs a LayerNorm gamma without zeros ({norm_name})")
        norm.bias.div_(gamma)
        norm.weight.fill_(1.0)
        for name in linear_names:
            model.get_submodule(name).weight.mul_(gamma)  # W diag(gamma)
        if shortcut_name is not None:
            install_shortcut_scale(model.get_submodule(shortcut_name), gamma)
            shortcuts.append(shortcut_name)
    model.w8a8_shortcut_scales = shortcuts
    return shortcuts


def _final_output(outputs) -> torch.Tensor:
    return outputs[0] if not isinstance(outputs, torch.Tensor) else outputs


def _output_mse(model: nn.Module, batches: list[dict], targets: list[torch.Tensor]) -> float:
    with torch.no_grad():
        errors = [(_final_output(out) - t).pow(2).mean().item() for out, t in zip(run_batches(model, batches), targets)]
    return sum(errors) / len(errors)


def _token_extremes(model: nn.Module, batches: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token max and min (over the last axis) of every quantized activation."""
    stats: dict[str, tuple[list, list]] = {}
    quantizers = activation_quantizers(model)

    def observer(name):
        def observe(x):
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            stats.setdefault(name, ([], []))
            stats[name][0].append(flat.amax(dim=1))
            stats[name][1].append(flat.amin(dim=1))

        return observe

    for name, quantizer in quantizers.items():
        quantizer.observers.append(observer(name))
    set_mode(model, "observe")
    with torch.no_grad():
        for _ in run_batches(model, batches):
            pass
    for quantizer in quantizers.values():
        quantizer.observers.clear()
    return {name: (torch.cat(maxes), torch.cat(mins)) for name, (maxes, mins) in stats.items()}


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    k = min(x.numel(), max(1, round(q * x.numel())))
    return x.kthvalue(k).values


def token_wise_clipping(model: nn.Module, batches: list[dict], config: W8A8Config) -> dict:
    """Clip the calibrated activation ranges of `model` (in place) to lower the final-output MSE
    (quantized model vs its floating-point original on `batches`).

    Returns the final-output MSE of the calibrated ranges, after the coarse stage and after the
    fine stage; every stage keeps the previous ranges if it does not lower the MSE.
    """
    quantizers = activation_quantizers(model)
    with torch.no_grad(), full_precision(model):
        targets = [_final_output(out).detach() for out in run_batches(model, batches)]
    extremes = _token_extremes(model, batches)
    set_mode(model, "quantize")
    calibrated = {name: (q.scale.clone(), q.zero_point.clone()) for name, q in quantizers.items()}
    best_mse = calibrated_mse = _output_mse(model, batches, targets)
    best = calibrated
    # Coarse: one quantile of the per-token max/min for every per-tensor quantizer.
    per_tensor = {name: q for name, q in quantizers.items() if not q.per_channel}
    for quantile in config.clipping_quantiles:
        for name, quantizer in per_tensor.items():
            maxes, mins = extremes[name]
            quantizer.set_range(_quantile(mins, 1.0 - quantile), _quantile(maxes, quantile))
        mse = _output_mse(model, batches, targets)
        if mse < best_mse:
            best_mse = mse
            best = {name: (q.scale.clone(), q.zero_point.clone()) for name, q in quantizers.items()}
    for name, quantizer in quantizers.items():
        quantizer.scale.copy_(best[name][0])
        quantizer.zero_point.copy_(best[name][1])
    coarse_mse = best_mse
    # Fine: learn a step-size factor per quantizer on the final-output MSE.
    if config.clipping_steps:
        best_mse = _learn_step_sizes(model, quantizers, batches, targets, config, coarse_mse)
    return {"calibrated_mse": calibrated_mse, "coarse_mse": coarse_mse, "fine_mse": best_mse}


def _learn_step_sizes(model, quantizers, batches, targets, config: W8A8Config, start_mse: float) -> float:
    """Adam on one step-size factor per quantizer; keep the factors only if the MSE drops."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    for quantizer in quantizers.values():
        quantizer.scale_factor = nn.Parameter(torch.ones((), device=quantizer.scale.device))
    factors = [quantizer.scale_factor for quantizer in quantizers.values()]
    optimizer = torch.optim.Adam(factors, lr=config.clipping_lr)
    try:
        for step in range(config.clipping_steps):
            i = step % len(batches)
            output = _final_output(next(run_batches(model, [batches[i]])))
            loss = (output - targets[i]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for factor in factors:
                    factor.clamp_(min=1e-3)
        mse = _output_mse(model, batches, targets)
    finally:
        for quantizer in quantizers.values():
            quantizer.scale_factor = None
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
    if mse >= start_mse:
        return start_mse
    with torch.no_grad():
        for quantizer, factor in zip(quantizers.values(), factors):
            quantizer.scale.mul_(factor.detach())
    return mse
