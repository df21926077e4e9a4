"""Metrics for held-out evaluation, with offline copies of the common classification metrics.

`evaluate.load("accuracy")` downloads the metric script from the Hugging Face Hub, so it fails on an air-gapped
machine. hf_soups ships real `evaluate.Metric` modules for the metrics a soup is most often selected on
(accuracy, f1, precision, recall, matthews_correlation, pearsonr, spearmanr) in this package, one folder per
metric, with the same inputs, outputs and options as the Hub versions. [`load_metric`] tries the Hub first
(unless `HF_HUB_OFFLINE` or `HF_EVALUATE_OFFLINE` is set) and falls back to the bundled copy, logging one line.

Importing this module is cheap: `evaluate` (about 6 s to import) is imported only when a metric is loaded.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ..errors import EvaluationError

if TYPE_CHECKING:  # pragma: no cover
    import evaluate

logger = logging.getLogger(__name__)

#: Metrics shipped with hf_soups as `evaluate.Metric` modules (usable with no network).
BUNDLED_METRICS: tuple[str, ...] = (
    "accuracy",
    "f1",
    "precision",
    "recall",
    "matthews_correlation",
    "pearsonr",
    "spearmanr",
)

_METRICS_DIR = Path(__file__).resolve().parent
_TRUE = {"1", "ON", "YES", "TRUE"}
_cache: dict[tuple[str, str | None], Any] = {}
_cache_lock = threading.Lock()

MetricSpec = Union[
    str, tuple, "evaluate.EvaluationModule", "evaluate.CombinedEvaluations", Callable[..., Any]
]


def bundled_metric_path(name: str) -> Path:
    """Folder of the bundled copy of metric `name` (a directory `evaluate.load` accepts).

    Args:
        name (`str`):
            One of [`BUNDLED_METRICS`].

    Returns:
        `pathlib.Path`: the metric's folder inside the installed package.

    Raises:
        [`EvaluationError`]: `name` is not bundled.
    """
    if name not in BUNDLED_METRICS:
        raise EvaluationError(
            f"No bundled copy of metric {name!r}; hf_soups ships {', '.join(BUNDLED_METRICS)}. Pass an "
            "`evaluate.EvaluationModule` you loaded yourself (e.g. `evaluate.load('./path/to/metric')`) or a callable."
        )
    return _METRICS_DIR / name


def is_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` or `HF_EVALUATE_OFFLINE` asks for no network (read at call time)."""
    return any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))


def is_evaluation_module(obj: Any) -> bool:
    """Whether `obj` is an `evaluate.EvaluationModule` or `evaluate.CombinedEvaluations` (without importing evaluate)."""
    return any(cls.__name__ in ("EvaluationModule", "CombinedEvaluations") for cls in type(obj).__mro__)


def load_metric(spec: MetricSpec, *, config_name: str | None = None) -> Any:
    """Load a metric the way `evaluate` users expect, working offline for the common metrics.

    Args:
        spec (`str`, `tuple`, `evaluate.EvaluationModule`, `evaluate.CombinedEvaluations` or callable):
            - a metric name on the Hub (`"accuracy"`, `"f1"`, `"glue"`), or a local metric folder / script;
            - a `(name, config_name)` tuple such as `("glue", "mrpc")`;
            - an already loaded `evaluate.EvaluationModule` or `evaluate.combine([...])` (returned as is);
            - a callable `fn(predictions, references) -> dict[str, float] | float` (returned as is).
        config_name (`str`, *optional*):
            Configuration of a named metric (e.g. `"multilabel"`); the tuple form sets it too.

    Returns:
        The evaluation module (or the callable). Named metrics are cached per process and loaded with
        `keep_in_memory=True`, so nothing is written to the evaluate cache while scoring.

    Raises:
        [`EvaluationError`]: the metric cannot be loaded from the Hub, from a local path or from the bundled
            copies (with the reason and what to pass instead).

    Example:

    ```python
    >>> from hf_soups.metrics import load_metric
    >>> accuracy = load_metric("accuracy")  # the Hub's, or the bundled copy when offline
    >>> accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"]
    0.666...
    ```
    """
    if isinstance(spec, tuple):
        if len(spec) != 2 or not all(isinstance(part, str) for part in spec):
            raise EvaluationError(f"A metric tuple must be (name, config_name), got {spec!r}.")
        spec, config_name = spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        if is_evaluation_module(spec) or callable(spec):
            return spec
        raise EvaluationError(
            f"metric must be a name, a (name, config) tuple, an evaluate.EvaluationModule or a callable; "
            f"got {type(spec).__name__}."
        )
    key = (spec, config_name)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load_named(spec, config_name)
        return _cache[key]


def _load_named(name: str, config_name: str | None) -> Any:
    import evaluate

    kwargs: dict[str, Any] = {"keep_in_memory": True}
    if config_name is not None:
        kwargs["config_name"] = config_name
    local = Path(name).expanduser()
    if local.exists():
        try:
            return evaluate.load(str(local), **kwargs)
        except Exception as err:
            raise EvaluationError(f"Cannot load the metric at {local}: {err}") from err

    bundled = name in BUNDLED_METRICS
    if bundled and is_offline():
        logger.info("Offline mode: using hf_soups' bundled copy of metric %r.", name)
        return evaluate.load(str(bundled_metric_path(name)), **kwargs)
    try:
        return evaluate.load(name, **kwargs)
    except Exception as err:  # evaluate turns a connection failure into FileNotFoundError
        if bundled:
            logger.info(
                "Could not load metric %r from the Hugging Face Hub (%s: %s); using hf_soups' bundled copy.",
                name,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            return evaluate.load(str(bundled_metric_path(name)), **kwargs)
        where = "offline mode is set" if is_offline() else f"{type(err).__name__}: {err}"
        raise EvaluationError(
            f"Cannot load metric {name!r}{f' (config {config_name!r})' if config_name else ''}: {where}. "
            f"Available offline: {', '.join(BUNDLED_METRICS)}. Otherwise pass an evaluate.EvaluationModule loaded "
            "from a local folder, a callable fn(predictions, references) -> dict, or compute_metrics=."
        ) from err


def clear_cache() -> None:
    """Forget the metrics loaded so far (tests, or after changing the offline environment variables)."""
    with _cache_lock:
        _cache.clear()


__all__ = [
    "BUNDLED_METRICS",
    "bundled_metric_path",
    "clear_cache",
    "is_evaluation_module",
    "is_offline",
    "load_metric",
]
