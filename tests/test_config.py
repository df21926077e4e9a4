"""One configuration: every option declared once, checked once, the same way for API, CLI, recipe file and callback."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_soups import merge_models
from hf_soups.config import EvalConfig, SoupConfig, all_option_fields, option_names
from hf_soups.errors import InvalidArgumentError
from hf_soups.publishing.recipe_file import RECIPE_FILENAME, RecipeError, RecipeFile, load_recipe
from tests.tiny_models import make_tiny_bert_dir

# issue 12, defect 12: each of these was a raw error, a silent wrong result, or accepted by one entry point and
# refused by another. (option, bad value, message naming the option)
BAD_VALUES = [
    ({"weights": "12"}, "weights: expected a list of numbers"),
    ({"weights": ["a", "b"]}, "weights: weight #0: expected a number, got 'a'"),
    ({"batch_size": "8"}, "batch_size: expected a positive integer, got '8'"),
    ({"batch_size": 0}, "batch_size: expected a positive integer"),
    ({"max_shard_size": 0}, "max_shard_size: expected a size"),
    ({"max_shard_size": -5}, "max_shard_size: expected a size"),
    ({"max_shard_size": "-1GB"}, "max_shard_size: expected a size"),
    ({"dtype": "float8_e4m3fn"}, "dtype: float8 output ('float8_e4m3fn') is not supported"),
    ({"alpha": 0.5}, "alpha: only wise-ft takes alpha, not 'uniform'"),
    ({"strict": True}, "strict: only greedy takes strict, not 'uniform'"),
    ({"ensemble_baseline": True}, "ensemble_baseline: only greedy takes"),
    ({"alhpa": 0.5}, "alhpa: unknown option (did you mean 'alpha'?)"),
    ({"rank": 0}, "rank: expected a positive integer"),
    ({"private": "yes"}, "private: expected true or false"),
]


@pytest.mark.parametrize("options, message", BAD_VALUES)
def test_bad_values_are_named_by_the_configuration(options, message):
    with pytest.raises(InvalidArgumentError) as info:
        SoupConfig.from_options({"method": "uniform", **options}, n_models=2)
    assert message in str(info.value)
    assert info.value.problems and all(":" in p for p in info.value.problems)


@pytest.mark.parametrize(
    "options, message", [c for c in BAD_VALUES if "alhpa" not in c[0]]
)  # Python: TypeError
def test_merge_models_refuses_them_before_any_work(tmp_path, options, message):
    missing = [
        str(tmp_path / "not-there-a"),
        str(tmp_path / "not-there-b"),
    ]  # would fail later, when resolved
    with pytest.raises(InvalidArgumentError, match=message.split(":")[0]) as info:
        merge_models(missing, output_dir=tmp_path / "soup", progress=False, **options)
    assert message in str(info.value)
    assert not (tmp_path / "soup").exists()


def test_models_none_and_bad_types_are_named():
    with pytest.raises(InvalidArgumentError, match="models: got None"):
        merge_models(None)
    with pytest.raises(InvalidArgumentError, match="models: expected a list"):
        merge_models(3)


def test_huge_weights_do_not_overflow_the_normalisation(tmp_path):
    import torch
    from safetensors.torch import load_file

    dirs = [make_tiny_bert_dir(tmp_path / f"ft-{i}", seed=i) for i in range(2)]
    soup = merge_models(dirs, weights=[1e308, 1e308], output_dir=tmp_path / "soup", progress=False)
    assert [i.weight for i in soup.ingredients] == [0.5, 0.5]
    a, b = (load_file(d / "model.safetensors") for d in dirs)
    out = load_file(tmp_path / "soup" / "model.safetensors")
    name = "classifier.weight"
    expected = ((a[name].double() + b[name].double()) / 2).float()
    assert torch.allclose(out[name], expected, atol=1e-7)


def test_a_uniform_soup_ignores_nothing_silently(tmp_path):
    """The API used to drop alpha=/strict= for a uniform soup while the CLI refused them: now both refuse."""
    with pytest.raises(InvalidArgumentError, match="alpha: only wise-ft takes alpha"):
        merge_models([str(tmp_path / "a")], alpha=0.3)
    result = _cli("merge", str(tmp_path / "a"), "--alpha", "0.3", "-o", str(tmp_path / "s"), cwd=tmp_path)
    assert result.returncode == 2 and "alpha: only wise-ft takes alpha" in result.stderr


def test_float8_has_one_answer_everywhere(tmp_path):
    make_tiny_bert_dir(tmp_path / "a")
    message = "float8 output ('float8_e4m3fn') is not supported"
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge_models([tmp_path / "a"], dtype="float8_e4m3fn")
    import torch

    with pytest.raises(InvalidArgumentError, match="float8 output"):
        merge_models([tmp_path / "a"], dtype=torch.float8_e5m2)
    cli = _cli("merge", "a", "--dtype", "float8_e4m3fn", "-o", "s", cwd=tmp_path)
    assert cli.returncode == 2 and message in cli.stderr
    path = tmp_path / "r.yaml"
    path.write_text("ingredients: [a]\ndtype: float8_e4m3fn\n")
    with pytest.raises(RecipeError, match="dtype: float8 output"):
        load_recipe(path)
    for name in ("bfloat16", "bf16", "torch.float16", "float64", "fp32", torch.bfloat16):
        assert SoupConfig.from_options({"dtype": name}).dtype in ("bfloat16", "float16", "float64", "float32")


def test_the_callback_checks_options_like_merge_models():
    from hf_soups import SoupTrainerCallback

    with pytest.raises(InvalidArgumentError, match="alpha: only wise-ft takes alpha"):
        SoupTrainerCallback(alpha=0.5)
    with pytest.raises(InvalidArgumentError, match="batch_size: expected a positive integer, got '8'"):
        SoupTrainerCallback(method="greedy", batch_size="8")
    with pytest.raises(
        InvalidArgumentError, match=r"wieghts: unknown merge_models option \(did you mean 'weights'"
    ):
        SoupTrainerCallback(wieghts=[1, 2])
    SoupTrainerCallback(method="wise-ft", alpha=[0.2, 0.8])  # base_model may still come with cook()


# ------------------------------------------------------------------------------------------------ one declaration


def test_merge_models_keywords_are_the_configuration_fields():
    keywords = set(inspect.signature(merge_models).parameters) - {"models"}
    assert keywords == option_names()
    for name, f in all_option_fields().items():
        assert f.metadata.get("help"), f"{name} has no help"


def test_a_recipe_parameter_is_declared_once_where_the_recipe_is_registered():
    from hf_soups.recipes import all_recipes
    from hf_soups.recipes.greedy import GreedyParams
    from hf_soups.recipes.wise_ft import WiseFTParams

    recipes = all_recipes()
    assert recipes["greedy"].params is GreedyParams and recipes["wise-ft"].params is WiseFTParams
    declared = [f.name for cls in (SoupConfig, EvalConfig) for f in dataclasses.fields(cls)]
    for recipe in recipes.values():
        for f in dataclasses.fields(recipe.params):
            assert f.name not in declared, f"{f.name} is declared twice"


def test_cli_flags_are_derived_from_the_fields():
    from hf_soups.cli import build_parser

    parser = build_parser()
    merge = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "merge")[1]
    dests = {a.dest for a in merge._actions}
    flagged = {name for name, f in all_option_fields().items() if f.metadata.get("cli") is not False}
    assert flagged <= dests
    assert {"trust_remote_code", "strict", "alpha", "ensemble_baseline", "compute_metrics"} <= dests


def test_help_loads_no_torch():
    """`hf-soups merge --help` is answered without importing torch or transformers (its speed is measured by
    benchmarks/, not asserted here)."""
    code = "import sys, hf_soups.cli as c; c.main(['merge', '--help']); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--output-dir" in out.stdout
    assert out.stdout.strip().endswith("[]"), out.stdout[-200:]


# ------------------------------------------------------------------------------------------------ recipe files


def test_recipes_written_by_0_1_keep_cooking(tmp_path):
    """soup_recipe.yaml files as written by hf_soups 0.1.0.dev0 (tests/fixtures/recipes_v0_1/generate.py)."""
    import torch
    from safetensors.torch import load_file

    from hf_soups.api import cook_recipe
    from tests.testing_common import save_tokenizer, write_eval_csv

    fixtures = Path(__file__).parent / "fixtures" / "recipes_v0_1"
    old_root = "/tmp/hf_soups_v0_fixture_root"
    dirs = []
    for i in range(2):
        folder = make_tiny_bert_dir(tmp_path / f"ft-{i}", seed=i)
        save_tokenizer(folder)
        dirs.append(folder)
    save_tokenizer(make_tiny_bert_dir(tmp_path / "base", noise=0.0))
    write_eval_csv(tmp_path / "val.csv")
    for name in ("uniform_soup_recipe.yaml", "wise_ft_sweep_soup_recipe.yaml"):
        text = (
            (fixtures / name).read_text().replace(old_root, str(tmp_path))
        )  # only the machine's folder differs
        (tmp_path / name).write_text(text)

    recipe = load_recipe(tmp_path / "uniform_soup_recipe.yaml")
    assert recipe.dtype == "bfloat16" and recipe.max_shard_size == "30KB"
    cook_recipe(recipe, output_dir=tmp_path / "uniform", progress=False)
    a, b = (load_file(d / "model.safetensors") for d in dirs)
    out = {}
    for shard in (tmp_path / "uniform").glob("*.safetensors"):
        out.update(load_file(shard))
    name = "classifier.weight"
    expected = (0.25 * a[name].double() + 0.75 * b[name].double()).to(torch.bfloat16)
    assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expected)

    soup = cook_recipe(
        tmp_path / "wise_ft_sweep_soup_recipe.yaml", output_dir=tmp_path / "wise", progress=False
    )
    assert soup.params["alpha"] in (0.0, 0.5, 1.0) and soup.params["alphas"] == [0.0, 0.5, 1.0]
    assert [i.name for i in soup.ingredients] == ["ft-0", "second"]
    rewritten = yaml.safe_load((tmp_path / "wise" / RECIPE_FILENAME).read_text())
    assert rewritten["format_version"] == 1 and rewritten["eval"]["validation"]["data"] == str(
        tmp_path / "val.csv"
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a recipe file (binary or not UTF-8"),
        (b"method: uniform\ningredients: [\xff\xfe]\n", "not a recipe file (binary or not UTF-8"),
        (b"ingredients: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
        (b"a: &x [1, 2]\nb: *x\n", "aliases"),
    ],
)
def test_hostile_recipe_files_are_refused_with_exit_2(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(path)
    result = _cli("cook", str(path), "-o", str(tmp_path / "s"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr  # issue 12, defect 16: a binary recipe exited 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_huge_recipe_file_is_refused_by_size(tmp_path):
    from hf_soups.publishing.recipe_file import MAX_RECIPE_BYTES

    path = tmp_path / "r.yaml"
    path.write_text("notes:\n" + "  - x\n" * (MAX_RECIPE_BYTES // 4))
    with pytest.raises(RecipeError, match="too large for a recipe file"):
        load_recipe(path)


def test_paths_in_a_recipe_stay_in_its_folder(tmp_path):
    outside = make_tiny_bert_dir(tmp_path / "outside")
    folder = tmp_path / "recipes"
    folder.mkdir()
    make_tiny_bert_dir(folder / "inside")
    for key, value in [
        ("ingredients", ["inside", "../outside"]),
        ("output_dir", "../elsewhere"),
        ("eval", {"data": "../val.csv"}),
    ]:
        data = {"ingredients": ["inside"], key: value}
        with pytest.raises(RecipeError, match=r"points outside the recipe's folder.*write an absolute path"):
            RecipeFile.from_dict(data, base_dir=folder)
    # a path written absolute is honoured: the author meant that place
    recipe = RecipeFile.from_dict({"ingredients": ["inside", str(outside)]}, base_dir=folder)
    assert recipe.ingredients[1].model == str(outside)
    # a symlink inside the folder that leads out escapes too
    (folder / "link").symlink_to(outside)
    with pytest.raises(RecipeError, match="points outside"):
        RecipeFile.from_dict({"ingredients": ["./link"]}, base_dir=folder)


def test_a_local_metric_script_in_a_recipe_needs_trust_remote_code(tmp_path):
    metric = tmp_path / "my_metric"
    metric.mkdir()
    (metric / "my_metric.py").write_text("raise SystemExit('this ran')\n")
    data = {"ingredients": ["org/a"], "metric": "./my_metric"}
    with pytest.raises(
        RecipeError, match=r"metric: '.*my_metric' is a local metric script.*trust_remote_code"
    ):
        RecipeFile.from_dict(data, base_dir=tmp_path)
    trusted = RecipeFile.from_dict(data, base_dir=tmp_path, trust_remote_code=True)
    assert trusted.metric == str(metric)
    assert trusted.to_merge_kwargs(load_data=False)["trust_remote_code"] is True
    # bundled metric names need no opt-in
    assert RecipeFile.from_dict({"ingredients": ["org/a"], "metric": "f1"}, base_dir=tmp_path).metric == "f1"
    # the flag is never read from the file itself
    with pytest.raises(RecipeError, match="trust_remote_code: unknown key"):
        RecipeFile.from_dict({**data, "trust_remote_code": True}, base_dir=tmp_path)


def test_pushed_recipe_names_hub_ingredients_by_id_and_commit_and_local_ones_by_name(tmp_path, hub_server):
    """Issue 12, defect 13, through merge_models(push_to_hub=) and the real huggingface_hub client."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = f"{hub_server.user}/config-ft-a"
    api.create_repo(repo, exist_ok=True)
    commit = api.upload_folder(repo_id=repo, folder_path=make_tiny_bert_dir(tmp_path / "ft-a", seed=0)).oid
    local = make_tiny_bert_dir(tmp_path / "runs" / "ft-b", seed=1)
    target = f"{hub_server.user}/config-pushed-soup"
    merge_models(
        [repo, local],
        output_dir=tmp_path / "soup",
        push_to_hub=target,
        token=hub_server.token,
        progress=False,
    )
    on_disk = yaml.safe_load((tmp_path / "soup" / RECIPE_FILENAME).read_text())
    assert on_disk["ingredients"][1]["model"] == str(local)  # the local copy still re-cooks on this machine
    text = Path(api.hf_hub_download(target, RECIPE_FILENAME)).read_text()
    assert str(tmp_path) not in text
    pushed = yaml.safe_load(text)
    assert pushed["ingredients"][0] == {
        "model": repo,
        "revision": commit,
        "name": on_disk["ingredients"][0]["name"],
    }
    assert pushed["ingredients"][1]["model"] == "ft-b"
    assert any("ingredients[1].model was a local path" in n for n in pushed["notes"])
    assert str(tmp_path) not in Path(api.hf_hub_download(target, "README.md")).read_text()  # the card neither


def _cli(*args, cwd):
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "hf_soups.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
