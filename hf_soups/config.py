"""One typed configuration: every option of a soup, declared once.

[`SoupConfig`] (what to cook and where it goes), [`EvalConfig`] (the held-out evaluation) and the parameters each
recipe declares where it is registered ([`UniformParams`], [`WiseFTParams`], `GreedyParams` in
`recipes/greedy.py`) are dataclasses whose fields (type, default, help, check) are the only declaration of each
option. [`merge_models`] builds a [`SoupConfig`] from its keyword arguments; `hf-soups merge` derives its flags
from the same fields, recipe files derive their keys from them, and [`SoupTrainerCallback`] checks its options
against them. Every value is checked in [`SoupConfig.__post_init__`], the same way whatever the entry point, and
every problem is reported at once as an [`InvalidArgumentError`] naming the option.

Adding an option: add a field to [`SoupConfig`] or [`EvalConfig`] (and the keyword to `merge_models`). Adding a
recipe parameter: add a field to the recipe's params class (`register_recipe(..., params=...)`). Nothing else
lists options.

```python
>>> from hf_soups.config import SoupConfig
>>> config = SoupConfig.from_options({"method": "wise-ft", "alpha": 0.5, "base_model": "org/base", "dtype": "bf16"})
>>> config.params.alpha, config.dtype
(0.5, 'bfloat16')
>>> SoupConfig.from_options({"method": "uniform", "alpha": 0.5})
Traceback (most recent call last):
...
hf_soups.errors.InvalidArgumentError: alpha: only wise-ft takes alpha, not 'uniform'; drop it, or use method='wise-ft'

```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgumentError
from .lm_eval_task import LMEvalTask
from .options import OptionProblem, check_value, describe, did_you_mean, option, option_fields
from .recipes import RecipeParams, all_recipes, get_recipe
from .recipes.uniform import UniformParams


@dataclass
class EvalConfig:
    """Held-out evaluation: the data, the metric and how to run it (greedy soups, sweeps, reporting)."""

    eval_dataset: Any = option(
        help="Held-out data: a datasets.Dataset, or a dict of named sets (recipe files: `eval:` with data paths).",
        file=False,
        cli=False,
    )
    metric: Any = option(
        None,
        help="evaluate metric name (accuracy, f1, ...), (name, config), a loaded module or a callable (default: "
        "perplexity for causal and masked language models, accuracy for other models); a local "
        "metric script folder runs code and needs trust_remote_code. An lm-eval task: LMEvalTask(...), "
        "'lm-eval:TASK?metric=acc&include_path=DIR', or in recipe files {lm_eval: TASK, ...}.",
        kind="metric",
        file="metric",
    )
    metric_key: str | None = option(help="Which value of the metric's result to maximise.", kind="str")
    greater_is_better: bool | None = option(
        help="Whether a higher metric value is better (False for losses).",
        kind="bool",
        cli={
            "flag": "--lower-is-better",
            "action": "store_const",
            "const": False,
            "help": "The metric is a loss (greater_is_better=False).",
        },
    )
    select_on: str | None = option(
        help="Name of the eval set that drives the choices when several are given.", kind="str"
    )
    compute_metrics: Callable[..., dict[str, float]] | None = option(
        help="Trainer-style compute_metrics(EvalPrediction) -> dict (recipe files and flags: 'package.module:function', "
        "which imports code and needs trust_remote_code).",
        kind="callable",
        file="import_string",
        cli={"metavar": "MODULE:FUNCTION"},
    )
    tokenizer: Any = option(
        help="Tokenizer for raw-text eval sets (default: the reference ingredient's), or its id/folder.",
        file="name_or_path",
    )
    text_columns: str | list[str] | None = option(
        help="Text column(s) of raw eval sets (two for sentence pairs).",
        kind="columns",
        cli={"flag": "--text-column", "nargs": "+", "metavar": "COLUMN"},
    )
    label_column: str | None = option(
        help="Label column of the eval sets (default: label/labels).", kind="str"
    )
    image_processor: Any = option(
        help="Image processor for eval sets with an image column (default: the reference ingredient's "
        "preprocessor_config.json), or its id/folder.",
        file="name_or_path",
    )
    class_names: list[str] | None = option(
        help="Zero-shot classification (CLIP-family models): the class names, in label order (default: the names "
        "of the label column's ClassLabel).",
        kind="class_names",
        cli={"nargs": "+", "metavar": "NAME"},
    )
    templates: str | list[str] | None = option(
        help="Zero-shot classification: prompt templates with one '{}' for the class name, averaged per class "
        "(default: 'a photo of a {}.').",
        kind="templates",
        cli={"nargs": "+", "metavar": "TEMPLATE"},
    )
    batch_size: int = option(32, help="Evaluation batch size.", kind="positive_int", cli={"type": int})
    device: str | None = option(help="Evaluation device (cpu, cuda, cuda:1, mps; default: CPU).", kind="str")
    sort_by_length: bool = option(
        True,
        help="Batch each eval set's examples longest first, so that a batch holds examples of similar length and "
        "little padding; predictions and scores come back in the set's own order.",
        kind="bool",
        cli={
            "flag": "--no-sort-by-length",
            "action": "store_const",
            "const": False,
            "help": "Batch eval examples in the set's own order (sort_by_length=False).",
        },
    )
    eval_dtype: Any = option(
        help="dtype the live model is evaluated in: float32, bfloat16, float16 or float64 (default 'auto': the "
        "ingredients' own, as from_pretrained loads them). Scores are then those of the soup in this dtype.",
        kind="dtype",
    )
    autocast: str | None = option(
        help="Run forward passes under torch.autocast in bfloat16 or float16 (mixed precision; weights stay in "
        "eval_dtype). Default: no autocast.",
        kind="autocast",
    )
    prediction_cache_dir: Any = option(
        help="Opt-in folder where ingredients' predictions are kept, keyed by their weights (commit or content "
        "hash), the eval set, the task and the metric, so that cooking again (another recipe) does not re-score them.",
        kind="path",
        file=False,
        cli={"metavar": "DIR"},
    )


@dataclass
class SoupConfig:
    """What to cook, from what, and where it goes: every option of [`merge_models`] but `models`.

    Build it with [`SoupConfig.from_options`] (flat keyword options, as `merge_models` takes them); the evaluation
    options land in `eval` and the recipe's parameters in `params` (an instance of the recipe's params class).

    Raises:
        [`InvalidArgumentError`]: every invalid or inapplicable option at once, each named (`.problems` lists them).
    """

    method: str | list[str] = option(
        "uniform",
        help="The recipe: uniform, greedy, wise-ft, task-arithmetic, ties, dare-linear, dare-ties, slerp, "
        "model-stock, learned. Several (a list) are each cooked and scored on the eval data, and the best on select_on is "
        "kept, with all of them reported side by side.",
        kind="method",
        cli={"short": "-m", "nargs": "+", "metavar": "METHOD"},
    )
    base_model: Any = option(
        help="WiSE-FT: the zero-shot / pre-trained end. Adapters: their base model.", file="ingredient"
    )
    adapter_output: str = option(
        "merged",
        help="Adapter soups: a merged full model, or one LoRA adapter ('merged' | 'adapter').",
        kind="choice",
        choices=("merged", "adapter"),
    )
    rank: int | None = option(
        help="Adapter form: truncated SVD rank (needs adapter_output='adapter').",
        kind="positive_int",
        cli={"type": int},
    )
    output_dir: Any = option(
        help="Folder the soup is streamed to as sharded safetensors (atomically).",
        kind="path",
        file="output_path",
        cli={"short": "-o", "group": "output"},
    )
    dtype: Any = option(
        help="Output dtype: float32, float16, bfloat16 or float64 (default: the first ingredient's).",
        kind="dtype",
    )
    max_shard_size: int | str = option(
        "50GB", help="Largest safetensors shard: '5GB', '500MiB' or a number of bytes.", kind="size"
    )
    push_to_hub: str | None = option(
        help="Hub repository the soup is pushed to, with its model card.",
        kind="repo_id",
        cli={"metavar": "REPO_ID", "group": "output"},
    )
    private: bool | None = option(
        help="Create the Hub repository as private.",
        kind="bool",
        cli={"action": "store_true", "group": "output"},
    )
    token: str | bool | None = option(
        help="Hub token (default: HF_TOKEN or the stored login).",
        kind="token",
        file=False,
        cli={"group": "hub"},
    )
    cache_dir: Any = option(
        help="Hugging Face cache folder (default: HF_HUB_CACHE).",
        kind="path",
        file="output_path",
        cli={"group": "hub"},
    )
    revision: str | None = option(
        help="Revision for Hub models given without @revision.", kind="str", cli={"group": "hub"}
    )
    progress: bool = option(
        True,
        help="Progress bars (also off with HF_HUB_DISABLE_PROGRESS_BARS=1).",
        kind="bool",
        file=False,
        cli=False,
    )
    trust_remote_code: bool = option(
        False,
        help="Allow code named by a recipe file or a flag to run: local or Hub metric scripts, compute_metrics "
        "imports. Never read from a recipe file itself.",
        kind="bool",
        file=False,
        cli={"action": "store_true", "group": "safety"},
    )
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"internal": True})
    params: RecipeParams = field(default_factory=UniformParams, metadata={"internal": True})
    compared: dict[str, RecipeParams] | None = field(default=None, metadata={"internal": True})
    """When `method` is a list: each method's own parameters (those of the given options it declares)."""
    n_models: int | None = field(default=None, metadata={"internal": True})
    """How many ingredients the options are for (checks the number of weights), when known."""
    has_eval: bool | None = field(default=None, metadata={"internal": True})
    """Whether held-out data is given (defaults to `eval.eval_dataset is not None`)."""
    file_checks: Mapping[str, Callable] | None = field(default=None, repr=False, metadata={"internal": True})
    """Set when the options come from a recipe file: each option is checked with its file kind, by these checks
    (paths resolved against the file's folder, code-running values gated)."""
    _skip_cross_checks: bool = field(default=False, repr=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        problems: list[str] = []
        for obj in (self, self.eval, self.params, *(self.compared or {}).values()):
            for f in option_fields(type(obj)):
                setattr(obj, f.name, _checked(obj, f, problems, self.file_checks))
        if not problems and not self._skip_cross_checks:
            problems.extend(self._cross_problems())
        if problems:
            raise config_error(problems)

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_options(
        cls,
        options: Mapping[str, Any],
        *,
        n_models: int | None = None,
        has_eval: bool | None = None,
        file_checks: Mapping[str, Callable] | None = None,
        cross_checks: bool = True,
    ) -> SoupConfig:
        """Build and check a configuration from flat options (the keyword arguments of `merge_models`).

        Args:
            options (`Mapping[str, Any]`): option name -> value; `None` means "not set".
            n_models (`int`, *optional*): the number of ingredients, to check per-ingredient options.
            has_eval (`bool`, *optional*): whether held-out data is given (recipe files give it by path).
            file_checks (`Mapping`, *optional*): the options come from a recipe file: check each with its file
                kind, by these checks (see [`SoupConfig.file_checks`]).
            cross_checks (`bool`, *optional*, defaults to `True`): also run the checks across options (the method's
                own `check`); `False` checks each value alone (options given in parts, as the callback does).

        Raises:
            [`InvalidArgumentError`]: unknown keys (with "did you mean"), invalid values, options the method does
                not take; all at once.
        """
        problems: list[str] = []
        options = dict(options)
        method_value = options.pop("method", None)
        method = "uniform" if method_value is None else method_value
        recipe = None
        try:
            method = check_method(method)
            recipe = get_recipe(method if isinstance(method, str) else method[0])
        except OptionProblem as e:
            problems.append(f"method: {e}")
        own = {f.name for f in option_fields(cls)}
        evals = {f.name for f in option_fields(EvalConfig)}
        # the methods cooked (several when `method` is a list) and the parameters each declares
        methods = method if isinstance(method, list) else [method] if recipe is not None else []
        declared = {m: {f.name for f in option_fields(get_recipe(m).params)} for m in methods}
        mine = set().union(*declared.values()) if declared else set()
        others = recipe_parameter_owners()
        known = own | evals | set(others)
        top, ev, params = {}, {}, {}
        for key, value in options.items():
            if key in own:
                top[key] = value
            elif key in evals:
                ev[key] = value
            elif key in mine:
                params[key] = value
            elif key in others:
                if value is not None and value != others[key][1] and methods:
                    takers = others[key][0]
                    verb = "takes" if len(takers) == 1 else "take"
                    what = repr(method) if len(methods) == 1 else f"any of {', '.join(methods)}"
                    problems.append(
                        f"{key}: only {_and(takers)} {verb} {key}, not {what}; drop it, or use "
                        f"method={takers[0]!r}"
                    )
            else:
                problems.append(f"{key}: unknown option{did_you_mean(key, known)}")
        top = {k: v for k, v in top.items() if v is not None}
        ev = {k: v for k, v in ev.items() if v is not None}
        params = {k: v for k, v in params.items() if v is not None}
        compared = None
        if len(methods) > 1:
            compared = {
                m: get_recipe(m).params(**{k: v for k, v in params.items() if k in declared[m]})
                for m in methods
            }
            params_cls, params = RecipeParams, {}
        else:
            params_cls = recipe.params if recipe is not None else RecipeParams
        try:
            config = cls(
                method=method if recipe is not None else "uniform",
                eval=EvalConfig(**ev),
                params=params_cls(**params),
                compared=compared,
                n_models=n_models,
                has_eval=has_eval,
                file_checks=file_checks,
                _skip_cross_checks=bool(problems) or not cross_checks,
                **top,
            )
        except InvalidArgumentError as e:  # every problem at once: the unknown keys and the invalid values
            raise config_error(problems + list(getattr(e, "problems", [str(e)]))) from None
        if problems:
            raise config_error(problems)
        return config

    @property
    def methods(self) -> list[str]:
        """The methods cooked: `[method]`, or the list of methods compared."""
        return list(self.method) if isinstance(self.method, list) else [self.method]

    def method_params(self, method: str | None = None) -> RecipeParams:
        """The parameters of `method` (one of [`methods`]; default: the only one)."""
        if self.compared is None or method is None:
            return self.params
        return self.compared[method]

    def _params_values(self, method: str | None = None) -> dict[str, Any]:
        """name -> value of the parameters of `method`; with `None` and a list of methods, all of them."""
        if method is None and self.compared is not None:
            out: dict[str, Any] = {}
            for m in self.methods:
                for name, value in self._params_values(m).items():
                    if out.get(name) is None:
                        out[name] = value
            return out
        params = self.method_params(method)
        return {f.name: getattr(params, f.name) for f in option_fields(type(params))}

    def to_options(self) -> dict[str, Any]:
        """The flat options again (what `merge_models` takes), every field included."""
        out = {f.name: getattr(self, f.name) for f in option_fields(SoupConfig)}
        out.update({f.name: getattr(self.eval, f.name) for f in option_fields(EvalConfig)})
        out.update(self._params_values())
        return out

    def recipe_options(self, method: str | None = None) -> dict[str, Any]:
        """The dict a recipe's `check` and `Kitchen.options` read (its parameters plus context).

        Args:
            method (`str`, *optional*): with a list of methods, the one whose parameters to give (default: the
                parameters of every listed method, the first value of each).
        """
        out = self._params_values(method)
        out.update(
            {
                "base_model": self.base_model,
                "adapter_output": self.adapter_output,
                "rank": self.rank,
                "has_eval": self._has_eval(),
                "n_ingredients": self.n_models,
            }
        )
        if "scores" in out:
            out["scores"] = dict(out["scores"] or {})
        return out

    def _has_eval(self) -> bool:
        if self.has_eval is not None:
            return self.has_eval
        return self.eval.eval_dataset is not None or isinstance(self.eval.metric, LMEvalTask)

    def _cross_problems(self) -> list[str]:
        """Checks across options (after every value passed its own check)."""
        problems: list[str] = []
        if self.rank is not None and self.adapter_output != "adapter":
            problems.append(
                f"rank: rank={self.rank} truncates an adapter soup written as an adapter; pass "
                "adapter_output='adapter' with it (a merged soup is exact and has no rank)"
            )
        weights = self._params_values().get("weights")
        sweep = (
            weights if weights and isinstance(weights[0], list) else [weights]
        )  # a list of weight lists: a sweep
        for w in sweep:
            if w is not None and self.n_models is not None and len(w) != self.n_models:
                problems.append(
                    f"weights: weights has {len(w)} values for {self.n_models} ingredients; give one per ingredient"
                )
                break
        if self.compared is not None and not self._has_eval():
            problems.append(
                f"method: method={self.methods} compares several methods by their held-out scores; pass "
                "eval_dataset= (a datasets.Dataset with labels, or a dict of them with select_on=), or one method"
            )
        problems.extend(lm_eval_problems(self))
        for method in self.methods:
            recipe = get_recipe(method)
            if recipe.check is not None and not problems:
                try:
                    recipe.check(self.recipe_options(method if self.compared is not None else None))
                except InvalidArgumentError as e:
                    problems.append(str(e))
        return problems


# ------------------------------------------------------------------------------------------------ helpers


def _checked(obj: Any, f: dataclasses.Field, problems: list[str], file_checks: Mapping | None) -> Any:
    """The checked value of one field (None when refused: the problem is added, named by the option)."""
    value = getattr(obj, f.name)
    if value is None or (value is f.default and isinstance(value, (str, bool, int, float))):
        return value  # unset, or the declared default
    kind = f.metadata.get("kind", "any")
    if file_checks is not None and isinstance(f.metadata.get("file"), str):
        kind = f.metadata["file"]
    try:
        if kind == "method":
            return check_method(value)
        return check_value(f, value, file_checks, kind=kind)
    except OptionProblem as e:
        problems.append(f"{f.name}{e}" if str(e).startswith("[") else f"{f.name}: {e}")
        return None


def lm_eval_problems(config: SoupConfig) -> list[str]:
    """An lm-eval task as the metric: it brings its own data, and gives a score, not the loss learned soups need."""
    task = config.eval.metric
    if not isinstance(task, LMEvalTask):
        return []
    problems = []
    if config.eval.eval_dataset is not None:
        problems.append(
            "eval_dataset: an lm-eval metric evaluates on its task's own data; drop eval_dataset (several tasks, "
            "such as a selection task and a held-out task, are several eval sets)"
        )
    if "learned" in config.methods:
        problems.append(
            "metric: method='learned' learns its coefficients on the model's loss over eval_dataset, which an lm-eval "
            "task does not give; use greedy, wise-ft or a family sweep with an lm-eval metric, or a loss metric "
            "with learned"
        )
    if config.eval.compute_metrics is not None:
        problems.append("compute_metrics: an lm-eval metric scores the model itself; drop compute_metrics")
    return problems


def check_method(value: Any) -> str | list[str]:
    """A registered recipe name (`"wise_ft"` reads as `"wise-ft"`), or a list of them (methods to compare: repeats
    dropped; a list of one is that method)."""
    names = sorted(all_recipes())
    if isinstance(value, (list, tuple)):
        if not value:
            raise OptionProblem(
                f"got an empty list; give one method, or several to compare ({', '.join(names)})"
            )
        methods: list[str] = []
        for item in value:
            key = check_method(item)
            if isinstance(key, list):
                raise OptionProblem(f"expected method names, got a nested list {describe(item)}")
            if key not in methods:
                methods.append(key)
        return methods[0] if len(methods) == 1 else methods
    if not isinstance(value, str):
        raise OptionProblem(f"expected one of {', '.join(names)}, got {value!r}")
    key = value.strip().lower().replace("_", "-")
    if key not in names:
        raise OptionProblem(
            f"Unknown method {value!r}; expected one of {', '.join(names)}{did_you_mean(key, names, list_known=False)}"
        )
    return key


def recipe_parameter_owners() -> dict[str, tuple[list[str], Any]]:
    """Every recipe parameter -> (the recipes that take it, its default)."""
    out: dict[str, tuple[list[str], Any]] = {}
    for name, recipe in sorted(all_recipes().items()):
        for f in option_fields(recipe.params):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.setdefault(f.name, ([], default))[0].append(name)
    return out


def _and(names: list[str]) -> str:
    """`"a, b and c"`."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def config_error(problems: list[str]) -> InvalidArgumentError:
    """One [`InvalidArgumentError`] listing every problem (`.problems`), each starting with the option's name."""
    error = InvalidArgumentError("; ".join(problems))
    error.problems = list(problems)  # type: ignore[attr-defined]
    return error


def option_names() -> set[str]:
    """Every option name any configuration declares (merge_models' keywords but `models`)."""
    names = {f.name for f in option_fields(SoupConfig)} | {f.name for f in option_fields(EvalConfig)}
    return names | set(recipe_parameter_owners())


def all_option_fields() -> dict[str, dataclasses.Field]:
    """name -> field, over SoupConfig, EvalConfig and every recipe's parameters (first declaration wins)."""
    out: dict[str, dataclasses.Field] = {}
    for cls in (SoupConfig, EvalConfig):
        for f in option_fields(cls):
            out.setdefault(f.name, f)
    for recipe in all_recipes().values():
        for f in option_fields(recipe.params):
            out.setdefault(f.name, f)
    return out


def check_models(models: Any) -> None:
    """`models` of `merge_models`: a non-empty list of references, or one folder (Trainer ingredients)."""
    import os

    if models is None:
        raise InvalidArgumentError(
            "models: got None; pass a list of Hub ids, folders or models (or one folder of ingredients written by "
            "SoupTrainerCallback)"
        )
    if isinstance(models, (str, os.PathLike)) or hasattr(models, "state_dict"):
        return
    from .ingredients import Ingredient

    if isinstance(models, Ingredient):
        return
    if isinstance(models, (bytes, Mapping)) or not hasattr(models, "__iter__"):
        raise InvalidArgumentError(
            f"models: expected a list of Hub ids, folders or models, got {type(models).__name__}"
        )


__all__ = [
    "EvalConfig",
    "SoupConfig",
    "all_option_fields",
    "check_models",
    "option",
    "option_names",
]
