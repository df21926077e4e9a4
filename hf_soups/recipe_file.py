"""YAML recipe files: the schema of `soup_recipe.yaml`, its validation, and the round trip with [`Soup`].

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

Relative paths are relative to the recipe file's folder. Unknown keys and wrong types are errors that
name the key path (`ingredients[2].weight: expected a number, got 'abc'`), reported all at once before
any work starts.

Importing this module is cheap: `datasets`, `torch` and `transformers` are imported only by
[`Recipe.to_merge_kwargs`] and [`cook`].
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import importlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError

if TYPE_CHECKING:  # pragma: no cover
    from .soup import Soup

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the recipe file format written by this version of hf_soups."""

RECIPE_FILENAME = "soup_recipe.yaml"
"""Name of the recipe file written next to every saved soup."""

_KNOWN_METHODS = ("uniform", "greedy", "wise-ft")
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_SIZE_RE = re.compile(r"^\s*\d+(\.\d+)?\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)
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
# value checks: each takes (value, key path, problems, context) and returns the normalised value
# --------------------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _check_str(value, where, problems, ctx):
    if isinstance(value, str) and value.strip():
        return value
    problems.append(f"{where}: expected a non-empty string, got {_describe(value)}")
    return None


def _check_number(value, where, problems, ctx):
    # YAML 1.1 (PyYAML) reads `1e-3` as a string: accept numeric strings, refuse anything else.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            problems.append(f"{where}: expected a finite number, got {value!r}")
            return None
        return float(value)
    problems.append(f"{where}: expected a number, got {_describe(value)}")
    return None


def _check_int(value, where, problems, ctx):
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    problems.append(f"{where}: expected a positive integer, got {_describe(value)}")
    return None


def _check_bool(value, where, problems, ctx):
    if isinstance(value, bool):
        return value
    problems.append(f"{where}: expected true or false, got {_describe(value)}")
    return None


def _check_format_version(value, where, problems, ctx):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    problems.append(f"{where}: expected a positive integer, got {_describe(value)}")
    return None


def _check_method(value, where, problems, ctx):
    if not isinstance(value, str):
        problems.append(f"{where}: expected one of {', '.join(_KNOWN_METHODS)}, got {_describe(value)}")
        return None
    name = value.strip().lower().replace("_", "-")
    known = _known_methods()
    if name not in known:
        problems.append(f"{where}: unknown method {value!r}; expected one of {', '.join(known)}")
        return None
    return name


def _known_methods() -> tuple[str, ...]:
    """The registered recipe names (the static list when the registry cannot be read cheaply)."""
    try:
        from .recipes import base as recipes_base

        names = getattr(recipes_base, "available_recipes", None)
        if callable(names):
            found = tuple(sorted(set(names()) | set(_KNOWN_METHODS)))
            return found
    except Exception:  # noqa: BLE001 - the registry is optional at validation time
        pass
    return _KNOWN_METHODS


def _check_str_or_str_list(value, where, problems, ctx):
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return list(value)
    problems.append(f"{where}: expected a column name or a list of column names, got {_describe(value)}")
    return None


def _check_alpha(value, where, problems, ctx):
    if isinstance(value, list):
        if not value:
            problems.append(f"{where}: expected a number or a non-empty list of numbers, got an empty list")
            return None
        out = []
        for i, v in enumerate(value):
            out.append(_check_number(v, f"{where}[{i}]", problems, ctx))
        return out
    return _check_number(value, where, problems, ctx)


def _check_dtype(value, where, problems, ctx):
    if isinstance(value, str) and value.strip().lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.strip().lower().removeprefix("torch.")]
    problems.append(f"{where}: expected one of float32, float16, bfloat16, float64, got {_describe(value)}")
    return None


def _check_size(value, where, problems, ctx):
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and _SIZE_RE.match(value):
        return value.strip()
    problems.append(f"{where}: expected a size such as '5GB' or a number of bytes, got {_describe(value)}")
    return None


def _check_choice(*choices: str) -> Callable:
    def check(value, where, problems, ctx):
        if isinstance(value, str) and value in choices:
            return value
        problems.append(f"{where}: expected one of {', '.join(choices)}, got {_describe(value)}")
        return None

    return check


def _check_scores(value, where, problems, ctx):
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping of ingredient name to score, got {_describe(value)}")
        return None
    return {str(k): _check_number(v, f"{where}.{k}", problems, ctx) for k, v in value.items()}


def _check_dotted_callable(value, where, problems, ctx):
    if isinstance(value, str) and re.match(r"^[\w.]+:[\w.]+$", value.strip()):
        return value.strip()
    problems.append(f"{where}: expected 'package.module:function', got {_describe(value)}")
    return None


def _check_notes(value, where, problems, ctx):
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    problems.append(f"{where}: expected a list of strings, got {_describe(value)}")
    return None


def _check_mapping(value, where, problems, ctx):
    if isinstance(value, dict):
        return value
    problems.append(f"{where}: expected a mapping, got {_describe(value)}")
    return None


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or value in (".", "..")
        or os.path.isabs(value)
    )


def _resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = base_dir / path
    return Path(os.path.abspath(path))


def _check_model_reference(value, where, problems, ctx):
    """A Hub id (`org/name`, `org/name@rev`) or a local folder (made absolute, checked to exist)."""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: expected a Hub repository id or a local folder, got {_describe(value)}")
        return None
    value = value.strip()
    base_dir: Path = ctx["base_dir"]
    if _looks_like_path(value):
        path = _resolve_path(value, base_dir)
        if not path.exists():
            problems.append(f"{where}: no such folder {str(path)!r}")
            return None
        return str(path)
    candidate = _resolve_path(value, base_dir)
    if candidate.exists():  # a relative folder such as `runs/a`
        return str(candidate)
    if not _HUB_ID_RE.match(value.rpartition("@")[0] if "@" in value else value):
        problems.append(
            f"{where}: {value!r} is neither an existing folder (relative to {base_dir}) nor a Hub model id "
            "('org/name' or 'org/name@revision')"
        )
        return None
    return value


def _check_data_path(value, where, problems, ctx):
    if not isinstance(value, str) or not value.strip():
        problems.append(
            f"{where}: expected the path of a data file or a saved dataset folder, got {_describe(value)}"
        )
        return None
    path = _resolve_path(value.strip(), ctx["base_dir"])
    if not path.exists():
        problems.append(f"{where}: no such file or folder {str(path)!r}")
        return None
    return str(path)


def _check_local_or_hub(value, where, problems, ctx):
    """A metric name (`accuracy`), a local metric module folder, or a tokenizer id/folder."""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: expected a name or a path, got {_describe(value)}")
        return None
    value = value.strip()
    if _looks_like_path(value):
        path = _resolve_path(value, ctx["base_dir"])
        if not path.exists():
            problems.append(f"{where}: no such file or folder {str(path)!r}")
            return None
        return str(path)
    return value


def _check_output_path(value, where, problems, ctx):
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: expected a folder path, got {_describe(value)}")
        return None
    return str(_resolve_path(value.strip(), ctx["base_dir"]))


def _check_repo_id(value, where, problems, ctx):
    if isinstance(value, str) and re.match(r"^[\w.\-]+(/[\w.\-]+)?$", value.strip()):
        return value.strip()
    problems.append(f"{where}: expected a Hub repository id such as 'user/my-soup', got {_describe(value)}")
    return None


def _opt(check: Callable, help: str, default: Any = None, **extra) -> Any:
    """A dataclass field holding an optional recipe key, with its help and value check (peft-config style)."""
    return field(default=default, metadata={"help": help, "check": check, **extra})


# --------------------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------------------


@dataclass
class IngredientSpec:
    """One entry of `ingredients:` (or `base_model:`).

    A plain string is the short form of `{model: <string>}`; `org/name@rev` sets the revision.
    """

    model: str | None = _opt(
        _check_model_reference,
        "Hub repository id (`org/name`, optionally `@revision`) or local folder (a save_pretrained folder, "
        "a Trainer checkpoint or a PEFT adapter folder). Relative paths are relative to the recipe file.",
    )
    revision: str | None = _opt(
        _check_str,
        "Hub revision: a branch, tag or commit hash. Written soups record the resolved commit hash.",
    )
    weight: float | None = _opt(
        _check_number,
        "Uniform and WiSE-FT soups: this ingredient's relative weight (weights are normalised).",
    )
    name: str | None = _opt(_check_str, "Display name (defaults from the reference).")

    def reference(self) -> str:
        """The reference string passed to `merge_models` (`model@revision` for Hub ids with a revision)."""
        assert self.model is not None
        if self.revision and not os.path.exists(self.model):
            return f"{self.model}@{self.revision}"
        return self.model


@dataclass
class EvalSetSpec:
    """One held-out set under `eval:`. A plain string is the short form of `{data: <string>}`."""

    data: str | None = _opt(
        _check_data_path,
        "Local data file (csv, tsv, json, jsonl, parquet, arrow; compressed files too) or a folder written by "
        "`Dataset.save_to_disk` / `DatasetDict.save_to_disk`.",
    )
    format: str | None = _opt(
        _check_choice("csv", "tsv", "json", "parquet", "arrow", "text", "disk"),
        "File format when the file name does not say it (csv, tsv, json, parquet, arrow, text, disk).",
    )
    split: str | None = _opt(_check_str, "Split to use when `data` holds several (a saved DatasetDict).")
    text_columns: str | list[str] | None = _opt(
        _check_str_or_str_list,
        "Text column, or two columns for sentence pairs (defaults to the top-level one).",
    )
    label_column: str | None = _opt(_check_str, "Label column (defaults to the top-level one, else `label`).")
    max_samples: int | None = _opt(_check_int, "Use only the first N rows (quick runs).")


@dataclass
class Recipe:
    """A validated recipe file: every key mirrors a keyword argument of [`merge_models`].

    Build one with [`load_recipe`] (or [`Recipe.from_dict`]), turn it into `merge_models` arguments with
    [`Recipe.to_merge_kwargs`], or cook it with [`cook`]. Keys left out keep `merge_models`' defaults.
    """

    format_version: int = _opt(_check_format_version, "Recipe file format version.", default=FORMAT_VERSION)
    hf_soups_version: str | None = _opt(
        _check_str, "Version of hf_soups that wrote the file (informational)."
    )
    method: str = _opt(_check_method, "Soup recipe: uniform, greedy or wise-ft.", default="uniform")
    ingredients: list[IngredientSpec] = field(
        default_factory=list,
        metadata={
            "help": "The fine-tuned models to soup: strings or {model, revision, weight, name} mappings."
        },
    )
    base_model: IngredientSpec | None = field(
        default=None,
        metadata={"help": "WiSE-FT: the zero-shot / pre-trained end. Adapters: their base model."},
    )
    alpha: float | list[float] | None = _opt(
        _check_alpha, "WiSE-FT: mixing coefficient, or a list of them swept and chosen on the eval data."
    )
    eval: dict[str, EvalSetSpec] | None = field(
        default=None,
        metadata={
            "help": "Held-out data: one set ({data, split, text_columns, label_column}) or named sets "
            "({validation: {...}, shifted: {...}})."
        },
    )
    metric: str | None = _opt(
        _check_local_or_hub, "`evaluate` metric name (accuracy, f1, ...) or a local metric module folder."
    )
    metric_config: str | None = _opt(
        _check_str, "Metric configuration name (`evaluate.load(metric, config)`)."
    )
    metric_key: str | None = _opt(_check_str, "Key of the metric's result used to compare soups.")
    greater_is_better: bool | None = _opt(_check_bool, "Whether a higher metric value is better.")
    select_on: str | None = _opt(_check_str, "Name of the eval set the greedy choice / alpha sweep uses.")
    compute_metrics: str | None = _opt(
        _check_dotted_callable, "Trainer-style compute_metrics function, as 'package.module:function'."
    )
    tokenizer: str | None = _opt(
        _check_local_or_hub, "Tokenizer id or folder (defaults to the reference ingredient's tokenizer)."
    )
    text_columns: str | list[str] | None = _opt(
        _check_str_or_str_list, "Default text column(s) of the eval sets."
    )
    label_column: str | None = _opt(_check_str, "Default label column of the eval sets.")
    batch_size: int | None = _opt(_check_int, "Evaluation batch size.")
    device: str | None = _opt(_check_str, "Evaluation device (cpu, cuda, cuda:1, mps).")
    scores: dict[str, float] | None = _opt(
        _check_scores, "Greedy: held-out scores already known, by ingredient name (skips their evaluation)."
    )
    strict: bool | None = _opt(_check_bool, "Greedy: keep an ingredient only on strict improvement.")
    ensemble_baseline: bool | None = _opt(_check_bool, "Also evaluate the output ensemble, for comparison.")
    adapter_output: str | None = _opt(
        _check_choice("merged", "adapter"),
        "Adapter soups: a merged model or an adapter ('merged' | 'adapter').",
    )
    rank: int | None = _opt(_check_int, "Adapter form: truncated SVD rank of the souped deltas.")
    dtype: str | None = _opt(
        _check_dtype, "Output dtype (float32, float16, bfloat16); default: the first ingredient's."
    )
    max_shard_size: int | str | None = _opt(_check_size, "Largest safetensors shard ('5GB' or bytes).")
    output_dir: str | None = _opt(_check_output_path, "Folder the soup is written to (sharded safetensors).")
    push_to_hub: str | None = _opt(
        _check_repo_id, "Hub repository the soup is pushed to, with its model card."
    )
    private: bool | None = _opt(_check_bool, "Create the Hub repository as private.")
    revision: str | None = _opt(_check_str, "Default revision for Hub ingredients given without one.")
    cache_dir: str | None = _opt(_check_output_path, "Hugging Face cache folder (default: HF_HUB_CACHE).")
    notes: list[str] | None = _opt(_check_notes, "Free text notes (ignored when cooking).")
    result: dict | None = _opt(
        _check_mapping, "Written with the soup: the scores and choices it got (ignored when cooking)."
    )

    source_path: Path | None = field(default=None, repr=False, compare=False, metadata={"internal": True})
    """The file this recipe was read from (not a key of the file)."""

    _single_eval: bool = field(default=False, repr=False, compare=False, metadata={"internal": True})

    # -------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, data: Any, *, base_dir: str | os.PathLike | None = None, source: str | None = None
    ) -> Recipe:
        """Validates a recipe mapping (as read from YAML) and returns a [`Recipe`].

        Args:
            data (`dict`):
                The recipe mapping.
            base_dir (`str` or `os.PathLike`, *optional*):
                Folder relative paths are resolved against (defaults to the current directory).
            source (`str`, *optional*):
                The file name used in error messages.

        Returns:
            [`Recipe`]: the validated recipe, local paths made absolute.

        Raises:
            [`RecipeError`]: listing every problem with its key path.

        Example:

        ```python
        >>> from hf_soups.recipe_file import Recipe
        >>> Recipe.from_dict({"method": "uniform", "ingredients": ["org/a", "org/b"]}).method
        'uniform'
        ```
        """
        ctx = {"base_dir": Path(base_dir) if base_dir is not None else Path.cwd()}
        problems: list[str] = []
        recipe = _parse_recipe(data, problems, ctx)
        if problems:
            prefix = f"{source}: " if source else ""
            raise RecipeError(
                f"{prefix}invalid recipe: " + "; ".join(problems),
                problems=problems,
                path=source,
            )
        assert recipe is not None
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a plain mapping, ready for `yaml.safe_dump` (keys left unset are omitted)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                continue
            value = getattr(self, f.name)
            if value is None or (f.name == "ingredients" and not value):
                continue
            if f.name == "ingredients":
                value = [_spec_to_dict(s) for s in value]
            elif f.name == "base_model":
                value = _spec_to_dict(value)
            elif f.name == "eval":
                value = {k: _spec_to_dict(v) for k, v in value.items()}
            out[f.name] = value
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
                be imported.

        Example:

        ```python
        >>> from hf_soups import merge_models
        >>> from hf_soups.recipe_file import load_recipe
        >>> soup = merge_models(**load_recipe("soup_recipe.yaml").to_merge_kwargs())  # doctest: +SKIP
        ```
        """
        kwargs: dict[str, Any] = {"models": [self._ingredient_arg(spec) for spec in self.ingredients]}
        if self.ingredients_dir() is not None:
            kwargs["models"] = self.ingredients[
                0
            ].model  # merge_models expands the folder into its ingredients
        kwargs["method"] = self.method
        weights = [spec.weight for spec in self.ingredients]
        if any(w is not None for w in weights):
            kwargs["weights"] = [1.0 if w is None else w for w in weights]
        if self.base_model is not None:
            kwargs["base_model"] = self.base_model.reference()
        simple = (
            "alpha",
            "metric_key",
            "greater_is_better",
            "select_on",
            "batch_size",
            "device",
            "scores",
            "strict",
            "ensemble_baseline",
            "adapter_output",
            "rank",
            "dtype",
            "max_shard_size",
            "output_dir",
            "push_to_hub",
            "private",
            "revision",
            "cache_dir",
        )
        for key in simple:
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = value
        if self.metric is not None:
            kwargs["metric"] = (self.metric, self.metric_config) if self.metric_config else self.metric
        if self.eval:
            text_columns, label_column = self._columns()
            if text_columns is not None:
                kwargs["text_columns"] = text_columns
            if label_column is not None:
                kwargs["label_column"] = label_column
            if load_data:
                sets = {name: self._load_eval_set(name, spec) for name, spec in self.eval.items()}
                kwargs["eval_dataset"] = next(iter(sets.values())) if self._single_eval else sets
        else:
            if self.text_columns is not None:
                kwargs["text_columns"] = self.text_columns
            if self.label_column is not None:
                kwargs["label_column"] = self.label_column
        if load_data and self.compute_metrics:
            kwargs["compute_metrics"] = _import_callable(self.compute_metrics)
        if load_data and self.tokenizer:
            from transformers import AutoTokenizer

            kwargs["tokenizer"] = AutoTokenizer.from_pretrained(self.tokenizer)
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
        from .ingredients import INGREDIENTS_MANIFEST

        return spec.model if (Path(spec.model) / INGREDIENTS_MANIFEST).is_file() else None

    def _ingredient_arg(self, spec: IngredientSpec) -> Any:
        if spec.name is None:
            return spec.reference()
        from .ingredients import Ingredient

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
        where = "eval" if self._single_eval else f"eval.{name}"
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
        """Whether cooking this recipe evaluates (greedy, or a WiSE-FT sweep over several alphas)."""
        return self.method == "greedy" or isinstance(self.alpha, list)


def _spec_to_dict(spec: Any) -> dict[str, Any]:
    return {
        f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if getattr(spec, f.name) is not None
    }


def _parse_fields(cls, data: dict, where: str, problems: list[str], ctx: dict, *, skip=()) -> dict[str, Any]:
    """Checks the keys of `data` against the dataclass `cls`; returns the checked values of simple fields."""
    names = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            if ctx.get("newer_format"):
                logger.warning(
                    "Ignoring key %r: written by a newer hf_soups (format %s).", path, ctx["newer_format"]
                )
                continue
            close = difflib.get_close_matches(
                str(key).replace("-", "_").lower(), list(names), n=1, cutoff=0.7
            )
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(names)}"
            problems.append(f"{path}: unknown key{hint}")
            continue
        if key in skip:
            continue
        if value is None:
            out[key] = None
            continue
        out[key] = names[key].metadata["check"](value, path, problems, ctx)
    return out


def _parse_ingredient(value: Any, where: str, problems: list[str], ctx: dict) -> IngredientSpec | None:
    if isinstance(value, str):
        value = {"model": value}
    if not isinstance(value, dict):
        problems.append(
            f"{where}: expected a model id/path or a mapping with 'model', got {_describe(value)}"
        )
        return None
    fields_ = _parse_fields(IngredientSpec, value, where, problems, ctx)
    spec = IngredientSpec(**fields_)
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


def _parse_eval_set(value: Any, where: str, problems: list[str], ctx: dict) -> EvalSetSpec | None:
    if isinstance(value, str):
        value = {"data": value}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a data path or a mapping with 'data', got {_describe(value)}")
        return None
    spec = EvalSetSpec(**_parse_fields(EvalSetSpec, value, where, problems, ctx))
    if "data" not in value or value["data"] is None:
        problems.append(f"{where}.data: missing (a data file or a saved dataset folder)")
    return spec


def _parse_recipe(data: Any, problems: list[str], ctx: dict) -> Recipe | None:
    if not isinstance(data, dict):
        problems.append(f"<top level>: expected a mapping of recipe keys, got {_describe(data)}")
        return None
    version = data.get("format_version", FORMAT_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        ctx["newer_format"] = version
        logger.warning(
            "This recipe uses format version %s, newer than this hf_soups reads (%s): unknown keys are ignored. "
            "Upgrade hf_soups to use them.",
            version,
            FORMAT_VERSION,
        )
    values = _parse_fields(Recipe, data, "", problems, ctx, skip=("ingredients", "base_model", "eval"))
    recipe = Recipe(**{k: v for k, v in values.items() if v is not None})

    ingredients = data.get("ingredients")
    if isinstance(ingredients, str):  # one folder of ingredients collected by SoupTrainerCallback
        ingredients = [ingredients]
    if ingredients is None:
        problems.append("ingredients: missing (a list of models to soup)")
    elif not isinstance(ingredients, list) or not ingredients:
        problems.append(f"ingredients: expected a non-empty list of models, got {_describe(ingredients)}")
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
            recipe._single_eval = True
        elif isinstance(raw_eval, dict) and raw_eval:
            recipe.eval = {}
            for name, value in raw_eval.items():
                spec = _parse_eval_set(value, f"eval.{name}", problems, ctx)
                if spec is not None:
                    recipe.eval[str(name)] = spec
        else:
            problems.append(
                "eval: expected a data path, a mapping with 'data', or named sets ({validation: {data: ...}}), "
                f"got {_describe(raw_eval)}"
            )

    _check_consistency(recipe, data, problems)
    return recipe


def _check_consistency(recipe: Recipe, data: dict, problems: list[str]) -> None:
    """Checks across keys, so that a recipe that cannot cook fails before anything is downloaded."""
    method = recipe.method
    has_weights = any(s.weight is not None for s in recipe.ingredients)
    if has_weights and method == "greedy":
        idx = next(i for i, s in enumerate(recipe.ingredients) if s.weight is not None)
        problems.append(
            f"ingredients[{idx}].weight: greedy soups choose their ingredients; remove the weights"
        )
    if method == "wise-ft":
        if recipe.base_model is None and "base_model" not in data:
            problems.append("base_model: missing; wise-ft interpolates from a base (zero-shot) model")
    elif recipe.alpha is not None:
        problems.append(f"alpha: only wise-ft takes alpha, not {method!r}")
    if isinstance(recipe.alpha, (int, float)) or isinstance(recipe.alpha, list):
        alphas = recipe.alpha if isinstance(recipe.alpha, list) else [recipe.alpha]
        for i, a in enumerate(alphas):
            if a is not None and not 0.0 <= a <= 1.0:
                key = f"alpha[{i}]" if isinstance(recipe.alpha, list) else "alpha"
                problems.append(f"{key}: expected a value in [0, 1], got {a!r}")
    if recipe.needs_eval() and not recipe.eval and not recipe.scores and not recipe.compute_metrics:
        what = "greedy soups evaluate" if method == "greedy" else "an alpha sweep is chosen"
        problems.append(
            f"eval: missing; {what} on held-out data (add eval: {{data: ..., label_column: ...}})"
        )
    if recipe.select_on is not None and recipe.eval and recipe.select_on not in recipe.eval:
        problems.append(
            f"select_on: {recipe.select_on!r} is not an eval set; expected one of {', '.join(recipe.eval)}"
        )
    if recipe.strict is not None and method != "greedy":
        problems.append(f"strict: only greedy soups take strict, not {method!r}")
    if recipe.rank is not None and recipe.adapter_output not in (None, "adapter"):
        problems.append("rank: applies to adapter_output: adapter only")
    names = [s.name for s in recipe.ingredients if s.name]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"ingredients: duplicate name(s) {', '.join(map(repr, dupes))}")
    if recipe.metric_config is not None and recipe.metric is None:
        problems.append("metric_config: set metric too")


def _import_callable(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(f"compute_metrics: cannot import {spec!r}: {exc}") from exc
    if not callable(obj):
        raise RecipeError(f"compute_metrics: {spec!r} is not callable")
    return obj


# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Reads and validates a YAML recipe file.

    Args:
        path (`str` or `os.PathLike`):
            The recipe file, or a soup folder holding a `soup_recipe.yaml`.

    Returns:
        [`Recipe`]: the validated recipe (relative paths resolved against the file's folder).

    Raises:
        [`RecipeError`]: the file is missing, is not valid YAML, or has unknown keys, wrong types or
            inconsistent options (every problem is listed with its key path).

    Example:

    ```python
    >>> from hf_soups.recipe_file import load_recipe
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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}", path=str(path)) from exc
    recipe = Recipe.from_dict(data, base_dir=path.resolve().parent, source=str(path))
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

_ACTIVE_RECIPE: contextvars.ContextVar[Recipe | None] = contextvars.ContextVar(
    "hf_soups_active_recipe", default=None
)


@contextlib.contextmanager
def active_recipe(recipe: Recipe) -> Iterator[Recipe]:
    """While active, soups written to disk record this recipe's eval data, metric and tokenizer."""
    token = _ACTIVE_RECIPE.set(recipe)
    try:
        yield recipe
    finally:
        _ACTIVE_RECIPE.reset(token)


def cook(recipe: Recipe | str | os.PathLike, **overrides: Any) -> Soup:
    """Cooks a recipe: `merge_models(**recipe.to_merge_kwargs(), **overrides)`.

    The soup written to disk carries this recipe (with resolved revisions) as `soup_recipe.yaml`.

    Args:
        recipe ([`Recipe`], `str` or `os.PathLike`):
            A recipe, or the path of a recipe file.
        **overrides:
            `merge_models` keyword arguments that replace the recipe's (`output_dir`, `push_to_hub`, `progress`...).

    Returns:
        [`Soup`]: the soup.

    Example:

    ```python
    >>> from hf_soups.recipe_file import cook
    >>> soup = cook("recipe.yaml", output_dir="my-soup")  # doctest: +SKIP
    ```
    """
    from .api import merge_models

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    kwargs = recipe.to_merge_kwargs()
    kwargs.update(overrides)
    with active_recipe(recipe):
        soup = merge_models(**kwargs)
    # later saves (soup.save_pretrained, soup.push_to_hub) record this recipe's eval data and metric too
    soup._source_recipe = recipe  # type: ignore[attr-defined]
    return soup


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


def recipe_from_soup(soup: Soup) -> dict[str, Any]:
    """The recipe that re-cooks `soup`, as a mapping (what `soup_recipe.yaml` holds).

    Ingredients are recorded with their resolved revisions (commit hashes) and local folders by absolute
    path. When the soup was cooked from a recipe file ([`cook`], `hf-soups cook` / `merge`), its eval data,
    metric and tokenizer are recorded by path too, and the recipe re-runs the selection. Otherwise the eval
    data (an in-memory `Dataset`) cannot be recorded: the recipe then freezes the outcome (greedy: a uniform
    soup of the kept ingredients; WiSE-FT sweep: the chosen alpha), which cooks the same tensors without
    evaluating, and says so in `notes`.

    Args:
        soup ([`Soup`]):
            A cooked soup.

    Returns:
        `dict`: the recipe mapping (see [`Recipe`] for the keys).
    """
    from . import __version__

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
    selection_needs_eval = method == "greedy" or (sweep is not None and len(sweep) > 1)
    can_replay = source is not None and bool(source.eval)
    frozen = selection_needs_eval and not can_replay
    if frozen and method == "greedy":
        kept = [ing for ing in ingredients if ing.selected]
        notes.append(
            f"Greedy soup frozen: the held-out data was an in-memory dataset, so this recipe records the "
            f"{len(kept)} kept ingredient(s) of {len(ingredients)} as a uniform soup (same tensors)."
        )
        out["method"] = "uniform"
        ingredients = kept
    weights = None if (frozen and method == "greedy") else _recorded_weights(soup, params, source)
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

    if not frozen and source is not None:
        src = source.to_dict()
        for key in (
            "eval",
            "metric",
            "metric_config",
            "metric_key",
            "greater_is_better",
            "select_on",
            "compute_metrics",
            "tokenizer",
            "text_columns",
            "label_column",
            "batch_size",
            "scores",
            "ensemble_baseline",
        ):
            if key in src:
                out[key] = src[key]
    elif not frozen and selection_needs_eval is False and source is None:
        pass
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
    if notes:
        out["notes"] = notes
    result = _result_section(soup)
    if result:
        out["result"] = result
    return out


def _recorded_weights(soup: Any, params: dict, source: Recipe | None) -> list[float] | None:
    """The per-ingredient weights to record (None for an unweighted soup).

    The weights of the recipe that cooked the soup are recorded as written (the same input re-cooks the
    same tensors); otherwise the normalised coefficients, which normalise to themselves.
    """
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
    if getattr(soup, "metric_name", None):
        result["metric"] = soup.metric_name
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


def write_recipe(soup: Soup, directory: str | os.PathLike) -> Path:
    """Writes `soup_recipe.yaml` into `directory`: the recipe that re-cooks `soup` (see [`recipe_from_soup`]).

    Called by `Soup.save_pretrained` before the soup folder is moved into place, so every soup on disk carries
    its recipe.

    Args:
        soup ([`Soup`]):
            A cooked soup.
        directory (`str` or `os.PathLike`):
            The folder to write into (created if missing).

    Returns:
        `Path`: the file written.

    Example:

    ```python
    >>> from hf_soups.recipe_file import write_recipe
    >>> write_recipe(soup, "my-soup")  # doctest: +SKIP
    PosixPath('my-soup/soup_recipe.yaml')
    ```
    """
    import yaml

    data = recipe_from_soup(soup)
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
    "Recipe",
    "RecipeError",
    "active_recipe",
    "cook",
    "load_eval_data",
    "load_recipe",
    "recipe_from_soup",
    "write_recipe",
]
