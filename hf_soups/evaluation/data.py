"""Eval-set preparation: from a `datasets.Dataset` to the list of model-input examples every model is scored on.

Done once per eval set when the evaluator is bound: keep the model-input columns of a pre-tokenized set (or
preprocess the image column of an image set, see [`images`], or guess and tokenize the text columns of a raw one), attach the labels under `labels`, and mask a masked-LM set without
labels with a fixed seed. What a task changes (word-aligned labels, masking) is asked of the task object; the
checks of what comes out live in [`checks`].
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError
from .images import find_image_column, preprocess_images

if TYPE_CHECKING:  # pragma: no cover
    from .tasks.base import Task

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
PRIMARY_INPUTS = ("input_ids", "pixel_values", "input_values", "input_features", "inputs_embeds")
LABEL_COLUMNS = ("labels", "label", "label_ids")
_TEXT_COLUMN_GUESSES: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("text",),
    ("sentence",),
    ("tokens",),
)


def collect_sets(eval_dataset: Any) -> dict[str, Any]:
    """The eval sets by name (`{"eval": ds}` for a single set), each checked to be a non-empty `datasets.Dataset`.

    Raises:
        [`EvaluationError`]: no set, an empty dict, an empty set, or something that is not a `datasets.Dataset`.
    """
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
    return sets


def find_label_columns(sets: Mapping[str, Any], label_column: str | None) -> dict[str, str | None]:
    """Per eval set, its label column: `label_column` (which must exist), else `labels` / `label` / `label_ids`."""
    found: dict[str, str | None] = {}
    for name, ds in sets.items():
        columns = list(ds.column_names)
        if label_column is not None:
            if label_column not in columns:
                raise EvaluationError(
                    f"Eval set {name!r} has no label column {label_column!r} (columns: {columns})."
                )
            found[name] = label_column
        else:
            found[name] = next((c for c in LABEL_COLUMNS if c in columns), None)
    return found


def label_kind(value: Any) -> str:
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


def no_labels_message(
    name: str, columns: Sequence[str] | None, all_minus_one: bool = False, lm_hint: bool = False
) -> str:
    """The message of an eval set without usable labels."""
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


def guess_text_columns(columns: Sequence[str]) -> list[str] | None:
    """The GLUE-style text column(s) of a raw set (`text`, `sentence1`/`sentence2`, ...), or `None`."""
    for guess in _TEXT_COLUMN_GUESSES:
        if all(c in columns for c in guess):
            logger.info(
                "Using text column(s) %s of the eval set (pass text_columns= to choose).", list(guess)
            )
            return list(guess)
    return None


class PreprocessorSource:
    """A preprocessor (tokenizer or image processor): the one given (object, folder or Hub ID), else the ingredients'.

    Loaded on first use only, so that pre-tokenized (or pre-processed) sets never need one.

    Args:
        value (*optional*): the preprocessor, or a folder / Hub ID to load it from.
        auto_class (`str`, *optional*, defaults to `"AutoTokenizer"`): the transformers `Auto*` class that loads it.
        option (`str`, *optional*, defaults to `"tokenizer"`): the option that gives it (named in errors).
        fallback (`str`, *optional*): what else the user may pass instead (completes the error message).
    """

    def __init__(
        self,
        value: Any = None,
        *,
        auto_class: str = "AutoTokenizer",
        option: str = "tokenizer",
        fallback: str = "a pre-tokenized eval set (input_ids, attention_mask and labels columns)",
    ):
        self.value = value
        self.auto_class = auto_class
        self.option = option
        self.fallback = fallback
        self.members: Sequence[Any] = ()  # resolved ingredients (and base), whose folders may hold one

    def get(self, why: str) -> Any:
        """The preprocessor; `why` completes the error message when there is none."""
        value = self.value
        if value is not None and not isinstance(value, (str, bytes)) and not hasattr(value, "__fspath__"):
            return value
        import transformers

        auto = getattr(transformers, self.auto_class)
        candidates = [value] if value is not None else []
        for member in self.members:
            if getattr(member, "path", None) is not None and member.kind != "adapter":
                candidates.append(member.path)
        errors = []
        for cand in candidates:
            try:
                self.value = auto.from_pretrained(str(cand))
                return self.value
            except Exception as err:  # a folder without the files, a Hub ID offline, ...
                errors.append(f"{cand}: {type(err).__name__}")
        what = self.option.replace("_", " ")
        raise EvaluationError(
            f"A {what} is needed to {why}, but none was given and the ingredients ship none"
            f"{' (' + '; '.join(errors) + ')' if errors else ''}. Pass {self.option}= or {self.fallback}."
        )


class TokenizerSource(PreprocessorSource):
    """The tokenizer of raw-text sets (see [`PreprocessorSource`])."""


def tokenize_text(
    tok: Any,
    columns: list[list[Any]],
    labels: list[Any] | None,
    max_length: int,
    special_tokens_mask: bool = False,
) -> list[dict[str, Any]]:
    """Tokenize one text column (or a sentence pair) into examples, labels attached as they are."""
    enc = tok(
        *columns[:2], truncation=True, max_length=max_length, return_special_tokens_mask=special_tokens_mask
    )
    keys = [k for k in enc.keys() if k in MODEL_INPUT_COLUMNS or k == "special_tokens_mask"]
    examples = [{k: enc[k][i] for k in keys} for i in range(len(columns[0]))]
    if labels is not None:
        for ex, lab in zip(examples, labels):
            ex["labels"] = lab
    return examples


def tokenize_words(
    tok: Any, columns: list[list[Any]], labels: list[Any] | None, max_length: int
) -> list[dict[str, Any]]:
    """Tokenize a column of pre-split words; the first sub-token of each word carries its label, the rest -100."""
    if len(columns) != 1:
        raise EvaluationError("Token classification takes one column of pre-split words (text_columns=).")
    enc = tok(columns[0], is_split_into_words=True, truncation=True, max_length=max_length)
    examples = []
    for i in range(len(columns[0])):
        ex = {k: enc[k][i] for k in enc.keys()}
        if labels is not None:
            aligned, prev = [], None
            for w in enc.word_ids(i):
                aligned.append(-100 if w is None or w == prev else int(labels[i][w]))
                prev = w
            ex["labels"] = aligned
        examples.append(ex)
    return examples


def mask_tokens(examples: list[dict[str, Any]], tok: Any) -> list[dict[str, Any]]:
    """Mask 15% of the tokens once, with a fixed seed, so that every model sees the same masked set."""
    import torch

    if tok.mask_token_id is None:
        raise EvaluationError("The tokenizer has no mask token; pass an eval set with labels for masked LM.")
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


class EvalSetPreparer:
    """Turns each eval set into examples for one task (columns kept, text tokenized, labels under `labels`).

    Args:
        task ([`Task`]): the bound task (it tokenizes word-level sets and masks masked-LM sets).
        text_columns (`list[str]`, *optional*): the text column(s) of raw sets (guessed when not given).
        label_columns (`dict[str, str | None]`): per set, its label column.
        tokenizers ([`TokenizerSource`]): where the tokenizer comes from, when one is needed.
        images ([`PreprocessorSource`], *optional*): where the image processor comes from, for sets with an image
            column (see [`images`]).
        image_mode (`str`, *optional*, defaults to `"RGB"`): the PIL mode images are converted to.
        max_length (`int`, *optional*): truncation length (default: the tokenizer's / model's limit).
        pad_token_id (`int`, *optional*): the config's `pad_token_id` (else the tokenizer's, once one is loaded).
    """

    def __init__(
        self,
        task: Task,
        *,
        text_columns: list[str] | None,
        label_columns: Mapping[str, str | None],
        tokenizers: TokenizerSource,
        max_length: int | None,
        pad_token_id: int | None,
        images: PreprocessorSource | None = None,
        image_mode: str = "RGB",
    ):
        self.task = task
        self.images = images
        self.image_mode = image_mode
        self.text_columns = text_columns
        self.label_columns = label_columns
        self.tokenizers = tokenizers
        self.max_length = max_length
        #: what batches are padded with: the config's `pad_token_id`, else the tokenizer's (once one is loaded)
        self.pad_token_id = pad_token_id

    def prepare(self, name: str, ds: Any) -> list[dict[str, Any]]:
        """The examples of eval set `name`."""
        columns = list(ds.column_names)
        label_col = self.label_columns.get(name)
        pretokenized = any(c in columns for c in PRIMARY_INPUTS)
        image_column = None if pretokenized or self.text_columns else find_image_column(ds)
        if image_column is not None:
            examples = self._preprocess_images(name, ds, image_column, label_col)
        elif pretokenized and not self.text_columns:
            keep = [c for c in columns if c in MODEL_INPUT_COLUMNS]
            data = ds.select_columns(keep + ([label_col] if label_col else [])).to_dict()
            examples = [{k: data[k][i] for k in keep} for i in range(len(ds))]
            if label_col:
                for ex, lab in zip(examples, data[label_col]):
                    ex["labels"] = lab
        else:
            text_cols = self.text_columns or guess_text_columns(columns)
            if not text_cols:
                raise EvaluationError(
                    f"Eval set {name!r} has neither model inputs ({', '.join(PRIMARY_INPUTS[:2])}), an image column "
                    f"nor a known text column (its columns: {columns}); pass text_columns= naming the text column(s)."
                )
            missing = [c for c in text_cols if c not in columns]
            if missing:
                raise EvaluationError(f"Eval set {name!r} has no column {missing[0]!r} (columns: {columns}).")
            examples = self._tokenize(name, ds, text_cols, label_col)
        if self.task.needs_labels and not label_col:
            raise EvaluationError(no_labels_message(name, columns))
        if not label_col:
            examples = self.task.complete_unlabelled(examples, self.tokenizers)
        for ex in examples:
            ex.pop("special_tokens_mask", None)
        return examples

    def _tokenize(
        self, name: str, ds: Any, text_cols: list[str], label_col: str | None
    ) -> list[dict[str, Any]]:
        tok = self.tokenizers.get(f"tokenize the text column(s) {text_cols} of eval set {name!r}")
        if self.pad_token_id is None:
            self.pad_token_id = tok.pad_token_id
        columns = [list(ds[c]) for c in text_cols]
        labels = list(ds[label_col]) if label_col else None
        return self.task.tokenize(tok, columns, labels, self._max_length(tok))

    def _preprocess_images(
        self, name: str, ds: Any, column: str, label_col: str | None
    ) -> list[dict[str, Any]]:
        source = self.images or PreprocessorSource(
            auto_class="AutoImageProcessor", option="image_processor", fallback="a pixel_values column"
        )
        processor = source.get(f"preprocess the images (column {column!r}) of eval set {name!r}")
        labels = list(ds[label_col]) if label_col else None
        return preprocess_images(processor, ds, column, labels, name=name, mode=self.image_mode)

    def _max_length(self, tokenizer: Any) -> int:
        if self.max_length:
            return int(self.max_length)
        limits = [getattr(tokenizer, "model_max_length", None)]
        if self.tokenizers.members:
            cfg = self.tokenizers.members[0].config
            limits += [cfg.get("max_position_embeddings"), cfg.get("n_positions"), cfg.get("max_seq_len")]
        limits = [int(x) for x in limits if isinstance(x, (int, float)) and 0 < x < 1_000_000]
        return min(limits) if limits else 512


__all__ = [
    "LABEL_COLUMNS",
    "MODEL_INPUT_COLUMNS",
    "EvalSetPreparer",
    "PreprocessorSource",
    "TokenizerSource",
    "collect_sets",
    "find_label_columns",
    "guess_text_columns",
    "label_kind",
    "mask_tokens",
    "no_labels_message",
    "tokenize_text",
    "tokenize_words",
]
