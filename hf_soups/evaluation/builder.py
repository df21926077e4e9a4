"""`build_evaluator`: every check that needs no model, done before any ingredient is read.

The eval sets, their label columns, the selection set and the options are checked, the metric is loaded (which
refuses untrusted metric code), and when the labels say enough about the task the metric and its key are tried
on made-up predictions; the task itself is learned later, when the evaluator is bound to the ingredients.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import EvaluationError, InvalidArgumentError
from ..lm_eval_task import as_lm_eval_task
from ..options import (
    OptionProblem,
    check_autocast,
    check_bool,
    check_class_names,
    check_dtype,
    check_templates,
)
from .data import collect_sets, find_label_columns, label_kind, no_labels_message
from .evaluator import Evaluator
from .metrics import load_metric
from .scoring import LOSS_METRICS
from .tasks import TASKS, infer_task, make_task

logger = logging.getLogger(__name__)


def build_evaluator(
    eval_dataset: Any,
    *,
    metric: Any = None,
    metric_key: str | None = None,
    greater_is_better: bool | None = None,
    select_on: str | None = None,
    compute_metrics: Callable[..., Mapping[str, float]] | None = None,
    tokenizer: Any = None,
    text_columns: str | Sequence[str] | None = None,
    label_column: str | None = None,
    image_processor: Any = None,
    class_names: Sequence[str] | None = None,
    templates: str | Sequence[str] | None = None,
    batch_size: int = 32,
    device: str | None = None,
    sort_by_length: bool = True,
    eval_dtype: Any = None,
    autocast: Any = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    task: str | None = None,
    max_length: int | None = None,
    config: Mapping[str, Any] | None = None,
    model: Any = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    prediction_cache_dir: str | os.PathLike | None = None,
) -> Evaluator:
    """Check the evaluation set-up and build an [`Evaluator`], before any model is loaded.

    Args:
        eval_dataset (`datasets.Dataset` or `dict[str, datasets.Dataset]`):
            Held-out data: pre-tokenized (model input columns such as `input_ids` plus `label`/`labels`) or raw
            text (see `text_columns`). A dict (or `DatasetDict`) names several sets; every set is scored.
        metric (`str`, `tuple`, `evaluate.EvaluationModule`, callable or `None`, *optional*):
            An `evaluate` metric name (`"f1"`; the bundled accuracy, f1, precision, recall, matthews_correlation,
            pearsonr and spearmanr work offline; others, such as `("glue", "mrpc")` or a local metric folder, run
            the metric's script and need `trust_remote_code=True`), a loaded module or `evaluate.combine(...)`,
            a callable `fn(predictions, references) -> dict | float`, or `"loss"` / `"perplexity"` (the model's
            own loss). `None` (the default) picks the task's: `"perplexity"` for causal and masked language
            models, `"accuracy"` for every other task (chosen once the model is known). An
            [`~hf_soups.LMEvalTask`] (or `"lm-eval:TASK"`) scores causal LMs on lm-eval tasks, which bring their
            own data: `eval_dataset` is then `None` (see `hf_soups.evaluation.lm_harness`).
        metric_key (`str`, *optional*):
            The number to maximise among the metric's outputs (default: the metric's own name, else its first
            output). Checked now by a dry call of the metric.
        greater_is_better (`bool`, *optional*):
            Direction of `metric_key`; defaults to `False` for losses, perplexity and error rates, else `True`.
        select_on (`str`, *optional*):
            The set that drives decisions when several are given (default: the first).
        compute_metrics (`Callable[[EvalPrediction], dict]`, *optional*):
            A `transformers.Trainer`-style function of `EvalPrediction(predictions=logits, label_ids=labels)`;
            replaces `metric`. Needed for models that are not classifiers or language models.
        tokenizer (*optional*):
            Tokenizer (or folder / Hub ID) for raw-text sets; defaults to the ingredients' tokenizer.
        text_columns (`str` or `Sequence[str]`, *optional*):
            Text column(s) of a raw set (two for sentence pairs; a column of word lists for token classification).
            Guessed from GLUE-style names (`text`, `sentence`, `sentence1`/`sentence2`, ...) when not given.
        label_column (`str`, *optional*):
            Label column (default: `labels`, `label` or `label_ids`). String labels are mapped with the model's
            `label2id`.
        image_processor (*optional*):
            Image processor (or folder / Hub ID) for sets with an image column (a `datasets.Image` feature, or an
            `image` / `img` column of PIL images); defaults to the ingredients' `preprocessor_config.json`
            (`AutoImageProcessor`). Images are converted to RGB (L for one-channel models) and preprocessed once.
        class_names (`Sequence[str]`, *optional*):
            Zero-shot classification of CLIP-family models (`CLIPModel`, `SiglipModel`, ...: models with
            `get_text_features` and `get_image_features`): the class names in label order. Defaults to the names
            of the label column's `datasets.ClassLabel`.
        templates (`str` or `Sequence[str]`, *optional*):
            Zero-shot prompt templates, each with one `{}` for the class name (default `"a photo of a {}."`); the
            prompt embeddings of a class are averaged over templates, as in the CLIP paper.
        batch_size (`int`, *optional*, defaults to 32):
            Evaluation batch size (per process).
        device (`str`, *optional*):
            `"cpu"`, `"cuda"`, `"cuda:1"` ... Default: the `accelerate` device (CUDA when available, else CPU).
        sort_by_length (`bool`, *optional*, defaults to `True`):
            Batch each set longest first (examples of similar length share a batch, so less padding is run);
            predictions come back in the set's own order. Sets of images or of one length are not reordered.
        eval_dtype (`str` or `torch.dtype`, *optional*):
            Hold the evaluated model in this dtype (`"float32"`, `"bfloat16"`, `"float16"`, `"float64"`); default:
            the dtype the model already has (the ingredients' own).
        autocast (`str` or `torch.dtype`, *optional*):
            `"bfloat16"` or `"float16"`: run forward passes under `torch.autocast` on the evaluation device.
        metric_kwargs (`Mapping`, *optional*):
            Extra arguments of the metric's `compute` (e.g. `{"average": "weighted"}`). f1, precision and recall
            on more than two classes default to `average="macro"`.
        task (`str`, *optional*):
            Force the task (one of `TASKS`) instead of reading it from the model config.
        max_length (`int`, *optional*):
            Truncation length when tokenizing raw text (default: the tokenizer's / model's limit).
        config (`Mapping`, *optional*), model (*optional*):
            The reference model's config dict (or the model); when given, the evaluator is bound at once.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over each eval set's batches (main process only; also off with
            `HF_HUB_DISABLE_PROGRESS_BARS=1`).
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow a `metric` that runs code: a local metric folder or script, or a Hub metric that is not bundled
            with hf_soups (`evaluate.load` imports its Python). Bundled metrics, `"loss"`/`"perplexity"`, modules
            and callables passed from Python need no opt-in.
        prediction_cache_dir (`str` or `os.PathLike`, *optional*):
            Keep ingredients' predictions in this folder and reuse them in later runs (see
            `hf_soups.evaluation.cache`); off by default.

    Returns:
        [`Evaluator`]

    Raises:
        [`~errors.UntrustedCodeError`]: a `metric` whose code would run, without `trust_remote_code=True`.
        [`EvaluationError`]: no eval set, an empty set, a set without labels, an unknown `select_on`, a metric
            that cannot be loaded online or offline, or a `metric_key` the metric does not return.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from hf_soups.evaluation import build_evaluator
    >>> val = Dataset.from_dict({"input_ids": [[2, 5, 3], [2, 7, 3]], "label": [0, 1]})
    >>> evaluator = build_evaluator({"val": val}, metric="f1")
    >>> evaluator.select_on, evaluator.metric_key
    ('val', 'f1')
    ```
    """
    lm_eval_task = as_lm_eval_task(metric)
    if lm_eval_task is not None:  # the task brings its data, prompts and scoring (evaluation/lm_harness.py)
        from .lm_harness import build_lm_eval_evaluator

        kwargs = {
            k: v
            for k, v in locals().items()
            if k not in ("metric", "lm_eval_task", "build_lm_eval_evaluator")
        }
        return build_lm_eval_evaluator(lm_eval_task, **kwargs)
    sets = collect_sets(eval_dataset)
    if select_on is None:
        select_on = next(iter(sets))
        if len(sets) > 1:
            logger.info("Several eval sets and no select_on: decisions are made on %r.", select_on)
    elif select_on not in sets:
        raise EvaluationError(f"select_on={select_on!r} is not one of the eval sets: {list(sets)}.")
    if task is not None and task not in TASKS:
        raise InvalidArgumentError(f"task={task!r}: use one of {', '.join(TASKS)}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size!r} must be a positive integer.")
    if compute_metrics is not None and not callable(compute_metrics):
        raise EvaluationError("compute_metrics must be a callable taking a transformers.EvalPrediction.")
    checked = {
        "sort_by_length": sort_by_length,
        "eval_dtype": eval_dtype,
        "autocast": autocast,
        "class_names": class_names,
        "templates": templates,
    }
    for key, check in (
        ("sort_by_length", check_bool),
        ("eval_dtype", check_dtype),
        ("autocast", check_autocast),
        ("class_names", check_class_names),
        ("templates", check_templates),
    ):
        if checked[key] is not None:
            try:
                checked[key] = check(checked[key], {})
            except OptionProblem as e:
                raise InvalidArgumentError(f"{key}: {e}") from None
    if isinstance(text_columns, str):
        text_columns = [text_columns]
    text_columns = list(text_columns) if text_columns else None
    if text_columns and len(text_columns) > 2:
        raise EvaluationError(f"text_columns={text_columns}: give one column, or two for sentence pairs.")

    label_columns = find_label_columns(sets, label_column)
    known_task = task or infer_task(config, model)[0]
    # Language models need no label column (the text is the target). When the task is not known yet (merge_models
    # builds the evaluator before reading any config), a set without labels is accepted only with a loss metric.
    lm_metric = metric is None or (isinstance(metric, str) and metric in LOSS_METRICS)
    for name, ds in sets.items():
        if label_columns[name] is not None or known_task in ("causal-lm", "masked-lm"):
            continue
        if known_task is None and lm_metric and compute_metrics is None:
            continue
        raise EvaluationError(no_labels_message(name, ds.column_names, lm_hint=known_task is None))

    loaded = None  # metric=None: the task's default, set up when the evaluator is bound (MetricScorer.set_up)
    if (
        compute_metrics is None
        and metric is not None
        and not (isinstance(metric, str) and metric in LOSS_METRICS)
    ):
        # UntrustedCodeError now for a metric script without the opt-in; EvaluationError if it cannot be loaded
        loaded = load_metric(metric, trust_remote_code=trust_remote_code)
    evaluator = Evaluator(
        sets,
        metric=loaded,
        metric_spec=metric,
        metric_kwargs=dict(metric_kwargs or {}),
        metric_key=metric_key,
        greater_is_better=greater_is_better,
        select_on=select_on,
        compute_metrics=compute_metrics,
        tokenizer=tokenizer,
        text_columns=text_columns,
        label_columns=label_columns,
        batch_size=batch_size,
        device=device,
        sort_by_length=checked["sort_by_length"] is not False,
        eval_dtype=checked["eval_dtype"],
        autocast=checked["autocast"],
        task=task,
        max_length=max_length,
        progress=progress,
        trust_remote_code=trust_remote_code,
        image_processor=image_processor,
        prediction_cache_dir=prediction_cache_dir,
        class_names=checked["class_names"],
        templates=checked["templates"],
    )
    if config is not None or model is not None:
        evaluator.bind(config=config, model=model)
    elif label_columns[select_on] is not None:
        # What can be checked before the task is known: the metric and its key, on a task guessed from a label.
        evaluator.check_metric_for(_guess_task(sets[select_on][0][label_columns[select_on]]))
    return evaluator


def _guess_task(label: Any):
    """Classification (single-label, multi-label or regression) or token classification, from one label."""
    kind = label_kind(label)
    if kind in ("sequence", "nested"):
        return make_task("token-classification")
    problem = {"float": "regression", "vector-or-sequence": "multi_label_classification"}.get(
        kind, "single_label_classification"
    )
    if kind == "int-or-float" and isinstance(label, float):
        problem = "regression"
    return make_task("classification", problem_type=problem)


__all__ = ["build_evaluator"]
