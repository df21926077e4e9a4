"""A local Hugging Face Hub-compatible HTTP server for the test suite.

The Hub is unreachable from the test machines, so Hub flows (pull ingredients, push soups, model
cards) are tested against this server with the *real* `huggingface_hub` client. It implements the
parts of the Hub HTTP API that `huggingface_hub` 2.x calls for those flows (read from the installed
client: `hf_api.py`, `_commit_api.py`, `lfs.py`, `file_download.py`, `_snapshot_download.py`):

| client call | route |
| --- | --- |
| `whoami` | `GET /api/whoami-v2` |
| `create_repo` (409 + `url` when it exists), `delete_repo`, `update_repo_settings` | `POST /api/repos/create`, `DELETE /api/repos/delete`, `PUT /api/{type}s/{id}/settings` |
| `repo_info` / `model_info` (sha, siblings, private, cardData) | `GET /api/{type}s/{id}[/revision/{rev}]` |
| `preupload` (upload mode, remote oid, gitignore) | `POST /api/{type}s/{id}/preupload/{rev}` |
| `create_commit` (NDJSON: header, file, lfsFile, deletedFile, deletedFolder; parentCommit; create_pr) | `POST /api/{type}s/{id}/commit/{rev}` |
| LFS batch + basic transfer + verify | `POST /{prefix}{id}.git/info/lfs/objects/batch`, `PUT /lfs-upload/...`, `POST .../verify` |
| `list_repo_tree` / `list_repo_files`, `get_paths_info` | `GET /api/{type}s/{id}/tree/{rev}[/{path}]`, `POST .../paths-info/{rev}` |
| `list_repo_refs`, `list_repo_commits`, `create_branch`, `delete_branch`, `create_tag` | `.../refs`, `.../commits/{rev}`, `.../branch/{name}`, `.../tag/{rev}` |
| `hf_hub_download` / `snapshot_download` | `HEAD`/`GET /{prefix}{id}/resolve/{rev}/{path}` with `X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`, `Range` |
| `ModelCard.validate`, README checks in `create_commit` | `POST /api/validate-yaml` |

Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) and `X-Error-Message`
headers and a JSON `{"error": ...}` body, so that `huggingface_hub` raises its usual typed errors.
Authentication: a token -> user map (`add_user`); writes need a write token of the namespace owner
(401 without a valid token, 403 with a token that has no right); private repos answer like missing
ones to anyone else (401 without a token, 404 with one).

Fault injection (off unless a test asks; tests/test_faults_hub.py uses it): `inject_failure` makes the
next requests of a route answer any status (5xx, 401, 403, 404), drop the connection without an
answer (`status=None`), or send the headers and only half of the body before closing (`truncate=True`);
`hold` keeps a request waiting at the server (before its body is read) until the test releases it, so
that a test can kill the client while the server is receiving.

`HF_ENDPOINT` must be set before `huggingface_hub` is imported: `reserve_port()` binds the port and
sets it; tests/conftest.py calls it first thing. Only the standard library is used here.
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

HOST = "127.0.0.1"
DEFAULT_USER = "soup-tester"
DEFAULT_TOKEN = "hf_test_write_token_soup_tester"
REGEX_COMMIT = re.compile(r"^[0-9a-f]{40}$")
REPO_TYPES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores regular files up to 10 MB in git
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )  # fmt: skip
)
# Values the Hub accepts in card metadata (subset of the Hub's lists, enough to catch typos).
KNOWN_LICENSES = {
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0",
    "epl-2.0", "etalab-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0",
    "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "h-research", "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl",
    "apple-amlr", "mpl-2.0", "odc-by", "odbl", "openmdw-1.0", "openrail++", "osl-3.0", "postgresql", "ofl-1.1",
    "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr", "deepfloyd-if-license", "fair-noncommercial-research-license",
    "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "grok2-community", "gemma", "unknown",
    "other",
}  # fmt: skip
KNOWN_PIPELINE_TAGS = {
    "text-classification", "token-classification", "table-question-answering", "question-answering",
    "zero-shot-classification", "translation", "summarization", "feature-extraction", "text-generation",
    "fill-mask", "sentence-similarity", "text-to-speech", "text-to-audio", "automatic-speech-recognition",
    "audio-to-audio", "audio-classification", "voice-activity-detection", "depth-estimation",
    "image-classification", "object-detection", "image-segmentation", "text-to-image", "image-to-text",
    "image-to-image", "image-to-video", "unconditional-image-generation", "video-classification",
    "reinforcement-learning", "robotics", "tabular-classification", "tabular-regression",
    "tabular-to-text", "table-to-text", "multiple-choice", "text-ranking", "text-retrieval",
    "time-series-forecasting", "text-to-video", "image-text-to-text", "visual-question-answering",
    "document-question-answering", "zero-shot-image-classification", "graph-ml", "mask-generation",
    "zero-shot-object-detection", "text-to-3d", "image-to-3d", "image-feature-extraction",
    "video-text-to-text", "keypoint-detection", "any-to-any", "other",
}  # fmt: skip
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
REPO_ID_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


# --------------------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------------------
def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's `oid`)."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Commit:
    oid: str
    parents: list[str]
    files: dict[
        str, dict[str, Any]
    ]  # path -> {"oid", "size", "lfs": {"sha256", "size", "pointerSize"} | None}
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def url_path(self) -> str:
        return REPO_TYPES[self.repo_type] + self.repo_id

    def resolve(self, revision: str) -> str | None:
        """Commit oid a revision (branch, tag, refs/..., commit hash) points to, or None."""
        rev = unquote(revision)
        for prefix, table in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if rev.startswith(prefix):
                return table.get(rev[len(prefix) :])
        match = re.fullmatch(r"refs/pr/(\d+)", rev)
        if match:
            return self.pull_requests.get(int(match.group(1)))
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if REGEX_COMMIT.fullmatch(rev) and rev in self.commits:
            return rev
        return None

    def to_json(self) -> dict:
        return {
            "repo_type": self.repo_type,
            "repo_id": self.repo_id,
            "private": self.private,
            "created_at": self.created_at,
            "branches": self.branches,
            "tags": self.tags,
            "pull_requests": {str(k): v for k, v in self.pull_requests.items()},
            "commits": {k: vars(c) for k, c in self.commits.items()},
        }


class HubError(Exception):
    """An HTTP error answered the way the Hub answers it."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        extra: dict | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}
        self.headers = headers or {}


@dataclass
class User:
    name: str
    role: str = "write"  # "write" or "read"
    orgs: list[str] = field(default_factory=list)


class HubState:
    """Repositories, users and objects of the local Hub; files live under `storage`."""

    def __init__(self, storage: Path, endpoint: str):
        self.storage = Path(storage)
        self.endpoint = endpoint
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: dict[str, User] = {}
        self.signing_key = secrets.token_bytes(16)
        self.requests: list[tuple[str, str]] = []  # (method, path) log, handy in tests
        self.failures: list[dict[str, Any]] = []  # injected faults, see LocalHub.inject_failure
        self.holds: list[RequestHold] = []  # requests kept waiting, see LocalHub.hold
        (self.storage / "lfs").mkdir(parents=True, exist_ok=True)
        (self.storage / "blobs").mkdir(parents=True, exist_ok=True)
        (self.storage / "repos").mkdir(parents=True, exist_ok=True)

    # -- objects ---------------------------------------------------------------------------------
    def lfs_path(self, sha256: str) -> Path:
        return self.storage / "lfs" / sha256

    def blob_path(self, oid: str) -> Path:
        return self.storage / "blobs" / oid

    def put_blob(self, content: bytes) -> dict[str, Any]:
        oid = git_blob_oid(content)
        path = self.blob_path(oid)
        if not path.exists():
            tmp = path.with_suffix(f".tmp{secrets.token_hex(4)}")
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return {"oid": oid, "size": len(content), "lfs": None}

    def lfs_entry(self, sha256: str) -> dict[str, Any]:
        size = self.lfs_path(sha256).stat().st_size
        pointer = lfs_pointer(sha256, size)
        return {
            "oid": git_blob_oid(pointer),
            "size": size,
            "lfs": {"sha256": sha256, "size": size, "pointerSize": len(pointer)},
        }

    def read_file(self, entry: dict[str, Any]) -> Path:
        return self.lfs_path(entry["lfs"]["sha256"]) if entry["lfs"] else self.blob_path(entry["oid"])

    # -- repositories ----------------------------------------------------------------------------
    def save(self, repo: Repo) -> None:
        target = self.storage / "repos" / repo.repo_type / f"{repo.repo_id.replace('/', '--')}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo.to_json(), indent=1))
        os.replace(tmp, target)

    def new_commit(
        self, repo: Repo, parents: list[str], files: dict[str, dict], title: str, message: str, author: str
    ) -> Commit:
        date = _now()
        payload = json.dumps(
            [repo.repo_id, parents, sorted((k, v["oid"]) for k, v in files.items()), title, date]
        )
        oid = hashlib.sha1((payload + secrets.token_hex(8)).encode()).hexdigest()
        commit = Commit(oid, parents, files, title, message, author, date)
        repo.commits[oid] = commit
        return commit

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> Repo:
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        files = {".gitattributes": self.put_blob(DEFAULT_GITATTRIBUTES.encode())}
        commit = self.new_commit(repo, [], files, "initial commit", "", author)
        repo.branches["main"] = commit.oid
        self.repos[(repo_type, repo_id)] = repo
        self.save(repo)
        return repo


# --------------------------------------------------------------------------------------------------
# card metadata validation (what the Hub's /api/validate-yaml checks, for the fields we write)
# --------------------------------------------------------------------------------------------------
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def validate_card_metadata(content: str, repo_type: str = "model") -> tuple[list[str], list[str]]:
    """Return (errors, warnings) for the YAML front matter of a README.md."""
    import yaml

    errors: list[str] = []
    warnings: list[str] = []
    match = _YAML_BLOCK.search(content)
    if not match:
        warnings.append("empty or missing yaml metadata in repo card")
        return errors, warnings
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as exc:
        return [f"Error parsing YAML: {exc}"], warnings
    if data is None:
        warnings.append("empty or missing yaml metadata in repo card")
        return errors, warnings
    if not isinstance(data, dict):
        return ['"value" must be of type object'], warnings

    def str_or_list(key: str, check=None) -> None:
        value = data.get(key)
        if value is None:
            return
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            errors.append(f'"{key}" must be a string or an array of strings')
            return
        if check:
            for v in values:
                problem = check(v)
                if problem:
                    errors.append(f'"{key}" {problem}')

    def repo_id_check(value: str) -> str | None:
        parts = value.split("/")
        if len(parts) > 2 or not all(REPO_ID_PART.match(p) for p in parts) or "--" in value or ".." in value:
            return f"must be a valid repo id, got {value!r}"
        return None

    license_ = data.get("license")
    if license_ is not None:
        if not isinstance(license_, str) or license_ not in KNOWN_LICENSES:
            errors.append(f'"license" must be one of [{", ".join(sorted(KNOWN_LICENSES))}], got {license_!r}')
        elif license_ == "other" and not data.get("license_name"):
            warnings.append('"license_name" should be set when "license" is "other"')
    str_or_list("tags")
    str_or_list("datasets", repo_id_check)
    str_or_list("metrics")
    str_or_list("language")
    if repo_type == "model":
        str_or_list("base_model", repo_id_check)
        relation = data.get("base_model_relation")
        if relation is not None:
            if relation not in BASE_MODEL_RELATIONS:
                errors.append(f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}')
            if not data.get("base_model"):
                errors.append('"base_model_relation" requires "base_model"')
        if "library_name" in data and not isinstance(data["library_name"], str):
            errors.append('"library_name" must be a string')
        tag = data.get("pipeline_tag")
        if tag is not None and tag not in KNOWN_PIPELINE_TAGS:
            errors.append(f'"pipeline_tag" must be one of the Hub tasks, got {tag!r}')
        model_index = data.get("model-index")
        if model_index is not None:
            errors.extend(_validate_model_index(model_index))
    return errors, warnings


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_model_index(model_index: Any) -> list[str]:
    errors: list[str] = []
    if not isinstance(model_index, list) or not model_index:
        return ['"model-index" must be a non-empty array']
    for i, model in enumerate(model_index):
        where = f'"model-index[{i}]"'
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append(f"{where}.name is required and must be a string")
            continue
        results = model.get("results")
        if not isinstance(results, list):
            errors.append(f"{where}.results must be an array")
            continue
        for j, result in enumerate(results):
            rwhere = f"{where}.results[{j}]"
            if not isinstance(result, dict):
                errors.append(f"{rwhere} must be an object")
                continue
            task = result.get("task")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append(f"{rwhere}.task.type is required")
            dataset = result.get("dataset")
            if not isinstance(dataset, dict) or not isinstance(dataset.get("type"), str):
                errors.append(f"{rwhere}.dataset.type is required")
            elif not isinstance(dataset.get("name"), str):
                errors.append(f"{rwhere}.dataset.name is required")
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f"{rwhere}.metrics must be a non-empty array")
                continue
            for k, metric in enumerate(metrics):
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str):
                    errors.append(f"{rwhere}.metrics[{k}].type is required")
                elif not (_is_number(metric.get("value")) or isinstance(metric.get("value"), str)):
                    errors.append(f"{rwhere}.metrics[{k}].value must be a number or a string")
    return errors


# --------------------------------------------------------------------------------------------------
# HTTP handler
# --------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    # silence the default stderr access log
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    # -- plumbing --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline().strip()
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False
    ):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers["Content-Length"] = (
            str(len(body)) if "Content-Length" not in headers else headers["Content-Length"]
        )
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            if getattr(self, "_truncate", False):  # injected: the connection drops in the middle of the body
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _user(self) -> User | None:
        """The authenticated user; raises 401 on a token the Hub does not know."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else auth
        user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _held(self, method: str) -> RequestHold | None:
        """Wait here while a `LocalHub.hold` matches this request (the body is still unread)."""
        with self.state.lock:
            hold = next((h for h in self.state.holds if h.matches(method, self.path)), None)
            if hold is not None:
                self.state.holds.remove(hold)
        if hold is not None:
            hold.arrived.set()
            hold.released.wait(hold.timeout)
        return hold

    def _injected_failure(self, method: str) -> dict[str, Any] | None:
        with self.state.lock:
            for fault in self.state.failures:
                if fault["method"] == method and fault["path"] in self.path and fault["times"] > 0:
                    fault["times"] -= 1
                    return fault
        return None

    def _dispatch(self, method: str) -> None:
        self.state.requests.append((method, self.path))
        body = b""
        self._truncate = False
        hold = None
        try:
            hold = self._held(method)
            body = self._body() if method in ("POST", "PUT", "DELETE") else b""
            fault = self._injected_failure(method)
            if fault is not None and fault.get("truncate"):
                self._truncate = True  # answer normally, but cut the body in half (see _send)
            elif fault is not None:
                if fault["status"] is None:  # the connection drops: no response at all
                    self.close_connection = True
                    return
                # a server error asks the client to retry at once (`Retry-After: 0`, as the Hub may): the client's
                # retry loop runs as against the Hub, about 1 s per attempt instead of its exponential backoff
                retry = {"Retry-After": "0"} if fault["status"] >= 500 else None
                raise HubError(fault["status"], "Injected failure (local hub server)", headers=retry)
            self._route(method, body)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            headers.update({k: v for k, v in err.extra.items() if k.startswith("X-")})
            headers.update(err.headers)
            payload = {"error": err.message, **{k: v for k, v in err.extra.items() if not k.startswith("X-")}}
            try:
                self._send(
                    err.status,
                    b"" if method == "HEAD" else json.dumps(payload).encode(),
                    headers,
                    head=method == "HEAD",
                )
            except OSError:  # the client is gone (killed while a request was held)
                self.close_connection = True
        except Exception as exc:  # a bug in the server: answer 500 (the client then raises)
            import traceback

            if hold is None:  # a held request whose client was killed meanwhile fails quietly
                traceback.print_exc()
            try:
                self._send(500, json.dumps({"error": f"local hub server error: {exc!r}"}).encode())
            except OSError:
                self.close_connection = True
        finally:
            if hold is not None:
                hold.done.set()

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # -- routing ---------------------------------------------------------------------------------
    def _route(self, method: str, body: bytes) -> None:
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        raw_parts = [p for p in split.path.split("/") if p != ""]
        parts = [unquote(p) for p in raw_parts]

        if parts[:1] == ["api"]:
            rest = parts[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(body)
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(body)
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(body)
            if len(rest) >= 3 and rest[0].endswith("s") and rest[0][:-1] in REPO_TYPES:
                repo_type = rest[0][:-1]
                repo_id = f"{rest[1]}/{rest[2]}"
                return self._repo_api(method, repo_type, repo_id, rest[3:], raw_parts[4:], query, body)
        if parts[:1] == ["lfs-upload"] and method == "PUT":
            return self._lfs_upload(parts[1:], query, body)
        # git / resolve routes: /{prefix}{ns}/{name}(.git/...|/resolve/...)
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts, raw_parts = parts[0][:-1], parts[1:], raw_parts[1:]
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{parts[0]}/{parts[1][: -len('.git')]}"
            if parts[5:] == ["batch"] and method == "POST":
                return self._lfs_batch(repo_type, repo_id, body)
            if parts[5:] == ["verify"] and method == "POST":
                return self._lfs_verify(repo_type, repo_id, body)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{parts[0]}/{parts[1]}"
            revision = parts[3]
            filename = "/".join(parts[4:])
            return self._resolve(method, repo_type, repo_id, revision, filename)
        raise HubError(404, f"Route not implemented by the local hub server: {method} {split.path}")

    def _repo_api(self, method, repo_type, repo_id, rest, raw_rest, query, body) -> None:
        if not rest and method == "GET":
            return self._repo_info(repo_type, repo_id, None, query)
        action = rest[0]
        if action == "revision" and method == "GET" and len(rest) >= 2:
            return self._repo_info(repo_type, repo_id, "/".join(rest[1:]), query)
        if action == "preupload" and method == "POST":
            return self._preupload(repo_type, repo_id, "/".join(rest[1:]) or "main", query, body)
        if action == "commit" and method == "POST":
            return self._commit(repo_type, repo_id, "/".join(rest[1:]) or "main", query, body)
        if action == "tree" and method == "GET":
            revision = rest[1] if len(rest) > 1 else "main"
            path = "/".join(rest[2:])
            return self._tree(repo_type, repo_id, revision, path, query)
        if action == "paths-info" and method == "POST":
            return self._paths_info(repo_type, repo_id, "/".join(rest[1:]) or "main", body)
        if action == "refs" and method == "GET":
            return self._refs(repo_type, repo_id, query)
        if action == "commits" and method == "GET":
            return self._commits(repo_type, repo_id, "/".join(rest[1:]) or "main")
        if action == "branch" and method in ("POST", "DELETE") and len(rest) >= 2:
            return self._branch(method, repo_type, repo_id, "/".join(rest[1:]), body)
        if action == "tag" and method == "POST" and len(rest) >= 2:
            return self._tag(repo_type, repo_id, "/".join(rest[1:]), body)
        if action == "settings" and method == "PUT":
            return self._settings(repo_type, repo_id, body)
        raise HubError(404, f"Route not implemented by the local hub server: {method} {self.path}")

    # -- access control --------------------------------------------------------------------------
    def _get_repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> tuple[Repo, User | None]:
        user = self._user()
        repo = self.state.repos.get((repo_type, repo_id))
        visible = repo is not None and (
            not repo.private or (user is not None and self._owns(user, repo.namespace))
        )
        if not visible:
            raise HubError(
                404 if user else 401,
                "Repository not found",
                "RepoNotFound",
            )
        if write:
            self._check_write(user, repo.namespace)
        return repo, user

    @staticmethod
    def _owns(user: User, namespace: str) -> bool:
        return namespace == user.name or namespace in user.orgs

    def _check_write(self, user: User | None, namespace: str) -> None:
        if user is None:
            raise HubError(
                401, "You must be authenticated to write to the Hub: pass a token (or set HF_TOKEN)."
            )
        if user.role != "write" or not self._owns(user, namespace):
            raise HubError(
                403,
                f"You don't have the rights to write to {namespace} (token of {user.name!r} with role {user.role!r})",
            )

    def _resolve_rev(self, repo: Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    # -- endpoints -------------------------------------------------------------------------------
    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(user.name.encode()).hexdigest()[:24],
                "name": user.name,
                "fullname": user.name,
                "orgs": [{"type": "org", "name": org} for org in user.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user.role}},
            },
        )

    def _validate_yaml(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        errors, warnings = validate_card_metadata(
            payload.get("content", ""), payload.get("repoType", "model")
        )
        out = {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}
        if errors:
            accept_text = "text/plain" in self.headers.get("Accept", "")
            if accept_text:
                return self._send(400, "\n".join(errors).encode(), {"Content-Type": "text/plain"})
            return self._json(400, out)
        self._json(200, out)

    def _create_repo(self, body: bytes) -> None:
        user = self._user()
        payload = json.loads(body or b"{}")
        name = payload.get("name")
        if user is None:
            raise HubError(
                401, "You must be authenticated to create a repository: pass a token (or set HF_TOKEN)."
            )
        namespace = payload.get("organization") or user.name
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        if not isinstance(name, str) or not REPO_ID_PART.match(name) or not REPO_ID_PART.match(namespace):
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        self._check_write(user, namespace)
        repo_id = f"{namespace}/{name}"
        url = f"{self.state.endpoint}/{REPO_TYPES[repo_type]}{repo_id}"
        with self.state.lock:
            if (repo_type, repo_id) in self.state.repos:
                raise HubError(409, "You already created this model repo", extra={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.state.create_repo(repo_type, repo_id, private, user.name)
        self._json(200, {"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def _delete_repo(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        user = self._user()
        namespace = payload.get("organization") or (user.name if user else "")
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload.get('name')}"
        self._get_repo(repo_type, repo_id, write=True)
        with self.state.lock:
            del self.state.repos[(repo_type, repo_id)]
        self._send(200, b"")

    def _settings(self, repo_type: str, repo_id: str, body: bytes) -> None:
        repo, _ = self._get_repo(repo_type, repo_id, write=True)
        payload = json.loads(body or b"{}")
        with self.state.lock:
            if "private" in payload:
                repo.private = bool(payload["private"])
            if "visibility" in payload:
                repo.private = payload["visibility"] == "private"
            self.state.save(repo)
        self._json(200, {})

    def _file_json(self, path: str, entry: dict, *, tree: bool) -> dict:
        if tree:
            out: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
            if entry["lfs"]:
                out["lfs"] = {
                    "oid": entry["lfs"]["sha256"],
                    "size": entry["lfs"]["size"],
                    "pointerSize": entry["lfs"]["pointerSize"],
                }
            return out
        out = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
        if entry["lfs"]:
            out["lfs"] = dict(entry["lfs"])
        return out

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None, query: dict) -> None:
        repo, _ = self._get_repo(repo_type, repo_id)
        oid = self._resolve_rev(repo, revision or "main")
        commit = repo.commits[oid]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo.namespace,
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [self._file_json(p, e, tree=False) for p, e in sorted(commit.files.items())],
        }
        readme = commit.files.get("README.md")
        if readme is not None:
            match = _YAML_BLOCK.search(
                self.state.read_file(readme).read_text(encoding="utf-8", errors="replace")
            )
            if match:
                import yaml

                try:
                    card = yaml.safe_load(match.group(2))
                except yaml.YAMLError:
                    card = None
                if isinstance(card, dict):
                    info["cardData"] = card
                    info["tags"] = list(card.get("tags") or [])
                    if card.get("library_name"):
                        info["library_name"] = card["library_name"]
                    if card.get("pipeline_tag"):
                        info["pipeline_tag"] = card["pipeline_tag"]
        config = commit.files.get("config.json")
        if config is not None and repo_type == "model":
            try:
                info["config"] = json.loads(self.state.read_file(config).read_text())
            except ValueError:
                pass
        if query.get("expand[]") or query.get("expand"):
            wanted = set(query.get("expand[]", []) + query.get("expand", []))
            info = {k: v for k, v in info.items() if k in wanted or k in ("id", "_id")}
        self._json(200, info)

    def _preupload(self, repo_type, repo_id, revision, query, body) -> None:
        repo, _ = self._get_repo(repo_type, repo_id, write=True)
        create_pr = query.get("create_pr") == ["1"]
        oid = repo.resolve(revision)
        if oid is None and not create_pr:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = repo.commits[oid].files if oid else {}
        payload = json.loads(body or b"{}")
        gitattributes = files.get(".gitattributes")
        lfs_patterns = DEFAULT_GITATTRIBUTES
        if gitattributes is not None:
            lfs_patterns = self.state.read_file(gitattributes).read_text()
        patterns = [line.split()[0] for line in lfs_patterns.splitlines() if "filter=lfs" in line]
        ignore = [
            p.strip()
            for p in (payload.get("gitIgnore") or "").splitlines()
            if p.strip() and not p.startswith("#")
        ]
        out = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            name = path.rsplit("/", 1)[-1]
            is_lfs = (
                size >= LFS_THRESHOLD
                or b"\x00" in sample
                or any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)
            )
            entry = files.get(path)
            remote_oid = None
            if entry is not None:
                remote_oid = entry["lfs"]["sha256"] if entry["lfs"] else entry["oid"]
            should_ignore = any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in ignore)
            out.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs else "regular",
                    "shouldIgnore": should_ignore,
                    "oid": remote_oid,
                }
            )
        self._json(200, {"files": out, "commitOid": oid})

    def _commit(self, repo_type, repo_id, revision, query, body) -> None:
        repo, user = self._get_repo(repo_type, repo_id, write=True)
        assert user is not None
        create_pr = query.get("create_pr") == ["1"]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit payload must be its header")
        header = lines[0]["value"]
        summary = header.get("summary") or ""
        if not summary.strip():
            raise HubError(400, "Commit summary must not be empty")
        with self.state.lock:
            revision = unquote(revision)
            head = repo.resolve(revision)
            if head is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            is_branch = revision in repo.branches or revision.startswith("refs/heads/")
            is_pr = re.fullmatch(r"refs/pr/\d+", revision) is not None
            if not (is_branch or is_pr or create_pr):
                raise HubError(
                    400, f"Cannot commit to {revision!r}: not a branch (tags and commits are read-only)"
                )
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise HubError(
                    412,
                    f"A commit has happened since. Please refresh and try again. (head is {head}, expected {parent})",
                )
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"Invalid path in commit: {path!r}")
                if key == "file":
                    if value.get("encoding") not in (None, "base64"):
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                    content = base64.b64decode(value.get("content", ""))
                    files[path] = self.state.put_blob(content)
                elif key == "lfsFile":
                    sha = value.get("oid", "")
                    if value.get("algo", "sha256") != "sha256" or not self.state.lfs_path(sha).exists():
                        raise HubError(
                            400,
                            f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {path} ({sha})",
                        )
                    entry = self.state.lfs_entry(sha)
                    if value.get("size") is not None and int(value["size"]) != entry["size"]:
                        raise HubError(400, f"LFS size mismatch for {path}")
                    files[path] = entry
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            commit = self.state.new_commit(
                repo, [head], files, summary, header.get("description") or "", user.name
            )
            pr_url = None
            if create_pr:
                number = max(repo.pull_requests, default=0) + 1
                repo.pull_requests[number] = commit.oid
                pr_url = f"{self.state.endpoint}/{repo.url_path}/discussions/{number}"
            elif is_pr:
                repo.pull_requests[int(revision.rsplit("/", 1)[1])] = commit.oid
            else:
                repo.branches[
                    revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
                ] = commit.oid
            self.state.save(repo)
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.state.endpoint}/{repo.url_path}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            },
        )

    def _listing(self, commit: Commit, path: str, recursive: bool) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and prefix.rstrip("/") in commit.files:
            return [self._file_json(prefix.rstrip("/"), commit.files[prefix.rstrip("/")], tree=True)]
        entries: dict[str, dict] = {}
        for file_path, entry in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rel = file_path[len(prefix) :]
            parts = rel.split("/")
            for depth in range(1, len(parts)):  # folders on the way
                if not recursive and depth > 1:
                    break
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    folder,
                    {
                        "type": "directory",
                        "oid": hashlib.sha1(folder.encode()).hexdigest(),
                        "size": 0,
                        "path": folder,
                    },
                )
            if recursive or len(parts) == 1:
                entries[file_path] = self._file_json(file_path, entry, tree=True)
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        return list(entries.values())

    def _tree(self, repo_type, repo_id, revision, path, query) -> None:
        repo, _ = self._get_repo(repo_type, repo_id)
        oid = self._resolve_rev(repo, revision)
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        self._json(200, self._listing(repo.commits[oid], path, recursive))

    def _paths_info(self, repo_type, repo_id, revision, body) -> None:
        repo, _ = self._get_repo(repo_type, repo_id)
        oid = self._resolve_rev(repo, revision)
        commit = repo.commits[oid]
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        out = []
        folders = {"/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)}
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                out.append(self._file_json(path, commit.files[path], tree=True))
            elif path in folders:
                out.append(
                    {
                        "type": "directory",
                        "oid": hashlib.sha1(path.encode()).hexdigest(),
                        "size": 0,
                        "path": path,
                    }
                )
        self._json(200, out)

    def _refs(self, repo_type, repo_id, query) -> None:
        repo, _ = self._get_repo(repo_type, repo_id)
        out: dict[str, Any] = {
            "branches": [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()
            ],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()],
            "converts": [],
        }
        if query.get("include_prs"):
            out["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": c}
                for n, c in repo.pull_requests.items()
            ]
        self._json(200, out)

    def _commits(self, repo_type, repo_id, revision) -> None:
        repo, _ = self._get_repo(repo_type, repo_id)
        oid: str | None = self._resolve_rev(repo, revision)
        out = []
        while oid:
            commit = repo.commits[oid]
            out.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": commit.author}],
                    "date": commit.date,
                }
            )
            oid = commit.parents[0] if commit.parents else None
        self._json(200, out)

    def _branch(self, method, repo_type, repo_id, branch, body) -> None:
        repo, _ = self._get_repo(repo_type, repo_id, write=True)
        with self.state.lock:
            if method == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
            else:
                if branch in repo.branches:
                    raise HubError(409, f"Reference already exists: refs/heads/{branch}")
                start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
                repo.branches[branch] = self._resolve_rev(repo, start)
            self.state.save(repo)
        self._send(200, b"{}")

    def _tag(self, repo_type, repo_id, revision, body) -> None:
        repo, _ = self._get_repo(repo_type, repo_id, write=True)
        tag = (json.loads(body or b"{}") or {}).get("tag")
        if not tag:
            raise HubError(400, "Missing tag name")
        with self.state.lock:
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._resolve_rev(repo, revision)
            self.state.save(repo)
        self._send(200, b"{}")

    # -- LFS -------------------------------------------------------------------------------------
    def _sign(self, oid: str, size: int) -> str:
        return hmac.new(self.state.signing_key, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        repo, _ = self._get_repo(repo_type, repo_id, write=True)
        payload = json.loads(body or b"{}")
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is implemented by the local hub server")
        ref = (payload.get("ref") or {}).get("name")
        if ref is not None and repo.resolve(ref) is None:
            raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": str(oid),
                        "size": int(size or 0),
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
                continue
            out: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.state.lfs_path(oid).exists():
                query = f"size={size}&sig={self._sign(oid, size)}"
                out["actions"] = {
                    "upload": {"href": f"{self.state.endpoint}/lfs-upload/{oid}?{query}", "expires_in": 3600},
                    "verify": {
                        "href": f"{self.state.endpoint}/{repo.url_path}.git/info/lfs/objects/verify",
                        "expires_in": 3600,
                    },
                }
            objects.append(out)
        self._json(
            200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _lfs_upload(self, parts: list[str], query: dict, body: bytes) -> None:
        if len(parts) != 1:
            raise HubError(404, "Unknown upload URL")
        oid = parts[0]
        size = int((query.get("size") or ["-1"])[0])
        if not hmac.compare_digest((query.get("sig") or [""])[0], self._sign(oid, size)):
            raise HubError(403, "Invalid or expired upload signature")
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        target = self.state.lfs_path(oid)
        tmp = target.with_suffix(f".tmp{secrets.token_hex(4)}")
        tmp.write_bytes(body)
        os.replace(tmp, target)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_verify(self, repo_type: str, repo_id: str, body: bytes) -> None:
        self._get_repo(repo_type, repo_id, write=True)
        payload = json.loads(body or b"{}")
        path = self.state.lfs_path(payload.get("oid", "x"))
        if not path.exists() or path.stat().st_size != payload.get("size"):
            raise HubError(404, "LFS object not found")
        self._json(200, {"success": True})

    # -- downloads -------------------------------------------------------------------------------
    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        repo, _ = self._get_repo(repo_type, repo_id)
        oid = self._resolve_rev(repo, revision)
        entry = repo.commits[oid].files.get(filename)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", extra={"X-Repo-Commit": oid})
        path = self.state.read_file(entry)
        size = entry["size"]
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{entry["oid"]}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename.rsplit('/', 1)[-1])}; filename=\"{filename.rsplit('/', 1)[-1]}\";",
        }
        if entry["lfs"]:
            headers["X-Linked-Etag"] = f'"{entry["lfs"]["sha256"]}"'
            headers["X-Linked-Size"] = str(size)
        start, status = 0, 200
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if match:
                start = int(match.group(1))
                # a range past the end is served up to the end (RFC 9110 14.1.2), as the Hub does: the client asks
                # for the first 100 kB of a safetensors file to read its header, whatever the file's size
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                if start >= size > 0:
                    raise HubError(416, "Requested range not satisfiable")
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                status = 206
                size = end - start + 1
        headers["Content-Length"] = str(size)
        if method == "HEAD":
            return self._send(status, b"", headers, head=True)
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read(size)
        self._send(status, data, headers)


class RequestHold:
    """A request kept waiting at the server (see [`LocalHub.hold`]).

    Attributes:
        arrived (`threading.Event`): set when a matching request reached the server.
        released (`threading.Event`): set by [`release`]; the request then goes on as usual.
        done (`threading.Event`): set once the server has finished with the request (answered or failed).
    """

    def __init__(self, method: str, path_contains: str, timeout: float):
        self.method, self.path_contains, self.timeout = method, path_contains, timeout
        self.arrived = threading.Event()
        self.released = threading.Event()
        self.done = threading.Event()

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.path_contains in path

    def release(self) -> None:
        self.released.set()


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, sock: socket.socket, state: HubState):
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.state = state
        self.server_activate()


# --------------------------------------------------------------------------------------------------
# public helpers
# --------------------------------------------------------------------------------------------------
_RESERVED: dict[str, Any] = {}


def reserve_port() -> int:
    """Bind a free port on 127.0.0.1 for the local Hub and point `HF_ENDPOINT` at it.

    Call it before `huggingface_hub` is imported (tests/conftest.py does): the client reads
    `HF_ENDPOINT` once, at import. The bound socket is kept and handed to the server later, so no
    other process can take the port in between. Calling it again returns the same port.

    Returns:
        `int`: the reserved port.
    """
    if "socket" not in _RESERVED:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        _RESERVED["socket"] = sock
        _RESERVED["port"] = sock.getsockname()[1]
    os.environ["HF_ENDPOINT"] = f"http://{HOST}:{_RESERVED['port']}"
    return _RESERVED["port"]


class LocalHub:
    """A running local Hub: its endpoint, a valid write token, its storage folder and its users.

    Attributes:
        endpoint (`str`): `http://127.0.0.1:<port>`, equal to `HF_ENDPOINT`.
        token (`str`): a write token of user `user`.
        user (`str`): the default user's name (owner of its namespace).
        storage (`Path`): where repositories and objects are stored.
        state (`HubState`): the server's state (repositories, request log) for assertions.
    """

    def __init__(self, storage: Path | None = None, sock: socket.socket | None = None):
        self._own_storage = storage is None
        self.storage = (
            Path(storage) if storage is not None else Path(tempfile.mkdtemp(prefix="hf_soups_hub_"))
        )
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        self.endpoint = f"http://{HOST}:{port}"
        self.state = HubState(self.storage, self.endpoint)
        self.user = DEFAULT_USER
        self.token = DEFAULT_TOKEN
        self.add_user(DEFAULT_USER, DEFAULT_TOKEN)
        self._server = _HubHTTPServer(sock, self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()

    def add_user(
        self, name: str, token: str | None = None, *, role: str = "write", orgs: list[str] | None = None
    ) -> str:
        """Register a user and a token for it (a fresh one when not given); returns the token."""
        token = token or f"hf_{secrets.token_hex(12)}"
        self.state.tokens[token] = User(name=name, role=role, orgs=list(orgs or []))
        return token

    def inject_failure(
        self,
        method: str,
        path_contains: str,
        *,
        status: int | None = 500,
        times: int = 1,
        truncate: bool = False,
    ) -> None:
        """Make the next `times` requests `method` whose path contains `path_contains` fail.

        `status=None` drops the connection without an answer (what a network failure looks like to the client).
        `truncate=True` answers as usual but sends only the first half of the body, then closes the connection
        (a connection dropped while a file downloads); `status` is then ignored.
        """
        with self.state.lock:
            self.state.failures.append(
                {
                    "method": method,
                    "path": path_contains,
                    "status": status,
                    "times": times,
                    "truncate": truncate,
                }
            )

    def hold(self, method: str, path_contains: str, *, timeout: float = 60.0) -> RequestHold:
        """Keep the next request `method` whose path contains `path_contains` waiting, before its body is read.

        Wait on the returned hold's `arrived` event, do something (kill the client), then `release()` it: the
        server then reads what is left of the body and answers as usual. A hold not released lets the
        request go on after `timeout` seconds.
        """
        hold = RequestHold(method, path_contains, timeout)
        with self.state.lock:
            self.state.holds.append(hold)
        return hold

    def clear_failures(self) -> None:
        """Remove every injected failure and release every hold."""
        with self.state.lock:
            self.state.failures.clear()
            for hold in self.state.holds:
                hold.release()
            self.state.holds.clear()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repository (raises KeyError when missing)."""
        return self.state.repos[(repo_type, repo_id)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._own_storage:
            shutil.rmtree(self.storage, ignore_errors=True)


def start_local_hub(storage: Path | None = None) -> LocalHub:
    """Start a local Hub on the port reserved by `reserve_port()` (or on a fresh one)."""
    sock = _RESERVED.pop("socket", None)
    hub = LocalHub(storage, sock)
    if sock is not None:
        _RESERVED["hub"] = hub
    return hub


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory) -> Iterator[LocalHub]:
    """The local Hub of the test session, on `HF_ENDPOINT` (see `reserve_port`).

    Yields a `LocalHub` with `.endpoint`, `.token` (write token of `.user`), `.storage`,
    `.add_user(name, token=None, role="write", orgs=None)` and `.state`.
    """
    if "hub" in _RESERVED:
        yield _RESERVED["hub"]
        return
    if "socket" not in _RESERVED:
        reserve_port()
    hub = start_local_hub(tmp_path_factory.mktemp("local_hub"))
    import huggingface_hub.constants as hf_constants

    if hf_constants.ENDPOINT != hub.endpoint:
        hub.close()
        raise RuntimeError(
            f"huggingface_hub was imported with HF_ENDPOINT={hf_constants.ENDPOINT!r} before the local Hub's port was"
            f" reserved ({hub.endpoint}): call tests.hub_server.reserve_port() in tests/conftest.py before anything"
            " imports huggingface_hub."
        )
    try:
        yield hub
    finally:
        _RESERVED.pop("hub", None)
        hub.close()
