"""The model families: one registry line each, family name -> its quantizable model classes.

A family's knowledge lives on its classes, as class attributes (the way transformers keeps
`_no_split_modules` or `base_model_prefix` on its model classes): the config class says which
modality it reads and how its tokenizer is made (`QuantizableAttentionConfig`), the model classes
where their layers, outlier hook points, floating-point heads and gamma-migration plan are, which
evaluation task each head runs and which head pre-trains (`QuantizableModelMixin`). Generic code asks
this module and those attributes instead of branching on the family; adding a family is its modeling
file plus one line in `FAMILIES`.

The registry key is the stock model type (`bert`); the family's config class has its own model type
(`quantizable_bert`). Both name the family.
"""

from collections.abc import Sequence

import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from .modeling.modeling_quantizable_bert import (
    QuantizableBertForMaskedLM,
    QuantizableBertForSequenceClassification,
    QuantizableBertModel,
)
from .modeling.modeling_quantizable_opt import QuantizableOPTForCausalLM, QuantizableOPTModel
from .modeling.modeling_quantizable_vit import QuantizableViTForImageClassification, QuantizableViTModel

# family -> its model classes, the base model first.
FAMILIES: dict[str, tuple[type[PreTrainedModel], ...]] = {
    "bert": (QuantizableBertModel, QuantizableBertForMaskedLM, QuantizableBertForSequenceClassification),
    "opt": (QuantizableOPTModel, QuantizableOPTForCausalLM),
    "vit": (QuantizableViTModel, QuantizableViTForImageClassification),
}


def register_family(name: str, model_classes: Sequence[type[PreTrainedModel]]) -> None:
    """Add (or replace) the family `name`: its model classes, the base model first, sharing one config class."""
    model_classes = tuple(model_classes)
    if not model_classes or len({cls.config_class for cls in model_classes}) != 1:
        raise ValueError(f"family {name!r}: give its model classes (the base model first), all of one config class")
    FAMILIES[name] = model_classes
    register_auto_classes(name)


def register_auto_classes(family: str) -> None:
    """Register the family's config and model classes with the transformers Auto classes of their `auto_map`."""
    config = config_class(family)
    AutoConfig.register(config.model_type, config, exist_ok=True)
    for model_class in model_classes(family):
        for auto in auto_classes(model_class):
            getattr(transformers, auto).register(config, model_class, exist_ok=True)


def names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def _check(family: str) -> tuple[type[PreTrainedModel], ...]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def model_classes(family: str) -> tuple[type[PreTrainedModel], ...]:
    return _check(family)


def base_model_class(family: str) -> type[PreTrainedModel]:
    return _check(family)[0]


def config_class(family: str) -> type[PretrainedConfig]:
    return _check(family)[0].config_class


def config_classes() -> dict[str, type[PretrainedConfig]]:
    """family -> config class."""
    return {family: config_class(family) for family in FAMILIES}


def family_of(model_type: str | None) -> str | None:
    """The family a config's `model_type` belongs to (`bert` or `quantizable_bert` -> `bert`); None if none."""
    for family in FAMILIES:
        if model_type in (family, config_class(family).model_type):
            return family
    return None


def family_of_model(model) -> str | None:
    """The family of a model object (ours or stock), from its config's `model_type`."""
    return family_of(getattr(getattr(model, "config", None), "model_type", None))


def modality(family: str | None) -> str:
    """`text` or `image` (`_modality` of the family's config class); `text` for a model of no family."""
    return config_class(family)._modality if family is not None else "text"


def pretraining_class(family: str) -> type[PreTrainedModel]:
    """The family's pre-training head: the model class that sets `_training_objective`."""
    heads = [cls for cls in _check(family) if cls._training_objective is not None]
    if len(heads) != 1:
        raise ValueError(f"family {family!r} needs exactly one model class with a `_training_objective`")
    return heads[0]


def training_objective(family: str) -> str:
    """`mlm`, `clm` or `image-classification`: what the family's pre-training head learns."""
    return pretraining_class(family)._training_objective


def class_for_task(family: str | None, task: str) -> type[PreTrainedModel] | None:
    """The family's model class whose `_evaluation_task` is `task` (None when it has none)."""
    if family not in FAMILIES:
        return None
    return next((cls for cls in FAMILIES[family] if cls._evaluation_task == task), None)


def families_for_task(task: str) -> list[str]:
    """The families with a model class for the evaluation `task`."""
    return [family for family in FAMILIES if class_for_task(family, task) is not None]


def auto_classes(model_class: type[PreTrainedModel]) -> list[str]:
    """The names of the transformers Auto classes that load `model_class` (from its `auto_map`)."""
    return [auto for auto, target in model_class.auto_map.items() if target.endswith("." + model_class.__name__)]
