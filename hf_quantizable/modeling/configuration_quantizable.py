"""Configurations of the quantization-friendly BERT, OPT and ViT models.

Each config subclasses the stock transformers config and adds the attention options of
Bondarenko et al. (clipped softmax, gated attention) and Liao & Monz (normalized clipped softmax).
This file is copied into every saved checkpoint: it may only import torch, transformers and the
other files of this folder (relative imports).
"""

import math
from dataclasses import dataclass
from typing import Any

from transformers import BertConfig, OPTConfig, ViTConfig

from .quantization_method import QUANT_METHOD  # noqa: F401  (importing it registers the W8A8 method)

# The attention variants, defined here only: the short name presets and the main job use -> `attn_impl`.
ATTENTION_VARIANTS = {
    "vanilla": "softmax",
    "clipped": "clipped_softmax",
    "normalized_clipped": "normalized_clipped_softmax",
    "gated": "gated",
}
ATTN_IMPLS = tuple(ATTENTION_VARIANTS.values())
GATE_TYPES = ("linear", "mlp", "all_heads_linear", "per_head", "unconditional")
ATTENTION_INITS = ("opt", "torch_default")  # `QuantizableOPTConfig.attention_init`


def _check_number(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        kind = "a finite number or None" if allow_none else "a finite number"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}")


@dataclass(kw_only=True, repr=False)
class QuantizableAttentionConfig:
    """Attention fields shared by every quantizable config.

    Args:
        attn_impl: one of `softmax` (vanilla), `clipped_softmax`, `normalized_clipped_softmax`, `gated`.
            The softmax variant the model is trained with; vanilla and gated run the attention function
            `attn_implementation` names (`sdpa` by default), the clipped variants their registered one
            (`attention.check_attention_implementation`).
        clip_gamma: clipped softmax lower stretch `gamma <= 0` (used when `clip_alpha` is None).
        clip_alpha: clipped softmax `alpha >= 0`, giving `gamma = -alpha / T`.
        clip_alpha_length: what T is: `runtime` (the key length of each forward pass) or `fixed`
            (`clip_max_length`, the training sequence length; the official code fixes
            `gamma = -alpha / max_seq_length` when it builds the attention). They agree on full-length
            training batches; in generation with a KV cache, `runtime` gives every new token the gamma
            of its prefix length (weaker clipping early), `fixed` the trained gamma throughout.
        clip_max_length: T of `clip_alpha_length="fixed"` (a positive integer; needed then).
        clip_zeta: clipped softmax upper stretch `zeta >= 1`.
        ncs_zeta: normalized clipped softmax upper stretch `zeta >= 1`.
        ncs_beta: normalized clipped softmax target sum of the stretched probabilities (`beta <= zeta`).
        gate_type: one of `linear`, `mlp`, `all_heads_linear`, `per_head`, `unconditional`.
        gate_n_hid: hidden width of the `mlp` gate.
        pi_init: initial gate probability in (0, 1); gate bias = logit(pi_init).
        w8a8_config: quantization settings of an INT8 checkpoint (written by the W8A8 quantizer).
    """

    attn_impl: str = "softmax"
    clip_gamma: float | None = None
    clip_alpha: float | None = None
    clip_alpha_length: str = "runtime"
    clip_max_length: int | None = None
    clip_zeta: float = 1.0
    ncs_zeta: float = 1.0
    ncs_beta: float | None = None
    gate_type: str = "linear"
    gate_n_hid: int = 4
    pi_init: float = 0.5
    w8a8_config: dict | None = None

    # Liao & Monz's beta for this family (BERT -2.175, OPT 0.9).
    default_ncs_beta = -2.175

    # What generic code asks a family's config class (class attributes, not config fields: no annotation):
    # `_modality`: "text" (token ids) or "image" (pixel values): which data, processor and quality metric.
    # `_tokenizer_fields`: special-token ids a freshly trained model takes from its tokenizer.
    # `_trained_tokenizer`: the tokenizer `training.data.train_tokenizer` builds offline ("wordpiece",
    #     "byte_level_bpe"; None: the family reads no text).
    _modality = "text"
    _tokenizer_fields = ("pad_token_id",)
    _trained_tokenizer = "wordpiece"

    def validate_attention_fields(self) -> None:
        """Check every attention field; raise ValueError naming the field and the allowed values."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"`attn_impl` must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"`gate_type` must be one of {GATE_TYPES}, got {self.gate_type!r}")
        for name in ("clip_gamma", "clip_alpha", "ncs_beta"):
            _check_number(name, getattr(self, name), allow_none=True)
        for name in ("clip_zeta", "ncs_zeta", "pi_init"):
            _check_number(name, getattr(self, name))
        if self.clip_gamma is not None and self.clip_alpha is not None:
            raise ValueError("set either `clip_gamma` or `clip_alpha`, not both")
        if self.clip_gamma is not None and self.clip_gamma > 0:
            raise ValueError(f"`clip_gamma` must be <= 0, got {self.clip_gamma}")
        if self.clip_alpha is not None and self.clip_alpha < 0:
            raise ValueError(f"`clip_alpha` must be >= 0, got {self.clip_alpha}")
        if self.clip_zeta < 1:
            raise ValueError(f"`clip_zeta` must be >= 1, got {self.clip_zeta}")
        if self.ncs_zeta < 1:
            raise ValueError(f"`ncs_zeta` must be >= 1, got {self.ncs_zeta}")
        if self.ncs_beta is None:
            self.ncs_beta = self.default_ncs_beta
        if self.ncs_beta > self.ncs_zeta:
            raise ValueError(f"`ncs_beta` must be <= `ncs_zeta` ({self.ncs_zeta}), got {self.ncs_beta}")
        if self.clip_alpha_length not in ("runtime", "fixed"):
            raise ValueError(f"`clip_alpha_length` must be 'runtime' or 'fixed', got {self.clip_alpha_length!r}")
        if self.clip_max_length is not None and (
            isinstance(self.clip_max_length, bool)
            or not isinstance(self.clip_max_length, int)
            or self.clip_max_length < 1
        ):
            raise ValueError(f"`clip_max_length` must be a positive integer or None, got {self.clip_max_length!r}")
        if self.clip_alpha is not None and self.clip_alpha_length == "fixed" and self.clip_max_length is None:
            raise ValueError("`clip_alpha_length='fixed'` needs `clip_max_length` (the training sequence length)")
        if self.attn_impl == "clipped_softmax" and self.clip_gamma is None and self.clip_alpha is None:
            self.clip_gamma = -0.025  # Bondarenko et al.'s best BERT setting (alpha = 3.2 at T = 128)
        if not 0.0 < self.pi_init < 1.0:
            raise ValueError(f"`pi_init` must be in the open interval (0, 1), got {self.pi_init}")
        if isinstance(self.gate_n_hid, bool) or not isinstance(self.gate_n_hid, int) or self.gate_n_hid < 1:
            raise ValueError(f"`gate_n_hid` must be a positive integer, got {self.gate_n_hid!r}")
        if self.w8a8_config is not None and not isinstance(self.w8a8_config, dict):
            raise ValueError(f"`w8a8_config` must be a dict or None, got {type(self.w8a8_config).__name__}")

    def clip_gamma_for(self, key_length: int) -> float:
        """Clipped softmax gamma for a key axis of `key_length` (alpha form: -alpha / T, see `clip_alpha_length`)."""
        if self.clip_alpha is not None:
            return -self.clip_alpha / (self.clip_max_length if self.clip_alpha_length == "fixed" else key_length)
        return self.clip_gamma


class QuantizableBertConfig(BertConfig, QuantizableAttentionConfig):
    r"""BERT config with quantization-friendly attention (see [`QuantizableAttentionConfig`]).

    Example:
    ```python
    >>> from hf_quantizable import QuantizableBertConfig
    >>> config = QuantizableBertConfig(attn_impl="gated", pi_init=0.25, num_hidden_layers=4)
    ```"""

    model_type = "quantizable_bert"

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # a stock checkpoint's "bert" becomes this class's type
        self.validate_attention_fields()
        super().__post_init__(**kwargs)


class QuantizableOPTConfig(OPTConfig, QuantizableAttentionConfig):
    r"""OPT config with quantization-friendly attention.

    Args:
        wd_ln_gamma: the OPT recipe's weight decay on LayerNorm weights (read by the Trainer).
        attention_init: how a new model initialises the attention projections (Q, K, V, output):
            `opt` (normal with `init_std`, as every other OPT linear layer) or `torch_default`
            (`nn.Linear`'s own kaiming-uniform init, std `1 / sqrt(3 * hidden_size)`: the official
            `run_clm.py` builds its attention modules after the model's init, so theirs keep it).
    """

    model_type = "quantizable_opt"
    default_ncs_beta = 0.9
    _tokenizer_fields = ("pad_token_id", "bos_token_id", "eos_token_id")
    _trained_tokenizer = "byte_level_bpe"
    wd_ln_gamma: bool = False
    attention_init: str = "opt"

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # a stock checkpoint's "opt" becomes this class's type
        self.validate_attention_fields()
        if not isinstance(self.wd_ln_gamma, bool):
            raise ValueError(f"`wd_ln_gamma` must be True or False, got {self.wd_ln_gamma!r}")
        if self.attention_init not in ATTENTION_INITS:
            raise ValueError(f"`attention_init` must be one of {ATTENTION_INITS}, got {self.attention_init!r}")
        if self.attn_impl == "gated" and self.gate_type == "per_head":
            causal_types = tuple(t for t in GATE_TYPES if t != "per_head")
            raise ValueError(
                f"`gate_type` 'per_head' pools over the whole sequence, which a causal model cannot see; "
                f"use one of {causal_types}"
            )
        super().__post_init__(**kwargs)


class QuantizableViTConfig(ViTConfig, QuantizableAttentionConfig):
    r"""ViT config with quantization-friendly attention.

    Args:
        patch_embed_layernorm: add a LayerNorm after the patch embedding (Bondarenko et al., ViT).
    """

    model_type = "quantizable_vit"
    _modality = "image"
    _tokenizer_fields = ()
    _trained_tokenizer = None
    patch_embed_layernorm: bool = False

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # a stock checkpoint's "vit" becomes this class's type
        self.validate_attention_fields()
        if not isinstance(self.patch_embed_layernorm, bool):
            raise ValueError(f"`patch_embed_layernorm` must be True or False, got {self.patch_embed_layernorm!r}")
        super().__post_init__(**kwargs)
