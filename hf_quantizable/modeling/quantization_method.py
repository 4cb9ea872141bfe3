"""W8A8 as a transformers quantization method: `quant_method: "hf_quantizable_w8a8"`.

Registered with transformers when this module is imported (by the model configs, so also from a
checkpoint's own copy of this code):

- an INT8 checkpoint's `config.json` carries `quantization_config` (the quantizer's settings with
  `quant_method`); `from_pretrained` then sets `model.is_quantized` and `model.hf_quantizer`. Its
  INT8 modules are built from `w8a8_config` by the model class itself, so loading needs nothing else;
- `from_pretrained(fp_folder, quantization_config=W8A8QuantizationConfig(calibration_dataset=...))`
  quantizes a floating-point checkpoint while loading it (this part needs the `hf_quantizable`
  package: calibration is not part of the Hub-portable code).

`requires_calibration` stays False: in transformers it means "loads only pre-quantized weights",
while this method calibrates on the data given in the config.
"""

from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "hf_quantizable_w8a8"


class W8A8QuantizationConfig(QuantizationConfigMixin):
    """`quantization_config` of the W8A8 method.

    Args:
        calibration_dataset: batches (dicts of tensors the model's forward accepts, a `datasets.Dataset`
            in torch format, a `DataLoader`) to calibrate on when quantizing while loading; never saved.
        **settings: `hf_quantizable.quantization.W8A8Config` fields (`weight_bits`, `activation_bits`,
            `per_channel_weights`, ...; validated when quantizing).
    """

    def __init__(self, calibration_dataset: Any = None, **settings: Any):
        settings.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.calibration_dataset = calibration_dataset
        self.settings = settings

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        """What `config.json` stores: the method and its settings (the calibration data stays out)."""
        return {"quant_method": self.quant_method, **self.settings}

    def __iter__(self):
        yield from self.to_dict().items()


class W8A8HfQuantizer(HfQuantizer):
    """The transformers quantizer of `W8A8QuantizationConfig`."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized and self.quantization_config.calibration_dataset is None:
            raise ValueError(
                "quantizing while loading needs calibration data: "
                "W8A8QuantizationConfig(calibration_dataset=batches, ...)"
            )

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized and not getattr(model.config, "w8a8_config", None):
            raise ValueError(f"`quantization_config` names {QUANT_METHOD}, but config.json has no `w8a8_config`")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:  # the model class built the INT8 modules from `w8a8_config`
            return model
        try:
            from hf_quantizable.quantization.quantizer import quantize_in_place
        except ImportError as error:
            raise ImportError(f"quantizing while loading needs the hf_quantizable package ({error})") from None
        quantize_in_place(model, self.quantization_config.settings, self.quantization_config.calibration_dataset)
        self.quantization_config.settings = quantization_settings(model.config.w8a8_config)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


# Quantizer settings recorded in `quantization_config` (the rest of `w8a8_config` lists modules).
_SETTINGS = (
    "weight_bits",
    "activation_bits",
    "weight_estimator",
    "activation_estimator",
    "per_channel_weights",
    "per_channel_residuals",
    "outlier_channels",
    "gamma_migration",
    "token_wise_clipping",
    "quantize_embeddings",
    "quantize_layernorm_weights",
)


def quantization_settings(w8a8_config: dict) -> dict[str, Any]:
    """The quantizer settings of a `w8a8_config` that its `quantization_config` records."""
    return {k: w8a8_config[k] for k in _SETTINGS if k in w8a8_config}


# A checkpoint's own copy of this module may be imported beside the package's: register once.
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(W8A8QuantizationConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(W8A8HfQuantizer)
