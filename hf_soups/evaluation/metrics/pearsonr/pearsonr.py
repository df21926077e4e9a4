# Copyright 2026 The hf_soups developers. Licensed under the Apache License, Version 2.0.
"""Pearson correlation, bundled with hf_soups for air-gapped use (same inputs and outputs as the Hub's `pearsonr`)."""

import datasets
import evaluate
from scipy.stats import pearsonr as _pearsonr

_DESCRIPTION = """
The Pearson correlation coefficient measures the linear relationship between predictions and references, in [-1, 1]; the p-value tests the hypothesis of no correlation (it assumes roughly normal data).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): Predicted scores (e.g. the output of a regression head).
    references (`list` of `float`): Ground truth scores.
    return_pvalue (`bool`, defaults to `False`): Also return the p-value under the key `"p-value"`.

Returns:
    pearsonr (`float`): The correlation coefficient, in [-1, 1]. Higher is better.
    p-value (`float`): Only when `return_pvalue=True`.

Examples:
    >>> metric = evaluate.load("pearsonr")
    >>> round(metric.compute(predictions=[1.0, 2.0, 3.0, 5.0], references=[1.0, 2.0, 3.0, 4.0])["pearsonr"], 2) > 0.9
    True
"""

_CITATION = """
@article{2020SciPy-NMeth,
  author={Virtanen, Pauli and Gommers, Ralf and Oliphant, Travis E. and others},
  title={{SciPy} 1.0: Fundamental Algorithms for Scientific Computing in Python},
  journal={Nature Methods},
  year={2020},
  volume={17},
  pages={261--272},
  doi={10.1038/s41592-019-0686-2}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Pearsonr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float"), "references": datasets.Value("float")}
            ),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.pearsonr.html"],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        result = _pearsonr(references, predictions)
        if return_pvalue:
            return {"pearsonr": float(result[0]), "p-value": float(result[1])}
        return {"pearsonr": float(result[0])}
