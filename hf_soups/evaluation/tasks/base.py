"""What a task is to the evaluator: how its sets are tokenized and checked, its outputs gathered, and scored.

A [`Task`] subclass answers every question the evaluator used to answer by branching on the task name; a
[`Collector`] turns one eval set's batches (gathered from every process) into [`Predictions`].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import EvaluationError, SoupError
from ..checks import labels_of
from ..data import TokenizerSource, tokenize_text

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


#: `gather(tensors, pad_dims, pad_values)`: pad across processes along `pad_dims`, then `gather_for_metrics`
Gather = Callable[..., tuple[Any, ...]]
#: `metric(predictions, references) -> {name: float}`
MetricFn = Callable[["np.ndarray", "np.ndarray"], dict[str, float]]


@dataclass
class TaskContext:
    """What [`Task.configure`] may read: the model config, the eval sets and where preprocessors come from."""

    config: Mapping[str, Any]
    sets: Mapping[str, Any]  # name -> datasets.Dataset
    label_columns: Mapping[str, str | None]
    select_on: str
    tokenizers: TokenizerSource

    @property
    def architecture(self) -> str | None:
        return (self.config.get("architectures") or [None])[0]


@dataclass
class Predictions:
    """What one model produced on one eval set, gathered from every process (CPU numpy)."""

    logits: np.ndarray | None = None  # classification [n, C]; token classification [T valid tokens, C]
    labels: np.ndarray | None = None  # [n], [n, C] or [T]
    loss_sum: float = 0.0  # language modelling: summed token loss
    loss_count: float = 0.0  # language modelling: number of scored tokens
    preds: np.ndarray | None = None  # language modelling: argmax predictions of the scored tokens [T]
    raw_logits: list[np.ndarray] = field(default_factory=list)  # compute_metrics: per batch, unreduced
    raw_labels: list[np.ndarray] = field(default_factory=list)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return t.cpu().numpy() if t is not None else None


def pad_np(x: np.ndarray, width: int, value: float) -> np.ndarray:
    """`x` padded with `value` along dim 1 to `width` (per-batch token arrays of different lengths)."""
    import numpy as np

    if x.shape[1] == width:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, width - x.shape[1])
    return np.pad(x, pad, constant_values=value)


def _rows(parts: list[np.ndarray], order: np.ndarray, value: float) -> np.ndarray:
    """Per-batch arrays (one row per example, token dims padded to one width) as one array, rows in `order`."""
    import numpy as np

    if parts[0].ndim >= 2 and len({p.shape[1] for p in parts}) > 1:
        width = max(p.shape[1] for p in parts)
        parts = [pad_np(p, width, value) for p in parts]
    return np.concatenate(parts)[order]


def _segments(flat: np.ndarray, counts: np.ndarray, order: np.ndarray) -> np.ndarray:
    """`flat` holds one run of `counts[i]` rows per example `i`; the runs, reordered by `order`."""
    import numpy as np

    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    index = np.concatenate(
        [np.arange(starts[i], starts[i] + counts[i]) for i in order] or [np.zeros(0, np.int64)]
    )
    return flat[index.astype(np.int64)]


class Collector:
    """Collects one eval set's batch outputs into [`Predictions`]; subclasses say how a batch is gathered.

    Args:
        gather (`Gather`): pads and gathers tensors from every process (returns them as is on one process).
        keep_raw (`bool`): also keep the unreduced per-batch logits and labels (for `compute_metrics`).
    """

    def __init__(self, gather: Gather, keep_raw: bool):
        self.gather = gather
        self.keep_raw = keep_raw
        self.out = Predictions()
        self.logits_parts: list[np.ndarray] = []
        self.label_parts: list[np.ndarray] = []
        #: per gathered batch: each example's index in the eval set (batches may run in another order)
        self.index_parts: list[np.ndarray] = []
        #: per gathered batch, for outputs kept per scored token: each example's number of scored tokens
        self.count_parts: list[np.ndarray] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        raise NotImplementedError

    def add_index(self, index: torch.Tensor) -> None:
        """Record where the examples of the batch just added sit in the eval set (gathered like the outputs)."""
        (g_index,) = self.gather((index,), pad_dims=(None,))
        self.index_parts.append(_np(g_index))

    def finish(self) -> Predictions:
        import numpy as np

        self.out.logits = np.concatenate(self.logits_parts) if self.logits_parts else None
        self.out.labels = np.concatenate(self.label_parts) if self.label_parts else None
        return self.restore_order()

    def restore_order(self) -> Predictions:
        """Put the finished outputs back in the eval set's own order, by the indices each batch carried.

        Batches that ran longest first (`sort_by_length`) are read back by each example's index in the set, never
        by position, so the outputs are those of an unsorted run: per-example rows, per-token runs (one run of
        scored tokens per example) and the unreduced `compute_metrics` arrays alike. Nothing moves when the
        batches ran in the set's order.
        """
        import numpy as np

        out = self.out
        if not self.index_parts:
            return out
        seen = np.concatenate(self.index_parts)
        if bool((np.diff(seen) > 0).all()):
            return out
        order = np.argsort(seen, kind="stable")
        counts = np.concatenate(self.count_parts) if self.count_parts else None  # scored tokens per example
        rows = int(counts.sum()) if counts is not None else len(seen)
        for name in ("logits", "labels", "preds"):
            value = getattr(out, name)
            if value is None:
                continue
            if (
                len(value) != rows
            ):  # never leave outputs in the batches' order, which would score silently wrong
                raise SoupError(
                    f"internal error: {len(value)} {name} rows for {len(seen)} examples ({rows} expected); "
                    "cannot put them back in the eval set's order."
                )
            setattr(out, name, _segments(value, counts, order) if counts is not None else value[order])
        if out.raw_logits:
            out.raw_logits = [_rows(out.raw_logits, order, -100.0)]
            if out.raw_labels and out.raw_labels[0] is not None:
                out.raw_labels = [_rows(out.raw_labels, order, -100)]
        return out

    def add_per_example(self, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        """One output row per example (sequence classification)."""
        g_logits, g_labels = self.gather((logits, labels), pad_dims=(None, None))
        if self.keep_raw:
            self.out.raw_logits.append(_np(g_logits))
            self.out.raw_labels.append(_np(g_labels))
        self.logits_parts.append(_np(g_logits))
        if g_labels is not None:
            self.label_parts.append(_np(g_labels))

    def add_per_token(self, logits: torch.Tensor, labels: torch.Tensor, keep_scored: bool = True) -> None:
        """One output row per token; `keep_scored`: keep the rows whose label is not -100."""
        g_logits, g_labels = self.gather((logits, labels), pad_dims=(1, 1), pad_values=(-100, -100))
        if self.keep_raw:
            self.out.raw_logits.append(_np(g_logits))
            self.out.raw_labels.append(_np(g_labels))
        if keep_scored:
            mask = g_labels != -100
            self.logits_parts.append(_np(g_logits[mask]))
            self.label_parts.append(_np(g_labels[mask]))
            self.count_parts.append(_np(mask.sum(1)))


class Task:
    """One kind of model output, and everything the evaluator does differently for it.

    Args:
        num_labels (`int`, *optional*): the model's number of labels (`id2label`, else `num_labels`).
        problem_type (`str`, *optional*): classification only (see [`Classification`]).
        label2id (`dict[str, int]`, *optional*): maps string labels of an eval set to class ids.
        vocab_size (`int`, *optional*): the config's vocabulary size (language-model targets are checked against it).
    """

    #: the name users pass as `task=` and `infer_task` returns
    name: ClassVar[str]
    #: an eval set without a label column is refused
    needs_labels: ClassVar[bool] = True
    #: logits of several models can be averaged into an ensemble and scored
    supports_ensemble: ClassVar[bool] = False
    #: the collator builds labels from the input ids (causal language models)
    labels_from_inputs: ClassVar[bool] = False

    def __init__(
        self,
        *,
        num_labels: int | None = None,
        problem_type: str | None = None,
        label2id: Mapping[str, int] | None = None,
        vocab_size: int | None = None,
    ):
        self.num_labels = num_labels
        self.problem_type: str | None = None
        self.label2id = dict(label2id) if label2id else None
        self.vocab_size = vocab_size

    @property
    def n_classes(self) -> int | None:
        """Number of classes the metric sees (`None` when it is not a fixed label set)."""
        return int(self.num_labels) if self.num_labels else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_labels={self.num_labels}, problem_type={self.problem_type!r})"

    # -------------------------------------------------------------------------------- data

    def tokenize(
        self, tok: Any, columns: list[list[Any]], labels: list[Any] | None, max_length: int
    ) -> list[dict]:
        """Examples from raw text columns (one column, or a sentence pair)."""
        return tokenize_text(tok, columns, labels, max_length)

    def complete_unlabelled(self, examples: list[dict], tokenizers: TokenizerSource) -> list[dict]:
        """Make targets for a set without a label column (tasks whose inputs are their targets)."""
        return examples

    def check_labels(self, name: str, examples: list[dict]) -> None:
        """Normalise and check labels as the set is prepared (before the id checks)."""

    def configure(self, options: Mapping[str, Any], context: TaskContext) -> None:
        """Take the task's own options (zero-shot: `class_names`, `templates`) before the sets are prepared.

        Tasks other than zero-shot classification take none: a given one is refused by name, since it would
        silently change nothing.

        Raises:
            [`EvaluationError`]: an option this task does not take.
        """
        given = [key for key, value in options.items() if value is not None]
        if given:
            raise EvaluationError(
                f"{given[0]}= is for zero-shot classification of CLIP-family models (CLIPModel, SiglipModel, ...), "
                f"but this {context.architecture or 'model'} is scored as {self.name!r}; drop {given[0]}=."
            )

    def forward(self, model: Any, *, device: Any, batch_size: int) -> Callable[[dict], torch.Tensor] | None:
        """What the evaluator calls on each batch's inputs to get logits; `None`: `model(**inputs).logits`.

        Called once per evaluation of `model` (inside `torch.inference_mode()`), so a task may compute per-model
        state first (zero-shot classification embeds its prompts with the model's own text tower).
        """
        return None

    def learn_from(self, examples: list[dict]) -> None:
        """Settle what the config left open, from the prepared selection set."""

    def check_label_ranges(self, name: str, examples: list[dict]) -> None:
        """Refuse labels the loss would crash on (or silently misread)."""
        labels_of(name, examples)

    # -------------------------------------------------------------------------------- outputs and scores

    def collector(self, gather: Gather, keep_raw: bool) -> Collector:
        """A fresh [`Collector`] for one eval set."""
        raise NotImplementedError

    def score(self, out: Predictions, metric: MetricFn | None) -> dict[str, float]:
        """The task's own loss (and perplexity), plus `metric` of its predictions when there is one."""
        raise NotImplementedError

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """The task's loss of one batch, summed (with gradients), and what it sums over: the `loss` it reports is
        their ratio over a whole set. Learned soups descend it."""
        from ...errors import EvaluationError

        raise EvaluationError(
            f"The {self.name!r} task has no loss hf_soups can differentiate (it is scored by compute_metrics); "
            "method='learned' needs a classification, token-classification or language-model task."
        )

    def add_own_scores(self, result: dict[str, float], out: Predictions) -> None:
        """Add the task's own loss (and perplexity) to what a `compute_metrics` returned, unless it has them."""

    def dry_outputs(self) -> Predictions | None:
        """Made-up predictions to check the metric (and its key) before any model runs; `None`: cannot."""
        return None

    def dry_eval_prediction(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Made-up `(predictions, label_ids)` in a Trainer's shapes, for a `compute_metrics` dry run."""
        return None


__all__ = ["Collector", "Gather", "MetricFn", "Predictions", "Task", "TaskContext", "pad_np"]
