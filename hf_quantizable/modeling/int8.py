"""Quantization points and the INT8 modules of quantized checkpoints.

Models mark every activation the W8A8 setting quantizes with a `QuantPoint` (an identity in
floating point). The quantizer swaps those points and the linear layers for the modules of this
file; a checkpoint whose config holds `w8a8_config` is rebuilt with them by `convert_to_int8`.
Self-contained: torch and relative imports only.
"""

from torch import nn


class QuantPoint(nn.Identity):
    """Marks an activation that W8A8 quantizes; the identity in floating point."""


def convert_to_int8(model: nn.Module, w8a8_config: dict) -> None:
    """Rebuild `model` with the INT8 modules described by `w8a8_config` (in place)."""
    raise NotImplementedError("INT8 checkpoints arrive with the W8A8 quantizer")
