"""TIES merging (Yadav et al. 2023): trim each task vector to its top-`density` magnitudes per tensor, elect the
sign of each entry by summed mass, average the agreeing entries, scale by `scaling` (see `docs/methods.md`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..merge_ops import ties_recipe
from .base import register_recipe
from .family import TiesParams, check_family, cook_family

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

TIES_URL = "https://arxiv.org/abs/2306.01708"


def _check(options: dict[str, Any]) -> None:
    check_family("ties", options, required=("density",))


@register_recipe(
    "ties",
    pretty_name="TIES merging",
    reference_url=TIES_URL,
    check=_check,
    needs_base=True,
    description="Trim task vectors to density=, elect signs, disjoint mean, times scaling=.",
    params=TiesParams,
)
def cook_ties(kitchen: Kitchen) -> Soup:
    def build(s: dict[str, Any]):
        return ties_recipe(density=s["density"], weights=s.get("weights"), scaling=s.get("scaling", 1.0))

    return cook_family(kitchen, "ties", ("weights", "scaling", "density"), build)
