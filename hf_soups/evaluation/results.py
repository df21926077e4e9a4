"""Writing scores onto a soup: `score`, `scores`, the metric key and the selection set, as one record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..soup import Soup
    from .selection import Selector


def annotate(soup: Soup, scores: Mapping[str, Mapping[str, float]], selector: Selector) -> None:
    """Record `scores` (per eval set) as the soup's own, with the number `selector` decides on."""
    soup.scores = {k: dict(v) for k, v in scores.items()}
    soup.score = selector.primary(scores)
    soup.metric_key = selector.metric_key
    soup.select_on = selector.select_on
    soup.params.setdefault("greater_is_better", selector.greater_is_better)


__all__ = ["annotate"]
