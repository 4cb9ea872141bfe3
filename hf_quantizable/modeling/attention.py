"""Attention building blocks shared by the quantizable models (pure torch).

- `clipped_softmax` (Bondarenko et al. 2023): clip((zeta - gamma) * softmax(x) + gamma, 0, 1).
- `normalized_clipped_softmax` (Liao & Monz 2024): gamma = (beta - zeta) / (n - 1) for a query with
  n unmasked keys, so that the stretched probabilities of every query sum to beta.
- Attention functions with transformers' signature `(module, query, key, value, attention_mask,
  scaling, dropout, **kwargs) -> (output, weights)`: `eager_attention_forward` and one per clipped
  variant. Importing this file registers the clipped ones with `AttentionInterface` (and a mask
  function with `AttentionMaskInterface`) as "clipped_softmax" and "normalized_clipped_softmax", so
  any transformers model that dispatches on `config._attn_implementation` can train with them.
- `AttentionGate`: gate = sigmoid(G(x)) scaling each head's context before the output projection.
- `AttentionCore`: the attention function, the gate and the quantization points of scores,
  probabilities and context; with quantized Q/K/V and probabilities, the two products are exact
  integer products (`grid_matmul`).

Self-contained: torch, transformers and relative imports only.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .int8 import Int8ActivationQuantizer, QuantPoint, TensorGrid, grid_matmul, uses_avx2

CLIPPED_IMPLS = ("clipped_softmax", "normalized_clipped_softmax")
# Attention functions that need masks (or caches) other than the boolean 4-D mask our models build.
UNSUPPORTED_ATTENTION_FUNCTIONS = (
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "paged|eager",
)
# Defaults for configs that lack the fields (stock transformers configs): the papers' BERT settings,
# and Liao & Monz's OPT beta for causal attention.
DEFAULT_CLIP_GAMMA = -0.025
DEFAULT_NCS_BETA = {False: -2.175, True: 0.9}


def clipped_softmax(scores: torch.Tensor, zeta: float, gamma: float) -> torch.Tensor:
    """clip((zeta - gamma) * softmax(scores) + gamma, 0, 1) over the last axis."""
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    return torch.clamp((zeta - gamma) * probs + gamma, 0.0, 1.0)


def normalized_clipped_softmax(
    scores: torch.Tensor, zeta: float, beta: float, num_keys: torch.Tensor | int
) -> torch.Tensor:
    """Clipped softmax whose gamma depends on each query's number of unmasked keys.

    Args:
        scores: attention scores `[..., T_q, T_k]`, masked keys already at the dtype minimum.
        num_keys: unmasked keys per query, broadcastable to `[..., T_q, 1]` (an int for no mask).
    """
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    num_keys = torch.as_tensor(num_keys, dtype=probs.dtype, device=probs.device)
    # A query with a single key has nothing to clip: gamma = 0 there.
    gamma = torch.where(num_keys > 1, (beta - zeta) / (num_keys - 1).clamp(min=1), torch.zeros_like(num_keys))
    return torch.clamp((zeta - gamma) * probs + gamma, 0.0, 1.0)


def clipped_softmax_parameters(config, key_length: int) -> tuple[float, float]:
    """(zeta, gamma) of clipped softmax from `clip_zeta` and `clip_gamma` or `clip_alpha` (gamma = -alpha / T_k).

    Quantizable configs validate these fields; on other configs (set as extra config attributes) they are
    checked here, and default to zeta = 1, gamma = -0.025.
    """
    zeta = getattr(config, "clip_zeta", 1.0)
    alpha = getattr(config, "clip_alpha", None)
    gamma = -alpha / key_length if alpha is not None else getattr(config, "clip_gamma", None)
    gamma = DEFAULT_CLIP_GAMMA if gamma is None else gamma
    if zeta < 1 or gamma > 0:
        raise ValueError(f"clipped softmax needs `clip_zeta` >= 1 and gamma <= 0, got zeta={zeta}, gamma={gamma}")
    return zeta, gamma


def ncs_parameters(config, is_causal: bool) -> tuple[float, float]:
    """(zeta, beta) of normalized clipped softmax from `ncs_zeta` and `ncs_beta`.

    Defaults for configs without the fields: zeta = 1 and Liao & Monz's beta, -2.175 (BERT) for
    bidirectional attention, 0.9 (OPT) for causal attention.
    """
    zeta = getattr(config, "ncs_zeta", 1.0)
    beta = getattr(config, "ncs_beta", None)
    beta = DEFAULT_NCS_BETA[bool(is_causal)] if beta is None else beta
    if zeta < 1 or beta > zeta:
        raise ValueError(f"normalized clipped softmax needs `ncs_zeta` >= 1 and `ncs_beta` <= zeta, got {zeta}, {beta}")
    return zeta, beta


def _is_causal(module: nn.Module, kwargs: dict) -> bool:
    """transformers' convention (as in its SDPA function): the `is_causal` argument, else the module's flag."""
    is_causal = kwargs.get("is_causal")
    return getattr(module, "is_causal", True) if is_causal is None else is_causal


def _masked_scores(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled scores `[B, H, T_q, T_k]` with masked keys at the dtype minimum, and the mask (True = attend).

    `attention_mask` may be boolean (True = attend, as our models and `sdpa_mask` build it) or additive
    float (0 / dtype minimum, as `eager_mask` builds it, possibly with a bias); broadcastable to the scores
    once cut to the key length. Without a mask, causal attention gets the bottom-right aligned causal mask.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [B, H, T_q, T_k]
    query_length, key_length = scores.shape[-2:]
    if attention_mask is None:
        if not is_causal or query_length == 1:
            return scores, None
        query_pos = torch.arange(key_length - query_length, key_length, device=scores.device)[:, None]
        keep = torch.arange(key_length, device=scores.device)[None, :] <= query_pos  # [T_q, T_k]
    elif attention_mask.dtype == torch.bool:
        keep = attention_mask[..., :key_length]
    else:
        attention_mask = attention_mask[..., :key_length]
        scores = scores + attention_mask
        keep = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return scores.masked_fill(~keep, torch.finfo(scores.dtype).min), keep


def _explicit_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    probabilities: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    is_causal: bool,
    kwargs: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax-variant(QK^T * scaling) V with explicit probabilities; grouped K/V heads are repeated."""
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"the explicit attention functions of hf_quantizable do not support `{name}`")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # [B, H, T_k, d_head]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores, keep = _masked_scores(query, key, attention_mask, scaling, is_causal)
    probs = probabilities(scores, keep)  # [B, H, T_q, T_k]
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()  # [B, T_q, H, d_head]
    return output, probs


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with explicit probabilities (boolean or additive masks).

    Args:
        query: `[B, H, T_q, d_head]`; key, value: `[B, H_kv, T_k, d_head]`.
        attention_mask: boolean (True = attend) or additive, broadcastable to `[B, H, T_q, T_k]`, or None.
    Returns:
        output `[B, T_q, H, d_head]` and probabilities `[B, H, T_q, T_k]`.
    """

    def softmax(scores, keep):
        return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)

    is_causal = _is_causal(module, kwargs)
    return _explicit_attention(module, query, key, value, attention_mask, scaling, dropout, softmax, is_causal, kwargs)


def clipped_softmax_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped softmax attention (`attn_implementation="clipped_softmax"`); as `eager_attention_forward`.

    zeta and gamma come from `module.config` (see `clipped_softmax_parameters`).
    """
    zeta, gamma = clipped_softmax_parameters(module.config, key.shape[-2])

    def probabilities(scores, keep):
        return clipped_softmax(scores, zeta, gamma)

    is_causal = _is_causal(module, kwargs)
    return _explicit_attention(
        module, query, key, value, attention_mask, scaling, dropout, probabilities, is_causal, kwargs
    )


def normalized_clipped_softmax_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized clipped softmax attention (`attn_implementation="normalized_clipped_softmax"`).

    As `eager_attention_forward`; zeta and beta come from `module.config` (see `ncs_parameters`), the
    number of keys of each query from the mask.
    """
    is_causal = _is_causal(module, kwargs)
    zeta, beta = ncs_parameters(module.config, is_causal)

    def probabilities(scores, keep):
        num_keys = scores.shape[-1] if keep is None else keep.sum(dim=-1, keepdim=True)  # [..., T_q, 1]
        return normalized_clipped_softmax(scores, zeta, beta, num_keys)

    return _explicit_attention(
        module, query, key, value, attention_mask, scaling, dropout, probabilities, is_causal, kwargs
    )


def explicit_attention_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' boolean SDPA mask (True = attend), always built for causal attention.

    The clipped functions need the mask itself (normalized clipped softmax counts each query's keys),
    where SDPA may drop a plain causal mask in favour of its `is_causal` flag.
    """
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


ATTENTION_FUNCTIONS = {
    "clipped_softmax": clipped_softmax_attention_forward,
    "normalized_clipped_softmax": normalized_clipped_softmax_attention_forward,
}
for _name, _function in ATTENTION_FUNCTIONS.items():
    AttentionInterface.register(_name, _function)
    AttentionMaskInterface.register(_name, explicit_attention_mask)


def check_attention_implementation(attn_impl: str, attn_implementation: str | None) -> str | None:
    """The `attn_implementation` a quantizable model of variant `attn_impl` runs, or ValueError.

    The clipped variants run their own function: unset means their own name; `eager` stays, as their
    function is an eager one. Vanilla and gated
    attention run any function that takes a boolean 4-D mask (`sdpa`, `eager`, registered ones), but not
    a clipped one (set `attn_impl` for that, so the checkpoint says what it is).
    """
    if attn_impl in CLIPPED_IMPLS:
        if attn_implementation in (None, attn_impl):
            return attn_impl
        if attn_implementation == "eager":
            return attn_implementation
        raise ValueError(
            f"attn_impl={attn_impl!r} computes explicit probabilities: `attn_implementation` must be "
            f"{attn_impl!r} (or 'eager' / unset), got {attn_implementation!r}"
        )
    if attn_implementation in CLIPPED_IMPLS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} on a model with attn_impl={attn_impl!r}: set "
            f"`attn_impl={attn_implementation!r}` in the config instead"
        )
    if attn_implementation in UNSUPPORTED_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} needs masks the quantizable models do not build; "
            "use 'sdpa' or 'eager'"
        )
    return attn_implementation


def tensor_grid(quantizer: nn.Module) -> TensorGrid | None:
    """The per-tensor grid of a quantizer's output (its `tensor_grid()`), None for a `QuantPoint`."""
    grid = getattr(quantizer, "tensor_grid", None)
    return None if grid is None else grid()


def padding_mask(attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
    """Boolean mask `[B, 1, T_q, T_k]` (True = attend) from a `[B, T_k]` padding mask.

    None without padding, except under `torch.compile`, where that test would break the graph.
    """
    if attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all())):
        return None
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T_k]
    return keys.expand(-1, 1, query_length, -1)


def causal_mask(
    attention_mask: torch.Tensor | None, batch_size: int, query_length: int, past_length: int, device: torch.device
) -> torch.Tensor:
    """Boolean causal mask `[B, 1, T_q, past + T_q]` (True = attend), combined with padding."""
    key_length = past_length + query_length
    query_pos = torch.arange(past_length, key_length, device=device)[:, None]  # [T_q, 1]
    key_pos = torch.arange(key_length, device=device)[None, :]  # [1, T_k]
    mask = (key_pos <= query_pos)[None, None].expand(batch_size, 1, -1, -1)  # [B, 1, T_q, T_k]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :key_length]
    # Queries on left padding see no key at all: let them attend everywhere (their output is unused)
    # instead of producing NaN, as the additive-mask implementations do.
    return mask | ~mask.any(dim=-1, keepdim=True)


class AttentionGate(nn.Module):
    """Gated attention (Bondarenko et al.): per-head gate probabilities `[B, H, T, 1]`.

    `gate_type`:
        - `linear`: per head `Linear(d_head -> 1)` on that head's slice of the attention input, per token;
        - `mlp`: per head `d_head -> gate_n_hid -> 1` with ReLU;
        - `all_heads_linear`: `Linear(d_model -> n_heads)` on the whole attention input;
        - `per_head`: per head `Linear(d_head -> 1)` on the input averaged over the (unpadded) tokens;
        - `unconditional`: one learned logit per head.
    The last layer starts at weight 0 and bias logit(pi_init), so every gate starts at exactly pi_init.
    """

    def __init__(self, gate_type: str, num_heads: int, head_dim: int, n_hid: int, pi_init: float):
        super().__init__()
        self.gate_type = gate_type
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.pi_init = pi_init
        if gate_type in ("linear", "per_head"):
            self.weight = nn.Parameter(torch.empty(num_heads, head_dim))
            self.bias = nn.Parameter(torch.empty(num_heads))
        elif gate_type == "mlp":
            self.hidden_weight = nn.Parameter(torch.empty(num_heads, head_dim, n_hid))
            self.hidden_bias = nn.Parameter(torch.empty(num_heads, n_hid))
            self.weight = nn.Parameter(torch.empty(num_heads, n_hid))
            self.bias = nn.Parameter(torch.empty(num_heads))
        elif gate_type == "all_heads_linear":
            self.weight = nn.Parameter(torch.empty(num_heads, num_heads * head_dim))
            self.bias = nn.Parameter(torch.empty(num_heads))
        elif gate_type == "unconditional":
            self.bias = nn.Parameter(torch.empty(num_heads))
        else:
            raise ValueError(f"unknown gate_type {gate_type!r}")

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            hidden_states: attention input `[B, T, d_model]`.
            token_mask: `[B, T]`, 1 for real tokens (used by `per_head` pooling).
        Returns:
            gate probabilities `[B, H, T, 1]` (`[B, H, 1, 1]` for per_head, `[1, H, 1, 1]` unconditional).
        """
        batch_size, seq_length, _ = hidden_states.shape
        heads = hidden_states.view(batch_size, seq_length, self.num_heads, self.head_dim)  # [B, T, H, d_head]
        if self.gate_type == "linear":
            logits = torch.einsum("bthd,hd->bht", heads, self.weight) + self.bias[:, None]  # [B, H, T]
        elif self.gate_type == "mlp":
            hidden = torch.relu(torch.einsum("bthd,hdn->bthn", heads, self.hidden_weight) + self.hidden_bias)
            logits = torch.einsum("bthn,hn->bht", hidden, self.weight) + self.bias[:, None]  # [B, H, T]
        elif self.gate_type == "all_heads_linear":
            logits = torch.einsum("btd,hd->bht", hidden_states, self.weight) + self.bias[:, None]  # [B, H, T]
        elif self.gate_type == "per_head":
            if token_mask is None:
                pooled = heads.mean(dim=1)  # [B, H, d_head]
            else:
                weights = token_mask.to(heads.dtype)[:, :, None, None]  # [B, T, 1, 1]
                pooled = (heads * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
            logits = (torch.einsum("bhd,hd->bh", pooled, self.weight) + self.bias)[:, :, None]  # [B, H, 1]
        else:  # unconditional
            logits = self.bias[None, :, None]  # [1, H, 1]
        return torch.sigmoid(logits)[..., None]

    @torch.no_grad()
    def init_gate(self, init, std: float) -> None:
        """Initialise with the transformers `init` helpers (which skip weights loaded from a checkpoint)."""
        bias = math.log(self.pi_init / (1.0 - self.pi_init))
        if self.gate_type == "mlp":
            init.normal_(self.hidden_weight, mean=0.0, std=std)
            init.zeros_(self.hidden_bias)
        if self.gate_type != "unconditional":
            init.zeros_(self.weight)
        init.constant_(self.bias, bias)


class AttentionCore(nn.Module):
    """Everything between the Q/K/V projections and the output projection.

    The attention function, the gate of gated attention, and the quantization points of scores,
    probabilities and context. In floating point the function is the variant's: the clipped variants
    run their registered function, vanilla and gated attention the one `config._attn_implementation`
    names (`sdpa`, `eager`, ...), or `eager_attention_forward` when the probabilities are requested.
    A model with quantized scores or probabilities (simulated W8A8 or the INT8 runtime) runs the
    explicit path of this module instead, whatever the function: its scores and probabilities pass
    their quantizers, and where Q and K (and the probabilities and V) are on per-tensor grids
    (`qkv_quant`, the parent's quantizers), the products are `grid_matmul`'s exact integer products
    times the scales, so that the INT8 runtime equals the simulation bit for bit.
    """

    def __init__(self, config, num_heads: int, head_dim: int, dropout: float, is_causal: bool = False):
        super().__init__()
        self.config = config
        self.attn_impl = config.attn_impl
        self.is_causal = is_causal
        self.scaling = head_dim**-0.5
        self.dropout = dropout
        self.scores_quant = QuantPoint()
        self.probs_quant = QuantPoint()
        self.gate = (
            AttentionGate(config.gate_type, num_heads, head_dim, config.gate_n_hid, config.pi_init)
            if config.attn_impl == "gated"
            else None
        )
        if self.gate is None:
            self.context_quant = QuantPoint()
        else:  # `W8A8Config.gated_context`: after the gate (the out projection's input) or before it
            self.ungated_context_quant = QuantPoint(w8a8_option=("gated_context", "before_gate"))
            self.context_quant = QuantPoint(w8a8_option=("gated_context", "after_gate"))

    def _quantized(self) -> bool:
        return type(self.scores_quant) is not QuantPoint or type(self.probs_quant) is not QuantPoint

    def _probabilities(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.attn_impl == "clipped_softmax":
            return clipped_softmax(scores, *clipped_softmax_parameters(self.config, scores.shape[-1]))
        if self.attn_impl == "normalized_clipped_softmax":
            num_keys = scores.shape[-1] if mask is None else mask.sum(dim=-1, keepdim=True)  # [B, 1, T_q, 1]
            return normalized_clipped_softmax(scores, *ncs_parameters(self.config, self.is_causal), num_keys)
        return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        attention_interface: Callable = eager_attention_forward,
        token_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        qkv_quant: tuple[nn.Module, nn.Module, nn.Module] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states: attention input `[B, T_q, d_model]` (what the gate looks at).
            query: `[B, H, T_q, d_head]`; key, value: `[B, H, T_k, d_head]`.
            mask: boolean `[B, 1, T_q, T_k]`, True where a query may attend a key, or None.
            attention_interface: the function `config._attn_implementation` names (vanilla and gated).
            token_mask: `[B, T_q]` padding mask for the `per_head` gate's pooling.
            qkv_quant: the quantization points (or quantizers) that produced query, key and value.
        Returns:
            context `[B, T_q, H * d_head]` and, unless SDPA ran, probabilities `[B, H, T_q, T_k]`.
        """
        batch_size, num_heads, query_length, head_dim = query.shape
        dropout = self.dropout if self.training else 0.0
        if self._quantized():
            context, probs = self._quantized_attention(query, key, value, mask, dropout, qkv_quant)
        else:
            if self.attn_impl in CLIPPED_IMPLS:
                attention_interface = ATTENTION_FUNCTIONS[self.attn_impl]
            elif output_attentions:
                attention_interface = eager_attention_forward
            context, probs = attention_interface(
                self, query, key, value, mask, scaling=self.scaling, dropout=dropout
            )  # context: [B, T_q, H, d_head]
        if self.gate is not None:
            gate = self.gate(hidden_states, token_mask).transpose(1, 2)  # [B, T_q, H, 1]
            context = self.ungated_context_quant(context) * gate
        context = context.reshape(batch_size, query_length, num_heads * head_dim)
        return self.context_quant(context), probs

    def _quantized_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        dropout: float,
        qkv_quant: tuple[nn.Module, nn.Module, nn.Module] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The explicit path with quantized scores and probabilities: context `[B, T_q, H, d_head]`, probabilities."""
        # Not for autograd (rounding has no gradient) nor the ONNX export (its QDQ graph already
        # gets integer products from ONNX Runtime's fusion).
        grads = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
        plain = qkv_quant is None or grads or torch.onnx.is_in_onnx_export()
        q_grid, k_grid, v_grid = (None,) * 3 if plain else map(tensor_grid, qkv_quant)
        if q_grid is not None and k_grid is not None:
            scale = q_grid.scale * k_grid.scale * self.scaling
            products = grid_matmul(query, q_grid, key.transpose(-1, -2), k_grid, scale, self._kernel())
        else:
            products = torch.matmul(query, key.transpose(-1, -2)).mul_(self.scaling)
        # In place on the quantizer's new output (the same values, one fewer [B, H, T_q, T_k] tensor).
        scores = self.scores_quant(products)  # [B, H, T_q, T_k]
        if mask is not None:
            scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        probs = self.probs_quant(self._probabilities(scores, mask))
        p_grid = tensor_grid(self.probs_quant)
        if p_grid is not None and v_grid is not None and dropout == 0.0:
            scale = p_grid.scale * v_grid.scale
            context = grid_matmul(probs, p_grid, value, v_grid, scale, self._kernel(), heads_last=True)
        else:
            context = torch.matmul(F.dropout(probs, p=dropout, training=self.training), value)
        return context.transpose(1, 2), probs  # [B, T_q, H, d_head]

    def _kernel(self) -> bool | None:
        """The INT8 runtime's GEMM route (`int8.uses_avx2` of its quantizers); None in the simulation."""
        return uses_avx2(self.probs_quant) if isinstance(self.probs_quant, Int8ActivationQuantizer) else None
