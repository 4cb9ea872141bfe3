"""Quality on fixed inputs: MLM / CLM perplexity, image top-1 accuracy, embedding fidelity.

Batches are built once (fixed masking seed) and then given to every model variant (FP, simulated
W8A8, real INT8), so the numbers compare exactly. Each evaluation can record the outlier statistics
in the same forward passes.
"""

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from .outliers import OutlierStatsCollector

Batch = dict[str, torch.Tensor]


def _blocks(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], block_size: int, max_blocks: int | None):
    """Tokenize non-empty texts, concatenate them and cut blocks of `block_size` tokens (the remainder is dropped)."""
    ids: list[int] = []
    special: list[int] = []
    blocks = []
    for text in texts:
        if not text.strip():
            continue
        encoded = tokenizer(text, return_special_tokens_mask=True)
        ids += encoded["input_ids"]
        special += encoded["special_tokens_mask"]
        while len(ids) >= block_size:
            blocks.append({"input_ids": ids[:block_size], "special_tokens_mask": special[:block_size]})
            ids, special = ids[block_size:], special[block_size:]
            if max_blocks is not None and len(blocks) >= max_blocks:
                return blocks
    return blocks


def _batched(items: Sequence, batch_size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def mlm_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    max_length: int = 128,
    batch_size: int = 8,
    mlm_probability: float = 0.15,
    seed: int = 0,
    max_sequences: int | None = None,
) -> list[Batch]:
    """Fixed masked-LM batches: texts grouped into blocks of `max_length` tokens (as the official
    `run_mlm.py`), masked by `DataCollatorForLanguageModeling` with a fixed seed."""
    if tokenizer.mask_token is None:
        raise ValueError("masked-LM perplexity needs a tokenizer with a mask token")
    blocks = _blocks(tokenizer, texts, max_length, max_sequences)
    if not blocks:
        raise ValueError(f"the texts hold fewer than {max_length} tokens: no evaluation block")
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
    batches = []
    for chunk in _batched(blocks, batch_size):
        batch = collator([dict(block) for block in chunk])
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batches.append(batch)
    return batches


def clm_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    block_size: int = 512,
    batch_size: int = 4,
    max_sequences: int | None = None,
    bos_token_id: int | None = None,
) -> list[Batch]:
    """Causal-LM batches: texts grouped into blocks of `block_size` tokens, labels = inputs. With
    `bos_token_id`, each block is `[bos] + block[:-1]`, as training with `data.bos_at_block_start`."""
    blocks = _blocks(tokenizer, texts, block_size, max_sequences)
    if not blocks:
        raise ValueError(f"the texts hold fewer than {block_size} tokens: no evaluation block")
    if bos_token_id is not None:
        blocks = [{"input_ids": [bos_token_id] + block["input_ids"][:-1]} for block in blocks]
    batches = []
    for chunk in _batched(blocks, batch_size):
        input_ids = torch.tensor([block["input_ids"] for block in chunk])
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids})
    return batches


def image_batches(
    image_processor, dataset, batch_size: int = 32, image_column: str = "image", label_column: str = "label"
) -> list[Batch]:
    """Image classification batches through the model's image processor."""
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"image dataset has no column {column!r}; columns: {dataset.column_names}")
    batches = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        pixel_values = image_processor(images=rows[image_column], return_tensors="pt")["pixel_values"]
        batches.append({"pixel_values": pixel_values, "labels": torch.tensor(rows[label_column])})
    return batches


def _forward_inputs(batch: Batch, model: nn.Module) -> Batch:
    """The model's inputs on its device; float inputs (pixels) in its dtype (fp16 / bf16 models)."""
    parameter = next(model.parameters())
    return {
        k: v.to(parameter.device, parameter.dtype) if v.is_floating_point() else v.to(parameter.device)
        for k, v in batch.items()
        if k not in ("labels", "special_tokens_mask")
    }


@torch.no_grad()
def evaluate_batches(
    model: nn.Module, task: str, batches: Sequence[Batch], outliers: bool = True, desc: str | None = None
) -> dict[str, Any]:
    """Run `batches` through `model` and compute the task metric (and the outlier statistics).

    Args:
        task: `mlm` (perplexity: exp of the mean cross-entropy over the masked tokens), `clm`
            (perplexity: exp of the mean next-token cross-entropy) or `image-classification` (top-1).
    Returns:
        `metric`, `value`, `n` (sequences / images), `tokens` (for perplexities), `outliers`
        (summary of `OutlierStatsCollector`, or None).
    """
    if task not in ("mlm", "clm", "image-classification"):
        raise ValueError(f"`task` must be one of ('mlm', 'clm', 'image-classification'), got {task!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collector = OutlierStatsCollector(model) if outliers else None
    total, count, n = 0.0, 0, 0
    try:
        if collector is not None:
            collector.__enter__()
        for batch in tqdm(batches, desc=desc or task, leave=False):
            outputs = model(**_forward_inputs(batch, model))
            logits = outputs.logits.float()
            labels = batch["labels"].to(device)
            if task == "mlm":
                losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
                total += losses.item()
                count += int((labels != -100).sum())
            elif task == "clm":
                shift_labels = labels[:, 1:].masked_fill(batch["attention_mask"][:, 1:].to(device) == 0, -100)
                losses = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1), shift_labels.flatten(), reduction="sum", ignore_index=-100
                )
                total += losses.item()
                count += int((shift_labels != -100).sum())
            else:
                total += (logits.argmax(dim=-1) == labels).sum().item()
                count += labels.numel()
            n += labels.shape[0]
    finally:
        if collector is not None:
            collector.__exit__(None, None, None)
        model.train(was_training)
    if task == "image-classification":
        metric, value = "accuracy", total / count
    else:
        metric = "perplexity"
        value = math.exp(total / count) if total / count < 700 else math.inf
    return {
        "metric": metric,
        "value": value,
        "n": n,
        "tokens": count if task != "image-classification" else None,
        "outliers": collector.summary() if collector is not None else None,
    }


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    """Mean-pooled last hidden states over the real tokens (sentence-transformers' pooling) `[N, d]`."""
    model.eval()
    embeddings = []
    for batch in batches:
        inputs = _forward_inputs(batch, model)
        hidden = model(**inputs).last_hidden_state.float()  # [B, T, d]
        mask = inputs["attention_mask"].to(hidden.dtype)[:, :, None]
        embeddings.append(((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)).cpu())
    return torch.cat(embeddings)


def embedding_cosine_similarity(reference: nn.Module, candidate: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    """Per-sentence cosine similarity `[N]` of the sentence embeddings of two models on the same batches."""
    return F.cosine_similarity(sentence_embeddings(reference, batches), sentence_embeddings(candidate, batches), dim=-1)
