"""Task arithmetic (Ilharco et al. 2023): `theta_base + scaling * sum_i weights[i] * (theta_i - theta_base)`.

Linear in the weights, so it runs on the engine's one-pass linear path (coefficients `scaling * w_i` for the
ingredients and `1 - scaling * sum(w)` for the base) and has an exact adapter form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import register_recipe
from .family import TaskVectorParams, check_family, cook_family

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

TASK_ARITHMETIC_URL = "https://arxiv.org/abs/2212.04089"


def task_arithmetic_coefficients(setting: dict[str, Any], n: int) -> list[float]:
    """Coefficients of `[*ingredients, base]` for one setting of `weights` and `scaling`."""
    weights = setting.get("weights") or [1.0] * n
    scaling = float(setting.get("scaling", 1.0) if setting.get("scaling") is not None else 1.0)
    coefficients = [scaling * float(w) for w in weights]
    return coefficients + [1.0 - sum(coefficients)]


def _check(options: dict[str, Any]) -> None:
    check_family("task-arithmetic", options, linear=True)


@register_recipe(
    "task-arithmetic",
    pretty_name="Task arithmetic",
    reference_url=TASK_ARITHMETIC_URL,
    check=_check,
    needs_base=True,
    description="base + scaling * sum_i w_i (theta_i - base); knobs weights=, scaling=.",
    params=TaskVectorParams,
)
def cook_task_arithmetic(kitchen: Kitchen) -> Soup:
    n = len(kitchen.ingredients)
    return cook_family(
        kitchen, "task-arithmetic", ("weights", "scaling"), lambda s: task_arithmetic_coefficients(s, n)
    )
