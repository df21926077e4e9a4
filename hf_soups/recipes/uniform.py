"""Uniform soup: the (optionally weighted) mean of the ingredients (Wortsman et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..options import option
from .base import RecipeParams, register_recipe

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

MODEL_SOUPS_URL = "https://arxiv.org/abs/2203.05482"


@dataclass
class UniformParams(RecipeParams):
    """Parameters of the uniform soup."""

    weights: list[float] | None = option(
        help="Relative weight of each ingredient (normalised; >= 0, not all zero). Recipe files: `weight:` per "
        "ingredient.",
        kind="weights",
        file=False,
        cli={"nargs": "+", "type": float, "metavar": "W", "action": "append"},
    )


def normalized_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Weights normalised to sum to one; `None` gives the plain mean.

    The weights were checked with the options (finite, >= 0, not all zero, one per ingredient); they are scaled
    by their largest value first, so that huge weights (`[1e308, 1e308]`) do not overflow the sum.
    """
    if weights is None:
        return [1.0 / n] * n
    largest = max(float(w) for w in weights)
    scaled = [float(w) / largest for w in weights]
    total = sum(scaled)
    return [w / total for w in scaled]


@register_recipe(
    "uniform",
    pretty_name="Uniform soup",
    reference_url=MODEL_SOUPS_URL,
    description="Mean (or weighted mean with weights=) of every ingredient.",
    params=UniformParams,
)
def cook_uniform(kitchen: Kitchen) -> Soup:
    coefficients = normalized_weights(kitchen.options.get("weights"), len(kitchen.ingredients))
    for ing, c in zip(kitchen.ingredients, coefficients):
        ing.ingredient.weight = c
        ing.ingredient.selected = c > 0
    params = {"weights": coefficients} if kitchen.options.get("weights") is not None else {}
    return kitchen.serve(coefficients, method="uniform", params=params)
