"""Model Stock (Jang et al. 2024): per tensor, `t * mean_i(theta_i) + (1 - t) * theta_base` with
`t = N cos / (1 + (N - 1) cos)`, cos the mean pairwise cosine of the task vectors. No knobs, no data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..merge_ops import model_stock_recipe
from .base import register_recipe
from .family import check_family, cook_family

if TYPE_CHECKING:  # pragma: no cover
    from ..kitchen import Kitchen
    from ..soup import Soup

MODEL_STOCK_URL = "https://arxiv.org/abs/2403.19522"


def _check(options: dict[str, Any]) -> None:
    check_family("model-stock", options, min_ingredients=2)


@register_recipe(
    "model-stock",
    pretty_name="Model Stock",
    reference_url=MODEL_STOCK_URL,
    check=_check,
    needs_base=True,
    description="Per tensor, interpolate the mean of >= 2 fine-tunes towards the base by their task vectors' angle.",
)
def cook_model_stock(kitchen: Kitchen) -> Soup:
    return cook_family(kitchen, "model-stock", (), lambda s: model_stock_recipe())
