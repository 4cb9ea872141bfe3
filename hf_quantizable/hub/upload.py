"""Upload an assembled repo folder with `HfApi.create_repo` + `HfApi.upload_folder`."""

from pathlib import Path

import httpx2
from huggingface_hub import CommitInfo, HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def check_repo_id(repo_id: str, option: str = "--repo-id") -> str:
    """`repo_id` if it is a valid `ORG/NAME` model repo id; ValueError naming the option otherwise."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"{option} must look like ORG/NAME (a user or organization, a slash, a name), got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{option} {repo_id!r} is not a valid Hub repo id: {error}") from None
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """The token to upload with: `token`, else `HF_TOKEN` or the one saved by `hf auth login`."""
    token = token or get_token()
    if not token:
        raise ValueError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --local-dir / --dry-run to skip uploading)"
        )
    return token


def upload_repo_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str,
    private: bool = False,
    endpoint: str | None = None,
    allow_patterns: list[str] | None = None,
    commit_message: str = "Upload model, card and results with hf_quantizable",
) -> CommitInfo:
    """Create `repo_id` (if needed) and upload `folder` (the files matching `allow_patterns`) as one commit.

    Raises OSError with a one-line message when the Hub refuses (401, 403, ...) or cannot be reached.
    """
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message,
            allow_patterns=allow_patterns,
        )
    except (OSError, httpx2.HTTPError) as error:  # HfHubHTTPError, OfflineModeIsEnabled, connection errors
        raise OSError(f"upload to {repo_id} failed: {hub_error_line(error)}") from None


def hub_error_line(error: BaseException) -> str:
    """The first line of a Hub or network error, with the HTTP status when there is one."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"HTTP {status}: {line}" if status and str(status) not in line else line
