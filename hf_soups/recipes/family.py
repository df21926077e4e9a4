"""What the task-vector family (task arithmetic, TIES, DARE, SLERP, Model Stock) shares: parameters and the sweep.

Each method lives in its own module and registers itself; this module holds their parameter classes (one
declaration of `weights`, `scaling`, `density`, `seed` and `t` for every method that takes them) and
[`cook_family`], which cooks one setting, or scores every setting of the knobs given as lists on the eval data and
serves the best one on `select_on`, as WiSE-FT's alpha sweep does: one live model, each candidate streamed into it
in place, the curve recorded in `Soup.history` as `{knob: value, ..., "score": s, "scores": {set: {metric: v}}}`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError, InvalidArgumentError
from ..options import option
from .base import RecipeParams

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..merge_ops import TensorRecipe
    from ..soup import Soup

logger = logging.getLogger(__name__)

FAMILY_METHODS = frozenset({"task-arithmetic", "ties", "dare-linear", "dare-ties", "slerp", "model-stock"})
"""The recipes cooked by [`cook_family`] (their parameters are recorded in recipe files by name)."""

KNOBS = ("weights", "scaling", "density", "t")
"""The continuous knobs: a list of values (for `weights`, a list of weight lists) is a sweep."""


@dataclass
class TaskVectorParams(RecipeParams):
    """Parameters of task arithmetic (and the base of TIES's and DARE's)."""

    weights: list[float] | list[list[float]] | None = option(
        help="Weight of each ingredient's task vector, used as given (default 1 each); a list of weight lists is a "
        "sweep chosen on the eval data (CLI: repeat --weights; recipe files: `weight:` per ingredient, a list per "
        "ingredient for a sweep).",
        kind="weights_or_sweep",
        file=False,
        cli={"nargs": "+", "type": float, "metavar": "W", "action": "append"},
    )
    scaling: float | list[float] | None = option(
        help="lambda, the factor on the merged task vector (default 1); a list is a sweep chosen on the eval data.",
        kind="scaling",
        cli={"nargs": "+", "type": float, "metavar": "LAMBDA"},
    )


@dataclass
class TiesParams(TaskVectorParams):
    """Parameters of TIES."""

    density: float | list[float] | None = option(
        help="TIES / DARE: fraction of each task vector kept per tensor, in (0, 1]; a list is a sweep chosen on "
        "the eval data.",
        kind="density",
        cli={"nargs": "+", "type": float, "metavar": "D"},
    )


@dataclass
class DareParams(TiesParams):
    """Parameters of DARE (linear and TIES forms)."""

    seed: int | None = option(
        help="DARE: seed of the random drop (required; the soup is reproducible bit for bit from it). learned: seed of "
        "the validation split and the batch order (default 0).",
        kind="seed",
        cli={"type": int},
    )


@dataclass
class SlerpParams(RecipeParams):
    """Parameters of SLERP."""

    t: float | list[float] | None = option(
        help="SLERP: interpolation in [0, 1] (0 = first ingredient, 1 = second); a list is a sweep chosen on the "
        "eval data.",
        kind="alpha",
        cli={"nargs": "+", "type": float, "metavar": "T"},
    )


def is_sweep(name: str, value: Any) -> bool:
    """Whether the knob `name` holds several values to choose from."""
    if value is None or not isinstance(value, list):
        return False
    if name == "weights":
        return bool(value) and isinstance(value[0], list) and len(value) > 1
    return len(value) > 1


def _values(name: str, value: Any) -> list[Any]:
    if name == "weights":
        if value and isinstance(value[0], list):
            return list(value)
        return [value]
    return list(value) if isinstance(value, list) else [value]


def check_family(
    method: str,
    options: dict[str, Any],
    *,
    needs_base: bool = True,
    required: Sequence[str] = (),
    min_ingredients: int = 1,
    max_ingredients: int | None = None,
    linear: bool = False,
) -> None:
    """The checks across options of a family method, before any download (each value passed its own check)."""
    if needs_base and options.get("base_model") is None:
        raise InvalidArgumentError(
            f"base_model: method={method!r} needs base_model= (the pre-trained model the fine-tunes started from: "
            "task vectors are theta_i - base)."
        )
    for name in required:
        if options.get(name) is None:
            hint = "an integer such as seed=0" if name == "seed" else "a value, or a list to sweep"
            raise InvalidArgumentError(f"{name}: method={method!r} needs {name}= ({hint}).")
    n = options.get("n_ingredients")
    if n is not None and (n < min_ingredients or (max_ingredients is not None and n > max_ingredients)):
        want = (
            f"exactly {min_ingredients}"
            if min_ingredients == max_ingredients
            else f"at least {min_ingredients}"
        )
        raise InvalidArgumentError(f"models: method={method!r} takes {want} ingredients, got {n}.")
    swept = [k for k in KNOBS if is_sweep(k, options.get(k))]
    if swept and not options.get("has_eval"):
        raise InvalidArgumentError(
            f"{swept[0]}: {swept[0]}={options[swept[0]]} is a sweep, which needs eval_dataset= to choose the best "
            f"value; pass an eval set or a single value."
        )
    if not linear and options.get("adapter_output") == "adapter":
        if not needs_base:
            raise InvalidArgumentError(
                f"adapter_output: method={method!r} interpolates the weights themselves, not their changes, so its "
                "soup has no adapter form; use adapter_output='merged' (see docs/methods.md)."
            )
        if options.get("rank") is None:
            raise InvalidArgumentError(
                f"rank: method={method!r} is not linear in the adapters' weights, so its adapter form is a truncated "
                "SVD of each module's merged change: pass rank= (the error per module is in the report), or use "
                "adapter_output='merged' for the exact soup (see docs/methods.md)."
            )


def settings(options: dict[str, Any], knobs: Sequence[str]) -> list[dict[str, Any]]:
    """Every combination of the knobs' values (a single value is a one-point sweep), in the given order."""
    names = [k for k in knobs if options.get(k) is not None]
    grids = [_values(k, options[k]) for k in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*grids)]


def cook_family(
    kitchen: Kitchen,
    method: str,
    knobs: Sequence[str],
    build: Callable[[dict[str, Any]], Sequence[float] | TensorRecipe],
    fixed: dict[str, Any] | None = None,
) -> Soup:
    """Cook `method` at one setting of its knobs, or sweep them on the eval data and serve the best setting.

    Args:
        kitchen ([`Kitchen`]): the ingredients (and base), the options and the evaluator.
        method (`str`): the recipe name recorded on the soup.
        knobs (`Sequence[str]`): the method's continuous knobs (a subset of [`KNOBS`]).
        build (`Callable`): one setting `{knob: value}` -> linear coefficients (per member) or a
            [`~hf_soups.merge_ops.TensorRecipe`].
        fixed (`dict`, *optional*): parameters recorded as they are (DARE's seed).

    Returns:
        [`Soup`]: `params` holds the chosen setting (and `sweep`: every knob's values when several were tried),
        `history` one point per setting.

    Raises:
        [`EvaluationError`]: a sweep without an eval set.
    """
    points = settings(kitchen.options, knobs)
    fixed = dict(fixed or {})
    for member in kitchen.ingredients:
        member.ingredient.selected = True
    if len(points) == 1:
        return kitchen.serve(build(points[0]), method=method, params={**points[0], **fixed})
    evaluator = kitchen.evaluator
    if evaluator is None:
        raise EvaluationError(
            f"A sweep of {method} needs an eval set to choose its knobs: pass eval_dataset=."
        )
    live = kitchen.new_live_model()
    history: list[dict[str, Any]] = []
    best_index = None
    for i, point in enumerate(points):
        scores = kitchen.evaluate_soup(live, build(point))
        score = evaluator.primary(scores)
        history.append({**point, "score": score, "scores": scores})
        if best_index is None or evaluator.better(score, history[best_index]["score"], strict=True):
            best_index = i
        logger.info(
            "%s sweep: %s -> %s %.4f on %s", method, point, evaluator.metric_key, score, evaluator.select_on
        )
    best = history[best_index]
    for point in history:
        point["selected"] = point is best
    if best_index != len(points) - 1:
        kitchen.load_into(live, build(points[best_index]))
    sweep = {k: _values(k, kitchen.options[k]) for k in points[0] if is_sweep(k, kitchen.options.get(k))}
    soup = kitchen.serve(
        build(points[best_index]),
        method=method,
        params={**points[best_index], **fixed, "sweep": sweep},
        history=history,
        score=best["score"],
        scores=best["scores"],
        model=live,
    )
    return soup
