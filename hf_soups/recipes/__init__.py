"""Soup recipes, one module each; importing this package registers them."""

from . import dare, greedy, learned, model_stock, slerp, task_arithmetic, ties, uniform, wise_ft  # noqa: F401  (registration side effects)
from .base import Recipe, RecipeParams, all_recipes, available_recipes, get_recipe, register_recipe

__all__ = ["Recipe", "RecipeParams", "all_recipes", "available_recipes", "get_recipe", "register_recipe"]
