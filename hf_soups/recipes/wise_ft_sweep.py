"""WiSE-FT alpha sweep: score every alpha on every eval set, keep the best on the selection set.

Each point `(1 - alpha) * base + alpha * finetuned` is streamed into one live model in place (no
`from_pretrained` per alpha), evaluated on every eval set, and recorded in `Soup.history` as
`{"alpha": a, "score": s, "scores": {set: {metric: value}}}`: the curve that `Soup.report()` tabulates and
`Soup.plot(path)` draws.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

logger = logging.getLogger(__name__)


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
    from .wise_ft import wise_ft_coefficients

    evaluator = kitchen.evaluator
    if evaluator is None:
        raise EvaluationError("An alpha sweep needs an eval set to choose alpha: pass eval_dataset=.")
    alphas = [float(a) for a in alphas]
    live = kitchen.new_live_model()
    history: list[dict[str, Any]] = []
    best_index = None
    for i, alpha in enumerate(alphas):
        kitchen.load_into(live, wise_ft_coefficients(alpha, weights))
        scores = evaluator.evaluate(live)
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
    soup.metric_name = evaluator.metric_key
    soup.select_on = evaluator.select_on
    soup.params.setdefault("greater_is_better", evaluator.greater_is_better)
    return soup
