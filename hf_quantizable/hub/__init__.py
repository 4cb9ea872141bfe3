"""Hugging Face Hub publishing: model cards rendered from results files, repo folders, upload."""

from .card import CardInputs, render_model_card, validate_model_card
from .publish import RepoPlan, plan_push, write_plan
from .upload import check_repo_id, resolve_token, upload_repo_folder

__all__ = [
    "CardInputs",
    "RepoPlan",
    "check_repo_id",
    "plan_push",
    "render_model_card",
    "resolve_token",
    "upload_repo_folder",
    "validate_model_card",
    "write_plan",
]
