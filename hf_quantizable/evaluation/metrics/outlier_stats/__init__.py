"""The `outlier_stats` evaluate measurement (load the folder with `evaluate.load`)."""
