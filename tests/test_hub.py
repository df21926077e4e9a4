"""Hub round trip against the local Hub server (tests/hub_server.py) with the real huggingface_hub client.

Three groups: the server itself (proved with public client APIs), pulling ingredients from it, and
pushing soups to it (one commit or none, errors, streamed soups never loaded). The end-to-end test
pushes tiny models with `model.push_to_hub`, cooks a soup from their Hub IDs and revisions with
`merge_models(..., push_to_hub=...)`, downloads it back and compares tensors bit for bit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.hub_server import reserve_port

reserve_port()  # no-op when conftest already did it; HF_ENDPOINT must be set before huggingface_hub is imported

import huggingface_hub  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    HfApi,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session  # noqa: E402

from hf_soups.errors import HubError, IngredientNotFoundError  # noqa: E402


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def api(hub_server) -> HfApi:
    return HfApi(token=hub_server.token)


def commit_ids(api: HfApi, repo_id: str, revision: str = "main") -> list[str]:
    return [c.commit_id for c in api.list_repo_commits(repo_id, revision=revision)]


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------------
# the server, through the public client
# ------------------------------------------------------------------------------------------------
def test_endpoint_is_the_local_server(hub_server):
    assert huggingface_hub.constants.ENDPOINT == hub_server.endpoint == os.environ["HF_ENDPOINT"]
    assert hub_server.storage.is_dir()


def test_whoami_and_invalid_token(hub_server, api):
    assert api.whoami()["name"] == hub_server.user
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(token="hf_not_a_token").whoami()
    assert exc.value.response.status_code == 401


def test_create_repo_conflict_answers_409_with_url(hub_server, api):
    name = unique("conflict")
    url = api.create_repo(name)
    assert url.repo_id == f"{hub_server.user}/{name}"
    response = get_session().post(
        f"{hub_server.endpoint}/api/repos/create",
        json={"name": name, "organization": None},
        headers={"authorization": f"Bearer {hub_server.token}"},
    )
    assert response.status_code == 409
    assert response.json()["url"] == f"{hub_server.endpoint}/{hub_server.user}/{name}"
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(name)
    assert exc.value.response.status_code == 409
    assert api.create_repo(name, exist_ok=True).repo_id == url.repo_id


def test_upload_folder_then_download_everything(hub_server, api, tmp_path):
    repo_id = api.create_repo(unique("roundtrip")).repo_id
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "notes.txt").write_text("regular file\n")
    (src / "sub" / "config.json").write_text('{"a": 1}')
    weights = os.urandom(3000)
    (src / "model.safetensors").write_bytes(weights)
    (src / "blob.bin").write_bytes(b"\x00binary sample")  # binary content goes to LFS whatever its name
    info = api.upload_folder(repo_id=repo_id, folder_path=src, commit_message="add files")

    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes",
        "blob.bin",
        "model.safetensors",
        "notes.txt",
        "sub/config.json",
    ]
    model = api.model_info(repo_id, files_metadata=True)
    assert model.sha == info.oid and model.private is False
    siblings = {s.rfilename: s for s in model.siblings}
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert siblings["model.safetensors"].size == 3000
    assert siblings["notes.txt"].lfs is None
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(repo_id)}
    assert top["sub"] == "RepoFolder" and "sub/config.json" not in top
    paths = api.get_paths_info(repo_id, ["sub", "model.safetensors", "missing.txt"])
    assert sorted(p.path for p in paths) == ["model.safetensors", "sub"]

    folder = Path(snapshot_download(repo_id))
    assert folder.name == info.oid
    assert (folder / "model.safetensors").read_bytes() == weights
    assert (folder / "sub" / "config.json").read_text() == '{"a": 1}'
    assert Path(hf_hub_download(repo_id, "notes.txt")).read_text() == "regular file\n"

    # the same files again: the client sees the remote oids and skips an empty commit
    before = commit_ids(api, repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=src)
    assert commit_ids(api, repo_id) == before


def test_missing_entry_repo_and_revision_raise_the_client_errors(hub_server, api):
    repo_id = api.create_repo(unique("errors")).repo_id
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "nope.txt")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{hub_server.user}/{unique('absent')}", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    response = get_session().head(f"{hub_server.endpoint}/{repo_id}/resolve/main/nope.txt")
    assert response.status_code == 404
    assert response.headers["X-Error-Code"] == "EntryNotFound"
    assert response.headers["X-Repo-Commit"] == api.model_info(repo_id).sha


def test_resolve_headers_and_ranges(hub_server, api):
    repo_id = api.create_repo(unique("headers")).repo_id
    data = os.urandom(1000)
    info = api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id=repo_id)
    url = f"{hub_server.endpoint}/{repo_id}/resolve/main/w.safetensors"
    head = get_session().head(url)
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == info.oid
    assert head.headers["X-Linked-Etag"].strip('"') == hashlib.sha256(data).hexdigest()
    assert head.headers["X-Linked-Size"] == "1000"
    assert head.headers["ETag"]
    part = get_session().get(url, headers={"Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == data[100:]
    assert part.headers["Content-Range"] == "bytes 100-999/1000"


def test_parent_commit_and_pull_requests(hub_server, api):
    repo_id = api.create_repo(unique("pr")).repo_id
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id=repo_id)
    before = commit_ids(api, repo_id)
    with pytest.raises(HfHubHTTPError) as exc:  # stale parent: refused, nothing committed
        api.create_commit(
            repo_id,
            [CommitOperationAdd("a.txt", b"v3")],
            commit_message="stale",
            parent_commit=first.oid,
        )
    assert exc.value.response.status_code == 412
    assert commit_ids(api, repo_id) == before

    pr = api.create_commit(
        repo_id, [CommitOperationAdd("a.txt", b"from pr")], commit_message="pr", create_pr=True
    )
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert Path(hf_hub_download(repo_id, "a.txt")).read_bytes() == b"v2"  # main unchanged
    assert Path(hf_hub_download(repo_id, "a.txt", revision="refs/pr/1")).read_bytes() == b"from pr"
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]

    api.create_branch(repo_id, branch="dev")
    api.create_tag(repo_id, tag="v1", revision=first.oid)
    assert Path(hf_hub_download(repo_id, "a.txt", revision="v1")).read_bytes() == b"v1"


def test_lfs_pointer_to_missing_object_is_refused(hub_server, api):
    repo_id = api.create_repo(unique("lfs")).repo_id
    payload = [
        {"key": "header", "value": {"summary": "bad pointer", "description": ""}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}},
    ]
    response = get_session().post(
        f"{hub_server.endpoint}/api/models/{repo_id}/commit/main",
        content=b"".join(json.dumps(line).encode() + b"\n" for line in payload),
        headers={"authorization": f"Bearer {hub_server.token}", "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 400
    assert "w.bin" in response.json()["error"]
    # a regular file sent inline works
    good = [
        payload[0],
        {"key": "file", "value": {"path": "ok.txt", "content": base64.b64encode(b"x").decode()}},
    ]
    response = get_session().post(
        f"{hub_server.endpoint}/api/models/{repo_id}/commit/main",
        content=b"".join(json.dumps(line).encode() + b"\n" for line in good),
        headers={"authorization": f"Bearer {hub_server.token}", "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 200 and "ok.txt" in api.list_repo_files(repo_id)


def test_auth_rules_and_private_repos(hub_server, api):
    reader = hub_server.add_user(unique("reader"), role="read")
    other_name = unique("other")
    other = hub_server.add_user(other_name)
    repo_id = api.create_repo(unique("private"), private=True).repo_id
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo_id)

    assert api.model_info(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):  # no token: invisible
        HfApi(token=False).model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):  # someone else's token: invisible too
        HfApi(token=other).model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "s.txt", token=False)
    assert Path(hf_hub_download(repo_id, "s.txt", token=hub_server.token)).read_bytes() == b"secret"

    public = api.create_repo(unique("public")).repo_id
    with pytest.raises(HfHubHTTPError) as exc:  # writes need a token
        HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=public)
    assert exc.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as exc:  # a read token cannot write
        HfApi(token=reader).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=public)
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:  # nor can another user's token
        HfApi(token=other).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=public)
    assert exc.value.response.status_code == 403
    assert HfApi(token=other).create_repo(unique("mine")).repo_id.startswith(other_name + "/")


def test_validate_yaml(hub_server, api):
    ModelCard("---\nlicense: mit\nbase_model: org/a\nbase_model_relation: merge\n---\n# ok\n").validate()
    with pytest.raises(ValueError, match="license"):
        ModelCard("---\nlicense: not-a-license\n---\n# bad\n").validate()
    with pytest.raises(ValueError, match="base_model_relation"):
        ModelCard("---\nbase_model_relation: merge\n---\n# relation without base\n").validate()
    bad_index = "---\nmodel-index:\n- name: x\n  results:\n  - task: {}\n    metrics: []\n---\n"
    response = get_session().post(f"{hub_server.endpoint}/api/validate-yaml", json={"content": bad_index})
    assert response.status_code == 400
    messages = " ".join(e["message"] for e in response.json()["errors"])
    assert "task.type" in messages and "dataset.type" in messages and "metrics" in messages
    response = get_session().post(
        f"{hub_server.endpoint}/api/validate-yaml", json={"content": "# no metadata"}
    )
    assert response.status_code == 200 and response.json()["warnings"]
    # create_commit checks README.md before uploading anything
    repo_id = api.create_repo(unique("yaml")).repo_id
    before = commit_ids(api, repo_id)
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(
            path_or_fileobj=b"---\nlicense: nope\n---\n", path_in_repo="README.md", repo_id=repo_id
        )
    assert commit_ids(api, repo_id) == before


# ------------------------------------------------------------------------------------------------
# pulling ingredients
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub_models(hub_server, tmp_path_factory):
    """Three tiny BERT classifiers on the local Hub, pushed with model.push_to_hub, plus their local copies.

    ft-1 gets a tag `v1`, then a second commit on main (different weights), so `@v1` and `main` differ.
    ft-2 is private. Each repo also holds a large file a soup does not need (optimizer.pt).
    """
    from tests.tiny_models import make_tiny_bert

    root = tmp_path_factory.mktemp("hub_models")
    api = HfApi(token=hub_server.token)
    out = {"local": [], "ids": [], "commits": []}
    for i in range(3):
        name = unique(f"ft-{i}")
        model = make_tiny_bert(seed=i)
        info = model.push_to_hub(name, token=hub_server.token, private=(i == 2))
        repo_id = f"{hub_server.user}/{name}"
        api.upload_file(
            path_or_fileobj=f"---\nlicense: mit\nlibrary_name: transformers\n---\n# ft-{i}\n".encode(),
            path_in_repo="README.md",
            repo_id=repo_id,
        )
        api.upload_file(path_or_fileobj=os.urandom(4096), path_in_repo="optimizer.pt", repo_id=repo_id)
        local = root / f"ft-{i}"
        model.save_pretrained(local)
        out["local"].append(local)
        out["ids"].append(repo_id)
        out["commits"].append(api.model_info(repo_id).sha)
        assert info.oid
    # ft-1: tag the current commit, then move main on
    api.create_tag(out["ids"][1], tag="v1")
    make_tiny_bert(seed=11).push_to_hub(out["ids"][1], token=hub_server.token)
    out["main_1"] = api.model_info(out["ids"][1]).sha
    assert out["main_1"] != out["commits"][1]
    return out


def test_pull_resolves_revision_and_downloads_only_needed_files(hub_server, hub_models):
    from hf_soups.ingredients import Ingredient, resolve

    ing = Ingredient(f"{hub_models['ids'][1]}@v1")
    resolved = resolve(ing)
    assert resolved.kind == "hub"
    assert ing.revision == resolved.commit_hash == hub_models["commits"][1]  # the tag, not main
    assert ing.metadata["requested_revision"] == "v1"
    files = sorted(p.name for p in resolved.path.iterdir())
    assert "optimizer.pt" not in files and "model.safetensors" in files and "README.md" in files
    assert resolved.config["architectures"] == ["BertForSequenceClassification"]

    by_hash = resolve(Ingredient(hub_models["ids"][1], revision=hub_models["main_1"]))
    assert by_hash.commit_hash == hub_models["main_1"]


def test_pull_private_needs_token(hub_server, hub_models):
    from hf_soups.ingredients import Ingredient, resolve

    private_id = hub_models["ids"][2]
    with pytest.raises(IngredientNotFoundError, match=private_id):
        resolve(Ingredient(private_id), token=False)
    assert resolve(Ingredient(private_id), token=hub_server.token).commit_hash == hub_models["commits"][2]


def test_pull_missing_repo_or_revision_names_it(hub_server, hub_models):
    from hf_soups.ingredients import Ingredient, resolve

    missing = f"{hub_server.user}/{unique('nothing-here')}"
    with pytest.raises(IngredientNotFoundError, match=missing) as exc:
        resolve(Ingredient(missing))
    assert exc.value.ingredient == missing
    with pytest.raises(IngredientNotFoundError, match="no-such-rev"):
        resolve(Ingredient(f"{hub_models['ids'][0]}@no-such-rev"))


def test_pull_offline_from_cache(hub_server, hub_models):
    """HF_HUB_OFFLINE=1 in a fresh process (and a dead endpoint): cached ingredients resolve, others fail clearly."""
    from hf_soups.ingredients import Ingredient, resolve

    cached = f"{hub_models['ids'][0]}"
    resolve(Ingredient(cached))  # make sure it is cached
    script = (
        "import sys\n"
        "from hf_soups.ingredients import Ingredient, resolve\n"
        "from hf_soups.errors import IngredientNotFoundError\n"
        f"r = resolve(Ingredient({cached!r}))\n"
        "print('COMMIT', r.commit_hash)\n"
        "try:\n"
        f"    resolve(Ingredient({hub_server.user + '/never-downloaded'!r}))\n"
        "except IngredientNotFoundError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert f"COMMIT {hub_models['commits'][0]}" in out.stdout
    assert "ERROR" in out.stdout and "never-downloaded" in out.stdout


# ------------------------------------------------------------------------------------------------
# pushing soups
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def streamed_soup(tiny_bert_dirs, tmp_path):
    from hf_soups import merge_models

    return merge_models(tiny_bert_dirs, output_dir=tmp_path / "soup", progress=False)


def test_push_streamed_soup_in_one_commit_without_loading_it(hub_server, api, streamed_soup):
    repo = f"{hub_server.user}/{unique('soup')}"
    before = folder_digest(streamed_soup.output_dir)
    info = streamed_soup.push_to_hub(repo, token=hub_server.token)
    assert streamed_soup._model is None  # never loaded
    assert folder_digest(streamed_soup.output_dir) == before  # local soup untouched
    commits = api.list_repo_commits(repo)
    assert [c.commit_id for c in commits][0] == info.oid and len(commits) == 2  # initial commit + the soup
    assert commits[0].title.startswith("Upload Uniform soup of 3 models")
    files = set(api.list_repo_files(repo))
    assert {"config.json", "model.safetensors", "README.md", "soup_recipe.yaml"} <= files
    remote = Path(snapshot_download(repo))
    assert (remote / "model.safetensors").read_bytes() == (
        streamed_soup.output_dir / "model.safetensors"
    ).read_bytes()
    card = ModelCard.load(repo)
    # local ingredients: no Hub base models to name, so no relation either (the Hub requires both together)
    assert card.data.base_model is None and card.data.get("base_model_relation") is None
    assert "model-soup" in card.data.tags and f'from_pretrained("{repo}")' in card.text


def test_push_in_memory_soup_and_load_it_back(hub_server, tiny_bert_dirs):
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_soups import merge_models

    soup = merge_models(tiny_bert_dirs, progress=False)
    repo = unique("mem-soup")  # no namespace: the token's user
    info = soup.push_to_hub(repo, token=hub_server.token, commit_message="my soup")
    full = f"{hub_server.user}/{repo}"
    assert info.repo_url.repo_id == full
    loaded = AutoModelForSequenceClassification.from_pretrained(full)
    expected = soup.model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_push_with_the_hf_token_variable(hub_server, api, streamed_soup, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    repo = f"{hub_server.user}/{unique('env-token')}"
    streamed_soup.push_to_hub(repo, private=True)
    assert api.model_info(repo).private is True


def test_push_without_token_is_a_clear_error(hub_server, streamed_soup, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubError, match="No Hugging Face token"):
        streamed_soup.push_to_hub(unique("no-token"))
    with pytest.raises(HubError, match="token=False"):
        streamed_soup.push_to_hub(unique("no-token"), token=False)


def test_push_auth_failures(hub_server, api, streamed_soup):
    with pytest.raises(HubError, match="401") as exc:
        streamed_soup.push_to_hub(f"{hub_server.user}/{unique('bad-token')}", token="hf_invalid")
    assert "still at" in str(exc.value)
    reader = hub_server.add_user(unique("reader"), role="read")
    with pytest.raises(HubError, match="403"):
        streamed_soup.push_to_hub(f"{hub_server.user}/{unique('read-token')}", token=reader)
    # someone else's existing repository
    target = api.create_repo(unique("not-yours")).repo_id
    before = commit_ids(api, target)
    intruder = hub_server.add_user(unique("intruder"))
    with pytest.raises(HubError, match="403|not accessible"):
        streamed_soup.push_to_hub(target, token=intruder)
    assert commit_ids(api, target) == before


def test_failed_push_leaves_nothing_remote_and_keeps_the_local_soup(hub_server, api, streamed_soup):
    repo = api.create_repo(unique("atomic")).repo_id
    before_remote = commit_ids(api, repo)
    before_local = folder_digest(streamed_soup.output_dir)
    hub_server.inject_failure("POST", f"/api/models/{repo}/commit/", status=500)
    with pytest.raises(HubError, match="500"):
        streamed_soup.push_to_hub(repo, token=hub_server.token)
    # the weights were uploaded (LFS) but never committed: the repository is as it was
    assert any(m == "PUT" and "/lfs-upload/" in p for m, p in hub_server.state.requests)
    assert commit_ids(api, repo) == before_remote
    assert api.list_repo_files(repo) == [".gitattributes"]
    assert folder_digest(streamed_soup.output_dir) == before_local
    # network drop while committing
    hub_server.inject_failure("POST", f"/api/models/{repo}/commit/", status=None)
    with pytest.raises(HubError, match="could not be reached"):
        streamed_soup.push_to_hub(repo, token=hub_server.token)
    assert commit_ids(api, repo) == before_remote
    # and a retry succeeds with one commit
    streamed_soup.push_to_hub(repo, token=hub_server.token)
    assert len(commit_ids(api, repo)) == len(before_remote) + 1


def test_push_network_down(hub_server, streamed_soup, monkeypatch):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens there
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)
    with pytest.raises(HubError, match="could not be reached"):
        streamed_soup.push_to_hub(unique("offline"), token=hub_server.token)


def test_push_to_branch_pr_and_missing_revision(hub_server, api, streamed_soup):
    repo = api.create_repo(unique("branches")).repo_id
    main_before = commit_ids(api, repo)
    on_dev = streamed_soup.push_to_hub(repo, token=hub_server.token, revision="dev")
    assert commit_ids(api, repo, "dev")[0] == on_dev.oid
    assert commit_ids(api, repo) == main_before
    pr = streamed_soup.push_to_hub(repo, token=hub_server.token, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert commit_ids(api, repo) == main_before
    with pytest.raises(HubError, match="refs/pr/42"):
        streamed_soup.push_to_hub(repo, token=hub_server.token, revision="refs/pr/42")
    with pytest.raises(HubError, match="read-only"):
        streamed_soup.push_to_hub(repo, token=hub_server.token, revision="a" * 40)


def test_only_the_main_process_pushes(hub_server, api, streamed_soup, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    repo = f"{hub_server.user}/{unique('rank1')}"
    assert streamed_soup.push_to_hub(repo, token=hub_server.token) is None
    assert not api.repo_exists(repo)


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_hub_ids_to_pushed_soup(hub_server, api, hub_models, tmp_path):
    """Ingredients pushed with model.push_to_hub, cooked from Hub IDs and revisions, pushed, pulled, compared."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from hf_soups import merge_models

    ids = hub_models["ids"]
    refs = [ids[0], f"{ids[1]}@v1", f"{ids[2]}@{hub_models['commits'][2]}"]
    repo = f"{hub_server.user}/{unique('e2e-soup')}"
    soup = merge_models(
        refs, output_dir=tmp_path / "hub-soup", push_to_hub=repo, token=hub_server.token, progress=False
    )
    assert [i.revision for i in soup.ingredients] == hub_models["commits"]
    local = merge_models(hub_models["local"], output_dir=tmp_path / "local-soup", progress=False)

    remote = Path(snapshot_download(repo))
    pushed = load_file(remote / "model.safetensors")
    reference = load_file(local.output_dir / "model.safetensors")
    assert pushed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(pushed[key], reference[key]), key
    model = AutoModelForSequenceClassification.from_pretrained(repo)
    for key, value in model.state_dict().items():
        if key in reference:
            assert torch.equal(value, reference[key]), key

    card = ModelCard.load(repo)
    assert card.data.base_model == ids
    assert card.data.base_model_relation == "merge"
    assert {"model-soup", "merge"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert card.data.license == "mit"  # every ingredient says mit
    assert card.data.pipeline_tag == "text-classification"
    assert hub_models["commits"][1][:12] in card.text and "(v1)" in card.text
    assert "soup_recipe.yaml" in api.list_repo_files(repo)
    recipe_text = (remote / "soup_recipe.yaml").read_text()
    assert hub_models["commits"][1] in recipe_text

    reader = hub_server.add_user(unique("reader"), role="read")  # can download, cannot push
    with pytest.raises(HubError, match="403"):
        merge_models(refs[:2], push_to_hub=f"{hub_server.user}/{unique('x')}", token=reader, progress=False)
    with pytest.raises(IngredientNotFoundError, match="missing-model"):
        merge_models([ids[0], f"{hub_server.user}/missing-model"], token=hub_server.token, progress=False)
