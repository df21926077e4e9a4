"""Recipe files: validation with key paths, conversion to merge_models arguments, and the soup round trip."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from hf_soups.errors import InvalidArgumentError
from hf_soups.publishing.recipe_file import (
    FORMAT_VERSION,
    RECIPE_FILENAME,
    RecipeError,
    RecipeFile,
    load_eval_data,
    load_recipe,
    recipe_from_soup,
    write_recipe,
)
from tests.testing_common import assert_same_tensors, read_safetensors, write_eval_csv, write_yaml

# ---------------------------------------------------------------------------------------------- helpers


def problems_of(data, tmp_path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        RecipeFile.from_dict(data, base_dir=tmp_path)
    return info.value.problems


# ---------------------------------------------------------------------------------------------- validation


def test_minimal_recipe_and_short_forms(tmp_path):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    recipe = RecipeFile.from_dict(
        {"ingredients": ["runs/a", "org/b@v2", {"model": "org/c", "revision": "main", "weight": 2}]},
        base_dir=tmp_path,
    )
    assert recipe.method == "uniform"
    assert recipe.format_version == FORMAT_VERSION
    a, b, c = recipe.ingredients
    assert a.model == str((tmp_path / "runs" / "a").resolve())  # relative folder resolved against the file
    assert (b.model, b.revision) == ("org/b", "v2")
    assert (c.model, c.revision, c.weight) == ("org/c", "main", 2.0)
    kwargs = recipe.to_merge_kwargs()
    assert kwargs["models"] == [a.model, "org/b@v2", "org/c@main"]
    assert kwargs["weights"] == [1.0, 1.0, 2.0]
    assert "alpha" not in kwargs and "eval_dataset" not in kwargs  # unset keys keep merge_models' defaults


def test_wrong_type_names_the_key_path(tmp_path):
    problems = problems_of(
        {"ingredients": ["org/a", "org/b", {"model": "org/c", "weight": "abc"}]},
        tmp_path,
    )
    assert problems == ["ingredients[2].weight: expected a number, got 'abc'"]


def test_every_problem_is_reported_at_once(tmp_path):
    problems = problems_of(
        {
            "method": "uniform",
            "ingredients": [{"model": "org/a", "wieght": 1}, "./missing-folder"],
            "dtype": "fp8",
            "alpha": 0.5,
            "eval": {"data": "nope.csv"},
            "max_shard_size": "huge",
            "colour": "red",
        },
        tmp_path,
    )
    text = "\n".join(problems)
    assert "ingredients[0].wieght: unknown key (did you mean 'weight'?)" in text
    assert f"ingredients[1].model: no such folder '{tmp_path / 'missing-folder'}'" in text
    assert "dtype: expected one of float32, float16, bfloat16" in text
    assert "alpha: only wise-ft takes alpha" in text
    assert "eval.data: no such file or folder" in text
    assert "max_shard_size: expected a size" in text
    assert "colour: unknown key" in text
    assert len(problems) == 7


@pytest.mark.parametrize(
    "data, expected",
    [
        ({}, "ingredients: missing"),
        ({"ingredients": []}, "ingredients: expected a non-empty list"),
        ({"ingredients": 5}, "ingredients: expected a non-empty list"),
        ({"ingredients": [3]}, "ingredients[0]: expected a model id/path or a mapping"),
        ({"ingredients": [{"weight": 1}]}, "ingredients[0].model: missing"),
        ({"ingredients": ["org/a"], "method": "tiez"}, "method: Unknown method 'tiez'"),
        ({"ingredients": ["org/a"], "method": "wise-ft", "alpha": 0.5}, "base_model: method='wise-ft' needs"),
        (
            {"ingredients": ["org/a"], "method": "wise-ft", "base_model": "org/b", "alpha": 1.5},
            "alpha: expected a value in [0, 1]",
        ),
        (
            {"ingredients": ["org/a"], "method": "wise-ft", "base_model": "org/b", "alpha": [0.1, "x"]},
            "alpha[1]: expected a number in [0, 1], got 'x'",
        ),
        (
            {"ingredients": ["org/a"], "method": "greedy"},
            "eval: method='greedy' chooses ingredients on held-out",
        ),
        (
            {"ingredients": [{"model": "org/a", "weight": 1}], "method": "greedy", "scores": {"a": 1}},
            "ingredients[].weight: only dare-linear, dare-ties, task-arithmetic, ties, uniform and wise-ft take weights, "
            "not 'greedy'",
        ),
        ({"ingredients": ["org/a"], "strict": True}, "strict: only greedy"),
        ({"ingredients": ["org/a"], "method": "greedy", "strict": "yes"}, "strict: expected true or false"),
        ({"ingredients": ["org/a", "org/b"], "batch_size": 0}, "batch_size: expected a positive integer"),
        (
            {"ingredients": [{"model": "org/a@v1", "revision": "v2"}]},
            "ingredients[0].revision: 'v2' conflicts",
        ),
        (
            {"ingredients": [{"model": "org/a", "name": "x"}, {"model": "org/b", "name": "x"}]},
            "duplicate name(s) 'x'",
        ),
        (
            {"ingredients": ["org/a"], "push_to_hub": "not a repo id!"},
            "push_to_hub: expected a Hub repository id",
        ),
        (
            {"ingredients": ["org/a"], "compute_metrics": "no colon"},
            "compute_metrics: expected 'package.module:function'",
        ),
        ({"ingredients": ["org/a"], "eval": 3}, "eval: expected a data path"),
        (["org/a"], "<top level>: expected a mapping"),
        (
            {"ingredients": ["runs/missing folder"]},
            "ingredients[0].model: 'runs/missing folder' is neither an existing folder",
        ),
    ],
)
def test_invalid_recipes(tmp_path, data, expected):
    problems = problems_of(data, tmp_path)
    assert any(expected in p for p in problems), problems


def test_recipe_error_is_an_invalid_argument_error(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", {"ingredients": [{"model": "org/a", "weight": "abc"}]})
    with pytest.raises(InvalidArgumentError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: invalid recipe: ingredients[0].weight")
    assert info.value.path == str(path)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", "method: uniform\ningredients: [org/a\n  weight: 2\n")
    with pytest.raises(RecipeError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_numbers_written_as_yaml_strings_are_accepted(tmp_path):
    # PyYAML reads `1e-1` as a string (YAML 1.1); a recipe author means a number.
    path = write_yaml(
        tmp_path / "r.yaml", "method: wise-ft\ningredients: [org/a]\nbase_model: org/base\nalpha: 1e-1\n"
    )
    assert load_recipe(path).alpha == pytest.approx(0.1)


def test_newer_format_version_drops_unknown_keys_with_a_warning(tmp_path, caplog):
    data = {"format_version": FORMAT_VERSION + 1, "ingredients": ["org/a"], "future_option": 3}
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        recipe = RecipeFile.from_dict(data, base_dir=tmp_path)
    assert recipe.ingredients[0].model == "org/a"
    assert "future_option" in caplog.text and "newer" in caplog.text
    with pytest.raises(RecipeError, match="future_option: unknown key"):
        RecipeFile.from_dict({**data, "format_version": FORMAT_VERSION}, base_dir=tmp_path)


def test_every_key_is_a_configuration_field_with_help():
    """The file's keys are derived from the configuration: nothing is listed twice."""
    import dataclasses

    from hf_soups.config import all_option_fields
    from hf_soups.publishing.recipe_file import (
        FILE_KEYS,
        EvalSetSpec,
        IngredientSpec,
        option_keys,
        recipe_keys,
    )

    fields = all_option_fields()
    assert set(option_keys()) <= set(fields)
    assert {"alpha", "strict", "scores", "dtype", "max_shard_size", "metric", "output_dir"} <= set(
        option_keys()
    )
    assert not {"token", "trust_remote_code", "eval_dataset", "progress"} & set(recipe_keys())
    assert set(recipe_keys()) == set(option_keys()) | set(FILE_KEYS)
    for cls in (IngredientSpec, EvalSetSpec):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    assert all(help for help in recipe_keys().values())


def test_eval_sets_select_on_and_columns(tmp_path):
    write_eval_csv(tmp_path / "val.csv")
    write_eval_csv(tmp_path / "shift.csv", seed=1, text="review", label="y")
    recipe = RecipeFile.from_dict(
        {
            "method": "greedy",
            "ingredients": ["org/a", "org/b"],
            "eval": {
                "validation": {"data": "val.csv", "text_columns": "sentence", "label_column": "label"},
                "shifted": {
                    "data": "shift.csv",
                    "text_columns": "review",
                    "label_column": "y",
                    "max_samples": 5,
                },
            },
            "select_on": "validation",
        },
        base_dir=tmp_path,
    )
    kwargs = recipe.to_merge_kwargs()
    assert kwargs["text_columns"] == "sentence" and kwargs["label_column"] == "label"
    sets = kwargs["eval_dataset"]
    assert list(sets) == ["validation", "shifted"]
    assert len(sets["validation"]) == 24 and len(sets["shifted"]) == 5
    # the shifted set's columns are renamed to the canonical names so that one setting serves both
    assert set(sets["shifted"].column_names) == {"sentence", "label"}
    assert sets["shifted"][0]["sentence"].startswith("w")

    with pytest.raises(RecipeError, match="select_on: 'test' is not an eval set"):
        RecipeFile.from_dict({**recipe.to_dict(), "select_on": "test"}, base_dir=tmp_path)


def test_single_eval_set_is_passed_as_a_dataset(tmp_path):
    write_eval_csv(tmp_path / "val.csv")
    recipe = RecipeFile.from_dict(
        {"ingredients": ["org/a"], "eval": "val.csv", "text_columns": "sentence"}, base_dir=tmp_path
    )
    from datasets import Dataset

    kwargs = recipe.to_merge_kwargs()
    assert isinstance(kwargs["eval_dataset"], Dataset)
    assert kwargs["text_columns"] == "sentence"
    assert "eval_dataset" not in recipe.to_merge_kwargs(load_data=False)


def test_missing_eval_column_names_the_set_and_the_columns(tmp_path):
    write_eval_csv(tmp_path / "val.csv")
    recipe = RecipeFile.from_dict(
        {"ingredients": ["org/a"], "eval": {"dev": {"data": "val.csv", "text_columns": "text"}}},
        base_dir=tmp_path,
    )
    with pytest.raises(
        RecipeError, match=r"eval.dev: column\(s\) 'text' not found .* its columns are sentence, label"
    ):
        recipe.to_merge_kwargs()


def test_load_eval_data_formats(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"text": ["w5 w6", "w7 w8", "w9"], "label": [0, 1, 2]}
    ds = Dataset.from_dict(rows)
    ds.to_json(tmp_path / "d.jsonl")
    ds.to_parquet(tmp_path / "d.parquet")
    ds.to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    ds.save_to_disk(tmp_path / "single")
    DatasetDict({"validation": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "dict")
    for name in ("d.jsonl", "d.parquet", "d.tsv", "single"):
        loaded = load_eval_data(tmp_path / name)
        assert loaded["label"][:] == [0, 1, 2], name
        assert loaded["text"][:] == rows["text"], name
    assert len(load_eval_data(tmp_path / "dict", split="test")) == 1
    with pytest.raises(RecipeError, match="holds the splits validation, test; choose one with split:"):
        load_eval_data(tmp_path / "dict")
    with pytest.raises(RecipeError, match="no split 'train'"):
        load_eval_data(tmp_path / "dict", split="train")
    (tmp_path / "d.weird").write_text("x")
    with pytest.raises(RecipeError, match="cannot tell the format"):
        load_eval_data(tmp_path / "d.weird")


def test_to_dict_round_trips_through_yaml(tmp_path):
    write_eval_csv(tmp_path / "val.csv")
    data = {
        "method": "wise-ft",
        "ingredients": [{"model": "org/a", "revision": "abc123", "name": "a"}],
        "base_model": "org/base@def456",
        "alpha": [0.0, 0.5, 1.0],
        "eval": {"dev": {"data": "val.csv", "text_columns": "sentence"}},
        "metric": "f1",
        "metric_config": "macro",
        "dtype": "bf16",
        "max_shard_size": "2GB",
    }
    recipe = RecipeFile.from_dict(data, base_dir=tmp_path)
    path = write_yaml(tmp_path / "again.yaml", recipe.to_dict())
    again = load_recipe(path)
    assert again.to_dict() == recipe.to_dict()
    assert again.dtype == "bfloat16"
    kwargs = again.to_merge_kwargs(load_data=False)
    assert kwargs["metric"] == ("f1", "macro")
    assert kwargs["base_model"] == "org/base@def456"
    assert kwargs["models"][0].name == "a" and kwargs["models"][0].revision == "abc123"


def test_compute_metrics_is_imported_only_with_trust_remote_code(tmp_path):
    # issue 12, defect 2: a recipe names code; nothing is imported without the explicit opt-in
    path = write_yaml(tmp_path / "r.yaml", {"ingredients": ["org/a"], "compute_metrics": "json:dumps"})
    with pytest.raises(
        RecipeError, match=r"compute_metrics: 'json:dumps' is an import.*trust_remote_code=True"
    ):
        load_recipe(path)
    recipe = load_recipe(path, trust_remote_code=True)
    assert recipe.to_merge_kwargs()["compute_metrics"] is json.dumps
    bad = RecipeFile.from_dict(
        {"ingredients": ["org/a"], "compute_metrics": "json:nope"}, base_dir=tmp_path, trust_remote_code=True
    )
    with pytest.raises(InvalidArgumentError, match="compute_metrics='json:nope' cannot be imported"):
        bad.to_merge_kwargs()


def test_import_is_cheap():
    import subprocess
    import sys

    code = (
        "import sys, hf_soups.publishing.recipe_file, hf_soups.cli.inspect, hf_soups.cli; "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft', 'evaluate') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------- round trip


def test_weighted_uniform_soup_recipe_recooks_identicalread_safetensors(tmp_path):
    from hf_soups import merge_models
    from hf_soups.api import cook_recipe
    from tests.tiny_models import make_tiny_bert_dir

    dirs = [make_tiny_bert_dir(tmp_path / f"ft-{i}", seed=i) for i in range(3)]
    merge_models(dirs, weights=[1, 2, 4], output_dir=tmp_path / "soup", max_shard_size="30KB", progress=False)
    written = yaml.safe_load((tmp_path / "soup" / RECIPE_FILENAME).read_text())
    assert written["format_version"] == FORMAT_VERSION
    assert [i["model"] for i in written["ingredients"]] == [str(d.absolute()) for d in dirs]
    # weights whose normalised values sum to exactly 1 re-normalise to themselves
    assert [i["weight"] for i in written["ingredients"]] == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert written["max_shard_size"] == "30KB"
    assert "output_dir" not in written  # a re-cook goes where the user says

    recipe = load_recipe(tmp_path / "soup")  # a soup folder works as well as the file
    cook_recipe(recipe, output_dir=tmp_path / "again", progress=False)
    assert len(list((tmp_path / "again").glob("*.safetensors"))) > 1  # sharded like the original
    assert_same_tensors(tmp_path / "soup", tmp_path / "again")


def test_wise_ft_with_dtype_recooks_identicalread_safetensors(tmp_path):
    from hf_soups import merge_models
    from hf_soups.api import cook_recipe
    from tests.tiny_models import make_tiny_bert_dir

    dirs = [make_tiny_bert_dir(tmp_path / f"ft-{i}", seed=i) for i in range(2)]
    base = make_tiny_bert_dir(tmp_path / "base", noise=0.0)
    merge_models(
        dirs,
        method="wise-ft",
        base_model=base,
        alpha=0.3,
        dtype="bfloat16",
        output_dir=tmp_path / "soup",
        progress=False,
    )
    written = yaml.safe_load((tmp_path / "soup" / RECIPE_FILENAME).read_text())
    assert written["method"] == "wise-ft" and written["alpha"] == 0.3 and written["dtype"] == "bfloat16"
    assert written["base_model"]["model"] == str(base.absolute())
    assert all("weight" not in i for i in written["ingredients"])  # an unweighted soup stays unweighted
    cook_recipe(tmp_path / "soup" / RECIPE_FILENAME, output_dir=tmp_path / "again", progress=False)
    assert_same_tensors(tmp_path / "soup", tmp_path / "again")
    assert next(iter(read_safetensors(tmp_path / "again").values())).dtype.is_floating_point


def test_in_memory_ingredient_is_recorded_as_not_recookable(tmp_path):
    from hf_soups import merge_models
    from tests.tiny_models import make_tiny_bert, make_tiny_bert_dir

    disk = make_tiny_bert_dir(tmp_path / "ft-0", seed=0)
    soup = merge_models([disk, make_tiny_bert(seed=1)], progress=False)
    data = recipe_from_soup(soup)
    assert data["ingredients"][0]["model"] == str(disk.absolute())
    assert data["ingredients"][1]["model"] is None
    assert any("in-memory model" in note for note in data["notes"])
    path = write_recipe(soup, tmp_path / "out")
    with pytest.raises(
        RecipeError, match=r"ingredients\[1\]\.model: missing \(ingredient .* was an in-memory model"
    ):
        load_recipe(path)


def test_hub_ingredient_is_recorded_with_its_resolved_commit(tmp_path, hub_server):
    from huggingface_hub import HfApi

    from hf_soups import merge_models
    from tests.tiny_models import make_tiny_bert_dir

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = f"{hub_server.user}/recipe-ft-a"
    api.create_repo(repo, exist_ok=True)
    folder = make_tiny_bert_dir(tmp_path / "ft-a", seed=0)
    commit = api.upload_folder(repo_id=repo, folder_path=folder).oid
    local = make_tiny_bert_dir(tmp_path / "ft-b", seed=1)
    soup = merge_models([repo, local], output_dir=tmp_path / "soup", token=hub_server.token, progress=False)
    written = yaml.safe_load((tmp_path / "soup" / RECIPE_FILENAME).read_text())
    hub_entry = written["ingredients"][0]
    assert hub_entry["model"] == repo
    assert hub_entry["revision"] == commit == soup.ingredients[0].revision
    # a later commit on main does not change what the recipe cooks
    api.upload_file(repo_id=repo, path_or_fileobj=b"{}", path_in_repo="notes.json")
    recipe = load_recipe(tmp_path / "soup" / RECIPE_FILENAME)
    assert recipe.to_merge_kwargs()["models"][0].reference == repo
    assert recipe.to_merge_kwargs()["models"][0].revision == commit


@pytest.fixture
def synthetic_ingredients(tmp_path):
    """Two good fine-tunes and a ruined one of the synthetic task, the pre-trained base, and a held-out set."""
    from tests import synthetic_task as task

    trained = task.trained_model()
    folders = [
        task.save(task.add_noise(trained, scale, seed=i), tmp_path / f"ft-{i}")
        for i, scale in enumerate([0.02, 0.05, 3.0])
    ]
    base = task.save(task.pretrained_model(), tmp_path / "base")
    ids, labels = task.make_split(96, seed=7)
    return folders, base, task.as_dataset(ids, labels)


@pytest.mark.slow
def test_greedy_soup_with_in_memory_eval_is_frozen_to_its_kept_ingredients(tmp_path, synthetic_ingredients):
    from hf_soups import merge_models
    from hf_soups.api import cook_recipe

    folders, _, dataset = synthetic_ingredients
    soup = merge_models(
        folders, method="greedy", eval_dataset=dataset, output_dir=tmp_path / "soup", progress=False
    )
    kept = [i.name for i in soup.ingredients if i.selected]
    assert "ft-2" not in kept and kept
    written = yaml.safe_load((tmp_path / "soup" / RECIPE_FILENAME).read_text())
    assert written["method"] == "uniform"  # the selection is frozen: the Dataset object cannot be recorded
    assert [i["name"] for i in written["ingredients"]] == kept
    assert any("Greedy soup frozen" in note for note in written["notes"])
    assert {r["name"]: r["selected"] for r in written["result"]["ingredients"]}["ft-2"] is False
    cook_recipe(tmp_path / "soup" / RECIPE_FILENAME, output_dir=tmp_path / "again", progress=False)
    assert_same_tensors(tmp_path / "soup", tmp_path / "again")


@pytest.mark.slow
def test_wise_ft_sweep_with_in_memory_eval_is_frozen_at_the_chosen_alpha(tmp_path, synthetic_ingredients):
    from hf_soups import merge_models
    from hf_soups.api import cook_recipe

    folders, base, dataset = synthetic_ingredients
    soup = merge_models(
        folders[:1],
        method="wise-ft",
        base_model=base,
        alpha=[0.0, 0.4, 0.8],
        eval_dataset=dataset,
        output_dir=tmp_path / "soup",
        progress=False,
    )
    written = yaml.safe_load((tmp_path / "soup" / RECIPE_FILENAME).read_text())
    assert written["alpha"] == soup.params["alpha"] and written["alpha"] in (0.0, 0.4, 0.8)
    assert any("frozen at the chosen alpha" in note for note in written["notes"])
    cook_recipe(tmp_path / "soup" / RECIPE_FILENAME, output_dir=tmp_path / "again", progress=False)
    assert_same_tensors(tmp_path / "soup", tmp_path / "again")


@pytest.mark.slow
def test_recipe_cooked_from_a_file_replays_the_sweep(tmp_path, synthetic_ingredients):
    from hf_soups.api import cook_recipe

    folders, base, dataset = synthetic_ingredients
    dataset.to_json(tmp_path / "val.jsonl")
    path = write_yaml(
        tmp_path / "recipe.yaml",
        {
            "method": "wise-ft",
            "ingredients": ["ft-0"],
            "base_model": "base",
            "alpha": [0.0, 0.4, 0.8],
            "eval": {"validation": {"data": "val.jsonl"}},
        },
    )
    soup = cook_recipe(path, output_dir=tmp_path / "soup", progress=False)
    written = yaml.safe_load((tmp_path / "soup" / RECIPE_FILENAME).read_text())
    assert written["alpha"] == [0.0, 0.4, 0.8]  # the sweep itself, with its data, is the recipe
    assert written["eval"] == {"validation": {"data": str(tmp_path / "val.jsonl")}}
    assert "notes" not in written
    assert written["result"]["score"] == pytest.approx(soup.score)
    # saving the soup again later records the same replayable recipe
    soup.save_pretrained(tmp_path / "saved-later")
    later = yaml.safe_load((tmp_path / "saved-later" / RECIPE_FILENAME).read_text())
    assert later["alpha"] == [0.0, 0.4, 0.8] and later["eval"] == written["eval"]


def test_a_folder_of_trainer_ingredients_is_one_recipe_entry(tmp_path):
    from hf_soups.api import cook_recipe
    from hf_soups.cli.inspect import plan_merge
    from hf_soups.ingredients import INGREDIENT_METADATA, INGREDIENTS_MANIFEST
    from tests.tiny_models import make_tiny_bert_dir

    root = tmp_path / "ingredients"
    root.mkdir()
    (root / INGREDIENTS_MANIFEST).write_text(json.dumps({"format": 1}))
    for i in range(2):  # the layout SoupTrainerCallback writes: one folder per ingredient with its metadata
        folder = make_tiny_bert_dir(root / f"run-{i}", seed=i)
        (folder / INGREDIENT_METADATA).write_text(json.dumps({"created": float(i), "run": f"run-{i}"}))
    path = write_yaml(tmp_path / "recipe.yaml", {"ingredients": "ingredients"})
    recipe = load_recipe(path)
    assert recipe.to_merge_kwargs()["models"] == str(root)
    assert [m.reference for m in plan_merge(recipe).models] == [str(root / "run-0"), str(root / "run-1")]
    soup = cook_recipe(recipe, output_dir=tmp_path / "soup", progress=False)
    assert len(soup.ingredients) == 2
    written = load_recipe(tmp_path / "soup")
    assert [i.model for i in written.ingredients] == [str(root / "run-0"), str(root / "run-1")]


@pytest.mark.slow
@pytest.mark.parametrize("adapter_output", ["merged", "adapter"])
def test_lora_adapter_soup_recooks_identicalread_safetensors(tmp_path, adapter_output):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    from hf_soups import merge_models
    from hf_soups.api import cook_recipe
    from tests.tiny_models import make_tiny_bert_dir

    base = make_tiny_bert_dir(tmp_path / "base", noise=0.0)
    adapters = []
    for i in range(2):
        torch.manual_seed(i)
        model = BertForSequenceClassification.from_pretrained(base)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(tmp_path / f"lora-{i}")
        adapters.append(tmp_path / f"lora-{i}")
    merge_models(adapters, adapter_output=adapter_output, output_dir=tmp_path / "soup", progress=False)
    written = yaml.safe_load((tmp_path / "soup" / RECIPE_FILENAME).read_text())
    assert [i["model"] for i in written["ingredients"]] == [str(a) for a in adapters]
    assert written.get("adapter_output", "merged") == adapter_output
    cook_recipe(tmp_path / "soup", output_dir=tmp_path / "again", progress=False)
    assert_same_tensors(tmp_path / "soup", tmp_path / "again")
