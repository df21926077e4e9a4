"""WiSE-FT: interpolate between a zero-shot (or linear-probe) base and fine-tuned weights (Wortsman et al. 2021).

`theta = (1 - alpha) * theta_base + alpha * theta_finetuned`; with several fine-tuned ingredients, the
fine-tuned end is their (weighted) uniform soup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from .base import register_recipe
from .uniform import normalized_weights

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

WISE_FT_URL = "https://arxiv.org/abs/2109.01903"


def check_alpha(alpha: Any) -> float | list[float]:
    """Validate `alpha`: a float in [0, 1], or a non-empty list of them (a sweep)."""
    if alpha is None:
        raise InvalidArgumentError(
            "method='wise-ft' needs alpha= (a float in [0, 1], or a list of floats to sweep)."
        )
    values = list(alpha) if isinstance(alpha, Sequence) and not isinstance(alpha, str) else [alpha]
    if not values:
        raise InvalidArgumentError("alpha is an empty list; give at least one value in [0, 1].")
    out = []
    for a in values:
        try:
            a = float(a)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"alpha={a!r} is not a number in [0, 1].") from None
        if not math.isfinite(a) or not 0.0 <= a <= 1.0:
            raise InvalidArgumentError(f"alpha={a} is outside [0, 1].")
        out.append(a)
    return out if isinstance(alpha, Sequence) and not isinstance(alpha, str) else out[0]


def wise_ft_coefficients(alpha: float, finetuned_weights: Sequence[float]) -> list[float]:
    """Coefficients of `[*finetuned, base]` for one alpha."""
    return [alpha * w for w in finetuned_weights] + [1.0 - alpha]


def _check(options: dict[str, Any]) -> None:
    alpha = check_alpha(options.get("alpha"))
    if options.get("base_model") is None:
        raise InvalidArgumentError(
            "method='wise-ft' needs base_model= (the zero-shot or linear-probe model the fine-tunes started from)."
        )
    if isinstance(alpha, list) and len(alpha) > 1 and not options.get("has_eval"):
        raise InvalidArgumentError(
            f"alpha={alpha} is a sweep, which needs eval_dataset= to choose the best alpha; pass an eval set or a "
            "single alpha."
        )
    weights = options.get("weights")
    if weights is not None and options.get("n_ingredients") is not None:
        normalized_weights(weights, options["n_ingredients"])


@register_recipe(
    "wise-ft",
    pretty_name="WiSE-FT (weight-space ensemble)",
    reference_url=WISE_FT_URL,
    check=_check,
    needs_base=True,
    description="(1 - alpha) * base + alpha * (uniform soup of the fine-tuned ingredients).",
)
def cook_wise_ft(kitchen: Kitchen) -> Soup:
    alpha = check_alpha(kitchen.options.get("alpha"))
    weights = normalized_weights(kitchen.options.get("weights"), len(kitchen.ingredients), kitchen.names)
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
