"""Outlier statistics as the official code of Bondarenko et al. (2023) computes them.

For every hooked tensor `x` of a forward pass `[B, T, d]`:

- inf norm: per sequence `max |x|`, averaged over sequences;
- kurtosis: per sequence over all `T * d` values, `E[(x - mu)^4] / (sigma^4 + 1e-6)` with the
  unbiased standard deviation (`torch.std`, as the official `kurtosis`), i.e. not the excess
  kurtosis, averaged over sequences;
- neuron-RMS kurtosis (He et al. 2024, "Understanding and Minimising Outlier Features in
  Transformer Training"): with `s_j` the mean of `x_j^2` over every real token of every sequence,
  `mean_j(s_j^2) / mean_j(s_j)^2`, the (uncentred) kurtosis of the per-neuron RMS over the width:
  1 when every neuron has the same RMS, large when a few neurons carry most of the energy;
- location of the largest `|x|`: token position, channel and token id of the maximum, and the
  share of sequences whose maximum lies at position 0 (the first token, where attention sinks sit).

The summary is the max inf norm over all hooked tensors and the average and max kurtosis over the
tensors that carry a kurtosis. Hooked tensors (the official choices; each model class lists its own in
`_outlier_hook_points`):

- BERT: FFN output (`output.dense`), residual sum before the LayerNorm (inf norm only, as the
  official code) and the LayerNorm output, of every layer;
- OPT: `self_attn.out_proj`, `fc2`, the layer output and both LayerNorm outputs of every layer, and
  the final LayerNorm;
- ViT: attention output (`attention.output.dense`) and block output of every layer.

Each tensor is hooked at its quantization point when the model has one (so a simulated W8A8 model
reports its quantized activations) and at the stock module otherwise (stock transformers models work
too). Padding: only real tokens count. The per-sequence statistics use the positions where the
`attention_mask` passed to the model is 1; with unpadded input (the official setting: packed
sequences) this equals the official computation.
"""

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .. import families

KURTOSIS_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class HookedTensor:
    """A tensor to hook: a module output (or input) found by the first path present.

    Paths are relative to each layer (or to the base model when `per_layer` is False); `""` is the
    layer itself.
    """

    kind: str
    paths: tuple[tuple[str, str], ...]  # (module path, "output" | "input")
    kurtosis: bool = True
    per_layer: bool = True


def model_family(model: nn.Module) -> str:
    """The registered family of the model's config (`quantizable_*` types map to their family)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or ""
    family = families.family_of(model_type)
    if family is None:
        raise ValueError(
            f"outlier statistics support model types {sorted(families.names())} (and their quantizable_ versions), "
            f"got model_type={model_type!r}"
        )
    return family


def hooked_tensors(family: str) -> tuple[tuple[str, ...], tuple[HookedTensor, ...]]:
    """The layer-list paths and the hooked tensors of `family` (its classes' `_layer_paths` and
    `_outlier_hook_points`)."""
    model_class = families.base_model_class(family)
    return model_class._layer_paths, tuple(HookedTensor(**spec) for spec in model_class._outlier_hook_points)


def _layers(base: nn.Module, candidates: tuple[str, ...]) -> nn.ModuleList:
    for path in candidates:
        try:
            return base.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(base).__name__} has none of the layer lists {candidates}")


def _resolve(root: nn.Module, tensor: HookedTensor) -> tuple[str, nn.Module, str]:
    for path, where in tensor.paths:
        try:
            return path, root.get_submodule(path), where
        except AttributeError:
            continue
    raise ValueError(f"{type(root).__name__} has none of the modules {[p for p, _ in tensor.paths]} ({tensor.kind})")


def sequence_stats(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence inf norm and kurtosis of `x` `[B, T, d]` over the real tokens.

    Args:
        mask: `[B, T]`, 1 for the tokens that count (None: all).
    Returns:
        inf norms `[B]` and kurtoses `[B]` (float64).
    """
    x = x.detach().to(torch.float64)
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.float64, device=x.device)
    weights = mask.to(device=x.device, dtype=torch.float64)[:, :, None].expand_as(x)  # [B, T, d]
    count = weights.sum(dim=(1, 2))  # [B]
    inf_norm = (x.abs() * weights).amax(dim=(1, 2))
    mean = (x * weights).sum(dim=(1, 2)) / count
    centered = (x - mean[:, None, None]) * weights
    variance = centered.pow(2).sum(dim=(1, 2)) / (count - 1)  # unbiased, as torch.std
    fourth_moment = centered.pow(4).sum(dim=(1, 2)) / count
    kurtosis = fourth_moment / (variance.pow(2) + KURTOSIS_EPS)
    return inf_norm, kurtosis


class _Meter:
    """Running mean of per-sequence values."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        self.total += float(values.sum())
        self.count += values.numel()

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


def neuron_rms_kurtosis(mean_squares: torch.Tensor) -> float:
    """He et al.'s kurtosis of the per-neuron RMS from `mean_squares` `[d]` (`s_j = mean_t x_tj^2`).

    Equals `mean(r^4) / mean(r^2)^2` for the per-neuron RMS `r_j = sqrt(s_j)`; at least 1.
    """
    s = mean_squares.detach().to(torch.float64)
    return float(s.pow(2).mean() / s.mean().pow(2).clamp(min=1e-300))


def neuron_mean_squares(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Per-neuron sum of `x^2` over the real tokens of `x` `[B, T, d]` and the number of real tokens.

    Returns:
        sums `[d]` (float64) and the token count; their ratio is `s_j` of `neuron_rms_kurtosis`.
    """
    x = x.detach().to(torch.float64)
    if mask is None:
        return x.pow(2).sum(dim=(0, 1)), x.shape[0] * x.shape[1]
    weights = mask.to(device=x.device, dtype=torch.float64)[:, :, None]  # [B, T, 1]
    return (x.pow(2) * weights).sum(dim=(0, 1)), int(weights.sum())


@dataclasses.dataclass
class _MaxLocation:
    """Where the largest `|x|` of a hooked tensor lies, over every recorded forward pass."""

    value: float = float("-inf")
    position: int | None = None
    channel: int | None = None
    token_id: int | None = None
    first_token: _Meter = dataclasses.field(default_factory=_Meter)  # share of sequences with max at position 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None, input_ids: torch.Tensor | None) -> None:
        values = x.detach().abs().to(torch.float32)  # [B, T, d]
        if mask is not None:
            values = values * mask.to(device=values.device, dtype=values.dtype)[:, :, None]
        batch, length, width = values.shape
        per_sequence = values.reshape(batch, -1).argmax(dim=1)  # [B]
        self.first_token.update(((per_sequence // width) == 0).to(torch.float64))
        flat = int(values.argmax())
        value = float(values.reshape(-1)[flat])
        if value > self.value:
            b, rest = divmod(flat, length * width)
            self.value, self.position, self.channel = value, rest // width, rest % width
            has_ids = input_ids is not None and input_ids.shape[:2] == (batch, length)
            self.token_id = int(input_ids[b, self.position]) if has_ids else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value if self.position is not None else None,
            "position": self.position,
            "channel": self.channel,
            "token_id": self.token_id,
            "first_token_share": self.first_token.mean,
        }


@dataclasses.dataclass
class _Site:
    name: str
    kind: str
    layer: int | None
    kurtosis: bool
    inf_norm: _Meter = dataclasses.field(default_factory=_Meter)
    kurt: _Meter = dataclasses.field(default_factory=_Meter)
    outlier_counts: torch.Tensor | None = None
    square_sums: torch.Tensor | None = None
    tokens: int = 0
    max_location: _MaxLocation = dataclasses.field(default_factory=_MaxLocation)

    @property
    def rms_kurtosis(self) -> float | None:
        if self.square_sums is None or not self.tokens:
            return None
        return neuron_rms_kurtosis(self.square_sums / self.tokens)


class OutlierStatsCollector:
    """Forward hooks that accumulate the outlier statistics over any number of forward passes.

    Use as a context manager around forward calls that pass the batch as keyword arguments (the
    `attention_mask` keyword selects the real tokens)::

        with OutlierStatsCollector(model) as stats:
            for batch in batches:
                model(**batch)
        summary = stats.summary()

    Args:
        outlier_threshold: a value is an outlier when `|x - mean| > outlier_threshold * std` of its
            sequence; `outlier_counts()` gives, per hooked tensor, how many per hidden dimension.
    """

    def __init__(self, model: nn.Module, outlier_threshold: float = 6.0):
        self.model = model
        self.outlier_threshold = outlier_threshold
        layer_paths, tensors = hooked_tensors(model_family(model))
        base = model.base_model
        base_prefix = self._prefix(model, base)
        layers = _layers(base, layer_paths)
        layers_prefix = self._prefix(model, layers)
        self.sites: list[tuple[_Site, nn.Module, str]] = []
        for tensor in tensors:
            roots = list(enumerate(layers)) if tensor.per_layer else [(None, base)]
            for index, root in roots:
                path, module, where = _resolve(root, tensor)
                prefix = f"{layers_prefix}.{index}" if tensor.per_layer else base_prefix
                name = ".".join(part for part in (prefix, path, "input" if where == "input" else "") if part)
                self.sites.append((_Site(name, tensor.kind, index, tensor.kurtosis), module, where))
        self._mask: torch.Tensor | None = None
        self._input_ids: torch.Tensor | None = None
        self._handles: list = []

    @staticmethod
    def _prefix(model: nn.Module, target: nn.Module) -> str:
        return next(name for name, module in model.named_modules() if module is target)

    def __enter__(self) -> "OutlierStatsCollector":
        self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for site, module, where in self.sites:
            self._handles.append(module.register_forward_hook(self._make_hook(site, where)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _capture_mask(self, module, args, kwargs) -> None:
        self._mask = kwargs.get("attention_mask")
        self._input_ids = kwargs.get("input_ids")

    def _make_hook(self, site: _Site, where: str):
        def hook(module, inputs, output):
            x = inputs[0] if where == "input" else output
            if isinstance(x, (tuple, list)):
                x = x[0]
            self._update(site, x)

        return hook

    @torch.no_grad()
    def _update(self, site: _Site, x: torch.Tensor) -> None:
        mask = self._mask
        if mask is not None and mask.shape != x.shape[:2]:
            mask = None  # a tensor without the token axis of the mask (not expected for hooked tensors)
        inf_norm, kurtosis = sequence_stats(x, mask)
        site.inf_norm.update(inf_norm)
        if site.kurtosis:
            site.kurt.update(kurtosis)
        counts = outlier_counts_per_dim(x, mask, self.outlier_threshold)
        site.outlier_counts = counts if site.outlier_counts is None else site.outlier_counts + counts
        sums, tokens = neuron_mean_squares(x, mask)
        site.square_sums = sums if site.square_sums is None else site.square_sums + sums
        site.tokens += tokens
        site.max_location.update(x, mask, self._input_ids)

    def per_layer(self) -> list[dict[str, Any]]:
        """One entry per hooked tensor: layer, kind, module name, inf norm, kurtosis, neuron-RMS
        kurtosis, top outlier dims and the location of the largest value."""
        entries = []
        for site, _, _ in self.sites:
            counts = site.outlier_counts
            top = []
            if counts is not None and counts.sum() > 0:
                values, dims = counts.topk(min(3, counts.numel()))
                top = [[int(d), int(v)] for d, v in zip(dims, values) if v > 0]
            entries.append(
                {
                    "layer": site.layer,
                    "kind": site.kind,
                    "module": site.name,
                    "inf_norm": site.inf_norm.mean,
                    "kurtosis": site.kurt.mean if site.kurtosis else None,
                    "rms_kurtosis": site.rms_kurtosis,
                    "top_outlier_dims": top,
                    "max_location": site.max_location.as_dict(),
                }
            )
        return entries

    def outlier_counts(self, kinds: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Per hooked tensor (module name) of `kinds` (None: all): outlier count per hidden dimension `[d]`."""
        return {
            site.name: site.outlier_counts
            for site, _, _ in self.sites
            if site.outlier_counts is not None and (kinds is None or site.kind in kinds)
        }

    def summary(self) -> dict[str, Any]:
        """`max_inf_norm`, `avg_kurtosis`, `max_kurtosis`, `avg_rms_kurtosis`, `max_rms_kurtosis`,
        `max_inf_norm_by_kind`, `max_location` (of the tensor with the max inf norm), `per_layer`,
        `num_sequences`."""
        per_layer = self.per_layer()
        if not self.sites or self.sites[0][0].inf_norm.count == 0:
            raise ValueError("no forward pass was recorded: give at least one batch")
        inf_norms = [entry["inf_norm"] for entry in per_layer]
        kurtoses = [entry["kurtosis"] for entry in per_layer if entry["kurtosis"] is not None]
        rms_kurtoses = [entry["rms_kurtosis"] for entry in per_layer if entry["rms_kurtosis"] is not None]
        by_kind: dict[str, float] = {}
        for entry in per_layer:
            by_kind[entry["kind"]] = max(by_kind.get(entry["kind"], float("-inf")), entry["inf_norm"])
        largest = max(per_layer, key=lambda entry: entry["inf_norm"])
        return {
            "max_inf_norm": max(inf_norms),
            "avg_kurtosis": sum(kurtoses) / len(kurtoses),
            "max_kurtosis": max(kurtoses),
            "avg_rms_kurtosis": sum(rms_kurtoses) / len(rms_kurtoses),
            "max_rms_kurtosis": max(rms_kurtoses),
            "max_inf_norm_by_kind": by_kind,
            "max_location": {"module": largest["module"], **largest["max_location"]},
            "per_layer": per_layer,
            "num_sequences": self.sites[0][0].inf_norm.count,
        }


def outlier_counts_per_dim(x: torch.Tensor, mask: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """Count, per hidden dimension, the values more than `threshold` std from their sequence's mean.

    Args:
        x: `[B, T, d]`; mask: `[B, T]` real tokens (None: all).
    Returns:
        `[d]` integer counts summed over sequences and tokens.
    """
    x = x.detach().to(torch.float64)
    if mask is None:
        mask = torch.ones(x.shape[:2], device=x.device)
    weights = mask.to(device=x.device, dtype=torch.float64)[:, :, None]  # [B, T, 1]
    count = weights.sum(dim=(1, 2)) * x.shape[-1]  # [B]
    mean = (x * weights).sum(dim=(1, 2)) / count
    std = (((x - mean[:, None, None]) * weights).pow(2).sum(dim=(1, 2)) / (count - 1)).sqrt()
    outliers = ((x - mean[:, None, None]).abs() > threshold * std[:, None, None]) & (weights > 0)
    return outliers.sum(dim=(0, 1)).cpu()


@torch.no_grad()
def compute_outlier_stats(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], outlier_threshold: float = 6.0
) -> dict[str, Any]:
    """Run `batches` through `model` (eval mode, no grad) and return the outlier statistics.

    Args:
        batches: dicts of model inputs (`input_ids` + `attention_mask`, or `pixel_values`); `labels`
            are dropped.
    Returns:
        `max_inf_norm`, `avg_kurtosis`, `max_kurtosis`, `avg_rms_kurtosis`, `max_rms_kurtosis`,
        `max_inf_norm_by_kind`, `max_location`, `num_sequences` and `per_layer` (one dict per hooked
        tensor: layer, kind, module, inf_norm, kurtosis, rms_kurtosis, top_outlier_dims,
        max_location).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with OutlierStatsCollector(model, outlier_threshold) as collector:
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                model(**inputs)
    finally:
        model.train(was_training)
    return collector.summary()
