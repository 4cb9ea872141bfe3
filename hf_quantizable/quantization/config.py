"""`W8A8Config`: how a model is quantized (the papers' W8A8 setting by default)."""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

WEIGHT_ESTIMATORS = ("minmax", "mse")
ACTIVATION_ESTIMATORS = ("running_minmax", "percentile", "mse")
MIN_BITS, MAX_BITS = 2, 8
# Outlier channels per linear input: their exact float product needs k * 255 * 127 < 2^24.
MAX_OUTLIER_CHANNELS = 512

# Modules kept in floating point by default: the task heads of BERT (MLM head `cls`, pooler,
# classifier), OPT (`lm_head`) and ViT (`classifier`). Gates and LayerNorms are never quantized.
DEFAULT_KEEP_FP = ("cls", "pooler", "classifier", "lm_head")


@dataclass
class W8A8Config:
    """Settings of the W8A8 quantizer.

    Args:
        weight_bits: weight bit width, in [2, 8].
        activation_bits: activation bit width, in [2, 8].
        weight_estimator: `minmax` (BERT, ViT in the paper) or `mse` (grid search, OPT in the paper).
        activation_estimator: `running_minmax` (exponential moving average of per-batch min/max),
            `percentile` (per-batch percentiles, averaged) or `mse` (per-batch MSE-optimal range, averaged).
        momentum: momentum of `running_minmax`, in [0, 1).
        percentile: upper percentile of `percentile` (the lower one is 100 - percentile), in (50, 100].
        num_calibration_batches: batches used to estimate activation ranges (>= 1).
        per_channel_weights: one weight scale per output channel instead of per tensor.
        per_channel_residuals: one activation grid per hidden channel for the residual-stream points
            that no matrix product reads (residual sums and the outputs added into them; the
            per-embedding-group quantization of Bondarenko et al. 2021 with one group per channel).
            The inputs of the integer matrix products stay per tensor.
        outlier_channels: for every input of an integer matrix product, this many hidden channels
            (those with the widest calibrated ranges) get a second grid of their own: the
            per-embedding-group quantization of Bondarenko et al. (2021) with two groups. 0 (the
            default) keeps one grid per tensor; at most 512 (the exact integer product bound).
        keep_fp_modules: module names (any dotted component) kept in floating point.
        gamma_migration: Outlier Suppression gamma migration (exact in floating point).
        token_wise_clipping: Outlier Suppression token-wise clipping of activation ranges.
        clipping_quantiles: coarse grid of token-wise clipping, as quantiles of the per-token max/min.
        clipping_steps: optimisation steps of the fine stage (0 skips it).
        clipping_lr: learning rate of the fine stage.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    weight_estimator: str = "minmax"
    activation_estimator: str = "running_minmax"
    momentum: float = 0.9
    percentile: float = 99.99
    num_calibration_batches: int = 16
    per_channel_weights: bool = False
    per_channel_residuals: bool = False
    outlier_channels: int = 0
    keep_fp_modules: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_FP))
    gamma_migration: bool = False
    token_wise_clipping: bool = False
    clipping_quantiles: list[float] = field(default_factory=lambda: [1.0, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.5])
    clipping_steps: int = 50
    clipping_lr: float = 1e-3

    def __post_init__(self):
        for name in ("momentum", "percentile", "clipping_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"`{name}` must be a number, got {value!r}")
        for name in ("per_channel_weights", "per_channel_residuals", "gamma_migration", "token_wise_clipping"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.keep_fp_modules, (list, tuple)) or not all(
            isinstance(m, str) for m in self.keep_fp_modules
        ):
            raise ValueError(f"`keep_fp_modules` must be a list of module names, got {self.keep_fp_modules!r}")
        quantiles = self.clipping_quantiles
        if not isinstance(quantiles, (list, tuple)) or not all(
            isinstance(q, (int, float)) and not isinstance(q, bool) for q in quantiles
        ):
            raise ValueError(f"`clipping_quantiles` must be a non-empty list in (0, 1], got {quantiles!r}")
        for name in ("weight_bits", "activation_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
                raise ValueError(f"`{name}` must be an integer in [{MIN_BITS}, {MAX_BITS}], got {value!r}")
        if self.weight_estimator not in WEIGHT_ESTIMATORS:
            raise ValueError(f"`weight_estimator` must be one of {WEIGHT_ESTIMATORS}, got {self.weight_estimator!r}")
        if self.activation_estimator not in ACTIVATION_ESTIMATORS:
            raise ValueError(
                f"`activation_estimator` must be one of {ACTIVATION_ESTIMATORS}, got {self.activation_estimator!r}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"`percentile` must be in (50, 100], got {self.percentile!r}")
        for name in ("num_calibration_batches", "clipping_steps"):
            value = getattr(self, name)
            minimum = 1 if name == "num_calibration_batches" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
        value = self.outlier_channels
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_OUTLIER_CHANNELS:
            raise ValueError(f"`outlier_channels` must be an integer in [0, {MAX_OUTLIER_CHANNELS}], got {value!r}")
        if not self.clipping_quantiles or not all(0.0 < q <= 1.0 for q in self.clipping_quantiles):
            raise ValueError(
                f"`clipping_quantiles` must be a non-empty list in (0, 1], got {self.clipping_quantiles!r}"
            )
        if not self.clipping_lr > 0:
            raise ValueError(f"`clipping_lr` must be > 0, got {self.clipping_lr!r}")
        self.keep_fp_modules = list(self.keep_fp_modules)
        self.clipping_quantiles = [float(q) for q in self.clipping_quantiles]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "W8A8Config":
        """Build from a dict; unknown keys raise ValueError naming them and the known fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown W8A8Config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string() + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> "W8A8Config":
        return cls.from_dict(json.loads(Path(path).read_text()))
