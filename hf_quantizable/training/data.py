"""Training data: Hub corpora, local files or the embedded default, tokenized and packed with `datasets`.

Text is tokenized with `datasets.map` (cached to disk next to the loaded files, so a second run
skips it) and packed into fixed-length blocks (the `group_texts` of the transformers examples).
Images are decoded and augmented on the fly with `with_transform`.
"""

import codecs
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, IterableDataset, concatenate_datasets, load_dataset
from datasets import Image as ImageFeature
from datasets.config import HF_DATASETS_CACHE
from datasets.exceptions import DatasetsError
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging

from .. import families
from ..paths import write_text_atomic
from . import embedded
from .presets import AUGMENTATIONS, DataSpec, is_local_path

logger = logging.get_logger(__name__)

# Hub corpora of the papers: name -> [(dataset, config)], concatenated.
HUB_CORPORA: dict[str, list[tuple[str, str | None]]] = {
    "bookcorpus+wikipedia": [("bookcorpus/bookcorpus", None), ("wikimedia/wikipedia", "20231101.en")],
    "wikitext-103": [("Salesforce/wikitext", "wikitext-103-raw-v1")],
    "wikitext-2": [("Salesforce/wikitext", "wikitext-2-raw-v1")],
    "imagenet-1k": [("ILSVRC/imagenet-1k", None)],
}
TEXT_SUFFIXES = {".txt": "text", ".tokens": "text", ".raw": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def embedded_cache_dir() -> Path:
    return Path(HF_DATASETS_CACHE) / "hf_quantizable_embedded"


EMBEDDED_TEXT = {"embedded": embedded.generate_corpus, "embedded-noop": embedded.generate_noop_corpus}


def _embedded_text_file(kind: str, num_lines: int, seed: int) -> Path:
    """Write the generated corpus once (atomic rename), so `load_dataset("text")` caches the map."""
    path = embedded_cache_dir() / f"{kind}-{num_lines}-{seed}.txt"
    if not path.exists():
        write_text_atomic(path, "\n".join(EMBEDDED_TEXT[kind](num_lines, seed)) + "\n")
    return path


def _split(dataset: Dataset, eval_fraction: float, seed: int) -> DatasetDict:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"`eval_fraction` must be in (0, 1), got {eval_fraction}")
    parts = dataset.train_test_split(test_size=eval_fraction, seed=seed)
    return DatasetDict(train=parts["train"], validation=parts["test"])


_SNIFF_BYTES = 1 << 16


def check_data_file(path: Path) -> None:
    """Refuse a data file that is empty, binary or not UTF-8 (judged on its head), naming the file."""
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if not head:
        raise ValueError(f"data file {path} is empty")
    if b"\0" in head:
        raise ValueError(f"data file {path} is binary, not UTF-8 text")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError as err:
        raise ValueError(f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if len(head) < _SNIFF_BYTES and not text.strip():
        raise ValueError(f"data file {path} holds only whitespace")


def _local_builder(path: Path) -> tuple[str, dict[str, Any]]:
    """`load_dataset` builder and kwargs for a local file or folder (whose text files are checked)."""
    if path.is_file():
        builder = TEXT_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"unsupported data file {path}: use one of {sorted(TEXT_SUFFIXES)} or an image folder")
        check_data_file(path)
        return builder, {"data_files": str(path)}
    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        return "imagefolder", {"data_dir": str(path)}
    text_files = [p for p in files if TEXT_SUFFIXES.get(p.suffix.lower()) == "text"]
    if not text_files:
        raise ValueError(f"{path} holds neither images nor text files ({sorted(TEXT_SUFFIXES)})")
    for text_file in text_files:
        check_data_file(text_file)
    return "text", {"data_files": [str(p) for p in text_files]}


def _load_local(path: Path, streaming: bool) -> DatasetDict:
    builder, kwargs = _local_builder(path)
    try:
        return load_dataset(builder, **kwargs, streaming=streaming)
    except (UnicodeDecodeError, DatasetsError, ValueError) as err:
        raise ValueError(f"could not read the dataset {path}: {' '.join(str(err).split())}") from None


def _load_hub(name: str, config: str | None, **kwargs) -> DatasetDict | Dataset:
    try:
        return load_dataset(name, config, **kwargs)
    except (OSError, DatasetsError) as err:  # offline, unreachable, unknown or gated dataset
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"could not load the Hub dataset {name!r} ({reason}): a Hub dataset needs the Hugging Face Hub "
            "(network access or a cached copy); for local data pass --dataset FILE_OR_FOLDER"
        ) from None


def load_raw_datasets(spec: DataSpec, seed: int) -> DatasetDict:
    """Train and validation splits of the raw data (`IterableDataset`s when `spec.streaming`)."""
    if spec.dataset.startswith("embedded"):
        raise ValueError(
            f"unknown embedded dataset {spec.dataset!r}; allowed: {', '.join(EMBEDDED_TEXT)} (text), embedded (images)"
        )
    path = Path(spec.dataset).expanduser()
    if path.exists():
        loaded = _load_local(path, spec.streaming)
    elif is_local_path(spec.dataset):
        raise ValueError(f"data.dataset {spec.dataset!r} does not exist (a local file or folder was expected)")
    elif spec.dataset in HUB_CORPORA:
        sources = HUB_CORPORA[spec.dataset]
        if len(sources) == 1:
            loaded = _load_hub(*sources[0], streaming=spec.streaming)
        else:  # concatenated corpora: train splits only, text column only
            parts = [_load_hub(n, c, split="train", streaming=spec.streaming) for n, c in sources]
            parts = [p.select_columns(["text"]) for p in parts]
            loaded = DatasetDict(train=concatenate_datasets(parts))
    else:
        loaded = _load_hub(spec.dataset, spec.dataset_config, streaming=spec.streaming)
    train = loaded["train"]
    for name in ("validation", "valid", "test"):
        if name in loaded:
            return DatasetDict(train=train, validation=loaded[name])
    if isinstance(train, IterableDataset):
        return DatasetDict(
            train=train.skip(spec.stream_eval_examples), validation=train.take(spec.stream_eval_examples)
        )
    return _split(train, spec.eval_fraction, seed)


def _text_column(dataset: Dataset | IterableDataset, spec: DataSpec) -> str:
    columns = dataset.column_names or list(next(iter(dataset)).keys())
    column = spec.text_column or ("text" if "text" in columns else None)
    if column is None or column not in columns:
        raise ValueError(
            f"text column {spec.text_column or 'text'!r} not found; columns: {columns} (set text_column=...)"
        )
    return column


def _texts(dataset: Dataset | IterableDataset, column: str, limit: int) -> Iterator[str]:
    for i, example in enumerate(dataset):
        if i >= limit:
            return
        if example[column] and example[column].strip():
            yield example[column]


def _wordpiece_tokenizer(texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BERT's: lowercase WordPiece, `[CLS] A [SEP] B [SEP]`."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def _byte_level_bpe_tokenizer(texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """OPT's: byte-level BPE with `</s>` as the beginning-of-sequence token."""
    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    # OPT prepends `</s>` as its beginning-of-sequence token.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B:1", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )


# A config class's `_trained_tokenizer` -> the builder.
TOKENIZER_BUILDERS = {"wordpiece": _wordpiece_tokenizer, "byte_level_bpe": _byte_level_bpe_tokenizer}


def train_tokenizer(family: str, texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer trained offline with `tokenizers`, of the kind the family's config class names in
    `_trained_tokenizer`: WordPiece (BERT, lowercase) or byte-level BPE (OPT)."""
    kind = families.config_class(family)._trained_tokenizer if family in families.names() else None
    if kind is None:
        allowed = [f for f in families.names() if families.config_class(f)._trained_tokenizer is not None]
        raise ValueError(f"no tokenizer to train for family {family!r}; allowed: {', '.join(allowed)}")
    return TOKENIZER_BUILDERS[kind](texts, vocab_size)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name)`; ValueError naming the tokenizer when it cannot be loaded."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load the tokenizer {name!r}: {' '.join(str(err).split())}") from None


def _cap(train: Dataset | IterableDataset, max_samples: int | None) -> Dataset | IterableDataset:
    """The first `max_samples` training examples (all when None)."""
    if max_samples is None:
        return train
    if isinstance(train, IterableDataset):
        return train.take(max_samples)
    return train.select(range(min(max_samples, len(train))))


@dataclass
class TextData:
    train: Dataset | IterableDataset
    validation: Dataset
    tokenizer: PreTrainedTokenizerBase


def group_texts(examples: dict[str, list], block_size: int, bos_token_id: int | None = None) -> dict[str, list]:
    """Concatenate tokenized texts and cut them into `block_size` blocks (the remainder is dropped).

    With `bos_token_id`, every block's input ids are `[bos] + block[:-1]` (same length, other columns
    as cut), so each sequence starts with the same token (`data.bos_at_block_start`).
    """
    concatenated = {k: [t for seq in examples[k] for t in seq] for k in examples}
    total = (len(concatenated["input_ids"]) // block_size) * block_size
    blocks = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in concatenated.items()}
    if bos_token_id is not None:
        blocks["input_ids"] = [[bos_token_id] + ids[:-1] for ids in blocks["input_ids"]]
    return blocks


def block_start_token(spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id every block starts with (`data.bos_at_block_start`), else None."""
    if not spec.bos_at_block_start:
        return None
    if tokenizer.bos_token_id is None:
        raise ValueError("data.bos_at_block_start=true needs a tokenizer with a BOS token; this one has none")
    return tokenizer.bos_token_id


def load_text_datasets(
    spec: DataSpec, family: str, seed: int, tokenizer: PreTrainedTokenizerBase | None = None
) -> TextData:
    """Tokenized, packed train/validation sets and the tokenizer (given, loaded by name, or trained)."""
    if spec.dataset in EMBEDDED_TEXT:
        corpus = _embedded_text_file(spec.dataset, spec.embedded_size, seed=0)
        raw = _split(load_dataset("text", data_files=str(corpus), split="train"), spec.eval_fraction, seed)
    else:
        raw = load_raw_datasets(spec, seed)
    raw["train"] = _cap(raw["train"], spec.max_train_samples)
    column = _text_column(raw["train"], spec)
    if tokenizer is None:
        if spec.tokenizer == "train":
            tokenizer = train_tokenizer(family, _texts(raw["train"], column, limit=200_000), spec.vocab_size)
        else:
            tokenizer = load_tokenizer(spec.tokenizer)
    objective = families.training_objective(family)
    if objective == "clm" and tokenizer.pad_token is None:  # the causal-LM collator pads
        tokenizer.pad_token = tokenizer.eos_token
    masked = objective == "mlm"  # the masked-LM collator leaves the special tokens unmasked

    def tokenize(batch):
        texts = [t for t in batch[column] if t and t.strip()]
        return tokenizer(texts, return_special_tokens_mask=masked, return_attention_mask=False)

    block = spec.seq_length
    out = {}
    for split, dataset in raw.items():
        map_kwargs = (
            {} if isinstance(dataset, IterableDataset) else {"num_proc": spec.num_proc, "desc": f"tokenize {split}"}
        )
        tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, **map_kwargs)
        if not isinstance(dataset, IterableDataset):
            map_kwargs["desc"] = f"pack {split} into blocks of {block}"
        grouping = {"block_size": block, "bos_token_id": block_start_token(spec, tokenizer)}
        out[split] = tokenized.map(group_texts, batched=True, fn_kwargs=grouping, **map_kwargs)
    validation = out["validation"]
    if isinstance(validation, IterableDataset):
        validation = Dataset.from_list(list(validation))
    if len(validation) == 0:
        raise ValueError(f"the validation split holds no full block of {block} tokens; lower seq_length or add data")
    return TextData(train=out["train"], validation=validation, tokenizer=tokenizer)


# --- images ---


def _embedded_images(spec: DataSpec) -> Dataset:
    images, labels = embedded.generate_images(spec.embedded_size, spec.image_size, seed=0)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(embedded.SHAPE_CLASSES))})
    from PIL import Image

    return Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in images], "label": labels.tolist()}, features=features
    )


def _image_columns(dataset: Dataset | IterableDataset, spec: DataSpec) -> tuple[str, str]:
    columns = dataset.column_names or []
    image = spec.image_column or next((c for c in ("image", "img", "pixel_values") if c in columns), None)
    label = spec.label_column or next((c for c in ("label", "labels", "fine_label") if c in columns), None)
    if image not in columns or label not in columns:
        raise ValueError(f"image/label columns not found in {columns}; set image_column=... and label_column=...")
    return image, label


def random_resized_crop_flip(pixels: torch.Tensor, generator: torch.Generator, scale=(0.35, 1.0), flip: bool = True):
    """Built-in augmentation (no torchvision): random resized crop and horizontal flip of `[C, H, W]`."""
    _, height, width = pixels.shape
    area = float(torch.empty(1).uniform_(*scale, generator=generator)) * height * width
    ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)))
    crop_h = min(height, max(1, round(math.sqrt(area / ratio))))
    crop_w = min(width, max(1, round(math.sqrt(area * ratio))))
    top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
    crop = pixels[:, top : top + crop_h, left : left + crop_w]
    crop = F.interpolate(crop[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        crop = crop.flip(-1)
    return crop


@dataclass
class ImageData:
    train: Dataset | IterableDataset
    validation: Dataset
    image_processor: Any
    labels: list[str]


def _timm_transforms(spec: DataSpec, mean, std):
    import timm.data

    train = timm.data.create_transform(
        spec.image_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
        re_prob=0.25, re_mode="pixel", re_count=1, mean=mean, std=std,
    )  # fmt: skip
    evaluation = timm.data.create_transform(spec.image_size, is_training=False, crop_pct=0.875, mean=mean, std=std)
    return train, evaluation


def load_image_datasets(spec: DataSpec, seed: int) -> ImageData:
    """Train/validation image sets yielding `pixel_values` and `labels`, plus the image processor."""
    from transformers import ViTImageProcessorPil

    augmentation = spec.augmentation or "none"  # `augmentation=none` parses to None on the command line
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"`augmentation` must be one of {', '.join(AUGMENTATIONS)}; got {spec.augmentation!r}")
    raw = (
        _split(_embedded_images(spec), spec.eval_fraction, seed)
        if spec.dataset == "embedded"
        else load_raw_datasets(spec, seed)
    )
    raw["train"] = _cap(raw["train"], spec.max_train_samples)
    image_col, label_col = _image_columns(raw["train"], spec)
    features = raw["train"].features or {}
    label_feature = features.get(label_col)
    labels = (
        list(label_feature.names) if isinstance(label_feature, ClassLabel) else sorted(set(raw["train"][label_col]))
    )
    processor = ViTImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
    timm_pipeline = None
    if augmentation in ("timm", "auto"):
        try:
            timm_pipeline = _timm_transforms(spec, processor.image_mean, processor.image_std)
        except Exception as err:  # not installed, or a torchvision that does not match this torch
            if augmentation == "timm":
                raise ValueError(
                    f"augmentation=timm needs an importable timm (with a torchvision matching this torch): {err}; "
                    "use augmentation=auto or basic"
                ) from None
            logger.warning("timm does not import (%s): using the built-in `basic` augmentation", err)
            augmentation = "basic"
    generator = torch.Generator().manual_seed(seed)

    def transform(batch, training: bool):
        images = [img.convert("RGB") for img in batch[image_col]]
        if timm_pipeline is not None:
            pipeline = timm_pipeline[0] if training else timm_pipeline[1]
            pixels = torch.stack([pipeline(img) for img in images])
        else:
            pixels = processor(images, return_tensors="pt")["pixel_values"]
            if training and augmentation == "basic":
                pixels = torch.stack([random_resized_crop_flip(p, generator) for p in pixels])
        return {"pixel_values": pixels, "labels": torch.as_tensor(batch[label_col])}

    train, validation = raw["train"], raw["validation"]
    if isinstance(train, IterableDataset):
        train = train.map(lambda b: transform(b, True), batched=True, remove_columns=train.column_names)
    else:
        train = train.with_transform(lambda b: transform(b, True))
    if isinstance(validation, IterableDataset):
        validation = Dataset.from_list(list(validation))
    validation = validation.with_transform(lambda b: transform(b, False))
    return ImageData(train=train, validation=validation, image_processor=processor, labels=[str(x) for x in labels])
