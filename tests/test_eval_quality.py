"""Evaluation data and quality metrics against direct computations."""

import gzip
import math
import struct

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, ViTImageProcessor

from hf_quantizable.evaluation.data import load_mnist_idx, load_split
from hf_quantizable.evaluation.quality import (
    clm_batches,
    embedding_cosine_similarity,
    evaluate_batches,
    image_batches,
    mlm_batches,
)
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def bert_tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def wikitext_lines(data_dir):
    return load_split(str(data_dir / "wikitext-2"), split="test", limit=300)["text"]


def test_local_text_splits(data_dir, tmp_path):
    valid = load_split(str(data_dir / "wikitext-2"), split="validation", limit=5)
    assert valid.column_names == ["text"] and len(valid) == 5
    (tmp_path / "test.jsonl").write_text('{"text": "a b"}\n{"text": "c"}\n')
    assert load_split(str(tmp_path), split="test")["text"] == ["a b", "c"]
    assert load_split("json", split="test", data_files=str(tmp_path / "test.jsonl"))["text"] == ["a b", "c"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(str(tmp_path / "missing"), split="test")
    with pytest.raises(FileNotFoundError, match="no file for split 'train'"):
        load_split(str(tmp_path), split="train")


def test_mnist_idx_reader(tmp_path):
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 2, 4, 4) + images.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB1I", 0, 8, 1, 2) + bytes([7, 3]))
    dataset = load_split(str(tmp_path), split="test")
    assert dataset["label"] == [7, 3]
    assert np.array_equal(np.asarray(dataset[1]["image"]), images[1])
    with pytest.raises(FileNotFoundError, match="train"):
        load_mnist_idx(tmp_path, "train")


def test_mlm_perplexity_equals_direct_computation(bert_tokenizer, wikitext_lines):
    batches = mlm_batches(bert_tokenizer, wikitext_lines, max_length=32, batch_size=3, seed=5, max_sequences=6)
    again = mlm_batches(bert_tokenizer, wikitext_lines, max_length=32, batch_size=3, seed=5, max_sequences=6)
    other_seed = mlm_batches(bert_tokenizer, wikitext_lines, max_length=32, batch_size=3, seed=6, max_sequences=6)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(batches, again))
    assert not all(torch.equal(a["labels"], b["labels"]) for a, b in zip(batches, other_seed))
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.shape == (6, 32)
    masked_tokens = labels[labels != -100]
    assert not torch.isin(masked_tokens, torch.tensor(bert_tokenizer.all_special_ids)).any()  # [CLS]/[SEP] never
    assert 0.05 < (labels != -100).float().mean() < 0.3  # mask probability 0.15

    model = tiny_model("bert", vocab_size=bert_tokenizer.vocab_size)
    result = evaluate_batches(model, "mlm", batches)
    losses, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"]).logits
            for b, t in (batch["labels"] != -100).nonzero().tolist():
                losses -= torch.log_softmax(logits[b, t], dim=-1)[batch["labels"][b, t]].item()
                count += 1
    assert result["tokens"] == count and result["n"] == 6
    assert result["value"] == pytest.approx(math.exp(losses / count), rel=1e-5)
    assert result["outliers"]["num_sequences"] == 6


def test_clm_perplexity_equals_direct_computation(bert_tokenizer, wikitext_lines):
    batches = clm_batches(bert_tokenizer, wikitext_lines, block_size=24, batch_size=2, max_sequences=4)
    model = tiny_model("opt", vocab_size=bert_tokenizer.vocab_size)
    result = evaluate_batches(model, "clm", batches, outliers=False)
    with torch.no_grad():
        losses = [model(input_ids=b["input_ids"], labels=b["labels"]).loss for b in batches]
    # every batch holds 2 x 23 predicted tokens: the token-weighted mean is the mean of batch means
    assert result["tokens"] == 4 * 23
    assert result["value"] == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    assert result["outliers"] is None
    with pytest.raises(ValueError, match="fewer than 100000 tokens"):
        clm_batches(bert_tokenizer, wikitext_lines[:5], block_size=100000)


def test_image_accuracy(tmp_path):
    images = (np.random.default_rng(0).random((10, 28, 28)) * 255).astype(np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 10, 28, 28) + images.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB1I", 0, 8, 1, 10) + bytes(range(10)))
    dataset = load_split(str(tmp_path), split="test")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, do_convert_rgb=True)
    batches = image_batches(processor, dataset, batch_size=4)
    assert batches[0]["pixel_values"].shape == (4, 3, 16, 16)
    model = tiny_model("vit", num_labels=10)
    result = evaluate_batches(model, "image-classification", batches)
    with torch.no_grad():
        predictions = torch.cat([model(pixel_values=b["pixel_values"]).logits.argmax(-1) for b in batches])
    assert result["value"] == pytest.approx((predictions == torch.arange(10)).float().mean().item())
    assert result["n"] == 10 and result["metric"] == "accuracy"
    with pytest.raises(ValueError, match="no column 'img'"):
        image_batches(processor, dataset, image_column="img")


def test_embedding_cosine_similarity(bert_tokenizer):
    from hf_quantizable import QuantizableBertConfig, QuantizableBertModel
    from tests.conftest import TINY_BERT

    torch.manual_seed(0)
    model = QuantizableBertModel(QuantizableBertConfig(**{**TINY_BERT, "vocab_size": bert_tokenizer.vocab_size}))
    batch = dict(bert_tokenizer(["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt"))
    assert torch.allclose(embedding_cosine_similarity(model, model, [batch]), torch.ones(2))
    other = QuantizableBertModel(model.config)
    similarity = embedding_cosine_similarity(model, other, [batch])
    assert similarity.shape == (2,) and (similarity < 0.999).all()
