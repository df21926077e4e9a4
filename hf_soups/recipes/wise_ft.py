"""WiSE-FT: interpolate between a zero-shot (or linear-probe) base and fine-tuned weights (Wortsman et al. 2021).

`theta = (1 - alpha) * theta_base + alpha * theta_finetuned`; with several fine-tuned ingredients, the
fine-tuned end is their (weighted) uniform soup.

A list of alphas is a sweep ([`cook_sweep`]): each point is streamed into one live model in place (no
`from_pretrained` per alpha), evaluated on every eval set, and recorded in `Soup.history` as
`{"alpha": a, "score": s, "scores": {set: {metric: value}}}`: the curve that `Soup.report()` tabulates and
`Soup.plot(path)` draws; the best alpha on the selection set is served.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError, InvalidArgumentError
from ..options import option
from .base import register_recipe
from .uniform import UniformParams, normalized_weights

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

logger = logging.getLogger(__name__)

WISE_FT_URL = "https://arxiv.org/abs/2109.01903"


@dataclass
class WiseFTParams(UniformParams):
    """Parameters of WiSE-FT (the fine-tuned end is the weighted uniform soup of the ingredients)."""

    alpha: float | list[float] | None = option(
        help="Mixing coefficient in [0, 1] (1 = fine-tuned); a list is a sweep chosen on the eval data.",
        kind="alpha",
        cli={"nargs": "+", "type": float, "metavar": "A"},
    )


def wise_ft_coefficients(alpha: float, finetuned_weights: Sequence[float]) -> list[float]:
    """Coefficients of `[*finetuned, base]` for one alpha."""
    return [alpha * w for w in finetuned_weights] + [1.0 - alpha]


def _check(options: dict[str, Any]) -> None:
    """Across options (alpha itself was checked with the options: a float in [0, 1] or a list of them)."""
    alpha = options.get("alpha")
    if alpha is None:
        raise InvalidArgumentError(
            "alpha: method='wise-ft' needs alpha= (a float in [0, 1], or a list of floats to sweep)."
        )
    if options.get("base_model") is None:
        raise InvalidArgumentError(
            "base_model: method='wise-ft' needs base_model= (the zero-shot or linear-probe model the fine-tunes "
            "started from)."
        )
    if isinstance(alpha, list) and len(alpha) > 1 and not options.get("has_eval"):
        raise InvalidArgumentError(
            f"alpha: alpha={alpha} is a sweep, which needs eval_dataset= to choose the best alpha; pass an eval "
            "set or a single alpha."
        )


@register_recipe(
    "wise-ft",
    pretty_name="WiSE-FT (weight-space ensemble)",
    reference_url=WISE_FT_URL,
    check=_check,
    needs_base=True,
    description="(1 - alpha) * base + alpha * (uniform soup of the fine-tuned ingredients).",
    params=WiseFTParams,
)
def cook_wise_ft(kitchen: Kitchen) -> Soup:
    alpha = kitchen.options["alpha"]
    weights = normalized_weights(kitchen.options.get("weights"), len(kitchen.ingredients))
    if isinstance(alpha, list):
        if len(alpha) == 1:
            alpha = alpha[0]
        else:
            return cook_sweep(kitchen, alpha, weights)
    coefficients = wise_ft_coefficients(alpha, weights)
    for ing, w in zip(kitchen.ingredients, weights):
        ing.ingredient.weight = w
        ing.ingredient.selected = w > 0
    return kitchen.serve(coefficients, method="wise-ft", params={"alpha": alpha})


def cook_sweep(kitchen: Kitchen, alphas: Sequence[float], weights: Sequence[float]) -> Soup:
    """Evaluate WiSE-FT at every alpha and serve the best one (ties: the first in the given order).

    Args:
        kitchen ([`Kitchen`]): with a base model and an evaluator.
        alphas (`Sequence[float]`): the values to try, each in [0, 1].
        weights (`Sequence[float]`): normalised weights of the fine-tuned ingredients.

    Returns:
        [`Soup`]: with `params["alpha"]` the chosen value, `params["alphas"]` the sweep, and the curve in
        `history`.

    Raises:
        [`EvaluationError`]: no eval set.
    """
    evaluator = kitchen.evaluator
    if evaluator is None:
        raise EvaluationError("An alpha sweep needs an eval set to choose alpha: pass eval_dataset=.")
    alphas = [float(a) for a in alphas]
    live = kitchen.new_live_model()
    history: list[dict[str, Any]] = []
    best_index = None
    for i, alpha in enumerate(alphas):
        scores = kitchen.evaluate_soup(live, wise_ft_coefficients(alpha, weights))
        score = evaluator.primary(scores)
        history.append({"alpha": alpha, "score": score, "scores": scores})
        if best_index is None or evaluator.better(score, history[best_index]["score"], strict=True):
            best_index = i
        logger.info(
            "WiSE-FT sweep: alpha=%.3g -> %s %.4f on %s",
            alpha,
            evaluator.metric_key,
            score,
            evaluator.select_on,
        )
    best = history[best_index]
    for point in history:
        point["selected"] = point is best
    if best_index != len(alphas) - 1:
        kitchen.load_into(live, wise_ft_coefficients(best["alpha"], weights))
    for member, w in zip(kitchen.ingredients, weights):
        member.ingredient.weight = w
        member.ingredient.selected = w > 0
    soup = kitchen.serve(
        wise_ft_coefficients(best["alpha"], weights),
        method="wise-ft",
        params={"alpha": best["alpha"], "alphas": alphas},
        history=history,
        score=best["score"],
        scores=best["scores"],
        model=live,
    )
    return soup
