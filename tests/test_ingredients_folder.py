"""The ingredients-folder format (hf_soups/ingredients_folder.py): written and read in one place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_soups import IngredientNotFoundError, InvalidArgumentError, merge_models
from hf_soups.ingredients import as_ingredients, list_ingredients
from hf_soups.ingredients_folder import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INGREDIENT_METADATA,
    INGREDIENTS_MANIFEST,
    IngredientsFolder,
    is_ingredients_dir,
    read_ingredient_metadata,
    read_ingredients_dir,
)


def _add(folder: IngredientsFolder, name: str, **metadata) -> Path:
    staged = folder.stage(name)
    (staged / "config.json").write_text("{}")
    return folder.commit(name, metadata)


def test_written_ingredients_read_back_in_order(tmp_path):
    folder = IngredientsFolder(tmp_path / "ing")
    assert not is_ingredients_dir(folder.root)
    _add(folder, "b-run", run="b", kind="final", metrics={"eval_accuracy": 0.5})
    _add(folder, "a-run", run="a", kind="checkpoint")
    assert is_ingredients_dir(folder.root)
    manifest = json.loads((folder.root / INGREDIENTS_MANIFEST).read_text())
    assert manifest["format"] == FORMAT_NAME and manifest["version"] == FORMAT_VERSION

    stored = read_ingredients_dir(folder.root)
    assert [s.name for s in stored] == ["b-run", "a-run"]  # creation order, not name order
    meta = stored[0].metadata
    assert meta["format"] == FORMAT_NAME and meta["version"] == FORMAT_VERSION and meta["name"] == "b-run"
    assert meta["metrics"] == {"eval_accuracy": 0.5}
    assert [s.name for s in read_ingredients_dir(folder.root, kind="checkpoint")] == ["a-run"]
    assert [s.name for s in read_ingredients_dir(folder.root, run="b")] == ["b-run"]
    # the ingredients layer turns the records into Ingredients; merge_models' expansion uses the same reader
    assert [i.name for i in list_ingredients(folder.root)] == ["b-run", "a-run"]
    assert [i.reference for i in as_ingredients(str(folder.root))] == [str(s.path) for s in stored]


def test_a_staged_write_is_invisible_and_a_leftover_is_replaced(tmp_path):
    folder = IngredientsFolder(tmp_path / "ing")
    staged = folder.stage("run-1")
    (staged / "partial.bin").write_text("half")
    assert staged.name.startswith(".")
    assert read_ingredients_dir(folder.root) == []  # a write in progress is not an ingredient
    staged = folder.stage("run-1")  # a crashed write's leftover is cleared
    assert list(staged.iterdir()) == []
    (staged / "config.json").write_text("{}")
    target = folder.commit("run-1", {"run": "run-1"})
    assert not staged.exists() and sorted(p.name for p in target.iterdir()) == [
        "config.json",
        INGREDIENT_METADATA,
    ]


def test_commit_replaces_an_ingredient_of_the_same_name(tmp_path):
    folder = IngredientsFolder(tmp_path / "ing")
    _add(folder, "run-1", step=1)
    _add(folder, "run-1", step=2)
    (only,) = read_ingredients_dir(folder.root)
    assert only.metadata["step"] == 2


def test_update_metadata_merges_metrics(tmp_path):
    folder = IngredientsFolder(tmp_path / "ing")
    path = _add(folder, "run-1", metrics={"eval_loss": 1.0})
    folder.update_metadata(path, {"metrics": {"eval_accuracy": 0.75}, "metrics_step": 4})
    meta = read_ingredient_metadata(path)
    assert meta["metrics"] == {"eval_loss": 1.0, "eval_accuracy": 0.75} and meta["metrics_step"] == 4


def test_remove_deletes_only_ingredients_of_the_folder(tmp_path):
    folder = IngredientsFolder(tmp_path / "ing")
    path = _add(folder, "run-1")
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / INGREDIENT_METADATA).write_text("{}")  # looks like an ingredient, but lives elsewhere
    with pytest.raises(InvalidArgumentError, match="Refusing to delete"):
        folder.remove([mine])
    assert mine.is_dir()
    assert folder.remove([path, tmp_path / "ing" / "gone"]) == 1
    assert not path.exists()


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "../escape"])
def test_ingredient_names_stay_inside_the_folder(tmp_path, name):
    with pytest.raises(InvalidArgumentError, match="not a valid ingredient name"):
        IngredientsFolder(tmp_path / "ing").stage(name)
    assert not (tmp_path / "escape").exists()


def test_not_an_ingredients_folder(tmp_path):
    with pytest.raises(IngredientNotFoundError, match=INGREDIENTS_MANIFEST):
        read_ingredients_dir(tmp_path)
    with pytest.raises(IngredientNotFoundError, match="not an ingredient"):
        read_ingredient_metadata(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"text"'])
def test_a_broken_metadata_file_is_named(tmp_path, content):
    """A metadata file that is not a JSON object is a named error (a JSON list used to crash with AttributeError)."""
    root = tmp_path / "ing"
    root.mkdir()
    (root / INGREDIENTS_MANIFEST).write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION}))
    (root / "run-1").mkdir()
    (root / "run-1" / INGREDIENT_METADATA).write_text(content)
    with pytest.raises(InvalidArgumentError, match="run-1") as info:
        merge_models(str(root))
    assert info.value.ingredient == "run-1"
