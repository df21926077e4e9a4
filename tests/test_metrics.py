"""The bundled offline metrics and `load_metric` (no network anywhere in this file)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hf_soups.errors import EvaluationError, InvalidArgumentError
from hf_soups.evaluation.metrics import BUNDLED_METRICS, bundled_metric_path, clear_cache, load_metric


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _classification_data(n=200, k=3, seed=0):
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, k, n)
    preds = np.where(rng.random(n) < 0.7, refs, rng.integers(0, k, n))
    return preds.tolist(), refs.tolist()


@pytest.mark.parametrize("name", BUNDLED_METRICS)
def test_bundled_metric_matches_reference_implementation(name, offline):
    from scipy import stats
    from sklearn import metrics as skm

    metric = load_metric(name)
    if name in ("pearsonr", "spearmanr"):
        rng = np.random.default_rng(1)
        refs = rng.normal(size=100)
        preds = refs + rng.normal(scale=0.5, size=100)
        result = metric.compute(predictions=preds.tolist(), references=refs.tolist())
        expected = getattr(stats, name)(refs, preds)[0]
        assert result == {name: pytest.approx(expected, rel=1e-6)}
        with_p = metric.compute(predictions=preds.tolist(), references=refs.tolist(), return_pvalue=True)
        assert set(with_p) == {name, "p-value"} and 0.0 <= with_p["p-value"] < 1e-6
        return
    preds, refs = _classification_data()
    if name == "accuracy":
        assert metric.compute(predictions=preds, references=refs) == {
            "accuracy": pytest.approx(skm.accuracy_score(refs, preds))
        }
        assert metric.compute(predictions=preds, references=refs, normalize=False)["accuracy"] == sum(
            p == r for p, r in zip(preds, refs)
        )
    elif name == "matthews_correlation":
        assert metric.compute(predictions=preds, references=refs)[name] == pytest.approx(
            skm.matthews_corrcoef(refs, preds)
        )
    else:
        fn = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[name]
        for average in ("macro", "micro", "weighted"):
            got = metric.compute(predictions=preds, references=refs, average=average)[name]
            assert got == pytest.approx(fn(refs, preds, average=average))
        per_label = metric.compute(predictions=preds, references=refs, average=None)[name]
        assert np.allclose(per_label, fn(refs, preds, average=None)) and len(per_label) == 3
        binary_p = [int(p > 0) for p in preds]
        binary_r = [int(r > 0) for r in refs]
        assert metric.compute(predictions=binary_p, references=binary_r)[name] == pytest.approx(
            fn(binary_r, binary_p)
        )


def test_official_examples_give_the_documented_numbers(offline):
    f1 = load_metric("f1")
    assert f1.compute(references=[0, 1, 0, 1, 0], predictions=[0, 0, 1, 1, 0]) == {"f1": 0.5}
    assert (
        round(f1.compute(references=[0, 1, 0, 1, 0], predictions=[0, 0, 1, 1, 0], pos_label=0)["f1"], 2)
        == 0.67
    )
    mcc = load_metric("matthews_correlation")
    got = mcc.compute(references=[1, 3, 2, 0, 3, 2], predictions=[1, 2, 2, 0, 3, 3])["matthews_correlation"]
    assert round(got, 2) == 0.54


def test_multilabel_configs(offline):
    preds = [[0, 1, 1], [1, 1, 0]]
    refs = [[0, 1, 1], [0, 1, 0]]
    f1 = load_metric(("f1", "multilabel"))
    assert round(f1.compute(predictions=preds, references=refs, average="macro")["f1"], 2) == 0.67
    accuracy = load_metric("accuracy", config_name="multilabel")
    assert accuracy.compute(predictions=preds, references=refs) == {"accuracy": 0.5}
    mcc = load_metric(("matthews_correlation", "multilabel"))
    per_label = mcc.compute(predictions=preds, references=refs)["matthews_correlation"]
    assert len(per_label) == 3
    macro = mcc.compute(predictions=preds, references=refs, average="macro")["matthews_correlation"]
    assert macro == pytest.approx(float(np.mean(per_label)))


def test_bundled_names_use_the_bundled_copy_without_trying_the_hub(monkeypatch):
    """Online or offline: the Hub's script would be downloaded code, the bundled copy is ours."""
    import evaluate

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_EVALUATE_OFFLINE", raising=False)
    seen = []
    real_load = evaluate.load

    def recording_load(path, *args, **kwargs):
        seen.append(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "load", recording_load)
    metric = load_metric("recall")
    assert seen == [str(bundled_metric_path("recall"))]  # the Hub was never tried
    assert metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])["recall"] == pytest.approx(2 / 3)
    assert load_metric("recall") is metric  # cached: loaded once per process
    assert len(seen) == 1


def test_unknown_metric_is_refused_with_what_works(offline):
    with pytest.raises(InvalidArgumentError, match="no_such_metric_xyz") as info:
        load_metric("no_such_metric_xyz")  # not bundled: loading it would run a downloaded script
    assert "accuracy" in str(info.value) and "trust_remote_code=True" in str(info.value)
    with pytest.raises(EvaluationError, match="no_such_metric_xyz") as info:
        load_metric("no_such_metric_xyz", trust_remote_code=True)
    assert "accuracy" in str(info.value)  # lists what works offline
    with pytest.raises(InvalidArgumentError, match="glue"):
        load_metric(("glue", "mrpc"))
    with pytest.raises(EvaluationError, match="tuple"):
        load_metric(("f1", "multilabel", "extra"))
    with pytest.raises(EvaluationError):
        load_metric(42)
    with pytest.raises(EvaluationError, match="bundled"):
        bundled_metric_path("bleu")


def test_modules_and_callables_pass_through(offline, tmp_path):
    import evaluate

    module = evaluate.load(str(bundled_metric_path("accuracy")))
    assert load_metric(module) is module
    combined = evaluate.combine([str(bundled_metric_path("accuracy")), str(bundled_metric_path("f1"))])
    assert load_metric(combined) is combined
    assert combined.compute(predictions=[0, 1, 1], references=[0, 1, 0]) == {"accuracy": 2 / 3, "f1": 2 / 3}

    def fn(predictions, references):
        return {"hits": sum(p == r for p, r in zip(predictions, references))}

    assert load_metric(fn) is fn
    # the folder of a bundled metric is the bundled metric (a local copy elsewhere needs trust_remote_code)
    assert load_metric(bundled_metric_path("spearmanr")).compute(
        predictions=[1, 2, 3], references=[3, 4, 5]
    ) == {"spearmanr": pytest.approx(1.0)}


def test_importing_metrics_does_not_import_evaluate():
    code = "import sys, hf_soups.evaluation.metrics; assert 'evaluate' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
