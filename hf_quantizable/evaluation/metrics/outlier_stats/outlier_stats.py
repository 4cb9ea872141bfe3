"""Outlier statistics (max inf norm, kurtosis) as an `evaluate` measurement.

Load it from its folder: `evaluate.load(hf_quantizable.evaluation.metrics.OUTLIER_STATS_PATH)`.
"""

import datasets
import evaluate
import torch

from hf_quantizable.evaluation.outliers import sequence_stats

_DESCRIPTION = """
Outlier statistics of transformer activations as the official code of Bondarenko et al. (2023),
"Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing", computes them:
for each hooked tensor, the per-sequence infinity norm max|x| averaged over sequences, and the
per-sequence kurtosis over all T*d values, E[(x-mu)^4] / (sigma^4 + 1e-6) with the unbiased standard
deviation (not the excess kurtosis), averaged over sequences. The summary is the max inf norm over
tensors and the average and max kurtosis over the tensors that carry one.
"""

_KWARGS_DESCRIPTION = """
Args:
    activations (`list` of `[T, d]` arrays): one activation per sequence, real tokens only.
    tensors (`list` of `str`): the name of the hooked tensor each activation comes from.
    inf_norm_only (`list` of `str`, optional): tensors that get no kurtosis (the official BERT code
        reports only the inf norm of the residual sum).
Returns:
    max_inf_norm (`float`), avg_kurtosis (`float`), max_kurtosis (`float`),
    per_tensor (`dict`): tensor name -> {"inf_norm", "kurtosis", "num_sequences"}.
Examples:
    >>> import evaluate, numpy as np
    >>> from hf_quantizable.evaluation.metrics import OUTLIER_STATS_PATH
    >>> outlier_stats = evaluate.load(OUTLIER_STATS_PATH)
    >>> x = np.array([[1.0, 2.0], [3.0, 10.0]])
    >>> result = outlier_stats.compute(activations=[x], tensors=["layer.0.output.dense"])
    >>> round(result["max_inf_norm"], 1), round(result["avg_kurtosis"], 4)
    (10.0, 1.2546)
"""

_CITATION = """
@inproceedings{bondarenko2023quantizable,
  title={Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing},
  author={Bondarenko, Yelysei and Nagel, Markus and Blankevoort, Tijmen},
  booktitle={Advances in Neural Information Processing Systems},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class OutlierStats(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "activations": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "tensors": datasets.Value("string"),
                }
            ),
            reference_urls=["https://github.com/Qualcomm-AI-research/outlier-free-transformers"],
        )

    def _compute(self, activations, tensors, inf_norm_only=None):
        if len(activations) == 0:
            raise ValueError("`activations` is empty: add at least one sequence")
        inf_norm_only = set(inf_norm_only or ())
        per_tensor: dict[str, dict[str, list[float]]] = {}
        for x, name in zip(activations, tensors):
            x = torch.as_tensor(x, dtype=torch.float64)
            if x.ndim != 2:
                raise ValueError(f"each activation must be [T, d] (one sequence), got shape {tuple(x.shape)}")
            inf_norm, kurtosis = sequence_stats(x[None])
            values = per_tensor.setdefault(name, {"inf_norm": [], "kurtosis": []})
            values["inf_norm"].append(inf_norm.item())
            values["kurtosis"].append(kurtosis.item())
        summary = {
            name: {
                "inf_norm": sum(v["inf_norm"]) / len(v["inf_norm"]),
                "kurtosis": None if name in inf_norm_only else sum(v["kurtosis"]) / len(v["kurtosis"]),
                "num_sequences": len(v["inf_norm"]),
            }
            for name, v in per_tensor.items()
        }
        kurtoses = [s["kurtosis"] for s in summary.values() if s["kurtosis"] is not None]
        return {
            "max_inf_norm": max(s["inf_norm"] for s in summary.values()),
            "avg_kurtosis": sum(kurtoses) / len(kurtoses) if kurtoses else None,
            "max_kurtosis": max(kurtoses) if kurtoses else None,
            "per_tensor": summary,
        }
