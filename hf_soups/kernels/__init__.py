"""Fused per-slice kernels for the two-pass merge methods, compiled by numba when it is installed.

`pip install hf_soups[fast]` installs numba. Each kernel does in one pass over a slice what the torch path of
[`merge_ops`] does with 6-10 element-wise kernels per ingredient (task vector, trim or drop mask, sign, sums and
counts, select): the same float32 operations in the same order, with no fused multiply-add (numba's default, no
`fastmath`), so the result is the same bits as the torch path (tested). The kernels release the GIL, so the
engine's slice workers run them side by side; each runs on one thread.

Without numba, or with the environment variable `HF_SOUPS_DISABLE_NUMBA=1`, [`available`] is False and the
callers use their torch code. This module imports only numpy and numba (lazily, on the first [`available`]).
"""

from __future__ import annotations

import os
from typing import Any

DISABLE_ENV = "HF_SOUPS_DISABLE_NUMBA"

_kernels: dict[str, Any] | None = None
_import_failed = False


def available() -> bool:
    """Whether the fused kernels can be used: numba importable and `HF_SOUPS_DISABLE_NUMBA` not set."""
    global _import_failed
    if os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    if _kernels is not None:
        return True
    if _import_failed:
        return False
    try:
        _compile()
    except ImportError:
        _import_failed = True
        return False
    return True


def get(name: str):
    """The compiled kernel `name` (call [`available`] first)."""
    assert _kernels is not None
    return _kernels[name]


def _compile() -> None:
    """Import the kernels (numba compiles each on its first call, or loads it from its on-disk cache)."""
    global _kernels
    from . import compiled

    _kernels = {name: getattr(compiled, name) for name in compiled.KERNELS}
