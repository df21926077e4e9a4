"""Logit ensembles: a running sum of several models' gathered logits, and their mean, scored like one model.

The greedy recipe reports the ensemble of its ingredients as a baseline (the soup should come close to it at
the cost of one model); only tasks with per-row logits support it (classification, token classification).
"""

from __future__ import annotations

from .tasks import Predictions


def add_predictions(
    total: dict[str, Predictions] | None, new: dict[str, Predictions]
) -> dict[str, Predictions]:
    """Running sum of logits over models, per eval set (float64); `total=None` starts one."""
    if total is None:
        return {k: Predictions(logits=v.logits.astype("float64"), labels=v.labels) for k, v in new.items()}
    for k, v in new.items():
        total[k].logits += v.logits
    return total


def mean_predictions(total: dict[str, Predictions], n_models: int) -> dict[str, Predictions]:
    """The mean logits of `n_models` models summed with [`add_predictions`] (float32, ready to score)."""
    return {
        k: Predictions(logits=(v.logits / n_models).astype("float32"), labels=v.labels)
        for k, v in total.items()
    }


__all__ = ["add_predictions", "mean_predictions"]
