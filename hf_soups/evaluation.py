"""Held-out evaluation: the scores that greedy soups and WiSE-FT sweeps decide on.

[`build_evaluator`] checks everything it can before any tensor is read (eval sets, labels, the metric, the
metric key, the selection set); [`Evaluator.bind`] then learns the task from the ingredients' config
(sequence / image classification, multi-label, regression, token classification, causal or masked language
modelling, or anything else through a Trainer-style `compute_metrics`) and tokenizes raw text once.

[`Evaluator.evaluate`] runs a model over every eval set under `accelerate`: the dataloader is prepared by an
`Accelerator` and predictions are collected with `gather_for_metrics`, so `torchrun --nproc_per_node 2` (or
`accelerate launch` on GPUs) splits the batches across processes and every process computes the same scores,
and hence takes the same greedy decisions, as a single process would.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import EvaluationError, InvalidArgumentError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .ingredients import ResolvedIngredient
    from .soup import Soup

logger = logging.getLogger(__name__)

#: Columns a model can take as inputs (kept from a pre-tokenized eval set; everything else is dropped).
MODEL_INPUT_COLUMNS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "pixel_values",
    "pixel_mask",
    "input_values",
    "input_features",
    "bbox",
    "decoder_input_ids",
    "decoder_attention_mask",
)
_PRIMARY_INPUTS = ("input_ids", "pixel_values", "input_values", "input_features", "inputs_embeds")
_LABEL_COLUMNS = ("labels", "label", "label_ids")
_TEXT_COLUMN_GUESSES: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("text",),
    ("sentence",),
    ("tokens",),
)
#: Pseudo-metrics computed from the model's own loss (no `evaluate` module needed).
LOSS_METRICS = ("loss", "perplexity")
_LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae", "rmse", "wer", "cer")
_AVERAGED_METRICS = ("f1", "precision", "recall")
_MULTILABEL_METRICS = ("accuracy", "f1", "precision", "recall", "matthews_correlation")

TASKS = ("classification", "token-classification", "causal-lm", "masked-lm", "custom")


# ------------------------------------------------------------------------------------------------ helpers


def is_main_process() -> bool:
    """Whether this process writes files and pushes (rank 0; always True without a distributed launch)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def infer_task(config: Mapping[str, Any] | None, model: Any = None) -> tuple[str | None, str | None]:
    """The evaluation task and problem type of a model, from its config (or class name).

    Args:
        config (`Mapping`, *optional*): the model's `config.json` as a dict.
        model (*optional*): a model instance, used when the config names no architecture.

    Returns:
        `(task, problem_type)`: `task` is one of [`TASKS`] (`None` when unknown); `problem_type` is
        `"single_label_classification"`, `"multi_label_classification"` or `"regression"` for classification.
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
    return None, None


def _label_kind(value: Any) -> str:
    """'int', 'float', 'str', 'vector' (fixed-size multi-hot) or 'sequence' (token-level), from one label."""
    import numbers

    if isinstance(value, bool):
        return "int"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float" if not float(value).is_integer() else "int-or-float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, Sequence) or hasattr(value, "tolist"):
        values = value.tolist() if hasattr(value, "tolist") else list(value)
        if any(isinstance(v, Sequence) for v in values):
            return "nested"
        if any(v == -100 for v in values):
            return "sequence"
        if values and all(v in (0, 1, 0.0, 1.0) for v in values):
            return "vector-or-sequence"
        return "sequence"
    return "unknown"


def _to_float_dict(result: Any, default_key: str) -> dict[str, float]:
    """A metric result as `{name: float}` (scalars only; per-label arrays are left out)."""
    import numbers

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


@dataclass
class _SetOutputs:
    """What one model produced on one eval set, gathered from every process (CPU numpy)."""

    logits: np.ndarray | None = None  # classification [n, C]; token classification [T valid tokens, C]
    labels: np.ndarray | None = None  # [n], [n, C] or [T]
    loss_sum: float = 0.0  # language modelling: summed token loss
    loss_count: float = 0.0  # language modelling: number of scored tokens
    preds: np.ndarray | None = None  # language modelling: argmax predictions of the scored tokens [T]
    raw_logits: list[np.ndarray] = field(default_factory=list)  # compute_metrics: per batch, unreduced
    raw_labels: list[np.ndarray] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ evaluator


class Evaluator:
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
    ):
        self._datasets = datasets
        self._metric = metric
        self._metric_spec = metric_spec
        self._metric_kwargs = dict(metric_kwargs)
        self._user_metric_key = metric_key
        self._user_greater = greater_is_better
        self.metric_key: str | None = metric_key
        self.greater_is_better: bool = True if greater_is_better is None else bool(greater_is_better)
        self.select_on = select_on
        self.compute_metrics = compute_metrics
        self._tokenizer = tokenizer
        self.text_columns = text_columns
        self._label_columns = label_columns
        self.batch_size = int(batch_size)
        self._device_request = device
        self._user_task = task
        self.task: str | None = task
        self.problem_type: str | None = None
        self.num_labels: int | None = None
        self.max_length = max_length
        self.progress = progress
        self._trust_remote_code = trust_remote_code is True
        self._examples: dict[str, list[dict[str, Any]]] | None = None
        self._loaders: dict[str, Any] = {}
        self._accelerator = None
        self._device = None
        self._pad_token_id = 0
        self._label2id: dict[str, int] | None = None
        self._key_checked = False
        self._config_limits: dict[str, int] = {}
        self._input_ranges: dict[str, dict[str, tuple[int, int]]] = {}
        self._models_checked: Any = None  # weakref.WeakSet of the models whose embeddings were checked
        self.timings: list[float] = []

    # -------------------------------------------------------------------------------- description

    @property
    def set_names(self) -> list[str]:
        return list(self._datasets)

    @property
    def metric_name(self) -> str:
        if self.compute_metrics is not None:
            return getattr(self.compute_metrics, "__name__", "compute_metrics")
        spec = self._metric_spec
        if isinstance(spec, tuple):
            return "/".join(str(s) for s in spec)
        if isinstance(spec, str):
            return spec
        name = getattr(spec, "name", None) or getattr(spec, "__name__", None)
        if name is None and hasattr(spec, "evaluation_modules"):
            name = "+".join(getattr(m, "name", "?") for m in spec.evaluation_modules)
        return str(name or type(spec).__name__)

    def __repr__(self) -> str:
        return (
            f"Evaluator(sets={self.set_names}, select_on={self.select_on!r}, metric={self.metric_name!r}, "
            f"metric_key={self.metric_key!r}, task={self.task!r})"
        )

    # -------------------------------------------------------------------------------- decisions

    def primary(self, scores: Mapping[str, Mapping[str, float]]) -> float:
        """The number decisions are made on: `scores[select_on][metric_key]`.

        Raises:
            [`EvaluationError`]: the key is missing (a `compute_metrics` that did not return it).
        """
        try:
            return float(scores[self.select_on][self.metric_key])
        except KeyError:
            have = sorted(scores.get(self.select_on, {}))
            raise EvaluationError(
                f"metric_key={self.metric_key!r} is not in the scores of eval set {self.select_on!r} "
                f"(got {have}); pass metric_key= one of them."
            ) from None

    def better(self, a: float | None, b: float | None, strict: bool = False) -> bool:
        """Whether score `a` is at least as good as `b` (`strict=True`: strictly better).

        NaN and `None` are worse than any number, so a broken candidate is never kept.
        """
        a_bad = a is None or math.isnan(a)
        b_bad = b is None or math.isnan(b)
        if a_bad:
            return False
        if b_bad:
            return True
        if self.greater_is_better:
            return a > b if strict else a >= b
        return a < b if strict else a <= b

    def sort_key(self, score: float | None) -> float:
        """A key that sorts scores best first (NaN/None last)."""
        if score is None or math.isnan(score):
            return math.inf
        return -score if self.greater_is_better else score

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
            self._tokenizer = tokenizer
        task, problem = infer_task(config, model)
        if self._user_task is not None:
            task = self._user_task
        if task is None:
            if self.compute_metrics is None:
                arch = (config.get("architectures") or [type(model).__name__ if model is not None else None])[
                    0
                ]
                raise EvaluationError(
                    f"Cannot tell how to score a {arch or 'model without architectures in its config'}: hf_soups "
                    "scores sequence/image/audio classification, token classification and causal/masked language "
                    "models. Pass compute_metrics= (a Trainer-style compute_metrics(EvalPrediction) -> dict)."
                )
            task = "custom"
        self.task = task
        labels = config.get("id2label") or {}
        self.num_labels = len(labels) or config.get("num_labels")
        self._label2id = {str(k): int(v) for k, v in (config.get("label2id") or {}).items()} or None
        self.problem_type = problem if task == "classification" else None
        self._pad_token_id = config.get("pad_token_id")
        self._config_limits = _input_limits(config)
        self._members = members
        self._examples = None
        self._loaders = {}
        self._prepare_examples()
        if task == "classification" and self.problem_type is None:
            first = self._examples[self.select_on][0].get("labels")
            kind = _label_kind(first)
            self.problem_type = (
                "multi_label_classification" if kind.startswith("vector") else "single_label_classification"
            )
        for name, examples in self._examples.items():
            self._check_label_ranges(name, examples)
        self._finish_metric_setup()
        return self

    def _get_tokenizer(self, why: str):
        tok = self._tokenizer
        if tok is not None and not isinstance(tok, (str, bytes)) and not hasattr(tok, "__fspath__"):
            return tok
        from transformers import AutoTokenizer

        candidates = [tok] if tok is not None else []
        for member in getattr(self, "_members", []):
            if getattr(member, "path", None) is not None and member.kind != "adapter":
                candidates.append(member.path)
        errors = []
        for cand in candidates:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(cand))
                return self._tokenizer
            except Exception as err:  # a folder without tokenizer files, a Hub ID offline, ...
                errors.append(f"{cand}: {type(err).__name__}")
        raise EvaluationError(
            f"A tokenizer is needed to {why}, but none was given and the ingredients ship none"
            f"{' (' + '; '.join(errors) + ')' if errors else ''}. Pass tokenizer= or a pre-tokenized eval set "
            "(input_ids, attention_mask and labels columns)."
        )

    # -------------------------------------------------------------------------------- data preparation

    def _prepare_examples(self) -> None:
        self._examples = {name: self._prepare_set(name, ds) for name, ds in self._datasets.items()}

    def _prepare_set(self, name: str, ds: Any) -> list[dict[str, Any]]:
        columns = list(ds.column_names)
        label_col = self._label_columns.get(name)
        pretokenized = any(c in columns for c in _PRIMARY_INPUTS)
        task = self.task
        if pretokenized and not self.text_columns:
            keep = [c for c in columns if c in MODEL_INPUT_COLUMNS]
            data = ds.select_columns(keep + ([label_col] if label_col else [])).to_dict()
            n = len(ds)
            examples = [{k: data[k][i] for k in keep} for i in range(n)]
            if label_col:
                for ex, lab in zip(examples, data[label_col]):
                    ex["labels"] = lab
        else:
            text_cols = self.text_columns or _guess_text_columns(columns)
            if not text_cols:
                raise EvaluationError(
                    f"Eval set {name!r} has neither model inputs ({', '.join(_PRIMARY_INPUTS[:2])}) nor a known text "
                    f"column (its columns: {columns}); pass text_columns= naming the text column(s)."
                )
            missing = [c for c in text_cols if c not in columns]
            if missing:
                raise EvaluationError(f"Eval set {name!r} has no column {missing[0]!r} (columns: {columns}).")
            examples = self._tokenize(name, ds, text_cols, label_col)
        if task in ("classification", "token-classification", "custom") and not label_col:
            raise EvaluationError(_no_labels_message(name, columns))
        if task == "masked-lm" and not label_col:
            examples = self._mask_tokens(examples)
        self._check_labels(name, examples)
        self._check_inputs(name, examples)
        return examples

    def _max_length(self, tokenizer) -> int:
        if self.max_length:
            return int(self.max_length)
        limits = [getattr(tokenizer, "model_max_length", None)]
        for member in getattr(self, "_members", [])[:1]:
            cfg = member.config
            limits += [cfg.get("max_position_embeddings"), cfg.get("n_positions"), cfg.get("max_seq_len")]
        limits = [int(x) for x in limits if isinstance(x, (int, float)) and 0 < x < 1_000_000]
        return min(limits) if limits else 512

    def _tokenize(
        self, name: str, ds: Any, text_cols: list[str], label_col: str | None
    ) -> list[dict[str, Any]]:
        tok = self._get_tokenizer(f"tokenize the text column(s) {text_cols} of eval set {name!r}")
        if self._pad_token_id is None:
            self._pad_token_id = tok.pad_token_id
        max_length = self._max_length(tok)
        columns = [list(ds[c]) for c in text_cols]
        labels = list(ds[label_col]) if label_col else None
        if self.task == "token-classification":
            if len(text_cols) != 1:
                raise EvaluationError(
                    "Token classification takes one column of pre-split words (text_columns=)."
                )
            enc = tok(columns[0], is_split_into_words=True, truncation=True, max_length=max_length)
            examples = []
            for i in range(len(ds)):
                ex = {k: enc[k][i] for k in enc.keys()}
                if labels is not None:
                    word_ids = enc.word_ids(i)
                    aligned, prev = [], None
                    for w in word_ids:
                        aligned.append(-100 if w is None or w == prev else int(labels[i][w]))
                        prev = w
                    ex["labels"] = aligned
                examples.append(ex)
            return examples
        special = self.task == "masked-lm"
        enc = tok(*columns[:2], truncation=True, max_length=max_length, return_special_tokens_mask=special)
        keys = [k for k in enc.keys() if k in MODEL_INPUT_COLUMNS or k == "special_tokens_mask"]
        examples = [{k: enc[k][i] for k in keys} for i in range(len(ds))]
        if labels is not None:
            for ex, lab in zip(examples, labels):
                ex["labels"] = lab
        return examples

    def _mask_tokens(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Mask 15% of the tokens once, with a fixed seed, so that every model sees the same masked set."""
        import torch

        tok = self._get_tokenizer("mask tokens of a masked-LM eval set without labels")
        if tok.mask_token_id is None:
            raise EvaluationError(
                "The tokenizer has no mask token; pass an eval set with labels for masked LM."
            )
        gen = torch.Generator().manual_seed(0)
        out = []
        for ex in examples:
            ids = torch.tensor(ex["input_ids"])
            special = ex.get("special_tokens_mask")
            if special is None:
                special = tok.get_special_tokens_mask(ex["input_ids"], already_has_special_tokens=True)
            prob = torch.full(ids.shape, 0.15)
            prob.masked_fill_(torch.tensor(special, dtype=torch.bool), 0.0)
            masked = torch.bernoulli(prob, generator=gen).bool()
            labels = torch.where(masked, ids, torch.full_like(ids, -100))
            replace = torch.bernoulli(torch.full(ids.shape, 0.8), generator=gen).bool() & masked
            rand = torch.bernoulli(torch.full(ids.shape, 0.5), generator=gen).bool() & masked & ~replace
            new_ids = ids.clone()
            new_ids[replace] = tok.mask_token_id
            new_ids[rand] = torch.randint(len(tok), ids.shape, generator=gen)[rand]
            ex = {k: v for k, v in ex.items() if k != "special_tokens_mask"}
            ex["input_ids"] = new_ids.tolist()
            ex["labels"] = labels.tolist()
            out.append(ex)
        return out

    def _check_labels(self, name: str, examples: list[dict[str, Any]]) -> None:
        for ex in examples:
            ex.pop("special_tokens_mask", None)
        if not examples or "labels" not in examples[0]:
            return
        if self.task != "classification":
            return
        labels = [ex["labels"] for ex in examples]
        if all(isinstance(x, str) for x in labels):
            if not self._label2id:
                raise EvaluationError(
                    f"Eval set {name!r} has string labels but the model config has no label2id to map them; "
                    "encode the labels as integers."
                )
            unknown = sorted({x for x in labels if x not in self._label2id})
            if unknown:
                raise EvaluationError(
                    f"Eval set {name!r} has labels {unknown[:5]} that the model does not know "
                    f"(label2id: {self._label2id})."
                )
            for ex in examples:
                ex["labels"] = self._label2id[ex["labels"]]
            return
        single = self.problem_type == "single_label_classification" or (
            self.problem_type is None and all(isinstance(x, int) for x in labels)
        )
        if single:
            ints = [x for x in labels if isinstance(x, (int, float))]
            if ints and all(x == -1 for x in ints):
                raise EvaluationError(_no_labels_message(name, None, all_minus_one=True))
            if self.num_labels:
                bad = sorted({int(x) for x in ints if not 0 <= int(x) < int(self.num_labels)})
                if bad:
                    raise EvaluationError(
                        f"Eval set {name!r} has labels {bad[:5]} outside the model's {self.num_labels} classes "
                        "(0 .. num_labels - 1); check label_column= and the label encoding."
                    )

    def _check_inputs(self, name: str, examples: list[dict[str, Any]]) -> None:
        """Refuse, before any model runs, ids and labels that would crash it (or be silently misread).

        Records each id column's range for [`_check_model_inputs`] and checks it against the config's
        `vocab_size` / `type_vocab_size` / `n_positions`, and the labels against the task.
        """
        import itertools

        import numpy as np

        ranges: dict[str, tuple[int, int]] = {}
        for column in ("input_ids", "decoder_input_ids", "token_type_ids"):
            rows = [ex[column] for ex in examples if column in ex]
            if not rows:
                continue
            rows = [r.tolist() if hasattr(r, "tolist") else r for r in rows]
            for i, row in enumerate(rows):
                if not isinstance(row, (list, tuple)):
                    raise EvaluationError(
                        f"Eval set {name!r}: column {column!r} of example {i} is {type(row).__name__}; each example "
                        "must hold one list of integer token ids."
                    )
                if column == "input_ids" and not row:
                    raise EvaluationError(
                        f"Eval set {name!r}: example {i} has no input_ids (an empty text?); drop empty examples."
                    )
            try:
                flat = np.array(list(itertools.chain.from_iterable(rows)))
            except ValueError:
                flat = np.array([], dtype=object)
            if flat.dtype.kind not in "iub" and not (flat.dtype.kind == "f" and np.all(np.mod(flat, 1) == 0)):
                raise EvaluationError(
                    f"Eval set {name!r}: column {column!r} holds values that are not integer token ids (nested lists, "
                    "fractions or strings); each example must hold one list of integers."
                )
            if flat.size:
                ranges[column] = (int(flat.min()), int(flat.max()))
            if column == "input_ids":
                lengths = [len(r) for r in rows]
                ranges["length"] = (min(lengths), max(lengths))
        self._input_ranges[name] = ranges
        self._check_ranges(name, self._config_limits, "the model config")

    def _check_ranges(self, name: str, limits: Mapping[str, int], where: str) -> None:
        ranges = self._input_ranges.get(name, {})
        for column, limit_key in (
            ("input_ids", "vocab_size"),
            ("decoder_input_ids", "vocab_size"),
            ("token_type_ids", "type_vocab_size"),
        ):
            if column not in ranges:
                continue
            lo, hi = ranges[column]
            limit = limits.get(limit_key)
            if lo < 0 or (limit is not None and hi >= limit):
                held = f"the negative id {lo}" if lo < 0 else f"ids up to {hi}"
                size = (
                    f"{limit_key} is {limit} (ids 0 .. {limit - 1})"
                    if limit is not None
                    else "ids start at 0"
                )
                if column == "token_type_ids":
                    fix = (
                        "this model takes fewer segment types: drop the token_type_ids column or re-tokenize the set "
                        "with the ingredients' tokenizer."
                    )
                else:
                    fix = (
                        "the set was tokenized with a different tokenizer than the ingredients' (a tokenizer "
                        "mismatch): re-tokenize it with the ingredients' tokenizer, or pass the raw text with "
                        "text_columns= and let hf_soups tokenize it."
                    )
                raise EvaluationError(
                    f"Eval set {name!r}: column {column!r} holds {held}, but {where}'s {size}; {fix}"
                )
        positions = limits.get("positions")
        if "length" in ranges and positions is not None and ranges["length"][1] > positions:
            raise EvaluationError(
                f"Eval set {name!r}: an example has {ranges['length'][1]} tokens, more than the {positions} positions "
                f"of {where}; truncate the input_ids to {positions} tokens (or pass raw text with text_columns=, "
                "which is truncated to the model's limit)."
            )

    def _check_label_ranges(self, name: str, examples: list[dict[str, Any]]) -> None:
        if not examples or "labels" not in examples[0]:
            return
        labels = [ex.get("labels") for ex in examples]
        missing = [i for i, lab in enumerate(labels) if lab is None]
        if missing:
            raise EvaluationError(
                f"Eval set {name!r}: examples {missing[:5]} have no label (None); drop them or fill them in."
            )
        task = self.task
        if task == "classification" and self.problem_type == "single_label_classification":
            bad = [x for x in labels if not isinstance(x, (int, float)) or not float(x).is_integer()]
            if bad:
                raise EvaluationError(
                    f"Eval set {name!r}: labels {bad[:5]} are not class ids (0 .. num_labels - 1); for a regression "
                    "model the config needs num_labels=1 or problem_type='regression'."
                )
        elif (
            task == "classification" and self.problem_type == "multi_label_classification" and self.num_labels
        ):
            widths = sorted({len(x) for x in labels if hasattr(x, "__len__")})
            if widths != [int(self.num_labels)]:
                raise EvaluationError(
                    f"Eval set {name!r}: multi-label targets have {widths} entries, but the model has "
                    f"{self.num_labels} labels; give one 0/1 entry per label."
                )
        elif task in ("token-classification", "causal-lm", "masked-lm"):
            if task == "token-classification":
                limit, what = self.num_labels, "the model's num_labels"
            else:
                limit, what = self._config_limits.get("vocab_size"), "the model config's vocab_size"
            import numpy as np

            rows = []
            for i, (ex, lab) in enumerate(zip(examples, labels)):
                lab = lab.tolist() if hasattr(lab, "tolist") else lab
                if not isinstance(lab, (list, tuple)):
                    raise EvaluationError(
                        f"Eval set {name!r}: the label of example {i} is {lab!r}; {task} needs one label per token "
                        "(-100 for tokens that are not scored)."
                    )
                if "input_ids" in ex and len(lab) != len(ex["input_ids"]):
                    raise EvaluationError(
                        f"Eval set {name!r}: example {i} has {len(lab)} labels for {len(ex['input_ids'])} tokens; "
                        "give one label per token of input_ids (-100 for tokens that are not scored)."
                    )
                rows.append(lab)
            flat = np.array([v for row in rows for v in row] if rows else [], dtype=np.float64)
            scored = flat[flat != -100]
            bad = scored[(scored < 0) | ((scored >= int(limit)) if limit is not None else False)]
            if bad.size:
                size = f"{what} ({limit})" if limit is not None else "ids from 0"
                fix = (
                    "check label_column= and the label encoding"
                    if task == "token-classification"
                    else "the labels were tokenized with another tokenizer than the ingredients' (a tokenizer mismatch)"
                )
                shown = sorted({int(v) for v in bad})[:5]
                raise EvaluationError(
                    f"Eval set {name!r}: column 'labels' holds {shown}, outside {size}; {fix}."
                )

    def _check_model_inputs(self, model: Any) -> None:
        """The eval sets' id ranges against the model's own embedding tables (once per model, no forward pass)."""
        import weakref

        if self._models_checked is None:
            self._models_checked = weakref.WeakSet()
        try:
            if model in self._models_checked:
                return
        except TypeError:  # not weak-referenceable: check every time (cheap)
            pass
        limits = _model_limits(model)
        for name in self._datasets:
            self._check_ranges(name, limits, "the model's embeddings")
        try:
            self._models_checked.add(model)
        except TypeError:
            pass

    # -------------------------------------------------------------------------------- metric set-up

    def _finish_metric_setup(self) -> None:
        """Defaults that depend on the task, then a dry call of the metric to check `metric_key`."""
        from .metrics import load_metric

        spec = self._metric_spec
        if self.compute_metrics is None and isinstance(spec, str) and spec not in LOSS_METRICS:
            config_name = None
            if self.problem_type == "multi_label_classification" and spec in _MULTILABEL_METRICS:
                config_name = "multilabel"
            self._metric = load_metric(
                spec, config_name=config_name, trust_remote_code=self._trust_remote_code
            )
            n_classes = self._n_classes()
            multi = self.problem_type == "multi_label_classification"
            if (
                spec in _AVERAGED_METRICS
                and "average" not in self._metric_kwargs
                and ((n_classes or 2) > 2 or multi)
            ):
                self._metric_kwargs["average"] = "macro"
                logger.info(
                    "Metric %r on %s classes: using average='macro' (pass metric_kwargs={'average': ...} to change).",
                    spec,
                    n_classes,
                )
            if spec == "matthews_correlation" and config_name == "multilabel":
                self._metric_kwargs.setdefault("average", "macro")
            if self.problem_type == "regression" and spec in _MULTILABEL_METRICS:
                raise EvaluationError(
                    f"metric={spec!r} needs class predictions, but the model is a regression model (one output); "
                    "pass metric='pearsonr', 'spearmanr' or 'loss'."
                )
        self._check_metric_key()

    def _n_classes(self) -> int | None:
        if self.task in ("causal-lm", "masked-lm"):
            return None
        return int(self.num_labels) if self.num_labels else None

    def _dry_outputs(self) -> _SetOutputs | None:
        import numpy as np

        c = self._n_classes() or 2
        n = max(2 * c, 4)
        if self.task == "classification" and self.problem_type == "regression":
            refs = np.linspace(0.0, 1.0, n).astype(np.float32)
            return _SetOutputs(logits=(refs[::-1].copy() + refs * 2)[:, None], labels=refs)
        if self.task == "classification" and self.problem_type == "multi_label_classification":
            refs = (np.arange(n * c).reshape(n, c) % 3 == 0).astype(np.float32)
            logits = np.where(np.roll(refs, 1, axis=0) > 0, 1.0, -1.0).astype(np.float32)
            return _SetOutputs(logits=logits, labels=refs)
        if self.task in ("classification", "token-classification") or self.task is None:
            refs = np.arange(n) % c
            logits = np.eye(c, dtype=np.float32)[(refs + (np.arange(n) % 2)) % c]
            return _SetOutputs(logits=logits, labels=refs)
        if self.task in ("causal-lm", "masked-lm"):
            refs = np.arange(8) % 4
            return _SetOutputs(loss_sum=8.0, loss_count=4.0, preds=(refs + np.arange(8) % 2) % 4, labels=refs)
        return None

    def _check_metric_key(self) -> None:
        """Check (by a dry call on a handful of made-up predictions) that metric_key is in the metric's output."""
        if self.compute_metrics is not None:
            keys = self._dry_compute_metrics()
        else:
            outputs = self._dry_outputs()
            if outputs is None:
                return
            try:
                keys = list(self._score_outputs(outputs))
            except EvaluationError:
                raise
            except Exception as err:
                raise EvaluationError(
                    f"Metric {self.metric_name!r} fails on a small dry run ({type(err).__name__}: {err}). Check "
                    "metric_kwargs= (e.g. average='macro' for more than two classes) and the metric's inputs."
                ) from err
        if keys is None:  # cannot know before the first real evaluation
            return
        self._set_metric_key(keys)

    def _set_metric_key(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        wanted = self._user_metric_key
        if wanted is not None:
            if wanted not in keys and wanted.startswith("eval_") and wanted[5:] in keys:
                wanted = wanted[5:]
            if wanted not in keys:
                raise EvaluationError(
                    f"metric_key={self._user_metric_key!r} is not among the outputs of metric "
                    f"{self.metric_name!r}: {keys}. Pass one of them as metric_key=."
                )
            key = wanted
        else:
            spec = self._metric_spec if self.compute_metrics is None else None
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
        self.metric_key = key
        if self._user_greater is None:
            self.greater_is_better = not (
                key in _LOWER_IS_BETTER or key.endswith("_loss") or key.endswith("loss")
            )
        self._key_checked = True

    def _dry_compute_metrics(self) -> list[str] | None:
        import numpy as np
        from transformers import EvalPrediction

        if self.task not in ("classification", "token-classification"):
            return None
        outputs = self._dry_outputs()
        labels = outputs.labels
        logits = outputs.logits
        if self.task == "token-classification":
            logits, labels = logits[None], labels[None]
        try:
            result = self.compute_metrics(EvalPrediction(predictions=logits, label_ids=np.asarray(labels)))
            keys = list(_to_float_dict(result, "compute_metrics"))
        except (
            Exception
        ) as err:  # made-up data may not suit a user function: check after the first evaluation
            logger.debug(
                "compute_metrics dry run failed (%s); metric_key is checked after the first evaluation.", err
            )
            return None
        return keys + ["loss"]

    # -------------------------------------------------------------------------------- running models

    def _ensure_bound(self, model: Any) -> None:
        if self._examples is None:
            cfg = model.config.to_dict() if hasattr(model, "config") else {}
            self.bind(config=cfg, model=model)

    def _get_accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator

            want_cpu = self._device_request is not None and str(self._device_request).startswith("cpu")
            try:
                self._accelerator = Accelerator(cpu=want_cpu)
            except ValueError:  # the accelerate state already lives on a GPU: place tensors ourselves
                self._accelerator = Accelerator()
            import torch

            acc = self._accelerator
            if self._device_request is not None and acc.num_processes == 1:
                self._device = torch.device(self._device_request)
            elif (
                self._device_request is None
                and acc.num_processes == 1
                and acc.device.type not in ("cuda", "cpu")
            ):
                self._device = torch.device("cpu")  # mps/xpu only when asked for
            else:
                self._device = acc.device
        return self._accelerator

    @property
    def device(self):
        """The torch device models are evaluated on."""
        self._get_accelerator()
        return self._device

    @property
    def num_processes(self) -> int:
        return self._get_accelerator().num_processes

    def _loader(self, name: str):
        if name not in self._loaders:
            from torch.utils.data import DataLoader

            acc = self._get_accelerator()
            loader = DataLoader(
                self._examples[name],
                batch_size=self.batch_size,
                shuffle=False,
                collate_fn=_PadCollator(self._pad_token_id or 0, causal_labels=self.task == "causal-lm"),
            )
            self._loaders[name] = acc.prepare(loader, device_placement=[False])
        return self._loaders[name]

    def predict(self, model: Any) -> dict[str, _SetOutputs]:
        """Run `model` over every eval set and gather what the metrics need (on every process)."""
        import torch

        self._ensure_bound(model)
        self._check_model_inputs(model)
        acc = self._get_accelerator()
        device = self.device
        model_device = (
            next(iter(model.parameters())).device if any(True for _ in model.parameters()) else device
        )
        if model_device != device:
            model.to(device)
        was_training = model.training
        model.eval()
        accepted = _forward_arguments(model)
        out: dict[str, _SetOutputs] = {}
        try:
            with torch.inference_mode():
                for name in self._datasets:
                    out[name] = self._predict_set(model, name, acc, device, accepted)
        finally:
            if was_training:
                model.train()
        return out

    def _predict_set(self, model, name, acc, device, accepted) -> _SetOutputs:
        import numpy as np
        import torch

        res = _SetOutputs()
        logits_parts, label_parts, pred_parts = [], [], []
        loss_sum = torch.zeros((), dtype=torch.float64)
        loss_count = torch.zeros((), dtype=torch.float64)
        gather_device = acc.device if acc.num_processes > 1 else None
        from huggingface_hub.utils import tqdm

        batches = tqdm(
            self._loader(name),
            desc=f"Evaluating on {name}",
            unit="batch",
            leave=False,
            disable=not self.progress or not acc.is_main_process,
            name="hf_soups",
        )
        for batch in batches:
            labels = batch.pop("labels", None)
            inputs = {k: v.to(device) for k, v in batch.items() if accepted is None or k in accepted}
            output = model(**inputs)
            logits = output.logits if hasattr(output, "logits") else output[0]
            logits = logits.float()
            if labels is not None:
                labels = labels.to(device)
            if self.task in ("causal-lm", "masked-lm"):
                if self.task == "causal-lm":
                    logits, labels = logits[:, :-1], labels[:, 1:]
                tok_loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="none",
                ).view(labels.shape)
                valid = labels != -100
                per_example = torch.stack([tok_loss.sum(-1).double(), valid.sum(-1).double()], dim=-1)
                preds = torch.where(valid, logits.argmax(-1), torch.full_like(labels, -100))
                if self.compute_metrics is not None:
                    payload = (logits, labels)
                    payload = _pad_gather(
                        acc, payload, gather_device, pad_dims=(1, 1), pad_values=(-100, -100)
                    )
                    res.raw_logits.append(payload[0].cpu().numpy())
                    res.raw_labels.append(payload[1].cpu().numpy())
                g_stats, g_preds, g_labels = _pad_gather(
                    acc,
                    (per_example, preds, labels),
                    gather_device,
                    pad_dims=(None, 1, 1),
                    pad_values=(0, -100, -100),
                )
                loss_sum += g_stats[:, 0].sum().cpu()
                loss_count += g_stats[:, 1].sum().cpu()
                mask = g_labels != -100
                pred_parts.append(g_preds[mask].cpu().numpy())
                label_parts.append(g_labels[mask].cpu().numpy())
            elif self.task == "token-classification" or (
                self.task == "custom" and labels is not None and logits.dim() == 3
            ):
                g_logits, g_labels = _pad_gather(
                    acc, (logits, labels), gather_device, pad_dims=(1, 1), pad_values=(-100, -100)
                )
                if self.compute_metrics is not None:
                    res.raw_logits.append(g_logits.cpu().numpy())
                    res.raw_labels.append(g_labels.cpu().numpy())
                if self.task == "token-classification":
                    mask = g_labels != -100
                    logits_parts.append(g_logits[mask].cpu().numpy())
                    label_parts.append(g_labels[mask].cpu().numpy())
            else:
                g_logits, g_labels = _pad_gather(acc, (logits, labels), gather_device, pad_dims=(None, None))
                if self.compute_metrics is not None:
                    res.raw_logits.append(g_logits.cpu().numpy())
                    res.raw_labels.append(g_labels.cpu().numpy() if g_labels is not None else None)
                logits_parts.append(g_logits.cpu().numpy())
                if g_labels is not None:
                    label_parts.append(g_labels.cpu().numpy())
        if self.task in ("causal-lm", "masked-lm"):
            res.loss_sum, res.loss_count = float(loss_sum), float(loss_count)
            res.preds = np.concatenate(pred_parts) if pred_parts else np.zeros(0, dtype=np.int64)
            res.labels = np.concatenate(label_parts) if label_parts else np.zeros(0, dtype=np.int64)
        else:
            res.logits = np.concatenate(logits_parts) if logits_parts else None
            res.labels = np.concatenate(label_parts) if label_parts else None
        return res

    def score(self, predictions: Mapping[str, _SetOutputs]) -> dict[str, dict[str, float]]:
        """Metrics of gathered predictions, per eval set."""
        scores = {name: _loss_last(self._score_outputs(outputs)) for name, outputs in predictions.items()}
        if not self._key_checked:
            self._set_metric_key(list(scores[self.select_on]))
        return scores

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
    ) -> tuple[dict[str, dict[str, float]], dict[str, _SetOutputs]]:
        """Like [`evaluate`], also returning the gathered predictions (for logit ensembles)."""
        start = time.perf_counter()
        predictions = self.predict(model)
        scores = self.score(predictions)
        self.timings.append(time.perf_counter() - start)
        logger.debug("Evaluated %s: %s", type(model).__name__, scores)
        return scores, predictions

    # -------------------------------------------------------------------------------- ensembles

    def supports_ensemble(self) -> bool:
        """Whether logit ensembles can be scored (classification and token classification)."""
        return self.task in ("classification", "token-classification")

    @staticmethod
    def add_predictions(
        total: dict[str, _SetOutputs] | None, new: dict[str, _SetOutputs]
    ) -> dict[str, _SetOutputs]:
        """Running sum of logits over models (for the logit ensemble); `total=None` starts one."""
        if total is None:
            return {
                k: _SetOutputs(logits=v.logits.astype("float64"), labels=v.labels) for k, v in new.items()
            }
        for k, v in new.items():
            total[k].logits += v.logits
        return total

    def score_ensemble(self, total: dict[str, _SetOutputs], n_models: int) -> dict[str, dict[str, float]]:
        """Scores of the mean logits of `n_models` models summed with [`add_predictions`]."""
        mean = {
            k: _SetOutputs(logits=(v.logits / n_models).astype("float32"), labels=v.labels)
            for k, v in total.items()
        }
        return self.score(mean)

    # -------------------------------------------------------------------------------- scoring

    def _score_outputs(self, out: _SetOutputs) -> dict[str, float]:
        import numpy as np
        import torch

        if self.compute_metrics is not None and (out.raw_logits or out.logits is not None):
            return self._score_compute_metrics(out)
        result: dict[str, float] = {}
        task = self.task
        if task in ("causal-lm", "masked-lm"):
            loss = out.loss_sum / out.loss_count if out.loss_count else float("nan")
            result["loss"] = loss
            result["perplexity"] = math.exp(min(loss, 700.0)) if not math.isnan(loss) else float("nan")
            if self._metric is not None and self._metric_spec not in LOSS_METRICS and out.preds is not None:
                result.update(self._call_metric(out.preds, out.labels))
            return result
        logits = torch.from_numpy(np.ascontiguousarray(out.logits, dtype=np.float32))
        labels = out.labels
        if self.problem_type == "regression":
            preds = logits.reshape(len(logits), -1)[:, 0]
            refs = torch.as_tensor(labels, dtype=torch.float32).reshape(-1)
            result["loss"] = float(torch.nn.functional.mse_loss(preds, refs))
            if self._metric_spec not in LOSS_METRICS:
                result.update(self._call_metric(preds.numpy(), refs.numpy()))
            return result
        if self.problem_type == "multi_label_classification":
            refs = torch.as_tensor(labels, dtype=torch.float32)
            result["loss"] = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, refs))
            preds = (logits > 0).int().numpy()
            if self._metric_spec not in LOSS_METRICS:
                result.update(self._call_metric(preds, refs.int().numpy()))
            return result
        refs = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        result["loss"] = float(torch.nn.functional.cross_entropy(logits, refs)) if len(refs) else float("nan")
        if self._metric_spec not in LOSS_METRICS:
            result.update(self._call_metric(logits.argmax(-1).numpy(), refs.numpy()))
        return result

    def _call_metric(self, preds: np.ndarray, refs: np.ndarray) -> dict[str, float]:
        metric = self._metric
        kwargs = self._metric_kwargs
        if hasattr(metric, "compute"):
            result = metric.compute(predictions=preds.tolist(), references=refs.tolist(), **kwargs)
        else:
            result = metric(predictions=preds.tolist(), references=refs.tolist(), **kwargs)
        return _to_float_dict(result, getattr(metric, "__name__", None) or self.metric_name)

    def _score_compute_metrics(self, out: _SetOutputs) -> dict[str, float]:
        import numpy as np
        from transformers import EvalPrediction

        if out.raw_logits:
            width = max(x.shape[1] for x in out.raw_logits) if out.raw_logits[0].ndim >= 2 else None
            if out.raw_logits[0].ndim >= 3:
                logits = np.concatenate([_pad_np(x, width, -100.0) for x in out.raw_logits])
                labels = np.concatenate([_pad_np(y, width, -100) for y in out.raw_labels])
            else:
                logits = np.concatenate(out.raw_logits)
                labels = np.concatenate(out.raw_labels) if out.raw_labels[0] is not None else None
        else:  # an ensemble's mean logits
            logits, labels = out.logits, out.labels
        result = _to_float_dict(
            self.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)), "compute_metrics"
        )
        if self.task in ("causal-lm", "masked-lm") and out.loss_count:
            result.setdefault("loss", out.loss_sum / out.loss_count)
            result.setdefault("perplexity", math.exp(min(result["loss"], 700.0)))
        elif out.logits is not None and out.labels is not None and self.task in ("classification",):
            result.setdefault("loss", self._classification_loss(out))
        return result

    def _classification_loss(self, out: _SetOutputs) -> float:
        import numpy as np
        import torch

        logits = torch.from_numpy(np.ascontiguousarray(out.logits, dtype=np.float32))
        if self.problem_type == "regression":
            return float(
                torch.nn.functional.mse_loss(logits.reshape(-1), torch.as_tensor(out.labels).float())
            )
        if self.problem_type == "multi_label_classification":
            return float(
                torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, torch.as_tensor(out.labels).float()
                )
            )
        return float(
            torch.nn.functional.cross_entropy(logits, torch.as_tensor(out.labels).long().reshape(-1))
        )

    # -------------------------------------------------------------------------------- soups

    def score_soup(self, soup: Soup, model: Any) -> None:
        """Evaluate the finished soup's model and record `score`, `scores`, `metric_name` and `select_on`."""
        scores = self.evaluate(model)
        self.annotate(soup, scores)

    def annotate(self, soup: Soup, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record these scores as the soup's own."""
        soup.scores = {k: dict(v) for k, v in scores.items()}
        soup.score = self.primary(scores)
        soup.metric_name = self.metric_key
        soup.select_on = self.select_on
        soup.params.setdefault("greater_is_better", self.greater_is_better)


# ------------------------------------------------------------------------------------------------ batching


class _PadCollator:
    """Pads a list of examples into tensors without needing a tokenizer.

    `input_ids` are padded with the model's pad token id, `attention_mask` / `token_type_ids` / other sequence
    inputs with 0 and token-level `labels` with -100 (ignored by the loss and the metrics), on the right. An
    attention mask is created when padding was needed and the set had none. For causal language models
    without labels, the labels are the input ids with padding masked out (what
    `DataCollatorForLanguageModeling(mlm=False)` does).
    """

    def __init__(self, pad_token_id: int, causal_labels: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.causal_labels = causal_labels

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        batch: dict[str, torch.Tensor] = {}
        keys = list(examples[0])
        lengths = None
        for key in keys:
            values = [ex[key] for ex in examples]
            first = values[0]
            if key == "labels" and not isinstance(first, (list, tuple)) and not hasattr(first, "shape"):
                dtype = torch.float32 if any(isinstance(v, float) for v in values) else torch.long
                batch[key] = torch.tensor(values, dtype=dtype)
                continue
            tensors = [torch.as_tensor(v) for v in values]
            if tensors[0].dim() == 0 or all(t.shape == tensors[0].shape for t in tensors):
                batch[key] = torch.stack(tensors)
                if key == "labels" and batch[key].dtype == torch.float64:
                    batch[key] = batch[key].float()
                if key == "input_ids":
                    lengths = torch.tensor([t.shape[0] for t in tensors])
                continue
            pad = {"input_ids": self.pad_token_id, "labels": -100}.get(key, 0)
            width = max(t.shape[0] for t in tensors)
            out = torch.full((len(tensors), width, *tensors[0].shape[1:]), pad, dtype=tensors[0].dtype)
            for i, t in enumerate(tensors):
                out[i, : t.shape[0]] = t
            batch[key] = out
            if key == "input_ids":
                lengths = torch.tensor([t.shape[0] for t in tensors])
        if "input_ids" in batch and "attention_mask" not in batch and lengths is not None:
            width = batch["input_ids"].shape[1]
            if bool((lengths < width).any()):
                batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        if self.causal_labels and "labels" not in batch and "input_ids" in batch:
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        return batch


def _loss_last(result: dict[str, float]) -> dict[str, float]:
    """The metric's own numbers first, then loss and perplexity (for readable reports)."""
    ordered = {k: v for k, v in result.items() if k not in LOSS_METRICS}
    ordered.update({k: result[k] for k in LOSS_METRICS if k in result})
    return ordered


def _pad_np(x: np.ndarray, width: int, value: float) -> np.ndarray:
    import numpy as np

    if x.shape[1] == width:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, width - x.shape[1])
    return np.pad(x, pad, constant_values=value)


def _pad_gather(acc, tensors, gather_device, pad_dims, pad_values=None):
    """Pad (along `pad_dims`) across processes, then `gather_for_metrics`; single process: returned as is."""
    if gather_device is None:
        return tensors
    pad_values = pad_values or (0,) * len(tensors)
    prepared = []
    for t, dim, value in zip(tensors, pad_dims, pad_values):
        if t is None:
            prepared.append(None)
            continue
        t = t.to(gather_device)
        if dim is not None:
            t = acc.pad_across_processes(t.contiguous(), dim=dim, pad_index=value)
        prepared.append(t)
    present = [t for t in prepared if t is not None]
    gathered = iter(acc.gather_for_metrics(tuple(present)))
    return tuple(next(gathered) if t is not None else None for t in prepared)


def _forward_arguments(model: Any) -> set[str] | None:
    import inspect

    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()) and "input_ids" not in params:
        return None
    return set(params)


def _input_limits(config: Mapping[str, Any]) -> dict[str, int]:
    """`vocab_size`, `type_vocab_size` and (absolute positions only: `n_positions`) from a config dict."""
    limits: dict[str, int] = {}
    nested = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    for key in ("vocab_size", "type_vocab_size"):
        value = config.get(key, nested.get(key))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limits[key] = value
    if (
        isinstance(config.get("n_positions"), int) and config["n_positions"] > 0
    ):  # GPT-2 style learned positions
        limits["positions"] = config["n_positions"]
    return limits


def _model_limits(model: Any) -> dict[str, int]:
    """Rows of the model's token embeddings and of their token-type and learned-position siblings."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if get is not None else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is None or not isinstance(getattr(emb, "num_embeddings", None), int):
        return {}
    limits = {"vocab_size": emb.num_embeddings}
    parent = None
    for module_name, module in model.named_modules():
        if module is emb:
            parent = module_name.rpartition(".")[0]
            break
    if parent is None:
        return limits
    siblings = dict(model.get_submodule(parent).named_children()) if parent else dict(model.named_children())
    types = siblings.get("token_type_embeddings")
    if isinstance(getattr(types, "num_embeddings", None), int):
        limits["type_vocab_size"] = types.num_embeddings
    # learned absolute positions beside the token embeddings (BERT family, GPT-2); position ids start after
    # padding_idx when there is one (RoBERTa family)
    positions = siblings.get("position_embeddings", siblings.get("wpe"))
    rows = getattr(positions, "num_embeddings", None)
    if isinstance(rows, int) and type(positions).__name__ == "Embedding":
        pad = getattr(positions, "padding_idx", None)
        limits["positions"] = rows - (pad + 1) if isinstance(pad, int) and pad >= 0 else rows
    return limits


def _guess_text_columns(columns: Sequence[str]) -> list[str] | None:
    for guess in _TEXT_COLUMN_GUESSES:
        if all(c in columns for c in guess):
            logger.info(
                "Using text column(s) %s of the eval set (pass text_columns= to choose).", list(guess)
            )
            return list(guess)
    return None


def _no_labels_message(
    name: str, columns: Sequence[str] | None, all_minus_one: bool = False, lm_hint: bool = False
) -> str:
    if all_minus_one:
        return (
            f"Eval set {name!r} has no labels: every label is -1 (a GLUE-style test split?). Use a labelled "
            "validation split for greedy soups and sweeps."
        )
    hint = (
        " For a language model scored on its own loss, pass metric='perplexity' (or 'loss')."
        if lm_hint
        else ""
    )
    return (
        f"Eval set {name!r} has no labels (columns: {list(columns or [])}); held-out scoring needs a 'label' or "
        f"'labels' column, or label_column= naming it.{hint}"
    )


# ------------------------------------------------------------------------------------------------ building


def build_evaluator(
    eval_dataset: Any,
    *,
    metric: Any = "accuracy",
    metric_key: str | None = None,
    greater_is_better: bool | None = None,
    select_on: str | None = None,
    compute_metrics: Callable[..., Mapping[str, float]] | None = None,
    tokenizer: Any = None,
    text_columns: str | Sequence[str] | None = None,
    label_column: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    metric_kwargs: Mapping[str, Any] | None = None,
    task: str | None = None,
    max_length: int | None = None,
    config: Mapping[str, Any] | None = None,
    model: Any = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> Evaluator:
    """Check the evaluation set-up and build an [`Evaluator`], before any model is loaded.

    Args:
        eval_dataset (`datasets.Dataset` or `dict[str, datasets.Dataset]`):
            Held-out data: pre-tokenized (model input columns such as `input_ids` plus `label`/`labels`) or raw
            text (see `text_columns`). A dict (or `DatasetDict`) names several sets; every set is scored.
        metric (`str`, `tuple`, `evaluate.EvaluationModule`, callable or `None`, *optional*, defaults to `"accuracy"`):
            An `evaluate` metric name (`"f1"`; the bundled accuracy, f1, precision, recall, matthews_correlation,
            pearsonr and spearmanr work offline; others, such as `("glue", "mrpc")` or a local metric folder, run
            the metric's script and need `trust_remote_code=True`), a loaded module or `evaluate.combine(...)`,
            a callable `fn(predictions, references) -> dict | float`, or `"loss"` / `"perplexity"` (the model's
            own loss; the default scores of language models). `None` picks the task's default.
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
        batch_size (`int`, *optional*, defaults to 32):
            Evaluation batch size (per process).
        device (`str`, *optional*):
            `"cpu"`, `"cuda"`, `"cuda:1"` ... Default: the `accelerate` device (CUDA when available, else CPU).
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
    from .metrics import load_metric

    if eval_dataset is None:
        raise EvaluationError("No eval_dataset: pass a datasets.Dataset (or a dict of them) with labels.")
    if isinstance(eval_dataset, Mapping):
        sets = dict(eval_dataset)
        if not sets:
            raise EvaluationError("eval_dataset is an empty dict; give at least one named datasets.Dataset.")
    else:
        sets = {"eval": eval_dataset}
    for name, ds in sets.items():
        if not hasattr(ds, "column_names") or not hasattr(ds, "select_columns"):
            kind = type(ds).__name__
            hint = (
                " (an IterableDataset: materialise it with Dataset.from_list(list(...)))"
                if "Iterable" in kind
                else ""
            )
            raise EvaluationError(f"Eval set {name!r} is a {kind}{hint}; pass a datasets.Dataset.")
        if len(ds) == 0:
            raise EvaluationError(f"Eval set {name!r} is empty.")
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
    if isinstance(text_columns, str):
        text_columns = [text_columns]
    text_columns = list(text_columns) if text_columns else None
    if text_columns and len(text_columns) > 2:
        raise EvaluationError(f"text_columns={text_columns}: give one column, or two for sentence pairs.")

    label_columns: dict[str, str | None] = {}
    for name, ds in sets.items():
        columns = list(ds.column_names)
        if label_column is not None:
            if label_column not in columns:
                raise EvaluationError(
                    f"Eval set {name!r} has no label column {label_column!r} (columns: {columns})."
                )
            label_columns[name] = label_column
        else:
            label_columns[name] = next((c for c in _LABEL_COLUMNS if c in columns), None)
    known_task = task or infer_task(config, model)[0]
    # Language models need no label column (the text is the target). When the task is not known yet (merge_models
    # builds the evaluator before reading any config), a set without labels is accepted only with a loss metric.
    lm_metric = metric is None or (isinstance(metric, str) and metric in LOSS_METRICS)
    for name, ds in sets.items():
        if label_columns[name] is not None or known_task in ("causal-lm", "masked-lm"):
            continue
        if known_task is None and lm_metric and compute_metrics is None:
            continue
        raise EvaluationError(_no_labels_message(name, ds.column_names, lm_hint=known_task is None))

    if metric is None:
        metric = "perplexity" if known_task in ("causal-lm", "masked-lm") else "accuracy"
    loaded = None
    if compute_metrics is None and not (isinstance(metric, str) and metric in LOSS_METRICS):
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
        task=task,
        max_length=max_length,
        progress=progress,
        trust_remote_code=trust_remote_code,
    )
    if config is not None or model is not None:
        evaluator.bind(config=config, model=model)
    else:
        # What can be checked before the task is known: the metric and its key, guessing the label kind.
        first_set = sets[select_on]
        lab_col = label_columns[select_on]
        if lab_col is not None:
            kind = _label_kind(first_set[0][lab_col])
            evaluator.task = "token-classification" if kind in ("sequence", "nested") else "classification"
            evaluator.problem_type = {
                "float": "regression",
                "vector-or-sequence": "multi_label_classification",
            }.get(kind, "single_label_classification")
            if kind == "int-or-float" and isinstance(first_set[0][lab_col], float):
                evaluator.problem_type = "regression"
            evaluator._finish_metric_setup()
            evaluator.task, evaluator.problem_type = task, None
            if evaluator._user_metric_key is None:
                evaluator._key_checked = False
    return evaluator


__all__ = ["Evaluator", "LOSS_METRICS", "MODEL_INPUT_COLUMNS", "TASKS", "build_evaluator", "infer_task"]
