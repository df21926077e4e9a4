"""`LMEvalTask`: an lm-evaluation-harness task used as the metric of a soup (what it names, not how it runs).

This module is plain data and imports only the standard library: the configuration, recipe files and the command
line read and write it without `lm_eval` installed. The evaluator that runs the task on the live soup model is
`hf_soups.evaluation.lm_harness`.

Three spellings, one value:

- Python: `metric=LMEvalTask("my_task", metric="acc", num_fewshot=0, include_path="tasks/")`;
- recipe files: `metric: {lm_eval: my_task, metric: acc, num_fewshot: 0, include_path: tasks}`;
- the command line: `--metric "lm-eval:my_task?metric=acc&num_fewshot=0&include_path=tasks"`.

Several tasks (`["mc_select", "mc_heldout"]`, or `lm-eval:mc_select,mc_heldout`) are several eval sets: one of
them drives the choices (`select_on`, default the first) and every one is scored and reported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from .errors import InvalidArgumentError

#: The prefix of the string form (`lm-eval:task`); `lm_eval:` is read the same.
PREFIX = "lm-eval:"
#: The key that marks the mapping form in recipe files (`metric: {lm_eval: task, ...}`).
MAPPING_KEY = "lm_eval"
#: How to install the optional dependency, for messages.
EXTRA = 'pip install "hf-soups[lm-eval]"'

_TASK_NAME = re.compile(r"^[\w.\-*]+$")


@dataclass(frozen=True)
class LMEvalTask:
    """An lm-evaluation-harness task as the held-out metric: greedy soups, sweeps and reports use its score.

    The task runs through lm-eval's Python API on the live soup model (wrapped by `lm_eval.models.huggingface.HFLM`),
    so no candidate is written to disk. Its data comes from the task itself (no `eval_dataset`): a task of lm-eval's
    registry (which downloads its dataset when online), or a local task YAML under `include_path` with local data
    files (`dataset_path: json` and `dataset_kwargs: {data_files: ...}`), which works offline. Evaluation batch size
    and device are the soup's `batch_size` and `device` options. Needs `pip install "hf-soups[lm-eval]"`.

    Args:
        tasks (`str` or `list[str]`):
            The task name, or several: each is an eval set, named by the task (`select_on` picks the one that
            decides; default the first).
        metric (`str`, *optional*, defaults to `"acc"`):
            The task's metric that decides (`acc`, `acc_norm`, ...), as lm-eval names it, without the default filter
            (`acc`, not `acc,none`; `exact_match,strict-match` for another filter); its direction is the task's own
            `higher_is_better`.
        num_fewshot (`int`, *optional*):
            Few-shot examples per prompt (default: the task's own setting, else 0).
        include_path (`str` or `os.PathLike`, *optional*):
            A folder of task YAML files (lm-eval's `--include_path`). When given, only these tasks are indexed
            (fast, offline) unless a name is not found there, in which case lm-eval's registry is searched too.
        limit (`int` or `float`, *optional*):
            Evaluate only the first `limit` documents of each task (a fraction when below 1), as lm-eval's `limit`.

    Raises:
        [`InvalidArgumentError`]: a value of the wrong type, naming the field.

    Example:

    ```python
    >>> from hf_soups import LMEvalTask
    >>> task = LMEvalTask("my_task", metric="acc", num_fewshot=0, include_path="tasks")
    >>> task.task_names, task.spec()
    (['my_task'], 'lm-eval:my_task?metric=acc&num_fewshot=0&include_path=tasks')
    >>> LMEvalTask.parse("lm-eval:a,b?limit=50") == LMEvalTask(["a", "b"], limit=50)
    True
    ```
    """

    tasks: str | tuple[str, ...] | list[str]
    metric: str = "acc"
    num_fewshot: int | None = None
    include_path: str | os.PathLike | None = None
    limit: int | float | None = None

    def __post_init__(self) -> None:
        names = [self.tasks] if isinstance(self.tasks, str) else self.tasks
        if not isinstance(names, (list, tuple)) or not names:
            raise InvalidArgumentError(
                f"metric: LMEvalTask(tasks=...) expects a task name or a non-empty list of them, got {self.tasks!r}"
            )
        for name in names:
            if not isinstance(name, str) or not _TASK_NAME.match(name.strip()):
                raise InvalidArgumentError(
                    f"metric: LMEvalTask task names are lm-eval task names such as 'arc_easy' or 'my_task', got "
                    f"{name!r}"
                )
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"metric: LMEvalTask lists a task twice: {list(names)}")
        object.__setattr__(self, "tasks", tuple(n.strip() for n in names))
        if not isinstance(self.metric, str) or not self.metric.strip():
            raise InvalidArgumentError(
                f"metric: LMEvalTask(metric=...) is the task's metric name, such as 'acc' or 'acc_norm' (with its "
                f"filter when not 'none': 'exact_match,strict-match'), got {self.metric!r}"
            )
        object.__setattr__(self, "metric", self.metric.strip())
        if self.num_fewshot is not None and (
            isinstance(self.num_fewshot, bool)
            or not isinstance(self.num_fewshot, int)
            or self.num_fewshot < 0
        ):
            raise InvalidArgumentError(
                f"metric: LMEvalTask(num_fewshot=...) expects an integer >= 0, got {self.num_fewshot!r}"
            )
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)) or not self.limit > 0
        ):
            raise InvalidArgumentError(
                f"metric: LMEvalTask(limit=...) expects a number of documents (or a fraction below 1) > 0, got "
                f"{self.limit!r}"
            )
        if self.include_path is not None:
            if (
                not isinstance(self.include_path, (str, os.PathLike))
                or not os.fspath(self.include_path).strip()
            ):
                raise InvalidArgumentError(
                    f"metric: LMEvalTask(include_path=...) expects a folder of task YAML files, got "
                    f"{self.include_path!r}"
                )
            object.__setattr__(self, "include_path", os.fspath(self.include_path))

    @property
    def task_names(self) -> list[str]:
        """The task names, in order (the eval sets)."""
        return list(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """The recipe-file mapping (`{lm_eval: ..., metric: ..., ...}`), unset fields left out."""
        out: dict[str, Any] = {MAPPING_KEY: self.tasks[0] if len(self.tasks) == 1 else list(self.tasks)}
        out["metric"] = self.metric
        for key in ("num_fewshot", "include_path", "limit"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def spec(self) -> str:
        """The command-line string (`lm-eval:task?metric=acc&...`)."""
        fields = self.to_dict()
        query = "&".join(f"{k}={v}" for k, v in fields.items() if k != MAPPING_KEY)
        return f"{PREFIX}{','.join(self.tasks)}" + (f"?{query}" if query else "")

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> LMEvalTask:
        """Read the recipe-file mapping; unknown keys are refused by name."""
        known = {MAPPING_KEY, "metric", "num_fewshot", "include_path", "limit"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidArgumentError(
                f"metric: unknown lm-eval key(s) {unknown}; an lm-eval metric takes {sorted(known)}"
            )
        if value.get(MAPPING_KEY) is None:
            raise InvalidArgumentError(f"metric: an lm-eval metric needs `{MAPPING_KEY}: <task name>`")
        kwargs = {k: v for k, v in value.items() if k != MAPPING_KEY and v is not None}
        return cls(value[MAPPING_KEY], **kwargs)

    @classmethod
    def parse(cls, text: str) -> LMEvalTask:
        """Read the string form `lm-eval:TASK[,TASK...][?metric=acc&num_fewshot=0&include_path=DIR&limit=N]`."""
        body = text.strip()
        for prefix in (PREFIX, "lm_eval:"):
            if body.lower().startswith(prefix):
                body = body[len(prefix) :]
                break
        else:
            raise InvalidArgumentError(f"metric: {text!r} is not an lm-eval metric ({PREFIX}TASK)")
        names, _, query = body.partition("?")
        fields: dict[str, Any] = {MAPPING_KEY: [n for n in names.split(",") if n.strip()]}
        for key, raw in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            fields[key] = _number(raw) if key in ("num_fewshot", "limit") else raw
        return cls.from_dict(fields)


def _number(raw: str) -> int | float | str:
    try:
        return int(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError:
            return raw  # refused by LMEvalTask with the field's name


def as_lm_eval_task(value: Any) -> LMEvalTask | None:
    """`value` as an [`LMEvalTask`] when it names one (the object, `"lm-eval:..."`, `{lm_eval: ...}`), else None.

    Raises:
        [`InvalidArgumentError`]: it names an lm-eval task but a field is wrong.
    """
    if isinstance(value, LMEvalTask):
        return value
    if isinstance(value, str) and value.strip().lower().startswith((PREFIX, "lm_eval:")):
        return LMEvalTask.parse(value)
    if isinstance(value, Mapping) and MAPPING_KEY in value:
        return LMEvalTask.from_dict(value)
    return None


def describe_lm_eval(info: Mapping[str, Any]) -> list[str]:
    """One line per task of an lm-eval record (`Soup.report_extra["lm_eval"]`), for reports and model cards."""
    lines = []
    for name, task in (info.get("tasks") or {}).items():
        shots = task.get("num_fewshot")
        limit = task.get("limit")
        parts = [
            f"version {task.get('version')}",
            f"{shots}-shot" if shots is not None else None,
            f"{task.get('documents')} documents" if task.get("documents") is not None else None,
            f"limit {limit}" if limit is not None else None,
            f"metric {info.get('metric')}",
        ]
        lines.append(f"lm-eval task {name} ({', '.join(p for p in parts if p)})")
    if info.get("lm_eval_version"):
        lines.append(
            f"scored with lm-eval {info['lm_eval_version']} on the live model (no candidate on disk)"
        )
    return lines


__all__ = ["EXTRA", "LMEvalTask", "as_lm_eval_task", "describe_lm_eval"]
