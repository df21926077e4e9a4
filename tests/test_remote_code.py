"""No code named by an argument runs without `trust_remote_code=True`: metric scripts, Hub metrics, imports.

Each hostile input writes a sentinel file when its code runs, so the tests see whether it ran, not only
whether an error was raised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from datasets import Dataset

from hf_soups.errors import InvalidArgumentError, UntrustedCodeError
from hf_soups.evaluation import build_evaluator
from hf_soups.evaluation.metrics import BUNDLED_METRICS, bundled_metric_path, clear_cache, load_metric
from hf_soups.remote_code import import_callable


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clear_cache()
    yield
    clear_cache()


def _hostile_metric(folder: Path, sentinel: Path) -> Path:
    """A working evaluate metric (the bundled accuracy) whose script writes `sentinel` when imported."""
    folder.mkdir(parents=True)
    code = (bundled_metric_path("accuracy") / "accuracy.py").read_text()
    payload = f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
    (folder / f"{folder.name}.py").write_text(payload + code)
    return folder


@pytest.fixture
def recorded_loads(monkeypatch):
    import evaluate

    seen = []
    real = evaluate.load

    def recording(path, *args, **kwargs):
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "load", recording)
    return seen


def test_local_metric_folder_runs_only_with_trust_remote_code(tmp_path, recorded_loads):
    sentinel = tmp_path / "ran.txt"
    folder = _hostile_metric(tmp_path / "my_metric", sentinel)
    for spec in (str(folder), folder, str(folder / "my_metric.py")):
        with pytest.raises(UntrustedCodeError) as info:
            load_metric(spec)
        message = str(info.value)
        assert "metric=" in message and "my_metric" in message and "trust_remote_code=True" in message
        assert "--trust-remote-code" in message
        assert info.value.argument == "metric" and isinstance(info.value, InvalidArgumentError)
    assert not sentinel.exists() and recorded_loads == []  # nothing imported, nothing handed to evaluate

    metric = load_metric(str(folder), trust_remote_code=True)
    assert sentinel.read_text() == "ran"
    assert metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"] == pytest.approx(2 / 3)


def test_build_evaluator_refuses_a_metric_script_before_running_it(tmp_path):
    sentinel = tmp_path / "ran.txt"
    folder = _hostile_metric(tmp_path / "sneaky", sentinel)
    ds = Dataset.from_dict({"input_ids": [[2, 5], [2, 6]], "label": [0, 1]})
    with pytest.raises(UntrustedCodeError, match="trust_remote_code=True") as info:
        build_evaluator(ds, metric=str(folder))
    assert info.value.value == str(folder)
    assert not sentinel.exists()
    evaluator = build_evaluator(ds, metric=str(folder), trust_remote_code=True)
    assert sentinel.exists() and evaluator.metric_key == "accuracy"


def test_merge_models_refuses_a_metric_script_before_any_work(tmp_path):
    from hf_soups import merge_models

    sentinel = tmp_path / "ran.txt"
    folder = _hostile_metric(tmp_path / "sneaky", sentinel)
    ds = Dataset.from_dict({"input_ids": [[2, 5]], "label": [0]})
    missing = [str(tmp_path / "nope-a"), str(tmp_path / "nope-b")]  # refused before resolving them
    with pytest.raises(UntrustedCodeError, match="metric="):
        merge_models(missing, method="greedy", eval_dataset=ds, metric=str(folder))
    assert not sentinel.exists()


@pytest.mark.parametrize("spec", ["bleu", ("glue", "mrpc"), "evaluate-metric/accuracy", "no_such_metric_xyz"])
def test_hub_metric_scripts_need_trust_and_are_never_fetched_without_it(spec, recorded_loads):
    with pytest.raises(UntrustedCodeError) as info:
        load_metric(spec)
    name = spec[0] if isinstance(spec, tuple) else spec
    assert repr(name) in str(info.value) and "trust_remote_code=True" in str(info.value)
    assert "accuracy" in str(info.value)  # lists the bundled metrics that need no opt-in
    assert recorded_loads == []


def test_with_trust_an_unreachable_hub_metric_is_an_evaluation_error(recorded_loads):
    from hf_soups.errors import EvaluationError

    with pytest.raises(EvaluationError, match="no_such_metric_xyz") as info:
        load_metric("no_such_metric_xyz", trust_remote_code=True)
    assert not isinstance(info.value, UntrustedCodeError) and recorded_loads == ["no_such_metric_xyz"]


def test_bundled_names_never_load_from_the_working_directory_or_the_hub(
    tmp_path, monkeypatch, recorded_loads
):
    """A folder called `accuracy` beside a recipe does not replace the bundled metric, trusted or not."""
    sentinel = tmp_path / "ran.txt"
    _hostile_metric(tmp_path / "accuracy", sentinel)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online or not, a bundled name is the bundled copy
    for trust in (False, True):
        clear_cache()
        metric = load_metric("accuracy", trust_remote_code=trust)
        assert metric.compute(predictions=[0, 1], references=[0, 0]) == {"accuracy": 0.5}
    assert not sentinel.exists()
    assert recorded_loads == [str(bundled_metric_path("accuracy"))] * 2
    # every bundled metric, its folder or its script by path, and a multilabel config need no opt-in
    for name in BUNDLED_METRICS:
        load_metric(name)
    load_metric(bundled_metric_path("spearmanr"))
    load_metric(str(bundled_metric_path("f1") / "f1.py"))
    load_metric(("f1", "multilabel"))


def test_objects_passed_from_python_need_no_opt_in():
    import evaluate

    module = evaluate.load(str(bundled_metric_path("accuracy")))
    assert load_metric(module) is module

    def hits(predictions, references):
        return {"hits": sum(p == r for p, r in zip(predictions, references))}

    assert load_metric(hits) is hits


def test_import_callable_imports_nothing_without_trust(tmp_path, monkeypatch):
    sentinel = tmp_path / "ran.txt"
    (tmp_path / "evil_metrics_mod.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
        "def compute_metrics(p):\n    return {'x': 1.0}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evil_metrics_mod", raising=False)
    with pytest.raises(UntrustedCodeError) as info:
        import_callable("evil_metrics_mod:compute_metrics", trust_remote_code=False)
    assert "compute_metrics='evil_metrics_mod:compute_metrics'" in str(info.value)
    assert "trust_remote_code=True" in str(info.value) and info.value.argument == "compute_metrics"
    with pytest.raises(UntrustedCodeError, match="my_key="):
        import_callable("evil_metrics_mod:compute_metrics", trust_remote_code=False, key="my_key")
    assert not sentinel.exists() and "evil_metrics_mod" not in sys.modules

    fn = import_callable("evil_metrics_mod:compute_metrics", trust_remote_code=True)
    assert fn(None) == {"x": 1.0} and sentinel.exists()
    monkeypatch.delitem(sys.modules, "evil_metrics_mod")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("evil_metrics_mod", "package.module:function"),
        ("a.b:c; import os", "package.module:function"),
        ("no_such_module_xyz:fn", "cannot be imported"),
        ("math:no_such_fn", "cannot be imported"),
        ("math:pi", "not a function"),
    ],
)
def test_import_callable_names_the_key_on_bad_specs(spec, match):
    with pytest.raises(InvalidArgumentError, match=match) as info:
        import_callable(spec, trust_remote_code=True, key="compute_metrics")
    assert str(info.value).startswith("compute_metrics=")
