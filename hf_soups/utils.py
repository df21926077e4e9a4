"""Small helpers every layer may use: sizes, element counts and the distributed rank.

Only the standard library is imported at import time; `accelerate` (and so torch) is imported when a
distributed question is asked in a process that has set up a distributed run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .errors import InvalidArgumentError

_SIZE_UNITS = {
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}


def parse_size(size: int | str) -> int:
    """`"5GB"` -> 5_000_000_000, `"500MiB"` -> 524_288_000; integers are bytes.

    (`huggingface_hub`'s `parse_size_to_int` knows only decimal units and refuses a bare byte count, both of
    which `max_shard_size` accepts, as in transformers.)

    Raises:
        [`InvalidArgumentError`]: not a size.
    """
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, factor in _SIZE_UNITS.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    else:
        if s.endswith("B"):
            s = s[:-1]
        try:
            return int(s)
        except ValueError:
            pass
    raise InvalidArgumentError(f"max_shard_size={size!r} is not a size such as '5GB' or 500000000.")


def numel(shape: Iterable[int]) -> int:
    """Number of elements of a tensor of this shape (1 for a scalar)."""
    return math.prod(int(d) for d in shape)


def _distributed_state():
    """accelerate's `PartialState` when this process is part of a distributed run, else None.

    A single process (no `WORLD_SIZE` > 1 and no accelerate state set up) never imports accelerate.
    """
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "accelerate" not in sys.modules:
        return None
    from accelerate.state import PartialState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and PartialState._shared_state == {}:
        return None
    return PartialState()


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed run (torchrun / accelerate launch)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    state = _distributed_state()
    return True if state is None else bool(state.is_main_process)


def wait_for_everyone() -> None:
    """Barrier across the processes of a distributed run (no-op in a single process)."""
    state = _distributed_state()
    if state is not None:
        state.wait_for_everyone()


def human_bytes(n: float | None) -> str:
    """`1536` -> `'1.5 KB'` (decimal units, as the Hub shows sizes)."""
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def free_disk(path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent); None when unknown."""
    import shutil
    from pathlib import Path

    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector within the block (reference counting still frees everything).

    Planning a soup, its streaming loops and writing it allocate many small objects (headers, futures, tensor
    views) and create no cycles; with torch and transformers loaded, the collections they trigger walk millions of
    objects: about a tenth of a soup's CPU time on 2 cores, for nothing (one full collection during planning was
    89 ms of a 1.1 s merge). Collection resumes as before at the end of the block.
    """
    import gc

    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's ops on one thread within the block (the previous setting is restored).

    For short ops on data already in the CPU cache (slices, small tensors, small matrix products): splitting
    each across threads costs more in synchronisation than it saves, and on a busy machine it is many times
    slower (threads spin waiting for each other).
    """
    import torch

    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
