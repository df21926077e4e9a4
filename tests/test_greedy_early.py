"""Early rejection in greedy soups: a candidate is dropped as soon as even a perfect rest of the set could not keep it.

Every run here is cooked twice, with `full_evaluation=True` (every candidate scored to the end, as before) and
without (the default), and the two must take the same decisions and report the same numbers for what they keep.
The partial scores of a rejected candidate are checked against the test's own float64 computation on the examples
scored, and the stop must come at the first batch where the bound loses.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_soups import merge_models
from hf_soups.evaluation import build_evaluator
from tests.synthetic_task import add_noise, as_dataset, make_split, pretrained_model, save, trained_model
from tests.testing_common import float64_mean, read_safetensors

BATCH = 16
NOISES = (1.0, 1.6, 2.2, 3.0, 8.0)  # good to ruined: greedy keeps some and drops others


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sets():
    ids, labels = make_split(320, seed=1)
    ood_ids, ood_labels = make_split(96, seed=2, shift=0.15)
    return {"val": as_dataset(ids, labels), "ood": as_dataset(ood_ids, ood_labels)}, (ids, labels)


@pytest.fixture(scope="module")
def seeded_dirs(tmp_path_factory):
    """For each seed, five ingredients: the trained model plus independent noise of growing scale."""
    root = tmp_path_factory.mktemp("early")
    ft = trained_model()
    return {
        seed: [
            save(add_noise(ft, noise, seed=100 * seed + i), root / f"s{seed}" / f"ing-{i}")
            for i, noise in enumerate(NOISES)
        ]
        for seed in (0, 1, 2)
    }


def _cook(paths, sets, **options):
    return merge_models(
        [str(p) for p in paths],
        method="greedy",
        eval_dataset=sets,
        batch_size=BATCH,
        progress=False,
        **options,
    )


def _same_decisions(full, early) -> int:
    """The two soups took the same decisions and report the same numbers for everything kept; returns how many
    candidates `early` rejected before the end of the set."""
    assert [(i.name, i.selected, i.weight) for i in full.ingredients] == [
        (i.name, i.selected, i.weight) for i in early.ingredients
    ]
    assert [(i.score, i.scores) for i in full.ingredients] == [(i.score, i.scores) for i in early.ingredients]
    assert full.score == early.score and full.scores == early.scores
    assert len(full.history) == len(early.history)
    partial = 0
    for f, e in zip(full.history, early.history):
        assert (f["candidate"], f["kept"], f["score"], f["n_ingredients"]) == (
            e["candidate"],
            e["kept"],
            e["score"],
            e["n_ingredients"],
        )
        assert "partial" not in f
        if "partial" not in e:  # scored to the end: the very same numbers
            assert e["candidate_score"] == f["candidate_score"] and e["scores"] == f["scores"]
            continue
        partial += 1
        assert not e["kept"]
        assert set(e["scores"]) == {early.select_on}  # only the selection set, and only part of it
        info = e["partial"]
        assert info["bound"] == e["candidate_score"] and 0 < info["units"] < info["of"]
        # the real score (from the full run) is no better than the bound reported for it
        if early.params["greater_is_better"]:
            assert f["candidate_score"] <= info["bound"]
        else:
            assert f["candidate_score"] >= info["bound"] * (1 - 1e-4)
    assert early.report_extra["cost"]["rejected_early"] == partial
    return partial


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rule", ["accuracy", "accuracy-strict", "loss"])
def test_early_rejection_takes_the_decisions_of_a_full_evaluation(seeded_dirs, sets, seed, rule):
    data, _ = sets
    options = {"select_on": "val", "strict": rule.endswith("strict")}
    if rule == "loss":
        options["metric_key"] = "loss"
    full = _cook(seeded_dirs[seed], data, full_evaluation=True, **options)
    early = _cook(seeded_dirs[seed], data, **options)
    assert 0 < sum(i.selected for i in early.ingredients) < len(NOISES)  # greedy really keeps and drops
    assert _same_decisions(full, early) >= 1  # and at least one candidate stopped early
    assert early.report_extra["cost"]["evaluations"] == full.report_extra["cost"]["evaluations"]
    report = early.report()
    assert "partial:" in report and "best it could still reach" in report


def test_a_partial_score_is_the_prefix_and_the_stop_the_first_batch_that_loses(seeded_dirs, sets):
    data, (ids, labels) = sets
    paths = seeded_dirs[0]
    soup = _cook(paths, data, select_on="val")
    states = {p.name: read_safetensors(p) for p in paths}
    model = pretrained_model()
    members = [soup.history[0]["candidate"]]
    current = soup.history[0]["score"]
    checked = 0
    for step in soup.history[1:]:
        if "partial" in step:
            state = float64_mean([states[m] for m in [*members, step["candidate"]]])
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
            with torch.no_grad():
                hits = (model(input_ids=ids).logits.argmax(-1) == labels).double()
            info, n = step["partial"], len(labels)
            k = info["units"]
            assert info["of"] == n and k % BATCH == 0
            # the recorded partial accuracy is the accuracy on the first k examples, computed here in float64
            assert step["scores"]["val"]["accuracy"] == pytest.approx(float(hits[:k].mean()), abs=1e-12)
            bounds = {j: (float(hits[:j].sum()) + (n - j)) / n for j in range(BATCH, k + 1, BATCH)}
            assert info["bound"] == pytest.approx(bounds[k], abs=1e-12)
            # stopped at the first batch where even all-correct remaining examples could not reach the soup
            assert bounds[k] < current
            assert all(bounds[j] >= current for j in range(BATCH, k, BATCH))
            checked += 1
        elif step["kept"]:
            members.append(step["candidate"])
            current = step["score"]
    assert checked >= 1


def _counting_rows(n: int, seed: int) -> list[list[int]]:
    """Rows that count up from a random token (5, 6, 7, ... wrapping at 99): easy to learn, so losses differ a lot."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(5, 99, (n,), generator=gen).tolist()
    lengths = torch.randint(6, 14, (n,), generator=gen).tolist()
    return [[5 + (s - 5 + j) % 94 for j in range(length)] for s, length in zip(starts, lengths)]


@pytest.fixture(scope="module")
def language_models(tmp_path_factory):
    """GPT-2s trained a little on counting rows: three with small noise, two ruined; rows to score."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("early-lm")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=32, pad_token_id=0)
    config.architectures = ["GPT2LMHeadModel"]
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train = torch.tensor([row[:6] for row in _counting_rows(2048, seed=1)])
    for step in range(60):
        batch = train[step * 32 : (step + 1) * 32]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    noises = [0.02, 0.03, 0.04, 0.6, 1.0]
    paths = [save(add_noise(model, noise, seed=i), root / f"lm-{i}") for i, noise in enumerate(noises)]
    return paths, Dataset.from_dict({"input_ids": _counting_rows(64, seed=2)})


@pytest.mark.parametrize("metric", ["perplexity", "loss"])
def test_language_models_stop_early_on_perplexity_and_loss_with_the_same_decisions(language_models, metric):
    paths, ds = language_models
    kwargs = {"eval_dataset": ds, "metric": metric, "batch_size": 8, "progress": False, "method": "greedy"}
    full = merge_models([str(p) for p in paths], full_evaluation=True, **kwargs)
    early = merge_models([str(p) for p in paths], **kwargs)
    assert early.params["greater_is_better"] is False
    assert 0 < sum(i.selected for i in early.ingredients) < len(paths)
    assert _same_decisions(full, early) >= 1
    for step in early.history:
        if "partial" in step:
            assert step["partial"]["unit"] == "tokens"


def test_metrics_not_known_to_be_sums_are_scored_in_full(seeded_dirs, sets):
    data, _ = sets

    def my_accuracy(predictions, references):  # a callable: hf_soups cannot know what it sums
        return {"acc": sum(p == r for p, r in zip(predictions, references)) / len(references)}

    for options in ({"metric": my_accuracy}, {"metric": "f1"}):
        soup = _cook(seeded_dirs[0], data, select_on="val", **options)
        assert any(not step["kept"] for step in soup.history)
        for step in soup.history:
            assert "partial" not in step and set(step["scores"]) == {"val", "ood"}
        assert soup.report_extra["cost"]["rejected_early"] == 0


def test_which_metrics_are_sums():
    from hf_soups.evaluation.early import sum_metric
    from tests.synthetic_task import tiny_config

    ds = as_dataset(*make_split(8, seed=0))
    config = tiny_config().to_dict()

    def known(**options) -> str | None:
        ev = build_evaluator({"val": ds}, config=config, **options)
        found = sum_metric(ev._task, ev._scorer, ev._selector)
        return None if found is None else found.key

    assert known(metric="accuracy") == "accuracy"
    assert known(metric="accuracy", metric_key="loss") == "loss"
    assert known(metric="loss") == "loss"
    assert known(metric="f1") is None
    assert known(metric="f1", metric_key="loss") == "loss"  # the task's own loss, beside a bundled metric
    assert known(metric="accuracy", metric_kwargs={"normalize": False}) is None  # a count, not the mean
    assert known(metric="accuracy", greater_is_better=False) is None  # a direction turned around
    assert known(metric=lambda predictions, references: {"accuracy": 1.0}) is None
    assert known(compute_metrics=lambda p: {"accuracy": 1.0}) is None


def test_a_candidate_that_ties_the_soup_is_kept_with_ge_and_dropped_with_strict(seeded_dirs, sets):
    """The bound at a tie: `>=` must score to the end (the tie keeps it), `>` may stop but must drop it."""
    from transformers import BertForSequenceClassification

    data, _ = sets
    model = BertForSequenceClassification.from_pretrained(seeded_dirs[0][1]).eval()
    ev = build_evaluator(
        data, select_on="val", batch_size=BATCH, progress=False, config=model.config.to_dict()
    )
    full = ev.evaluate(model)
    exact = ev.primary(full)
    assert ev.can_reject_early()
    scores, early = ev.evaluate_candidate(model, exact, strict=False)
    assert early is None and scores == full and ev.better(ev.primary(scores), exact)
    scores, early = ev.evaluate_candidate(model, exact, strict=True)
    assert not ev.better(early.bound if early else ev.primary(scores), exact, strict=True)
    scores, early = ev.evaluate_candidate(model, math.nextafter(exact, 0.0), strict=True)
    assert early is None and scores == full  # just below: a strict improvement, scored to the end
    scores, early = ev.evaluate_candidate(model, math.nextafter(exact, 1.0))
    assert early is not None or not ev.better(ev.primary(scores), math.nextafter(exact, 1.0))


def test_each_phase_is_announced_with_a_bar_over_evaluations_unless_bars_are_off(
    seeded_dirs, sets, capsys, monkeypatch
):
    import importlib

    hub_tqdm = importlib.import_module(
        "huggingface_hub.utils.tqdm"
    )  # the module (the package exports the class)
    data, _ = sets
    paths = [str(p) for p in seeded_dirs[0][:3]]
    # the suite runs with HF_HUB_DISABLE_PROGRESS_BARS=1, which huggingface_hub reads once into this constant
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    # and `hf-soups --quiet`, run in-process by other tests, calls disable_progress_bars() for the process
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", {})
    merge_models(paths, method="greedy", eval_dataset=data, select_on="val", batch_size=64, progress=True)
    err = capsys.readouterr().err
    for line in (
        "Greedy soup: scoring 3 ingredient(s) alone on 2 eval set(s)",
        "Greedy soup: scoring the uniform soup of all 3 ingredients",
        "Greedy soup: trying 2 candidate(s) best first",
    ):
        assert line in err
    assert "evaluation" in err and "6/6" in err  # the bar: 3 alone + the uniform soup + 2 candidates
    merge_models(paths, method="greedy", eval_dataset=data, select_on="val", batch_size=64, progress=False)
    assert "Greedy soup" not in capsys.readouterr().err
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", True)  # HF_HUB_DISABLE_PROGRESS_BARS=1
    merge_models(paths, method="greedy", eval_dataset=data, select_on="val", batch_size=64, progress=True)
    assert "Greedy soup" not in capsys.readouterr().err


def test_the_model_card_and_the_plot_label_a_partial_step(seeded_dirs, sets, tmp_path):
    data, _ = sets
    soup = _cook(seeded_dirs[0], data, select_on="val")
    partial = [h for h in soup.history if "partial" in h]
    card = str(soup.model_card())
    labelled = [row for row in card.splitlines() if row.startswith("|") and "stopped after" in row]
    assert len(labelled) == len(partial) >= 1
    for step, row in zip(partial, labelled):
        info = step["partial"]
        assert (
            f"| {step['candidate']} |" in row
            and f"stopped after {info['units']}/{info['of']} examples" in row
        )
    svg = soup.plot(tmp_path / "steps.svg").read_text()
    assert "dropped early: at best" in svg
