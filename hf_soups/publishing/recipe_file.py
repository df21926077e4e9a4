"""YAML recipe files (`soup_recipe.yaml`): reading, checking and writing them, and the round trip with [`Soup`].

A recipe file names everything [`merge_models`] needs to cook a soup: the ingredients (with revisions and
weights), the method and its parameters, the held-out data (by path), the metric, the output dtype, the
shard size and where the soup goes. Every soup saved to disk carries one, written with the *resolved*
revisions, so that `hf-soups cook <soup_dir>/soup_recipe.yaml --output-dir again/` cooks the same tensors.

```yaml
format_version: 1
method: greedy
ingredients:
  - model: ./runs/lr-2e-5          # a local folder (relative to this file), a Trainer checkpoint,
  - model: org/ft-b                # a Hub repository,
    revision: v2
  - org/ft-c@main                  # or the short form "id@revision"
eval:
  data: ./validation.csv           # csv / tsv / json / jsonl / parquet / arrow file, or a save_to_disk folder
  text_columns: sentence
  label_column: label
metric: accuracy
dtype: bfloat16
output_dir: ./soup
```

The top-level keys are the options of [`SoupConfig`], [`EvalConfig`] and the recipes' parameters (`hf_soups.config`,
where each is declared once, with its help), except those a file cannot hold (`token`, `trust_remote_code`,
in-memory objects), plus the file's own structure: `format_version`, `ingredients`, `base_model`, `eval`,
`metric_config`, `notes`, `result`. Values go through the same checks as `merge_models` arguments; unknown keys
and wrong values are reported all at once with their key path (`ingredients[2].weight: expected a number, got
'abc'`) before any work starts.

Safety: a recipe is data. It is read with `yaml.safe_load` (no tags, no aliases), refused when larger than
[`MAX_RECIPE_BYTES`] or not UTF-8 text. Relative paths are relative to the file's folder and may not leave it
(`../x` is refused: write an absolute path if you mean one; absolute paths are honoured as written). Nothing in
it runs code unless the caller opts in with `trust_remote_code=True` (`--trust-remote-code`): a
`compute_metrics: pkg.mod:fn` import or a local metric script folder is refused otherwise, naming the key.

Importing this module is cheap: `datasets`, `torch` and `transformers` are imported only by
[`RecipeFile.to_merge_kwargs`] and [`~hf_soups.api.cook_recipe`].
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import SoupConfig, all_option_fields
from ..errors import InvalidArgumentError
from ..lm_eval_task import LMEvalTask, as_lm_eval_task
from ..options import (
    OptionProblem,
    check_import_string,
    check_value,
    describe,
    did_you_mean,
    option,
    option_fields,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..soup import Soup

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the recipe file format written by this version of hf_soups."""

RECIPE_FILENAME = "soup_recipe.yaml"
"""Name of the recipe file written next to every saved soup."""

MAX_RECIPE_BYTES = 1 << 20
"""Largest recipe file read (1 MiB; a real one is a few hundred bytes)."""

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_DATA_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
_TRUST_HINT = (
    "pass trust_remote_code=True (hf-soups cook/merge --trust-remote-code) only if you trust this recipe"
)


class RecipeError(InvalidArgumentError):
    """A recipe file is invalid: unknown keys, wrong types, missing files or inconsistent options.

    Args:
        message (`str`):
            One line listing every problem found, each prefixed with its key path.
        problems (`list[str]`, *optional*):
            The problems, one per entry (`"ingredients[2].weight: expected a number, got 'abc'"`).
        path (`str`, *optional*):
            The recipe file concerned.
    """

    def __init__(self, message: str, *, problems: list[str] | None = None, path: str | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.problems = list(problems or [message])
        self.path = path


# --------------------------------------------------------------------------------------------------------
# the checks that only a file needs: paths against the file's folder, and code it may name
# --------------------------------------------------------------------------------------------------------


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or value in (".", "..")
        or os.path.isabs(value)
    )


@dataclass
class _FileContext:
    """What checking one recipe needs: its folder, and whether the caller trusts it to run code."""

    base_dir: Path
    trust_remote_code: bool = False
    newer_format: int | None = None

    def path(self, value: str) -> Path:
        """`value` resolved against the recipe's folder; a relative path may not leave it (absolute: as written)."""
        path = Path(os.path.expanduser(value))
        if path.is_absolute():
            return Path(os.path.abspath(path))
        resolved = Path(os.path.abspath(self.base_dir / path))
        base = os.path.realpath(self.base_dir)
        if (
            not os.path.realpath(resolved).startswith(base.rstrip(os.sep) + os.sep)
            and os.path.realpath(resolved) != base
        ):
            raise OptionProblem(
                f"{value!r} points outside the recipe's folder ({self.base_dir}); paths in a recipe stay in its "
                "folder: write an absolute path if you mean that place"
            )
        return resolved

    def gate(self, what: str) -> None:
        """The one place a recipe's request to run code is refused without `trust_remote_code`."""
        if not self.trust_remote_code:
            raise OptionProblem(f"{what}, which runs code named by the recipe file; {_TRUST_HINT}")

    # checks by file kind -------------------------------------------------------------------------------
    def model_reference(self, value: Any, meta: Mapping) -> str:
        """A Hub id (`org/name`, `org/name@rev`) or a local folder (made absolute, checked to exist)."""
        if not isinstance(value, str) or not value.strip():
            raise OptionProblem(f"expected a Hub repository id or a local folder, got {describe(value)}")
        value = value.strip()
        if _looks_like_path(value):
            path = self.path(value)
            if not path.exists():
                raise OptionProblem(f"no such folder {str(path)!r}")
            return str(path)
        candidate = Path(os.path.abspath(self.base_dir / value))
        if candidate.exists():  # a relative folder such as `runs/a`
            return str(self.path(value))
        if not _HUB_ID_RE.match(value.rpartition("@")[0] if "@" in value else value):
            raise OptionProblem(
                f"{value!r} is neither an existing folder (relative to {self.base_dir}) nor a Hub model id "
                "('org/name' or 'org/name@revision')"
            )
        return value

    def data_path(self, value: Any, meta: Mapping) -> str:
        if not isinstance(value, str) or not value.strip():
            raise OptionProblem(
                f"expected the path of a data file or a saved dataset folder, got {describe(value)}"
            )
        path = self.path(value.strip())
        if not path.exists():
            raise OptionProblem(f"no such file or folder {str(path)!r}")
        return str(path)

    def output_path(self, value: Any, meta: Mapping) -> str:
        if not isinstance(value, str) or not value.strip():
            raise OptionProblem(f"expected a folder path, got {describe(value)}")
        return str(self.path(value.strip()))

    def name_or_path(self, value: Any, meta: Mapping) -> str:
        """A tokenizer id or folder."""
        if not isinstance(value, str) or not value.strip():
            raise OptionProblem(f"expected a name or a path, got {describe(value)}")
        value = value.strip()
        if _looks_like_path(value):
            path = self.path(value)
            if not path.exists():
                raise OptionProblem(f"no such file or folder {str(path)!r}")
            return str(path)
        return value

    def metric(self, value: Any, meta: Mapping) -> Any:
        """A metric name (bundled ones need no opt-in), a local metric script folder (code: gated), or an lm-eval
        task (`{lm_eval: task, include_path: folder, ...}`: the folder relative to this file)."""
        try:
            task = as_lm_eval_task(value)
        except InvalidArgumentError as e:
            raise OptionProblem(str(e).removeprefix("metric: ")) from None
        if task is not None:
            if task.include_path is None:
                return task
            folder = self.path(os.fspath(task.include_path))
            if not folder.is_dir():
                raise OptionProblem(f"include_path: no such folder {str(folder)!r}")
            return dataclasses.replace(task, include_path=str(folder))
        value = self.name_or_path(value, meta)
        if os.path.isabs(value):
            self.gate(f"{value!r} is a local metric script")
        return value

    def import_string(self, value: Any, meta: Mapping) -> str:
        value = check_import_string(value, meta)
        self.gate(f"{value!r} is an import")
        return value

    def checks(self) -> dict[str, Callable[[Any, Mapping], Any]]:
        return {
            "model_ref": self.model_reference,
            "ingredient": self.model_reference,
            "data_path": self.data_path,
            "output_path": self.output_path,
            "name_or_path": self.name_or_path,
            "metric": self.metric,
            "import_string": self.import_string,
        }


# --------------------------------------------------------------------------------------------------------
# schema: the file's own structure (the options themselves are the configuration's fields)
# --------------------------------------------------------------------------------------------------------


@dataclass
class IngredientSpec:
    """One entry of `ingredients:` (or `base_model:`).

    A plain string is the short form of `{model: <string>}`; `org/name@rev` sets the revision.
    """

    model: str | None = option(
        help="Hub repository id (`org/name`, optionally `@revision`) or local folder (a save_pretrained folder, "
        "a Trainer checkpoint or a PEFT adapter folder). Relative paths are relative to the recipe file.",
        kind="model_ref",
    )
    revision: str | None = option(
        help="Hub revision: a branch, tag or commit hash. Written soups record the resolved commit hash.",
        kind="str",
    )
    weight: float | list[float] | None = option(
        help="This ingredient's weight: relative and normalised for uniform and WiSE-FT soups, used as given by the "
        "task-vector methods. A list gives its weight in each setting of a weights sweep (every listed ingredient "
        "gives as many values; a single number is the same in every setting), scored on the eval data.",
        kind="number_or_numbers",
    )
    name: str | None = option(help="Display name (defaults from the reference).", kind="str")

    def reference(self) -> str:
        """The reference string passed to `merge_models` (`model@revision` for Hub ids with a revision)."""
        if self.revision and not os.path.exists(self.model):
            return f"{self.model}@{self.revision}"
        return self.model


@dataclass
class EvalSetSpec:
    """One held-out set under `eval:`. A plain string is the short form of `{data: <string>}`."""

    data: str | None = option(
        help="Local data file (csv, tsv, json, jsonl, parquet, arrow; compressed files too) or a folder written by "
        "`Dataset.save_to_disk` / `DatasetDict.save_to_disk`.",
        kind="data_path",
    )
    format: str | None = option(
        help="File format when the file name does not say it (csv, tsv, json, parquet, arrow, text, disk).",
        kind="choice",
        choices=("csv", "tsv", "json", "parquet", "arrow", "text", "disk"),
    )
    split: str | None = option(
        help="Split to use when `data` holds several (a saved DatasetDict).", kind="str"
    )
    text_columns: str | list[str] | None = option(
        help="Text column, or two columns for sentence pairs (defaults to the top-level one).", kind="columns"
    )
    label_column: str | None = option(
        help="Label column (defaults to the top-level one, else `label`).", kind="str"
    )
    max_samples: int | None = option(help="Use only the first N rows (quick runs).", kind="positive_int")


FILE_KEYS: dict[str, str] = {
    "format_version": "Recipe file format version.",
    "hf_soups_version": "Version of hf_soups that wrote the file (informational).",
    "ingredients": "The fine-tuned models to soup: strings or {model, revision, weight, name} mappings; or one "
    "folder of ingredients written by SoupTrainerCallback.",
    "base_model": "WiSE-FT: the zero-shot / pre-trained end. Adapters: their base model (string or {model, revision}).",
    "eval": "Held-out data: one set ({data, split, text_columns, label_column, max_samples}) or named sets "
    "({validation: {...}, shifted: {...}}).",
    "metric_config": "Metric configuration name (`evaluate.load(metric, config)`).",
    "notes": "Free text notes (ignored when cooking).",
    "result": "Written with the soup: the scores and choices it got (ignored when cooking).",
}
"""The keys of a recipe file that are not options of the configuration (the file's own structure)."""


def option_keys() -> dict[str, dataclasses.Field]:
    """The configuration options a recipe file may hold, by key (derived from the configuration's fields)."""
    return {
        name: f
        for name, f in all_option_fields().items()
        if f.metadata.get("file") is not False and name not in FILE_KEYS
    }


def recipe_keys() -> dict[str, str]:
    """Every top-level key of a recipe file, with its help (for docs and `--help`)."""
    out = {k: FILE_KEYS[k] for k in ("format_version", "hf_soups_version", "ingredients", "base_model")}
    out.update({name: f.metadata["help"] for name, f in option_keys().items() if name != "base_model"})
    out.update({k: v for k, v in FILE_KEYS.items() if k not in out})
    return out


class RecipeFile:
    """A checked recipe file: its ingredients, eval sets and options (the configuration's fields, by name).

    Build one with [`load_recipe`] (or [`RecipeFile.from_dict`]), turn it into `merge_models` arguments with
    [`RecipeFile.to_merge_kwargs`], or cook it with [`~hf_soups.api.cook_recipe`]. Options left out keep `merge_models`' defaults and read
    as `None` (`recipe.alpha`, `recipe.output_dir`, ...).

    Args:
        ingredients (`list[IngredientSpec]`): the ingredients.
        options (`dict`): the options set in the file, checked, by name.
        base_model ([`IngredientSpec`], *optional*): the base model.
        eval (`dict[str, EvalSetSpec]`, *optional*): the held-out sets, by name.
        trust_remote_code (`bool`, *optional*): the caller's opt-in (never read from the file).
    """

    def __init__(
        self,
        ingredients: list[IngredientSpec] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        base_model: IngredientSpec | None = None,
        eval: dict[str, EvalSetSpec] | None = None,
        format_version: int = FORMAT_VERSION,
        hf_soups_version: str | None = None,
        metric_config: str | None = None,
        notes: list[str] | None = None,
        result: dict | None = None,
        single_eval: bool = False,
        trust_remote_code: bool = False,
        source_path: Path | None = None,
    ):
        self.ingredients = list(ingredients or [])
        self.options = {k: v for k, v in dict(options or {}).items() if v is not None}
        self.base_model = base_model
        self.eval = eval
        self.format_version = format_version
        self.hf_soups_version = hf_soups_version
        self.metric_config = metric_config
        self.notes = notes
        self.result = result
        self.single_eval = single_eval
        self.trust_remote_code = trust_remote_code
        self.source_path = source_path

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_") and name in all_option_fields():
            return self.__dict__.get("options", {}).get(name)
        raise AttributeError(name)

    @property
    def method(self) -> str | list[str]:
        """The method, or the list of methods compared."""
        return self.options.get("method", "uniform")

    def __repr__(self) -> str:
        return f"RecipeFile({self.to_dict()!r})"

    def with_options(self, **options: Any) -> RecipeFile:
        """A copy with these options replaced (`None` removes one)."""
        copy = RecipeFile.__new__(RecipeFile)
        copy.__dict__.update(self.__dict__)
        copy.options = {k: v for k, v in {**self.options, **options}.items() if v is not None}
        return copy

    # -------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        base_dir: str | os.PathLike | None = None,
        source: str | None = None,
        trust_remote_code: bool = False,
    ) -> RecipeFile:
        """Checks a recipe mapping (as read from YAML) and returns a [`RecipeFile`].

        Args:
            data (`dict`):
                The recipe mapping.
            base_dir (`str` or `os.PathLike`, *optional*):
                The folder relative paths are resolved against and may not leave (defaults to the current one).
            source (`str`, *optional*):
                The file name used in error messages.
            trust_remote_code (`bool`, *optional*, defaults to `False`):
                Allow the recipe to name code (`compute_metrics` imports, local metric scripts).

        Returns:
            [`RecipeFile`]: the checked recipe, local paths made absolute.

        Raises:
            [`RecipeError`]: listing every problem with its key path.

        Example:

        ```python
        >>> from hf_soups.publishing.recipe_file import RecipeFile
        >>> RecipeFile.from_dict({"method": "uniform", "ingredients": ["org/a", "org/b"]}).method
        'uniform'
        ```
        """
        ctx = _FileContext(Path(base_dir) if base_dir is not None else Path.cwd(), trust_remote_code)
        problems: list[str] = []
        recipe = _parse_recipe(data, problems, ctx)
        if problems:
            prefix = f"{source}: " if source else ""
            raise RecipeError(
                f"{prefix}invalid recipe: " + "; ".join(problems), problems=problems, path=source
            )
        recipe.trust_remote_code = trust_remote_code
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a plain mapping, ready for `yaml.safe_dump` (keys left unset are omitted)."""
        out: dict[str, Any] = {"format_version": self.format_version}
        if self.hf_soups_version:
            out["hf_soups_version"] = self.hf_soups_version
        out["method"] = self.method
        out["ingredients"] = [_spec_to_dict(s) for s in self.ingredients]
        if self.base_model is not None:
            out["base_model"] = _spec_to_dict(self.base_model)
        for key in option_keys():
            if key not in ("method", "base_model") and key in self.options:
                value = self.options[key]
                out[key] = value.to_dict() if isinstance(value, LMEvalTask) else value
        if self.eval:
            out["eval"] = {k: _spec_to_dict(v) for k, v in self.eval.items()}
        for key in ("metric_config", "notes", "result"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    # -------------------------------------------------------------------------------------------------
    def to_merge_kwargs(self, *, load_data: bool = True) -> dict[str, Any]:
        """The keyword arguments of [`merge_models`] this recipe stands for.

        `merge_models(**recipe.to_merge_kwargs())` cooks the soup. Eval files are loaded with `datasets`
        (csv/tsv/json/parquet/arrow through `load_dataset`, saved folders through `load_from_disk`); when
        named sets use different column names, they are renamed to the first set's names.

        Args:
            load_data (`bool`, *optional*, defaults to `True`):
                Load the eval data, the tokenizer and `compute_metrics`. With `False`, they are left out (used by
                `--dry-run`).

        Returns:
            `dict`: `models` plus every option set in the recipe.

        Raises:
            [`RecipeError`]: an eval file cannot be read, lacks a column or split, or `compute_metrics` cannot
                be imported (or is not trusted).

        Example:

        ```python
        >>> from hf_soups import merge_models
        >>> from hf_soups.publishing.recipe_file import load_recipe
        >>> soup = merge_models(**load_recipe("soup_recipe.yaml").to_merge_kwargs())  # doctest: +SKIP
        ```
        """
        kwargs: dict[str, Any] = {"models": [self._ingredient_arg(spec) for spec in self.ingredients]}
        if self.ingredients_dir() is not None:
            kwargs["models"] = self.ingredients[
                0
            ].model  # merge_models expands the folder into its ingredients
        weights = ingredient_weights(self.ingredients)
        if weights is not None:
            kwargs["weights"] = weights
        special = ("base_model", "metric", "compute_metrics", "tokenizer", "text_columns", "label_column")
        kwargs.update({k: v for k, v in self.options.items() if k not in special})
        kwargs["method"] = self.method
        if self.base_model is not None:
            kwargs["base_model"] = self.base_model.reference()
        if self.metric is not None:
            kwargs["metric"] = (self.metric, self.metric_config) if self.metric_config else self.metric
        text_columns, label_column = self._columns()
        if text_columns is not None:
            kwargs["text_columns"] = text_columns
        if label_column is not None:
            kwargs["label_column"] = label_column
        if self.eval and load_data:
            sets = {name: self._load_eval_set(name, spec) for name, spec in self.eval.items()}
            kwargs["eval_dataset"] = next(iter(sets.values())) if self.single_eval else sets
        if load_data and self.compute_metrics:
            from ..remote_code import import_callable

            kwargs["compute_metrics"] = import_callable(
                self.compute_metrics, trust_remote_code=self.trust_remote_code, key="compute_metrics"
            )
        if load_data and self.tokenizer:
            from transformers import AutoTokenizer

            kwargs["tokenizer"] = AutoTokenizer.from_pretrained(self.tokenizer)
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        return kwargs

    def ingredients_dir(self) -> str | None:
        """The folder of ingredients collected by `SoupTrainerCallback`, when that is the only ingredient."""
        if len(self.ingredients) != 1:
            return None
        spec = self.ingredients[0]
        if (
            spec.model is None
            or spec.weight is not None
            or spec.name is not None
            or spec.revision is not None
        ):
            return None
        from ..ingredients import INGREDIENTS_MANIFEST

        return spec.model if (Path(spec.model) / INGREDIENTS_MANIFEST).is_file() else None

    def _ingredient_arg(self, spec: IngredientSpec) -> Any:
        if spec.name is None:
            return spec.reference()
        from ..ingredients import Ingredient

        return Ingredient(reference=spec.model, revision=spec.revision, name=spec.name, weight=spec.weight)

    def _columns(self) -> tuple[str | list[str] | None, str | None]:
        """The canonical text/label columns: the top-level ones, else the first eval set's."""
        first = next(iter(self.eval.values())) if self.eval else None
        text = self.text_columns if self.text_columns is not None else (first.text_columns if first else None)
        label = (
            self.label_column if self.label_column is not None else (first.label_column if first else None)
        )
        return text, label

    def _load_eval_set(self, name: str, spec: EvalSetSpec):
        where = "eval" if self.single_eval else f"eval.{name}"
        dataset = load_eval_data(spec.data, format=spec.format, split=spec.split, where=f"{where}.data")
        if spec.max_samples is not None and len(dataset) > spec.max_samples:
            dataset = dataset.select(range(spec.max_samples))
        text, label = self._columns()
        # rename this set's columns to the canonical ones so that one text/label setting serves every set
        renames: dict[str, str] = {}
        own_text = spec.text_columns if spec.text_columns is not None else text
        if own_text is not None and text is not None:
            own_list = [own_text] if isinstance(own_text, str) else list(own_text)
            canon = [text] if isinstance(text, str) else list(text)
            if len(own_list) != len(canon):
                raise RecipeError(
                    f"{where}.text_columns: {len(own_list)} column(s) here but {len(canon)} for the other eval "
                    "sets; every set must give the same number of text columns"
                )
            renames.update({a: b for a, b in zip(own_list, canon) if a != b})
        own_label = spec.label_column if spec.label_column is not None else label
        if own_label is not None and label is not None and own_label != label:
            renames[own_label] = label
        wanted = list(renames) + [
            c for c in ([own_text] if isinstance(own_text, str) else list(own_text or [])) if c not in renames
        ]
        if own_label is not None and own_label not in renames:
            wanted.append(own_label)
        missing = [c for c in wanted if c not in dataset.column_names]
        if missing:
            raise RecipeError(
                f"{where}: column(s) {', '.join(map(repr, missing))} not found in {spec.data!r}; "
                f"its columns are {', '.join(dataset.column_names)}"
            )
        if renames:
            clashing = [b for a, b in renames.items() if b in dataset.column_names]
            if clashing:
                dataset = dataset.remove_columns(clashing)
            dataset = dataset.rename_columns(renames)
        return dataset

    def needs_eval(self) -> bool:
        """Whether cooking this recipe evaluates (greedy, learned, several methods, or a WiSE-FT sweep over several
        alphas)."""
        return (
            self.method in ("greedy", "learned")
            or isinstance(self.method, list)
            or (isinstance(self.alpha, list) and len(self.alpha) > 1)
        )


def _spec_to_dict(spec: Any) -> dict[str, Any]:
    return {
        f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if getattr(spec, f.name) is not None
    }


# --------------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------------


def _parse_spec(cls: type, value: dict, where: str, problems: list[str], ctx: _FileContext) -> Any:
    """Check the keys and values of one `ingredients[i]` / `base_model` / `eval` entry against `cls`'s fields."""
    fields_ = {f.name: f for f in option_fields(cls)}
    out: dict[str, Any] = {}
    for key, item in value.items():
        path = f"{where}.{key}"
        if key not in fields_:
            if ctx.newer_format:
                logger.warning("Ignoring key %r: written by a newer hf_soups.", path)
                continue
            problems.append(f"{path}: unknown key{did_you_mean(key, fields_)}")
            continue
        try:
            out[key] = check_value(fields_[key], item, ctx.checks())
        except OptionProblem as e:
            problems.append(f"{path}: {e}")
    return cls(**out)


def _parse_ingredient(
    value: Any, where: str, problems: list[str], ctx: _FileContext
) -> IngredientSpec | None:
    if isinstance(value, str):
        value = {"model": value}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a model id/path or a mapping with 'model', got {describe(value)}")
        return None
    spec = _parse_spec(IngredientSpec, value, where, problems, ctx)
    if "model" not in value:
        problems.append(f"{where}.model: missing (a Hub repository id or a local folder)")
    elif value["model"] is None:
        problems.append(
            f"{where}.model: missing"
            + (
                f" (ingredient {spec.name!r} was an in-memory model when this file was written;"
                if spec.name
                else " ("
            )
            + " save it with save_pretrained() and put its folder here)"
        )
    if spec.model and "@" in spec.model and not os.path.exists(spec.model):
        model, _, rev = spec.model.rpartition("@")
        if spec.revision and spec.revision != rev:
            problems.append(
                f"{where}.revision: {spec.revision!r} conflicts with '@{rev}' in model {spec.model!r}"
            )
        spec.model, spec.revision = model, spec.revision or rev
    return spec


def _parse_eval_set(value: Any, where: str, problems: list[str], ctx: _FileContext) -> EvalSetSpec | None:
    if isinstance(value, str):
        value = {"data": value}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a data path or a mapping with 'data', got {describe(value)}")
        return None
    spec = _parse_spec(EvalSetSpec, value, where, problems, ctx)
    if value.get("data") is None:
        problems.append(f"{where}.data: missing (a data file or a saved dataset folder)")
    return spec


def _parse_recipe(data: Any, problems: list[str], ctx: _FileContext) -> RecipeFile | None:
    if not isinstance(data, dict):
        problems.append(f"<top level>: expected a mapping of recipe keys, got {describe(data)}")
        return None
    recipe = RecipeFile()
    version = data.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        problems.append(f"format_version: expected a positive integer, got {describe(version)}")
    elif version > FORMAT_VERSION:
        ctx.newer_format = version
        logger.warning(
            "This recipe uses format version %s, newer than this hf_soups reads (%s): unknown keys are ignored. "
            "Upgrade hf_soups to use them.",
            version,
            FORMAT_VERSION,
        )
    else:
        recipe.format_version = version
    options = option_keys()
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in FILE_KEYS or key == "base_model":
            continue
        if key not in options:
            if ctx.newer_format:
                logger.warning("Ignoring key %r: written by a newer hf_soups (format %s).", key, version)
                continue
            problems.append(f"{key}: unknown key{did_you_mean(key, set(options) | set(FILE_KEYS))}")
            continue
        values[key] = value
    for key, kind in (("hf_soups_version", "str"), ("metric_config", "str")):
        if data.get(key) is not None:
            try:
                setattr(recipe, key, check_value(None, data[key], kind=kind))
            except OptionProblem as e:
                problems.append(f"{key}: {e}")
    if data.get("notes") is not None:
        notes = data["notes"]
        notes = [notes] if isinstance(notes, str) else notes
        if isinstance(notes, list) and all(isinstance(n, str) for n in notes):
            recipe.notes = list(notes)
        else:
            problems.append(f"notes: expected a list of strings, got {describe(data['notes'])}")
    if data.get("result") is not None:
        if isinstance(data["result"], dict):
            recipe.result = data["result"]
        else:
            problems.append(f"result: expected a mapping, got {describe(data['result'])}")

    ingredients = data.get("ingredients")
    if isinstance(ingredients, str):  # one folder of ingredients collected by SoupTrainerCallback
        ingredients = [ingredients]
    if ingredients is None:
        problems.append("ingredients: missing (a list of models to soup)")
    elif not isinstance(ingredients, list) or not ingredients:
        problems.append(f"ingredients: expected a non-empty list of models, got {describe(ingredients)}")
    else:
        specs = [_parse_ingredient(v, f"ingredients[{i}]", problems, ctx) for i, v in enumerate(ingredients)]
        recipe.ingredients = [s for s in specs if s is not None]

    if data.get("base_model") is not None:
        recipe.base_model = _parse_ingredient(data["base_model"], "base_model", problems, ctx)
        if recipe.base_model is not None and recipe.base_model.weight is not None:
            problems.append("base_model.weight: a base model takes no weight (use alpha)")

    raw_eval = data.get("eval")
    if raw_eval is not None:
        if isinstance(raw_eval, str) or (isinstance(raw_eval, dict) and "data" in raw_eval):
            spec = _parse_eval_set(raw_eval, "eval", problems, ctx)
            recipe.eval = {"eval": spec} if spec else None
            recipe.single_eval = True
        elif isinstance(raw_eval, dict) and raw_eval:
            recipe.eval = {}
            for name, value in raw_eval.items():
                spec = _parse_eval_set(value, f"eval.{name}", problems, ctx)
                if spec is not None:
                    recipe.eval[str(name)] = spec
        else:
            problems.append(
                "eval: expected a data path, a mapping with 'data', or named sets ({validation: {data: ...}}), "
                f"got {describe(raw_eval)}"
            )

    # the options: the same configuration (and checks) as merge_models, with the file's path and code checks
    try:
        weights = ingredient_weights(recipe.ingredients)
    except InvalidArgumentError as e:
        problems.append(str(e))
        weights = None
    if weights is not None:
        values["weights"] = weights
    if recipe.base_model is not None and recipe.base_model.model is not None:
        values["base_model"] = recipe.base_model.model
    elif "base_model" in data and data["base_model"] is not None:
        values["base_model"] = "?"  # refused above; present for the method's own checks
    n_models = (
        None if recipe.ingredients_dir() is not None or not recipe.ingredients else len(recipe.ingredients)
    )
    try:
        config = SoupConfig.from_options(
            values,
            n_models=n_models,
            has_eval=bool(recipe.eval) or _names_lm_eval(data.get("metric")),
            file_checks=ctx.checks(),
        )
    except InvalidArgumentError as e:
        problems.extend(_file_problem(p) for p in getattr(e, "problems", [str(e)]))
    else:
        given = config.to_options()
        recipe.options = {k: given[k] for k in values if k not in ("weights", "base_model")}
        recipe.options["method"] = config.method

    if recipe.select_on is not None and recipe.eval and recipe.select_on not in recipe.eval:
        problems.append(
            f"select_on: {recipe.select_on!r} is not an eval set; expected one of {', '.join(recipe.eval)}"
        )
    names = [s.name for s in recipe.ingredients if s.name]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"ingredients: duplicate name(s) {', '.join(map(repr, dupes))}")
    if recipe.metric_config is not None and data.get("metric") is None:
        problems.append("metric_config: set metric too")
    return recipe


def ingredient_weights(specs: list[IngredientSpec]) -> list[float] | list[list[float]] | None:
    """The `weights=` of `merge_models` from the ingredients' `weight:` keys (None when none is given).

    Numbers give one weight per ingredient (1 where missing); lists give a weights sweep, one weight list per
    setting, with a number (or a missing weight: 1) repeated in every setting.

    Raises:
        [`InvalidArgumentError`]: lists of different lengths.
    """
    given = [s.weight for s in specs]
    if all(w is None for w in given):
        return None
    lengths = {len(w) for w in given if isinstance(w, list)}
    if not lengths:
        return [1.0 if w is None else w for w in given]
    if len(lengths) > 1:
        listed = ", ".join(f"ingredients[{i}]: {len(w)}" for i, w in enumerate(given) if isinstance(w, list))
        raise InvalidArgumentError(
            f"ingredients[].weight: the weight lists of a sweep have different lengths ({listed}); give every "
            "listed ingredient one weight per setting."
        )
    return [
        [w[k] if isinstance(w, list) else (1.0 if w is None else w) for w in given]
        for k in range(lengths.pop())
    ]


def _file_problem(problem: str) -> str:
    """A configuration problem in the file's words (weights are given per ingredient in a file)."""
    for option_name, file_key in (("weights", "ingredients[].weight"), ("eval_dataset", "eval")):
        if problem.startswith(option_name):
            return file_key + problem[len(option_name) :]
    return problem


# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------


def _yaml_loader() -> type:
    """`yaml.SafeLoader` reading numbers as YAML 1.2 does (`1e-3` is a float), and refusing aliases."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a recipe file", event.start_mark
                )
            return super().compose_node(parent, index)

    RecipeLoader.yaml_implicit_resolvers = {
        k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    RecipeLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return RecipeLoader


def load_recipe(path: str | os.PathLike, *, trust_remote_code: bool = False) -> RecipeFile:
    """Reads and checks a YAML recipe file.

    Args:
        path (`str` or `os.PathLike`):
            The recipe file, or a soup folder holding a `soup_recipe.yaml`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow the recipe to name code: `compute_metrics: package.module:function`, a local metric script.

    Returns:
        [`RecipeFile`]: the checked recipe (relative paths resolved against the file's folder).

    Raises:
        [`RecipeError`]: the file is missing, too large, not UTF-8 text, not valid YAML, or has unknown keys, wrong
            types, paths leaving its folder, code without `trust_remote_code`, or inconsistent options (every
            problem is listed with its key path).

    Example:

    ```python
    >>> from hf_soups.publishing.recipe_file import load_recipe
    >>> recipe = load_recipe("my_soup/soup_recipe.yaml")  # doctest: +SKIP
    >>> recipe.method, [i.model for i in recipe.ingredients]  # doctest: +SKIP
    ('uniform', ['/runs/a', '/runs/b'])
    ```
    """
    import yaml

    path = Path(path)
    if path.is_dir():
        path = path / RECIPE_FILENAME
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file", path=str(path))
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path}: {size} bytes is too large for a recipe file (at most {MAX_RECIPE_BYTES}); is it the right file?",
            path=str(path),
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", raw, text.index("\x00"), text.index("\x00") + 1, "NUL byte")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path}: not a recipe file (binary or not UTF-8 text, byte {exc.start}); a recipe is a YAML text file",
            path=str(path),
        ) from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}", path=str(path)) from exc
    recipe = RecipeFile.from_dict(
        data, base_dir=path.resolve().parent, source=str(path), trust_remote_code=trust_remote_code
    )
    recipe.source_path = path.resolve()
    return recipe


def load_eval_data(
    data: str | os.PathLike, *, format: str | None = None, split: str | None = None, where: str = "eval.data"
):
    """Loads one held-out set from a local file or a saved dataset folder as a `datasets.Dataset`.

    Args:
        data (`str` or `os.PathLike`):
            A csv / tsv / json / jsonl / parquet / arrow / text file (optionally compressed), or a folder written by
            `save_to_disk`.
        format (`str`, *optional*):
            The file format when the suffix does not tell it.
        split (`str`, *optional*):
            The split of a saved `DatasetDict` (required when it holds several).
        where (`str`, *optional*):
            Key path used in error messages.

    Returns:
        `datasets.Dataset`

    Raises:
        [`RecipeError`]: the file cannot be read, or the split is ambiguous or missing.
    """
    import datasets

    path = Path(data)
    fmt = format
    if fmt is None:
        if path.is_dir():
            fmt = "disk"
        else:
            name = path.name.lower()
            for suffix in _COMPRESSION_SUFFIXES:
                name = name.removesuffix(suffix)
            fmt = _DATA_FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise RecipeError(
            f"{where}: cannot tell the format of {str(path)!r}; name it .csv/.tsv/.json/.jsonl/.parquet/.arrow "
            "or set format:"
        )
    try:
        if fmt == "disk":
            loaded = datasets.load_from_disk(str(path))
        else:
            builder = "csv" if fmt == "tsv" else fmt
            extra = {"sep": "\t"} if fmt == "tsv" else {}
            loaded = datasets.load_dataset(builder, data_files=str(path), split=split or "train", **extra)
            split = None
    except (
        FileNotFoundError,
        ValueError,
        KeyError,
        OSError,
        datasets.exceptions.DatasetGenerationError,
    ) as exc:
        raise RecipeError(f"{where}: cannot read {str(path)!r} as {fmt}: {str(exc).splitlines()[0]}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise RecipeError(
                    f"{where}: {str(path)!r} holds the splits {', '.join(loaded)}; choose one with split:"
                )
            split = next(iter(loaded))
        if split not in loaded:
            raise RecipeError(f"{where}: no split {split!r} in {str(path)!r}; it has {', '.join(loaded)}")
        loaded = loaded[split]
    elif split is not None and fmt == "disk":
        raise RecipeError(f"{where}: {str(path)!r} holds a single Dataset; remove split: {split!r}")
    return loaded


# --------------------------------------------------------------------------------------------------------
# cooking and the round trip with Soup
# --------------------------------------------------------------------------------------------------------

_ACTIVE_RECIPE: contextvars.ContextVar[RecipeFile | None] = contextvars.ContextVar(
    "hf_soups_active_recipe", default=None
)


@contextlib.contextmanager
def active_recipe(recipe: RecipeFile) -> Iterator[RecipeFile]:
    """While active, soups written to disk record this recipe's eval data, metric and tokenizer."""
    token = _ACTIVE_RECIPE.set(recipe)
    try:
        yield recipe
    finally:
        _ACTIVE_RECIPE.reset(token)


def _names_lm_eval(metric: Any) -> bool:
    """Whether a recipe's `metric` is an lm-eval task (which brings its own eval data)."""
    try:
        return as_lm_eval_task(metric) is not None
    except InvalidArgumentError:
        return True  # refused, naming the key, by the metric's own check


def _reference_entry(ingredient: Any) -> dict[str, Any]:
    """`{model, revision, name}` for a resolved ingredient (local folders by absolute path)."""
    ref = ingredient.reference
    entry: dict[str, Any] = {}
    if isinstance(ref, (str, os.PathLike)):
        ref = os.fspath(ref)
        if os.path.exists(ref):
            entry["model"] = os.path.abspath(ref)
        else:
            model, sep, requested = ref.rpartition("@")
            if not sep:
                model, requested = ref, None
            entry["model"] = model
            revision = ingredient.revision or requested
            if revision:
                entry["revision"] = revision
    else:
        entry["model"] = None  # an in-memory model: cannot be re-cooked from a file
    if ingredient.name:
        entry["name"] = ingredient.name
    return entry


def recipe_from_soup(soup: Soup, *, portable: bool = False) -> dict[str, Any]:
    """The recipe that re-cooks `soup`, as a mapping (what `soup_recipe.yaml` holds).

    Ingredients are recorded with their resolved revisions (commit hashes) and local folders by absolute
    path. When the soup was cooked from a recipe file ([`~hf_soups.api.cook_recipe`], `hf-soups cook` / `merge`), its eval data,
    metric and tokenizer are recorded by path too, and the recipe re-runs the selection. Otherwise the eval
    data (an in-memory `Dataset`) cannot be recorded: the recipe then freezes the outcome (greedy: a uniform
    soup of the kept ingredients; WiSE-FT sweep: the chosen alpha), which cooks the same tensors without
    evaluating, and says so in `notes`.

    Args:
        soup ([`Soup`]):
            A cooked soup.
        portable (`bool`, *optional*, defaults to `False`):
            For a recipe that leaves this machine (the one pushed to the Hub): no absolute path of this machine.
            Hub ingredients keep their id and resolved revision; a local folder or file is recorded by its
            name, relative to the recipe, with a note saying it was local.

    Returns:
        `dict`: the recipe mapping (see [`RecipeFile`] for the keys).
    """
    from .. import __version__

    source = _ACTIVE_RECIPE.get() or getattr(soup, "_source_recipe", None)
    params = dict(getattr(soup, "params", None) or {})
    method = soup.method
    ingredients = list(soup.ingredients)
    notes: list[str] = []
    out: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "hf_soups_version": __version__,
        "method": method,
    }

    sweep = params.get("alphas") if isinstance(params.get("alphas"), (list, tuple)) else None
    if sweep is None and isinstance(params.get("alpha"), (list, tuple)):
        sweep = params["alpha"]
    family_sweep = dict(params.get("sweep") or {})  # the task-vector family's knobs swept on eval data
    compared = params.get("methods")  # several methods compared on eval data, this soup the winner's
    selection_needs_eval = (
        method in ("greedy", "learned")
        or (sweep is not None and len(sweep) > 1)
        or bool(family_sweep)
        or bool(compared)
    )
    lm_eval = (getattr(soup, "report_extra", None) or {}).get("lm_eval") or {}
    # an lm-eval metric brings its own data: the selection re-runs from the recipe, wherever the soup was cooked
    can_replay = (
        source is not None and (bool(source.eval) or _names_lm_eval(source.options.get("metric")))
    ) or (source is None and bool(lm_eval.get("spec")))
    frozen = selection_needs_eval and not can_replay
    if compared and not frozen:  # the comparison re-runs: the methods and every knob as given
        return _replayed_comparison(soup, out, source, portable)
    if compared:
        notes.append(
            f"Methods {compared} compared on an in-memory dataset: this recipe records the one served, {method}, "
            "at its chosen setting (same tensors, no evaluation)."
        )
    if frozen and method == "greedy":
        kept = [ing for ing in ingredients if ing.selected]
        notes.append(
            f"Greedy soup frozen: the held-out data was an in-memory dataset, so this recipe records the "
            f"{len(kept)} kept ingredient(s) of {len(ingredients)} as a uniform soup (same tensors)."
        )
        out["method"] = "uniform"
        ingredients = kept
    learned_keys = ("granularity", "include_base", "learning_rate", "epochs", "accumulation_steps")
    learned_keys += ("validation_fraction",)
    if method == "learned" and frozen and params.get("weights") is not None:
        notes.append(
            "Learned soup frozen: the held-out data was an in-memory dataset, so this recipe records the learned "
            "coefficients as the weights of a uniform soup (same tensors)."
        )
        out["method"] = "uniform"
        params = {"weights": params["weights"]}
    elif method == "learned" and frozen:
        notes.append(
            "Learned soup: the held-out data was an in-memory dataset and its per-layer coefficients cannot be "
            "written as weights; give this recipe an `eval:` section to learn them again (the soup's card lists "
            "them)."
        )
    if method == "learned" and out["method"] == "learned":
        out.update({k: params[k] for k in learned_keys if params.get(k) is not None})
    weights = (
        None
        if (frozen and method == "greedy")
        else [float(w) for w in params["weights"]]
        if (method == "learned" and out["method"] == "uniform")
        else _recorded_weights(soup, params, source)
    )
    entries = []
    for i, ing in enumerate(ingredients):
        entry = _reference_entry(ing)
        if entry["model"] is None:
            notes.append(
                f"Ingredient {ing.name!r} was an in-memory model: save it with save_pretrained() and put its "
                "folder in its `model:` to re-cook."
            )
        if weights is not None:
            entry["weight"] = weights[i]
        entries.append(entry)
    out["ingredients"] = entries

    base = getattr(soup, "base", None)
    if base is not None:
        out["base_model"] = _reference_entry(base)
    alpha = params.get("alpha")
    if method == "wise-ft" and selection_needs_eval and not frozen:
        out["alpha"] = [float(a) for a in sweep]
    elif method == "wise-ft" and selection_needs_eval:
        if isinstance(alpha, (int, float)):
            notes.append(
                f"WiSE-FT sweep {[float(a) for a in sweep]} frozen at the chosen alpha={float(alpha)}: the held-out "
                "data was an in-memory dataset (same tensors, no evaluation)."
            )
            out["alpha"] = float(alpha)
        else:
            notes.append("WiSE-FT sweep: the chosen alpha is not recorded; the whole sweep is written.")
            out["alpha"] = [float(a) for a in sweep]
    elif method == "wise-ft" and alpha is not None:
        out["alpha"] = float(alpha[0]) if isinstance(alpha, (list, tuple)) else float(alpha)
    for key in ("scaling", "density", "t", "seed"):  # task arithmetic, TIES, DARE, SLERP
        if params.get(key) is None:
            continue
        if key in family_sweep and not frozen:
            out[key] = list(family_sweep[key])
        else:
            if key in family_sweep:
                notes.append(
                    f"{method} sweep {key}={family_sweep[key]} frozen at the chosen {key}={params[key]}: the held-out "
                    "data was an in-memory dataset (same tensors, no evaluation)."
                )
            out[key] = params[key]

    if not frozen and source is None and lm_eval.get("spec"):
        out["metric"] = dict(lm_eval["spec"])
        if lm_eval.get("select_on"):
            out["select_on"] = lm_eval["select_on"]
    if not frozen and source is not None:
        src = source.to_dict()
        # what the file said about evaluation: every evaluation option, plus the file's own eval keys
        from ..config import EvalConfig

        for key in ["eval", "metric_config", "scores", "ensemble_baseline"] + [
            f.name for f in option_fields(EvalConfig)
        ]:
            if key in src:
                out[key] = src[key]
    for key in ("strict", "adapter_output", "rank"):
        if params.get(key) is not None and (key != "strict" or out["method"] == "greedy"):
            out[key] = params[key]
    output = dict(getattr(soup, "output_options", None) or {})
    dtype = output.get("dtype") or (source.dtype if source is not None else None)
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    shard = output.get("max_shard_size") or (source.max_shard_size if source is not None else None)
    if shard is not None:
        out["max_shard_size"] = shard
    return _closing_sections(out, soup, notes, portable)


def _replayed_comparison(
    soup: Any, out: dict[str, Any], source: RecipeFile, portable: bool
) -> dict[str, Any]:
    """The recipe of a soup cooked from several methods, re-run from its recipe file: the file's ingredients,
    methods, knobs (lists included) and eval data, so that cooking it compares the same methods again."""
    notes: list[str] = []
    src = source.to_dict()
    out["method"] = list(soup.params["methods"])
    weights = [spec.weight for spec in source.ingredients]
    entries = []
    for ing, weight in zip(soup.ingredients, weights):
        entry = _reference_entry(ing)
        if weight is not None:
            entry["weight"] = weight
        entries.append(entry)
    out["ingredients"] = entries
    if soup.base is not None:
        out["base_model"] = _reference_entry(soup.base)
    from ..config import EvalConfig

    knobs = [
        "alpha",
        "granularity",
        "include_base",
        "learning_rate",
        "epochs",
        "accumulation_steps",
        "validation_fraction",
        "scaling",
        "density",
        "t",
        "seed",
        "strict",
        "ensemble_baseline",
        "adapter_output",
        "rank",
    ]
    for key in knobs + ["eval", "metric_config", "scores"] + [f.name for f in option_fields(EvalConfig)]:
        if key in src:
            out[key] = src[key]
    output = dict(getattr(soup, "output_options", None) or {})
    if output.get("dtype") is not None:
        out["dtype"] = str(output["dtype"]).removeprefix("torch.")
    if output.get("max_shard_size") is not None:
        out["max_shard_size"] = output["max_shard_size"]
    return _closing_sections(out, soup, notes, portable)


def _closing_sections(out: dict[str, Any], soup: Any, notes: list[str], portable: bool) -> dict[str, Any]:
    """The end of every written recipe: local paths replaced when `portable`, then `notes` and `result`."""
    if portable:
        out = _without_local_paths(out, notes)
    if notes:
        out["notes"] = notes
    result = _result_section(soup)
    if result:
        out["result"] = result
    return out


def _without_local_paths(value: Any, notes: list[str], where: str = "") -> Any:
    """`value` with every absolute path of this machine replaced by its last component (one note each)."""
    if isinstance(value, dict):
        return {
            k: _without_local_paths(v, notes, f"{where}.{k}" if where else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_without_local_paths(v, notes, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        name = Path(value).name or "."
        notes.append(
            f"{where} was a local path on the machine that cooked this soup; it is recorded as {name!r}: put it "
            "beside this file (or edit the path) to re-cook."
        )
        return name
    return value


def _recorded_weights(soup: Any, params: dict, source: RecipeFile | None) -> list[float] | None:
    """The per-ingredient weights to record (None for an unweighted soup).

    The weights of the recipe that cooked the soup are recorded as written (the same input re-cooks the
    same tensors); otherwise the normalised coefficients, which normalise to themselves.
    """
    from ..recipes.family import FAMILY_METHODS

    if soup.method in FAMILY_METHODS:  # the weights used, as given (the chosen ones after a sweep)
        chosen = params.get("weights")
        return [float(w) for w in chosen] if isinstance(chosen, list) else None
    if soup.method not in ("uniform", "wise-ft"):
        return None
    if source is not None and len(source.ingredients) == len(soup.ingredients):
        given = [spec.weight for spec in source.ingredients]
        if all(w is None for w in given):
            return None
        return [1.0 if w is None else float(w) for w in given]
    if soup.method == "uniform":
        return [float(w) for w in params["weights"]] if params.get("weights") is not None else None
    found = [ing.weight for ing in soup.ingredients]
    if any(w is None for w in found) or len(set(found)) == 1:
        return None
    return [float(w) for w in found]


def _result_section(soup: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if getattr(soup, "metric_key", None):
        result["metric"] = soup.metric_key
    if getattr(soup, "select_on", None):
        result["select_on"] = soup.select_on
    if soup.score is not None:
        result["score"] = float(soup.score)
    if getattr(soup, "scores", None):
        result["scores"] = _plain(soup.scores)
    rows = []
    for ing in soup.ingredients:
        row: dict[str, Any] = {"name": ing.name}
        if ing.score is not None:
            row["score"] = float(ing.score)
        if ing.selected is not None:
            row["selected"] = bool(ing.selected)
        rows.append(row)
    if any("score" in r or r.get("selected") is False for r in rows):
        result["ingredients"] = rows
    if getattr(soup, "comparison", None):  # several methods compared: each one's score, the served one marked
        result["methods"] = [
            {"method": r["method"], "score": _plain(r["score"]), "selected": bool(r.get("selected"))}
            for r in soup.comparison
        ]
    return result


def _plain(value: Any) -> Any:
    """Converts numpy scalars and tuples to plain YAML-safe values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def write_recipe(soup: Soup, directory: str | os.PathLike, *, portable: bool = False) -> Path:
    """Writes `soup_recipe.yaml` into `directory`: the recipe that re-cooks `soup` (see [`recipe_from_soup`]).

    Called by `Soup.save_pretrained` before the soup folder is moved into place, so every soup on disk carries
    its recipe, and by `Soup.push_to_hub` with `portable=True` (no path of this machine leaves it).

    Args:
        soup ([`Soup`]):
            A cooked soup.
        directory (`str` or `os.PathLike`):
            The folder to write into (created if missing).
        portable (`bool`, *optional*, defaults to `False`):
            Record local ingredients and files by name, with a note, instead of by absolute path.

    Returns:
        `Path`: the file written.

    Example:

    ```python
    >>> from hf_soups.publishing.recipe_file import write_recipe
    >>> write_recipe(soup, "my-soup")  # doctest: +SKIP
    PosixPath('my-soup/soup_recipe.yaml')
    ```
    """
    import yaml

    data = recipe_from_soup(soup, portable=portable)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = (
        f"# hf_soups recipe (format {FORMAT_VERSION}): the ingredients, method and options that made this soup.\n"
        "# Re-cook it with: hf-soups cook soup_recipe.yaml --output-dir <folder>\n"
    )
    path = directory / RECIPE_FILENAME
    text = header + yaml.safe_dump(
        _plain(data), sort_keys=False, allow_unicode=True, default_flow_style=False
    )
    path.write_text(text, encoding="utf-8")
    return path


__all__ = [
    "FORMAT_VERSION",
    "RECIPE_FILENAME",
    "EvalSetSpec",
    "IngredientSpec",
    "RecipeFile",
    "RecipeError",
    "recipe_keys",
    "active_recipe",
    "load_eval_data",
    "load_recipe",
    "recipe_from_soup",
    "write_recipe",
]
