"""Metrics for held-out evaluation, with offline copies of the common classification metrics.

`evaluate.load("accuracy")` downloads the metric script from the Hugging Face Hub, so it fails on an air-gapped
machine, and it runs a script downloaded from the Hub. hf_soups ships real `evaluate.Metric` modules for the
metrics a soup is most often selected on (accuracy, f1, precision, recall, matthews_correlation, pearsonr,
spearmanr) in this package, one folder per metric, with the same inputs, outputs and options as the Hub versions.
[`load_metric`] always uses the bundled copy for those names; any other metric script (a local folder, another Hub
metric) runs only with `trust_remote_code=True` (see `hf_soups.remote_code`).

Importing this module is cheap: `evaluate` (about 6 s to import) is imported only when a metric is loaded.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ...errors import EvaluationError

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


def load_metric(
    spec: MetricSpec, *, config_name: str | None = None, trust_remote_code: bool = False, key: str = "metric"
) -> Any:
    """Load a metric the way `evaluate` users expect, running no code the user has not trusted.

    `evaluate.load` runs the Python script of a metric (from a local folder or downloaded from the Hub), so only
    the metrics bundled with hf_soups ([`BUNDLED_METRICS`], always loaded from this package, never from the Hub or
    the working directory) load without `trust_remote_code=True`.

    Args:
        spec (`str`, `tuple`, `evaluate.EvaluationModule`, `evaluate.CombinedEvaluations` or callable):
            - a bundled metric name (`"accuracy"`, `"f1"`, ...): the bundled copy, offline;
            - another metric name on the Hub (`"bleu"`, `"glue"`, `"evaluate-metric/accuracy"`), or a local metric
              folder / script: needs `trust_remote_code=True`;
            - a `(name, config_name)` tuple such as `("f1", "multilabel")` or `("glue", "mrpc")`;
            - an already loaded `evaluate.EvaluationModule` or `evaluate.combine([...])` (returned as is);
            - a callable `fn(predictions, references) -> dict[str, float] | float` (returned as is).
        config_name (`str`, *optional*):
            Configuration of a named metric (e.g. `"multilabel"`); the tuple form sets it too.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow loading (hence running) a metric script that is not bundled with hf_soups.
        key (`str`, *optional*, defaults to `"metric"`):
            The argument or recipe key named in errors.

    Returns:
        The evaluation module (or the callable). Named metrics are cached per process and loaded with
        `keep_in_memory=True`, so nothing is written to the evaluate cache while scoring.

    Raises:
        [`~errors.UntrustedCodeError`]: a metric that is not bundled, without `trust_remote_code=True` (its code
            is neither downloaded nor run).
        [`EvaluationError`]: the metric cannot be loaded (with the reason and what to pass instead).

    Example:

    ```python
    >>> from hf_soups.evaluation.metrics import load_metric
    >>> accuracy = load_metric("accuracy")  # the bundled copy: no network, no downloaded code
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
    path = _bundled_path_of(spec)
    if path is None:
        _refuse_untrusted_metric(spec, key=key, trust_remote_code=trust_remote_code)
    cache_key = (str(path) if path is not None else spec, config_name)
    with _cache_lock:
        if cache_key not in _cache:
            _cache[cache_key] = _load(spec, path, config_name)
        return _cache[cache_key]


def _bundled_path_of(spec: str) -> Path | None:
    """The bundled folder `spec` names (a bundled name, or the path of a bundled folder), else `None`."""
    if spec in BUNDLED_METRICS:
        return bundled_metric_path(spec)
    try:
        resolved = Path(spec).expanduser().resolve()
    except (OSError, ValueError):
        return None
    for name in BUNDLED_METRICS:
        folder = bundled_metric_path(name)
        if resolved in (folder, folder / f"{name}.py"):
            return folder
    return None


def _refuse_untrusted_metric(spec: str, *, key: str, trust_remote_code: bool) -> None:
    from ...remote_code import refuse_untrusted

    local = Path(spec).expanduser()
    if local.exists():
        what = f"the Python code of the evaluate metric at {local.resolve()} (evaluate.load imports it)"
    else:
        what = (
            "the Python code of an evaluate metric script downloaded from the Hugging Face Hub "
            f"(it is not one of the metrics bundled with hf_soups: {', '.join(BUNDLED_METRICS)})"
        )
    refuse_untrusted(
        key,
        spec,
        what,
        trust_remote_code=trust_remote_code,
        hint=(
            "Otherwise use a bundled metric, or pass from Python an evaluate.EvaluationModule you loaded yourself, "
            "a callable fn(predictions, references) -> dict, or compute_metrics=."
        ),
    )


def _load(name: str, bundled: Path | None, config_name: str | None) -> Any:
    import evaluate

    kwargs: dict[str, Any] = {"keep_in_memory": True}
    if config_name is not None:
        kwargs["config_name"] = config_name
    if bundled is not None:
        logger.debug("Metric %r: hf_soups' bundled copy (%s).", name, bundled)
        return evaluate.load(str(bundled), **kwargs)
    local = Path(name).expanduser()
    try:
        return evaluate.load(str(local) if local.exists() else name, **kwargs)
    except Exception as err:  # evaluate turns a connection failure into FileNotFoundError
        where = "offline mode is set" if is_offline() else f"{type(err).__name__}: {err}"
        raise EvaluationError(
            f"Cannot load metric {name!r}{f' (config {config_name!r})' if config_name else ''}: {where}. "
            f"Bundled with hf_soups (offline, no opt-in): {', '.join(BUNDLED_METRICS)}. Otherwise pass an "
            "evaluate.EvaluationModule, a callable fn(predictions, references) -> dict, or compute_metrics=."
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
