"""The task-vector family through `merge_models`, the CLI and recipe files: task arithmetic, TIES, DARE, SLERP
and Model Stock on tiny models against float64 references written from the definitions
(`tests.testing_common.family_reference`), the streaming engine's two-pass path slice by slice, knob sweeps on
eval data, and bad input refused by name before any download."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hf_soups import merge_models
from hf_soups.core import engine
from hf_soups.errors import InvalidArgumentError, NonFiniteTensorError
from tests.testing_common import (
    assert_state_close,
    family_reference,
    read_safetensors,
    write_yaml,
)
from tests.tiny_models import make_tiny_bert_dir

CASES = {
    "task-arithmetic": dict(weights=[1.0, 2.0, 0.5], scaling=0.7),
    "ties": dict(density=0.4, weights=[1.0, 2.0, 0.5], scaling=1.3),
    "dare-linear": dict(density=0.6, seed=7, scaling=0.9),
    "dare-ties": dict(density=0.6, seed=7, weights=[0.5, 1.0, 2.0]),
    "slerp": dict(t=0.3),
    "model-stock": {},
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base = make_tiny_bert_dir(root / "base", noise=0.0)
    # a shared direction plus independent noise: task vectors at a positive angle (Model Stock's t in (0, 1))
    ingredients = [make_tiny_bert_dir(root / f"ft-{i}", seed=i, noise=0.002) for i in range(3)]
    return base, ingredients


def _models(method, ingredients):
    return ingredients[:2] if method == "slerp" else ingredients


def _reference(method, base, ingredients, kwargs):
    thetas = [read_safetensors(p) for p in _models(method, ingredients)]
    return family_reference(method, read_safetensors(base), thetas, **kwargs)


@pytest.mark.parametrize("method", list(CASES))
def test_each_method_equals_its_float64_definition(family_dirs, tmp_path, method):
    base, ingredients = family_dirs
    kwargs = CASES[method]
    soup = merge_models(
        [str(p) for p in _models(method, ingredients)],
        method=method,
        base_model=str(base),
        output_dir=tmp_path / "soup",
        progress=False,
        **kwargs,
    )
    expected = _reference(method, base, ingredients, kwargs)
    assert_state_close(read_safetensors(tmp_path / "soup"), expected, atol=2e-6)
    # the in-memory soup holds the same bits as the written one
    in_memory = merge_models(
        [str(p) for p in _models(method, ingredients)],
        method=method,
        base_model=str(base),
        progress=False,
        **kwargs,
    ).model.state_dict()
    for k, v in read_safetensors(tmp_path / "soup").items():
        assert torch.equal(v, in_memory[k]), k
    assert soup.method == method
    for key, value in kwargs.items():
        assert soup.params[key] == value


@pytest.mark.parametrize("method", ["ties", "dare-ties", "slerp", "model-stock"])
def test_two_pass_soup_is_the_same_bits_whatever_the_slice_size(family_dirs, tmp_path, monkeypatch, method):
    """Streamed in slices of 64 elements (every tensor of the tiny model is then sliced, and written slice by
    slice), the soup is bit for bit the one computed on whole tensors."""
    base, ingredients = family_dirs
    kwargs = CASES[method]
    models = [str(p) for p in _models(method, ingredients)]
    whole = merge_models(
        models, method=method, base_model=str(base), output_dir=tmp_path / "a", progress=False, **kwargs
    )
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 64)
    merge_models(
        models, method=method, base_model=str(base), output_dir=tmp_path / "b", progress=False, **kwargs
    )
    a, b = read_safetensors(whole.output_dir), read_safetensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_nan_that_dare_would_drop_is_still_refused_by_name(family_dirs, tmp_path):
    from safetensors.torch import save_file

    base, ingredients = family_dirs
    import shutil

    bad = tmp_path / "diverged"
    shutil.copytree(ingredients[1], bad)
    state = read_safetensors(bad)
    name = "bert.pooler.dense.weight"
    state[name] = state[name].clone()
    state[name].view(-1)[:] = float("nan")
    state[name].view(-1)[0::2] = 0.0  # half the entries finite: whatever the mask, some NaN are dropped
    (weights,) = sorted(bad.glob("*.safetensors"))
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(NonFiniteTensorError) as info:
        merge_models(
            [str(ingredients[0]), str(bad)],
            method="dare-linear",
            base_model=str(base),
            density=0.01,
            seed=0,
            output_dir=tmp_path / "out" / "soup",
            progress=False,
        )
    assert info.value.ingredient == "diverged"
    assert info.value.tensor_name == name
    assert not (tmp_path / "out" / "soup").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="ties", density=0.5), "base_model"),
        (dict(method="task-arithmetic"), "base_model"),
        (dict(method="model-stock"), "base_model"),
        (dict(method="ties", base_model="org/base", density=0.0), "density"),
        (dict(method="ties", base_model="org/base", density=1.5), "density"),
        (dict(method="dare-ties", base_model="org/base", density=[0.5, 0]), "density"),
        (dict(method="ties", base_model="org/base"), "density"),
        (dict(method="dare-linear", base_model="org/base", density=0.5), "seed"),
        (dict(method="dare-linear", base_model="org/base", density=0.5, seed=-1), "seed"),
        (dict(method="slerp", t=0.5), "exactly 2"),
        (dict(method="slerp"), "t"),
        (dict(method="slerp", t=1.5), "t"),
        (dict(method="task-arithmetic", base_model="org/base", scaling=[0.5, 1.0]), "eval_dataset"),
        (dict(method="uniform", density=0.5), "density"),
        (dict(method="task-arithmetic", base_model="org/base", weights=[1.0, 2.0]), "weights"),
    ],
)
def test_bad_input_is_refused_by_name_before_any_download(kwargs, match):
    # three Hub ids that do not exist and no network: a download would fail with a different error
    with pytest.raises(InvalidArgumentError, match=match):
        merge_models(["org/a", "org/b", "org/c"], progress=False, **kwargs)


def test_non_linear_methods_need_a_rank_for_the_adapter_form_and_slerp_has_none():
    with pytest.raises(InvalidArgumentError, match="rank: method='ties' is not linear"):
        merge_models(
            ["org/a", "org/b"], method="ties", base_model="org/base", density=0.5, adapter_output="adapter"
        )
    with pytest.raises(InvalidArgumentError, match="adapter_output: method='slerp' interpolates the weights"):
        merge_models(["org/a", "org/b"], method="slerp", t=0.5, adapter_output="adapter", rank=4)


@pytest.mark.parametrize(
    "method, kwargs",
    [("ties", dict(density=0.5, scaling=1.2)), ("dare-ties", dict(density=0.6, seed=3)), ("model-stock", {})],
)
def test_non_linear_methods_of_lora_adapters_as_an_svd_adapter(tmp_path, method, kwargs):
    """TIES, DARE and Model Stock on the adapters' exact ΔWᵢ: merged, the float64 reference on the full weights;
    as an adapter of full rank, the same weights once merged into the base; truncated, the error is reported and
    equals the float64 SVD's own."""
    pytest.importorskip("peft")
    from tests.test_battery import build_bert_lora

    arch = build_bert_lora(tmp_path / "lora")
    models = [str(p) for p in arch.ingredients]
    merged = merge_models(
        models,
        method=method,
        base_model=str(arch.base),
        output_dir=tmp_path / "merged",
        progress=False,
        **kwargs,
    )
    base_state = arch.theta(arch.base)
    expected = family_reference(method, base_state, [arch.theta(p) for p in arch.ingredients], **kwargs)
    assert_state_close(read_safetensors(merged.output_dir), expected, atol=2e-6)

    full = merge_models(
        models,
        method=method,
        base_model=str(arch.base),
        adapter_output="adapter",
        rank=10**6,  # every module at its full numerical rank: exact up to float rounding
        output_dir=tmp_path / "adapter",
        progress=False,
        **kwargs,
    )
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    state = full.model.merge_and_unload().state_dict()
    assert_state_close({k: v for k, v in state.items() if k in expected}, expected, atol=2e-5)

    low = merge_models(
        models,
        method=method,
        base_model=str(arch.base),
        adapter_output="adapter",
        rank=1,
        progress=False,
        **kwargs,
    )
    errors = low.report_extra["adapter_svd_error"]
    assert errors and all(0.0 <= e <= 1.0 for e in errors.values())
    merged_low = low.model.merge_and_unload().state_dict()
    for module, error in errors.items():
        name = f"{module}.weight"
        delta = (
            expected[name].double() - base_state[name].double()
        )  # BERT's Linear: (out, in), the LoRA layout
        s = torch.linalg.svdvals(delta)
        if float(s[0]) == 0.0:  # e.g. Model Stock with opposed task vectors keeps the base there
            assert error == 0.0
            torch.testing.assert_close(
                merged_low[name].double(), base_state[name].double(), atol=2e-6, rtol=0
            )
            continue
        assert error == pytest.approx(
            float(torch.sqrt((s[1:] ** 2).sum() / (s**2).sum())), rel=1e-4, abs=1e-6
        )
        # the served weight is the base plus the best rank-1 approximation of the soup's change
        u, sv, vh = torch.linalg.svd(delta)
        best = base_state[name].double() + sv[0] * torch.outer(u[:, 0], vh[0])
        torch.testing.assert_close(merged_low[name].double(), best, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ sweeps


def _eval_file(base, tmp_path):
    """`_eval_set(base)` written as a JSON-lines file, for the CLI and recipe files."""
    import json

    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _eval_set(base).to_list()))
    return path


def _eval_set(base):
    from datasets import Dataset
    from transformers import BertForSequenceClassification

    gen = torch.Generator().manual_seed(7)
    rows = torch.randint(5, 99, (16, 8), generator=gen).tolist()
    with torch.no_grad():
        logits = BertForSequenceClassification.from_pretrained(base)(input_ids=torch.tensor(rows)).logits
    return Dataset.from_dict({"input_ids": rows, "label": logits.argmax(-1).tolist()})


def test_a_knob_sweep_scores_every_value_and_serves_the_best(family_dirs, tmp_path):
    base, ingredients = family_dirs
    data = _eval_set(base)
    scalings, densities = [0.0, 1.0, 4.0], [0.3, 1.0]
    soup = merge_models(
        [str(p) for p in ingredients],
        method="ties",
        base_model=str(base),
        scaling=scalings,
        density=densities,
        eval_dataset={"val": data, "shifted": data.select(range(8))},
        select_on="val",
        metric="accuracy",
        output_dir=tmp_path / "soup",
        progress=False,
    )
    assert [(h["scaling"], h["density"]) for h in soup.history] == [
        (s, d) for s in scalings for d in densities
    ]
    assert all(set(h["scores"]) == {"val", "shifted"} for h in soup.history)
    best = max(soup.history, key=lambda h: h["score"])  # ties: the first, as the sweep keeps it
    assert soup.params["scaling"] == best["scaling"] and soup.params["density"] == best["density"]
    assert soup.params["sweep"] == {"scaling": scalings, "density": densities}
    assert [h["selected"] for h in soup.history].count(True) == 1 and best["selected"]
    expected = family_reference(
        "ties",
        read_safetensors(base),
        [read_safetensors(p) for p in ingredients],
        scaling=best["scaling"],
        density=best["density"],
    )
    assert_state_close(read_safetensors(tmp_path / "soup"), expected, atol=2e-6)
    assert soup.score == best["score"]
    # the served model is the scored one
    for k, v in read_safetensors(tmp_path / "soup").items():
        assert torch.equal(v, soup.model.state_dict()[k]), k


# ------------------------------------------------------------------------------------- CLI and recipe files


def test_cli_and_recipe_file_take_the_same_knobs(family_dirs, tmp_path):
    base, ingredients = family_dirs
    env_python = sys.executable
    out_cli = tmp_path / "cli"
    cmd = [env_python, "-m", "hf_soups.cli", "merge", *map(str, ingredients), "--method", "dare-ties"]
    cmd += [
        "--base-model",
        str(base),
        "--density",
        "0.6",
        "--seed",
        "7",
        "--scaling",
        "0.8",
        "-o",
        str(out_cli),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = family_reference(
        "dare-ties",
        read_safetensors(base),
        [read_safetensors(p) for p in ingredients],
        density=0.6,
        seed=7,
        scaling=0.8,
    )
    assert_state_close(read_safetensors(out_cli), expected, atol=2e-6)

    # the recipe written beside the soup records the knobs, and re-cooks the same bits
    import yaml

    from hf_soups.api import cook_recipe
    from tests.testing_common import assert_same_tensors

    written = yaml.safe_load((out_cli / "soup_recipe.yaml").read_text())
    assert (written["method"], written["density"], written["seed"], written["scaling"]) == (
        "dare-ties",
        0.6,
        7,
        0.8,
    )
    cook_recipe(out_cli / "soup_recipe.yaml", output_dir=tmp_path / "again", progress=False)
    assert_same_tensors(out_cli, tmp_path / "again")

    # a hand-written recipe file with the same keys
    recipe = write_yaml(
        tmp_path / "recipe.yaml",
        {
            "method": "dare-ties",
            "ingredients": [{"model": str(p)} for p in ingredients],
            "base_model": str(base),
            "density": 0.6,
            "seed": 7,
            "scaling": 0.8,
        },
    )
    cook_recipe(recipe, output_dir=tmp_path / "from_file", progress=False)
    assert_same_tensors(out_cli, tmp_path / "from_file")


def test_a_sweep_is_in_the_report_the_plot_and_the_card(family_dirs, tmp_path):
    pytest.importorskip("matplotlib")
    base, ingredients = family_dirs
    soup = merge_models(
        [str(p) for p in ingredients[:2]],
        method="slerp",
        t=[0.0, 0.5, 1.0],
        eval_dataset=_eval_set(base),
        output_dir=tmp_path / "soup",
        progress=False,
    )
    report = soup.report()
    assert "Sweep of t" in report
    chosen = next(h for h in soup.history if h["selected"])
    assert soup.params["t"] == chosen["t"]
    for h in soup.history:
        assert f"{h['t']:g}" in report
    assert report.count("<- chosen") == 1
    image = soup.plot(tmp_path / "curve.png")
    assert image.stat().st_size > 0
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "Sweep of t" in card and "t chosen on the held-out" in card
    assert "arxiv" in card.lower() or "doi.org" in card or "acm.org" in card  # the method's reference


def test_task_arithmetic_of_lora_adapters_is_exact_in_both_output_forms(tmp_path):
    """Linear in the adapters' ΔW: merged, the soup is base + λ Σ wᵢ ΔWᵢ; as an adapter, the same weights once
    merged into the base (the concatenated factors, no truncation)."""
    pytest.importorskip("peft")
    from tests.test_battery import build_bert_lora

    arch = build_bert_lora(tmp_path / "lora")
    kwargs = dict(method="task-arithmetic", base_model=str(arch.base), weights=[1.0, 0.5, 2.0], scaling=0.6)
    models = [str(p) for p in arch.ingredients]
    merged = merge_models(models, output_dir=tmp_path / "merged", progress=False, **kwargs)
    expected = family_reference(
        "task-arithmetic",
        arch.theta(arch.base),
        [arch.theta(p) for p in arch.ingredients],
        **{k: kwargs[k] for k in ("weights", "scaling")},
    )
    assert_state_close(read_safetensors(merged.output_dir), expected, atol=2e-6)
    adapter = merge_models(models, adapter_output="adapter", progress=False, **kwargs)
    state = adapter.model.merge_and_unload().state_dict()
    assert_state_close({k: v for k, v in state.items() if k in expected}, expected, atol=2e-6)


# ------------------------------------------------------------------------------------- several methods


def test_several_methods_are_scored_alike_and_the_best_is_served(family_dirs, tmp_path):
    """method=[...]: each method cooked with its own knobs (ties sweeps density), every one scored on the same eval
    sets, the best on select_on served; the soup is the float64 reference of the winner at its chosen knobs."""
    base, ingredients = family_dirs
    data = _eval_set(base)
    methods = ["task-arithmetic", "ties", "dare-ties", "model-stock"]
    soup = merge_models(
        [str(p) for p in ingredients],
        method=methods,
        base_model=str(base),
        scaling=[0.5, 3.0],
        density=[0.3, 1.0],
        seed=0,
        eval_dataset={"val": data, "shifted": data.select(range(8))},
        select_on="val",
        output_dir=tmp_path / "soup",
        progress=False,
    )
    rows = soup.comparison
    assert [r["method"] for r in rows] == methods
    assert all(set(r["scores"]) == {"val", "shifted"} for r in rows)
    assert [r["selected"] for r in rows].count(True) == 1
    winner = next(r for r in rows if r["selected"])
    assert winner["score"] == max(r["score"] for r in rows)
    assert rows.index(winner) == [r["score"] for r in rows].index(winner["score"])  # ties: the first listed
    assert soup.method == winner["method"] and soup.score == winner["score"]
    assert soup.params["methods"] == methods
    # each method chose its own knobs: model stock has none, the others swept theirs
    assert "scaling" not in rows[3]["params"] and rows[1]["params"]["sweep"] == {
        "scaling": [0.5, 3.0],
        "density": [0.3, 1.0],
    }
    knobs = {k: v for k, v in winner["params"].items() if k in ("weights", "scaling", "density", "seed", "t")}
    expected = family_reference(
        winner["method"], read_safetensors(base), [read_safetensors(p) for p in ingredients], **knobs
    )
    assert_state_close(read_safetensors(tmp_path / "soup"), expected, atol=2e-6)
    for k, v in read_safetensors(tmp_path / "soup").items():  # the served model is the scored one
        assert torch.equal(v, soup.model.state_dict()[k]), k
    # the best single ingredient, on every eval set, beside every method
    best = soup.report_extra["baselines"]["best_single"]
    assert set(best["scores"]) == {"val", "shifted"}
    report = soup.report()
    assert "Methods compared" in report and f"best single ({best['name']})" in report
    for r in rows:
        assert r["method"] in report.split("Methods compared")[1]
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "Methods compared" in card and all(m in card for m in methods)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method=["ties", "dare-ties"], base_model="org/base", density=0.5, seed=0), "^method"),
        (dict(method=["ties", "slerp"], base_model="org/base", density=0.5, t=0.5, alpha=0.5), "alpha"),
        (dict(method=["ties", "task-arithmetic"], base_model="org/base", t=0.5), "^t"),
        (dict(method=[], base_model="org/base"), "method"),
        (dict(method=["ties", "tie"], base_model="org/base"), "method"),
    ],
)
def test_a_method_list_is_refused_by_name_before_any_download(kwargs, match):
    from datasets import Dataset

    data = None if match == "^method" else Dataset.from_dict({"input_ids": [[1, 2]], "label": [0]})
    with pytest.raises(InvalidArgumentError, match=match):
        merge_models(["org/a", "org/b", "org/c"], eval_dataset=data, progress=False, **kwargs)


def test_several_methods_through_the_cli_and_the_recipe_file(family_dirs, tmp_path):
    """`--method ties dare-ties` with eval data from a file: the written recipe lists both methods with their knobs
    and the eval data, and cooking it compares them again into the same tensors; a hand-written file does too."""

    import yaml

    from hf_soups.api import cook_recipe
    from tests.testing_common import assert_same_tensors

    base, ingredients = family_dirs
    val = _eval_file(base, tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "hf_soups.cli",
        "merge",
        *map(str, ingredients),
        "--method",
        "ties",
        "dare-ties",
    ]
    cmd += ["--base-model", str(base), "--density", "0.3", "0.9", "--seed", "7", "--scaling", "0.5", "1.5"]
    cmd += ["--eval-file", f"val={val}", "--metric", "accuracy", "-o", str(tmp_path / "cli")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "method ties:" in done.stdout and "method dare-ties:" in done.stdout
    written = yaml.safe_load((tmp_path / "cli" / "soup_recipe.yaml").read_text())
    assert written["method"] == ["ties", "dare-ties"]
    assert (written["density"], written["seed"], written["scaling"]) == ([0.3, 0.9], 7, [0.5, 1.5])
    assert [m["method"] for m in written["result"]["methods"]] == ["ties", "dare-ties"]
    served = next(m for m in written["result"]["methods"] if m["selected"])
    again = cook_recipe(tmp_path / "cli" / "soup_recipe.yaml", output_dir=tmp_path / "again", progress=False)
    assert again.method == served["method"] and [r["method"] for r in again.comparison] == [
        "ties",
        "dare-ties",
    ]
    assert_same_tensors(tmp_path / "cli", tmp_path / "again")
    knobs = {k: again.params[k] for k in ("density", "scaling", "seed") if k in again.params}
    expected = family_reference(
        again.method, read_safetensors(base), [read_safetensors(p) for p in ingredients], **knobs
    )
    assert_state_close(read_safetensors(tmp_path / "cli"), expected, atol=2e-6)

    recipe = write_yaml(
        tmp_path / "recipe.yaml",
        {
            "method": ["ties", "dare-ties"],
            "ingredients": [{"model": str(p)} for p in ingredients],
            "base_model": str(base),
            "density": [0.3, 0.9],
            "seed": 7,
            "scaling": [0.5, 1.5],
            "eval": {"val": {"data": str(val)}},
            "metric": "accuracy",
        },
    )
    cook_recipe(recipe, output_dir=tmp_path / "from_file", progress=False)
    assert_same_tensors(tmp_path / "cli", tmp_path / "from_file")


def _bf16_family(tmp_path):
    """A bfloat16 base and three bfloat16 fine-tunes of it (tiny BERTs saved in bf16)."""
    from tests.tiny_models import make_tiny_bert

    def save(path, **kwargs):
        make_tiny_bert(**kwargs).to(torch.bfloat16).save_pretrained(path)
        return path

    return save(tmp_path / "base", noise=0.0), [
        save(tmp_path / f"ft-{i}", seed=i, noise=0.01) for i in range(3)
    ]


@pytest.mark.parametrize("method", ["ties", "dare-ties", "model-stock", "slerp"])
def test_bf16_ingredients_through_the_two_pass_path(tmp_path, method):
    """bf16 ingredients and base: the soup is written in bf16 (the ingredients' dtype) and every value is the float64
    reference rounded to bf16, within one bf16 ulp (the float32 accumulation may round the other way)."""
    base, ingredients = _bf16_family(tmp_path)
    models = _models(method, ingredients)
    kwargs = CASES[method]
    merge_models(
        [str(p) for p in models],
        method=method,
        base_model=str(base),
        output_dir=tmp_path / "soup",
        progress=False,
        **kwargs,
    )
    got = read_safetensors(tmp_path / "soup")
    expected = _reference(method, base, ingredients, kwargs)
    assert got.keys() == expected.keys()
    edges = total = 0
    for name, value in got.items():
        assert value.dtype == torch.bfloat16, name
        ref = expected[name].double()
        rounded = ref.to(torch.bfloat16).double()
        # one bf16 ulp at the reference's magnitude: 2 ** (exponent - 7); 2**-133 is bf16's smallest subnormal
        exponent = torch.floor(torch.log2(rounded.abs().clamp_min(2.0**-126)))
        ulp = torch.where(rounded == 0, torch.full_like(ref, 2.0**-133), 2.0 ** (exponent - 7))
        # plus the float32 computation's own rounding, relative to the operands (base + delta): where the two
        # nearly cancel, the result is ~0 and its bf16 ulp says nothing about the float32 error before the cast
        base_value = read_safetensors(base)[name].double() if value.is_floating_point() else 0.0
        operands = (base_value.abs() + (ref - base_value).abs()) if value.is_floating_point() else 0.0
        close = (value.double() - rounded).abs() <= ulp + 2.0**-20 * operands
        if method == "dare-ties" and value.is_floating_point():
            # bf16 task vectors on a coarse grid can cancel exactly (-a + b - c == 0): the elected sign is then
            # decided by how the 1/density rescale rounds, in float32 here and float64 in the reference
            edge = _exact_cancellations(
                name, read_safetensors(base)[name], [read_safetensors(p)[name] for p in models]
            )
            close |= edge
            edges, total = edges + int(edge.sum()), total + edge.numel()
        assert bool(close.all()), name
    assert edges <= total // 100  # a few elements (here ~0.1%); 3 of them elect differently


def _exact_cancellations(name, base, thetas):
    """Elements where DARE's kept task vectors (CASES' seed and density) are not all zero but sum to exactly 0."""
    from tests.testing_common import _dare_keep

    kwargs = CASES["dare-ties"]
    kept = [
        torch.where(
            _dare_keep(kwargs["seed"], i, name, kwargs["density"], base.numel()).view(base.shape),
            theta.double() - base.double(),
            0.0,
        )
        for i, theta in enumerate(thetas)
    ]
    return (sum(kept) == 0) & torch.stack([k != 0 for k in kept]).any(0)


def test_a_weights_sweep_from_the_cli_and_from_a_recipe_file(family_dirs, tmp_path):
    """`--weights` repeated (CLI) and a weight list per ingredient (recipe file) are the same weights sweep."""

    import yaml

    from hf_soups.api import cook_recipe
    from hf_soups.publishing.recipe_file import RecipeError
    from tests.testing_common import assert_same_tensors

    base, ingredients = family_dirs
    val = _eval_file(base, tmp_path)
    settings = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]]
    cmd = [
        sys.executable,
        "-m",
        "hf_soups.cli",
        "merge",
        *map(str, ingredients),
        "--method",
        "task-arithmetic",
    ]
    cmd += ["--base-model", str(base)]
    for weights in settings:
        cmd += ["--weights", *map(str, weights)]
    cmd += ["--eval-file", f"val={val}", "--metric", "accuracy", "-o", str(tmp_path / "cli")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = yaml.safe_load((tmp_path / "cli" / "soup_recipe.yaml").read_text())
    chosen = [entry["weight"] for entry in written["ingredients"]]
    assert chosen in settings
    expected = family_reference(
        "task-arithmetic", read_safetensors(base), [read_safetensors(p) for p in ingredients], weights=chosen
    )
    assert_state_close(read_safetensors(tmp_path / "cli"), expected, atol=2e-6)

    # the same sweep from a hand-written file: each ingredient lists its weight in each setting
    recipe = write_yaml(
        tmp_path / "recipe.yaml",
        {
            "method": "task-arithmetic",
            "ingredients": [
                {"model": str(p), "weight": [w[i] for w in settings]} for i, p in enumerate(ingredients)
            ],
            "base_model": str(base),
            "eval": {"val": {"data": str(val)}},
            "metric": "accuracy",
        },
    )
    soup = cook_recipe(recipe, output_dir=tmp_path / "from_file", progress=False)
    assert [h["weights"] for h in soup.history] == settings
    assert_same_tensors(tmp_path / "cli", tmp_path / "from_file")

    # lists of different lengths are refused by key, before any work
    bad = write_yaml(
        tmp_path / "bad.yaml",
        {
            "method": "task-arithmetic",
            "ingredients": [
                {"model": str(ingredients[0]), "weight": [1.0, 0.5]},
                {"model": str(ingredients[1]), "weight": [1.0]},
            ],
            "base_model": str(base),
            "eval": {"val": {"data": str(val)}},
        },
    )
    with pytest.raises(
        RecipeError, match=r"ingredients\[\]\.weight: the weight lists of a sweep have different lengths"
    ):
        cook_recipe(bad, output_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "method, dtype",
    [("ties", "float32"), ("dare-ties", "float32"), ("model-stock", "float32"), ("ties", "bfloat16")],
)
def test_slices_combined_on_several_threads_give_the_same_bits_as_one(
    family_dirs, tmp_path, monkeypatch, method, dtype
):
    """The two-pass methods combine a tensor's slices on up to two threads (torch's thread count permitting): the
    soup is bit-for-bit the one computed on a single thread, on tensors of several slices. In bfloat16 each slice
    is also cast to the output dtype, which must not happen in the workers (the sink casts through one buffer)."""
    base, ingredients = family_dirs
    if dtype == "bfloat16":
        base, ingredients = _bf16_family(tmp_path)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1024)  # the tiny model's tensors span many slices
    outs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            merge_models(
                [str(p) for p in ingredients],
                method=method,
                base_model=str(base),
                output_dir=tmp_path / f"threads-{threads}",
                progress=False,
                **CASES[method],
            )
            outs.append(read_safetensors(tmp_path / f"threads-{threads}"))
    finally:
        torch.set_num_threads(previous)
    assert outs[0].keys() == outs[1].keys()
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]), name
