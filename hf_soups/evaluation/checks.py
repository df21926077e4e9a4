"""Input validation: ids, lengths and labels that would crash a model (or be silently misread), named first.

Data only: these functions read prepared examples, a config dict or a model's embedding sizes, and raise an
[`EvaluationError`] naming the eval set, the column, the offending values, the limit and the fix. No model runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import EvaluationError
from .data import no_labels_message

_ID_COLUMNS = ("input_ids", "decoder_input_ids", "token_type_ids")
_ID_LIMITS = (
    ("input_ids", "vocab_size"),
    ("decoder_input_ids", "vocab_size"),
    ("token_type_ids", "type_vocab_size"),
)


def input_limits(config: Mapping[str, Any]) -> dict[str, int]:
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


def model_limits(model: Any) -> dict[str, int]:
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


def input_ranges(name: str, examples: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """`(min, max)` of each id column and of the `input_ids` lengths, after checking each holds lists of ints."""
    import itertools

    import numpy as np

    ranges: dict[str, tuple[int, int]] = {}
    for column in _ID_COLUMNS:
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
    return ranges


def check_ranges(
    name: str, ranges: Mapping[str, tuple[int, int]], limits: Mapping[str, int], where: str
) -> None:
    """Refuse ids outside `limits` (from [`input_limits`] or [`model_limits`]; `where` names their origin)."""
    for column, limit_key in _ID_LIMITS:
        if column not in ranges:
            continue
        lo, hi = ranges[column]
        limit = limits.get(limit_key)
        if lo < 0 or (limit is not None and hi >= limit):
            held = f"the negative id {lo}" if lo < 0 else f"ids up to {hi}"
            size = f"{limit_key} is {limit} (ids 0 .. {limit - 1})" if limit is not None else "ids start at 0"
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


def check_class_labels(
    name: str,
    examples: list[dict[str, Any]],
    *,
    problem_type: str | None,
    label2id: Mapping[str, int] | None,
    num_labels: int | None,
) -> None:
    """Sequence-classification labels: strings mapped with `label2id` (in place), -1 sets and out-of-range ids refused."""
    if not examples or "labels" not in examples[0]:
        return
    labels = [ex["labels"] for ex in examples]
    if all(isinstance(x, str) for x in labels):
        if not label2id:
            raise EvaluationError(
                f"Eval set {name!r} has string labels but the model config has no label2id to map them; "
                "encode the labels as integers."
            )
        unknown = sorted({x for x in labels if x not in label2id})
        if unknown:
            raise EvaluationError(
                f"Eval set {name!r} has labels {unknown[:5]} that the model does not know (label2id: {label2id})."
            )
        for ex in examples:
            ex["labels"] = label2id[ex["labels"]]
        return
    single = problem_type == "single_label_classification" or (
        problem_type is None and all(isinstance(x, int) for x in labels)
    )
    if single:
        ints = [x for x in labels if isinstance(x, (int, float))]
        if ints and all(x == -1 for x in ints):
            raise EvaluationError(no_labels_message(name, None, all_minus_one=True))
        if num_labels:
            bad = sorted({int(x) for x in ints if not 0 <= int(x) < int(num_labels)})
            if bad:
                raise EvaluationError(
                    f"Eval set {name!r} has labels {bad[:5]} outside the model's {num_labels} classes "
                    "(0 .. num_labels - 1); check label_column= and the label encoding."
                )


def labels_of(name: str, examples: list[dict[str, Any]]) -> list[Any] | None:
    """The examples' labels (`None` for a set without labels); a missing (None) label is refused."""
    if not examples or "labels" not in examples[0]:
        return None
    labels = [ex.get("labels") for ex in examples]
    missing = [i for i, lab in enumerate(labels) if lab is None]
    if missing:
        raise EvaluationError(
            f"Eval set {name!r}: examples {missing[:5]} have no label (None); drop them or fill them in."
        )
    return labels


def check_class_ids(name: str, labels: Sequence[Any]) -> None:
    """Single-label targets must be whole numbers (class ids)."""
    bad = [x for x in labels if not isinstance(x, (int, float)) or not float(x).is_integer()]
    if bad:
        raise EvaluationError(
            f"Eval set {name!r}: labels {bad[:5]} are not class ids (0 .. num_labels - 1); for a regression "
            "model the config needs num_labels=1 or problem_type='regression'."
        )


def check_multi_hot_width(name: str, labels: Sequence[Any], num_labels: int) -> None:
    """Multi-label targets must hold one entry per label."""
    widths = sorted({len(x) for x in labels if hasattr(x, "__len__")})
    if widths != [int(num_labels)]:
        raise EvaluationError(
            f"Eval set {name!r}: multi-label targets have {widths} entries, but the model has "
            f"{num_labels} labels; give one 0/1 entry per label."
        )


def check_token_labels(
    name: str,
    examples: list[dict[str, Any]],
    labels: Sequence[Any],
    *,
    task: str,
    limit: int | None,
    what: str,
    fix: str,
) -> None:
    """Token-level targets: one label per token, each -100 or in `0 .. limit - 1` (`what` names the limit)."""
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
        shown = sorted({int(v) for v in bad})[:5]
        raise EvaluationError(f"Eval set {name!r}: column 'labels' holds {shown}, outside {size}; {fix}.")


__all__ = [
    "check_class_ids",
    "check_class_labels",
    "check_multi_hot_width",
    "check_ranges",
    "check_token_labels",
    "input_limits",
    "input_ranges",
    "labels_of",
    "model_limits",
]
