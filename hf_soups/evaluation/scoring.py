"""The metric: loading it for the task, checking its key by a dry run, and turning predictions into scores.

[`MetricScorer`] holds what the user asked for (an `evaluate` metric, a callable, `"loss"`/`"perplexity"`, or a
Trainer-style `compute_metrics`), sets task-dependent defaults (`average="macro"` on more than two classes, the
`multilabel` configuration), calls the metric on made-up predictions before any model runs so that a wrong
`metric_key` fails at once, and resolves the key and its direction onto the [`Selector`].
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError
from .metrics import load_metric
from .tasks.base import pad_np

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .selection import Selector
    from .tasks import Predictions, Task

logger = logging.getLogger(__name__)

#: Pseudo-metrics computed from the model's own loss (no `evaluate` module needed).
LOSS_METRICS = ("loss", "perplexity")
_LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae", "rmse", "wer", "cer")
_AVERAGED_METRICS = ("f1", "precision", "recall")
_MULTILABEL_METRICS = ("accuracy", "f1", "precision", "recall", "matthews_correlation")
_LANGUAGE_MODEL_TASKS = ("causal-lm", "masked-lm")


def default_metric(task: str | None) -> str:
    """The metric `metric=None` stands for: the model's own held-out perplexity for language models (their text is
    the target; no labels), accuracy for every other task."""
    return "perplexity" if task in _LANGUAGE_MODEL_TASKS else "accuracy"


def to_float_dict(result: Any, default_key: str) -> dict[str, float]:
    """A metric result as `{name: float}` (scalars only; per-label arrays are left out)."""
    if result is None:
        return {}
    if isinstance(result, numbers.Real) or (hasattr(result, "ndim") and getattr(result, "ndim", 1) == 0):
        return {default_key: float(result)}
    if not isinstance(result, Mapping):
        raise EvaluationError(
            f"The metric returned {type(result).__name__}; it must return a dict of numbers (or one number)."
        )
    out: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, numbers.Real) or (hasattr(value, "ndim") and value.ndim == 0):
            out[str(key)] = float(value)
        elif hasattr(value, "__len__") and len(value) == 1:
            try:
                out[str(key)] = float(value[0])
            except (TypeError, ValueError):
                logger.debug("Metric value %r is not a number; left out of the scores.", key)
        else:
            logger.debug("Metric value %r is not a scalar; left out of the scores.", key)
    return out


def loss_last(result: dict[str, float]) -> dict[str, float]:
    """The metric's own numbers first, then loss and perplexity (for readable reports)."""
    ordered = {k: v for k, v in result.items() if k not in LOSS_METRICS}
    ordered.update({k: result[k] for k in LOSS_METRICS if k in result})
    return ordered


def lower_is_better(key: str) -> bool:
    """Whether a metric key is a loss or an error rate (its default direction)."""
    return key in _LOWER_IS_BETTER or key.endswith("_loss") or key.endswith("loss")


class MetricScorer:
    """The metric side of an evaluator. Built by `build_evaluator`; [`set_up`] once the task is known.

    Args:
        metric: the loaded metric (an evaluation module or a callable), `None` for losses or `compute_metrics`.
        spec: what the user passed as `metric` (a name, a tuple, a module, a callable).
        kwargs (`dict`): extra arguments of the metric's `compute` (task defaults are added to it).
        compute_metrics (`Callable`, *optional*): a Trainer-style function; replaces the metric.
        metric_key (`str`, *optional*), greater_is_better (`bool`, *optional*): as the user gave them.
        selector ([`Selector`]): receives the resolved key and direction.
        trust_remote_code (`bool`): whether a metric script may run (a metric reloaded for the task).
    """

    def __init__(
        self,
        *,
        metric: Any,
        spec: Any,
        kwargs: Mapping[str, Any],
        compute_metrics: Callable[..., Mapping[str, float]] | None,
        metric_key: str | None,
        greater_is_better: bool | None,
        selector: Selector,
        trust_remote_code: bool,
    ):
        self.metric = metric
        self.spec = spec
        #: the user gave no metric: `spec` is the default of the task the scorer is set up for (`default_metric`)
        self.default_spec = spec is None and compute_metrics is None
        self.kwargs = dict(kwargs)
        self.compute_metrics = compute_metrics
        self.user_key = metric_key
        self.user_greater = greater_is_better
        self.selector = selector
        self.trust_remote_code = trust_remote_code is True
        #: whether the selector's key was checked against real (or dry-run) outputs
        self.key_checked = False

    @property
    def name(self) -> str:
        """A readable name of the metric (for reports and model cards)."""
        if self.compute_metrics is not None:
            return getattr(self.compute_metrics, "__name__", "compute_metrics")
        spec = self.spec
        if spec is None:  # metric=None before the task is known (see `set_up`)
            return "the task's default metric"
        if isinstance(spec, tuple):
            return "/".join(str(s) for s in spec)
        if isinstance(spec, str):
            return spec
        name = getattr(spec, "name", None) or getattr(spec, "__name__", None)
        if name is None and hasattr(spec, "evaluation_modules"):
            name = "+".join(getattr(m, "name", "?") for m in spec.evaluation_modules)
        return str(name or type(spec).__name__)

    # -------------------------------------------------------------------------------- set-up

    def set_up(self, task: Task) -> None:
        """Defaults that depend on the task, then a dry call of the metric to check `metric_key`."""
        if self.default_spec:  # again for each task: a guess from the labels first, then the bound model's
            self.spec, self.metric = default_metric(task.name), None
        spec = self.spec
        problem = task.problem_type
        if self.compute_metrics is None and isinstance(spec, str) and spec not in LOSS_METRICS:
            config_name = None
            if problem == "multi_label_classification" and spec in _MULTILABEL_METRICS:
                config_name = "multilabel"
            self.metric = load_metric(spec, config_name=config_name, trust_remote_code=self.trust_remote_code)
            n_classes = task.n_classes
            multi = problem == "multi_label_classification"
            if spec in _AVERAGED_METRICS and "average" not in self.kwargs and ((n_classes or 2) > 2 or multi):
                self.kwargs["average"] = "macro"
                logger.info(
                    "Metric %r on %s classes: using average='macro' (pass metric_kwargs={'average': ...} to change).",
                    spec,
                    n_classes,
                )
            if spec == "matthews_correlation" and config_name == "multilabel":
                self.kwargs.setdefault("average", "macro")
            if problem == "regression" and spec in _MULTILABEL_METRICS:
                raise EvaluationError(
                    f"metric={spec!r} needs class predictions, but the model is a regression model (one output); "
                    "pass metric='pearsonr', 'spearmanr' or 'loss'."
                )
        keys = self._dry_keys(task)
        if keys is not None:  # None: cannot know before the first real evaluation
            self.adopt_keys(keys)

    def _dry_keys(self, task: Task) -> list[str] | None:
        """The keys the metric returns, from a call on a handful of made-up predictions."""
        if self.compute_metrics is not None:
            return self._dry_compute_metrics(task)
        outputs = task.dry_outputs()
        if outputs is None:
            return None
        try:
            return list(self.score_outputs(task, outputs))
        except EvaluationError:
            raise
        except Exception as err:
            raise EvaluationError(
                f"Metric {self.name!r} fails on a small dry run ({type(err).__name__}: {err}). Check "
                "metric_kwargs= (e.g. average='macro' for more than two classes) and the metric's inputs."
            ) from err

    def _dry_compute_metrics(self, task: Task) -> list[str] | None:
        from transformers import EvalPrediction

        dry = task.dry_eval_prediction()
        if dry is None:
            return None
        try:
            result = self.compute_metrics(EvalPrediction(predictions=dry[0], label_ids=dry[1]))
            keys = list(to_float_dict(result, "compute_metrics"))
        except (
            Exception
        ) as err:  # made-up data may not suit a user function: check after the first evaluation
            logger.debug(
                "compute_metrics dry run failed (%s); metric_key is checked after the first evaluation.", err
            )
            return None
        return keys + ["loss"]

    def adopt_keys(self, keys: Sequence[str]) -> None:
        """Resolve `metric_key` among the metric's outputs (and its direction) onto the selector.

        Raises:
            [`EvaluationError`]: the user's `metric_key` is not among `keys`.
        """
        keys = list(keys)
        wanted = self.user_key
        if wanted is not None:
            if wanted not in keys and wanted.startswith("eval_") and wanted[5:] in keys:
                wanted = wanted[5:]
            if wanted not in keys:
                raise EvaluationError(
                    f"metric_key={self.user_key!r} is not among the outputs of metric {self.name!r}: {keys}. Pass "
                    "one of them as metric_key=."
                )
            key = wanted
        else:
            spec = self.spec if self.compute_metrics is None else None
            metric_keys = [k for k in keys if k not in LOSS_METRICS]
            if isinstance(spec, str) and spec in keys:
                key = spec
            elif metric_keys:
                key = metric_keys[0]
                if len(metric_keys) > 1:
                    logger.info(
                        "Selecting on %r (the metric returns %s; pass metric_key= to choose).", key, keys
                    )
            else:
                key = "perplexity" if "perplexity" in keys else keys[0]
        self.selector.metric_key = key
        if self.user_greater is None:
            self.selector.greater_is_better = not lower_is_better(key)
        self.key_checked = True

    # -------------------------------------------------------------------------------- scoring

    def score(self, task: Task, out: Predictions) -> dict[str, float]:
        """The scores of one eval set's predictions: the metric's numbers first, then loss (and perplexity)."""
        return loss_last(self.score_outputs(task, out))

    def score_outputs(self, task: Task, out: Predictions) -> dict[str, float]:
        if self.compute_metrics is not None and (out.raw_logits or out.logits is not None):
            return self._score_compute_metrics(task, out)
        return task.score(out, self._call_metric if self.metric is not None else None)

    def _call_metric(self, preds: np.ndarray, refs: np.ndarray) -> dict[str, float]:
        metric = self.metric
        compute = metric.compute if hasattr(metric, "compute") else metric
        result = compute(predictions=preds.tolist(), references=refs.tolist(), **self.kwargs)
        return to_float_dict(result, getattr(metric, "__name__", None) or self.name)

    def _score_compute_metrics(self, task: Task, out: Predictions) -> dict[str, float]:
        import numpy as np
        from transformers import EvalPrediction

        if out.raw_logits:
            width = max(x.shape[1] for x in out.raw_logits) if out.raw_logits[0].ndim >= 2 else None
            if out.raw_logits[0].ndim >= 3:
                logits = np.concatenate([pad_np(x, width, -100.0) for x in out.raw_logits])
                labels = np.concatenate([pad_np(y, width, -100) for y in out.raw_labels])
            else:
                logits = np.concatenate(out.raw_logits)
                labels = np.concatenate(out.raw_labels) if out.raw_labels[0] is not None else None
        else:  # an ensemble's mean logits
            logits, labels = out.logits, out.labels
        result = to_float_dict(
            self.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)), "compute_metrics"
        )
        task.add_own_scores(result, out)
        return result


__all__ = ["LOSS_METRICS", "MetricScorer", "loss_last", "lower_is_better", "to_float_dict"]
