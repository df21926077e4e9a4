"""Errors raised by hf_soups.

Every error is a [`SoupError`]. Errors also subclass the closest builtin (`ValueError`,
`FileNotFoundError`, `NotImplementedError`) so that generic handlers keep working, and carry the
names of the ingredient and the tensor concerned so that tools can act on them.
"""

from __future__ import annotations


class SoupError(Exception):
    """Base class of every hf_soups error.

    Args:
        message (`str`):
            What went wrong and what to do about it.
        ingredient (`str`, *optional*):
            Display name of the ingredient concerned.
        tensor_name (`str`, *optional*):
            Name of the tensor concerned.
    """

    def __init__(self, message: str, *, ingredient: str | None = None, tensor_name: str | None = None):
        super().__init__(message)
        self.ingredient = ingredient
        self.tensor_name = tensor_name


class InvalidArgumentError(SoupError, ValueError):
    """An argument of `merge_models` (or a recipe file) is invalid: weights, alpha, method, options."""


class UntrustedCodeError(InvalidArgumentError):
    """Running what an argument names would execute code the user has not trusted (a metric script, an import).

    Raised unless `trust_remote_code=True` (CLI: `--trust-remote-code`) is passed, as in `transformers`.

    Args:
        argument (`str`, *optional*):
            The argument or recipe key concerned (`metric`, `compute_metrics`).
        value (`str`, *optional*):
            Its value.
    """

    def __init__(self, message: str, *, argument: str | None = None, value: str | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.argument = argument
        self.value = value


class IngredientNotFoundError(SoupError, FileNotFoundError):
    """An ingredient cannot be found: missing local folder, Hub repository, revision or weight file."""


class IncompatibleIngredientsError(SoupError, ValueError):
    """Ingredients cannot be souped together: architecture, shapes, tensor names, labels or vocabulary differ."""


class CorruptCheckpointError(SoupError, ValueError):
    """A weight file is truncated or malformed.

    Args:
        path (`str`, *optional*):
            The file concerned.
    """

    def __init__(self, message: str, *, path: str | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.path = path


class NonFiniteTensorError(SoupError, ValueError):
    """An ingredient tensor contains NaN or infinite values."""


class EvaluationError(SoupError, ValueError):
    """Held-out evaluation cannot run: no eval set, no labels, unknown metric or metric key."""


class UnsupportedAdapterError(SoupError, NotImplementedError):
    """An adapter type or option whose math hf_soups does not implement (DoRA, other PEFT tuners, ...)."""


class HubError(SoupError, RuntimeError):
    """Pushing to or pulling from the Hub failed (authentication, missing repository, network)."""


class OutputDirError(InvalidArgumentError):
    """An `output_dir` (or `save_directory`) that hf_soups must not write: it is, holds or lies inside an
    ingredient, or it exists and holds something hf_soups did not write. Nothing was changed.

    Args:
        path (`str`, *optional*):
            The folder concerned.
    """

    def __init__(self, message: str, *, path: str | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.path = path


class OutputWriteError(SoupError, OSError):
    """Writing the soup failed (disk full, read-only location). The partial soup was removed and the
    previous folder left as it was.

    Args:
        path (`str`, *optional*):
            The file or folder being written.
    """

    def __init__(self, message: str, *, path: str | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.path = path
