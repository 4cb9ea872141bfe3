"""Hugging Face Hub publishing: model cards rendered from results files, repo folders, upload."""

from .card import CardInputs, render_model_card, validate_model_card

__all__ = ["CardInputs", "render_model_card", "validate_model_card"]
