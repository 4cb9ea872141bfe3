"""`W8A8Config`: how a model is quantized (the papers' W8A8 setting by default)."""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

WEIGHT_ESTIMATORS = ("minmax", "mse")
ACTIVATION_ESTIMATORS = ("running_minmax", "avg_minmax", "percentile", "mse")
# Which quantization points get a quantizer: every one (Bondarenko et al.), only the inputs of the
# matrix products (Wei et al.'s Outlier Suppression), or none (weights only).
ACTIVATION_NODES = ("all", "matmul_inputs", "none")
# What is fake-quantized while activation ranges are calibrated (see `W8A8Config.calibration_quantized`).
CALIBRATION_QUANTIZED = ("none", "weights", "all")
# Where gated attention's context is quantized (see `W8A8Config.gated_context`).
GATED_CONTEXT = ("after_gate", "before_gate")
MIN_BITS, MAX_BITS = 2, 8
# Outlier channels per linear input: their exact float product needs k * 255 * 127 < 2^24.
MAX_OUTLIER_CHANNELS = 512

# Modules kept in floating point by default: the task heads of BERT (MLM head `cls`, pooler,
# classifier), OPT (`lm_head`) and ViT (`classifier`). Gates are never quantized; LayerNorm weights
# and embedding tables only with `quantize_layernorm_weights` / `quantize_embeddings`.
DEFAULT_KEEP_FP = ("cls", "pooler", "classifier", "lm_head")


# Named settings (`W8A8Config.preset`): the fields each sets, checked against the official code.
PRESETS: dict[str, dict] = {
    # Bondarenko et al. 2023, official Qualcomm-AI-research/outlier-free-transformers:
    # `transformers_language/quant_configs.py` `get_quant_config` (symmetric per-tensor current
    # min-max weights, asymmetric per-tensor running min-max activations, 16 batches, quant_setup
    # "all"); `quantization/range_estimators.py` `RunningMinMaxEstimator` (momentum 0.9);
    # `validate_mlm.py` (`set_quant_state(weight_quant, act_quant)` before
    # `pass_data_for_range_estimation`: the quantizers are on while calibrating). The BERT node set
    # of `transformers_language/models/quantized_bert.py`: `QuantizedBertEmbeddings` quantizes the
    # three embedding tables as weights (`quantize_model(org_model.word_embeddings)` etc., i.e.
    # `quantization/autoquant_utils.py` `QuantEmbedding`: the weight quantizer, output not
    # re-quantized), the word + token-type partial sum (`sum_input_token_type_embd_act_quantizer`)
    # and the position sum (`sum_pos_embd_act_quantizer`); every LayerNorm outside the FP head
    # (`quantize_model(org_model.LayerNorm)` = `QuantLayerNorm`, a `QuantizationHijacker`: weight
    # through the 8-bit symmetric per-tensor weight quantizer, bias in FP, output quantized).
    "bondarenko2023-bert": {
        "weight_estimator": "minmax",
        "activation_estimator": "running_minmax",
        "momentum": 0.9,
        "num_calibration_batches": 16,
        "calibration_quantized": "all",
        "quantize_embeddings": True,
        "quantize_layernorm_weights": True,
    },
    # Bondarenko et al. 2023 OPT: `validate_clm.py` main (weights `RangeEstimators.MSE` with
    # `OptMethod.grid`; activations `running_minmax` with `--percentile 99.999`, i.e. an EMA of
    # per-batch percentiles in `RunningMinMaxEstimator`; `--est_num_batches 4` in
    # `scripts/opt_125m_vanilla.sh`; quant_setup `fp32_head`). The node set of
    # `transformers_language/models/quantized_opt.py`: `QuantizedOPTDecoder` quantizes `embed_tokens`
    # and the learned positional table (`QuantizedOPTLearnedPositionalEmbedding`) as weights, every
    # LayerNorm (`QuantLayerNorm`) and the embedding sum; `QuantizedOPTAttentionWithExtras` quantizes
    # the context (`context_act_quantizer`) before the gate multiplies it.
    "bondarenko2023-opt": {
        "weight_estimator": "mse",
        "activation_estimator": "percentile",
        "percentile": 99.999,
        "momentum": 0.9,
        "num_calibration_batches": 4,
        "calibration_quantized": "all",
        "quantize_embeddings": True,
        "quantize_layernorm_weights": True,
        "gated_context": "before_gate",
    },
    # Bondarenko et al. 2023 ViT (paper, Appendix: the BERT setting, min-max weights and running
    # min-max activations); the official repository holds no ViT code.
    "bondarenko2023-vit": {
        "weight_estimator": "minmax",
        "activation_estimator": "running_minmax",
        "momentum": 0.9,
        "num_calibration_batches": 16,
        "calibration_quantized": "all",
    },
    # Wei et al. 2022 Outlier Suppression, official wimh966/outlier_suppression:
    # `exp/bert_ptq/twc_fine_gamma/*/config.yaml` (per-channel symmetric min-max weights, ch_axis 0;
    # asymmetric per-tensor `AvgPruneMinMaxObserver` activations, `is_remove_padding`, `calibrate:
    # 256` samples = 8 batches of 32, `ln.delay` = gamma migration); `model/quant_bert.py` (quantized
    # nodes: Q, K, V, attention probabilities, context, LayerNorm outputs, FFN activation);
    # `solver/ptq_glue_quant.py` main (activation calibration with the weight quantizers off;
    # `learn_scale` default lr 1e-5, 3 epochs); `solver/token_wise_clipping.py` (`cac_step_iters`).
    "wei2022-os": {
        "weight_estimator": "minmax",
        "per_channel_weights": True,
        "activation_estimator": "avg_minmax",
        "activation_nodes": "matmul_inputs",
        "remove_padding": True,
        "calibration_quantized": "none",
        "num_calibration_batches": 8,
        "gamma_migration": True,
        "token_wise_clipping": True,
        "clipping_quantiles": None,
        "clipping_steps": 24,
        "clipping_lr": 1e-5,
    },
    # Liao & Monz 2024 (arXiv:2402.12102, Section 5 / Appendix A): every weight and activation but
    # the final layer, BERT running min-max (momentum 0.9) over 16 batches, OPT MSE weights and
    # 99.999% percentiles over 16 batches; their code (BaohaoLiao/improved_transformer_v3) reuses
    # the Bondarenko et al. quantization code: as bondarenko2023-bert, the embedding tables, the
    # partial sum and the LayerNorm weights are quantized ("including the word embeddings and the
    # normalization layers").
    "liao2024-bert": {
        "weight_estimator": "minmax",
        "activation_estimator": "running_minmax",
        "momentum": 0.9,
        "num_calibration_batches": 16,
        "calibration_quantized": "all",
        "quantize_embeddings": True,
        "quantize_layernorm_weights": True,
    },
    "liao2024-opt": {
        "weight_estimator": "mse",
        "activation_estimator": "percentile",
        "percentile": 99.999,
        "momentum": 0.9,
        "num_calibration_batches": 16,
        "calibration_quantized": "all",
        "quantize_embeddings": True,
        "quantize_layernorm_weights": True,
    },
    # This package's strongest setting: gamma migration, per-channel weights, per-channel grids for
    # the residual stream and 8 outlier channels of their own for every integer product's input.
    "hf-quantizable-best": {
        "per_channel_weights": True,
        "per_channel_residuals": True,
        "gamma_migration": True,
        "outlier_channels": 8,
    },
}
# Bit-width variants: `<preset>-6bit` is W6A6 (the Outlier Suppression paper's 6-bit setting, 30
# clipping ratios by `clipping_grid`), `<preset>-weights-only` keeps every activation in FP.
PRESET_VARIANTS = {"6bit": {"weight_bits": 6, "activation_bits": 6}, "weights-only": {"activation_nodes": "none"}}


def preset_names() -> list[str]:
    """Every name `W8A8Config.preset` accepts."""
    return [*PRESETS, *(f"{name}-{variant}" for name in PRESETS for variant in PRESET_VARIANTS)]


@dataclass
class W8A8Config:
    """Settings of the W8A8 quantizer.

    Args:
        weight_bits: weight bit width, in [2, 8].
        activation_bits: activation bit width, in [2, 8].
        weight_estimator: `minmax` (BERT, ViT in the paper) or `mse` (grid search, OPT in the paper).
        activation_estimator: `running_minmax` (exponential moving average of per-batch min/max),
            `avg_minmax` (per-batch min/max, averaged: Outlier Suppression's `AvgMinMaxObserver`),
            `percentile` (moving average, `momentum`, of per-batch percentiles: the official OPT
            setting) or `mse` (per-batch MSE-optimal range, averaged).
        activation_nodes: `all` (every quantization point: the papers' W8A8 setting), `matmul_inputs`
            (only what a matrix product reads: Q/K/V, attention probabilities, context, LayerNorm outputs
            feeding a linear layer, FFN activation; the Outlier Suppression node set) or `none`
            (weights only, activations in floating point).
        remove_padding: calibration statistics over the non-padding tokens only (`attention_mask`),
            as Outlier Suppression's `is_remove_padding`.
        calibration_quantized: what is fake-quantized during the calibration forward passes: `none`
            (a floating-point forward, Outlier Suppression), `weights` (the default) or `all` (weights
            and every activation with its running range, the official Bondarenko et al. code).
        momentum: momentum of `running_minmax` and `percentile`, in [0, 1).
        percentile: upper percentile of `percentile` (the lower one is 100 - percentile), in (50, 100].
        num_calibration_batches: batches used to estimate activation ranges (>= 1).
        per_channel_weights: one weight scale per output channel instead of per tensor.
        per_channel_residuals: one activation grid per hidden channel for the residual-stream points
            that no matrix product reads (residual sums and the outputs added into them; the
            per-embedding-group quantization of Bondarenko et al. 2021 with one group per channel).
            The inputs of the integer matrix products stay per tensor.
        outlier_channels: for every input of an integer matrix product, this many hidden channels
            (those with the widest calibrated ranges) get a second grid of their own: the
            per-embedding-group quantization of Bondarenko et al. (2021) with two groups. 0 (the
            default) keeps one grid per tensor; at most 512 (the exact integer product bound).
        keep_fp_modules: module names (any dotted component) kept in floating point.
        quantize_embeddings: quantize the embedding tables (every `nn.Embedding` outside
            `keep_fp_modules`: BERT's word, position and token-type tables, OPT's token and position tables) as
            weights: `weight_bits` symmetric, range from `weight_estimator`, per tensor (per row with
            `per_channel_weights`); the INT8 checkpoint stores int8 codes. In BERT also the word +
            token-type partial sum gets an activation quantizer. The official Bondarenko et al. BERT
            and OPT node sets (True in their presets and Liao & Monz's; default False).
        quantize_layernorm_weights: fake-quantize every LayerNorm weight (gamma) outside
            `keep_fp_modules`, `weight_bits` symmetric per tensor; biases stay FP (the official
            `QuantLayerNorm`; True in the same presets).
        gated_context: where gated attention's context is quantized: `after_gate` (the gated context,
            the output projection's input, so that product is an integer GEMM; the official BERT code,
            `QuantizedBertSelfAttentionWithExtras`) or `before_gate` (P.V before the gate; the official
            OPT code, `QuantizedOPTAttentionWithExtras`, whose output projection then reads the float
            gated context: a float product with int8 weights). Models without a gate ignore it.
        gamma_migration: Outlier Suppression gamma migration (exact in floating point).
        token_wise_clipping: Outlier Suppression token-wise clipping of activation ranges.
        clipping_quantiles: coarse grid of token-wise clipping, quantiles of the per-token extremes;
            None (default) is the official grid `1.0 - 0.01 * i`: 10 ratios at 8 bits, 30 at 6 bits
            (90 at 4 bits and below).
        clipping_steps: Adam steps of the fine stage (one calibration batch each, in turn; 0 skips it).
        clipping_lr: initial learning rate of the fine stage (cosine-annealed to 0 over the steps).
        preset_name: the `W8A8Config.preset` this configuration came from (None: set by hand).
    """

    weight_bits: int = field(default=8, metadata={"help": "weight bit width, in [2, 8]"})
    activation_bits: int = field(default=8, metadata={"help": "activation bit width, in [2, 8]"})
    weight_estimator: str = field(
        default="minmax", metadata={"help": "weight range estimator: minmax or mse (grid search)"}
    )
    activation_estimator: str = field(
        default="running_minmax",
        metadata={"help": "activation range estimator: running_minmax, avg_minmax, percentile or mse"},
    )
    activation_nodes: str = field(
        default="all",
        metadata={
            "help": "quantized activations: all (every quantization point), matmul_inputs (what a matrix product reads) or none (weights only)"
        },
    )
    remove_padding: bool = field(
        default=False, metadata={"help": "calibration statistics over the non-padding tokens only"}
    )
    calibration_quantized: str = field(
        default="weights", metadata={"help": "fake-quantized while calibrating: none, weights or all"}
    )
    momentum: float = field(
        default=0.9, metadata={"help": "momentum of the running_minmax and percentile estimators, in [0, 1)"}
    )
    percentile: float = field(
        default=99.99, metadata={"help": "upper percentile of the percentile estimator, in (50, 100]"}
    )
    num_calibration_batches: int = field(
        default=16, metadata={"help": "calibration batches used to estimate the activation ranges"}
    )
    per_channel_weights: bool = field(
        default=False, metadata={"help": "one weight scale per output channel instead of per tensor"}
    )
    per_channel_residuals: bool = field(
        default=False, metadata={"help": "per-channel grids for the residual-stream activations"}
    )
    outlier_channels: int = field(
        default=0, metadata={"help": "channels per matrix-product input on a second grid of their own, in [0, 512]"}
    )
    keep_fp_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_KEEP_FP),
        metadata={"help": "module names (any dotted component) kept in floating point"},
    )
    quantize_embeddings: bool = field(
        default=False, metadata={"help": "quantize the embedding tables as weights (int8 codes in the INT8 checkpoint)"}
    )
    quantize_layernorm_weights: bool = field(
        default=False, metadata={"help": "fake-quantize the LayerNorm weights (biases stay in floating point)"}
    )
    gated_context: str = field(
        default="after_gate",
        metadata={
            "help": "gated attention: context quantized after_gate (the output projection's input) or before_gate"
        },
    )
    gamma_migration: bool = field(default=False, metadata={"help": "Outlier Suppression gamma migration"})
    token_wise_clipping: bool = field(
        default=False, metadata={"help": "Outlier Suppression token-wise clipping of the activation ranges"}
    )
    clipping_quantiles: list[float] | None = field(
        default=None,
        metadata={
            "help": "token-wise clipping: coarse grid of quantiles in (0, 1] (default: the official grid of the bits)"
        },
    )
    clipping_steps: int = field(
        default=50, metadata={"help": "token-wise clipping: Adam steps of the fine stage (0 skips it)"}
    )
    clipping_lr: float = field(
        default=1e-5, metadata={"help": "token-wise clipping: initial learning rate of the fine stage"}
    )
    preset_name: str | None = field(
        default=None, metadata={"help": "the W8A8Config.preset this configuration came from (None: set by hand)"}
    )

    def __post_init__(self):
        for name in ("momentum", "percentile", "clipping_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"`{name}` must be a number, got {value!r}")
        for name in (
            "per_channel_weights",
            "per_channel_residuals",
            "gamma_migration",
            "token_wise_clipping",
            "remove_padding",
            "quantize_embeddings",
            "quantize_layernorm_weights",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.keep_fp_modules, (list, tuple)) or not all(
            isinstance(m, str) for m in self.keep_fp_modules
        ):
            raise ValueError(f"`keep_fp_modules` must be a list of module names, got {self.keep_fp_modules!r}")
        quantiles = self.clipping_quantiles
        if quantiles is not None and (
            not isinstance(quantiles, (list, tuple))
            or not all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in quantiles)
        ):
            raise ValueError(f"`clipping_quantiles` must be null or a non-empty list in (0, 1], got {quantiles!r}")
        for name in ("weight_bits", "activation_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
                raise ValueError(f"`{name}` must be an integer in [{MIN_BITS}, {MAX_BITS}], got {value!r}")
        if self.weight_estimator not in WEIGHT_ESTIMATORS:
            raise ValueError(f"`weight_estimator` must be one of {WEIGHT_ESTIMATORS}, got {self.weight_estimator!r}")
        for name, allowed in (
            ("activation_nodes", ACTIVATION_NODES),
            ("calibration_quantized", CALIBRATION_QUANTIZED),
            ("gated_context", GATED_CONTEXT),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        if self.preset_name is not None and not isinstance(self.preset_name, str):
            raise ValueError(f"`preset_name` must be a preset name or null, got {self.preset_name!r}")
        if self.activation_estimator not in ACTIVATION_ESTIMATORS:
            raise ValueError(
                f"`activation_estimator` must be one of {ACTIVATION_ESTIMATORS}, got {self.activation_estimator!r}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"`percentile` must be in (50, 100], got {self.percentile!r}")
        for name in ("num_calibration_batches", "clipping_steps"):
            value = getattr(self, name)
            minimum = 1 if name == "num_calibration_batches" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
        value = self.outlier_channels
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_OUTLIER_CHANNELS:
            raise ValueError(f"`outlier_channels` must be an integer in [0, {MAX_OUTLIER_CHANNELS}], got {value!r}")
        if quantiles is not None and (not quantiles or not all(0.0 < q <= 1.0 for q in quantiles)):
            raise ValueError(
                f"`clipping_quantiles` must be a non-empty list in (0, 1], got {self.clipping_quantiles!r}"
            )
        if not self.clipping_lr > 0:
            raise ValueError(f"`clipping_lr` must be > 0, got {self.clipping_lr!r}")
        self.keep_fp_modules = list(self.keep_fp_modules)
        if quantiles is not None:
            self.clipping_quantiles = [float(q) for q in quantiles]

    def clipping_grid(self) -> list[float]:
        """The coarse grid of token-wise clipping: `clipping_quantiles`, or the official grid of the bits.

        As `cac_step_iters` in the official `solver/token_wise_clipping.py` (step 0.01 at batch 32 x
        128 tokens; 0.1 / 0.3 / 0.9 of the range searched at 8 / 6 / 4 bits).
        """
        if self.clipping_quantiles is not None:
            return list(self.clipping_quantiles)
        span = 0.1 if self.activation_bits >= 8 else 0.3 if self.activation_bits >= 6 else 0.9
        return [round(1.0 - 0.01 * i, 2) for i in range(round(span / 0.01))]

    @classmethod
    def preset(cls, name: str, **overrides) -> "W8A8Config":
        """A named setting (`preset_names()`), with `overrides` on top; `preset_name` records the name
        (and the fields `overrides` changed, so a modified preset is never shown as the paper's).

        The exact paper presets are slower than the default (`wei2022-os` runs 10 / 30 extra
        forward passes over the calibration set and 24 training steps).
        """
        variant = next((v for v in PRESET_VARIANTS if name.endswith(f"-{v}")), None)
        base = name[: -len(variant) - 1] if variant else name
        if base not in PRESETS:
            raise ValueError(f"unknown W8A8 preset {name!r}; known presets: {preset_names()}")
        fields = {**PRESETS[base], **(PRESET_VARIANTS[variant] if variant else {})}
        defaults = cls()
        changed = sorted(k for k, v in overrides.items() if v != fields.get(k, getattr(defaults, k, None)))
        label = f"{name} (modified: {', '.join(changed)})" if changed else name
        return cls(**{**fields, **overrides}, preset_name=label)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "W8A8Config":
        """Build from a dict; unknown keys raise ValueError naming them and the known fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown W8A8Config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string() + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> "W8A8Config":
        return cls.from_dict(json.loads(Path(path).read_text()))
