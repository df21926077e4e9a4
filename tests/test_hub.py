"""Hub round trip against the local Hub server (tests/hub_server.py) with the real huggingface_hub client.

Two groups: pulling ingredients from it, and pushing soups to it (one commit or none, errors, streamed soups
never loaded). The end-to-end test pushes tiny models with `model.push_to_hub`, cooks a soup from their Hub IDs and revisions with
`merge_models(..., push_to_hub=...)`, downloads it back and compares tensors bit for bit.
"""

from __future__ import annotations

import hashlib
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
    HfApi,
    ModelCard,
    snapshot_download,
)

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


# ------------------------------------------------------------------------------------------------
# the Hub's evaluation-results files (.eval_results/*.yaml)
# ------------------------------------------------------------------------------------------------
def _labelled_set(n: int, seed: int):
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (n, 8), generator=gen)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": (ids[:, 0] % 3).tolist(),
        }
    )


def test_eval_results_files_only_for_sets_with_a_hub_dataset_id(hub_server, api, tiny_bert_dirs, tmp_path):
    import yaml
    from huggingface_hub import hf_hub_download, parse_eval_result_entries

    from hf_soups import merge_models

    soup = merge_models(
        tiny_bert_dirs,
        method="greedy",
        eval_dataset={"validation": _labelled_set(24, seed=1), "typos": _labelled_set(16, seed=2)},
        select_on="validation",
        progress=False,
    )
    # where the sets came from, as an evaluator records it: one Hub dataset, one set known only by its name
    soup.report_extra["eval_datasets"] = {
        "validation": {
            "id": "org/reviews",
            "config": "plain_text",
            "split": "validation",
            "revision": "a" * 40,
        },
        "typos": {"name": "Typos"},
    }
    folder = soup.save_pretrained(tmp_path / "saved")
    files = sorted(p.relative_to(folder).as_posix() for p in (folder / ".eval_results").iterdir())
    assert files == [".eval_results/org__reviews.yaml"]  # nothing invented for "typos"
    data = yaml.safe_load((folder / ".eval_results" / "org__reviews.yaml").read_text())
    assert data == [
        {
            "dataset": {"id": "org/reviews", "task_id": "plain_text", "revision": "a" * 40},
            "value": soup.scores["validation"]["accuracy"],
            "notes": "accuracy (validation split) of a greedy soup, measured by hf_soups",
        }
    ]
    # the saved folder (with its hidden .eval_results folder) can be replaced by the next save
    soup.save_pretrained(tmp_path / "saved")

    repo = f"{hub_server.user}/{unique('eval-results')}"
    soup.push_to_hub(repo, token=hub_server.token)
    remote = [f for f in api.list_repo_files(repo) if f.startswith(".eval_results/")]
    assert remote == [".eval_results/org__reviews.yaml"]
    pulled = yaml.safe_load(Path(hf_hub_download(repo, ".eval_results/org__reviews.yaml")).read_text())
    (entry,) = parse_eval_result_entries(pulled)
    assert (entry.dataset_id, entry.task_id, entry.dataset_revision) == (
        "org/reviews",
        "plain_text",
        "a" * 40,
    )
    assert entry.value == soup.scores["validation"]["accuracy"]
    # the model-index names the same dataset; the set without an ID keeps its name there
    card = ModelCard.load(repo)
    assert {r.dataset_type for r in card.data.eval_results} == {"org/reviews", "typos"}


def test_no_eval_results_files_without_a_hub_dataset_id(hub_server, api, tiny_bert_dirs, tmp_path):
    from hf_soups import merge_models

    soup = merge_models(
        tiny_bert_dirs, method="greedy", eval_dataset=_labelled_set(24, seed=1), output_dir=tmp_path / "soup"
    )
    soup.report_extra["eval_datasets"] = {"eval": {"id": "not a hub id", "name": "local csv"}}
    assert not (tmp_path / "soup" / ".eval_results").exists()
    repo = f"{hub_server.user}/{unique('no-eval-results')}"
    soup.push_to_hub(repo, token=hub_server.token)
    assert not [f for f in api.list_repo_files(repo) if f.startswith(".eval_results")]
