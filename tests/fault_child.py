"""The process that tests/test_faults.py kills: the `hf-soups` command line, paused at a chosen point.

Usage: `python -m tests.fault_child PAUSE READY_FILE -- <hf-soups arguments>`.

`PAUSE` says where the command stops and waits to be killed:

- `tensor:K`: after the K-th tensor has been appended to the soup's shard files (the temporary folder then
  holds K tensors' bytes);
- `rename:K`: just before the K-th `os.replace` / `os.rename` of the output folder or of its hidden
  siblings (the commit of the finished soup: 1 = the first rename, 2 = the second one, if there is one);
- `none`: run to the end.

When the point is reached, `READY_FILE` is created and the process sleeps (a signal then interrupts it
exactly there). The library's code is not changed: the writer's methods and `os.replace` are wrapped by
pass-through functions that only wait; everything else, signal handling included, is hf_soups' own.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _pause(ready: Path) -> None:
    """Tell the test where we are, then wait for its signal (or, where hf_soups defers the signal until a step
    is over, for the `<ready>.resume` file the test writes after signalling)."""
    ready.write_text(str(os.getpid()))
    resume = ready.with_name(ready.name + ".resume")
    deadline = time.monotonic() + 120
    while not resume.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _install(pause: str, ready: Path, output_dir: Path | None) -> None:
    kind, _, count = pause.partition(":")
    if kind == "none":
        return
    target = int(count)
    calls = {"n": 0}
    if kind == "tensor":
        import threading

        from hf_soups.core.sources import ShardedSafetensorsWriter

        lock = threading.Lock()
        original_write, original_slice = ShardedSafetensorsWriter.write, ShardedSafetensorsWriter.write_slice

        def after_tensor(writer: ShardedSafetensorsWriter) -> None:
            calls["n"] += 1
            if calls["n"] == target:  # the writer's files are unbuffered: the bytes so far are in the folder
                _pause(ready)

        def write(self, name, tensor):
            original_write(self, name, tensor)
            after_tensor(self)

        def write_slice(self, name, start, piece):
            with lock:  # slices come from several threads: pause once, after the tensor is complete
                before = self._next
                original_slice(self, name, start, piece)
                if self._next != before:
                    after_tensor(self)

        ShardedSafetensorsWriter.write = write
        ShardedSafetensorsWriter.write_slice = write_slice
    elif kind == "rename":
        assert output_dir is not None, "rename:K needs --output-dir"
        parent, stem = output_dir.parent, output_dir.name

        def concerns_output(*paths) -> bool:
            for p in paths:
                p = Path(os.fsdecode(p)).absolute()
                if p == output_dir or (p.parent == parent and p.name.startswith(f".{stem}")):
                    return True
            return False

        for attr in ("replace", "rename"):
            original = getattr(os, attr)

            def wrapped(src, dst, *args, _original=original, **kwargs):
                if concerns_output(src, dst):
                    calls["n"] += 1
                    if calls["n"] == target:
                        _pause(ready)
                return _original(src, dst, *args, **kwargs)

            setattr(os, attr, wrapped)
    else:
        raise SystemExit(f"unknown pause point {pause!r}")


def main() -> int:
    pause, ready = sys.argv[1], Path(sys.argv[2])
    assert sys.argv[3] == "--"
    argv = sys.argv[4:]
    output_dir = None
    if "--output-dir" in argv:
        output_dir = Path(argv[argv.index("--output-dir") + 1]).absolute()
    _install(pause, ready, output_dir)
    from hf_soups.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
