# Copyright 2026 The hf_soups developers. Licensed under the Apache License, Version 2.0.
"""Matthews correlation, bundled with hf_soups for air-gapped use (same inputs and outputs as the Hub's)."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import matthews_corrcoef

_DESCRIPTION = """
The Matthews correlation coefficient (MCC, phi coefficient) measures the quality of binary and multiclass
classifications, balanced even when the classes have very different sizes. It lies in [-1, 1]: +1 is a
perfect prediction, 0 no better than chance, -1 an inverse prediction.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels (config `"multilabel"`: one list of 0/1 per example).
    references (`list` of `int`): Ground truth labels, same layout as `predictions`.
    sample_weight (`list` of `float`, *optional*): Sample weights.
    average (`str` or `None`, *optional*): Multi-label only: `"macro"` averages the per-label coefficients,
        `None` returns one per label.

Returns:
    matthews_correlation (`float` or `array` of `float`): The coefficient, in [-1, 1]. Higher is better.

Examples:
    >>> mcc = evaluate.load("matthews_correlation")
    >>> round(mcc.compute(references=[1, 3, 2, 0, 3, 2], predictions=[1, 2, 2, 0, 3, 3])["matthews_correlation"], 2)
    0.54
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
class MatthewsCorrelation(evaluate.Metric):
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
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.matthews_corrcoef.html"
            ],
        )

    def _compute(self, predictions, references, sample_weight=None, average=None):
        if self.config_name == "multilabel":
            refs = np.asarray(references)
            preds = np.asarray(predictions)
            per_label = np.array(
                [
                    matthews_corrcoef(refs[:, i], preds[:, i], sample_weight=sample_weight)
                    for i in range(refs.shape[1])
                ]
            )
            if average == "macro":
                return {"matthews_correlation": float(per_label.mean())}
            if average is not None:
                raise ValueError(f"average must be 'macro' or None for multilabel inputs, got {average!r}")
            return {"matthews_correlation": per_label}
        if average is not None:
            raise ValueError("average is only used with the 'multilabel' config")
        return {
            "matthews_correlation": float(
                matthews_corrcoef(references, predictions, sample_weight=sample_weight)
            )
        }
