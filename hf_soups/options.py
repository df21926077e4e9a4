"""The field helper and the value checks that every hf_soups configuration uses.

An option is declared once, as a dataclass field made with [`option`]: its type annotation, default, help text
and *kind* (the check its values go through) live together. The API ([`merge_models`]), the recipe files, the
`hf-soups` flags and [`SoupTrainerCallback`] all read those fields; the checks below are the only place a
value is judged. This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

MISSING = dataclasses.MISSING


class OptionProblem(ValueError):
    """One value refused by a check: `key: message`, where the message says what was expected and what was got."""


def describe(value: Any) -> str:
    """How a refused value is shown in a message."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list {list(value)!r}" if len(repr(value)) < 60 else "a list"
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def option(
    default: Any = None,
    *,
    help: str,
    kind: str = "any",
    default_factory: Callable[[], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    file: bool | str = True,
    cli: bool | Mapping[str, Any] = True,
    internal: bool = False,
) -> Any:
    """A dataclass field declaring one option (transformers `TrainingArguments` / peft `LoraConfig` style).

    Args:
        default (*optional*): the default value.
        help (`str`): one sentence for docstrings, `--help` and the recipe file documentation.
        kind (`str`, *optional*, defaults to `"any"`): the check values go through (a key of [`KINDS`]).
        default_factory (`Callable`, *optional*): for mutable defaults.
        choices (`tuple[str, ...]`, *optional*): allowed values of a `"choice"` option.
        file (`bool` or `str`, *optional*, defaults to `True`): whether recipe files carry the option; a string
            names the kind used for the file's value when it differs (a path resolved against the file's folder,
            an import string instead of a callable).
        cli (`bool` or `Mapping`, *optional*, defaults to `True`): whether `hf-soups merge` has a flag for it;
            a mapping overrides `argparse.add_argument` settings (`{"flag": "--text-column", "nargs": "+"}`).
        internal (`bool`, *optional*): not a user option (never read from files or flags).
    """
    metadata = {
        "help": help,
        "kind": kind,
        "choices": choices,
        "file": file,
        "cli": cli,
        "internal": internal,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(cls: Any) -> list[dataclasses.Field]:
    """The user options of a configuration class (internal fields left out)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def did_you_mean(key: str, known: Any, *, list_known: bool = True) -> str:
    """`" (did you mean 'alpha'?)"` for a near miss, else the list of known keys (or nothing)."""
    known = sorted(known)
    close = difflib.get_close_matches(str(key).replace("-", "_").lower(), known, n=1, cutoff=0.7)
    if not close:
        close = difflib.get_close_matches(str(key).lower(), known, n=1, cutoff=0.7)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; known: {', '.join(known)}" if list_known else ""


# ------------------------------------------------------------------------------------------------ checks
# Each check takes (value, field metadata) and returns the normalised value or raises OptionProblem.


def _number(value: Any, what: str = "a number") -> float:
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars are numbers too
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionProblem(f"expected {what}, got {describe(value)}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise OptionProblem(f"expected a finite number, got {value!r}")
    return value


def check_str(value: Any, meta: Mapping) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise OptionProblem(f"expected a non-empty string, got {describe(value)}")


def check_bool(value: Any, meta: Mapping) -> bool:
    if isinstance(value, bool):
        return value
    raise OptionProblem(f"expected true or false, got {describe(value)}")


def check_positive_int(value: Any, meta: Mapping) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise OptionProblem(f"expected a positive integer, got {describe(value)}")


def check_number(value: Any, meta: Mapping) -> float:
    return _number(value)


def check_choice(value: Any, meta: Mapping) -> str:
    choices = meta["choices"]
    if isinstance(value, str) and value in choices:
        return value
    raise OptionProblem(f"expected one of {', '.join(choices)}, got {describe(value)}")


def check_str_or_str_list(value: Any, meta: Mapping) -> str | list[str]:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return list(value)
    raise OptionProblem(f"expected a column name or a list of column names, got {describe(value)}")


def check_weights(value: Any, meta: Mapping) -> list[float]:
    """A list of finite numbers >= 0, not all zero (normalised by the recipe; the scale does not matter)."""
    if (
        isinstance(value, (str, bytes, Mapping))
        or not isinstance(value, (list, tuple))
        and not _is_array(value)
    ):
        raise OptionProblem(f"expected a list of numbers, one per ingredient, got {describe(value)}")
    out = []
    for i, w in enumerate(list(value)):
        try:
            w = _number(w)
        except OptionProblem as e:
            raise OptionProblem(f"weight #{i}: {e}") from None
        if w < 0:
            raise OptionProblem(f"weight #{i} is {w}: weights must be finite and >= 0")
        out.append(w)
    if not out:
        raise OptionProblem("expected one weight per ingredient, got an empty list")
    if not any(w > 0 for w in out):
        raise OptionProblem("All weights are zero; at least one ingredient needs a positive weight")
    return out


def _is_array(value: Any) -> bool:
    return hasattr(value, "tolist") and hasattr(value, "__len__")


def _number_or_list(value: Any, one: Callable[[Any, str], float]) -> float | list[float]:
    """One checked number, or a non-empty list of them (a sweep chosen on held-out data)."""
    if isinstance(value, (list, tuple)) or _is_array(value):
        values = list(value)
        if not values:
            raise OptionProblem("expected a number or a non-empty list of numbers, got an empty list")
        return [one(a, f"[{i}]: ") for i, a in enumerate(values)]
    return one(value, "")


def _in_range(low: float, high: float, *, low_open: bool = False) -> Callable[[Any, str], float]:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def one(a: Any, where: str) -> float:
        try:
            a = _number(a, f"a number in {interval}")
        except OptionProblem as e:
            raise OptionProblem(f"{where}{e}") from None
        if not (low < a if low_open else low <= a) or a > high:
            raise OptionProblem(f"{where}expected a value in {interval}, got {a!r} (outside {interval})")
        return a

    return one


def check_alpha(value: Any, meta: Mapping) -> float | list[float]:
    """A float in [0, 1], or a non-empty list of them (a sweep chosen on held-out data); also SLERP's `t`."""
    return _number_or_list(value, _in_range(0.0, 1.0))


def check_density(value: Any, meta: Mapping) -> float | list[float]:
    """A keep fraction in (0, 1] (TIES, DARE), or a non-empty list of them (a sweep)."""
    return _number_or_list(value, _in_range(0.0, 1.0, low_open=True))


def check_scaling(value: Any, meta: Mapping) -> float | list[float]:
    """A finite number (task arithmetic's lambda), or a non-empty list of them (a sweep)."""

    def one(a: Any, where: str) -> float:
        try:
            return _number(a)
        except OptionProblem as e:
            raise OptionProblem(f"{where}{e}") from None

    return _number_or_list(value, one)


def check_seed(value: Any, meta: Mapping) -> int:
    """An integer in [0, 2**64) (DARE's random drop, reproducible from it)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64:
        return value
    raise OptionProblem(f"expected an integer in [0, 2**64) such as 0, got {describe(value)}")


def check_weights_or_sweep(value: Any, meta: Mapping) -> list[float] | list[list[float]]:
    """Weights (see [`check_weights`]), or a non-empty list of weight lists (a sweep chosen on held-out data)."""
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, (list, tuple)) or _is_array(v) for v in value)
    ):
        return _check_each(value, check_weights, meta)
    return check_weights(value, meta)


def _check_each(values: Any, check: Callable[[Any, Mapping], Any], meta: Mapping) -> list:
    """`check` applied to every item, a problem prefixed with the item's index (`[2]: expected a number ...`)."""
    out = []
    for i, v in enumerate(values):
        try:
            out.append(check(v, meta))
        except OptionProblem as e:
            raise OptionProblem(f"[{i}]: {e}") from None
    return out


def check_number_or_numbers(value: Any, meta: Mapping) -> float | list[float]:
    """A number, or a non-empty list of numbers (one ingredient's weight in each setting of a weights sweep)."""
    if isinstance(value, (list, tuple)) or _is_array(value):
        if not len(value):
            raise OptionProblem("expected a number or a non-empty list of numbers, got an empty list")
        return _check_each(value, check_number, meta)
    return check_number(value, meta)


def check_scores(value: Any, meta: Mapping) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise OptionProblem(f"expected a mapping of ingredient name to score, got {describe(value)}")
    out = {}
    for k, v in value.items():
        try:
            out[str(k)] = _number(v)
        except OptionProblem as e:
            raise OptionProblem(f"[{k!r}]: {e}") from None
    return out


DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}
"""Output dtypes, by every accepted spelling. float8 is refused everywhere: a float8 soup would round every
averaged weight to 3 mantissa bits, and transformers does not load plain float8 checkpoints; quantize a soup
after cooking instead."""


def check_dtype(value: Any, meta: Mapping) -> str | None:
    """`"bf16"`, `"torch.float16"`, `torch.bfloat16`... -> the canonical name; `"auto"` -> None."""
    name = value
    if type(value).__module__ == "torch":  # a torch.dtype, recognised without importing torch
        name = str(value)
    if isinstance(name, str):
        key = name.strip().lower().removeprefix("torch.")
        if key == "auto":
            return None
        if key in DTYPES:
            return DTYPES[key]
        if key.startswith("float8"):
            raise OptionProblem(
                f"float8 output ({value!r}) is not supported: soups are averaged in float32 and written in "
                "float32, float16, bfloat16 or float64; quantize the soup afterwards"
            )
    raise OptionProblem(
        f"expected one of float32, float16, bfloat16, float64 (a floating point dtype), got {describe(value)}"
    )


def check_autocast(value: Any, meta: Mapping) -> str:
    """`"bf16"`, `torch.float16`, ... -> `"bfloat16"` / `"float16"`: the dtypes `torch.autocast` computes in."""
    name = None
    with contextlib.suppress(OptionProblem):
        name = check_dtype(value, meta)
    if name in ("bfloat16", "float16"):
        return name
    raise OptionProblem(
        f"expected bfloat16 or float16 (the dtypes torch.autocast runs in), got {describe(value)}"
    )


def check_size(value: Any, meta: Mapping) -> int | str:
    """A shard size: bytes (int > 0) or a string such as `"5GB"` / `"500MiB"`."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OptionProblem(f"expected a size such as '5GB' or a number of bytes, got {describe(value)}")
    from .utils import parse_size

    try:
        size = parse_size(value)
    except (ValueError, OverflowError):
        size = None
    if size is None or size <= 0:
        raise OptionProblem(
            f"expected a size such as '5GB' or a positive number of bytes, got {describe(value)}"
        )
    return value.strip() if isinstance(value, str) else value


_REPO_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")


def check_repo_id(value: Any, meta: Mapping) -> str:
    if isinstance(value, str) and _REPO_ID.match(value.strip()):
        return value.strip()
    raise OptionProblem(f"expected a Hub repository id such as 'user/my-soup', got {describe(value)}")


def check_path(value: Any, meta: Mapping) -> str | os.PathLike:
    if isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip()):
        return value
    raise OptionProblem(f"expected a folder path, got {describe(value)}")


def check_token(value: Any, meta: Mapping) -> str | bool:
    if isinstance(value, (str, bool)):
        return value
    raise OptionProblem(f"expected a token string or a bool, got {describe(value)}")


def check_callable(value: Any, meta: Mapping) -> Callable:
    if callable(value):
        return value
    if isinstance(value, str):
        raise OptionProblem(
            f"expected a function, got the string {value!r}; import it yourself (recipe files and the command "
            "line accept 'package.module:function' with trust_remote_code)"
        )
    raise OptionProblem(f"expected a function compute_metrics(EvalPrediction) -> dict, got {describe(value)}")


IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def check_import_string(value: Any, meta: Mapping) -> str:
    if isinstance(value, str) and IMPORT_STRING.match(value.strip()):
        return value.strip()
    raise OptionProblem(f"expected 'package.module:function', got {describe(value)}")


def check_class_names(value: Any, meta: Mapping) -> list[str]:
    """Zero-shot class names: at least two distinct non-empty strings, in label order."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise OptionProblem(f"expected a list of class names in label order, got {describe(value)}")
    names = list(value)
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise OptionProblem(f"expected non-empty strings, got {describe(bad[0])}")
    if len(names) < 2:
        raise OptionProblem(f"expected at least two classes, got {describe(names)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise OptionProblem(f"class names must be distinct; {repeated[0]!r} is given more than once")
    return names


def check_templates(value: Any, meta: Mapping) -> list[str]:
    """Zero-shot prompt templates: a string or a non-empty list of strings, each with exactly one `{}`."""
    templates = [value] if isinstance(value, str) else value
    if not isinstance(templates, (list, tuple)) or not templates:
        raise OptionProblem(
            f"expected a template such as 'a photo of a {{}}.' or a list of them, got {describe(value)}"
        )
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise OptionProblem(
                f"each template needs exactly one '{{}}' where the class name goes (e.g. 'a photo of a {{}}.'), "
                f"got {describe(t)}"
            )
    return list(templates)


def check_any(value: Any, meta: Mapping) -> Any:
    return value


def check_metric(value: Any, meta: Mapping) -> Any:
    """Any metric `merge_models` takes; an lm-eval task (`"lm-eval:task"`, `{lm_eval: task}`) becomes an `LMEvalTask`."""
    from .errors import InvalidArgumentError
    from .lm_eval_task import as_lm_eval_task

    try:
        task = as_lm_eval_task(value)
    except InvalidArgumentError as e:
        raise OptionProblem(str(e).removeprefix("metric: ")) from None
    return value if task is None else task


KINDS: dict[str, Callable[[Any, Mapping], Any]] = {
    "any": check_any,
    "metric": check_metric,
    "str": check_str,
    "bool": check_bool,
    "positive_int": check_positive_int,
    "number": check_number,
    "number_or_numbers": check_number_or_numbers,
    "choice": check_choice,
    "columns": check_str_or_str_list,
    "weights": check_weights,
    "alpha": check_alpha,
    "density": check_density,
    "scaling": check_scaling,
    "seed": check_seed,
    "weights_or_sweep": check_weights_or_sweep,
    "scores": check_scores,
    "dtype": check_dtype,
    "autocast": check_autocast,
    "size": check_size,
    "repo_id": check_repo_id,
    "path": check_path,
    "token": check_token,
    "callable": check_callable,
    "import_string": check_import_string,
    "class_names": check_class_names,
    "templates": check_templates,
}
"""Every value check, by kind. Recipe files add their own path kinds (resolved against the file's folder)."""


def check_value(
    f: dataclasses.Field, value: Any, kinds: Mapping[str, Callable] | None = None, kind=None
) -> Any:
    """Check one option's value (None always passes: it means "not set")."""
    if value is None:
        return None
    meta = f.metadata if f is not None else {}
    kind = kind or meta.get("kind", "any")
    check = (kinds or {}).get(kind) or KINDS[kind]
    return check(value, meta)
