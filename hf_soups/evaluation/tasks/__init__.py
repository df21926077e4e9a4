"""The evaluation tasks: one class per kind of model output, registered by name, and `infer_task` (config -> task).

Adding a task is one class (see [`Task`]) and one entry in [`TASK_CLASSES`].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import EvaluationError
from ..checks import input_limits
from .base import Collector, Predictions, Task, TaskContext
from .classification import Classification
from .custom import Custom
from .language_modeling import CausalLM, MaskedLM
from .token_classification import TokenClassification
from .zero_shot import ZeroShotClassification, is_dual_encoder

#: task name -> class (the names `task=` accepts, in this order)
TASK_CLASSES: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (Classification, ZeroShotClassification, TokenClassification, CausalLM, MaskedLM, Custom)
}
TASKS = tuple(TASK_CLASSES)


def make_task(name: str, **info: Any) -> Task:
    """The task object for `name` (one of [`TASKS`]), given what the config says (see [`Task`])."""
    return TASK_CLASSES[name](**info)


def infer_task(config: Mapping[str, Any] | None, model: Any = None) -> tuple[str | None, str | None]:
    """The evaluation task and problem type of a model, from its config (or class name).

    Args:
        config (`Mapping`, *optional*): the model's `config.json` as a dict.
        model (*optional*): a model instance, used when the config names no architecture.

    Returns:
        `(task, problem_type)`: `task` is one of [`TASKS`] (`None` when unknown); `problem_type` is
        `"single_label_classification"`, `"multi_label_classification"` or `"regression"` for classification
        (zero-shot classification of CLIP-family models, which have `get_text_features` and `get_image_features`,
        is single-label).

    Example:

    ```python
    >>> from hf_soups.evaluation import infer_task
    >>> infer_task({"architectures": ["BertForSequenceClassification"], "num_labels": 1})
    ('classification', 'regression')
    ```
    """
    config = dict(config or {})
    arch = (config.get("architectures") or [None])[0]
    if arch is None and model is not None:
        arch = type(model).__name__
        if arch.startswith("Peft"):
            base = getattr(getattr(model, "base_model", None), "model", None)
            arch = type(base).__name__ if base is not None else arch
    if not arch:
        return None, None
    if arch.endswith("ForTokenClassification"):
        return "token-classification", None
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel") and "DoubleHeads" not in arch:
        return "causal-lm", None
    if arch.endswith("ForMaskedLM"):
        return "masked-lm", None
    if arch.endswith(("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")):
        problem = config.get("problem_type")
        if problem is None:
            num_labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2) or 2)
            problem = "regression" if num_labels == 1 else None
        return "classification", problem
    if is_dual_encoder(arch, model):
        return "zero-shot-classification", "single_label_classification"
    return None, None


def task_for(
    config: Mapping[str, Any], model: Any = None, *, task: str | None = None, custom: bool = False
) -> Task:
    """The task object of a model: `task` if given, else inferred from its config; what the config says of labels.

    Args:
        config (`Mapping`): the model's config as a dict.
        model (*optional*): the model, when the config names no architecture.
        task (`str`, *optional*): the task the user forced (one of [`TASKS`]).
        custom (`bool`, *optional*, defaults to `False`): a `compute_metrics` is given, so an unknown model is a
            [`Custom`] task rather than an error.

    Raises:
        [`EvaluationError`]: the task is unknown and there is no `compute_metrics` to score it.
    """
    name, problem = infer_task(config, model)
    if task is not None:
        name = task
    if name is None:
        if not custom:
            arch = (config.get("architectures") or [type(model).__name__ if model is not None else None])[0]
            raise EvaluationError(
                f"Cannot tell how to score a {arch or 'model without architectures in its config'}: hf_soups "
                "scores sequence/image/audio classification, zero-shot classification with CLIP-family models, token "
                "classification and causal/masked language models. Pass compute_metrics= (a Trainer-style compute_metrics(EvalPrediction) -> dict)."
            )
        name = "custom"
    labels = config.get("id2label") or {}
    return make_task(
        name,
        num_labels=len(labels) or config.get("num_labels"),
        problem_type=problem if name == "classification" else None,
        label2id={str(k): int(v) for k, v in (config.get("label2id") or {}).items()} or None,
        vocab_size=input_limits(config).get("vocab_size"),
    )


__all__ = [
    "TASKS",
    "TASK_CLASSES",
    "Collector",
    "Predictions",
    "Task",
    "TaskContext",
    "infer_task",
    "make_task",
    "task_for",
]
