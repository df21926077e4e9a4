"""The recipe registry.

A recipe decides the mixing coefficients of a soup (evaluating candidates when it must) and hands them to
the kitchen, which streams the result. Each recipe lives in its own module and registers itself with
[`register_recipe`]; names are unique and the registry refuses duplicates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup


@dataclass(frozen=True)
class Recipe:
    """A registered recipe.

    Args:
        name (`str`): the `method=` value.
        pretty_name (`str`): name shown in reports and model cards.
        reference_url (`str`): the paper, for the model card.
        cook (`Callable[[Kitchen], Soup]`): makes the soup.
        check (`Callable[[dict], None]`, *optional*): validates the options before any download or tensor work.
        needs_base (`bool`): whether the recipe needs `base_model`.
        description (`str`): one line for `--help` and docs.
    """

    name: str
    pretty_name: str
    reference_url: str
    cook: Callable[[Kitchen], Soup]
    check: Callable[[dict[str, Any]], None] | None = None
    needs_base: bool = False
    description: str = ""


_RECIPES: dict[str, Recipe] = {}


def register_recipe(
    name: str,
    *,
    pretty_name: str,
    reference_url: str,
    check: Callable[[dict[str, Any]], None] | None = None,
    needs_base: bool = False,
    description: str = "",
) -> Callable[[Callable[[Kitchen], Soup]], Callable[[Kitchen], Soup]]:
    """Decorator registering a cook function under `name` (lower-case letters, digits and dashes)."""
    if not name or not all(c.isalnum() or c == "-" for c in name) or name.lower() != name:
        raise ValueError(f"Invalid recipe name {name!r}: use lower-case letters, digits and dashes.")
    if name in _RECIPES:
        raise ValueError(f"A recipe named {name!r} is already registered.")

    def decorator(cook: Callable[[Kitchen], Soup]) -> Callable[[Kitchen], Soup]:
        _RECIPES[name] = Recipe(name, pretty_name, reference_url, cook, check, needs_base, description)
        return cook

    return decorator


def get_recipe(name: str) -> Recipe:
    """The recipe registered as `name` (`"wise_ft"` is accepted for `"wise-ft"`)."""
    key = str(name).lower().replace("_", "-")
    if key not in _RECIPES:
        raise InvalidArgumentError(f"Unknown method {name!r}. Available: {', '.join(sorted(_RECIPES))}.")
    return _RECIPES[key]


def available_recipes() -> list[str]:
    return sorted(_RECIPES)
