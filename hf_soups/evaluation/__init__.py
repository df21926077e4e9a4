"""Held-out evaluation: the scores that greedy soups and WiSE-FT sweeps decide on.

[`build_evaluator`] checks everything it can before any tensor is read (eval sets, labels, the metric, the
metric key, the selection set); [`Evaluator.bind`] then learns the task from the ingredients' config
(sequence / image classification, multi-label, regression, token classification, causal or masked language
modelling, zero-shot classification of CLIP-family models, or anything else through a Trainer-style
`compute_metrics`), tokenizes raw text once and preprocesses images once (`images`).

[`Evaluator.evaluate`] runs a model over every eval set under `accelerate`: the dataloader is prepared by an
`Accelerator` and predictions are collected with `gather_for_metrics`, so `torchrun --nproc_per_node 2` (or
`accelerate launch` on GPUs) splits the batches across processes and every process computes the same scores,
and hence takes the same greedy decisions, as a single process would.

Modules: `builder` (checks before any model), `evaluator` (the runner), `data` (eval-set preparation), `images`
(image sets and their processor), `checks`
(input validation), `tasks/` (one class per task), `scoring` (metric set-up, key, scores), `selection` (decision
rules), `early` (stopping a greedy candidate that can no longer be kept), `cache` (the opt-in prediction cache),
`runtime` (accelerate, dataloaders, gathering), `ensemble` (logit ensembles), `results` (scores onto a
soup), `metrics/` (bundled offline metrics). Nothing here imports torch, transformers, evaluate or accelerate at
import time.
"""

from __future__ import annotations

from .builder import build_evaluator
from .data import MODEL_INPUT_COLUMNS
from .evaluator import Evaluator
from .scoring import LOSS_METRICS
from .tasks import TASKS, infer_task

__all__ = ["Evaluator", "LOSS_METRICS", "MODEL_INPUT_COLUMNS", "TASKS", "build_evaluator", "infer_task"]
