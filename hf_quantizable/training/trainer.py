"""Trainer subclasses for pre-training the quantizable models with the papers' recipes.

What they add to `transformers.Trainer`: the OPT recipe's weight decay on LayerNorm gamma
(`wd_ln_gamma`), the task's collator and metrics, and perplexity next to the evaluation loss.
AdamW betas and gradient clipping come from `TrainingArguments` (`adam_beta1/2`, `max_grad_norm`),
set per recipe by the presets.

Checkpoints are written atomically: into a hidden `.checkpoint-N.incomplete` folder that is renamed
to `checkpoint-N` once every file is on disk, with a manifest of the file sizes. A run killed while
saving (or one that runs out of disk) leaves no half-written `checkpoint-N`, and `--resume` uses the
newest checkpoint whose files match their manifest (`latest_complete_checkpoint`; a checkpoint saved
in place by an earlier version counts as complete when its last file, `trainer_state.json`, parses).
"""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DataCollatorForLanguageModeling, EvalPrediction, Trainer, default_data_collator
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..paths import apply_umask, write_text_atomic

MANIFEST_FILE = "checkpoint_complete.json"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def staging_dir(run_dir: Path, name: str) -> Path:
    """The hidden folder a checkpoint `name` is written into before it is renamed into place."""
    return run_dir / f".{name}.incomplete"


def _legacy_checkpoint_problem(checkpoint: Path) -> str | None:
    """A checkpoint written in place (before manifests): complete once `trainer_state.json`, saved last, parses."""
    state = checkpoint / TRAINER_STATE_NAME
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        return f"{state} is missing (the save was interrupted)"
    except (OSError, ValueError) as err:
        return f"{state} is unreadable ({err})"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a missing or truncated file), or None when it is complete."""
    manifest = checkpoint / MANIFEST_FILE
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return _legacy_checkpoint_problem(checkpoint)
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


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` on the weight matrices of the linear layers (LM head excepted), AdamW on every
    other parameter (embeddings, LayerNorms, biases, gates); both step together (Park et al. 2025).

    Muon's `match_rms_adamw` learning-rate adjustment lets both share the Trainer's learning rate
    and schedule. The state dict holds one entry per inner optimizer.
    """

    def __init__(self, model: nn.Module, decay_names: set[str], args) -> None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        excluded = {id(head.weight)} if head is not None else set()
        matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - excluded
        muon, decay, rest = [], [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (muon if id(param) in matrices else decay if name in decay_names else rest).append(param)
        self.optimizers = [
            torch.optim.Muon(
                muon, lr=args.learning_rate, weight_decay=args.weight_decay, adjust_lr_fn="match_rms_adamw"
            ),
            torch.optim.AdamW(
                [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                lr=args.learning_rate,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
            ),
        ]
        super().__init__([p for group in (muon, decay, rest) for p in group], {"lr": args.learning_rate})
        self._share_groups()

    def _share_groups(self) -> None:
        self.param_groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)
        self._share_groups()


class QuantizableTrainer(Trainer):
    """Trainer with optional weight decay on LayerNorm weights and a choice of optimizer.

    Args:
        wd_ln_gamma: decay LayerNorm weights (gamma) too (Bondarenko et al.'s OPT recipe); None reads
            `model.config.wd_ln_gamma` (False when the config has no such field). LayerNorm biases
            stay without decay.
        optimizer_name: `adamw` (the Trainer's `optim`) or `muon` ([`MuonWithAdamW`]).
    """

    def __init__(self, *args, wd_ln_gamma: bool | None = None, optimizer_name: str = "adamw", **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer_name = optimizer_name
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

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw" or self.optimizer is not None:
            return super().create_optimizer(model)
        if self.optimizer_name != "muon":
            raise ValueError(f"unknown optimizer {self.optimizer_name!r}; allowed: adamw, muon")
        opt_model = self.model if model is None else model
        self.optimizer = MuonWithAdamW(opt_model, set(self.get_decay_parameter_names(opt_model)), self.args)
        return self.optimizer

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
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
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
    """Masked-LM pre-training (`_training_objective = "mlm"`, QuantizableBert): dynamic masking with
    `DataCollatorForLanguageModeling`."""

    reports_perplexity = True

    def __init__(self, *args, mlm_probability: float = 0.15, **kwargs):
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = self.build_collator(kwargs["processing_class"], mlm_probability)
        super().__init__(*args, **kwargs)

    @staticmethod
    def build_collator(processing_class, mlm_probability: float = 0.15):
        return DataCollatorForLanguageModeling(processing_class, mlm=True, mlm_probability=mlm_probability)


class CausalLMTrainer(QuantizableTrainer):
    """Causal-LM pre-training (`_training_objective = "clm"`, QuantizableOPT) on packed blocks (labels =
    inputs, shifted in the model)."""

    reports_perplexity = True

    def __init__(self, *args, **kwargs):
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = self.build_collator(kwargs["processing_class"])
        super().__init__(*args, **kwargs)

    @staticmethod
    def build_collator(processing_class, mlm_probability: float | None = None):
        """The collator of this objective (`mlm_probability` is not read: nothing is masked)."""
        return DataCollatorForLanguageModeling(processing_class, mlm=False)


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float(np.mean(np.argmax(prediction.predictions, axis=-1) == prediction.label_ids))}


class ImageClassificationTrainer(QuantizableTrainer):
    """Image-classification pre-training (`_training_objective = "image-classification"`, QuantizableViT)
    reporting top-1 accuracy."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", accuracy)
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = self.build_collator(kwargs.get("processing_class"))
        super().__init__(*args, **kwargs)

    @staticmethod
    def build_collator(processing_class=None, mlm_probability: float | None = None):
        """The collator of this objective (images arrive as tensors: they are stacked)."""
        return default_data_collator


# pre-training objective (a pre-training head's `_training_objective`) -> its Trainer
TRAINERS = {"mlm": MaskedLMTrainer, "clm": CausalLMTrainer, "image-classification": ImageClassificationTrainer}
