"""hf_quantizable: outlier-free, quantization-friendly transformers for the Hugging Face ecosystem.

Importing the package registers the quantizable model types with the transformers Auto classes and
the W8A8 quantization method (`W8A8QuantizationConfig`) with transformers' quantizers.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

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

_REGISTRY = {
    QuantizableBertConfig: {
        AutoModel: QuantizableBertModel,
        AutoModelForMaskedLM: QuantizableBertForMaskedLM,
        AutoModelForSequenceClassification: QuantizableBertForSequenceClassification,
    },
    QuantizableOPTConfig: {AutoModel: QuantizableOPTModel, AutoModelForCausalLM: QuantizableOPTForCausalLM},
    QuantizableViTConfig: {
        AutoModel: QuantizableViTModel,
        AutoModelForImageClassification: QuantizableViTForImageClassification,
    },
}

for _config_class, _models in _REGISTRY.items():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    for _auto_class, _model_class in _models.items():
        _auto_class.register(_config_class, _model_class, exist_ok=True)

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
