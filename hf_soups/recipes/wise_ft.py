"""WiSE-FT: interpolate between a zero-shot (or linear-probe) base and fine-tuned weights (Wortsman et al. 2021).

`theta = (1 - alpha) * theta_base + alpha * theta_finetuned`; with several fine-tuned ingredients, the
fine-tuned end is their (weighted) uniform soup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from ..options import option
from .base import register_recipe
from .uniform import UniformParams, normalized_weights

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

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
            from .wise_ft_sweep import cook_sweep

            return cook_sweep(kitchen, alpha, weights)
    coefficients = wise_ft_coefficients(alpha, weights)
    for ing, w in zip(kitchen.ingredients, weights):
        ing.ingredient.weight = w
        ing.ingredient.selected = w > 0
    return kitchen.serve(coefficients, method="wise-ft", params={"alpha": alpha})
