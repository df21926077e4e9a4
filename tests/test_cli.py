"""The `hf-soups` command, run for real in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.testing_common import assert_same_tensors, make_text_models, write_eval_csv

REPO = Path(__file__).resolve().parent.parent


def hf_soups(
    *args: str, cwd: Path, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `hf-soups ARGS` as a separate process (the environment of the test session: HF_HOME, HF_ENDPOINT)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    full_env.pop("HF_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hf_soups.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error line on stderr; asserts there is exactly one and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def tree(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------------- fast: no torch


def test_cli_import_does_not_import_torch():
    code = (
        "import sys, hf_soups.cli; "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft', 'evaluate', 'accelerate') if m in sys.modules]; "
        "sys.exit(', '.join(heavy) if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("command", ["cook", "merge", "inspect"])
def test_every_command_has_help_with_examples(tmp_path, command):
    result = hf_soups(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"usage: hf-soups {command}" in result.stdout
    assert "examples:" in result.stdout
    assert f"hf-soups {command} " in result.stdout.split("examples:")[1]


def test_top_level_help_version_and_usage_errors(tmp_path):
    result = hf_soups("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("cook", "merge", "inspect", "demo"):
        assert command in result.stdout
    version = hf_soups("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip()
    assert hf_soups(cwd=tmp_path).returncode == 2  # no command: usage
    bad = hf_soups("merge", "./a", "--no-such-flag", cwd=tmp_path)
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr


def test_bad_recipe_exits_2_with_the_key_path(tmp_path):
    (tmp_path / "ft").mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: uniform\n"
        "ingredients:\n"
        "  - ./ft\n"
        "  - org/b\n"
        "  - {model: org/c, weight: abc}\n"
        "output_dir: ./soup\n"
    )
    result = hf_soups("cook", str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "ingredients[2].weight: expected a number, got 'abc'" in line
    assert str(recipe) in line
    assert not (tmp_path / "soup").exists()

    debug = hf_soups("cook", str(recipe), "--debug", cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    env_debug = hf_soups("cook", str(recipe), cwd=tmp_path, env={"HF_DEBUG": "1"})
    assert env_debug.returncode == 2 and "Traceback" in env_debug.stderr


def test_recipe_without_output_is_a_usage_error(tmp_path):
    (tmp_path / "ft").mkdir()
    (tmp_path / "recipe.yaml").write_text("ingredients: [./ft]\n")
    result = hf_soups("cook", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "nothing would be written: pass --output-dir" in one_line_error(result)


def test_merge_print_recipe_is_the_equivalent_recipe_file(tmp_path):
    write_eval_csv(tmp_path / "val.csv")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    result = hf_soups(
        "merge", "a", "b", "org/c@v1", "--weights", "1", "2", "3", "--dtype", "bf16",
        "--eval-file", "dev=val.csv", "--text-column", "sentence", "--label-column", "label",
        "--metric", "f1", "--output-dir", "soup", "--print-recipe",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert [i["model"] for i in data["ingredients"]] == [str(tmp_path / "a"), str(tmp_path / "b"), "org/c"]
    assert data["ingredients"][2]["revision"] == "v1"
    assert [i["weight"] for i in data["ingredients"]] == [1.0, 2.0, 3.0]
    assert data["eval"] == {"dev": {"data": str(tmp_path / "val.csv")}}
    assert (data["text_columns"], data["label_column"], data["metric"]) == ("sentence", "label", "f1")
    assert (data["dtype"], data["output_dir"]) == ("bfloat16", str(tmp_path / "soup"))
    assert not (tmp_path / "soup").exists()

    wrong = hf_soups("merge", "a", "b", "--weights", "1", "--output-dir", "soup", cwd=tmp_path)
    assert wrong.returncode == 2
    assert "--weights: 1 value(s) for 2 model(s)" in one_line_error(wrong)


def test_dry_run_writes_nothing(tmp_path):
    models = make_text_models(tmp_path / "models", n=2)
    write_eval_csv(tmp_path / "val.csv")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "greedy",
                "ingredients": [str(m) for m in models],
                "eval": {"data": "val.csv", "text_columns": "sentence"},
                "dtype": "float16",
                "output_dir": "soup",
            }
        )
    )
    hf_home = Path(os.environ["HF_HOME"])
    before, home_before = tree(tmp_path), tree(hf_home)
    result = hf_soups("cook", str(recipe), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert tree(tmp_path) == before and tree(hf_home) == home_before
    out = result.stdout
    assert "Dry run: a greedy soup of 2 model(s)." in out
    assert "Download: nothing" in out
    assert f"-> {tmp_path / 'soup'}" in out
    assert "Peak memory (estimate)" in out and "includes one live model" in out
    assert "Nothing was downloaded or written." in out
    # float16 halves the float32 checkpoint: the planned soup is about half an ingredient's weights
    from hf_soups.cli.inspect import plan_merge
    from hf_soups.publishing.recipe_file import load_recipe
    from hf_soups.utils import human_bytes

    plan = plan_merge(load_recipe(recipe))
    weights = plan.models[0].weight_bytes
    assert plan.soup_bytes is not None and 0.45 * weights < plan.soup_bytes < 0.55 * weights
    assert f"Soup on disk: {human_bytes(plan.soup_bytes)}" in out


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cook_with_csv_eval_then_recook_from_the_written_recipe(tmp_path):
    make_text_models(tmp_path / "models", n=3)
    write_eval_csv(tmp_path / "val.csv", rows=16)
    (tmp_path / "recipe.yaml").write_text(
        "method: uniform\n"
        "ingredients:\n"
        "  - models/ft-0\n"
        "  - {model: models/ft-1, weight: 2}\n"
        "  - {model: models/ft-2, weight: 1, name: third}\n"
        "eval: {data: val.csv, text_columns: sentence, label_column: label}\n"
        "metric: accuracy\n"
        "output_dir: soup\n"
    )
    result = hf_soups("cook", "recipe.yaml", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Cooked a uniform soup of 3 ingredient(s)" in result.stdout
    assert "Soup accuracy on eval:" in result.stdout
    written = yaml.safe_load((tmp_path / "soup" / "soup_recipe.yaml").read_text())
    assert written["eval"] == {
        "eval": {"data": str(tmp_path / "val.csv"), "text_columns": "sentence", "label_column": "label"}
    }
    assert [i.get("weight") for i in written["ingredients"]] == [1.0, 2.0, 1.0]
    assert written["ingredients"][2]["name"] == "third"
    assert "accuracy" in written["result"]["scores"]["eval"]

    again = hf_soups("cook", "soup/soup_recipe.yaml", "--output-dir", "again", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_tensors(tmp_path / "soup", tmp_path / "again")
    # same score too: the recipe carried the eval data and metric
    rewritten = yaml.safe_load((tmp_path / "again" / "soup_recipe.yaml").read_text())
    assert rewritten["result"]["score"] == written["result"]["score"]


@pytest.mark.slow
def test_greedy_merge_from_flags_records_a_replayable_recipe(tmp_path):
    from tests import synthetic_task as task

    trained = task.trained_model()
    folders = []
    for i, scale in enumerate([0.02, 0.05, 3.0]):  # two good ingredients and one ruined one
        folder = task.save(task.add_noise(trained, scale, seed=i), tmp_path / f"ft-{i}")
        task.tiny_tokenizer().save_pretrained(folder)
        folders.append(folder)
    ids, labels = task.make_split(96, seed=7)
    import csv

    with open(tmp_path / "val.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(task.ids_to_text(ids), labels.tolist()))
    result = hf_soups(
        "merge", *[str(f) for f in folders], "--method", "greedy", "--eval-file", "val.csv",
        "--text-column", "text", "--output-dir", "soup", "--quiet",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Cooked a greedy soup" in result.stdout
    assert "ft-2 (" in result.stdout and "left out" in result.stdout.split("ft-2 (")[1].splitlines()[0]
    written = yaml.safe_load((tmp_path / "soup" / "soup_recipe.yaml").read_text())
    assert written["method"] == "greedy" and len(written["ingredients"]) == 3
    kept = {row["name"]: row["selected"] for row in written["result"]["ingredients"]}
    assert kept["ft-2"] is False
    again = hf_soups("cook", "soup", "--output-dir", "again", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_tensors(tmp_path / "soup", tmp_path / "again")


@pytest.mark.slow
def test_inspect_compatible_models_with_a_base(tmp_path):
    make_text_models(tmp_path, n=3, base=True)
    result = hf_soups("inspect", "ft-0", "ft-1", "ft-2", "--base-model", "base", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Compatible: these models can be souped together." in out
    assert "Deltas from the base 'base'" in out and "Cosine similarity of the deltas:" in out
    assert "L2 distance between the ingredients:" in out

    as_json = hf_soups("inspect", "ft-0", "ft-1", "--base-model", "base", "--json", cwd=tmp_path)
    import json

    import torch
    from safetensors.torch import load_file

    report = json.loads(as_json.stdout)
    assert report["compatible"] is True and report["tensors_compared"] == report["tensors_differing"] > 0
    # the reported numbers are the real ones: recompute the delta norms and the cosine from the files
    base = load_file(tmp_path / "base" / "model.safetensors")
    deltas = []
    for name in ("ft-0", "ft-1"):
        ft = load_file(tmp_path / name / "model.safetensors")
        deltas.append(torch.cat([(ft[k].double() - base[k].double()).flatten() for k in sorted(ft)]))
    assert report["delta_norms"][0] == pytest.approx(float(deltas[0].norm()), rel=1e-6)
    cos = float(deltas[0].dot(deltas[1]) / (deltas[0].norm() * deltas[1].norm()))
    assert report["cosine"][0][1] == pytest.approx(cos, abs=1e-6)
    assert report["distances"][0][1] == pytest.approx(float((deltas[0] - deltas[1]).norm()), rel=1e-6)


@pytest.mark.slow
def test_inspect_names_what_makes_models_incompatible(tmp_path):
    from tests.tiny_models import make_tiny_bert_dir

    make_tiny_bert_dir(tmp_path / "three-labels", seed=0)
    make_tiny_bert_dir(tmp_path / "five-labels", seed=1, num_labels=5)
    make_tiny_bert_dir(tmp_path / "big-vocab", seed=2, vocab_size=120)
    result = hf_soups("inspect", "three-labels", "five-labels", "big-vocab", "--quiet", cwd=tmp_path)
    assert result.returncode == 1
    out = result.stdout
    assert "NOT compatible" in out
    # every problem at once, in the words merge_models uses for the first one
    assert "Ingredients 'three-labels' and 'five-labels' were fine-tuned for different labels" in out
    assert (
        "Tensor 'classifier.weight' has shape (3, 32) in 'three-labels' but (5, 32) in 'five-labels'" in out
    )
    assert "Ingredient 'big-vocab' has a vocabulary of 120 tokens but 'three-labels' has 99" in out


@pytest.mark.slow
def test_missing_hub_model_is_one_line_and_exit_1(tmp_path, hub_server):
    (tmp_path / "ft").mkdir()
    result = hf_soups("merge", "nobody/no-such-model", "--output-dir", "soup", cwd=tmp_path)
    assert result.returncode == 1
    line = one_line_error(result)
    assert "nobody/no-such-model" in line and "not found" in line
    assert not (tmp_path / "soup").exists()


@pytest.mark.slow
def test_inspect_lora_adapters_against_their_base(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    from tests.tiny_models import make_tiny_bert_dir

    make_tiny_bert_dir(tmp_path / "base", noise=0.0)
    make_tiny_bert_dir(tmp_path / "other-base", seed=5, noise=0.05)
    for i, base in enumerate(["base", "base", "other-base"]):
        torch.manual_seed(i)
        model = BertForSequenceClassification.from_pretrained(tmp_path / base)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(tmp_path / f"lora-{i}")

    same = hf_soups("inspect", "lora-0", "lora-1", "--quiet", cwd=tmp_path)
    assert same.returncode == 0, same.stdout + same.stderr
    assert f"adapter 'lora-0': base model {tmp_path / 'base'}" in same.stdout
    assert "Deltas from the base 'base'" in same.stdout  # the adapters' own base, found from their config
    # only the adapted tensors (query and value of 2 layers) differ
    assert "Tensors: 41 compared, 4 differ between the ingredients" in same.stdout

    mixed = hf_soups("inspect", "lora-0", "lora-2", "--quiet", cwd=tmp_path)
    assert mixed.returncode == 1
    assert "NOT compatible" in mixed.stdout and "different base models" in mixed.stdout
    assert str(tmp_path / "other-base") in mixed.stdout


@pytest.mark.slow
def test_dry_run_of_models_that_cannot_be_souped_exits_1_and_names_the_problem(tmp_path):
    from tests.tiny_models import make_tiny_bert_dir

    make_tiny_bert_dir(tmp_path / "a", seed=0)
    make_tiny_bert_dir(tmp_path / "b", seed=1, num_hidden_layers=3)
    before = tree(tmp_path)
    result = hf_soups("merge", "a", "b", "--output-dir", "soup", "--dry-run", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "num_hidden_layers" in result.stdout
    assert tree(tmp_path) == before


def test_dry_run_of_a_hub_ingredient_reports_the_download_then_the_cache(tmp_path, hub_server):
    from huggingface_hub import HfApi

    from hf_soups.utils import human_bytes
    from tests.tiny_models import make_tiny_bert_dir

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = f"{hub_server.user}/cli-dry-run"
    api.create_repo(repo, exist_ok=True)
    folder = make_tiny_bert_dir(tmp_path / "upload", seed=3)
    api.upload_folder(repo_id=repo, folder_path=folder)
    make_tiny_bert_dir(tmp_path / "local", seed=4)
    size = (folder / "model.safetensors").stat().st_size + (folder / "config.json").stat().st_size

    env = {"HF_TOKEN": hub_server.token}
    hf_home = Path(os.environ["HF_HOME"])
    home_before = tree(hf_home)
    dry = hf_soups("merge", repo, "local", "--output-dir", "soup", "--dry-run", cwd=tmp_path, env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"Download: {human_bytes(size)}" in dry.stdout
    assert tree(hf_home) == home_before and not (tmp_path / "soup").exists()
    # the Hub ingredient's tensors and parameters, from its safetensors header read with a range request
    rows = {
        line.split()[1].split("@")[0]: line.split()
        for line in dry.stdout.splitlines()
        if "ingredient" in line
    }
    hub_row, local_row = rows[repo], rows[str(tmp_path / "local")]
    assert hub_row[-2:] == local_row[-2:] and hub_row[-2] != "?", dry.stdout

    cooked = hf_soups("merge", repo, "local", "--output-dir", "soup", "--quiet", cwd=tmp_path, env=env)
    assert cooked.returncode == 0, cooked.stderr
    again = hf_soups("merge", repo, "local", "--output-dir", "soup2", "--dry-run", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "Download: nothing" in again.stdout and "cached" in again.stdout


def test_demo_command_dispatches_to_the_demo(tmp_path):
    result = hf_soups("demo", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "demo" in result.stdout


@pytest.mark.slow
def test_merge_and_push_to_the_hub_with_the_recipe(tmp_path, hub_server):
    from huggingface_hub import HfApi

    from tests.tiny_models import make_tiny_bert_dir

    for i in range(2):
        make_tiny_bert_dir(tmp_path / f"ft-{i}", seed=i)
    repo = f"{hub_server.user}/cli-pushed-soup"
    result = hf_soups(
        "merge",
        "ft-0",
        "ft-1",
        "--push-to-hub",
        repo,
        "--quiet",
        cwd=tmp_path,
        env={"HF_TOKEN": hub_server.token},
    )
    assert result.returncode == 0, result.stderr
    assert f"Pushed to the Hub: {repo}" in result.stdout
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    files = set(api.list_repo_files(repo))
    assert {"soup_recipe.yaml", "config.json", "README.md"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    # issue 12, defect 13: the pushed recipe holds no path of this machine, only names with a note
    text = Path(api.hf_hub_download(repo, "soup_recipe.yaml")).read_text()
    assert str(tmp_path) not in text and "/tmp" not in text
    recipe = yaml.safe_load(text)
    assert [i["model"] for i in recipe["ingredients"]] == ["ft-0", "ft-1"]
    assert any("ingredients[0].model was a local path" in note for note in recipe["notes"])

    denied = hf_soups(
        "merge",
        "ft-0",
        "ft-1",
        "--push-to-hub",
        f"{hub_server.user}/x",
        cwd=tmp_path,
        env={"HF_TOKEN": "hf_bad"},
    )
    assert denied.returncode == 1
    one_line_error(denied)
