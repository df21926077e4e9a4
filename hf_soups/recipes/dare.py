"""DARE (Yu et al. 2024): drop each task vector entry with probability `1 - density`, rescale the rest by
`1 / density`, then add them (`dare-linear`) or merge them as TIES does (`dare-ties`). The drop is seeded and a pure
function of (seed, ingredient, tensor name, element): reproducible bit for bit (see `docs/methods.md`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..merge_ops import dare_recipe
from .base import register_recipe
from .family import DareParams, check_family, cook_family

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

DARE_URL = "https://arxiv.org/abs/2311.03099"


def _cook(kitchen: Kitchen, form: str) -> Soup:
    seed = kitchen.options["seed"]

    def build(s: dict[str, Any]):
        return dare_recipe(
            density=s["density"],
            seed=seed,
            form=form,
            weights=s.get("weights"),
            scaling=s.get("scaling", 1.0),
        )

    return cook_family(
        kitchen, f"dare-{form}", ("weights", "scaling", "density"), build, fixed={"seed": seed}
    )


def _check_linear(options: dict[str, Any]) -> None:
    check_family("dare-linear", options, required=("density", "seed"))


def _check_ties(options: dict[str, Any]) -> None:
    check_family("dare-ties", options, required=("density", "seed"))


@register_recipe(
    "dare-linear",
    pretty_name="DARE (linear)",
    reference_url=DARE_URL,
    check=_check_linear,
    needs_base=True,
    description="Drop task vector entries (keep density=, seed=), rescale, add with weights= and scaling=.",
    params=DareParams,
)
def cook_dare_linear(kitchen: Kitchen) -> Soup:
    return _cook(kitchen, "linear")


@register_recipe(
    "dare-ties",
    pretty_name="DARE-TIES",
    reference_url=DARE_URL,
    check=_check_ties,
    needs_base=True,
    description="Drop task vector entries (keep density=, seed=), rescale, then TIES's sign election and mean.",
    params=DareParams,
)
def cook_dare_ties(kitchen: Kitchen) -> Soup:
    return _cook(kitchen, "ties")
