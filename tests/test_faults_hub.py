"""Fault injection on the Hub side: failures while downloading ingredients and while pushing a soup.

The local Hub server (tests/hub_server.py) answers chosen routes with 5xx, 401, 403 or 404, drops the
connection without an answer or in the middle of a file, or holds a request while the test kills the
pushing process. For each case: a clear hf_soups error (never a raw traceback), nothing half-published
(the repository holds its previous commit or the complete new one), the local files intact, and a retry
once the Hub is healthy again succeeds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.hub_server import reserve_port

reserve_port()  # HF_ENDPOINT must be set before huggingface_hub is imported

from huggingface_hub import HfApi, snapshot_download  # noqa: E402

from hf_soups.errors import SoupError  # noqa: E402
from tests.test_faults import ROOT, digest, hf_env, leftovers, tensor_bytes  # noqa: E402


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def api(hub_server) -> HfApi:
    return HfApi(token=hub_server.token)


@pytest.fixture(scope="module")
def hub_ingredients(hub_server, tmp_path_factory) -> dict:
    """Two tiny BERTs pushed to the local Hub, their local copies, and the tensors of their soup."""
    from hf_soups import merge_models
    from tests.tiny_models import make_tiny_bert

    root = tmp_path_factory.mktemp("hub_ingredients")
    ids, local = [], []
    for i in range(2):
        name = unique(f"fault-ft-{i}")
        model = make_tiny_bert(seed=i)
        model.push_to_hub(name, token=hub_server.token)
        model.save_pretrained(root / f"ft-{i}")
        ids.append(f"{hub_server.user}/{name}")
        local.append(root / f"ft-{i}")
    soup = merge_models(local, output_dir=root / "expected", progress=False)
    return {"ids": ids, "local": local, "expected": tensor_bytes(soup.output_dir)}


# --------------------------------------------------------------------------------- downloading

DOWNLOAD_FAULTS = {
    # name: (method, route part, inject_failure keyword arguments)
    "file-500": ("GET", "/resolve/", {"status": 500}),
    "file-503": ("GET", "/resolve/", {"status": 503}),
    "file-dropped": ("GET", "/resolve/", {"status": None}),
    "file-cut-mid-body": ("GET", "/resolve/", {"truncate": True}),
    "file-401": ("GET", "/resolve/", {"status": 401}),
    "file-403": ("GET", "/resolve/", {"status": 403}),
    "file-404": ("GET", "/resolve/", {"status": 404}),
    "info-500": ("GET", "/api/models/", {"status": 500}),
    "info-dropped": ("GET", "/api/models/", {"status": None}),
    "info-401": ("GET", "/api/models/", {"status": 401}),
    "info-403": ("GET", "/api/models/", {"status": 403}),
    "info-404": ("GET", "/api/models/", {"status": 404}),
}


@pytest.mark.parametrize("fault", list(DOWNLOAD_FAULTS))
def test_download_failure_is_clear_and_leaves_nothing_behind(hub_server, hub_ingredients, tmp_path, fault):
    """The Hub fails while an ingredient downloads (every attempt): a hf_soups error naming the ingredient.

    The previous soup in `output_dir` is untouched, nothing is left beside it, and once the Hub works again
    the same call succeeds from the same cache (no corrupt partial file is taken for a complete one).
    """
    from hf_soups import merge_models

    method, route, kwargs = DOWNLOAD_FAULTS[fault]
    ids, cache = hub_ingredients["ids"], tmp_path / "cache"
    out = tmp_path / "work" / "soup"
    merge_models(hub_ingredients["local"], weights=[3, 1], output_dir=out, progress=False)  # an earlier soup
    before = digest(out)
    victim = ids[1]
    hub_server.inject_failure(method, f"{route}{victim}" if route == "/api/models/" else f"/{victim}{route}",
                              times=1000, **kwargs)  # fmt: skip
    try:
        start = time.monotonic()
        with pytest.raises(SoupError) as info:
            merge_models(ids, output_dir=out, cache_dir=cache, progress=False)
        elapsed = time.monotonic() - start
    finally:
        hub_server.clear_failures()
    message = str(info.value)
    assert victim in message, f"the error does not name the ingredient: {message}"
    assert "Traceback" not in message and "internal error" not in message
    assert elapsed < 120, f"gave up only after {elapsed:.0f} s"
    assert digest(out) == before
    assert leftovers(out.parent, {"soup"}) == []
    # the Hub is back: the same call, same cache, gives the right soup
    merge_models(ids, output_dir=out, cache_dir=cache, progress=False)
    assert tensor_bytes(out) == hub_ingredients["expected"]


def test_one_transient_download_error_is_retried_or_reported(hub_server, hub_ingredients, tmp_path):
    """A single dropped connection in the middle of a file: huggingface_hub resumes it, the soup is exact."""
    from hf_soups import merge_models

    victim = hub_ingredients["ids"][0]
    hub_server.inject_failure("GET", f"/{victim}/resolve/", truncate=True, times=1)
    try:
        soup = merge_models(hub_ingredients["ids"], output_dir=tmp_path / "soup", cache_dir=tmp_path / "c",
                            progress=False)  # fmt: skip
    except SoupError as err:  # a clear error is acceptable too; a wrong soup is not
        assert victim in str(err)
        return
    finally:
        hub_server.clear_failures()
    assert tensor_bytes(soup.output_dir) == hub_ingredients["expected"]


# ------------------------------------------------------------------------------------ pushing


def head_state(api: HfApi, repo: str) -> tuple[list[str], dict[str, str]]:
    """The commit ids of `main` and the sha256 of every file at its head (downloaded with the client)."""
    commits = [c.commit_id for c in api.list_repo_commits(repo)]
    folder = Path(
        snapshot_download(repo, revision=commits[0], cache_dir=Path(os.environ["HF_HOME"]) / "check")
    )
    return commits, {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def pushed(hub_server, api, hub_ingredients, tmp_path) -> dict:
    """A repository holding an earlier soup (one commit), and a new local soup to push over it.

    The new soup's weights are unique to the test, so that its weights file is not on the server yet (the
    Hub skips uploading an LFS object it already has: the upload faults would never be reached).
    """
    import random

    from hf_soups import merge_models

    repo = f"{hub_server.user}/{unique('fault-soup')}"
    first = merge_models(
        hub_ingredients["local"], weights=[3, 1], output_dir=tmp_path / "first", progress=False
    )
    first.push_to_hub(repo, token=hub_server.token)
    weights = [1.0, round(random.uniform(1.5, 2.5), 6)]
    new = merge_models(hub_ingredients["local"], weights=weights, output_dir=tmp_path / "new", progress=False)
    commits, files = head_state(api, repo)
    return {
        "repo": repo,
        "soup": new,
        "weights": weights,
        "expected": tensor_bytes(new.output_dir),
        "commits": commits,
        "files": files,
        "local": digest(new.output_dir),
    }


PUSH_FAULTS = {
    "create-500": ("POST", "/api/repos/create", {"status": 500}),
    "preupload-500": ("POST", "/preupload/", {"status": 500}),
    "preupload-dropped": ("POST", "/preupload/", {"status": None}),
    "lfs-batch-500": ("POST", "/info/lfs/objects/batch", {"status": 500}),
    "lfs-batch-403": ("POST", "/info/lfs/objects/batch", {"status": 403}),
    "lfs-upload-500": ("PUT", "/lfs-upload/", {"status": 500}),
    "lfs-upload-dropped": ("PUT", "/lfs-upload/", {"status": None}),
    "commit-500": ("POST", "/commit/", {"status": 500}),
    "commit-503": ("POST", "/commit/", {"status": 503}),
    "commit-dropped": ("POST", "/commit/", {"status": None}),
    "commit-401": ("POST", "/commit/", {"status": 401}),
    "commit-403": ("POST", "/commit/", {"status": 403}),
    "commit-404": ("POST", "/commit/", {"status": 404}),
}


# huggingface_hub retries these (about 5 s for a 5xx answered with Retry-After: 0, about 20 s of backoff for a dropped
# connection) before it gives up: run with -m slow
CLIENT_RETRIED = {
    "preupload-500",
    "preupload-dropped",
    "lfs-batch-500",
    "lfs-upload-500",
    "lfs-upload-dropped",
}


@pytest.mark.parametrize(
    "fault", [pytest.param(f, marks=pytest.mark.slow) if f in CLIENT_RETRIED else f for f in PUSH_FAULTS]
)
def test_push_failure_publishes_nothing_and_keeps_the_local_soup(hub_server, api, pushed, fault):
    """The Hub fails during `push_to_hub` (every attempt): HubError, the repository as it was, local soup intact."""
    from hf_soups.errors import HubError

    method, route, kwargs = PUSH_FAULTS[fault]
    hub_server.inject_failure(method, route, times=1000, **kwargs)
    try:
        start = time.monotonic()
        with pytest.raises(HubError) as info:
            pushed["soup"].push_to_hub(pushed["repo"], token=hub_server.token)
        elapsed = time.monotonic() - start
    finally:
        hub_server.clear_failures()
    message = str(info.value)
    assert pushed["repo"] in message and "Nothing was committed" in message, message
    status = kwargs.get("status")
    assert (str(status) in message) if status else ("could not be reached" in message), message
    assert elapsed < 120
    assert head_state(api, pushed["repo"]) == (pushed["commits"], pushed["files"])
    assert digest(pushed["soup"].output_dir) == pushed["local"]
    # healthy again: one new commit
    pushed["soup"].push_to_hub(pushed["repo"], token=hub_server.token)
    assert len(api.list_repo_commits(pushed["repo"])) == len(pushed["commits"]) + 1


@pytest.mark.parametrize("status", [500, 401, 403, None])
def test_push_to_a_new_repo_failing_at_creation_creates_nothing(
    hub_server, api, hub_ingredients, tmp_path, status
):
    """Creating the repository fails (5xx, 401, 403, dropped): HubError, no repository, the local soup intact."""
    from hf_soups import merge_models
    from hf_soups.errors import HubError

    soup = merge_models(hub_ingredients["local"], output_dir=tmp_path / "soup", progress=False)
    before = digest(soup.output_dir)
    repo = f"{hub_server.user}/{unique('never-created')}"
    hub_server.inject_failure("POST", "/api/repos/create", status=status, times=1000)
    try:
        with pytest.raises(HubError) as info:
            soup.push_to_hub(repo, token=hub_server.token)
    finally:
        hub_server.clear_failures()
    message = str(info.value)
    assert repo in message and ((str(status) in message) if status else "could not be reached" in message)
    assert not api.repo_exists(repo)
    assert digest(soup.output_dir) == before


def test_push_through_merge_models_failing_keeps_the_output_dir(
    hub_server, api, pushed, hub_ingredients, tmp_path
):
    """`merge_models(..., output_dir=, push_to_hub=)` with the commit failing: the soup is on disk, nothing remote."""
    from hf_soups import merge_models
    from hf_soups.errors import HubError

    hub_server.inject_failure("POST", "/commit/", status=500, times=1000)
    try:
        with pytest.raises(HubError, match="500"):
            merge_models(hub_ingredients["local"], output_dir=tmp_path / "soup", push_to_hub=pushed["repo"],
                         token=hub_server.token, progress=False)  # fmt: skip
    finally:
        hub_server.clear_failures()
    assert tensor_bytes(tmp_path / "soup") == hub_ingredients["expected"]
    assert head_state(api, pushed["repo"]) == (pushed["commits"], pushed["files"])


FAST_PUSH_KILLS = {("TERM", "commit"), ("KILL", "lfs-upload")}  # the rest with -m slow
PUSH_KILLS = [
    pytest.param(
        sig, route, id=f"{sig}-{name}", marks=() if (sig, name) in FAST_PUSH_KILLS else pytest.mark.slow
    )
    for sig in ("TERM", "INT", "KILL")
    for name, route in (("lfs-upload", ("PUT", "/lfs-upload/")), ("commit", ("POST", "/commit/")))
]


@pytest.mark.parametrize("sig,route", PUSH_KILLS)
def test_killed_push_leaves_the_previous_commit_or_the_whole_new_one(
    hub_server, api, pushed, hub_ingredients, tmp_path, sig, route
):
    """`hf-soups merge ... --push-to-hub` killed while the server receives the weights or the commit.

    The repository then holds its previous commit (files unchanged) or the complete new soup, never a part;
    SIGTERM and SIGINT also remove the process's temporary soup folder.
    """
    repo = pushed["repo"]
    ready = tmp_path / "ready"
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = hf_env()
    env.update(TMPDIR=str(tmp), HF_ENDPOINT=hub_server.endpoint)
    env.pop("HF_HUB_OFFLINE", None)
    hold = hub_server.hold(route[0], route[1], timeout=120)
    argv = ["merge", *hub_ingredients["local"], "--weights", *map(str, pushed["weights"]), "--push-to-hub", repo,
            "--token", hub_server.token, "--quiet"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fault_child", "none", str(ready), "--", *map(str, argv)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not hold.arrived.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the push never reached {route}: {proc.communicate()}")
        proc.send_signal({"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL}[sig])
        proc.communicate(timeout=60)
    finally:
        hold.release()
        hub_server.clear_failures()
        if proc.poll() is None:
            proc.kill()
    assert hold.done.wait(60)
    assert proc.returncode != 0
    commits, files = head_state(api, repo)
    if commits == pushed["commits"]:
        assert files == pushed["files"], "the previous commit's files changed"
    else:  # the server had the whole commit before the client died: the complete new soup
        assert len(commits) == len(pushed["commits"]) + 1 and commits[1:] == pushed["commits"]
        folder = Path(snapshot_download(repo, cache_dir=tmp_path / "check"))
        assert tensor_bytes(folder) == pushed["expected"]
        assert {"config.json", "model.safetensors", "README.md", "soup_recipe.yaml"} <= set(files)
    if sig in ("TERM", "INT"):
        assert list(tmp.iterdir()) == [], f"{sig} left the temporary soup behind: {list(tmp.iterdir())}"
