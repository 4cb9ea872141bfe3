"""Range estimators: weight ranges (min-max, MSE) and calibrated activation ranges."""

import torch

from ..modeling.int8 import activation_qparams, fake_quantize_activation, quantize_weight, weight_scale

_MSE_GRID = torch.linspace(0.01, 1.0, 100)
_MSE_MAX_SAMPLES = 1 << 16
_MSE_CANDIDATES, _MSE_WEIGHT_MARGIN = 100, 0.5


def weight_absmax(weight: torch.Tensor, bits: int, estimator: str, per_channel: bool) -> torch.Tensor:
    """Symmetric clipping range of `weight` (`[out]` per channel, scalar per tensor).

    `minmax` takes max |w|; `mse` is the official Bondarenko et al. grid (`MSE_Estimator`
    `_perform_1D_search` in `quantization/range_estimators.py`, `OptMethod.grid`): 100 candidate
    thresholds `i / 100 * (max |w| + 0.5)` (the tensor's max and the official `range_margin`),
    the one with the smallest squared rounding + clipping error (per output channel when
    `per_channel`).
    """
    absmax = weight.abs().amax(dim=1) if per_channel else weight.abs().max()
    if estimator == "minmax":
        return absmax
    search_range = weight.abs().max() + _MSE_WEIGHT_MARGIN
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax.clone()
    for i in range(1, _MSE_CANDIDATES + 1):
        candidate = torch.full_like(absmax, (search_range * i / _MSE_CANDIDATES).item())
        scale = weight_scale(candidate, bits)
        scale_b = scale[:, None] if per_channel else scale
        err = (quantize_weight(weight, scale_b, bits) * scale_b - weight).pow(2)
        err = err.sum(dim=1) if per_channel else err.sum()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, candidate, best)
    return best


def _sample(x: torch.Tensor) -> torch.Tensor:
    """At most `_MSE_MAX_SAMPLES` evenly spaced values along the last axis of `x` (`[N]` or `[C, N]`)."""
    n = x.shape[-1]
    return x[..., :: n // _MSE_MAX_SAMPLES + 1] if n > _MSE_MAX_SAMPLES else x


def _quant_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Mean squared fake-quantization error along the last axis of `x` with the range `[lo, hi]`."""
    scale, zero_point = activation_qparams(lo, hi, bits)
    if x.dim() == 2:
        scale, zero_point = scale[:, None], zero_point[:, None]
    return (fake_quantize_activation(x, scale, zero_point, bits) - x).pow(2).mean(dim=-1)


def _best_fraction(x: torch.Tensor, candidate, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(lo, hi) = candidate(f)` over the fractions `f` of `_MSE_GRID` with the smallest error."""
    best_err, best = None, None
    for fraction in _MSE_GRID:
        lo, hi = candidate(fraction)
        err = _quant_error(x, lo, hi, bits)
        if best is None:
            best_err, best = err, (lo, hi)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, lo, best[0]), torch.where(better, hi, best[1]))
    return best


def mse_range(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Range minimising the fake-quantization MSE along the last axis of `x` (`[N]`, or `[C, N]` for one
    range per row): a grid over fractions of the max (with the min fixed), then over fractions of
    the min (with the chosen max)."""
    x = _sample(x)
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)
    _, hi = _best_fraction(x, lambda f: (lo, hi * f), bits)
    lo, _ = _best_fraction(x, lambda f: (lo * f, hi), bits)
    return lo, hi


def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The `q`-th percentile along the last axis, linearly interpolated between order statistics
    (`numpy.percentile`'s default, as the official `RunningMinMaxEstimator`); no size limit, unlike
    `torch.quantile`."""
    n = x.shape[-1]
    position = q / 100 * (n - 1)
    below = int(position)
    low = x.kthvalue(below + 1, dim=-1).values
    if below + 1 >= n or position == below:
        return low
    high = x.kthvalue(below + 2, dim=-1).values
    return low + (high - low) * (position - below)


class ActivationRangeEstimator:
    """Static activation range from calibration batches.

    - `running_minmax`: first batch's min/max, then `m * old + (1 - m) * new` per batch;
    - `avg_minmax`: per-batch min/max, averaged over batches;
    - `percentile`: per-batch `(100 - p)` and `p` percentiles, then the same moving average as
      `running_minmax` (the official `RunningMinMaxEstimator` with `percentile`);
    - `mse`: per-batch MSE-optimal range (see `mse_range`), averaged over batches.

    With `per_channel`, one range per channel of the last axis (statistics over all other axes).
    With `outlier_mask` (bool `[C]`), one range for the masked channels of the last axis and one for
    the others, returned per channel.
    """

    def __init__(
        self, estimator: str, bits: int, momentum: float = 0.9, percentile: float = 99.99, per_channel: bool = False
    ):
        self.estimator = estimator
        self.bits = bits
        self.momentum = momentum
        self.percentile = percentile
        self.per_channel = per_channel
        self.outlier_mask: torch.Tensor | None = None
        self.x_min: torch.Tensor | None = None
        self.x_max: torch.Tensor | None = None
        self.num_batches = 0

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_channel:
            return self._range_of(x.detach().reshape(-1, x.shape[-1]).float().t())  # [C, N]
        if self.outlier_mask is not None:
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # [N, C]
            lo, hi = self._range_of(flat[:, ~self.outlier_mask].reshape(-1))
            outlier_lo, outlier_hi = self._range_of(flat[:, self.outlier_mask].reshape(-1))
            return torch.where(self.outlier_mask, outlier_lo, lo), torch.where(self.outlier_mask, outlier_hi, hi)
        return self._range_of(x.detach().reshape(-1).float())

    def _range_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Range of the values along the last axis of `x` (`[N]` or `[C, N]`)."""
        if self.estimator in ("running_minmax", "avg_minmax"):
            return x.amin(dim=-1), x.amax(dim=-1)
        if self.estimator == "mse":
            return mse_range(x, self.bits)
        return percentile(x, 100.0 - self.percentile), percentile(x, self.percentile)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        self.num_batches += 1
        if self.x_min is None:
            self.x_min, self.x_max = lo, hi
        elif self.estimator in ("running_minmax", "percentile"):
            self.x_min = self.momentum * self.x_min + (1 - self.momentum) * lo
            self.x_max = self.momentum * self.x_max + (1 - self.momentum) * hi
        else:  # running mean over batches
            self.x_min = self.x_min + (lo - self.x_min) / self.num_batches
            self.x_max = self.x_max + (hi - self.x_max) / self.num_batches

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.x_min is None:
            raise RuntimeError("no calibration data reached this quantizer")
        return self.x_min, self.x_max
