"""The ingredients-folder format: written and read here, and only here.

[`SoupTrainerCallback`] stores every run (or checkpoint) it collects in one folder, and `merge_models(folder)`,
`SoupTrainerCallback.from_dir` and `hf-soups inspect` read it back. The disk is the source of truth, so trials
that run in other processes (Ray Tune workers, other `torchrun` jobs) add their ingredients too::

    soup-ingredients/
        soup_ingredients.json          # marks the folder (format, version, writer version)
        trial-0-1a2b3c/                # one folder per ingredient: a `save_pretrained` folder
            model.safetensors
            config.json
            tokenizer.json ...
            soup_ingredient.json       # run, kind, step, trial params, seed, hyperparameters, held-out metrics
        trial-1-4d5e6f-checkpoint-20/
            ...
        .trial-2-7a8b9c.tmp/           # a write in progress: skipped by readers

An ingredient is written under a temporary `.name.tmp` folder ([`IngredientsFolder.stage`]) and renamed into
place with its metadata ([`IngredientsFolder.commit`]), so a crash never leaves a half-written ingredient.

This module is plain files and JSON: it knows nothing of `Trainer`, processes or [`Ingredient`] objects (the
ingredients layer turns [`StoredIngredient`] records into [`Ingredient`]s; the callback decides which process
writes).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import IngredientNotFoundError, InvalidArgumentError

INGREDIENTS_MANIFEST = "soup_ingredients.json"
"""File that marks a folder as an ingredients folder."""

INGREDIENT_METADATA = "soup_ingredient.json"
"""Per-ingredient metadata file (run, kind, step, trial parameters, seed, metrics)."""

FORMAT_NAME = "hf_soups.ingredients"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StoredIngredient:
    """One ingredient folder as read from disk.

    Args:
        path (`Path`): the ingredient folder (a `save_pretrained` folder).
        name (`str`): the folder name, unique in its ingredients folder.
        metadata (`dict`): the content of its `soup_ingredient.json`.
    """

    path: Path
    name: str
    metadata: dict[str, Any] = field(default_factory=dict)


def is_ingredients_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is an ingredients folder (it holds a `soup_ingredients.json` manifest).

    Args:
        path (`str` or `os.PathLike`): a local folder.

    Returns:
        `bool`
    """
    try:
        return (Path(path) / INGREDIENTS_MANIFEST).is_file()
    except (OSError, ValueError):
        return False


def read_ingredient_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """Read the `soup_ingredient.json` of one ingredient folder.

    Args:
        folder (`str` or `os.PathLike`): an ingredient folder inside an ingredients folder.

    Returns:
        `dict`: the recorded metadata (`run`, `kind`, `global_step`, `trial_params`, `seed`, `metrics`, ...).

    Raises:
        [`IngredientNotFoundError`]: the folder has no metadata file.
        [`InvalidArgumentError`]: the metadata file is not a JSON object.
    """
    path = Path(folder) / INGREDIENT_METADATA
    name = Path(folder).name
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise IngredientNotFoundError(
            f"{path} does not exist: {folder} is not an ingredient written by SoupTrainerCallback.",
            ingredient=name,
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(
            f"{path} is not valid JSON ({e}): fix the file or delete the folder {folder}.", ingredient=name
        ) from None
    if not isinstance(meta, dict):
        raise InvalidArgumentError(
            f"{path} holds a {type(meta).__name__}, not a JSON object: fix the file or delete the folder {folder}.",
            ingredient=name,
        )
    created = meta.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float, type(None))):
        raise InvalidArgumentError(
            f"{path}: 'created' is {created!r}, not a number: fix the file or delete the folder {folder}.",
            ingredient=name,
        )
    return meta


def read_ingredients_dir(
    path: str | os.PathLike, *, run: str | None = None, kind: str | None = None
) -> list[StoredIngredient]:
    """The ingredients of an ingredients folder, oldest first (optionally of one run or one kind only).

    Folders whose name starts with `.` are writes in progress and are skipped, as are folders without a
    `soup_ingredient.json`.

    Args:
        path (`str` or `os.PathLike`): the ingredients folder.
        run (`str`, *optional*): keep only this run's ingredients (`metadata["run"]`).
        kind (`str`, *optional*): keep only `"final"` models or only `"checkpoint"`s.

    Returns:
        `list[StoredIngredient]`, sorted by creation time, then name.

    Raises:
        [`IngredientNotFoundError`]: `path` is not an ingredients folder.
        [`InvalidArgumentError`]: an ingredient's metadata file is not valid JSON, or a sub-folder links outside
            the ingredients folder.
    """
    path = Path(path)
    if not is_ingredients_dir(path):
        raise IngredientNotFoundError(
            f"{path} is not an ingredients directory (no {INGREDIENTS_MANIFEST}). Pass the `ingredients_dir` of a "
            "SoupTrainerCallback, or a list of model folders / Hub ids.",
            ingredient=str(path),
        )
    found = []
    root = path.resolve()
    for child in path.iterdir():
        if child.name.startswith(".") or not (child / INGREDIENT_METADATA).is_file():
            continue
        if not child.resolve().is_relative_to(root):
            raise InvalidArgumentError(
                f"{child} is a link to {child.resolve()}, outside the ingredients directory {path}: an ingredients "
                "directory only holds its own sub-folders. Remove the link, or pass that model explicitly.",
                ingredient=child.name,
            )
        meta = read_ingredient_metadata(child)
        if (run is not None and meta.get("run") != run) or (kind is not None and meta.get("kind") != kind):
            continue
        found.append((float(meta.get("created") or 0.0), child.name, child, meta))
    found.sort(key=lambda item: (item[0], item[1]))
    return [StoredIngredient(folder, name, meta) for _, name, folder, meta in found]


class IngredientsFolder:
    """Writes an ingredients folder: the manifest, ingredients (staged, then renamed into place), their metadata.

    Only the files are handled here: which process writes, and how a model gets into a staged folder (a
    `save_pretrained`, a copy of a `Trainer` checkpoint), is the caller's business.

    Args:
        root (`str` or `os.PathLike`): the ingredients folder (created on the first write).

    Example:

    ```python
    >>> import tempfile
    >>> from hf_soups.ingredients_folder import IngredientsFolder, read_ingredients_dir
    >>> folder = IngredientsFolder(tempfile.mkdtemp())
    >>> staged = folder.stage("run-1")
    >>> _ = (staged / "config.json").write_text("{}")
    >>> folder.commit("run-1", {"run": "run-1", "kind": "final"}).name
    'run-1'
    >>> [(s.name, s.metadata["kind"]) for s in read_ingredients_dir(folder.root)]
    [('run-1', 'final')]
    ```
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def write_manifest(self) -> None:
        """Create the folder and its manifest (kept as it is when it exists)."""
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / INGREDIENTS_MANIFEST
        if manifest.is_file():
            return
        _write_json_atomic(
            manifest,
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "hf_soups_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "layout": f"one folder per ingredient, each with a save_pretrained model and {INGREDIENT_METADATA}",
            },
        )

    def staging_path(self, name: str) -> Path:
        """Where ingredient `name` is written before [`~IngredientsFolder.commit`] renames it into place."""
        return self.root / f".{_check_name(name)}.tmp"

    def stage(self, name: str) -> Path:
        """A fresh, empty staging folder for ingredient `name` (a leftover of a crashed write is removed).

        Also writes the manifest, so that the folder is an ingredients folder from its first ingredient on.
        """
        self.write_manifest()
        staged = self.staging_path(name)
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir()
        return staged

    def commit(self, name: str, metadata: Mapping[str, Any]) -> Path:
        """Write the metadata into the staged folder of `name` and rename it into place.

        An ingredient of the same name (a run that is collected again) is replaced. `format`, `version`,
        `hf_soups_version`, `name` and `created` are added to `metadata`.

        Returns:
            `Path`: the ingredient folder.
        """
        staged = self.staging_path(name)
        if not staged.is_dir():
            raise InvalidArgumentError(f"Ingredient {name!r} was not staged: call stage({name!r}) first.")
        record = {
            **metadata,
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "hf_soups_version": __version__,
            "name": name,
            "created": time.time(),
        }
        _write_json_atomic(staged / INGREDIENT_METADATA, record)
        target = self.root / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
        return target

    def update_metadata(self, folder: str | os.PathLike, updates: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `updates` into an ingredient's metadata (nested `metrics` dicts are merged too).

        Returns:
            `dict`: the metadata as written.
        """
        meta = read_ingredient_metadata(folder)
        for key, value in updates.items():
            if key == "metrics" and isinstance(value, Mapping):
                meta.setdefault("metrics", {}).update(value)
            else:
                meta[key] = value
        _write_json_atomic(Path(folder) / INGREDIENT_METADATA, meta)
        return meta

    def remove(self, folders: Iterable[str | os.PathLike]) -> int:
        """Delete ingredient folders of this ingredients folder; anything outside it is refused.

        Returns:
            `int`: how many folders were deleted (missing ones are skipped).

        Raises:
            [`InvalidArgumentError`]: a folder is not an ingredient of this ingredients folder.
        """
        root = self.root.resolve()
        removed = 0
        for folder in folders:
            folder = Path(folder)
            if not folder.exists():
                continue
            if folder.resolve().parent != root or not (folder / INGREDIENT_METADATA).is_file():
                raise InvalidArgumentError(
                    f"Refusing to delete {folder}: it is not an ingredient of {self.root} (only folders holding "
                    f"a {INGREDIENT_METADATA} directly inside the ingredients folder are deleted)."
                )
            shutil.rmtree(folder)
            removed += 1
        return removed


def _check_name(name: str) -> str:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != Path(name).name:
        raise InvalidArgumentError(
            f"{name!r} is not a valid ingredient name: use a plain folder name (no path separator, no leading '.')."
        )
    return name


def _json_default(value: Any) -> Any:
    if hasattr(value, "value") and isinstance(value.value, (str, int, float)):
        return value.value  # enums (IntervalStrategy, SchedulerType, ...)
    if hasattr(value, "item"):
        try:
            return value.item()  # numpy / torch scalars
        except (TypeError, ValueError):
            pass
    return str(value)


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INGREDIENTS_MANIFEST",
    "INGREDIENT_METADATA",
    "IngredientsFolder",
    "StoredIngredient",
    "is_ingredients_dir",
    "read_ingredient_metadata",
    "read_ingredients_dir",
]
