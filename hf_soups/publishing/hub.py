"""Pushing a soup to the Hugging Face Hub, in one commit.

[`push_soup`] is what `Soup.push_to_hub` and `merge_models(..., push_to_hub=...)` run. It follows
`transformers`' `push_to_hub` conventions (the repository is created when missing, `revision` names a
branch, `create_pr` opens a pull request) with two guarantees:

- **one commit or none**: every file (sharded safetensors, config, tokenizer files, the model card as
  `README.md`, the Hub's `.eval_results/*.yaml` files and `soup_recipe.yaml`) goes into a single
  `create_commit`. Large files are uploaded first and only become visible when that commit lands, so a push that
  fails midway leaves the repository as it was, and the local soup untouched;
- **streamed soups stay on disk**: a soup written with `output_dir=` is uploaded from its folder; the
  model is never loaded. An in-memory soup is first saved to a temporary folder.

Failures (no token, 401/403, a missing revision, the network down, offline mode) raise a
[`HubError`] that says what to do.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.output_dir import sigterm_as_interrupt
from ..errors import HubError
from ..utils import is_main_process

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo

    from ..soup import Soup

logger = logging.getLogger(__name__)

_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
_PR_REF = re.compile(r"^refs/pr/\d+$")


def _resolve_token(token: str | bool | None) -> str:
    from huggingface_hub import get_token

    if token is False:
        raise HubError(
            "push_to_hub needs a Hugging Face token with write access, but token=False was passed. Pass token=<your "
            "token>, set HF_TOKEN, or log in with `hf auth login`."
        )
    if isinstance(token, str) and token:
        return token
    found = get_token()
    if not found:
        raise HubError(
            "No Hugging Face token found: pushing needs a token with write access. Pass token=<your token>, set the "
            "HF_TOKEN environment variable, or log in with `hf auth login`. The soup was not pushed and is unchanged."
        )
    return found


def _soup_files(folder: Path) -> dict[str, Path]:
    """Files of a soup folder to upload, by path in the repo (hidden files and temporary folders skipped)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        out[rel.as_posix()] = path
    return out


def _default_message(soup: Soup) -> str:
    try:
        from ..recipes import get_recipe

        pretty = get_recipe(soup.method).pretty_name
    except Exception:
        pretty = soup.method
    kept = sum(1 for i in soup.ingredients if i.selected is not False)
    return f"Upload {pretty} of {kept} model{'s' if kept != 1 else ''} with hf_soups"


def _description(soup: Soup) -> str:
    lines = ["Ingredients:"]
    for ing in soup.ingredients:
        rev = f"@{ing.revision[:12]}" if isinstance(ing.revision, str) and ing.revision else ""
        weight = f" weight={ing.weight:.4g}" if ing.weight is not None else ""
        kept = "" if ing.selected is not False else " (not kept)"
        lines.append(f"- {ing.name}{rev}{weight}{kept}")
    if soup.score is not None:
        lines.append(f"Held-out {soup.metric_key or 'score'}: {soup.score:.4f}")
    return "\n".join(lines)


def push_soup(
    soup: Soup,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
) -> CommitInfo | None:
    """Push a soup (weights, config, tokenizer files, model card and recipe) to the Hub in one commit.

    Args:
        soup ([`Soup`]):
            The soup. A streamed soup (`soup.output_dir` set) is uploaded from its folder without loading
            the model; an in-memory soup is saved to a temporary folder first.
        repo_id (`str`):
            Target repository (`"name"` for your namespace, or `"org/name"`); created when missing.
        private (`bool`, *optional*):
            Visibility of a repository created by this call (an existing one keeps its visibility).
        token (`str` or `bool`, *optional*):
            Hub token with write access. Defaults to `HF_TOKEN`, then the token stored by `hf auth login`.
        revision (`str`, *optional*):
            Branch to commit to (created from the default branch when missing, as `transformers` does), or an
            existing `refs/pr/N`. Defaults to the default branch.
        commit_message (`str`, *optional*):
            Defaults to `"Upload <recipe> of <N> models with hf_soups"`.
        commit_description (`str`, *optional*):
            Defaults to the list of ingredients with their revisions and weights.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request with the soup instead of committing to the branch.

    Returns:
        `huggingface_hub.CommitInfo`: the commit (`.oid`, `.commit_url`, `.pr_url` when `create_pr`), or `None`
        on a non-main process of a distributed run (only the main process pushes).

    Raises:
        [`HubError`]: no token, authentication or permission failure (401/403), a revision that does not exist
            (404), a tag or commit given as `revision`, the Hub unreachable or offline mode. Nothing is committed
            in that case and the local soup is unchanged.

    Example:

    ```python
    >>> soup = merge_models(["org/ft-a", "org/ft-b@v2"], output_dir="./soup")  # doctest: +SKIP
    >>> info = soup.push_to_hub("my-user/my-soup", private=True)  # doctest: +SKIP
    >>> info.commit_url  # doctest: +SKIP
    'https://huggingface.co/my-user/my-soup/commit/...'
    ```
    """
    if not is_main_process():
        logger.info("Not the main process: skipping push_to_hub(%r).", repo_id)
        return None
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise HubError(f"push_to_hub needs a repository id like 'my-user/my-soup', got {repo_id!r}.")
    if revision is not None and (_COMMIT_HASH.match(revision) or revision.startswith("refs/tags/")):
        raise HubError(
            f"Cannot push to revision {revision!r}: commits and tags are read-only. Pass a branch name (created when "
            "missing) or create_pr=True."
        )

    from huggingface_hub import CommitOperationAdd, HfApi

    token_str = _resolve_token(token)
    api = HfApi(token=token_str, library_name="hf_soups")
    where = f"the soup is still at {soup.output_dir}" if soup.output_dir else "the soup is still in memory"

    with _hub_errors(repo_id, revision, where):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = repo_url.repo_id
        if revision is not None and not create_pr:
            _ensure_branch(api, repo_id, revision)
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="hf_soups_push_") as tmp:
            tmp_dir = Path(tmp)
            if soup.output_dir is not None and Path(soup.output_dir).is_dir():
                folder = Path(soup.output_dir)
                files = _soup_files(folder)
            else:
                folder = soup.save_pretrained(tmp_dir / "soup")
                files = _soup_files(folder)
            from .card import write_eval_results, write_model_card

            extras = tmp_dir / "extras"
            files["README.md"] = write_model_card(soup, extras, repo_id=repo_id)
            for path in write_eval_results(soup, extras):  # hidden folder: _soup_files skips the local copy
                files[path.relative_to(extras).as_posix()] = path
            from .recipe_file import write_recipe

            # the recipe on disk names this machine's folders; the pushed one does not (issue 12, defect 13)
            files["soup_recipe.yaml"] = write_recipe(soup, extras, portable=True)
            operations = [
                CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files.items()
            ]
            logger.info("Pushing %d files of the soup to %s in one commit.", len(operations), repo_id)
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or _default_message(soup),
                commit_description=commit_description
                if commit_description is not None
                else _description(soup),
                revision=revision,
                create_pr=create_pr,
            )
    logger.info("Soup pushed to %s", info.pr_url or info.commit_url)
    return info


def _ensure_branch(api, repo_id: str, revision: str) -> None:
    if api.revision_exists(repo_id, revision):
        return
    if _PR_REF.match(revision) or revision.startswith("refs/"):
        raise HubError(
            f"Pushing the soup to {repo_id!r} failed: revision {revision!r} does not exist (404). Push to a branch "
            "name (it is created when missing) or use create_pr=True. Nothing was committed."
        )
    logger.info("Creating branch %r in %s.", revision, repo_id)
    api.create_branch(repo_id, branch=revision, exist_ok=True)


class _hub_errors:
    """Turn huggingface_hub / network errors into a HubError that says what to do."""

    def __init__(self, repo_id: str, revision: str | None, where: str):
        self.repo_id, self.revision, self.where = repo_id, revision, where

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, HubError) or not isinstance(exc, Exception):
            return False
        message = self._message(exc)
        if message is None:
            return False
        err = HubError(
            f"Pushing the soup to {self.repo_id!r} failed: {message} Nothing was committed; {self.where}."
        )
        err.repo_id = self.repo_id  # type: ignore[attr-defined]
        raise err from exc

    def _message(self, exc: Exception) -> str | None:
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalTokenNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            import httpx2 as httpx
        except ImportError:  # pragma: no cover - older huggingface_hub
            import httpx  # type: ignore[no-redef]

        if isinstance(exc, OfflineModeIsEnabled):
            return "offline mode is on (HF_HUB_OFFLINE=1). Unset it to push."
        if isinstance(exc, LocalTokenNotFoundError):
            return "no token found. Pass token=, set HF_TOKEN, or run `hf auth login`."
        if isinstance(exc, RevisionNotFoundError):
            return (
                f"revision {self.revision!r} does not exist (404). Push to a branch name (it is created when "
                "missing) or use create_pr=True."
            )
        if isinstance(exc, RepositoryNotFoundError):
            return (
                "the repository was not found or is not accessible with this token (it may belong to someone "
                "else or be private). Check the repo id and that your token has write access to its namespace."
            )
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            server = (exc.server_message or "").strip()
            if status == 401:
                return (
                    f"authentication failed (401{': ' + server if server else ''}). The token is missing or invalid: "
                    "pass a valid token=, set HF_TOKEN, or run `hf auth login`."
                )
            if status == 403:
                return (
                    f"permission denied (403{': ' + server if server else ''}). The token has no write access to "
                    f"{self.repo_id.split('/')[0]!r}: use a write token of that user or organization."
                )
            if status == 412:
                return "the branch moved while pushing (412). Push again."
            return f"the Hub answered {status}: {server or exc}."
        if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
            from huggingface_hub import constants

            return (
                f"the Hub at {constants.ENDPOINT} could not be reached ({type(exc).__name__}: {exc}). Check the "
                "network (and HF_ENDPOINT / proxy settings) and push again."
            )
        if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
            return f"the Hub rejected the model card metadata: {exc}."
        if isinstance(exc, RuntimeError) and isinstance(exc.__cause__, Exception):
            # huggingface_hub wraps a failed LFS upload: "Error while uploading 'x' to the Hub." from the HTTP error
            cause = self._message(exc.__cause__)
            return f"{exc} {cause}" if cause else None
        return None
