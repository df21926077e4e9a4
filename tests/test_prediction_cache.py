"""No evaluation twice: one evaluation of each ingredient per run across recipes, and the opt-in prediction cache.

Evaluations are counted as real forward passes: a global forward hook sees every batch the top-level model
runs and recognises which ingredient's weights it holds (by the exact float64 sum of its classifier), so nothing
of hf_soups is mocked.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter

import pytest
import torch

from hf_soups import merge_models
from tests.synthetic_task import add_noise, as_dataset, make_split, pretrained_model, save, trained_model

N_VAL, N_OOD, BATCH = 64, 32, 16


@pytest.fixture()
def ingredients(tmp_path):
    ft = trained_model()
    return [
        save(add_noise(ft, noise, seed=i), tmp_path / f"ing-{i}") for i, noise in enumerate((1.0, 1.5, 6.0))
    ]


def _sets(flip_ood_label: bool = False):
    ids, labels = make_split(N_VAL, seed=1)
    ood_ids, ood_labels = make_split(N_OOD, seed=2, shift=0.15)
    if flip_ood_label:
        ood_labels = ood_labels.clone()
        ood_labels[0] = 1 - ood_labels[0]
    return {"val": as_dataset(ids, labels), "ood": as_dataset(ood_ids, ood_labels)}


def _greedy(refs, cache, sets=None, **options):
    """A greedy soup of `refs` on the two sets, with the prediction cache in `cache`."""
    return merge_models(
        [str(r) for r in refs],
        method="greedy",
        eval_dataset=sets if sets is not None else _sets(),
        select_on="val",
        batch_size=BATCH,
        progress=False,
        prediction_cache_dir=cache,
        **options,
    )


def _signature(state) -> float:
    return float(state["classifier.weight"].double().sum())


class ForwardCounter:
    """Rows a BertForSequenceClassification ran (seen by a global forward hook), per recognised member (`None`: a mixture)."""

    def __init__(self, paths):
        from safetensors.torch import load_file

        self.members = {_signature(load_file(p / "model.safetensors")): p.name for p in paths}
        self.rows: Counter = Counter()

    def __enter__(self):
        def hook(module, args, output):
            if type(module).__name__ == "BertForSequenceClassification":
                name = self.members.get(_signature(module.state_dict()))
                self.rows[name] += int(output.logits.shape[0])

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def ingredients(self) -> dict[str, int]:
        return {k: v for k, v in self.rows.items() if k is not None}


def test_an_ingredient_is_evaluated_once_per_run_across_compared_recipes(tmp_path):
    """WiSE-FT's alpha = 1, task arithmetic's lambda = 1 and the best single ingredient are the same model."""
    base = save(pretrained_model(), tmp_path / "base")
    ft = save(trained_model(), tmp_path / "ft")
    with ForwardCounter([ft, base]) as counter:
        soup = merge_models(
            [str(ft)],
            base_model=str(base),
            method=["wise-ft", "task-arithmetic"],
            alpha=[0.0, 0.5, 1.0],
            scaling=[0.5, 1.0],
            eval_dataset=_sets(),
            batch_size=BATCH,
            progress=False,
        )
    # one pass over both sets each: the fine-tune (alpha = 1, lambda = 1, best single) and the base (alpha = 0)
    assert counter.ingredients() == {"ft": N_VAL + N_OOD, "base": N_VAL + N_OOD}
    wise = next(row for row in soup.comparison if row["method"] == "wise-ft")
    task = next(row for row in soup.comparison if row["method"] == "task-arithmetic")
    assert wise["evaluations"] == 3  # alpha = 0 (the base), 0.5, 1 (the fine-tune)
    assert task["evaluations"] == 1  # lambda = 0.5 only: lambda = 1 is the fine-tune, already scored
    curve = {p["alpha"]: p["scores"] for p in soup.history} if soup.method == "wise-ft" else None
    ing = soup.ingredients[0]
    if curve is not None:
        assert curve[1.0] == ing.scores  # the shared numbers are the ingredient's own


def test_the_cache_spares_re_scoring_and_misses_a_changed_checkpoint_or_eval_set(ingredients, tmp_path):
    cache = tmp_path / "cache"
    names = {p.name for p in ingredients}
    run = lambda sets, **kw: _greedy(ingredients, cache, sets, **kw)  # noqa: E731
    with ForwardCounter(ingredients) as first:
        soup = run(_sets())
    assert first.ingredients() == {n: N_VAL + N_OOD for n in names}
    files = sorted(cache.iterdir())
    assert len(files) == 2 * len(ingredients) and all(f.suffix == ".safetensors" for f in files)
    scores = {i.name: i.scores for i in soup.ingredients}

    # 1. cooked again with another rule: no ingredient runs, the same scores come back
    with ForwardCounter(ingredients) as again:
        strict = run(_sets(), strict=True)
    assert again.ingredients() == {}
    assert {i.name: i.scores for i in strict.ingredients} == scores

    # 2. one checkpoint rewritten (same size, same modification time): only it runs again
    changed = ingredients[1]
    stat = (changed / "model.safetensors").stat()
    save(add_noise(trained_model(), 1.5, seed=77), changed)
    os.utime(changed / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (changed / "model.safetensors").stat().st_size == stat.st_size
    with ForwardCounter(ingredients) as after_change:
        run(_sets())
    assert after_change.ingredients() == {changed.name: N_VAL + N_OOD}

    # 3. one label of one set changed: that set runs again for every ingredient, the other one is reused
    with ForwardCounter(ingredients) as after_data:
        run(_sets(flip_ood_label=True))
    assert after_data.ingredients() == {n: N_OOD for n in names}

    # 4. a copy of the folders elsewhere holds the same bytes: a hit (the key is the content, not the path)
    copies = [shutil.copytree(p, tmp_path / "copies" / p.name) for p in ingredients]
    with ForwardCounter(ingredients) as copied:
        _greedy(copies, cache)
    assert copied.ingredients() == {}
    assert not list(cache.glob("*.incomplete")) and not list(cache.glob(".*"))


def test_cache_files_are_safetensors_with_their_key_and_a_damaged_one_is_a_miss(
    ingredients, tmp_path, caplog
):
    import json

    from safetensors import safe_open

    cache = tmp_path / "cache"
    soup = _greedy(ingredients, cache)
    for path in cache.iterdir():
        # plain arrays and a JSON header: nothing to execute
        with safe_open(str(path), framework="numpy") as f:
            key = json.loads(f.metadata()["key"])
            assert {"weights", "eval_set", "task", "metric"} <= set(key)
            assert key["metric"]["name"] == "accuracy" and key["task"]["name"] == "classification"
            assert set(f.keys()) == {"logits", "labels"}
    victim = sorted(cache.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated
    with ForwardCounter(ingredients) as counter:
        again = _greedy(ingredients, cache)
    rows = sum(counter.ingredients().values())
    assert rows in (N_VAL, N_OOD)  # only the damaged set of one ingredient ran again
    assert "cannot be read" in caplog.text
    assert [i.scores for i in again.ingredients] == [i.scores for i in soup.ingredients]


def test_weights_fingerprint_follows_the_content():
    from hf_soups.ingredients import Ingredient, resolve, weights_fingerprint

    model = pretrained_model()
    first = weights_fingerprint(resolve(Ingredient(model)))
    assert first == weights_fingerprint(
        resolve(Ingredient(pretrained_model()))
    )  # same tensors, another object
    with torch.no_grad():
        w = model.classifier.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))  # one ulp of one value
    assert weights_fingerprint(resolve(Ingredient(model))) != first


def test_a_hub_ingredient_is_keyed_by_its_commit_and_a_new_commit_misses(hub_server, tmp_path):
    import uuid

    from tests.tiny_models import make_tiny_bert

    repos, local = [], []
    for i in range(2):
        name = f"cached-{i}-{uuid.uuid4().hex[:8]}"
        model = make_tiny_bert(seed=i, noise=0.05)
        model.push_to_hub(name, token=hub_server.token)
        repos.append(f"{hub_server.user}/{name}")
        local.append(save(model, tmp_path / "local" / f"v0-{i}"))
    sets = _sets()
    cache = tmp_path / "cache"

    def run():
        return _greedy(repos, cache, sets, cache_dir=tmp_path / "hf-cache", token=hub_server.token)

    first = run()
    assert all(i.revision for i in first.ingredients)
    with ForwardCounter(local) as again:
        run()
    assert again.ingredients() == {}  # same commits: nothing re-scored
    moved = make_tiny_bert(seed=7, noise=0.05)  # a new commit on main for the second repository
    moved.push_to_hub(repos[1], token=hub_server.token)
    local.append(save(moved, tmp_path / "local" / "v1-1"))
    with ForwardCounter(local) as after:
        soup = run()
    assert after.ingredients() == {"v1-1": N_VAL + N_OOD}
    assert soup.ingredients[1].revision != first.ingredients[1].revision
