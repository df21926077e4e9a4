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
from ..options import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup


@dataclass
class RecipeParams:
    """Base class of a recipe's parameters: one dataclass per recipe, one field (made with
    [`hf_soups.options.option`]) per parameter, passed as `register_recipe(..., params=...)`.

    The fields are the only declaration of a parameter: `merge_models` keywords, recipe file keys, `hf-soups merge`
    flags and the callback's options are checked against them, and a parameter given to a recipe that does not
    declare it is refused by name. A recipe without parameters uses this class as is.
    """


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
        params (`type[RecipeParams]`): the dataclass declaring the recipe's parameters.
    """

    name: str
    pretty_name: str
    reference_url: str
    cook: Callable[[Kitchen], Soup]
    check: Callable[[dict[str, Any]], None] | None = None
    needs_base: bool = False
    description: str = ""
    params: type[RecipeParams] = RecipeParams


_RECIPES: dict[str, Recipe] = {}


def register_recipe(
    name: str,
    *,
    pretty_name: str,
    reference_url: str,
    check: Callable[[dict[str, Any]], None] | None = None,
    needs_base: bool = False,
    description: str = "",
    params: type[RecipeParams] = RecipeParams,
) -> Callable[[Callable[[Kitchen], Soup]], Callable[[Kitchen], Soup]]:
    """Decorator registering a cook function under `name` (lower-case letters, digits and dashes).

    `check(options)` runs before any download or tensor work, after every parameter passed its own check; it
    receives the recipe's parameters plus `base_model`, `adapter_output`, `rank`, `has_eval` and `n_ingredients`.
    """
    if not name or not all(c.isalnum() or c == "-" for c in name) or name.lower() != name:
        raise ValueError(f"Invalid recipe name {name!r}: use lower-case letters, digits and dashes.")
    if name in _RECIPES:
        raise ValueError(f"A recipe named {name!r} is already registered.")

    def decorator(cook: Callable[[Kitchen], Soup]) -> Callable[[Kitchen], Soup]:
        _RECIPES[name] = Recipe(
            name, pretty_name, reference_url, cook, check, needs_base, description, params
        )
        return cook

    return decorator


def get_recipe(name: str) -> Recipe:
    """The recipe registered as `name` (`"wise_ft"` is accepted for `"wise-ft"`)."""
    key = str(name).lower().replace("_", "-")
    if key not in _RECIPES:
        raise InvalidArgumentError(
            f"Unknown method {name!r}. Available: {', '.join(sorted(_RECIPES))}{did_you_mean(key, _RECIPES, list_known=False)}."
        )
    return _RECIPES[key]


def available_recipes() -> list[str]:
    return sorted(_RECIPES)


def all_recipes() -> dict[str, Recipe]:
    """Every registered recipe, by name."""
    return dict(_RECIPES)
