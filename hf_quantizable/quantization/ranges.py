"""Range estimators: weight ranges (min-max, MSE) and calibrated activation ranges."""

import torch

from ..modeling.int8 import activation_qparams, fake_quantize_activation, quantize_weight, weight_scale

_MSE_GRID = torch.linspace(0.01, 1.0, 100)
_MSE_MAX_SAMPLES = 1 << 16


def weight_absmax(weight: torch.Tensor, bits: int, estimator: str, per_channel: bool) -> torch.Tensor:
    """Symmetric clipping range of `weight` (`[out]` per channel, scalar per tensor).

    `minmax` takes max |w|; `mse` searches a grid of fractions of max |w| for the smallest
    squared rounding + clipping error.
    """
    absmax = weight.abs().amax(dim=1) if per_channel else weight.abs().max()
    if estimator == "minmax":
        return absmax
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax.clone()
    for fraction in _MSE_GRID:
        candidate = absmax * fraction
        scale = weight_scale(candidate, bits)
        scale_b = scale[:, None] if per_channel else scale
        err = (quantize_weight(weight, scale_b, bits) * scale_b - weight).pow(2)
        err = err.sum(dim=1) if per_channel else err.sum()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, candidate, best)
    return best


def _flat_sample(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1).float()
    if flat.numel() > _MSE_MAX_SAMPLES:
        flat = flat[:: flat.numel() // _MSE_MAX_SAMPLES + 1]
    return flat


def _quant_error(flat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> float:
    scale, zero_point = activation_qparams(lo, hi, bits)
    return (fake_quantize_activation(flat, scale, zero_point, bits) - flat).pow(2).mean().item()


def mse_range(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Range minimising the fake-quantization MSE of `x`: a grid over fractions of the max (with the
    min fixed), then over fractions of the min (with the chosen max)."""
    flat = _flat_sample(x)
    lo, hi = flat.min(), flat.max()
    hi = min((hi * f for f in _MSE_GRID), key=lambda c: _quant_error(flat, lo, c, bits))
    lo = min((lo * f for f in _MSE_GRID), key=lambda c: _quant_error(flat, c, hi, bits))
    return lo, hi


class ActivationRangeEstimator:
    """Static activation range from calibration batches.

    - `running_minmax`: first batch's min/max, then `m * old + (1 - m) * new` per batch;
    - `percentile`: per-batch `(100 - p)` and `p` percentiles, averaged over batches;
    - `mse`: per-batch MSE-optimal range (see `mse_range`), averaged over batches.
    """

    def __init__(self, estimator: str, bits: int, momentum: float = 0.9, percentile: float = 99.99):
        self.estimator = estimator
        self.bits = bits
        self.momentum = momentum
        self.percentile = percentile
        self.x_min: torch.Tensor | None = None
        self.x_max: torch.Tensor | None = None
        self.num_batches = 0

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.estimator == "running_minmax":
            lo, hi = torch.aminmax(x.detach())
            return lo.float(), hi.float()
        if self.estimator == "mse":
            return mse_range(x, self.bits)
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        upper_k = min(n, max(1, round(self.percentile / 100 * n)))
        lower_k = max(1, n - upper_k + 1)
        return flat.kthvalue(lower_k).values, flat.kthvalue(upper_k).values

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        self.num_batches += 1
        if self.x_min is None:
            self.x_min, self.x_max = lo, hi
        elif self.estimator == "running_minmax":
            self.x_min = self.momentum * self.x_min + (1 - self.momentum) * lo
            self.x_max = self.momentum * self.x_max + (1 - self.momentum) * hi
        else:  # running mean over batches
            self.x_min = self.x_min + (lo - self.x_min) / self.num_batches
            self.x_max = self.x_max + (hi - self.x_max) / self.num_batches

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.x_min is None:
            raise RuntimeError("no calibration data reached this quantizer")
        return self.x_min, self.x_max
