"""Trainer subclasses for pre-training the quantizable models with the papers' recipes.

What they add to `transformers.Trainer`: the OPT recipe's weight decay on LayerNorm gamma
(`wd_ln_gamma`), the task's collator and metrics, and perplexity next to the evaluation loss.
AdamW betas and gradient clipping come from `TrainingArguments` (`adam_beta1/2`, `max_grad_norm`),
set per recipe by the presets.
"""

import math

import numpy as np
from torch import nn
from transformers import DataCollatorForLanguageModeling, EvalPrediction, Trainer, default_data_collator


class QuantizableTrainer(Trainer):
    """Trainer with optional weight decay on LayerNorm weights.

    Args:
        wd_ln_gamma: decay LayerNorm weights (gamma) too (Bondarenko et al.'s OPT recipe); None reads
            `model.config.wd_ln_gamma` (False when the config has no such field). LayerNorm biases
            stay without decay.
    """

    def __init__(self, *args, wd_ln_gamma: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # The quantizable models return a mean loss and ignore `num_items_in_batch` although their
        # forward takes **kwargs: without this, Trainer would skip the division by the gradient
        # accumulation steps and multiply the loss by the number of processes under DDP.
        self.model_accepts_loss_kwargs = False
        if wd_ln_gamma is None:
            wd_ln_gamma = bool(getattr(self.model.config, "wd_ln_gamma", False))
        self.wd_ln_gamma = wd_ln_gamma

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if not self.wd_ln_gamma:
            return names
        layernorm_weights = [
            f"{module_name}.weight" if module_name else "weight"
            for module_name, module in model.named_modules()
            if isinstance(module, nn.LayerNorm) and module.weight is not None
        ]
        return names + [n for n in layernorm_weights if n not in names]

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if self.reports_perplexity and f"{prefix}_loss" in metrics:
            metrics[f"{prefix}_perplexity"] = math.exp(min(metrics[f"{prefix}_loss"], 50.0))
        return metrics

    reports_perplexity = False


class MaskedLMTrainer(QuantizableTrainer):
    """Masked-LM pre-training (QuantizableBert): dynamic masking with `DataCollatorForLanguageModeling`."""

    reports_perplexity = True

    def __init__(self, *args, mlm_probability: float = 0.15, **kwargs):
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = DataCollatorForLanguageModeling(
                kwargs["processing_class"], mlm=True, mlm_probability=mlm_probability
            )
        super().__init__(*args, **kwargs)


class CausalLMTrainer(QuantizableTrainer):
    """Causal-LM pre-training (QuantizableOPT) on packed blocks (labels = inputs, shifted in the model)."""

    reports_perplexity = True

    def __init__(self, *args, **kwargs):
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = DataCollatorForLanguageModeling(kwargs["processing_class"], mlm=False)
        super().__init__(*args, **kwargs)


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float(np.mean(np.argmax(prediction.predictions, axis=-1) == prediction.label_ids))}


class ImageClassificationTrainer(QuantizableTrainer):
    """Image-classification pre-training (QuantizableViT) reporting top-1 accuracy."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", accuracy)
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = default_data_collator
        super().__init__(*args, **kwargs)


TRAINERS = {"bert": MaskedLMTrainer, "opt": CausalLMTrainer, "vit": ImageClassificationTrainer}
