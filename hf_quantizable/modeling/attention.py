"""Attention building blocks shared by the quantizable models (pure torch).

- `clipped_softmax` (Bondarenko et al. 2023): clip((zeta - gamma) * softmax(x) + gamma, 0, 1).
- `normalized_clipped_softmax` (Liao & Monz 2024): gamma = (beta - zeta) / (n - 1) for a query with
  n unmasked keys, so that the stretched probabilities of every query sum to beta.
- `AttentionGate`: gate = sigmoid(G(x)) scaling each head's context before the output projection.
- `AttentionCore`: SDPA for vanilla and gated attention, explicit probabilities for the clipped
  variants, the gate, and the quantization points of scores, probabilities and context; with
  quantized Q/K/V and probabilities, the two products are exact integer products (`grid_matmul`).

Self-contained: torch, transformers and relative imports only.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .int8 import QuantPoint, TensorGrid, grid_matmul

CLIPPED_IMPLS = ("clipped_softmax", "normalized_clipped_softmax")


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


def tensor_grid(quantizer: nn.Module) -> TensorGrid | None:
    """The per-tensor grid of a quantizer's output (its `tensor_grid()`), None for a `QuantPoint`."""
    grid = getattr(quantizer, "tensor_grid", None)
    return None if grid is None else grid()


def padding_mask(attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
    """Boolean mask `[B, 1, T_q, T_k]` (True = attend) from a `[B, T_k]` padding mask."""
    if attention_mask is None or bool(attention_mask.all()):
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

    softmax(QK^T / sqrt(d_head)) V with the softmax variant of `attn_impl`, the gate of gated
    attention, and the quantization points of scores, probabilities and context. Vanilla and gated
    attention run `F.scaled_dot_product_attention`; the clipped variants, a request for the
    probabilities, or quantized scores/probabilities run the explicit (eager) path. There, where Q
    and K (and the probabilities and V) are on per-tensor grids (`qkv_quant`, the parent's quantizers),
    the products are `grid_matmul`'s exact integer products times the scales.
    """

    def __init__(self, config, num_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.config = config
        self.attn_impl = config.attn_impl
        self.scaling = head_dim**-0.5
        self.dropout = dropout
        self.scores_quant = QuantPoint()
        self.probs_quant = QuantPoint()
        self.gate = (
            AttentionGate(config.gate_type, num_heads, head_dim, config.gate_n_hid, config.pi_init)
            if config.attn_impl == "gated"
            else None
        )
        self.context_quant = QuantPoint()

    def _use_sdpa(self, output_attentions: bool) -> bool:
        quantized = type(self.scores_quant) is not QuantPoint or type(self.probs_quant) is not QuantPoint
        return self.attn_impl not in CLIPPED_IMPLS and not output_attentions and not quantized

    def _probabilities(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.attn_impl == "clipped_softmax":
            gamma = self.config.clip_gamma_for(scores.shape[-1])
            return clipped_softmax(scores, self.config.clip_zeta, gamma)
        if self.attn_impl == "normalized_clipped_softmax":
            num_keys = scores.shape[-1] if mask is None else mask.sum(dim=-1, keepdim=True)  # [B, 1, T_q, 1]
            return normalized_clipped_softmax(scores, self.config.ncs_zeta, self.config.ncs_beta, num_keys)
        return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        qkv_quant: tuple[nn.Module, nn.Module, nn.Module] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states: attention input `[B, T_q, d_model]` (what the gate looks at).
            query: `[B, H, T_q, d_head]`; key, value: `[B, H, T_k, d_head]`.
            mask: boolean `[B, 1, T_q, T_k]`, True where a query may attend a key, or None.
            token_mask: `[B, T_q]` padding mask for the `per_head` gate's pooling.
            qkv_quant: the quantization points (or quantizers) that produced query, key and value.
        Returns:
            context `[B, T_q, H * d_head]` and, on the eager path, probabilities `[B, H, T_q, T_k]`.
        """
        batch_size, num_heads, query_length, head_dim = query.shape
        dropout = self.dropout if self.training else 0.0
        if self._use_sdpa(output_attentions):
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, scale=self.scaling
            )  # [B, H, T_q, d_head]
            probs = None
        else:
            # Not for autograd (rounding has no gradient) nor the ONNX export (its QDQ graph already
            # gets integer products from ONNX Runtime's fusion).
            grads = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
            plain = qkv_quant is None or grads or torch.onnx.is_in_onnx_export()
            q_grid, k_grid, v_grid = (None,) * 3 if plain else map(tensor_grid, qkv_quant)
            if q_grid is not None and k_grid is not None:
                scale = q_grid.scale * k_grid.scale * self.scaling
                products = grid_matmul(query, q_grid, key.transpose(-1, -2), k_grid, scale, self._pool())
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
                context = grid_matmul(probs, p_grid, value, v_grid, scale, self._pool(), heads_last=True)
            else:
                context = torch.matmul(F.dropout(probs, p=dropout, training=self.training), value)
        if self.gate is not None:
            context = context * self.gate(hidden_states, token_mask)  # gate: [B, H, T_q, 1]
        context = context.transpose(1, 2).reshape(batch_size, query_length, num_heads * head_dim)
        return self.context_quant(context), probs

    def _pool(self):
        """The INT8 runtime's output pool (held by its quantizers), else None."""
        return getattr(self.probs_quant, "output_pool", None)
