"""hf_soups: model soups for the Hugging Face ecosystem.

Average the weights of several fine-tuned models into one model (uniform, greedy and WiSE-FT
soups), streaming one tensor at a time. Importing this package is cheap: torch, transformers and
peft are imported only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# public name -> submodule that defines it
_SUBMOD_ATTRS: dict[str, str] = {
    "merge_models": "api",
    "Soup": "soup",
    "Ingredient": "ingredients",
    "SoupTrainerCallback": "integrations.callback",
    "SoupError": "errors",
    "InvalidArgumentError": "errors",
    "IngredientNotFoundError": "errors",
    "IncompatibleIngredientsError": "errors",
    "CorruptCheckpointError": "errors",
    "NonFiniteTensorError": "errors",
    "EvaluationError": "errors",
    "UnsupportedAdapterError": "errors",
    "HubError": "errors",
    "OutputDirError": "errors",
    "OutputWriteError": "errors",
    "UntrustedCodeError": "errors",
    "LMEvalTask": "lm_eval_task",
}

__all__ = sorted(_SUBMOD_ATTRS)


def __getattr__(name: str) -> Any:
    if name in _SUBMOD_ATTRS:
        module = importlib.import_module(f"{__name__}.{_SUBMOD_ATTRS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if os.environ.get("EAGER_IMPORT", ""):
    for _name in __all__:
        __getattr__(_name)

if TYPE_CHECKING:  # pragma: no cover (mirrors _SUBMOD_ATTRS for type checkers)
    from .api import merge_models  # noqa: F401
    from .errors import (  # noqa: F401
        CorruptCheckpointError,
        EvaluationError,
        HubError,
        IncompatibleIngredientsError,
        IngredientNotFoundError,
        InvalidArgumentError,
        NonFiniteTensorError,
        OutputDirError,
        OutputWriteError,
        SoupError,
        UnsupportedAdapterError,
        UntrustedCodeError,
    )
    from .ingredients import Ingredient  # noqa: F401
    from .integrations.callback import SoupTrainerCallback  # noqa: F401
    from .lm_eval_task import LMEvalTask  # noqa: F401
    from .soup import Soup  # noqa: F401
