"""Evaluation: outlier statistics, FP vs INT8 quality, GLUE fine-tuning, lm-eval, plots, results."""

from .outliers import OutlierStatsCollector, compute_outlier_stats, sequence_stats
from .results import ResultRecord, read_results, write_results

__all__ = [
    "OutlierStatsCollector",
    "ResultRecord",
    "compute_outlier_stats",
    "read_results",
    "sequence_stats",
    "write_results",
]
