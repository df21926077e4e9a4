# Copyright 2026 The hf_soups developers. Licensed under the Apache License, Version 2.0.
"""Accuracy, bundled with hf_soups for air-gapped use (same inputs and outputs as the Hub's `accuracy`)."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the examples processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN). For multi-label inputs (config `"multilabel"`) it is the
subset accuracy: an example counts as correct only when all of its labels are predicted exactly.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels (config `"multilabel"`: one list of 0/1 per example).
    references (`list` of `int`): Ground truth labels, same layout as `predictions`.
    normalize (`bool`, defaults to `True`): If `False`, return the number of correct predictions instead
        of the proportion.
    sample_weight (`list` of `float`, *optional*): Sample weights.

Returns:
    accuracy (`float`): Accuracy in [0, 1] (or a count when `normalize=False`). Higher is better.

Examples:
    >>> accuracy_metric = evaluate.load("accuracy")
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        if self.config_name == "multilabel":
            features = {
                "predictions": datasets.Sequence(datasets.Value("int32")),
                "references": datasets.Sequence(datasets.Value("int32")),
            }
        else:
            features = {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"
            ],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score)}
