"""Measurement helpers shared by the benchmark scripts.

Every measured command runs as its own process: wall time is taken around the process (start-up and
imports included, as a user pays them) and peak resident memory is the child's own `ru_maxrss`,
read from `os.wait4` on that very child (so one process's peak never leaks into another's figure,
unlike `getrusage(RUSAGE_CHILDREN)`, which keeps the maximum over every child ever waited for).

One trap: Linux counts the image a child had before `exec` (a copy of the parent) in its
`ru_maxrss`, so a child never reports less than its parent's RSS at spawn time. The driver that
measures should therefore stay small (the benchmark driver imports no torch); when a child's
`ru_maxrss` is not above the parent's RSS, the peak is taken from the child's own `VmHWM`, polled
from `/proc/<pid>/status` while it runs. The same poller records the split between anonymous
memory and mapped file pages (`RssAnon` / `RssFile`), which is what tells a read-into-buffer loop
from an mmap one.

This module only needs the standard library: it is imported by the benchmark driver, which must not
pay for torch itself.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MB = 10**6


@dataclass
class Run:
    """One run of one command.

    Args:
        wall_s (`float`): wall-clock seconds from process start to exit.
        peak_rss_bytes (`int`): the process's peak resident set size (`ru_maxrss`).
        peak_anon_bytes (`int`, *optional*): peak `RssAnon` seen by the poller (Linux only), else `None`.
        peak_file_bytes (`int`, *optional*): peak `RssFile` seen by the poller (Linux only), else `None`.
        returncode (`int`): the exit status.
        output (`str`): captured stdout and stderr (tail).
    """

    wall_s: float
    peak_rss_bytes: int
    peak_anon_bytes: int | None = None
    peak_file_bytes: int | None = None
    returncode: int = 0
    output: str = ""


@dataclass
class Measurement:
    """Several runs of the same command, summarised by their medians."""

    label: str
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def peak_rss_bytes(self) -> int:
        return int(statistics.median(r.peak_rss_bytes for r in self.runs))

    @property
    def max_peak_rss_bytes(self) -> int:
        return max(r.peak_rss_bytes for r in self.runs)

    @property
    def peak_anon_bytes(self) -> int | None:
        values = [r.peak_anon_bytes for r in self.runs if r.peak_anon_bytes is not None]
        return int(statistics.median(values)) if values else None

    @property
    def peak_file_bytes(self) -> int | None:
        values = [r.peak_file_bytes for r in self.runs if r.peak_file_bytes is not None]
        return int(statistics.median(values)) if values else None

    @property
    def walls(self) -> list[float]:
        return [r.wall_s for r in self.runs]


class CommandFailed(RuntimeError):
    """A measured command exited with a non-zero status."""


def _read_status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


class _RssPoller(threading.Thread):
    """Polls `/proc/<pid>/status` for `RssAnon` and `RssFile` until stopped (Linux only)."""

    def __init__(self, pid: int, interval_s: float = 0.02):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.peak_anon = 0
        self.peak_file = 0
        self.hwm = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            values = _read_status_kb(self.pid, ("RssAnon", "RssFile", "RssShmem", "VmHWM"))
            self.peak_anon = max(self.peak_anon, values.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, values.get("RssFile", 0) + values.get("RssShmem", 0))
            self.hwm = max(self.hwm, values.get("VmHWM", 0))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_once(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    poll_rss: bool = True,
    check: bool = True,
) -> Run:
    """Run `cmd` as a separate process and measure its wall time and peak RSS.

    Args:
        cmd (`Sequence[str]`): the command line.
        env (`dict[str, str]`, *optional*): the environment (defaults to this process's).
        cwd (`str` or `os.PathLike`, *optional*): the working directory.
        poll_rss (`bool`, *optional*, defaults to `True`): also poll `/proc` for the anon/file split.
        check (`bool`, *optional*, defaults to `True`): raise if the command fails.

    Returns:
        [`Run`]: the measured run.

    Raises:
        `CommandFailed`: when `check` is set and the command exits with a non-zero status.
    """
    own_rss = _read_status_kb(os.getpid(), ("VmRSS",)).get("VmRSS", 0)
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f".bench-out-{os.getpid()}-{time.monotonic_ns()}"
    with open(out_path, "w+b") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        poller = _RssPoller(proc.pid) if poll_rss and sys.platform.startswith("linux") else None
        if poller is not None:
            poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if poller is not None:
            poller.stop()
        out.seek(0)
        output = out.read().decode(errors="replace")[-20000:]
    out_path.unlink(missing_ok=True)
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    if poller is not None and poller.hwm and peak <= own_rss * 1.05:
        peak = poller.hwm  # ru_maxrss only shows the parent's image copied at spawn: use the child's own mark
    run = Run(
        wall_s=wall,
        peak_rss_bytes=peak,
        peak_anon_bytes=poller.peak_anon if poller else None,
        peak_file_bytes=poller.peak_file if poller else None,
        returncode=proc.returncode,
        output=output,
    )
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"command failed with exit status {proc.returncode}: {' '.join(cmd)}\n--- output (tail) ---\n"
            + output[-4000:]
        )
    return run


def drop_path(path: str | os.PathLike) -> None:
    """Delete a file or a directory tree if it exists."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def settle() -> None:
    """Flush dirty pages to disk so a previous run's write-back does not slow the next run down."""
    if hasattr(os, "sync"):
        os.sync()


def measure_round_robin(
    commands: dict[str, Callable[[], Sequence[str]]],
    *,
    runs: int,
    warmup: int = 1,
    before_each: Callable[[str], None] | None = None,
    after_each: Callable[[str, Run], None] | None = None,
    env: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
    keep_going: bool = False,
) -> dict[str, Measurement]:
    """Measure several commands, interleaved so that slow drifts of a shared machine hit all of them alike.

    Each round runs every command once, in order. The first `warmup` rounds are discarded (they warm
    the page cache and Python's bytecode cache).

    Args:
        commands (`dict[str, Callable]`): label -> function returning the command line (called at each run).
        runs (`int`): measured rounds.
        warmup (`int`, *optional*, defaults to `1`): discarded rounds first.
        before_each (`Callable[[str], None]`, *optional*): called with the label before each run (untimed).
        after_each (`Callable[[str, Run], None]`, *optional*): called after each run (untimed): checks, clean-up.
        env (`dict[str, str]`, *optional*): environment for the commands.
        log (`Callable[[str], None]`, *optional*): progress output.
        keep_going (`bool`, *optional*, defaults to `False`): when a command fails, log it, leave it out of
            the remaining rounds (its [`Measurement`] keeps the `error`) and go on with the others.

    Returns:
        `dict[str, Measurement]`: one measurement per label, in the order given.
    """
    results = {label: Measurement(label) for label in commands}
    failed: set[str] = set()
    for round_index in range(warmup + runs):
        tag = "warm-up" if round_index < warmup else f"run {round_index - warmup + 1}/{runs}"
        for label, make_cmd in commands.items():
            if label in failed:
                continue
            if before_each is not None:
                before_each(label)
            try:
                run = run_once(make_cmd(), env=env)
            except CommandFailed as e:
                if not keep_going:
                    raise
                log(f"  [{tag}] {label:<14} FAILED, left out of the remaining rounds:\n{e}")
                failed.add(label)
                results[label].error = str(e).splitlines()[0]
                continue
            if after_each is not None:
                after_each(label, run)
            log(f"  [{tag}] {label:<14} {run.wall_s:7.2f} s  peak RSS {fmt_bytes(run.peak_rss_bytes)}")
            if round_index >= warmup:
                results[label].runs.append(run)
    return results


def fmt_bytes(n: int | None) -> str:
    """Human-readable size in decimal MB / GB (the units of the goals and of transformers' `max_shard_size`)."""
    if n is None:
        return "-"
    if n >= 10**9:
        return f"{n / 10**9:.2f} GB"
    return f"{n / 10**6:.0f} MB"


def parse_size(text: str | int) -> int:
    """Parse `"500MB"`, `"1.5GB"`, `"400M"` (a count) or an int. Decimal units, as transformers' `max_shard_size`."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace("_", "")
    for suffix, factor in (
        ("KB", 10**3),
        ("MB", 10**6),
        ("GB", 10**9),
        ("K", 10**3),
        ("M", 10**6),
        ("B", 10**9),
    ):
        if s.endswith(suffix) and s[: -len(suffix)].replace(".", "", 1).isdigit():
            return int(float(s[: -len(suffix)]) * factor)
    return int(float(s))
