"""hf_quantizable: outlier-free, quantization-friendly transformers for the Hugging Face ecosystem.

Importing the package registers the quantizable model types with the transformers Auto classes and
the W8A8 quantization method (`W8A8QuantizationConfig`) with transformers' quantizers.
"""

from . import families
from .modeling.configuration_quantizable import (
    QuantizableBertConfig,
    QuantizableOPTConfig,
    QuantizableViTConfig,
)
from .modeling.modeling_quantizable_bert import (
    QuantizableBertForMaskedLM,
    QuantizableBertForSequenceClassification,
    QuantizableBertModel,
)
from .modeling.modeling_quantizable_opt import QuantizableOPTForCausalLM, QuantizableOPTModel
from .modeling.modeling_quantizable_vit import QuantizableViTForImageClassification, QuantizableViTModel
from .modeling.quantization_method import W8A8QuantizationConfig

__version__ = "0.1.0"

for _family in families.FAMILIES:
    families.register_auto_classes(_family)

__all__ = [
    "QuantizableBertConfig",
    "QuantizableBertForMaskedLM",
    "QuantizableBertForSequenceClassification",
    "QuantizableBertModel",
    "QuantizableOPTConfig",
    "QuantizableOPTForCausalLM",
    "QuantizableOPTModel",
    "QuantizableViTConfig",
    "QuantizableViTForImageClassification",
    "QuantizableViTModel",
    "W8A8QuantizationConfig",
]
