"""The evaluator: binds the eval sets to the ingredients' task, then scores models on every set.

[`Evaluator`] composes the pieces of this package: a task object ([`tasks`]) learned from the ingredients'
config, the prepared examples ([`data`], checked by [`checks`]), the metric ([`scoring`]), the decision rules
([`selection`]) and the accelerate runtime ([`runtime`]). It is what recipes see: `evaluate`, `primary`,
`better`, `sort_key`, and the logit-ensemble helpers.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError
from .cache import CACHE_FORMAT, PredictionCache, fingerprint_examples
from .checks import check_ranges, input_limits, input_ranges, model_limits
from .data import EvalSetPreparer, PreprocessorSource, TokenizerSource
from .early import EarlyStop, best_reachable, sum_metric
from .ensemble import add_predictions, mean_predictions
from .images import image_mode
from .results import annotate
from .runtime import (
    PadCollator,
    Runtime,
    example_lengths,
    forward_arguments,
    length_order,
    padded_positions,
)
from .scoring import MetricScorer
from .selection import Selector, SelectorMixin
from .tasks import TASK_CLASSES, Predictions, Task, TaskContext, task_for

if TYPE_CHECKING:  # pragma: no cover
    from ..ingredients import ResolvedIngredient
    from ..soup import Soup

logger = logging.getLogger(__name__)


class Evaluator(SelectorMixin):
    """Scores models on one or more held-out sets. Build it with [`build_evaluator`].

    Attributes:
        set_names (`list[str]`): the eval sets, in the order given.
        select_on (`str`): the set whose `metric_key` drives decisions.
        metric_key (`str`): the number maximised (or minimised when `greater_is_better=False`).
        greater_is_better (`bool`): direction of `metric_key`.
        metric_name (`str`): a readable name of the metric (for reports and model cards).
        task (`str`): one of [`TASKS`], known once the evaluator is bound to the ingredients.
        timings (`list[float]`): wall time of every `evaluate` call (seconds), for cost reports.
    """

    def __init__(
        self,
        datasets: dict[str, Any],
        *,
        metric: Any,
        metric_spec: Any,
        metric_kwargs: dict[str, Any],
        metric_key: str | None,
        greater_is_better: bool | None,
        select_on: str,
        compute_metrics: Callable[..., Mapping[str, float]] | None,
        tokenizer: Any,
        text_columns: list[str] | None,
        label_columns: dict[str, str | None],
        batch_size: int,
        device: str | None,
        task: str | None,
        max_length: int | None,
        progress: bool,
        trust_remote_code: bool = False,
        image_processor: Any = None,
        class_names: Sequence[str] | None = None,
        templates: str | Sequence[str] | None = None,
        prediction_cache_dir: str | os.PathLike | None = None,
        sort_by_length: bool = True,
        eval_dtype: str | None = None,
        autocast: str | None = None,
    ):
        self._datasets = datasets
        self._selector = Selector(
            select_on, metric_key, True if greater_is_better is None else bool(greater_is_better)
        )
        self._scorer = MetricScorer(
            metric=metric,
            spec=metric_spec,
            kwargs=metric_kwargs,
            compute_metrics=compute_metrics,
            metric_key=metric_key,
            greater_is_better=greater_is_better,
            selector=self._selector,
            trust_remote_code=trust_remote_code,
        )
        self._tokenizers = TokenizerSource(tokenizer)
        self._image_processors = PreprocessorSource(
            image_processor,
            auto_class="AutoImageProcessor",
            option="image_processor",
            fallback="a pixel_values column",
        )
        self._task_options = {"class_names": class_names, "templates": templates}
        self.text_columns = text_columns
        self._label_columns = label_columns
        self.batch_size = int(batch_size)
        self._runtime = Runtime(device, eval_dtype=eval_dtype, autocast=autocast)
        self.sort_by_length = bool(sort_by_length)
        self._orders: dict[str, list[int] | None] = {}  # per set: the batch order (None: the set's own)
        #: per eval set of token inputs: real tokens, positions run, and the padded fraction of them in the order
        #: used and in the set's own order (see [`describe_evaluation`])
        self.padding: dict[str, dict[str, Any]] = {}
        self._user_task = task
        self._task: Task | None = None
        self.max_length = max_length
        self.progress = progress
        self._examples: dict[str, list[dict[str, Any]]] | None = None
        self._pad_token_id = 0
        self._input_ranges: dict[str, dict[str, tuple[int, int]]] = {}
        self._models_checked: Any = None  # weakref.WeakSet of the models whose embeddings were checked
        self.timings: list[float] = []
        #: the on-disk cache of ingredients' predictions (`prediction_cache_dir=`), or None
        self.prediction_cache = (
            PredictionCache(prediction_cache_dir) if prediction_cache_dir is not None else None
        )
        self._fingerprints: dict[str, str] = {}
        self._select_units: int | None = (
            None  # units (examples / tokens) of select_on, from a full evaluation
        )

    # -------------------------------------------------------------------------------- description

    @property
    def set_names(self) -> list[str]:
        return list(self._datasets)

    @property
    def metric_name(self) -> str:
        return self._scorer.name

    @property
    def compute_metrics(self) -> Callable[..., Mapping[str, float]] | None:
        return self._scorer.compute_metrics

    @property
    def task(self) -> str | None:
        return self._task.name if self._task is not None else self._user_task

    @property
    def problem_type(self) -> str | None:
        return self._task.problem_type if self._task is not None else None

    @property
    def num_labels(self) -> int | None:
        return self._task.num_labels if self._task is not None else None

    @property
    def device(self):
        """The torch device models are evaluated on."""
        return self._runtime.device

    @property
    def num_processes(self) -> int:
        return self._runtime.num_processes

    @property
    def eval_dtype(self) -> str | None:
        """The dtype models are evaluated in (`None`: their own)."""
        return self._runtime.eval_dtype

    def __repr__(self) -> str:
        return (
            f"Evaluator(sets={self.set_names}, select_on={self.select_on!r}, metric={self.metric_name!r}, "
            f"metric_key={self.metric_key!r}, task={self.task!r})"
        )

    # -------------------------------------------------------------------------------- binding

    def bind(
        self,
        ingredients: Sequence[ResolvedIngredient] = (),
        *,
        base: ResolvedIngredient | None = None,
        tokenizer: Any = None,
        config: Mapping[str, Any] | None = None,
        model: Any = None,
    ) -> Evaluator:
        """Learn the task from the ingredients and prepare the eval sets (tokenized once, kept in memory).

        Called by `merge_models` after the ingredients are resolved and before any tensor is read.

        Args:
            ingredients (`Sequence[ResolvedIngredient]`): the resolved ingredients (the first is the reference).
            base (`ResolvedIngredient`, *optional*): the base model (its tokenizer is a fallback).
            tokenizer (*optional*): a tokenizer, or a folder / Hub ID to load one from.
            config (`Mapping`, *optional*): the model config, when there are no resolved ingredients.
            model (*optional*): a model instance, when there are no resolved ingredients.

        Returns:
            The evaluator itself.

        Raises:
            [`EvaluationError`]: the task cannot be scored with these inputs (no labels, no tokenizer for raw
                text, labels outside the model's label set, unknown task without `compute_metrics`).
        """
        members = [*ingredients, *([base] if base is not None else [])]
        if config is None and members:
            config = members[0].config
        if model is None and members:
            model = members[0].model
        if config is None and model is not None and hasattr(model, "config"):
            config = model.config.to_dict()
        config = dict(config or {})
        if tokenizer is not None:
            self._tokenizers.value = tokenizer
        self._tokenizers.members = members
        self._image_processors.members = members
        task = self._task = task_for(
            config, model, task=self._user_task, custom=self.compute_metrics is not None
        )
        task.configure(
            self._task_options,
            TaskContext(config, self._datasets, self._label_columns, self.select_on, self._tokenizers),
        )
        preparer = EvalSetPreparer(
            task,
            text_columns=self.text_columns,
            label_columns=self._label_columns,
            tokenizers=self._tokenizers,
            max_length=self.max_length,
            pad_token_id=config.get("pad_token_id"),
            images=self._image_processors,
            image_mode=image_mode(config),
        )
        self._examples = None
        self._fingerprints = {}
        self._select_units = None
        self._runtime.forget_loaders()
        limits = input_limits(config)
        examples = {}
        for name, ds in self._datasets.items():
            examples[name] = preparer.prepare(name, ds)
            task.check_labels(name, examples[name])
            self._input_ranges[name] = input_ranges(name, examples[name])
            check_ranges(name, self._input_ranges[name], limits, "the model config")
        self._examples = examples
        self._pad_token_id = preparer.pad_token_id
        self._plan_batches(examples)
        task.learn_from(examples[self.select_on])
        for name, prepared in examples.items():
            task.check_label_ranges(name, prepared)
        self._scorer.set_up(task)
        return self

    def _plan_batches(self, examples: Mapping[str, list[dict[str, Any]]]) -> None:
        """Each set's batch order (longest first with `sort_by_length`) and what padding either order runs."""
        self._orders, self.padding = {}, {}
        for name, prepared in examples.items():
            lengths = example_lengths(prepared)
            order = length_order(lengths)
            self._orders[name] = order if self.sort_by_length else None
            if lengths is None:
                continue
            tokens = sum(lengths)
            run = padded_positions(lengths, self.batch_size, self._orders[name])
            unsorted = padded_positions(lengths, self.batch_size)
            self.padding[name] = {
                "tokens": tokens,
                "positions": run,
                "padded_fraction": round(1 - tokens / run, 4) if run else 0.0,
                "padded_fraction_unsorted": round(1 - tokens / unsorted, 4) if unsorted else 0.0,
            }

    def describe_evaluation(self) -> dict[str, Any]:
        """How the eval sets were run, for `soup.report_extra["evaluation"]`: sorting, dtype, autocast, and per set
        the padded fraction of the token positions run (`padded_fraction`; `padded_fraction_unsorted`: what the
        set's own order would have run)."""
        return {
            "sort_by_length": self.sort_by_length,
            "eval_dtype": self.eval_dtype or "auto",
            "autocast": self._runtime.autocast,
            "batch_size": self.batch_size,
            "padding": {name: dict(info) for name, info in self.padding.items()},
        }

    def check_metric_for(self, task: Task) -> None:
        """Check the metric and its key against a task guessed from the labels, before binding.

        The key is resolved again when the evaluator is bound (unless the user named it).
        """
        self._scorer.set_up(task)
        if self._scorer.user_key is None:
            self._scorer.key_checked = False

    def _check_model_inputs(self, model: Any) -> None:
        """The eval sets' id ranges against the model's own embedding tables (once per model, no forward pass)."""
        if self._models_checked is None:
            self._models_checked = weakref.WeakSet()
        try:
            if model in self._models_checked:
                return
        except TypeError:  # not weak-referenceable: check every time (cheap)
            pass
        limits = model_limits(model)
        for name in self._datasets:
            check_ranges(name, self._input_ranges.get(name, {}), limits, "the model's embeddings")
        try:
            self._models_checked.add(model)
        except TypeError:
            pass

    # -------------------------------------------------------------------------------- running models

    def predict(
        self,
        model: Any,
        *,
        names: Sequence[str] | None = None,
        stop: Callable[[Any], Callable[[], bool] | None] | None = None,
    ) -> dict[str, Predictions]:
        """Run `model` over every eval set (or those in `names`) and gather what the metrics need (on every process).

        `stop(collector)`, when given, may return a check that [`Runtime.run`] asks after each batch of that set
        (early rejection).
        """
        if self._examples is None:
            self.bind(config=model.config.to_dict() if hasattr(model, "config") else {}, model=model)
        self._check_model_inputs(model)
        task, runtime = self._task, self._runtime
        collate = PadCollator(self._pad_token_id or 0, causal_labels=task.labels_from_inputs)
        out: dict[str, Predictions] = {}
        with runtime.evaluating(model):
            forward = task.forward(model, device=runtime.device, batch_size=self.batch_size)
            for name in self._datasets if names is None else names:
                loader = runtime.loader(
                    name,
                    self._examples[name],
                    batch_size=self.batch_size,
                    collate_fn=collate,
                    order=self._orders.get(name),
                )
                collector = task.collector(runtime.gather, keep_raw=self.compute_metrics is not None)
                out[name] = runtime.run(
                    model,
                    loader,
                    collector,
                    desc=f"Evaluating on {name}",
                    progress=self.progress,
                    forward=forward,
                    stop=stop(collector) if stop is not None else None,
                )
        return out

    def score(self, predictions: Mapping[str, Predictions]) -> dict[str, dict[str, float]]:
        """Metrics of gathered predictions, per eval set."""
        scores = {name: self._scorer.score(self._task, outputs) for name, outputs in predictions.items()}
        if not self._scorer.key_checked:
            self._scorer.adopt_keys(list(scores[self.select_on]))
        return scores

    def examples(self, name: str | None = None) -> list[dict[str, Any]]:
        """The prepared (tokenized, checked) examples of eval set `name` (default: `select_on`), whole on every process."""
        if self._examples is None:
            raise EvaluationError("internal error: the evaluator is not bound to the ingredients yet.")
        return self._examples[name or self.select_on]

    def loss_sum(self, model: Any, examples: Sequence[dict[str, Any]]) -> tuple[Any, int]:
        """The task's loss of `model` on one batch of prepared examples, summed, with gradients (learned soups).

        The batch is padded as evaluation batches are and run on the evaluation device, in the model's current
        mode, outside `inference_mode`; nothing is gathered across processes.

        Args:
            model (`PreTrainedModel`): the model (moved to the evaluation device when it is elsewhere).
            examples (`Sequence[dict]`): examples as [`examples`] returns them.

        Returns:
            `tuple[torch.Tensor, int]`: the summed loss (a scalar with gradients) and what it sums over (examples,
            or scored tokens); their ratio is the `loss` that [`evaluate`] reports.

        Raises:
            [`EvaluationError`]: the task has no loss hf_soups knows (`compute_metrics` tasks).
        """
        task = self._task
        device = self.device
        first = next(iter(model.parameters()), None)
        if first is not None and first.device != device:
            model.to(device)
        batch = PadCollator(self._pad_token_id or 0, causal_labels=task.labels_from_inputs)(list(examples))
        labels = batch.pop("labels", None)
        accepted = forward_arguments(model)
        output = model(**{k: v.to(device) for k, v in batch.items() if accepted is None or k in accepted})
        logits = output.logits if hasattr(output, "logits") else output[0]
        return task.loss_sum(logits.float(), labels.to(device) if labels is not None else None)

    def evaluate(self, model: Any) -> dict[str, dict[str, float]]:
        """Score `model` on every eval set.

        Args:
            model (`PreTrainedModel`): the model to score (moved to the evaluation device; left in eval mode
                only if it was).

        Returns:
            `dict[str, dict[str, float]]`: per eval set, every metric (plus `loss`, and `perplexity` for language
            models). Identical on every process of a distributed run.

        Example:

        ```python
        >>> scores = evaluator.evaluate(model)  # doctest: +SKIP
        >>> scores["validation"]["accuracy"], evaluator.primary(scores)  # doctest: +SKIP
        ```
        """
        return self.evaluate_with_predictions(model)[0]

    def evaluate_with_predictions(
        self, model: Any
    ) -> tuple[dict[str, dict[str, float]], dict[str, Predictions]]:
        """Like [`evaluate`], also returning the gathered predictions (for logit ensembles)."""
        start = time.perf_counter()
        predictions = self.predict(model)
        scores = self.score(predictions)
        self._learn_units(predictions)
        self.timings.append(time.perf_counter() - start)
        logger.debug("Evaluated %s: %s", type(model).__name__, scores)
        return scores, predictions

    # -------------------------------------------------------------------------------- early rejection

    def _learn_units(self, predictions: Mapping[str, Predictions]) -> None:
        """Count the selection set's units (examples or scored tokens) from a complete evaluation, once."""
        if self._select_units is not None or self.select_on not in predictions:
            return
        metric = sum_metric(self._task, self._scorer, self._selector)
        if metric is not None:
            self._select_units = metric.totals(predictions[self.select_on])[1]

    def can_reject_early(self) -> bool:
        """Whether [`evaluate_candidate`] can stop before the end of the selection set: its score is a known sum
        (see `hf_soups.evaluation.early`) and the set's size in units is known from a complete evaluation."""
        return (
            self._select_units is not None
            and sum_metric(self._task, self._scorer, self._selector) is not None
        )

    def evaluate_candidate(
        self, model: Any, current: float, *, strict: bool = False
    ) -> tuple[dict[str, dict[str, float]], EarlyStop | None]:
        """Score a candidate that is kept only if [`better`]`(its score, current, strict)`; stop once it cannot be.

        When the selection score is a sum over examples or tokens (accuracy, the task's loss, perplexity: see
        `hf_soups.evaluation.early`), the selection set is scored first, batch by batch, and the pass stops as
        soon as even a perfect rest of the set could not keep the candidate; the other sets are then skipped.
        Otherwise (or when the candidate may still be kept) every set is scored in full, as [`evaluate`] does, so
        the decision is always the one a full evaluation gives.

        Args:
            model (`PreTrainedModel`): the candidate.
            current (`float`): the score to match (the soup's, on `select_on`).
            strict (`bool`, *optional*, defaults to `False`): the candidate must beat `current`, not only match it.

        Returns:
            `tuple`: the scores (on a stop: only `select_on`'s, on the units scored: partial) and the
            [`~hf_soups.evaluation.early.EarlyStop`] (`None` when the evaluation went to the end).
        """
        if not self.can_reject_early():
            return self.evaluate(model), None
        metric, units = sum_metric(self._task, self._scorer, self._selector), self._select_units
        start = time.perf_counter()
        stopped: list[EarlyStop] = []

        def stop_for(collector: Any) -> Callable[[], bool]:
            prefix = metric.tracker(collector)

            def check() -> bool:
                total, done = prefix.update()
                if done >= units:
                    return False
                bound = best_reachable(metric, total, done, units)
                if self.better(bound, current, strict=strict):
                    return False
                stopped.append(EarlyStop(units=done, of=units, unit=metric.unit, bound=bound))
                return True

            return check

        predictions = self.predict(model, names=[self.select_on], stop=stop_for)
        if not stopped:
            others = [name for name in self.set_names if name != self.select_on]
            predictions.update(self.predict(model, names=others))
            predictions = {name: predictions[name] for name in self.set_names}
        scores = self.score(predictions)
        self.timings.append(time.perf_counter() - start)
        return scores, (stopped[0] if stopped else None)

    # -------------------------------------------------------------------------------- cached predictions

    def cache_key(self, set_name: str, model: Any, weights: Mapping[str, Any]) -> dict[str, Any]:
        """What determines the predictions of `weights` on eval set `set_name` (see `hf_soups.evaluation.cache`)."""
        if set_name not in self._fingerprints:
            self._fingerprints[set_name] = fingerprint_examples(self.examples(set_name))
        task = self._task
        first = next(iter(model.parameters()), None)
        return {
            "format": CACHE_FORMAT,
            "weights": dict(weights),
            "eval_set": self._fingerprints[set_name],
            "task": {
                "name": task.name,
                "problem_type": task.problem_type,
                "num_labels": task.num_labels,
                "options": self._task_options,
                "raw": self.compute_metrics is not None,
            },
            "metric": {"name": self.metric_name, "kwargs": self._scorer.kwargs},
            "batch_size": self.batch_size,
            # the batches' make-up changes padding, hence the last bits of some models' outputs
            "sort_by_length": self._orders.get(set_name) is not None,
            "device": self.device.type,
            "dtype": (
                f"torch.{self.eval_dtype}"
                if self.eval_dtype is not None
                else str(first.dtype)
                if first is not None
                else None
            ),
            "autocast": self._runtime.autocast,
        }

    def evaluate_member(
        self, model: Any, load: Callable[[], None], *, weights: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, dict[str, float]], dict[str, Predictions]]:
        """Scores and predictions of one ingredient, from the prediction cache where it has them.

        Args:
            model (`PreTrainedModel`): the live model.
            load (`Callable[[], None]`): writes the ingredient into `model` (called only when a set must be run).
            weights (`Mapping`, *optional*): the weights' identity (commit or content hash); without it, or
                without `prediction_cache_dir`, the ingredient is simply evaluated.

        Returns:
            `tuple`: scores per set, and the predictions per set.
        """
        cache = self.prediction_cache
        if cache is None or weights is None:
            load()
            return self.evaluate_with_predictions(model)
        if self._examples is None:
            self.bind(config=model.config.to_dict() if hasattr(model, "config") else {}, model=model)
        keys = {name: self.cache_key(name, model, weights) for name in self.set_names}
        found = {name: cache.load(key) for name, key in keys.items()}
        # every process must run the same sets (they gather together): a set is reused only where all have it
        have = self._runtime.all_processes([found[name] is not None for name in self.set_names])
        missing = [name for name, ok in zip(self.set_names, have) if not ok]
        start = time.perf_counter()
        predictions: dict[str, Predictions] = {}
        if missing:
            load()
            predictions = self.predict(model, names=missing)
            if self._runtime.is_main_process:
                for name in missing:
                    cache.store(keys[name], predictions[name])
        for name in self.set_names:
            if name not in predictions:
                predictions[name] = found[name]
        predictions = {name: predictions[name] for name in self.set_names}
        scores = self.score(predictions)
        self._learn_units(predictions)
        if missing:
            self.timings.append(time.perf_counter() - start)
        logger.info(
            "Prediction cache: %d of %d eval set(s) reused for this ingredient.",
            len(self.set_names) - len(missing),
            len(self.set_names),
        )
        return scores, predictions

    # -------------------------------------------------------------------------------- ensembles and soups

    def supports_ensemble(self) -> bool:
        """Whether logit ensembles can be scored (classification and token classification)."""
        return self.task in TASK_CLASSES and TASK_CLASSES[self.task].supports_ensemble

    add_predictions = staticmethod(add_predictions)

    def score_ensemble(self, total: dict[str, Predictions], n_models: int) -> dict[str, dict[str, float]]:
        """Scores of the mean logits of `n_models` models summed with [`add_predictions`]."""
        return self.score(mean_predictions(total, n_models))

    def score_soup(self, soup: Soup, model: Any) -> None:
        """Evaluate the finished soup's model and record `score`, `scores`, `metric_name` and `select_on`."""
        self.annotate(soup, self.evaluate(model))

    def annotate(self, soup: Soup, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record these scores as the soup's own."""
        annotate(soup, scores, self._selector)


__all__ = ["Evaluator"]
