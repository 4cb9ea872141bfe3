"""Outlier tracking during training: gate probabilities, outlier statistics, optional W8A8 check."""

import contextlib
import copy
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..modeling.attention import AttentionGate

logger = logging.getLogger(__name__)

TRACKING_FILE = "outlier_tracking.jsonl"


@contextlib.contextmanager
def record_gates(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect the output of every `AttentionGate` (probabilities `[B, H, T, 1]`) while active.

    Yields a dict `module name -> list of per-head mean probabilities [H]`, one entry per forward.
    """
    recorded: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, AttentionGate):

            def hook(_module, _inputs, output, name=name):
                recorded.setdefault(name, []).append(output.detach().float().mean(dim=(0, 2, 3)).cpu())

            handles.append(module.register_forward_hook(hook))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def gate_statistics(recorded: dict[str, list[torch.Tensor]], threshold: float = 0.1) -> dict[str, float | list]:
    """Mean, min and max over heads of each head's average gate probability, and the share of
    heads whose average is below `threshold` (heads that learned to do nothing)."""
    if not recorded:
        return {}
    per_layer = [torch.stack(outputs).mean(dim=0) for outputs in recorded.values()]  # [H] per gated layer
    heads = torch.cat(per_layer)
    return {
        "gates/mean": float(heads.mean()),
        "gates/min": float(heads.min()),
        "gates/max": float(heads.max()),
        f"gates/frac_below_{threshold}": float((heads < threshold).float().mean()),
        "gates/per_layer": [[round(float(p), 4) for p in layer] for layer in per_layer],
    }


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def probe_quality(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean loss over `batches` (inputs with labels), its exponential for language models, and the
    top-1 accuracy for classifiers (1-D labels)."""
    device = next(model.parameters()).device
    losses, correct, total = [], 0, 0
    for batch in batches:
        batch = _to_device(batch, device)
        outputs = model(**batch)
        losses.append(float(outputs.loss))
        if batch["labels"].dim() == 1:
            correct += int((outputs.logits.argmax(-1) == batch["labels"]).sum())
            total += batch["labels"].numel()
    loss = sum(losses) / len(losses)
    if total:
        return {"loss": loss, "accuracy": correct / total}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class OutlierTrackingCallback(TrainerCallback):
    """Every `every_n_steps` optimizer steps, on the main process: the probe loss, the gate
    probabilities (forward hooks on `AttentionGate`), the outlier statistics of
    `hf_quantizable.evaluation.compute_outlier_stats` and, every `w8a8_every_n_steps`, the probe
    quality of a simulated-W8A8 deep copy (`hf_quantizable.quantization.quantize_model`).

    Each record goes to `state.log_history` (so it is saved in `trainer_state.json` with every
    checkpoint), to `log_file` (JSON lines; default `<args.output_dir>/outlier_tracking.jsonl`) and
    to `self.history`.

    Args:
        probe_batches: fixed evaluation batches with labels (MLM batches carry their fixed masking).
        every_n_steps: tracking interval in optimizer steps.
        w8a8_every_n_steps: W8A8 interval (0 = off); needs `calibration_batches`.
        calibration_batches: training batches (without labels) that calibrate the activation ranges.
    """

    def __init__(
        self,
        probe_batches: list[dict[str, torch.Tensor]],
        every_n_steps: int,
        w8a8_every_n_steps: int = 0,
        calibration_batches: list[dict[str, torch.Tensor]] | None = None,
        log_file: str | Path | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be >= 1, got {every_n_steps}")
        if w8a8_every_n_steps and not calibration_batches:
            raise ValueError("`w8a8_every_n_steps` needs `calibration_batches`")
        self.probe_batches = probe_batches
        self.every_n_steps = every_n_steps
        self.w8a8_every_n_steps = w8a8_every_n_steps
        self.calibration_batches = calibration_batches or []
        self.log_file = Path(log_file) if log_file else None
        self.history: list[dict] = []

    def track(self, model: nn.Module, step: int, with_w8a8: bool) -> dict:
        """Compute one record for `model` at `step` (the model is left in its previous mode)."""
        from ..evaluation import compute_outlier_stats

        was_training = model.training
        model.eval()
        try:
            with record_gates(model) as gates:
                quality = probe_quality(model, self.probe_batches)
            inputs = [{k: v for k, v in b.items() if k != "labels"} for b in self.probe_batches]
            with torch.no_grad():
                outliers = compute_outlier_stats(model, inputs)
            record = {"step": step, **{f"probe/{k}": v for k, v in quality.items()}}
            keys = ("max_inf_norm", "avg_kurtosis", "max_kurtosis", "avg_rms_kurtosis", "max_rms_kurtosis")
            record.update({f"outliers/{k}": outliers[k] for k in keys})
            record["outliers/max_location"] = outliers["max_location"]
            record.update(gate_statistics(gates))
            if with_w8a8:
                record.update({f"w8a8/{k}": v for k, v in self.w8a8_quality(model).items()})
        finally:
            model.train(was_training)
        return record

    def w8a8_quality(self, model: nn.Module) -> dict[str, float]:
        """Probe quality of a simulated-W8A8 copy in the papers' setting (the model is untouched)."""
        from ..quantization import W8A8Config, quantize_model

        quantized = quantize_model(copy.deepcopy(model), W8A8Config(), self.calibration_batches)
        quantized.eval()
        return probe_quality(quantized, self.probe_batches)

    def _log(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        if not state.is_world_process_zero or (self.history and self.history[-1]["step"] == state.global_step):
            return
        w8a8 = bool(self.w8a8_every_n_steps) and state.global_step % self.w8a8_every_n_steps == 0
        record = self.track(model, state.global_step, with_w8a8=w8a8)
        self.history.append(record)
        state.log_history.append(record)
        path = self.log_file or Path(args.output_dir) / TRACKING_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
        logger.info("step %d outlier tracking: %s", state.global_step, scalars)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._log(args, state, model)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self._log(args, state, model)
