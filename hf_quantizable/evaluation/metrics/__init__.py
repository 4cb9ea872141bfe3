"""`evaluate` modules that load from a local path (Hub-hosted modules are not needed)."""

from pathlib import Path

OUTLIER_STATS_PATH = str(Path(__file__).with_name("outlier_stats"))
