"""lm-eval model `hf-quantizable`: our causal LMs in FP, simulated W8A8 or as real INT8 checkpoints.

Importing this module registers the name with lm-eval::

    import lm_eval
    import hf_quantizable.evaluation.lm_eval_model  # noqa: F401  (registers "hf-quantizable")
    from hf_quantizable.paths import LM_EVAL_TASKS_DIR
    from lm_eval.tasks import TaskManager

    lm_eval.simple_evaluate(
        model="hf-quantizable",
        model_args="pretrained=runs/opt-gated,w8a8=True",  # or pretrained=runs/opt-gated-w8a8 (INT8)
        tasks=["wikitext2_local"],
        task_manager=TaskManager(include_path=str(LM_EVAL_TASKS_DIR)),
    )

or from the shell: `python -m hf_quantizable.evaluation.lm_eval run --model hf-quantizable ...` (the
lm-eval CLI with this model registered).
"""

from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..paths import shared_data_dir
from .harness import load_config
from .quality import clm_batches
from .results import ResultRecord


@register_model("hf-quantizable")
class QuantizableLM(HFLM):
    """`HFLM` for hf_quantizable causal LMs (quantizable OPT, stock OPT, INT8 checkpoints).

    Args:
        pretrained: a model folder / Hub id (an INT8 checkpoint loads as INT8), or a model object.
        w8a8: evaluate the simulated W8A8 version of an FP model, calibrated on `calibration_data`.
        calibration_data: text file, one example per line (default: WikiText-2 validation of the
            offline data folder).
        num_calibration_batches, calibration_length, calibration_batch_size: calibration set size.
        trust_remote_code: let a folder or repo run its own Python code; our model types (and stock
            OPT) never need it.
        Other arguments go to `HFLM` (`batch_size`, `max_length`, `device`, ...).
    """

    def __init__(
        self,
        pretrained: str | PreTrainedModel,
        tokenizer=None,
        w8a8: bool = False,
        calibration_data: str | None = None,
        num_calibration_batches: int = 16,
        calibration_length: int = 512,
        calibration_batch_size: int = 4,
        device: str | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ):
        import hf_quantizable  # noqa: F401  (registers the Auto classes)

        if isinstance(pretrained, (str, Path)):
            load_config(str(pretrained), "pretrained", trust_remote_code)  # one-line errors, remote code consent
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(pretrained))
            pretrained = AutoModelForCausalLM.from_pretrained(str(pretrained), trust_remote_code=trust_remote_code)
        elif isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if tokenizer is None:
            raise ValueError("`tokenizer` is required when `pretrained` is a model object")
        if w8a8:
            if getattr(pretrained.config, "w8a8_config", None):
                raise ValueError("`w8a8=True` needs an FP model: this checkpoint is already INT8")
            pretrained = self._simulate_w8a8(
                pretrained,
                tokenizer,
                calibration_data,
                num_calibration_batches,
                calibration_length,
                calibration_batch_size,
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained.eval(), tokenizer=tokenizer, backend="causal", device=device, **kwargs)

    @staticmethod
    def _simulate_w8a8(model, tokenizer, calibration_data, num_batches, length, batch_size):
        from ..quantization import W8A8Config, quantize_model

        path = Path(calibration_data) if calibration_data else shared_data_dir() / "wikitext-2" / "valid.txt"
        if not path.is_file():
            raise FileNotFoundError(f"calibration text file {str(path)!r} does not exist")
        length = min(length, model.config.max_position_embeddings)
        lines = path.read_text(encoding="utf-8").splitlines()
        batches = clm_batches(tokenizer, lines, length, batch_size, num_batches * batch_size)
        calibration = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
        return quantize_model(model, W8A8Config(num_calibration_batches=num_batches), calibration)


def lm_eval_records(
    output: dict, model: str, attn_impl: str, precision: str, model_fingerprint: str | None = None
) -> list[ResultRecord]:
    """Result records (task `lm-eval`) from the output of `lm_eval.simple_evaluate`.

    `model_fingerprint` (`hf_quantizable.provenance.model_fingerprint` of the FP model folder) lets
    `push` put the records on that model's card.
    """
    records = []
    for task, metrics in output["results"].items():
        config = output["configs"].get(task, {})
        split = config.get("test_split") or config.get("validation_split") or "unknown"
        n = int(output["n-samples"][task]["effective"])
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            # metrics are "name,filter"; "name", "alias" and "sample_len" (the sample count, in `n`) are not
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            records.append(
                ResultRecord(
                    model=model,
                    model_fingerprint=model_fingerprint,
                    attn_impl=attn_impl,
                    precision=precision,
                    task="lm-eval",
                    dataset=task,
                    split=split,
                    metric=metric,
                    value=value,
                    n=n,
                    extra={"filter": filter_name, "limit": output["config"].get("limit")},
                )
            )
    return records
