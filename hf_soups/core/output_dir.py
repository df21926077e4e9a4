"""Which folders hf_soups may write, replace or sweep: the ownership rules of every output folder.

Every folder hf_soups writes (a soup streamed by `merge_models(output_dir=...)`, `Soup.save_pretrained`,
`hf-soups merge/cook`) carries a small marker file, `.hf_soups` (JSON: who wrote it, which version, and
the top-level entries it wrote). The rules, applied in one place ([`check_output_dir`]):

- a target that does not exist, or an empty folder, is written;
- a folder that holds our marker, and nothing besides the entries the marker lists, is replaced
  (re-running the same command works);
- anything else (a folder with a model that hf_soups did not write, a `Trainer` output folder, a folder
  with the user's own files, a file) is refused before any work, with [`OutputDirError`]: nothing is
  renamed aside or deleted;
- an `output_dir` that is, contains, or lies inside an ingredient's or the base model's folder is refused
  before any download or tensor read, naming the ingredient (symlinks are resolved first).

A symlinked `output_dir` is written through: the soup replaces the folder the link points to, and the link
itself is left as it was (so it never dangles).

Soups are written into a temporary folder beside the target, `.hfsoups-tmp-<8 hex>` (short, so a target
name of up to 255 bytes still works), renamed into place once complete and synced to disk. A write killed
by SIGKILL (or a power cut) leaves that temporary folder; the next write into the same parent removes it,
but only when it is recognisably ours (its name, and a marker inside naming a process of this host that
no longer runs). SIGTERM is handled like Ctrl-C during a write: the temporary folder is removed, the
previous target stays, then the process exits with status 143 as it would have by default.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import OutputDirError, OutputWriteError, SoupError

logger = logging.getLogger(__name__)

MARKER_NAME = ".hf_soups"
TEMP_PREFIX = ".hfsoups-tmp-"
OLD_PREFIX = ".hfsoups-old-"
_WORK_DIR_RE = re.compile(r"^\.hfsoups-(tmp|old)-([0-9a-f]{8})$")
_SHOWN = 6  # entries named in a refusal


# --------------------------------------------------------------------------------------------- marker


def read_marker(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a folder hf_soups wrote, or `None` (no marker, unreadable, or someone else's file)."""
    path = Path(directory) / MARKER_NAME
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1_000_000:
            return None
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "hf_soups":
        return None
    return data


def write_marker(directory: str | os.PathLike, **fields: Any) -> Path:
    """Write (or rewrite) the marker of a folder hf_soups is writing."""
    from .. import __version__

    data = {"written_by": "hf_soups", "version": __version__, **fields}
    path = Path(directory) / MARKER_NAME
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


# --------------------------------------------------------------------------------------------- checks


def _local_folder(reference: Any) -> tuple[Path, bool] | None:
    """The local folder of an ingredient reference (path, `Ingredient`, resolved ingredient, model), if any.

    Returns the resolved folder and whether the ingredient is read from it (`False` for an in-memory model,
    whose folder is only where it was loaded from: only that exact folder is protected).
    """
    if hasattr(reference, "ingredient") and hasattr(reference, "kind"):  # a resolved ingredient
        reference = reference.path if reference.path is not None else reference.model
    elif hasattr(reference, "reference") and not isinstance(reference, (str, os.PathLike)):  # an Ingredient
        reference = reference.reference
    read_from = True
    if reference is not None and not isinstance(reference, (str, os.PathLike)):
        # an in-memory model: the folder it was loaded from, if it is one
        config = getattr(reference, "config", None)
        reference = getattr(config, "_name_or_path", None) or getattr(reference, "name_or_path", None)
        read_from = False
    if not isinstance(reference, (str, os.PathLike)) or not os.fspath(reference):
        return None
    path = Path(os.fspath(reference)).expanduser()
    try:
        return (path.resolve(), read_from) if path.is_dir() else None
    except OSError:
        return None


def _display_name(reference: Any) -> str:
    name = getattr(reference, "name", None)
    if isinstance(name, str) and name:
        return name
    inner = getattr(reference, "ingredient", None)  # a resolved ingredient
    if inner is not None and getattr(inner, "name", None):
        return str(inner.name)
    return os.fspath(reference) if isinstance(reference, (str, os.PathLike)) else type(reference).__name__


def _protected_folders(ingredients: Iterable[Any], base: Any) -> list[tuple[str, Path, bool]]:
    """(how to name it, resolved folder, read from it) of every local ingredient, the base, adapters' bases."""
    folders: list[tuple[str, Path, bool]] = []
    members = [("ingredient", i) for i in ingredients] + (
        [("the base model", base)] if base is not None else []
    )
    for label, ref in members:
        if ref is None:
            continue
        refs = [(label, ref)]
        adapter_base = getattr(getattr(ref, "adapter", None), "base", None)  # an adapter's own base
        if adapter_base is not None:
            refs.append(("the base model", adapter_base))
        for what, r in refs:
            found = _local_folder(r)
            if found is not None:
                folders.append((f"{what} {_display_name(r)!r}", *found))
    return folders


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _entries(folder: Path) -> list[str]:
    return [e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in os.scandir(folder)]


def check_output_dir(
    output_dir: str | os.PathLike | None,
    ingredients: Iterable[Any] = (),
    *,
    base: Any = None,
    argument: str = "output_dir",
) -> Path | None:
    """Check that hf_soups may write `output_dir`; returns the folder it will write (symlinks resolved).

    The one check behind `merge_models(output_dir=...)`, `Soup.save_pretrained` and the CLI: it touches
    nothing and runs before any download or tensor read.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*):
            The target folder. `None` returns `None` (nothing is written).
        ingredients (`Iterable`, *optional*):
            The ingredients (references, [`Ingredient`]s, resolved ingredients or in-memory models): their
            local folders are protected.
        base (*optional*):
            The base model reference, protected the same way.
        argument (`str`, *optional*, defaults to `"output_dir"`):
            How to name the target in messages (`"save_directory"` for `save_pretrained`).

    Returns:
        `Path`: the resolved target, or `None` when `output_dir` is `None`.

    Raises:
        [`OutputDirError`]: the target is, contains or lies inside an ingredient's folder; or it exists and
            holds anything that hf_soups did not write.

    Example:

    ```python
    >>> from hf_soups.core.output_dir import check_output_dir
    >>> check_output_dir("runs/soup", ["runs/ft-a", "runs/ft-b"])  # doctest: +SKIP
    PosixPath('/home/me/runs/soup')
    ```
    """
    if output_dir is None:
        return None
    given = Path(os.fspath(output_dir)).expanduser()
    target = given.resolve()
    shown = f"{argument}={os.fspath(output_dir)!r}" + (f" (-> {target})" if str(target) != str(given) else "")
    for name, folder, read_from in _protected_folders(ingredients, base):
        if target == folder:
            how = "is the folder of"
        elif not read_from:
            continue  # an in-memory model: writing beside or inside the folder it came from harms nothing
        elif target.is_relative_to(folder):
            how = "lies inside the folder of"
        elif folder.is_relative_to(target):
            how = "contains the folder of"
        else:
            continue
        suggestion = target / "soup" if how.startswith("contains") else folder.parent / f"{folder.name}-soup"
        raise OutputDirError(
            f"{shown} {how} {name} ({folder}). hf_soups never writes where it could replace or mix with an "
            "ingredient's files, so nothing was done. Choose a new or empty folder outside every ingredient's folder, "
            f"e.g. {suggestion}.",
            path=str(target),
        )
    check_replaceable(target, shown=shown)
    return target


def check_replaceable(target: Path, *, shown: str | None = None) -> None:
    """Refuse an existing `target` unless it is empty or holds only what hf_soups wrote there (its marker).

    Raises:
        [`OutputDirError`]: `target` is a file, or a folder with entries hf_soups did not write.
    """
    shown = shown or f"output_dir={str(target)!r}"
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise OutputDirError(
            f"{shown} exists and is not a folder; nothing was done. Choose a new or empty folder.",
            path=str(target),
        )
    entries = _entries(target)
    if not entries:
        return
    marker = read_marker(target)
    how = (
        f"Choose a new or empty folder, or delete {target} yourself if you no longer need what it holds; "
        "nothing was changed."
    )
    if marker is None:
        raise OutputDirError(
            f"{shown} already exists and was not written by hf_soups (it holds {_listing(entries)}). hf_soups "
            f"only replaces folders it wrote itself (they hold a {MARKER_NAME} marker) or empty ones. {how}",
            path=str(target),
        )
    written = {str(n).rstrip("/") for n in marker.get("files") or []} | {MARKER_NAME}
    foreign = [e for e in entries if e.rstrip("/") not in written]
    if foreign:
        raise OutputDirError(
            f"{shown} holds a soup written by hf_soups, plus entries it did not write: {_listing(foreign)}. "
            f"Replacing the soup would delete them. Move them out of {target}, or choose another folder; "
            "nothing was changed.",
            path=str(target),
        )


# --------------------------------------------------------------------------------------------- sweeping


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def owner_fields() -> dict[str, Any]:
    """Who is writing: recorded in a temporary folder's marker so that a later run can tell if it died."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def sweep_stale_work_dirs(parent: Path) -> list[Path]:
    """Remove the temporary folders that killed hf_soups writes left in `parent`; returns what was removed.

    Only folders named `.hfsoups-tmp-<8 hex>` / `.hfsoups-old-<8 hex>` that hold our marker are touched,
    and a temporary folder only when the process that created it (recorded in its marker) ran on this host
    and no longer runs. When a write was killed between moving the previous soup aside and moving the new
    one into place, the previous soup is moved back first.
    """
    removed: list[Path] = []
    try:
        candidates = sorted(
            (m.group(1), m.group(2), Path(e.path))
            for e in os.scandir(parent)
            if (m := _WORK_DIR_RE.match(e.name)) and e.is_dir(follow_symlinks=False)
        )
    except OSError:
        return removed
    host = socket.gethostname()
    for kind, token, path in sorted(candidates, key=lambda c: c[0] != "tmp"):  # temporary folders first
        marker = read_marker(path)
        if marker is None:
            continue  # not ours
        if kind == "tmp":
            if marker.get("id") != token or marker.get("host") != host or _pid_alive(marker.get("pid")):
                continue
            old = parent / f"{OLD_PREFIX}{token}"
            target_name = marker.get("target")
            if (
                isinstance(target_name, str)
                and "/" not in target_name
                and target_name not in ("", ".", "..")
                and old.is_dir()
                and read_marker(old) is not None
                and not os.path.lexists(parent / target_name)
            ):
                os.replace(old, parent / target_name)
                logger.warning(
                    "Restored %s: an earlier hf_soups write was killed while replacing it.",
                    parent / target_name,
                )
        elif os.path.lexists(parent / f"{TEMP_PREFIX}{token}"):
            continue  # its writer is between its two renames, or was killed there: handled with its tmp
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            logger.warning("Removed %s, left by an earlier hf_soups write that was killed.", path)
    return removed


# --------------------------------------------------------------------------------------------- durability


def fsync_tree(directory: Path) -> None:
    """Flush every file and folder under `directory` to disk (before it is renamed into place)."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def as_write_error(error: BaseException, target: Path, temp: Path | None) -> OutputWriteError | None:
    """An [`OutputWriteError`] naming the path and the fix for an OS error met while writing `target`.

    Returns `None` for errors that are not about writing (reading an ingredient, our own errors).
    """
    if not isinstance(error, OSError) or isinstance(error, SoupError):
        return None
    filename = error.filename
    ours = filename is not None and Path(os.fspath(filename)).absolute().is_relative_to(target.parent)
    if error.errno not in _WRITE_ERRNOS and not (ours and error.errno in (errno.EACCES, errno.EPERM)):
        return None
    where = os.fspath(filename) if filename is not None else str(temp or target)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            free = shutil.disk_usage(target.parent).free
            left = f" ({free / 1e6:.1f} MB free there now)"
        except OSError:
            left = ""
        what = (
            f"the disk is full{left}" if error.errno != errno.EFBIG else "the file is too large for the disk"
        )
        fix = "Free some space, or choose an output_dir on another disk, and run again."
    else:
        what = "the location is not writable"
        fix = "Choose an output_dir you can write to, or fix its permissions, and run again."
    previous = "was left as it was" if os.path.lexists(target) else "was not created"
    message = (
        f"Writing the soup to {target} failed while writing {where}: {what} ({error.strerror or error}). "
        f"{fix} The partial soup was removed and {target} {previous}."
    )
    wrapped = OutputWriteError(message, path=where)
    wrapped.errno = error.errno
    return wrapped


# --------------------------------------------------------------------------------------------- signals


class Terminated(BaseException):
    """Raised inside a write when SIGTERM arrives; turned into the default outcome once cleaned up."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


class TerminationGuard:
    """Handle SIGTERM like Ctrl-C while a folder is being written.

    Installed only in the main thread, only while writing; the previous handler is restored afterwards. A
    second signal during clean-up (or while the finished folder is being renamed into place) is deferred
    until that step is over, so a clean-up is never left half done.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self.defer = False
        self.pending: int | None = None
        self._raised = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            previous = signal.getsignal(signal.SIGTERM)
            if previous == signal.SIG_IGN:
                return  # the process chose to ignore SIGTERM: keep it so
            signal.signal(signal.SIGTERM, self._handle)
        except (ValueError, OSError):  # not the main interpreter / unsupported platform
            return
        self._previous = previous
        self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.defer or self._raised:
            self.pending = signum
            return
        self._raised = True
        raise Terminated(signum)

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def deliver(self, signum: int) -> None:
        """After clean-up: do what the previous handler would have done with the signal."""
        self.uninstall()
        previous = self._previous
        if callable(previous):
            previous(signum, None)
            raise KeyboardInterrupt(f"the write was interrupted by signal {signum}")
        raise SystemExit(128 + signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM unwinds like Ctrl-C (so `with` blocks clean their temporary folders up), then
    ends the process as SIGTERM would have (exit status 143), or calls the handler that was there before.

    For work that is not a folder write (those have [`TerminationGuard`] already), e.g. a push from a
    temporary folder.
    """
    guard = TerminationGuard()
    guard.install()
    try:
        yield
    except Terminated as stop:
        guard.deliver(stop.signum)
    finally:
        guard.uninstall()
