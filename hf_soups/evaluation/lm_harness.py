"""lm-evaluation-harness tasks as the held-out metric: the live soup model scored through lm-eval's Python API.

[`LMEvalEvaluator`] has the interface recipes use ([`Evaluator.evaluate`], `primary`, `better`, `sort_key`,
`select_on`, `metric_key`, `timings`), so a greedy soup, a WiSE-FT sweep, a family sweep or a comparison of methods
uses the lm-eval score exactly where it uses any other metric: the candidate is written into the one live model in
place, then scored. The model is wrapped (once per model object) by `lm_eval.models.huggingface.HFLM`, which accepts
a model object, so no candidate is ever written to disk.

Everything that needs no model happens when the evaluator is built, before any ingredient is read: `lm_eval` is
imported (a missing extra is an `ImportError` naming `pip install "hf-soups[lm-eval]"`), the tasks are found (only
`include_path` is indexed when every task is there, which is fast and offline), their YAML files are checked for
`!function` (code: needs `trust_remote_code=True`) and loaded once (documents, prompts); each evaluation then only
rebuilds the requests and runs the model.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError, InvalidArgumentError
from ..lm_eval_task import EXTRA, LMEvalTask
from ..remote_code import refuse_untrusted
from .data import TokenizerSource
from .results import annotate
from .runtime import Runtime
from .selection import Selector, SelectorMixin

if TYPE_CHECKING:  # pragma: no cover
    from ..ingredients import ResolvedIngredient
    from ..soup import Soup

logger = logging.getLogger(__name__)

#: lm-eval's default seed for the few-shot sampler (`simple_evaluate(fewshot_random_seed=...)`), reset before every
#: evaluation so that every candidate sees the same few-shot examples.
FEWSHOT_SEED = 1234
#: Bootstrap resamples for the stderr of metrics without a closed form (lm-eval's default is 100000 per call).
BOOTSTRAP_ITERS = 1000


def require_lm_eval(what: str = "an lm-eval metric") -> Any:
    """`import lm_eval`, or an `ImportError` that names the extra to install."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{what} needs the lm-evaluation-harness: {EXTRA} (or pip install lm-eval). ({e})"
        ) from e
    return lm_eval


class LMEvalEvaluator(SelectorMixin):
    """Scores models on lm-eval tasks (each task an eval set). Built by [`build_evaluator`] for an [`LMEvalTask`].

    Args:
        task ([`LMEvalTask`]): the tasks, the deciding metric, few-shot, `include_path` and `limit`.
        metric_key (`str`, *optional*): must agree with `task.metric` when given.
        greater_is_better (`bool`, *optional*): default: the task's `higher_is_better` for the metric.
        select_on (`str`, *optional*): the task that decides (default: the first).
        tokenizer (*optional*): tokenizer object, folder or Hub ID (default: the ingredients').
        batch_size (`int`): lm-eval's batch size.
        device (`str`, *optional*): the evaluation device (default: the accelerate device).
        progress (`bool`): lm-eval's own progress bars are shown only when `True`.
        trust_remote_code (`bool`): allow task YAML files with `!function` (Python that lm-eval imports).

    Raises:
        `ImportError`: lm-eval is not installed (names `pip install "hf-soups[lm-eval]"`).
        [`UntrustedCodeError`]: a task's YAML holds `!function` and `trust_remote_code` is not `True`.
        [`EvaluationError`]: an unknown task, a group instead of a task, a task without the metric.
    """

    def __init__(
        self,
        task: LMEvalTask,
        *,
        metric_key: str | None = None,
        greater_is_better: bool | None = None,
        select_on: str | None = None,
        tokenizer: Any = None,
        batch_size: int = 32,
        device: str | None = None,
        progress: bool = True,
        trust_remote_code: bool = False,
    ):
        if metric_key is not None and metric_key != task.metric:
            raise InvalidArgumentError(
                f"metric_key={metric_key!r}: an lm-eval metric decides on its own metric ({task.metric!r}); set "
                f"LMEvalTask(metric={metric_key!r}) instead, or drop metric_key"
            )
        names = task.task_names
        if select_on is None:
            select_on = names[0]
        elif select_on not in names:
            raise EvaluationError(f"select_on={select_on!r} is not one of the lm-eval tasks: {names}.")
        self.spec = task
        self.lm_eval = require_lm_eval(f"metric={task.spec()!r}")
        self.batch_size = int(batch_size)
        self.progress = progress
        self._runtime = Runtime(device)
        self._tokenizers = TokenizerSource(tokenizer)
        self._loaded = self._load_tasks(task, trust_remote_code)
        self._tasks = self._loaded["tasks"]
        direction = greater_is_better
        if direction is None:
            direction = bool(
                self._tasks[select_on].higher_is_better().get(task.metric.partition(",")[0], True)
            )
        self._selector = Selector(select_on, task.metric, direction)
        self._lm: Any = None
        self._lm_model: Any = None
        self.timings: list[float] = []
        self.last_results: dict[str, Any] = {}
        self.prediction_cache = None  # lm-eval scores are not cached on disk

    # ------------------------------------------------------------------------------------- loading the tasks

    def _load_tasks(self, task: LMEvalTask, trust_remote_code: bool) -> dict[str, Any]:
        from lm_eval.tasks import TaskManager

        include = str(Path(task.include_path).expanduser()) if task.include_path is not None else None
        if include is not None and not Path(include).is_dir():
            raise EvaluationError(
                f"metric: include_path={task.include_path!r} is not a folder of lm-eval task YAML files."
            )
        names = task.task_names
        manager = TaskManager(include_path=include, include_defaults=include is None) if include else None
        if manager is None or any(name not in manager.all_subtasks for name in names):
            manager = TaskManager(include_path=include)  # lm-eval's registry too (a few seconds to index)
        for name in names:
            if name not in manager.all_tasks:
                raise EvaluationError(
                    f"metric: lm-eval has no task {name!r}"
                    + (f" in {include} or its registry" if include else " in its registry")
                    + "; check the name (`lm_eval ls tasks`), or give include_path= the folder of its YAML file."
                )
            if name not in manager.all_subtasks:
                raise EvaluationError(
                    f"metric: {name!r} is an lm-eval group or tag; name its tasks instead (each is an eval set)."
                )
            check_task_code(manager, name, trust_remote_code=trust_remote_code)
        loaded = manager.load(names)
        for name, obj in loaded["tasks"].items():
            if obj.get_config("output_type") == "generate_until":
                logger.info("lm-eval task %s generates text: each evaluation decodes every document.", name)
            if task.num_fewshot is not None:  # as simple_evaluate: a task that pins 0 shots keeps it
                if obj.get_config("num_fewshot") != 0:
                    obj.set_config(key="num_fewshot", value=task.num_fewshot)
            elif obj.get_config("num_fewshot") is None:
                obj.set_config(key="num_fewshot", value=0)
            metrics = {m.partition(",")[0] for m in obj.higher_is_better()}
            if task.metric.partition(",")[0] not in metrics:
                raise EvaluationError(
                    f"metric: lm-eval task {name!r} has no metric {task.metric!r}; it reports {sorted(metrics)}: "
                    "set LMEvalTask(metric=...) to one of them."
                )
        return loaded

    # ------------------------------------------------------------------------------------- description

    @property
    def set_names(self) -> list[str]:
        return self.spec.task_names

    @property
    def metric_name(self) -> str:
        return f"lm-eval {self.select_on} {self.spec.metric}"

    @property
    def compute_metrics(self) -> None:
        return None

    @property
    def task(self) -> str:
        return "lm-eval"

    @property
    def device(self):
        return self._runtime.device

    @property
    def num_processes(self) -> int:
        return 1

    def versions(self) -> dict[str, Any]:
        """Task name -> its version (the YAML's `metadata.version`), as lm-eval reports it."""
        return {name: self._tasks[name].VERSION for name in self.set_names}

    def record(self) -> dict[str, Any]:
        """What the report and the model card say about the tasks (`Soup.report_extra["lm_eval"]`)."""
        tasks = {}
        for name in self.set_names:
            obj = self._tasks[name]
            n_docs = (self.last_results.get("n-samples") or {}).get(name, {}).get("effective")
            tasks[name] = {
                "version": obj.VERSION,
                "num_fewshot": obj.get_config("num_fewshot"),
                "documents": n_docs,
                "limit": self.spec.limit,
            }
        return {
            "tasks": tasks,
            "metric": self.spec.metric,
            "select_on": self.select_on,
            "lm_eval_version": getattr(self.lm_eval, "__version__", None),
            "spec": self.spec.to_dict(),
        }

    def dataset_origins(self) -> dict[str, dict[str, Any]]:
        """Where each task's documents come from, for tasks that read a Hub dataset (`report_extra["eval_datasets"]`).

        A task whose `dataset_path` is a Hub dataset ID (`org/name`, not a folder on this machine, not a builder
        such as `json`) gives `{"id", "config", "split", "revision", "task_id", "metric"}`: the card's
        `model-index` and the Hub's `.eval_results` files read it. Local tasks give nothing: no ID is guessed.
        """
        origins = {}
        for name in self.set_names:
            obj = self._tasks[name]
            path = obj.get_config("dataset_path")
            if not isinstance(path, str) or path.count("/") != 1 or Path(path).exists():
                continue
            split = (
                obj.get_config("test_split") if obj.has_test_docs() else obj.get_config("validation_split")
            )
            kwargs = obj.get_config("dataset_kwargs") or {}
            origins[name] = {
                "id": path,
                "config": obj.get_config("dataset_name"),
                "split": split,
                "revision": kwargs.get("revision") if isinstance(kwargs, dict) else None,
                "task_id": name,
                "metric": self.spec.metric,
            }
        return origins

    def describe(self, soup: Soup) -> None:
        """Write the tasks' record and their datasets' origins onto `soup.report_extra` (report, card, Hub)."""
        soup.report_extra["lm_eval"] = self.record()
        origins = self.dataset_origins()
        if origins:
            soup.report_extra.setdefault("eval_datasets", {}).update(origins)

    def __repr__(self) -> str:
        return f"LMEvalEvaluator(tasks={self.set_names}, select_on={self.select_on!r}, metric={self.metric_key!r})"

    def supports_ensemble(self) -> bool:
        return False

    # ------------------------------------------------------------------------------------- binding and running

    def bind(
        self,
        ingredients: Sequence[ResolvedIngredient] = (),
        *,
        base: ResolvedIngredient | None = None,
        tokenizer: Any = None,
        **_: Any,
    ) -> LMEvalEvaluator:
        """Remember where the tokenizer comes from (the given one, else the ingredients' or the base's folder)."""
        if tokenizer is not None:
            self._tokenizers.value = tokenizer
        self._tokenizers.members = [*ingredients, *([base] if base is not None else [])]
        return self

    def _wrap(self, model: Any) -> Any:
        """lm-eval's `HFLM` around `model` (one per model object: the live model is wrapped once)."""
        if self._lm is not None and self._lm_model is not None and self._lm_model() is model:
            return self._lm
        from lm_eval.models.huggingface import HFLM

        tokenizer = self._tokenizers.get("feed the model lm-eval's prompts")
        self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        try:
            self._lm_model = weakref.ref(model)
        except TypeError:
            self._lm_model = None
        return self._lm

    def evaluate(self, model: Any) -> dict[str, dict[str, float]]:
        """Score `model` on every task.

        Returns:
            `dict[str, dict[str, float]]`: per task, every metric lm-eval reports (`acc`, `acc_norm`, their
            `*_stderr`; a metric of a filter other than `none` keeps it: `exact_match,strict-match`).
        """
        return self.evaluate_with_predictions(model)[0]

    def evaluate_with_predictions(self, model: Any) -> tuple[dict[str, dict[str, float]], None]:
        """Like [`evaluate`]; lm-eval gives no logits to ensemble, so the predictions are `None`."""
        start = time.perf_counter()
        with self._runtime.evaluating(model), _quiet(self.progress):
            lm = self._wrap(model)
            for obj in self._tasks.values():
                obj.set_fewshot_seed(seed=FEWSHOT_SEED)
            results = self.lm_eval.evaluator.evaluate(
                lm=lm,
                task_dict=self._loaded,
                limit=self.spec.limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
            )
        self.last_results = dict(results)
        scores = scores_from_results(results, self.set_names)
        self.timings.append(time.perf_counter() - start)
        logger.debug("Evaluated %s with lm-eval: %s", type(model).__name__, scores)
        return scores, None

    def evaluate_member(
        self, model: Any, load: Callable[[], None], *, weights: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, dict[str, float]], None]:
        """Write one ingredient into `model` with `load` and score it (no prediction cache for lm-eval tasks)."""
        load()
        return self.evaluate_with_predictions(model)

    def evaluate_candidate(
        self, model: Any, current: float, *, strict: bool = False
    ) -> tuple[dict[str, dict[str, float]], None]:
        """Score a greedy candidate in full: lm-eval aggregates whole tasks, so it is never rejected early."""
        return self.evaluate(model), None

    def examples(self, name: str | None = None) -> list[dict[str, Any]]:
        raise EvaluationError(
            "method='learned' learns on the model's loss over eval_dataset; an lm-eval task gives a score, not a "
            "loss. Use greedy, wise-ft or a family sweep with an lm-eval metric."
        )

    def loss_sum(self, model: Any, examples: Sequence[dict[str, Any]]) -> tuple[Any, int]:
        return self.examples()

    def score_soup(self, soup: Soup, model: Any) -> None:
        """Evaluate the finished soup's model and record its scores and the lm-eval record."""
        self.annotate(soup, self.evaluate(model))

    def annotate(self, soup: Soup, scores: Mapping[str, Mapping[str, float]]) -> None:
        annotate(soup, scores, self._selector)
        self.describe(soup)


def scores_from_results(results: Mapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """lm-eval's `results[task]` (`{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`) as `{task: {"acc": ...}}`."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        row = (results.get("results") or {}).get(name)
        if row is None:
            raise EvaluationError(f"lm-eval returned no result for task {name!r}.")
        scores: dict[str, float] = {}
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len, "N/A" stderrs
            scores[metric if filt == "none" else key] = float(value)
        out[name] = scores
    return out


def check_task_code(manager: Any, name: str, *, trust_remote_code: bool) -> None:
    """Refuse a task whose YAML (or a YAML it includes) holds `!function`, or a Python task class, unless trusted.

    Tasks shipped inside the installed `lm_eval` package are its own code and need no opt-in, like any installed
    library; a local YAML is data, except its `!function` tags, which import Python from beside the file.
    """
    if trust_remote_code is True:
        return
    entry = manager._index.get(name)
    path = getattr(entry, "yaml_path", None)
    if path is None:
        return
    import lm_eval

    if Path(lm_eval.__file__).parent in Path(path).resolve().parents:
        return
    found = _functions_in_yaml(Path(path), seen=set())
    if found:
        refuse_untrusted(
            "metric",
            name,
            f"Python from the lm-eval task file {path} ({', '.join(found[:3])}: `!function` imports code)",
            trust_remote_code=trust_remote_code,
            hint="A task YAML without `!function` (Jinja templates for doc_to_text/doc_to_target/doc_to_choice) "
            "needs no opt-in.",
        )


def _functions_in_yaml(path: Path, seen: set[Path]) -> list[str]:
    """The `!function` values of a task YAML and of the YAML files it `include:`s (nothing is imported)."""
    import yaml

    path = path.resolve()
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    found: list[str] = []

    class Loader(yaml.SafeLoader):
        pass

    def record(loader: yaml.Loader, node: yaml.Node) -> str:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
        found.append(f"!function {value}")
        return str(value)

    Loader.add_constructor("!function", record)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        raise EvaluationError(f"metric: the lm-eval task file {path} is not valid YAML: {e}") from None
    include = data.get("include") if isinstance(data, dict) else None
    for inc in [include] if isinstance(include, str) else include or []:
        if isinstance(inc, str):
            found += _functions_in_yaml(path.parent / inc, seen)
    return found


class _quiet:
    """lm-eval logs at INFO and draws bars for every call: quieter unless progress is wanted."""

    def __init__(self, progress: bool):
        self.progress = progress

    def __enter__(self) -> None:
        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        if not self.progress:
            self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)


def build_lm_eval_evaluator(
    spec: LMEvalTask,
    *,
    eval_dataset: Any = None,
    metric_key: str | None = None,
    greater_is_better: bool | None = None,
    select_on: str | None = None,
    tokenizer: Any = None,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    **unused: Any,
) -> LMEvalEvaluator:
    """[`build_evaluator`] for an lm-eval metric: the options that apply, the others refused by name."""
    if eval_dataset is not None:
        raise InvalidArgumentError(
            "eval_dataset: an lm-eval metric evaluates on its task's own data; drop eval_dataset (several tasks, "
            "such as a selection task and a held-out task, are several eval sets)"
        )
    unused.pop("sort_by_length", None)  # lm-eval orders its requests by length itself
    given = sorted(k for k, v in unused.items() if v is not None and k not in ("config", "model"))
    if given:
        raise InvalidArgumentError(
            f"{given[0]}: not used with an lm-eval metric (the task defines prompts, data and scoring); drop "
            f"{', '.join(given)}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size!r} must be a positive integer.")
    return LMEvalEvaluator(
        spec,
        metric_key=metric_key,
        greater_is_better=greater_is_better,
        select_on=select_on,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=device,
        progress=progress,
        trust_remote_code=trust_remote_code,
    )


__all__ = [
    "LMEvalEvaluator",
    "build_lm_eval_evaluator",
    "check_task_code",
    "require_lm_eval",
    "scores_from_results",
]
