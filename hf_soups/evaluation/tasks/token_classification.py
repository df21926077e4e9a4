"""Token classification: one label per token (-100 where not scored), words aligned to their first sub-token."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..checks import check_token_labels, labels_of
from ..data import tokenize_words
from .base import Collector, Gather, MetricFn, Predictions, Task
from .classification import PROBLEM_TYPES, dry_logits, score_logits

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the tokens whose label is not -100, and how many there are."""
    import torch

    flat = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), flat, ignore_index=-100, reduction="sum"
    )
    return loss, int((flat != -100).sum())


class TokenCollector(Collector):
    def add(self, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.add_per_token(logits, labels)


class TokenClassification(Task):
    """`*ForTokenClassification`: scored on the tokens whose label is not -100, like a single-label classifier."""

    name = "token-classification"
    supports_ensemble = True

    def tokenize(
        self, tok: Any, columns: list[list[Any]], labels: list[Any] | None, max_length: int
    ) -> list[dict]:
        return tokenize_words(tok, columns, labels, max_length)

    def check_label_ranges(self, name: str, examples: list[dict]) -> None:
        labels = labels_of(name, examples)
        if labels is not None:
            check_token_labels(
                name,
                examples,
                labels,
                task=self.name,
                limit=self.num_labels,
                what="the model's num_labels",
                fix="check label_column= and the label encoding",
            )

    def collector(self, gather: Gather, keep_raw: bool) -> Collector:
        return TokenCollector(gather, keep_raw)

    def score(self, out: Predictions, metric: MetricFn | None) -> dict[str, float]:
        return score_logits(PROBLEM_TYPES["single_label_classification"], out, metric)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        return token_loss_sum(logits, labels)

    def dry_outputs(self) -> Predictions:
        return dry_logits(PROBLEM_TYPES["single_label_classification"], self.n_classes)

    def dry_eval_prediction(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        out = self.dry_outputs()
        return out.logits[None], np.asarray(out.labels[None])


__all__ = ["TokenClassification"]
