"""Any other model, scored by a Trainer-style `compute_metrics(EvalPrediction)` on its raw logits.

The logits are passed as the model returns them (per example, or per token when they have a sequence axis and
the set has labels), padded with -100 across batches, as `transformers.Trainer` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Collector, Gather, MetricFn, Predictions, Task
from .classification import PROBLEM_TYPES, score_logits

if TYPE_CHECKING:  # pragma: no cover
    import torch


class CustomCollector(Collector):
    def add(self, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        if labels is not None and logits.dim() == 3:
            self.add_per_token(logits, labels, keep_scored=False)
        else:
            self.add_per_example(logits, labels)


class Custom(Task):
    """A model hf_soups cannot score on its own: `compute_metrics=` says how (its dry run waits for real outputs)."""

    name = "custom"

    def collector(self, gather: Gather, keep_raw: bool) -> Collector:
        return CustomCollector(gather, keep_raw)

    def score(self, out: Predictions, metric: MetricFn | None) -> dict[str, float]:
        # reached only with task="custom" and no compute_metrics: score the logits as class scores
        return score_logits(PROBLEM_TYPES["single_label_classification"], out, metric)


__all__ = ["Custom"]
