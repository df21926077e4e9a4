"""Sequence (image, audio) classification: one output row per example, single-label, multi-label or regression.

The problem type comes from the config (`problem_type`, or one output = regression), else from the first label
of the selection set; each problem type is a small object with its loss, its predictions and its dry-run data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..checks import check_class_ids, check_class_labels, check_multi_hot_width, labels_of
from ..data import label_kind
from .base import Collector, Gather, MetricFn, Predictions, Task

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


def _tensor(logits: np.ndarray) -> torch.Tensor:
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))


class SingleLabel:
    """Class ids; cross-entropy loss; the argmax is the prediction."""

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        import torch

        refs = labels.long().reshape(-1)
        return torch.nn.functional.cross_entropy(logits, refs, reduction="sum"), len(refs)

    def loss(self, logits: torch.Tensor, labels: Any) -> float:
        import torch

        refs = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        return float(torch.nn.functional.cross_entropy(logits, refs)) if len(refs) else float("nan")

    def predictions(self, logits: torch.Tensor, labels: Any) -> tuple[np.ndarray, np.ndarray]:
        import torch

        return logits.argmax(-1).numpy(), torch.as_tensor(labels, dtype=torch.long).reshape(-1).numpy()

    def dry(self, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        refs = np.arange(n) % c
        return np.eye(c, dtype=np.float32)[(refs + (np.arange(n) % 2)) % c], refs

    def check(self, name: str, labels: list[Any], num_labels: int | None) -> None:
        check_class_ids(name, labels)


class MultiLabel:
    """One 0/1 target per label; binary cross-entropy; a positive logit predicts the label."""

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        import torch

        refs = labels.float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, refs, reduction="sum")
        return loss, refs.numel()

    def loss(self, logits: torch.Tensor, labels: Any) -> float:
        import torch

        refs = torch.as_tensor(labels, dtype=torch.float32)
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, refs))

    def predictions(self, logits: torch.Tensor, labels: Any) -> tuple[np.ndarray, np.ndarray]:
        import torch

        return (logits > 0).int().numpy(), torch.as_tensor(labels, dtype=torch.float32).int().numpy()

    def dry(self, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        refs = (np.arange(n * c).reshape(n, c) % 3 == 0).astype(np.float32)
        return np.where(np.roll(refs, 1, axis=0) > 0, 1.0, -1.0).astype(np.float32), refs

    def check(self, name: str, labels: list[Any], num_labels: int | None) -> None:
        if num_labels:
            check_multi_hot_width(name, labels, num_labels)


class Regression:
    """One real-valued output; mean squared error; the first output is the prediction."""

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        import torch

        preds, refs = logits.reshape(len(logits), -1)[:, 0], labels.float().reshape(-1)
        return torch.nn.functional.mse_loss(preds, refs, reduction="sum"), len(refs)

    def loss(self, logits: torch.Tensor, labels: Any) -> float:
        import torch

        preds, refs = self._pair(logits, labels)
        return float(torch.nn.functional.mse_loss(preds, refs))

    def predictions(self, logits: torch.Tensor, labels: Any) -> tuple[np.ndarray, np.ndarray]:
        preds, refs = self._pair(logits, labels)
        return preds.numpy(), refs.numpy()

    @staticmethod
    def _pair(logits: torch.Tensor, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        return logits.reshape(len(logits), -1)[:, 0], torch.as_tensor(labels, dtype=torch.float32).reshape(-1)

    def dry(self, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        refs = np.linspace(0.0, 1.0, n).astype(np.float32)
        return (refs[::-1].copy() + refs * 2)[:, None], refs

    def check(self, name: str, labels: list[Any], num_labels: int | None) -> None:
        pass


def score_logits(
    problem: SingleLabel | MultiLabel | Regression, out: Predictions, metric: MetricFn | None
) -> dict:
    """`{"loss": ...}` of per-row logits, plus `metric` of the problem's predictions when there is one."""
    logits = _tensor(out.logits)
    result = {"loss": problem.loss(logits, out.labels)}
    if metric is not None:
        result.update(metric(*problem.predictions(logits, out.labels)))
    return result


def dry_logits(problem: SingleLabel | MultiLabel | Regression, n_classes: int | None) -> Predictions:
    """Made-up logits and labels with some right and some wrong, for a metric dry run."""
    c = n_classes or 2
    logits, labels = problem.dry(max(2 * c, 4), c)
    return Predictions(logits=logits, labels=labels)


PROBLEM_TYPES = {
    "single_label_classification": SingleLabel(),
    "multi_label_classification": MultiLabel(),
    "regression": Regression(),
}


class ClassificationCollector(Collector):
    def add(self, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.add_per_example(logits, labels)


class Classification(Task):
    """`*ForSequenceClassification`, `*ForImageClassification`, `*ForAudioClassification`."""

    name = "classification"
    supports_ensemble = True

    def __init__(self, *, problem_type: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.problem_type = problem_type

    @property
    def problem(self) -> SingleLabel | MultiLabel | Regression:
        """The problem type's loss / predictions / dry data (single label while the type is still open)."""
        return PROBLEM_TYPES.get(self.problem_type or "", PROBLEM_TYPES["single_label_classification"])

    def check_labels(self, name: str, examples: list[dict]) -> None:
        check_class_labels(
            name, examples, problem_type=self.problem_type, label2id=self.label2id, num_labels=self.num_labels
        )

    def learn_from(self, examples: list[dict]) -> None:
        if self.problem_type is None:
            kind = label_kind(examples[0].get("labels"))
            self.problem_type = (
                "multi_label_classification" if kind.startswith("vector") else "single_label_classification"
            )

    def check_label_ranges(self, name: str, examples: list[dict]) -> None:
        labels = labels_of(name, examples)
        if labels is not None and self.problem_type in PROBLEM_TYPES:
            self.problem.check(name, labels, self.num_labels)

    def collector(self, gather: Gather, keep_raw: bool) -> Collector:
        return ClassificationCollector(gather, keep_raw)

    def score(self, out: Predictions, metric: MetricFn | None) -> dict[str, float]:
        return score_logits(self.problem, out, metric)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        return self.problem.loss_sum(logits, labels)

    def add_own_scores(self, result: dict[str, float], out: Predictions) -> None:
        if out.logits is not None and out.labels is not None:
            result.setdefault("loss", self.problem.loss(_tensor(out.logits), out.labels))

    def dry_outputs(self) -> Predictions:
        return dry_logits(self.problem, self.n_classes)

    def dry_eval_prediction(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        out = self.dry_outputs()
        return out.logits, np.asarray(out.labels)


__all__ = [
    "PROBLEM_TYPES",
    "Classification",
    "MultiLabel",
    "Regression",
    "SingleLabel",
    "dry_logits",
    "score_logits",
]
