"""Trainer subclasses for pre-training the quantizable models with the papers' recipes.

What they add to `transformers.Trainer`: the OPT recipe's weight decay on LayerNorm gamma
(`wd_ln_gamma`), the task's collator and metrics, and perplexity next to the evaluation loss.
AdamW betas and gradient clipping come from `TrainingArguments` (`adam_beta1/2`, `max_grad_norm`),
set per recipe by the presets.

Checkpoints are written atomically: into a hidden `.checkpoint-N.incomplete` folder that is renamed
to `checkpoint-N` once every file is on disk, with a manifest of the file sizes. A run killed while
saving (or one that runs out of disk) leaves no half-written `checkpoint-N`, and `--resume` uses the
newest checkpoint whose files match their manifest (`latest_complete_checkpoint`).
"""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
from torch import nn
from transformers import DataCollatorForLanguageModeling, EvalPrediction, Trainer, default_data_collator
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..paths import apply_umask, write_text_atomic

MANIFEST_FILE = "checkpoint_complete.json"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def staging_dir(run_dir: Path, name: str) -> Path:
    """The hidden folder a checkpoint `name` is written into before it is renamed into place."""
    return run_dir / f".{name}.incomplete"


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a missing manifest, a missing or truncated file), or None."""
    manifest = checkpoint / MANIFEST_FILE
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return f"{manifest.name} is missing (the save was interrupted, or an older version wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest} is unreadable ({err})"
    for name, size in sizes.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is truncated or changed ({path.stat().st_size} bytes, {size} written)"
    return None


def latest_complete_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete `checkpoint-N` under `root`, and one line per newer checkpoint skipped."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    skipped = []
    for _, checkpoint in sorted(found, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append(f"{checkpoint.name}: {problem}")
    return None, skipped


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

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_checkpoint_staging", None)
        return str(staging) if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Save into a staging folder, then (main process, after every process wrote) rename it into place."""
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_dir(run_dir, name)
        # Trainer writes (and rotates, a no-op there) inside `staging`; rotation of the real folder
        # runs below, once the new checkpoint is complete.
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                self._publish_checkpoint(staging / name, run_dir / name)
                staging.rmdir()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._checkpoint_staging = None
        if self.args.should_save:
            rotate_checkpoints(
                str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )

    def _publish_checkpoint(self, staged: Path, final: Path) -> None:
        """Point the state at `final`, write the manifest, fix permissions and rename `staged` to `final`."""
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent != final.parent:
            self.state.best_model_checkpoint = str(final.parent / Path(self.state.best_model_checkpoint).name)
            self.state.save_to_json(str(staged / "trainer_state.json"))
        sizes = {p.name: p.stat().st_size for p in sorted(staged.iterdir()) if p.is_file()}
        write_text_atomic(staged / MANIFEST_FILE, json.dumps({"files": sizes}, indent=2) + "\n")
        apply_umask(staged)
        if final.exists():  # an unverified checkpoint of this run's earlier, interrupted attempt
            shutil.rmtree(final)
        staged.replace(final)

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
