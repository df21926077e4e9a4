"""WiSE-FT alpha sweeps chosen on held-out data, and the report / plot of the curve."""

from __future__ import annotations

import sys

import pytest
import torch

from hf_soups import merge_models
from hf_soups.errors import EvaluationError, InvalidArgumentError
from hf_soups.evaluation import build_evaluator
from tests.synthetic_task import add_noise, as_dataset, make_split, pretrained_model, save, trained_model

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _load(path):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(path).eval()


def _interpolate(base_path, ft_path, alpha):
    model = _load(base_path)
    ft = _load(ft_path).state_dict()
    state = {k: (1 - alpha) * v.float() + alpha * ft[k].float() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


def _check_sweep(soup, base, ft, sets, alphas):
    evaluator = build_evaluator(sets, select_on=soup.select_on, metric=soup.metric_key)
    independent = [evaluator.primary(evaluator.evaluate(_interpolate(base, ft, a))) for a in alphas]
    assert [h["alpha"] for h in soup.history] == alphas
    assert [h["score"] for h in soup.history] == pytest.approx(independent, abs=1e-6)
    best = (max if soup.params["greater_is_better"] else min)(independent)
    chosen = alphas[independent.index(best)]
    assert soup.params["alpha"] == chosen and soup.score == pytest.approx(best)
    assert [h["selected"] for h in soup.history] == [a == chosen for a in alphas]
    expected = _interpolate(base, ft, chosen).state_dict()
    for name, tensor in soup.model.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    for point in soup.history:
        assert set(point["scores"]) == set(sets)
    return chosen


@pytest.mark.slow
def test_sweep_picks_the_best_alpha_on_the_selection_set(tmp_path):
    base = save(pretrained_model(), tmp_path / "zero-shot")
    ft = save(trained_model(), tmp_path / "fine-tuned")
    ids, labels = make_split(400, seed=1)
    ood_ids, ood_labels = make_split(300, seed=2, shift=0.15)
    sets = {"val": as_dataset(ids, labels), "ood": as_dataset(ood_ids, ood_labels)}
    soup = merge_models(
        [str(ft)], method="wise-ft", base_model=str(base), alpha=ALPHAS, eval_dataset=sets, progress=False
    )
    chosen = _check_sweep(soup, base, ft, sets, ALPHAS)
    assert chosen >= 0.5  # the untrained end is at chance level
    assert soup.history[0]["scores"]["val"]["accuracy"] < 0.65 < soup.score
    report = soup.report()
    assert "Alpha sweep:" in report and "<- chosen" in report and "base (alpha=0)" in report
    assert f"alpha={chosen:g}" in report
    # selecting on the other set, by a loss (lower is better), is honoured too
    by_loss = merge_models(
        [str(ft)],
        method="wise-ft",
        base_model=str(base),
        alpha=ALPHAS,
        eval_dataset=sets,
        select_on="ood",
        metric="loss",
        progress=False,
    )
    assert by_loss.select_on == "ood" and by_loss.params["greater_is_better"] is False
    _check_sweep(by_loss, base, ft, sets, ALPHAS)


def test_sweep_on_small_models_is_exact_and_plotted(tmp_path):
    base = save(pretrained_model(), tmp_path / "base")
    ft = save(add_noise(pretrained_model(), 0.5, seed=4), tmp_path / "ft")
    sets = {"val": as_dataset(*make_split(48, seed=5))}
    alphas = [0.0, 0.3, 1.0, 0.6]
    soup = merge_models(
        [str(ft)],
        method="wise_ft",
        base_model=str(base),
        alpha=alphas,
        eval_dataset=sets,
        metric="loss",
        progress=False,
    )
    _check_sweep(soup, base, ft, sets, alphas)
    assert soup.params["alphas"] == alphas
    png = soup.plot(tmp_path / "plots" / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = soup.plot(tmp_path / "sweep.svg")
    assert "<svg" in svg.read_text()[:500]


def test_single_alpha_with_eval_set_is_scored_not_swept(tmp_path):
    base = save(pretrained_model(), tmp_path / "base")
    ft = save(add_noise(pretrained_model(), 0.5, seed=4), tmp_path / "ft")
    sets = {"val": as_dataset(*make_split(32, seed=5))}
    soup = merge_models(
        [str(ft)], method="wise-ft", base_model=str(base), alpha=[0.4], eval_dataset=sets, progress=False
    )
    assert soup.params["alpha"] == 0.4 and soup.history == []
    evaluator = build_evaluator(sets)
    assert soup.score == pytest.approx(evaluator.primary(evaluator.evaluate(_interpolate(base, ft, 0.4))))
    assert "wise-ft (alpha=0.4)" in soup.report()


def test_sweep_without_eval_set_is_refused_up_front(tmp_path):
    with pytest.raises(InvalidArgumentError, match="eval_dataset"):
        merge_models(
            [str(tmp_path / "missing")], method="wise-ft", base_model=str(tmp_path / "b"), alpha=[0.2, 0.8]
        )


def test_plot_errors_are_clear(tmp_path, monkeypatch):
    a = save(pretrained_model(), tmp_path / "a")
    b = save(add_noise(pretrained_model(), 0.1, seed=1), tmp_path / "b")
    soup = merge_models([str(a), str(b)], progress=False)  # not evaluated
    with pytest.raises(EvaluationError, match="eval_dataset"):
        soup.plot(tmp_path / "x.png")
    assert "Uniform soup: 2 of 2 ingredients kept" in soup.report()
    evaluated = merge_models(
        [str(a), str(b)], eval_dataset=as_dataset(*make_split(16, seed=0)), progress=False
    )
    assert evaluated.plot(tmp_path / "bars.png").exists()
    greedy = merge_models(
        [str(a), str(b)], method="greedy", eval_dataset=as_dataset(*make_split(16, seed=0)), progress=False
    )
    assert greedy.plot(tmp_path / "greedy.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"hf-soups\[plot\]"):
        greedy.plot(tmp_path / "again.png")
