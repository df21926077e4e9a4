"""Uniform soup: the (optionally weighted) mean of the ingredients (Wortsman et al. 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from .base import register_recipe

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

MODEL_SOUPS_URL = "https://arxiv.org/abs/2203.05482"


def normalized_weights(
    weights: Sequence[float] | None, n: int, names: Sequence[str] | None = None
) -> list[float]:
    """Weights normalised to sum to one; `None` gives the plain mean.

    Raises:
        [`InvalidArgumentError`]: wrong length, negative, non-finite or all-zero weights.
    """
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise InvalidArgumentError(
            f"weights has {len(weights)} values for {n} ingredients; give one per ingredient."
        )
    for i, w in enumerate(weights):
        who = repr(names[i]) if names else f"#{i}"
        if not math.isfinite(w) or w < 0:
            raise InvalidArgumentError(
                f"Weight {w} of ingredient {who} is invalid: weights must be finite and >= 0."
            )
    total = sum(weights)
    if total <= 0:
        raise InvalidArgumentError("All weights are zero; at least one ingredient needs a positive weight.")
    return [w / total for w in weights]


def _check(options: dict[str, Any]) -> None:
    weights = options.get("weights")
    n = options.get("n_ingredients")
    if weights is not None and n is not None:
        normalized_weights(weights, n)


@register_recipe(
    "uniform",
    pretty_name="Uniform soup",
    reference_url=MODEL_SOUPS_URL,
    check=_check,
    description="Mean (or weighted mean with weights=) of every ingredient.",
)
def cook_uniform(kitchen: Kitchen) -> Soup:
    coefficients = normalized_weights(kitchen.options.get("weights"), len(kitchen.ingredients), kitchen.names)
    for ing, c in zip(kitchen.ingredients, coefficients):
        ing.ingredient.weight = c
        ing.ingredient.selected = c > 0
    params = {"weights": coefficients} if kitchen.options.get("weights") is not None else {}
    return kitchen.serve(coefficients, method="uniform", params=params)
