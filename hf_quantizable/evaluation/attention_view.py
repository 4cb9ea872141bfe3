"""The attention-head view behind the outliers (Bondarenko et al., section 3).

Heads that learn to "do nothing" put most of their attention on tokens with little information:
the first token ([CLS] / BOS), delimiters ([SEP], "." and ","), and background patches of images.
`attention_mass` measures, per layer and head, the average probability mass each query puts on
those keys (with `output_attentions=True`), and for gated attention the average gate probability.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..modeling.attention import AttentionGate

DELIMITERS = (".", ",")


def delimiter_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's separator / end-of-sequence tokens and of "." and ","."""
    ids = {tokenizer.sep_token_id, tokenizer.eos_token_id}
    for text in DELIMITERS:
        encoded = tokenizer.convert_tokens_to_ids(text)
        if encoded != tokenizer.unk_token_id:
            ids.add(encoded)
    return sorted(i for i in ids if i is not None)


def background_patches(pixel_values: torch.Tensor, patch_size: int, relative_std: float = 0.1) -> torch.Tensor:
    """Patches whose pixel standard deviation is below `relative_std` times the image's.

    Args:
        pixel_values: `[B, C, H, W]`.
    Returns:
        boolean `[B, num_patches]` in the ViT patch order (row-major).
    """
    batch_size, channels, height, width = pixel_values.shape
    patches = pixel_values.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)  # [B, C, h, w, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch_size, -1, channels * patch_size**2)
    image_std = pixel_values.reshape(batch_size, -1).std(dim=1, keepdim=True)  # [B, 1]
    return patches.std(dim=-1) <= relative_std * image_std


def _key_categories(
    batch: Mapping[str, torch.Tensor], seq_length: int, delimiter_ids: list[int], patch_size: int | None
) -> dict[str, torch.Tensor]:
    """Boolean `[B, T_k]` masks of the key categories present in this batch."""
    if "pixel_values" in batch:
        pixel_values = batch["pixel_values"]
        first = torch.zeros(pixel_values.shape[0], seq_length, dtype=torch.bool)
        first[:, 0] = True  # [CLS]
        background = torch.zeros_like(first)
        background[:, 1:] = background_patches(pixel_values, patch_size)
        return {"first": first, "background": background}
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
    # the first real token: position 0 with right padding, the first unmasked one with left padding
    first = torch.zeros_like(mask)
    first[torch.arange(mask.shape[0]), mask.long().argmax(dim=1)] = True
    delimiter = torch.isin(input_ids, torch.tensor(delimiter_ids, dtype=input_ids.dtype)) & mask
    return {"first": first, "delimiter": delimiter}


@torch.no_grad()
def attention_mass(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    delimiter_ids: list[int] | None = None,
) -> dict[str, Any]:
    """Average attention mass per layer and head on first / delimiter tokens or background patches.

    Args:
        batches: dicts of model inputs; for text, `input_ids` (+ `attention_mask`).
        delimiter_ids: token ids counted as delimiters (see `delimiter_token_ids`); text only.
    Returns:
        `mass`: category -> `[layers][heads]` mean over real queries of the probability summed over
        the category's keys; `gate`: `[layers][heads]` mean gate probability (gated attention) or
        None; `num_sequences`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    patch_size = getattr(model.config, "patch_size", None)
    gates = [m for m in model.modules() if isinstance(m, AttentionGate)]
    gate_sums = [torch.zeros(g.num_heads, dtype=torch.float64) for g in gates]
    gate_counts = [0] * len(gates)
    current: dict[str, Any] = {"mask": None, "batch_size": 0}

    def gate_hook(index):
        def hook(module, inputs, output):
            probs = output[..., 0].double().cpu()  # [B or 1, H, T or 1]
            mask = current["mask"]  # [B, T] or None
            if mask is not None and probs.shape[-1] == mask.shape[1] > 1:
                weights = mask.double()[:, None, :]  # [B, 1, T]
                per_sequence = (probs * weights).sum(dim=-1) / weights.sum(dim=-1)  # [B, H]
            else:
                per_sequence = probs.mean(dim=-1).expand(current["batch_size"], -1)  # [B, H]
            gate_sums[index] += per_sequence.sum(dim=0)
            gate_counts[index] += current["batch_size"]

        return hook

    handles = [g.register_forward_hook(gate_hook(i)) for i, g in enumerate(gates)]
    sums: dict[str, torch.Tensor] = {}
    num_sequences = 0
    try:
        for batch in batches:
            batch = {k: v for k, v in batch.items() if k != "labels"}
            token_mask = batch.get("attention_mask")
            if token_mask is None and "input_ids" in batch:
                token_mask = torch.ones_like(batch["input_ids"])
            token_mask = token_mask.cpu() if token_mask is not None else None
            batch_size = next(iter(batch.values())).shape[0]
            current.update(mask=token_mask, batch_size=batch_size)
            outputs = model(**{k: v.to(device) for k, v in batch.items()}, output_attentions=True)
            probs = torch.stack([a.double().cpu() for a in outputs.attentions], dim=1)  # [B, L, H, T_q, T_k]
            seq_length = probs.shape[-1]
            queries = token_mask.double() if token_mask is not None else torch.ones(batch_size, seq_length).double()
            categories = _key_categories(batch, seq_length, delimiter_ids or [], patch_size)
            for name, keys in categories.items():
                per_query = (probs * keys.double()[:, None, None, None, :]).sum(dim=-1)  # [B, L, H, T_q]
                per_sequence = (per_query * queries[:, None, None, :]).sum(dim=-1) / queries.sum(dim=1)[
                    :, None, None
                ]  # [B, L, H]
                sums[name] = sums.get(name, 0) + per_sequence.sum(dim=0)
            num_sequences += batch_size
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if num_sequences == 0:
        raise ValueError("no batch was given")
    return {
        "mass": {name: (total / num_sequences).tolist() for name, total in sums.items()},
        "gate": [(s / c).tolist() for s, c in zip(gate_sums, gate_counts)] if gates else None,
        "num_sequences": num_sequences,
    }


@torch.no_grad()
def attention_probabilities(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], layer: int, head: int
) -> torch.Tensor:
    """Attention probabilities `[T_q, T_k]` of one layer and head for the first example of `inputs`."""
    num_layers, num_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    if not 0 <= layer < num_layers:
        raise ValueError(f"`layer` must be in [0, {num_layers - 1}], got {layer}")
    if not 0 <= head < num_heads:
        raise ValueError(f"`head` must be in [0, {num_heads - 1}], got {head}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = {k: v[:1].to(device) for k, v in inputs.items() if k != "labels"}
    try:
        probs = model(**inputs, output_attentions=True).attentions[layer][0, head]
    finally:
        model.train(was_training)
    mask = inputs.get("attention_mask")
    if mask is not None:
        keep = mask[0].bool()
        probs = probs[keep][:, keep]
    return probs.float().cpu()
