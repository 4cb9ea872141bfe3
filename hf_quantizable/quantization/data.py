"""Calibration batches from local text files or image folders."""

from pathlib import Path

import torch

from .. import families
from ..paths import recipe_data_field, shared_data_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def default_calibration_data() -> Path:
    """WikiText-2 validation text from the shared offline data folder."""
    return shared_data_dir() / "wikitext-2" / "valid.txt"


def read_lines(path: str | Path, min_chars: int = 20) -> list[str]:
    """Non-empty, non-heading lines of a text file (WikiText headings start with ' = ')."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path!s} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    return [line.strip() for line in lines if len(line.strip()) >= min_chars and not line.strip().startswith("=")]


def text_batches(tokenizer, lines: list[str], batch_size: int, max_length: int, num_batches: int) -> list[dict]:
    """Tokenized batches of consecutive lines (padded to the longest line, truncated to `max_length`)."""
    batches = []
    for start in range(0, min(len(lines), batch_size * num_batches), batch_size):
        encoded = tokenizer(
            lines[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append(dict(encoded))
    return batches


def image_batches(image_processor, folder: str | Path, batch_size: int, num_batches: int) -> list[dict]:
    """Batches of `pixel_values` from the images found (recursively, sorted) under `folder`."""
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    files = files[: batch_size * num_batches]
    batches = []
    for start in range(0, len(files), batch_size):
        images = [Image.open(f).convert("RGB") for f in files[start : start + batch_size]]
        batches.append({"pixel_values": image_processor(images, return_tensors="pt")["pixel_values"]})
    return batches


def _load_processor(auto_class, model_dir: str | Path, what: str):
    try:
        return auto_class.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the {what} of {model_dir!s}: {error}") from None


def calibration_batches(
    model_dir: str | Path, data: str | Path | None, batch_size: int, max_length: int, num_batches: int, model_type: str
) -> tuple[list[dict[str, torch.Tensor]], object]:
    """Calibration batches for the model in `model_dir` and its tokenizer / image processor.

    Text models read a text file (one example per line; default WikiText-2 validation; packed into
    blocks behind a BOS token when the model's training recipe has `bos_at_block_start`); image
    models (ViT) read an image folder.
    """
    if families.modality(families.family_of(model_type)) == "image":
        from transformers import AutoImageProcessor

        if data is None:
            raise ValueError(f"`--dataset` must name an image folder for image models ({model_type})")
        if Path(data).is_file():
            raise ValueError(
                f"calibration data {data!s} is a file; image models ({model_type}) calibrate on an image folder"
            )
        if not Path(data).is_dir():
            raise FileNotFoundError(f"calibration image folder {data!s} does not exist")
        processor = _load_processor(AutoImageProcessor, model_dir, "image processor")
        return image_batches(processor, data, batch_size, num_batches), processor
    from transformers import AutoTokenizer

    data = Path(data) if data is not None else default_calibration_data()
    if data.is_dir():
        raise ValueError(f"calibration data {data!s} is a folder; a text model reads a text file, one example a line")
    if not data.is_file():
        raise FileNotFoundError(f"calibration text file {data!s} does not exist")
    tokenizer = _load_processor(AutoTokenizer, model_dir, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if recipe_data_field(model_dir, "bos_at_block_start", False):
        return bos_block_batches(tokenizer, read_lines(data), batch_size, max_length, num_batches), tokenizer
    return text_batches(tokenizer, read_lines(data), batch_size, max_length, num_batches), tokenizer


def bos_block_batches(tokenizer, lines: list[str], batch_size: int, max_length: int, num_batches: int) -> list[dict]:
    """Packed blocks of `max_length` tokens, each starting with BOS: the shape a causal LM trained with
    `data.bos_at_block_start` saw (its activations at the first token differ from any other's)."""
    from ..evaluation.quality import clm_batches

    batches = clm_batches(
        tokenizer, lines, max_length, batch_size, batch_size * num_batches, bos_token_id=tokenizer.bos_token_id
    )
    return [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
