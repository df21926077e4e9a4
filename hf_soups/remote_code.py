"""Code named by an argument runs only when the user trusts it (`trust_remote_code`, as in `transformers`).

Recipe files travel with soups to the Hub, and their keys are data: a metric folder, a Hub metric script or a
`package.module:function` import string would execute Python chosen by whoever wrote the recipe. hf_soups runs
such code only with `trust_remote_code=True` (CLI: `--trust-remote-code`), the opt-in `transformers` uses for
model code from a repository. Without it, [`refuse_untrusted`] raises [`UntrustedCodeError`] naming the argument,
its value and the opt-in, before anything is imported or downloaded.

What needs no opt-in: the metrics bundled with hf_soups (`hf_soups.evaluation.metrics.BUNDLED_METRICS`), `"loss"` and
`"perplexity"`, and objects passed from Python (an `evaluate.EvaluationModule`, a callable): those are the
user's own code.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from .errors import InvalidArgumentError, UntrustedCodeError

#: How to opt in, for messages.
OPT_IN = "trust_remote_code=True (CLI: --trust-remote-code)"

_IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def refuse_untrusted(key: str, value: Any, what: str, *, trust_remote_code: bool, hint: str = "") -> None:
    """Raise unless the user trusts the code that `value` would run.

    Args:
        key (`str`):
            The argument or recipe key (`"metric"`, `"compute_metrics"`).
        value:
            Its value, quoted in the message.
        what (`str`):
            What would run, in words (e.g. `"the Python of the evaluate metric script at /x/y.py"`).
        trust_remote_code (`bool`):
            The user's opt-in; `True` returns at once.
        hint (`str`, *optional*):
            A safe alternative, appended to the message.

    Raises:
        [`UntrustedCodeError`]: `trust_remote_code` is not `True`.
    """
    if trust_remote_code is True:
        return
    raise UntrustedCodeError(
        f"{key}={value!r} would run {what}. hf_soups runs code named by an argument or a recipe file only "
        f"when you opt in: if you trust that code, pass {OPT_IN}.{(' ' + hint) if hint else ''}",
        argument=key,
        value=str(value),
    )


def import_callable(
    spec: str, *, trust_remote_code: bool, key: str = "compute_metrics"
) -> Callable[..., Any]:
    """Import a function named `'package.module:function'` (a recipe's `compute_metrics`), if the user trusts it.

    Importing a module runs its code, so the import happens only with `trust_remote_code=True`.

    Args:
        spec (`str`):
            `'package.module:function'` (the attribute may be dotted: `'pkg.mod:Class.method'`).
        trust_remote_code (`bool`):
            The user's opt-in (Python `trust_remote_code=True`, CLI `--trust-remote-code`).
        key (`str`, *optional*, defaults to `"compute_metrics"`):
            The argument or recipe key that holds `spec`, named in every error.

    Returns:
        The callable.

    Raises:
        [`UntrustedCodeError`]: `trust_remote_code` is not `True` (nothing is imported).
        [`InvalidArgumentError`]: `spec` is not `'package.module:function'`, cannot be imported, or is not callable.

    Example:

    ```python
    >>> from hf_soups.remote_code import import_callable
    >>> import_callable("math:sqrt", trust_remote_code=True)(9.0)
    3.0
    >>> import_callable("math:sqrt", trust_remote_code=False)
    Traceback (most recent call last):
    ...
    hf_soups.errors.UntrustedCodeError: compute_metrics='math:sqrt' would run ...
    ```
    """
    if not isinstance(spec, str) or not _IMPORT_SPEC.match(spec.strip()):
        raise InvalidArgumentError(f"{key}={spec!r}: expected 'package.module:function'.")
    spec = spec.strip()
    refuse_untrusted(
        key,
        spec,
        f"the code of module {spec.partition(':')[0]!r} (importing a module executes it)",
        trust_remote_code=trust_remote_code,
        hint="From Python, you can pass the function itself instead.",
    )
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgumentError(f"{key}={spec!r} cannot be imported: {exc}") from exc
    if not callable(obj):
        raise InvalidArgumentError(f"{key}={spec!r} is a {type(obj).__name__}, not a function.")
    return obj


__all__ = ["OPT_IN", "import_callable", "refuse_untrusted"]
