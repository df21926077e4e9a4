"""Greedy soups: ingredient selection on held-out data, in-place candidates, the report and the baselines.

Ingredients are one trained tiny BERT plus independent noise of known scale ("good"), and one ruined by
large noise, so the right decisions are known in advance.
"""

from __future__ import annotations

import pytest
import torch

from hf_soups import merge_models
from hf_soups.errors import InvalidArgumentError, NonFiniteTensorError
from tests.synthetic_task import (
    accuracy,
    add_noise,
    as_dataset,
    make_split,
    pretrained_model,
    save,
    trained_model,
)
from tests.testing_common import float64_mean, read_safetensors, replay_greedy

GOOD_NOISE = 1.5
RUINED_NOISE = 12.0


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def eval_sets():
    ids, labels = make_split(500, seed=1)
    ood_ids, ood_labels = make_split(300, seed=2, shift=0.15)
    return {"val": as_dataset(ids, labels), "ood": as_dataset(ood_ids, ood_labels)}, (ids, labels)


@pytest.fixture(scope="module")
def kitchen_dirs(tmp_path_factory):
    """Four good ingredients and one ruined, saved without tokenizer files (the eval set is pre-tokenized)."""
    root = tmp_path_factory.mktemp("greedy")
    ft = trained_model()
    good = [save(add_noise(ft, GOOD_NOISE, seed=i), root / f"good-{i}") for i in range(4)]
    ruined = save(add_noise(ft, RUINED_NOISE, seed=99), root / "ruined")
    return good, ruined


def _load(path):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(path).eval()


def _mean_state(paths):
    return float64_mean([read_safetensors(p) for p in paths])


def _accuracy_of(ids, labels):
    """The test's own scorer: accuracy of the given weights (loaded into a fresh skeleton) on (ids, labels)."""
    model = pretrained_model()

    def score(state) -> float:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        return accuracy(model, ids, labels)

    return score


@pytest.mark.slow
def test_greedy_keeps_the_good_drops_the_ruined_and_beats_the_best_single(
    kitchen_dirs, eval_sets, monkeypatch
):
    from transformers import PreTrainedModel

    good, ruined = kitchen_dirs
    sets, (ids, labels) = eval_sets
    loads = []
    real = PreTrainedModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0] if args else None)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting))
    refs = [str(ruined), *map(str, good)]  # the ruined one first: order must come from the scores
    soup = merge_models(refs, method="greedy", eval_dataset=sets, select_on="val", progress=False)
    assert len(loads) == 1  # one live model for every candidate, no from_pretrained per candidate
    monkeypatch.undo()

    by_name = {i.name: i for i in soup.ingredients}
    assert by_name["ruined"].selected is False and by_name["ruined"].weight == 0.0
    assert by_name["ruined"].score < 0.8
    kept = [i for i in soup.ingredients if i.selected]
    assert len(kept) >= 2 and all(i.name.startswith("good") for i in kept)
    best = max(soup.ingredients, key=lambda i: i.score)
    # every ingredient was scored on every set, and its score is the selection set's accuracy
    for ing in soup.ingredients:
        assert set(ing.scores) == {"val", "ood"} and ing.score == ing.scores["val"]["accuracy"]
        assert ing.score == pytest.approx(
            accuracy(_load(ruined if ing.name == "ruined" else good[int(ing.name[-1])]), ids, labels)
        )
    # the soup is exactly the mean of the kept ingredients, and its recorded score is its real score
    kept_paths = [p for p in good if by_name[p.name].selected]
    expected = _mean_state(kept_paths)
    for name, tensor in soup.model.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6)
    assert soup.score == pytest.approx(accuracy(soup.model, ids, labels))
    assert soup.metric_key == "accuracy" and soup.select_on == "val"
    # history: the start, then one step per candidate, best-first, the soup's score never drops
    assert [h["step"] for h in soup.history] == list(range(5))
    assert soup.history[0]["candidate"] == best.name
    candidates = [
        soup.ingredients[[i.name for i in soup.ingredients].index(h["candidate"])] for h in soup.history
    ]
    assert [c.score for c in candidates] == sorted((c.score for c in candidates), reverse=True)
    states = {p.name: read_safetensors(p) for p in [ruined, *good]}
    replay_greedy(soup, states, _accuracy_of(ids, labels))  # every step's score and decision, independently
    baselines = soup.report_extra["baselines"]
    assert baselines["best_single"]["name"] == best.name and "uniform" in baselines
    report = soup.report()
    for text in (
        "Greedy soup",
        "best single (",
        "uniform soup (5)",
        "greedy soup (",
        "ruined",
        "val/accuracy",
        "ood/accuracy",
    ):
        assert text in report


@pytest.mark.slow
def test_uniform_soup_of_noisy_good_ingredients_beats_each(kitchen_dirs, eval_sets):
    from hf_soups.evaluation import build_evaluator

    good, _ = kitchen_dirs
    sets, _ = eval_sets
    soup = merge_models([str(p) for p in good], eval_dataset=sets, progress=False)
    evaluator = build_evaluator(sets)
    singles = [evaluator.primary(evaluator.evaluate(_load(p))) for p in good]
    assert soup.score > max(singles), (soup.score, singles)  # averaging cancels independent noise
    assert soup.scores["val"]["loss"] < min(evaluator.evaluate(_load(p))["val"]["loss"] for p in good)


@pytest.mark.slow
def test_strict_keeps_only_improvements_and_known_scores_are_reused(kitchen_dirs, eval_sets):
    good, ruined = kitchen_dirs
    sets, (ids, labels) = eval_sets
    states = {p.name: read_safetensors(p) for p in [ruined, *good]}
    loose = merge_models([str(p) for p in good], method="greedy", eval_dataset=sets, progress=False)
    strict = merge_models(
        [str(p) for p in good], method="greedy", eval_dataset=sets, strict=True, progress=False
    )
    assert strict.params["strict"] is True
    assert sum(i.selected for i in strict.ingredients) <= sum(i.selected for i in loose.ingredients)
    replay_greedy(strict, states, _accuracy_of(ids, labels), strict=True)
    replay_greedy(loose, states, _accuracy_of(ids, labels))

    # scores= are used as given: here they (wrongly) rank the ruined ingredient first
    given = {"ruined": 0.99, "good-0": 0.9, "good-1": 0.8}
    soup = merge_models(
        [str(ruined), str(good[0]), str(good[1])],
        method="greedy",
        eval_dataset=sets,
        scores=given,
        progress=False,
    )
    assert [h["candidate"] for h in soup.history] == ["ruined", "good-0", "good-1"]
    assert {i.name: i.score for i in soup.ingredients} == given  # not re-evaluated
    # the start is measured, and the candidates are compared with that measure, never with the given 0.99
    assert soup.history[0]["scores"]["val"]["accuracy"] < 0.8
    assert soup.history[0]["score"] == soup.history[0]["scores"]["val"]["accuracy"]
    replay_greedy(soup, states, _accuracy_of(ids, labels))


@pytest.mark.slow
def test_ensemble_baseline_is_reported_never_selected(kitchen_dirs, eval_sets, tmp_path):
    good, ruined = kitchen_dirs
    sets, (ids, labels) = eval_sets
    refs = [str(p) for p in good[:2]] + [str(ruined)]
    soup = merge_models(
        refs,
        method="greedy",
        eval_dataset=sets,
        ensemble_baseline=True,
        output_dir=tmp_path / "soup",
        progress=False,
    )
    with torch.no_grad():
        mean_logits = sum(_load(p)(input_ids=ids).logits for p in refs) / len(refs)
    expected = float((mean_logits.argmax(-1) == labels).float().mean())
    ensemble = soup.report_extra["baselines"]["ensemble"]
    assert ensemble["scores"]["val"]["accuracy"] == pytest.approx(expected)
    assert "logit ensemble" in soup.report()
    # streamed to disk: the files hold the same soup as the one that was scored
    on_disk = _load(tmp_path / "soup")
    kept = [p for p in refs if next(i for i in soup.ingredients if i.name == p.split("/")[-1]).selected]
    expected_state = _mean_state(kept)
    for name, tensor in on_disk.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor.double(), expected_state[name], rtol=0, atol=1e-6)
    assert accuracy(on_disk, ids, labels) == pytest.approx(soup.score)


# ---------------------------------------------------------------------------------------- fast tests


@pytest.fixture
def untrained_dirs(tmp_path):
    base = pretrained_model()
    return [save(add_noise(base, 0.05, seed=i), tmp_path / f"m{i}") for i in range(3)]


def test_greedy_history_replays_on_independently_averaged_weights(untrained_dirs):
    ids, labels = make_split(60, seed=3)
    soup = merge_models(
        [str(p) for p in untrained_dirs],
        method="greedy",
        eval_dataset=as_dataset(ids, labels),
        progress=False,
    )
    score = _accuracy_of(ids, labels)
    states = {p.name: read_safetensors(p) for p in untrained_dirs}
    for ing in soup.ingredients:
        assert ing.score == pytest.approx(score(states[ing.name]))
    best = max(soup.ingredients, key=lambda i: (i.score, -soup.ingredients.index(i)))
    assert soup.history[0]["candidate"] == best.name  # the start is the best single ingredient
    kept = replay_greedy(soup, states, score)
    expected = _mean_state([p for p in untrained_dirs if p.name in kept])
    for name, tensor in soup.model.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6)


def test_running_soup_memory_is_one_float32_model(untrained_dirs):
    """The running sum holds one float32 copy of the model however many ingredients are tried."""
    from hf_soups.ingredients import as_ingredients, resolve
    from hf_soups.kitchen import Kitchen
    from hf_soups.recipes.greedy import RunningSoup

    kitchen = Kitchen(ingredients=[resolve(i) for i in as_ingredients([str(p) for p in untrained_dirs])])
    live = kitchen.new_live_model()
    run = RunningSoup(kitchen, live)
    run.start(0)
    run.try_candidate(1)
    models = [_load(p) for p in untrained_dirs]
    w = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(
        live.state_dict()[w], (models[0].state_dict()[w] + models[1].state_dict()[w]) / 2
    )
    run.restore()  # rejected: back to the soup without re-reading anything from disk
    torch.testing.assert_close(live.state_dict()[w], models[0].state_dict()[w])
    run.try_candidate(2)
    run.accept(2)
    torch.testing.assert_close(
        live.state_dict()[w], (models[0].state_dict()[w] + models[2].state_dict()[w]) / 2
    )
    assert run.members == [0, 2]
    n_params = sum(t.numel() for t in live.state_dict().values() if t.is_floating_point())
    assert sum(t.numel() for t in run.sums.values()) <= n_params
    assert all(t.dtype == torch.float32 for t in run.sums.values())


def test_greedy_refuses_bad_input_before_any_work(untrained_dirs, tmp_path):
    ds = as_dataset(*make_split(8, seed=0))
    missing = [str(tmp_path / "nope-a"), str(tmp_path / "nope-b")]
    with pytest.raises(InvalidArgumentError, match="eval_dataset"):
        merge_models(missing, method="greedy")
    with pytest.raises(InvalidArgumentError, match="weights"):
        merge_models(missing, method="greedy", eval_dataset=ds, weights=[1, 2])
    with pytest.raises(InvalidArgumentError, match="not ingredients"):
        merge_models([str(p) for p in untrained_dirs], method="greedy", eval_dataset=ds, scores={"m9": 0.5})


def test_greedy_names_a_broken_ingredient(untrained_dirs, tmp_path):
    broken = pretrained_model()
    with torch.no_grad():
        broken.bert.pooler.dense.weight[0, 0] = float("nan")
    bad = save(broken, tmp_path / "diverged")
    ds = as_dataset(*make_split(8, seed=0))
    with pytest.raises(NonFiniteTensorError, match="diverged") as info:
        merge_models([str(untrained_dirs[0]), str(bad)], method="greedy", eval_dataset=ds, progress=False)
    assert info.value.ingredient == "diverged" and "pooler" in info.value.tensor_name


def _language_models(tmp_path):
    """Three GPT-2s with small noise around one init and one ruined (noise 3.0), plus token rows to score."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=32, pad_token_id=0)
    config.architectures = ["GPT2LMHeadModel"]
    base = GPT2LMHeadModel(config)
    paths = []
    for i, noise in enumerate([0.05, 0.05, 0.05, 3.0]):
        model = add_noise(base, noise, seed=i)
        model.config.architectures = ["GPT2LMHeadModel"]
        paths.append(save(model, tmp_path / f"lm-{i}"))
    gen = torch.Generator().manual_seed(0)
    rows = [
        torch.randint(5, 99, (int(n),), generator=gen).tolist()
        for n in torch.randint(4, 12, (24,), generator=gen)
    ]
    return paths, Dataset.from_dict({"input_ids": rows}), rows


def _perplexity_f64(model, rows) -> float:
    """exp(mean next-token cross-entropy) over every row, one unpadded row at a time, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(row) - 1
    return float(torch.exp(torch.tensor(total / count, dtype=torch.float64)))


def _lm_states(paths):
    return {p.name: read_safetensors(p) for p in paths}


def _perplexity_of(rows, skeleton):
    """The test's own scorer for language models: `_perplexity_f64` of the given weights (loaded into a copy of
    the model at `skeleton`, whose head is tied to its input embeddings)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(skeleton).eval()

    def score(state) -> float:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        model.tie_weights()
        return _perplexity_f64(model, rows)

    return score


def test_a_given_start_score_is_not_compared_with_measured_candidates(tmp_path):
    """scores= orders the ingredients; the soup the candidates must beat is measured like they are."""
    from transformers import GPT2LMHeadModel

    paths, ds, rows = _language_models(tmp_path)
    # the ruined model is given a perfect perplexity: it starts the soup, but 1.0 is not what it measures
    soup = merge_models(
        [str(p) for p in paths],
        method="greedy",
        eval_dataset=ds,
        metric="perplexity",
        scores={"lm-3": 1.0},
        progress=False,
    )
    measured = _perplexity_f64(GPT2LMHeadModel.from_pretrained(paths[3]).eval(), rows)
    assert measured > 50.0  # far from the given 1.0
    start = soup.history[0]
    assert start["candidate"] == "lm-3"
    assert start["score"] == pytest.approx(measured, rel=1e-4)
    assert start["given_score"] == 1.0
    assert next(i for i in soup.ingredients if i.name == "lm-3").score == 1.0  # the given number is kept
    replay_greedy(soup, _lm_states(paths), _perplexity_of(rows, paths[0]), greater_is_better=False, rel=1e-4)
    # compared with 1.0, every candidate was dropped; compared with what lm-3 measures, averaging helps
    assert any(step["kept"] for step in soup.history[1:])
    assert soup.score == pytest.approx(_perplexity_f64(soup.model, rows), rel=1e-4)
    assert soup.score < measured
    assert soup.report_extra["baselines"]["best_single"]["score"] == pytest.approx(measured, rel=1e-4)


def test_greedy_on_a_language_model_minimises_perplexity(tmp_path):
    paths, ds, rows = _language_models(tmp_path)
    soup = merge_models(
        [str(p) for p in paths], method="greedy", eval_dataset=ds, metric="perplexity", progress=False
    )
    assert soup.metric_key == "perplexity" and soup.params["greater_is_better"] is False
    states, score = _lm_states(paths), _perplexity_of(rows, paths[0])
    for ing in soup.ingredients:
        assert ing.score == pytest.approx(score(states[ing.name]), rel=1e-4)
    assert soup.history[0]["candidate"] == min(soup.ingredients, key=lambda i: i.score).name
    replay_greedy(soup, states, score, greater_is_better=False, rel=1e-4)
    assert next(i for i in soup.ingredients if i.name == "lm-3").selected is False
    with pytest.raises(InvalidArgumentError, match="ensemble_baseline"):
        merge_models(
            [str(p) for p in paths[:2]],
            method="greedy",
            eval_dataset=ds,
            metric="perplexity",
            ensemble_baseline=True,
            progress=False,
        )
