"""SLERP: spherical linear interpolation of two ingredients' weights, per tensor (linear when nearly parallel)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..merge_ops import slerp_recipe
from .base import register_recipe
from .family import SlerpParams, check_family, cook_family

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

SLERP_URL = (
    "https://dl.acm.org/doi/10.1145/325165.325242"  # Shoemake 1985, Animating rotation with quaternion curves
)


def _check(options: dict[str, Any]) -> None:
    check_family("slerp", options, needs_base=False, required=("t",), min_ingredients=2, max_ingredients=2)


@register_recipe(
    "slerp",
    pretty_name="SLERP",
    reference_url=SLERP_URL,
    check=_check,
    description="Spherical interpolation of exactly two ingredients, per tensor, at t=.",
    params=SlerpParams,
)
def cook_slerp(kitchen: Kitchen) -> Soup:
    return cook_family(kitchen, "slerp", ("t",), lambda s: slerp_recipe(t=s["t"]))
