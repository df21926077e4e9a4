# Copyright 2026 The hf_soups developers. Licensed under the Apache License, Version 2.0.
"""Precision, bundled with hf_soups for air-gapped use (same inputs and outputs as the Hub's `precision`)."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import precision_score

_DESCRIPTION = """
Precision is the fraction of positive predictions that are correct: Precision = TP / (TP + FP).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels (config `"multilabel"`: one list of 0/1 per example).
    references (`list` of `int`): Ground truth labels, same layout as `predictions`.
    labels (`list` of `int`, *optional*): The labels to include when `average` is not `"binary"`, and their
        order when `average` is `None`. Defaults to every label seen, sorted.
    pos_label (`int`, defaults to `1`): The positive class when `average="binary"`.
    average (`str` or `None`, defaults to `"binary"`): `"binary"` (only `pos_label`), `"micro"` (global
        counts), `"macro"` (unweighted mean over labels), `"weighted"` (mean weighted by support),
        `"samples"` (per example, multi-label only) or `None` (one score per label).
    sample_weight (`list` of `float`, *optional*): Sample weights.
    zero_division (`"warn"`, `0`, `1` or `nan`, defaults to `"warn"`): The value returned when the score is
        undefined (a zero denominator).

Returns:
    precision (`float` or `array` of `float`): Precision (one per label when `average=None`), in [0, 1]. Higher is
    better.

Examples:
    >>> precision_metric = evaluate.load("precision")
    >>> precision_metric.compute(references=[0, 1, 0, 1, 0], predictions=[0, 0, 1, 1, 0])
    {'precision': 0.5}
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
class Precision(evaluate.Metric):
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
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.precision_score.html"
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="binary",
        sample_weight=None,
        zero_division="warn",
    ):
        score = precision_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        score = np.asarray(score)
        return {"precision": float(score) if score.size == 1 else score}
