"""Early rejection: stop scoring a greedy candidate once even a perfect rest of the set could not keep it.

Some scores are means over units (examples or tokens) of a per-unit value whose best case is known: accuracy (a
hit is 1, the best rest is all hits), the task's own loss (every unit's loss is >= 0, the best rest adds 0) and
perplexity (`exp` of that mean loss, monotone in it, the number of scored tokens known). After each batch of the
selection set, the best score the candidate could still reach is

- accuracy: `(hits so far + units left) / units`;
- loss: `loss so far / units` (nothing left can lower it); perplexity: `exp` of that.

When that bound already loses to the soup under the greedy rule (`>=`, or `>` with `strict`), the full score loses
too, so the candidate is rejected at once: the decision is the one a full evaluation takes. The number of units
comes from a full evaluation of the same set (the set, not the model, fixes it), so it is exact. Accuracy is an
integer count over a known total (exact); a loss mean is compared with a relative margin of [`LOSS_MARGIN`], which
covers the float32 rounding of the reported mean, so a rejection may come a few examples later but never wrongly.

[`sum_metric`] decides from the metric, never from a guess: the bundled `accuracy` without options, or the task's
own `loss` / `perplexity`, on classification, token classification and language models. Callables, other metrics
and `compute_metrics` are always scored in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .scoring import MetricScorer
    from .selection import Selector
    from .tasks import Collector, Predictions, Task

#: relative margin on a loss bound: the reported mean is float32, the bound sums the same losses in another order
LOSS_MARGIN = 1e-4

_LOSSES = ("loss", "perplexity")


@dataclass
class EarlyStop:
    """How far a rejected candidate was scored: `units` of `of` (examples or tokens), and the best it could reach.

    Attributes:
        units (`int`): units (examples, or scored tokens) scored before the stop.
        of (`int`): units in the whole selection set.
        unit (`str`): `"examples"`, `"tokens"`, or `"labels"` (a multi-label loss: one unit per example and label).
        bound (`float`): the best score the candidate could still have reached (already losing to the soup).
    """

    units: int
    of: int
    unit: str
    bound: float

    def as_dict(self) -> dict[str, Any]:
        return {"units": self.units, "of": self.of, "unit": self.unit, "bound": self.bound}


class SumMetric:
    """A score that is a mean over units, and how to add up a prefix of it from a [`Collector`].

    Args:
        task ([`Task`]): the bound task (classification, token classification or a language model).
        key (`str`): `"accuracy"`, `"loss"` or `"perplexity"`.
    """

    def __init__(self, task: Task, key: str):
        self.task = task
        self.key = key
        self.hits = key == "accuracy"
        self.unit = "examples" if task.name == "classification" else "tokens"
        if (
            task.name == "classification"
            and task.problem_type == "multi_label_classification"
            and not self.hits
        ):
            self.unit = "labels"  # binary cross-entropy is a mean over every (example, label) pair

    def _part_sums(self, logits: Any, labels: Any) -> tuple[float, int]:
        """(sum, units) of one block of per-row logits and labels (classification and token classification)."""
        import numpy as np
        import torch

        from .tasks.classification import PROBLEM_TYPES, _tensor

        if self.task.name == "classification":
            problem = self.task.problem
        else:
            problem = PROBLEM_TYPES["single_label_classification"]
        rows = _tensor(logits)
        if self.hits:  # exactly the predictions the metric is given
            preds, refs = problem.predictions(rows, labels)
            same = np.asarray(preds) == np.asarray(refs)
            if same.ndim > 1:  # multi-label accuracy is exact match per example
                same = same.all(axis=tuple(range(1, same.ndim)))
            return float(same.sum()), int(same.shape[0])
        total, count = problem.loss_sum(rows, torch.as_tensor(np.asarray(labels)))
        return float(total), int(count)

    def totals(self, out: Predictions) -> tuple[float, int]:
        """(sum, units) of a whole set's predictions."""
        import numpy as np

        if self.task.name in ("causal-lm", "masked-lm"):
            if self.hits:
                return float((np.asarray(out.preds) == np.asarray(out.labels)).sum()), len(out.labels)
            return float(out.loss_sum), int(out.loss_count)
        return self._part_sums(out.logits, out.labels)

    def tracker(self, collector: Collector) -> PrefixSums:
        return PrefixSums(self, collector)


class PrefixSums:
    """The running (sum, units) of one evaluation, read from its collector after each batch."""

    def __init__(self, metric: SumMetric, collector: Collector):
        self.metric = metric
        self.collector = collector
        self.seen = 0
        self.total = 0.0
        self.units = 0

    def update(self) -> tuple[float, int]:
        m, c = self.metric, self.collector
        if m.task.name in ("causal-lm", "masked-lm"):
            if m.hits:
                import numpy as np

                for preds, labels in zip(c.pred_parts[self.seen :], c.label_parts[self.seen :]):
                    self.total += float((np.asarray(preds) == np.asarray(labels)).sum())
                    self.units += len(labels)
                self.seen = len(c.label_parts)
            else:
                self.total, self.units = float(c.loss_sum), int(c.loss_count)
            return self.total, self.units
        for logits, labels in zip(c.logits_parts[self.seen :], c.label_parts[self.seen :]):
            s, u = m._part_sums(logits, labels)
            self.total += s
            self.units += u
        self.seen = len(c.label_parts)
        return self.total, self.units


def best_reachable(metric: SumMetric, total: float, units: int, of: int) -> float:
    """The best final score a candidate with this prefix can reach over `of` units."""
    from .tasks.language_modeling import perplexity

    if metric.hits:
        return (total + (of - units)) / of
    lower = total / of * (1.0 - LOSS_MARGIN)
    return perplexity(lower) if metric.key == "perplexity" else lower


def sum_metric(task: Task | None, scorer: MetricScorer, selector: Selector) -> SumMetric | None:
    """The [`SumMetric`] the selection score is, or `None` when it is not known to be one (scored in full).

    Known: the bundled `accuracy` metric (no `metric_kwargs`: `normalize=False` or `sample_weight` change what it
    sums), or the task's own `loss` / `perplexity` when the metric is a name (a callable or `compute_metrics` could
    return its own `loss`), on classification (not regression for accuracy), token classification and causal or
    masked language models.
    """
    from .metrics import BUNDLED_METRICS
    from .scoring import LOSS_METRICS

    if task is None or scorer.compute_metrics is not None or not isinstance(scorer.spec, str):
        return None
    if task.name not in ("classification", "token-classification", "causal-lm", "masked-lm"):
        return None
    key = selector.metric_key
    if selector.greater_is_better != (
        key == "accuracy"
    ):  # a direction the user turned around: not a bound we know
        return None
    if key == "accuracy" and scorer.spec == "accuracy" and not scorer.kwargs:
        if task.name == "classification" and task.problem_type == "regression":
            return None
        return SumMetric(task, key)
    if key in _LOSSES and (scorer.spec in BUNDLED_METRICS or scorer.spec in LOSS_METRICS):
        if key == "perplexity" and task.name not in ("causal-lm", "masked-lm"):
            return None
        return SumMetric(task, key)
    return None


__all__ = ["LOSS_MARGIN", "EarlyStop", "PrefixSums", "SumMetric", "best_reachable", "sum_metric"]
