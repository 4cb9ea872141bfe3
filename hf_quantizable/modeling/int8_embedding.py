"""INT8 embedding tables: int8 codes on a symmetric grid plus a float32 scale (per table or per row).

The Bondarenko et al. BERT node set quantizes the embedding tables as weights (official
Qualcomm-AI-research/outlier-free-transformers, `quantization/autoquant_utils.py` `QuantEmbedding`:
the table through the weight quantizer, symmetric, per tensor for BERT; its output is not quantized
again, `FP32Acts`). The simulation (`quantization.modules.QuantizedEmbedding`) and the INT8 runtime
(`Int8Embedding`) look rows up with the same function, `lookup_rows`, so they agree bit for bit.

Self-contained: torch imports only (this file is copied into checkpoints).
"""

import torch
import torch.nn.functional as F
from torch import nn


def embedding_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric integer codes of the table `weight` `[V, D]` (as float): `clamp(round(w / s), -q, q)`,
    `q = 2^(bits-1) - 1`; `scale` is 0-dim (per table) or `[V]` (per row)."""
    qmax = 2 ** (bits - 1) - 1
    scale = scale.reshape(-1, 1) if scale.dim() else scale
    return torch.clamp(torch.round(weight.float() / scale), -qmax, qmax)


def lookup_rows(input_ids: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, padding_idx=None) -> torch.Tensor:
    """The dequantized rows `codes[ids] * scale[ids]` as float32 (`codes` int8 or float, same values).

    Shared by the simulation and the INT8 runtime: the same gather and the same float multiplication.
    """
    rows = F.embedding(input_ids, codes, padding_idx).float()
    if scale.dim() == 0:
        return rows.mul_(scale)
    return rows.mul_(F.embedding(input_ids, scale.reshape(-1, 1)))


class Int8Embedding(nn.Module):
    """Embedding table of an INT8 checkpoint: int8 codes `weight` `[V, D]` and a float32 `weight_scale`
    (0-dim, or `[V]` with `per_row`); outputs the rows of `lookup_rows` (float32) in the model's dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, per_row: bool, bits: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.bits = bits
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings if per_row else ()))
        # The rows' dtype: the model's floating-point dtype (created under it, cast with the model by
        # `.to` / `.half()`; not saved). float32 in a float32 model, where rows equal the simulation's.
        self.register_buffer("output_dtype_probe", torch.empty(0), persistent=False)

    def extra_repr(self) -> str:
        per_row = self.weight_scale.dim() > 0
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, per_row={per_row}"

    def dequantized_weight(self) -> torch.Tensor:
        scale = self.weight_scale.reshape(-1, 1) if self.weight_scale.dim() else self.weight_scale
        return self.weight.float() * scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = lookup_rows(input_ids, self.weight, self.weight_scale, self.padding_idx)
        return rows.to(self.output_dtype_probe.dtype)


def _strip_prefix(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def convert_embeddings_to_int8(model: nn.Module, w8a8_config: dict) -> None:
    """Replace the `nn.Embedding`s that `w8a8_config["quantized_embeddings"]` lists (name relative to
    the base model -> whether the scale is per row) by `Int8Embedding`s (in place, idempotent).

    A quantized table that the output layer shared (tied word embeddings) is untied (`untie_int8_tables`):
    the task head stays in floating point (as in the official code, where the head keeps the FP
    table), so `config.tie_word_embeddings` becomes False and the head's weight is stored on its own.
    """
    tables = w8a8_config.get("quantized_embeddings") or {}
    if not tables:
        return
    prefix = getattr(model, "base_model_prefix", "")
    bits = int(w8a8_config.get("weight_bits", 8))
    inputs = _input_embeddings(model)
    replaced = []
    for name, module in list(model.named_modules()):
        key = _strip_prefix(name, prefix)
        if type(module) is not nn.Embedding or key not in tables:
            continue
        replacement = Int8Embedding(
            module.num_embeddings, module.embedding_dim, module.padding_idx, bool(tables[key]), bits
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
        replaced.append(module)
    untie_int8_tables(model, replaced, inputs)


def untie_int8_tables(model: nn.Module, tables: list[nn.Module], input_embeddings: set[int] | None = None) -> None:
    """Untie the task head from the embedding `tables` that became int8 (the head stays in floating
    point): `config.tie_word_embeddings` becomes False where a table is an input embedding (`id`s in
    `input_embeddings`, default: the model's now) or a parameter still shares a table's weight."""
    config = getattr(model, "config", None)
    if not tables or not getattr(config, "tie_word_embeddings", False):
        return
    inputs = _input_embeddings(model) if input_embeddings is None else input_embeddings
    if any(id(table) in inputs for table in tables) or _ties_to(model, tables):
        config.tie_word_embeddings = False
        for module in model.modules():
            if getattr(module, "all_tied_weights_keys", None):
                _untie(module, module.all_tied_weights_keys)
                module.all_tied_weights_keys = {}


def _untie(module: nn.Module, tied: dict[str, str]) -> None:
    """Give every target of `tied` (target -> source names) that still shares its source's tensor a copy
    of its own (e.g. BERT's decoder bias): untied in the config, both are saved and loaded separately."""
    for target, source in tied.items():
        try:
            target_tensor, source_tensor = module.get_parameter(target), module.get_parameter(source)
        except AttributeError:
            continue
        if target_tensor is source_tensor:
            parent_name, _, name = target.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, name, nn.Parameter(source_tensor.detach().clone(), source_tensor.requires_grad))


def _input_embeddings(model: nn.Module) -> set[int]:
    """`id`s of the input embeddings of `model` and its sub-models (`get_input_embeddings`)."""
    found = set()
    for module in model.modules():
        try:
            found.add(id(module.get_input_embeddings()))
        except (AttributeError, NotImplementedError):
            pass
    return found


def _ties_to(model: nn.Module, tables: list[nn.Module]) -> bool:
    """Whether a parameter of `model` outside `tables` is one of their weights (already tied)."""
    weights = {id(table.weight) for table in tables}
    return any(id(p) in weights for p in model.parameters())


def check_int8_embedding(name: str, module: Int8Embedding) -> None:
    """Refuse an `Int8Embedding` whose loaded tensors would give wrong rows: codes that are not int8, or
    scales that are zero, negative or not finite (ValueError naming the tensor)."""
    if module.weight.dtype != torch.int8:
        raise ValueError(f"INT8 tensor {name}.weight is {module.weight.dtype}, not int8 codes")
    qmax = 2 ** (module.bits - 1) - 1
    if module.weight.numel() and (int(module.weight.min()) < -qmax or int(module.weight.max()) > qmax):
        raise ValueError(f"INT8 tensor {name}.weight holds codes outside [-{qmax}, {qmax}] ({module.bits} bits)")
    scale = module.weight_scale
    valid = torch.isfinite(scale) & (scale > 0)
    if not bool(valid.all()):
        bad = scale[~valid].flatten()[0].item()
        raise ValueError(f"INT8 tensor {name}.weight_scale holds {bad}: quantization scales must be finite and > 0")
