"""Retrofit a stock pretrained checkpoint with gated attention or clipped softmax, then distil.

For users without a pre-training budget (beyond the papers): the stock weights load into the
quantizable class, the new attention is switched on and a short distillation from the original
model on local text lets the model adapt (see `DistillationTrainer` for the loss).

Gated attention starts at gate probability `pi_init` for every token; the attention output
projection is divided by `pi_init` so the retrofitted model computes exactly the original function
before the first step (the gates can then learn to close heads). Clipped softmax starts close to the
original (|gamma| is small).

    python -m hf_quantizable.retrofit PATH_OR_HUB_ID --output runs/minilm-gated --attn-impl gated \\
        --dataset ../shared/data/wikitext-2/valid.txt --max-steps 200
"""

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    PretrainedConfig,
    PreTrainedModel,
    TrainingArguments,
    default_data_collator,
)

from . import families
from .cli import DataArguments, OneLineErrorParser, one_line, positive_int
from .modeling.configuration_quantizable import ATTN_IMPLS, GATE_TYPES
from .training.data import load_text_datasets, load_tokenizer
from .training.presets import DataSpec
from .training.runner import (
    RECIPE_FILE,
    RunDirectoryError,
    check_output_dir,
    fixed_batches,
    remove_leftovers,
    save_final_model,
    write_json_atomic,
)
from .training.trainer import QuantizableTrainer

# Every `attn_impl`; `softmax` keeps the original attention: the control run (distillation with the outlier
# term only).
RETROFIT_IMPLS = ATTN_IMPLS
# Old flag names, accepted (with a deprecation line) for one release (see `hf_quantizable.cli`).
DEPRECATED_FLAGS = {"--dataset-path": "--dataset", "--seq-length": "--max-length"}
# Flags that only one attention implementation reads, with their defaults there.
ATTENTION_FLAGS = {
    "gated": {"gate_type": "linear", "pi_init": 0.5, "gate_learning_rate": 1e-3},
    "clipped_softmax": {"clip_gamma": -0.025},
}


def retrofit_families() -> list[str]:
    """The families that can be retrofitted: those whose classes name their `_retrofit_modules`."""
    return [f for f in families.names() if families.base_model_class(f)._retrofit_modules]


def _layer_modules(model: nn.Module, kind: str) -> list[nn.Module]:
    """The `kind` module (a key of the family's `_retrofit_modules`) of every layer of `model` (ours or stock)."""
    model_class = families.base_model_class(families.family_of_model(model))
    for path in model_class._layer_paths:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        return [layer.get_submodule(model_class._retrofit_modules[kind]) for layer in layers]
    raise ValueError(f"{type(model).__name__} has none of the layer lists {model_class._layer_paths}")


@contextlib.contextmanager
def capture_ffn_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the FFN output (`_retrofit_modules["ffn_output"]`: BERT's `output.dense`) of every layer
    during the forwards inside."""
    outputs: list[torch.Tensor] = []
    modules = _layer_modules(model, "ffn_output")
    handles = [module.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for module in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def load_stock_config(path: str) -> PretrainedConfig:
    """The config of the stock checkpoint `path`; ValueError naming it when it is missing or of a family
    that cannot be retrofitted (see `retrofit_families`: BERT)."""
    try:
        stock = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load the model {path!r}: {one_line(err)} (give a folder holding config.json, or a Hub id "
            "with network access)"
        ) from None
    if families.family_of(stock.model_type) not in retrofit_families():
        supported = retrofit_families()
        raise ValueError(
            f"retrofitting supports {' / '.join(f.upper() for f in supported)} checkpoints (model_type "
            f"{', '.join(supported)}), got {stock.model_type!r}"
        )
    return stock


def retrofit_config(path: str, attn_impl: str, **attention: Any) -> PretrainedConfig:
    """The stock config of `path` as its family's quantizable config (`QuantizableBertConfig`) with
    `attn_impl` and its fields (validated)."""
    if attn_impl not in RETROFIT_IMPLS:
        raise ValueError(f"`attn_impl` must be one of {RETROFIT_IMPLS}, got {attn_impl!r}")
    stock = load_stock_config(path)
    fields = {k: v for k, v in stock.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    config_class = families.config_class(families.family_of(stock.model_type))
    return config_class(**{**fields, "attn_impl": attn_impl, **attention})


def retrofit_model(path: str, attn_impl: str, **attention: Any) -> PreTrainedModel:
    """Load the stock checkpoint at `path` into its family's quantizable base model (BERT:
    `QuantizableBertModel`) with `attn_impl`.

    Extra keyword arguments are attention config fields (`gate_type`, `pi_init`, `clip_gamma`, ...).
    """
    config = retrofit_config(path, attn_impl, **attention)
    model_class = families.base_model_class(families.family_of(config.model_type))
    try:
        model = model_class.from_pretrained(path, config=config)
    except OSError as err:
        raise ValueError(f"could not load the weights of {path!r}: {one_line(err)}") from None
    if attn_impl == "gated":  # the gates start at pi_init: the output projection makes up for it
        with torch.no_grad():
            for projection in _layer_modules(model, "attention_output"):
                projection.weight.div_(config.pi_init)
    return model


class DistillationTrainer(QuantizableTrainer):
    """Distils the original model into the retrofitted one while pushing the outliers down.

    loss = MSE(student, teacher last hidden state) + (1 - cos(mean-pooled embeddings))
           + outlier_weight * mean over layers of (student / teacher mean-per-sequence max |FFN output|)

    The last term rewards a lower max inf norm of the FFN outputs (where BERT's outliers live); with
    gates the model can keep its function while dropping them, which plain distillation would copy.

    Args:
        teacher: the original model.
        outlier_weight: weight of the inf-norm term (0 = plain distillation).
        gate_learning_rate: learning rate of the freshly initialised gate parameters (None: the
            common one).
    """

    def __init__(
        self, *args, teacher: nn.Module, outlier_weight: float = 0.1, gate_learning_rate: float | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.outlier_weight = outlier_weight
        self.gate_learning_rate = gate_learning_rate

    def distillation_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with capture_ffn_outputs(self.teacher) as teacher_ffn, torch.no_grad():
            target = self.teacher(**inputs).last_hidden_state
        with capture_ffn_outputs(model) as student_ffn:
            hidden = model(**inputs).last_hidden_state
        mask = inputs.get("attention_mask", torch.ones(hidden.shape[:2], device=hidden.device))[..., None].to(
            hidden.dtype
        )
        pooled = [(h * mask).sum(1) / mask.sum(1) for h in (hidden, target)]
        mse = F.mse_loss(hidden, target)
        cosine = 1 - F.cosine_similarity(*pooled, dim=-1).mean()
        ratios = [
            s.abs().amax(dim=(1, 2)).mean() / t.abs().amax(dim=(1, 2)).mean() for s, t in zip(student_ffn, teacher_ffn)
        ]
        inf_ratio = torch.stack(ratios).mean()
        loss = mse + cosine + self.outlier_weight * inf_ratio
        return loss, {"mse": mse.item(), "cosine_distance": cosine.item(), "ffn_inf_norm_ratio": inf_ratio.item()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, _ = self.distillation_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.gate_learning_rate is None:
            return optimizer
        gates = {id(p) for n, p in self.model.named_parameters() if ".gate." in n}
        groups = []
        for group in optimizer.param_groups:
            for is_gate in (True, False):
                params = [p for p in group["params"] if (id(p) in gates) == is_gate]
                if params:
                    lr = self.gate_learning_rate if is_gate else group["lr"]
                    groups.append({**group, "params": params, "lr": lr, "initial_lr": lr})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer


def _number(text: str, minimum: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(f"must be a {'positive' if strict else 'non-negative'} number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _number(text, 0.0, strict=True)


def non_negative_float(text: str) -> float:
    return _number(text, 0.0, strict=False)


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="python -m hf_quantizable.retrofit", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="stock BERT checkpoint (folder or Hub id)")
    parser.add_argument("--output", required=True, help="folder for the retrofitted, Hub-ready model")
    parser.add_argument(
        "--attn-impl",
        default="gated",
        choices=RETROFIT_IMPLS,
        help="attention of the retrofitted model (default gated; softmax: the original one, a control run)",
    )
    parser.add_argument("--gate-type", choices=GATE_TYPES, help="gate of gated attention (default linear)")
    parser.add_argument("--pi-init", type=float, help="initial gate probability in (0, 1) (gated; default 0.5)")
    parser.add_argument("--clip-gamma", type=float, help="clipped softmax gamma <= 0 (default -0.025)")
    parser.add_dataclass_arguments(
        DataArguments,
        ("dataset", "max_length", "batch_size"),
        required=("dataset",),
        defaults={"max_length": 128, "batch_size": 16},
        types={"max_length": positive_int, "batch_size": positive_int},
        helps={
            "dataset": "local text file / folder used for distillation",
            "max_length": "tokens per distillation sequence",
            "batch_size": "distillation batch size",
        },
    )
    parser.add_argument("--max-steps", type=positive_int, default=200, help="distillation steps (default 200)")
    parser.add_argument("--learning-rate", type=positive_float, default=5e-5, help="learning rate (default 5e-5)")
    parser.add_argument(
        "--gate-learning-rate", type=positive_float, help="learning rate of the new gate parameters (default 1e-3)"
    )
    parser.add_argument(
        "--outlier-weight", type=non_negative_float, default=0.1, help="weight of the FFN inf-norm term (0 = off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and the new parameters (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bars")
    for old, new in DEPRECATED_FLAGS.items():
        parser.add_deprecated_alias(old, new)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def resolve_attention_flags(args: argparse.Namespace) -> None:
    """Refuse attention flags `--attn-impl` does not read; fill in the defaults of those it does."""
    used = ATTENTION_FLAGS.get(args.attn_impl, {})
    for flags in ATTENTION_FLAGS.values():
        for name in flags:
            if getattr(args, name) is not None and name not in used:
                flag = "--" + name.replace("_", "-")
                owner = next(impl for impl, names in ATTENTION_FLAGS.items() if name in names)
                raise ValueError(f"{flag} is only used with --attn-impl {owner} (this run: {args.attn_impl})")
    for name, default in used.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def attention_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.attn_impl == "gated":
        return {"gate_type": args.gate_type, "pi_init": args.pi_init}
    if args.attn_impl == "clipped_softmax":
        return {"clip_gamma": args.clip_gamma}
    return {}


def retrofit_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The run's identity, written to `training_recipe.json` (a rerun into the same folder must match it)."""
    return {
        "name": "retrofit",
        "model": {"source": args.model, "attn_impl": args.attn_impl, **attention_fields(args)},
        "training": {
            k: getattr(args, k)
            for k in ("max_steps", "batch_size", "learning_rate", "gate_learning_rate", "outlier_weight", "seed")
        },
        "data": {"dataset": args.dataset, "seq_length": args.max_length},
        "tracking": {},
    }


def check_inputs(args: argparse.Namespace, recipe: dict[str, Any]) -> PretrainedConfig:
    """Check the flags, the output folder, the model and the dataset path; return the retrofitted config."""
    check_output_dir(Path(args.output), recipe, resume=False)
    try:
        config = retrofit_config(args.model, args.attn_impl, **attention_fields(args))
    except (ValueError, TypeError) as err:
        raise ValueError(one_line(err)) from None
    if args.max_length > config.max_position_embeddings:
        raise ValueError(
            f"--max-length {args.max_length} exceeds the model's max_position_embeddings={config.max_position_embeddings}"
        )
    if not Path(args.dataset).expanduser().exists():
        raise ValueError(f"--dataset {args.dataset} does not exist")
    return config


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(Path(args.output) / "checkpoints"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 10),
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=args.no_progress,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.accelerator.is_available(),
        remove_unused_columns=False,
    )


def retrofit(args: argparse.Namespace) -> dict[str, Any]:
    """Check every flag and input, load data and models, then write the recipe, distil and save.

    Nothing is written before the checks pass and the data and both models are loaded.
    """
    resolve_attention_flags(args)
    output = Path(args.output)
    recipe = retrofit_recipe(args)
    config = check_inputs(args, recipe)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    tokenizer.model_max_length = min(tokenizer.model_max_length, config.max_position_embeddings)
    data = load_text_datasets(
        DataSpec(dataset=args.dataset, seq_length=args.max_length),
        families.family_of(config.model_type),
        seed=args.seed,
        tokenizer=tokenizer,
    )
    student = retrofit_model(args.model, args.attn_impl, **attention_fields(args))
    try:
        teacher = AutoModel.from_pretrained(args.model)
    except OSError as err:
        raise ValueError(f"could not load the weights of {args.model!r}: {one_line(err)}") from None
    training_args = training_arguments(args)
    eval_batches = fixed_batches(data.validation, default_data_collator, args.batch_size, 4, keep_labels=False)
    output.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output)
    write_json_atomic(output / RECIPE_FILE, recipe)
    trainer = DistillationTrainer(
        model=student,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        processing_class=tokenizer,
        teacher=teacher,
        outlier_weight=args.outlier_weight,
        gate_learning_rate=args.gate_learning_rate if args.attn_impl == "gated" else None,
    )

    def evaluate() -> dict[str, float]:
        student.eval()
        with torch.no_grad():
            parts = [
                trainer.distillation_loss(student, {k: v.to(training_args.device) for k, v in b.items()})[1]
                for b in eval_batches
            ]
        return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}

    before = evaluate()
    result = trainer.train()
    after = evaluate()
    metrics = {
        **{f"before/{k}": v for k, v in before.items()},
        **{f"after/{k}": v for k, v in after.items()},
        **result.metrics,
    }
    save_final(trainer, output, metrics)
    return metrics


def save_final(trainer: QuantizableTrainer, output: Path, metrics: dict[str, Any]) -> None:
    """Write the Hub-ready model and `retrofit_results.json` into `output` through a temporary folder."""
    save_final_model(trainer, output, {"retrofit_results.json": metrics})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = retrofit(args)
    except (ValueError, RunDirectoryError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or a folder made read-only while distilling
        print(f"error: retrofit stopped: {one_line(err)}; fix the cause and rerun", file=sys.stderr)
        return 1
    print(json.dumps({"output": args.output, **metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
