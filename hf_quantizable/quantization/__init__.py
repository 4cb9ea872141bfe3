"""W8A8 post-training quantization: the papers' setting, Outlier Suppression, INT8 export."""

from .calibration import quantize_model
from .config import W8A8Config
from .export import freeze
from .quantizer import W8A8Quantizer

__all__ = ["W8A8Config", "W8A8Quantizer", "freeze", "quantize_model"]
