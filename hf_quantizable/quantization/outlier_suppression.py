"""Outlier Suppression (Wei et al., NeurIPS 2022) as a post-training option.

- Gamma migration: a LayerNorm `gamma * x_hat + beta` becomes the non-scaling `x_hat + beta / gamma`
  (so its quantized output loses the outlier channels that gamma amplifies); gamma moves into the
  weights of the linear layers that read it and, in post-LN BERT, onto the residual shortcut.
  An exact transformation in floating point.
- Token-wise clipping, as the official `solver/token_wise_clipping.py` with the
  `AvgPruneMinMaxObserver` of `quantization/observer.py`: the coarse stage tries the clipping
  ratios of `W8A8Config.clipping_grid()`; for each, every activation range is the per-batch range
  of the tokens whose max (min) lies within the ratio's quantile of the tokens' |max| (|min|),
  averaged over the batches (attention probabilities are never clipped; padding tokens do not
  count with `remove_padding`, as the official `is_remove_padding`); the ratio with the smallest
  final-output MSE wins. The fine stage then learns every scale and zero point LSQ+-style (Adam, cosine-annealed learning rate) on the same MSE. As in the
  official code, both stages run with floating-point weights, and the search is not restricted
  to ratios that beat the calibrated ranges. Unlike it, the learned grids are kept only when they
  lower the MSE on the calibration batches (at the official learning rate they often do not).
"""

import torch
from torch import nn

from .. import families
from ..modeling.int8 import install_shortcut_scale
from .calibration import activation_quantizers, full_precision, run_batches, set_mode, weights_in_fp
from .config import W8A8Config


def _migration_plan(model: nn.Module) -> list[tuple[str, list[str], str | None]]:
    """(LayerNorm, linear layers reading its output, residual module whose shortcut reads it) triples: the
    model class's `_gamma_migration_plan()`.

    LayerNorms whose output leaves the model (last BERT layer, final LayerNorm of OPT/ViT) stay as they are.
    """
    plan = getattr(model, "_gamma_migration_plan", None)
    if plan is None:
        supported = "/".join(families.config_class(f).model_type for f in families.names())
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"gamma migration supports {supported} models, got {model_type!r}")
    return plan()


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


def _output_rows(outputs, batch: dict) -> torch.Tensor:
    """The final output at the real tokens (`[N, ...]` where the batch has an attention mask)."""
    output = outputs[0] if not isinstance(outputs, torch.Tensor) else outputs
    mask = batch.get("attention_mask")
    if mask is not None and output.dim() >= 3 and output.shape[:2] == mask.shape:
        return output[mask.to(output.device).bool()]
    return output


def _output_mse(model: nn.Module, batches: list[dict], targets: list[torch.Tensor]) -> float:
    """Mean over batches of the final-output MSE against `targets`."""
    with torch.no_grad():
        errors = [
            (_output_rows(out, batch) - target).pow(2).mean().item()
            for out, batch, target in zip(run_batches(model, batches), batches, targets)
        ]
    return sum(errors) / len(errors)


def _token_extremes(
    model: nn.Module, batches: list[dict], remove_padding: bool
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch, the max and min of every token (of the real tokens with `remove_padding`) at every
    activation quantizer, from a floating-point forward pass."""
    stats: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    quantizers = activation_quantizers(model)

    def observer(name):
        def observe(rows):
            # Tokens along the first axis; attention probabilities (never clipped) only need the extremes.
            flat = rows.detach().reshape(-1, rows.shape[-1]).float()
            stats.setdefault(name, []).append((flat.amax(dim=1), flat.amin(dim=1)))

        return observe

    for name, quantizer in quantizers.items():
        quantizer.observers.append(observer(name))
    set_mode(model, "observe")
    try:
        with torch.no_grad(), weights_in_fp(model):
            for _ in run_batches(model, batches, remove_padding):
                pass
    finally:
        for quantizer in quantizers.values():
            quantizer.observers.clear()
    return stats


def clipped_range(token_max: torch.Tensor, token_min: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's clipped range: the largest token max within the `ratio` quantile of |token max|,
    the smallest token min within minus the `ratio` quantile of |token min| (`prune_token`)."""
    upper = torch.quantile(token_max.abs(), ratio)
    lower = -torch.quantile(token_min.abs(), ratio)
    return token_min[token_min >= lower].min(), token_max[token_max <= upper].max()


def token_ranges(extremes: list[tuple[torch.Tensor, torch.Tensor]], ratio: float, clip: bool = True):
    """The range of one quantizer at `ratio`: per-batch clipped ranges averaged over the batches."""
    ranges = [clipped_range(mx, mn, ratio) if clip else (mn.min(), mx.max()) for mx, mn in extremes]
    return torch.stack([lo for lo, _ in ranges]).mean(), torch.stack([hi for _, hi in ranges]).mean()


def _is_attention_probs(name: str) -> bool:
    return name.endswith("probs_quant")


def token_wise_clipping(model: nn.Module, batches: list[dict], config: W8A8Config) -> dict:
    """Set the per-tensor activation ranges of the calibrated `model` by token-wise clipping (in place).

    Targets are the floating-point model's final outputs on `batches` (at the real tokens).
    Returns the final-output MSE (with floating-point weights, as the search runs) of the
    calibrated ranges, of every coarse ratio, of the chosen ratio and after the fine stage.
    """
    quantizers = {name: q for name, q in activation_quantizers(model).items() if not q.per_channel}
    with torch.no_grad(), full_precision(model):
        targets = [_output_rows(out, batch).detach() for out, batch in zip(run_batches(model, batches), batches)]
    extremes = _token_extremes(model, batches, config.remove_padding)
    set_mode(model, "quantize")
    with weights_in_fp(model):
        calibrated_mse = _output_mse(model, batches, targets)
        losses = {}
        for ratio in config.clipping_grid():
            for name, quantizer in quantizers.items():
                quantizer.set_range(*token_ranges(extremes[name], ratio, clip=not _is_attention_probs(name)))
            losses[ratio] = _output_mse(model, batches, targets)
        best = min(losses, key=losses.get)  # the first of equal losses, as the official search
        for name, quantizer in quantizers.items():
            quantizer.set_range(*token_ranges(extremes[name], best, clip=not _is_attention_probs(name)))
        learned_mse = None
        if config.clipping_steps:
            coarse = {name: (q.scale.clone(), q.zero_point.clone()) for name, q in quantizers.items()}
            _learn_scales(model, quantizers, batches, targets, config)
            learned_mse = _output_mse(model, batches, targets)
            if learned_mse >= losses[best]:  # a guard the official code lacks
                for name, quantizer in quantizers.items():
                    quantizer.scale, quantizer.zero_point = coarse[name]
    return {
        "calibrated_mse": calibrated_mse,
        "ratio_mse": losses,
        "ratio": best,
        "coarse_mse": losses[best],
        "learned_mse": learned_mse,
        "fine_mse": min(losses[best], learned_mse if learned_mse is not None else float("inf")),
    }


def _learn_scales(model, quantizers: dict, batches: list[dict], targets: list[torch.Tensor], config) -> None:
    """LSQ+ fine stage (official `learn_scale`): Adam on every scale and zero point, the learning
    rate cosine-annealed to 0 over `config.clipping_steps` steps of one batch each."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    levels = 2**config.activation_bits - 1
    for quantizer in quantizers.values():
        quantizer.learned = (nn.Parameter(quantizer.scale.clone()), nn.Parameter(quantizer.zero_point.clone()))
    params = [p for quantizer in quantizers.values() for p in quantizer.learned]
    optimizer = torch.optim.Adam(params, lr=config.clipping_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.clipping_steps, eta_min=0.0)
    try:
        for step in range(config.clipping_steps):
            i = step % len(batches)
            loss = (_output_rows(next(run_batches(model, [batches[i]])), batches[i]) - targets[i]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for scale, zero_point in (q.learned for q in quantizers.values()):
                    scale.abs_().clamp_(min=torch.finfo(torch.float32).eps)
                    zero_point.clamp_(0, levels)
        with torch.no_grad():
            for quantizer in quantizers.values():
                scale, zero_point = quantizer.learned
                quantizer.scale = scale.detach().clone()
                quantizer.zero_point = zero_point.detach().round()
    finally:
        for quantizer in quantizers.values():
            quantizer.learned = None
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
