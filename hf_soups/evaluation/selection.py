"""Decision rules: which number decides (`scores[select_on][metric_key]`), which way is better, and sorting.

Greedy soups and sweeps compare candidates only through a [`Selector`], so NaN or missing scores are never kept
and the direction of the metric is applied in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import EvaluationError


@dataclass
class Selector:
    """How scores are compared.

    Args:
        select_on (`str`): the eval set whose `metric_key` drives decisions.
        metric_key (`str`, *optional*): the number compared (set once the metric's outputs are known).
        greater_is_better (`bool`, *optional*, defaults to `True`): the direction of `metric_key`.
    """

    select_on: str
    metric_key: str | None = None
    greater_is_better: bool = True

    def primary(self, scores: Mapping[str, Mapping[str, float]]) -> float:
        """The number decisions are made on: `scores[select_on][metric_key]`.

        Raises:
            [`EvaluationError`]: the key is missing (a `compute_metrics` that did not return it).
        """
        try:
            return float(scores[self.select_on][self.metric_key])
        except KeyError:
            have = sorted(scores.get(self.select_on, {}))
            raise EvaluationError(
                f"metric_key={self.metric_key!r} is not in the scores of eval set {self.select_on!r} "
                f"(got {have}); pass metric_key= one of them."
            ) from None

    def better(self, a: float | None, b: float | None, strict: bool = False) -> bool:
        """Whether score `a` is at least as good as `b` (`strict=True`: strictly better).

        NaN and `None` are worse than any number, so a broken candidate is never kept.
        """
        a_bad = a is None or math.isnan(a)
        b_bad = b is None or math.isnan(b)
        if a_bad:
            return False
        if b_bad:
            return True
        if self.greater_is_better:
            return a > b if strict else a >= b
        return a < b if strict else a <= b

    def sort_key(self, score: float | None) -> float:
        """A key that sorts scores best first (NaN/None last)."""
        if score is None or math.isnan(score):
            return math.inf
        return -score if self.greater_is_better else score


class SelectorMixin:
    """The decisions of an evaluator, delegated to its [`Selector`] (`self._selector`): one copy for every
    evaluator kind (datasets, lm-eval tasks)."""

    _selector: Selector

    @property
    def select_on(self) -> str:
        return self._selector.select_on

    @property
    def metric_key(self) -> str | None:
        return self._selector.metric_key

    @property
    def greater_is_better(self) -> bool:
        return self._selector.greater_is_better

    def primary(self, scores: Mapping[str, Mapping[str, float]]) -> float:
        """The number decisions are made on: `scores[select_on][metric_key]` (see [`Selector.primary`])."""
        return self._selector.primary(scores)

    def better(self, a: float | None, b: float | None, strict: bool = False) -> bool:
        """Whether score `a` is at least as good as `b`; NaN and `None` lose (see [`Selector.better`])."""
        return self._selector.better(a, b, strict)

    def sort_key(self, score: float | None) -> float:
        """A key that sorts scores best first, NaN/None last (see [`Selector.sort_key`])."""
        return self._selector.sort_key(score)


__all__ = ["Selector", "SelectorMixin"]
