"""Fault injection: what a soup write survives, and that nothing the user had before is lost.

Every case states its outcome and checks that what existed before (a previous soup written by hf_soups,
the ingredients, the user's own files) is byte for byte as it was. Groups (docs/reliability.md lists them
with their figures):

1. a process killed (SIGTERM, SIGKILL, SIGINT) at several points of a multi-shard write into an existing
   soup folder: tests/fault_child.py pauses the real `hf-soups merge` at a chosen point and the test kills it;
2. the operating system failing under us: disk full (a tiny tmpfs), read-only target (a read-only mount:
   root ignores file permissions), an I/O error on the final rename;
3. every corrupt-file shape of an ingredient;
4. hostile recipe files and ingredients-folder manifests: code, YAML tags, paths escaping their folder,
   huge and binary files.

Hub failures (download and push) are in tests/test_faults_hub.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from hf_soups.errors import (
    CorruptCheckpointError,
    IngredientNotFoundError,
    InvalidArgumentError,
    SoupError,
)

ROOT = Path(__file__).resolve().parents[1]
SHARD = "20KB"  # the tiny BERT (41 tensors, 80 KB) is written in 5 shards
N_TENSORS = 41


# ---------------------------------------------------------------------------------------------- helpers


def digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (what "nothing changed" is checked against)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    """Tensor name -> raw bytes of a saved soup, read with the safetensors library (not ours)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k).numpy().tobytes()
    return out


def hf_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def cli(*args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hf_soups.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env or hf_env(),
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """Three tiny BERT fine-tunes, shared by the module (tests never write into them: checked)."""
    from tests.tiny_models import make_tiny_bert_dir

    root = tmp_path_factory.mktemp("ingredients")
    return [make_tiny_bert_dir(root / f"ft-{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def expected_new(models, tmp_path_factory) -> dict[str, bytes]:
    """The tensors of the soup of all three models, written once in a folder of its own."""
    from hf_soups import merge_models

    out = tmp_path_factory.mktemp("reference") / "soup"
    merge_models(models, output_dir=out, max_shard_size=SHARD, progress=False)
    return tensor_bytes(out)


@pytest.fixture
def previous(models, tmp_path) -> Path:
    """An earlier soup written by hf_soups (two models) in `tmp_path/work/soup`: the folder a new run replaces."""
    from hf_soups import merge_models

    out = tmp_path / "work" / "soup"
    merge_models(models[:2], output_dir=out, max_shard_size=SHARD, progress=False)
    return out


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    """Entries of `parent` other than `keep` (temporary or renamed-aside folders a run left behind)."""
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def assert_ingredients_untouched(models: list[Path], before: dict[str, dict[str, str]]) -> None:
    for m in models:
        assert digest(m) == before[str(m)], f"ingredient {m} changed"


# ---------------------------------------------------------------------------- 1. killed while writing

KILL_POINTS = ["tensor:1", f"tensor:{N_TENSORS // 2}", f"tensor:{N_TENSORS}", "rename:1", "rename:2"]
SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL}
# a representative few run by default; the whole matrix with -m slow
FAST_KILLS = {("TERM", f"tensor:{N_TENSORS // 2}"), ("KILL", f"tensor:{N_TENSORS // 2}"), ("INT", "rename:2")}
KILL_CASES = [
    pytest.param(
        sig, point, id=f"{sig}-{point}", marks=() if (sig, point) in FAST_KILLS else pytest.mark.slow
    )
    for sig in SIGNALS
    for point in KILL_POINTS
]


def start_paused(pause: str, ready: Path, argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fault_child", pause, str(ready), "--", *map(str, argv)],
        cwd=ROOT,
        env=env or hf_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen, ready: Path, timeout: float = 180) -> bool:
    """True when the child reached its pause point; False when it ended first (the point does not exist)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            time.sleep(0.05)  # it is now sleeping in the pause
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"the child never reached its pause point in {timeout} s: {proc.communicate()}")


@pytest.mark.parametrize("sig,point", KILL_CASES)
def test_killed_write_keeps_the_previous_soup(models, expected_new, previous, tmp_path, sig, point):
    """Kill `hf-soups merge` into an existing soup folder: the folder holds the previous soup, or the new one.

    SIGTERM and SIGINT are handled (the run stops, removes its temporary folder and leaves the previous soup
    in place; exit status non-zero). SIGKILL cannot be handled: its temporary folder stays until the next run
    in the same parent sweeps it, and that run then succeeds.
    """
    from hf_soups import merge_models

    parent = previous.parent
    before_ingredients = {str(m): digest(m) for m in models}
    before = digest(previous)
    ready = tmp_path / "ready"
    argv = ["merge", *models, "--output-dir", previous, "--max-shard-size", SHARD, "--quiet"]
    proc = start_paused(point, ready, argv)
    reached = wait_ready(proc, ready)
    if reached:
        if point.startswith("tensor:"):  # the partial soup is really on disk, in a temporary folder beside
            partial = [p for p in parent.iterdir() if p.name != "soup"]
            assert partial and any(f.stat().st_size for p in partial for f in p.rglob("*") if f.is_file())
        proc.send_signal(SIGNALS[sig])
        time.sleep(0.5)
        (tmp_path / "ready.resume").write_text("")  # a signal hf_soups defers lets the paused step go on
    out, err = proc.communicate(timeout=120)
    assert_ingredients_untouched(models, before_ingredients)
    assert reached, f"the write never reached its pause point {point}: {out} {err}"
    assert proc.returncode != 0, f"the killed run reported success: {out} {err}"
    if sig in ("TERM", "INT"):
        # handled like Ctrl-C: no temporary folder left, and the folder holds the previous soup unchanged, or
        # (SIGTERM during the two renames of the commit is deferred until they are done) the whole new one
        assert leftovers(parent, {"soup"}) == [], f"{sig} left temporary folders behind"
        if sig == "TERM" and point.startswith("rename:"):
            assert digest(previous) == before or tensor_bytes(previous) == expected_new
            assert proc.returncode == 128 + signal.SIGTERM, err
        else:
            assert digest(previous) == before
        return
    # SIGKILL: the previous soup is not lost (at worst renamed aside, between the two renames of the commit)
    if point != "rename:2":
        assert digest(previous) == before
    else:
        copies = [p for p in parent.iterdir() if p.is_dir() and digest(p) == before]
        assert copies or digest(previous) == before, (
            "the previous soup is gone after SIGKILL during the commit"
        )
    # the next run in the same parent sweeps what the killed one left and succeeds
    merge_models(models, output_dir=previous, max_shard_size=SHARD, progress=False)
    assert tensor_bytes(previous) == expected_new
    assert leftovers(parent, {"soup"}) == [], "stale temporary folders of the killed run were not swept"


@pytest.mark.slow
def test_sweep_never_deletes_the_only_copy_of_a_previous_soup(models, previous, tmp_path):
    """SIGKILL between the two renames of the commit, then an unrelated run in the same parent.

    Whatever the sweep of stale folders does, the previous soup (the only copy of the user's earlier result)
    must still exist afterwards, at its place or restored there.
    """
    from hf_soups import merge_models

    parent = previous.parent
    before = digest(previous)
    ready = tmp_path / "ready"
    argv = ["merge", *models, "--output-dir", previous, "--max-shard-size", SHARD, "--quiet"]
    proc = start_paused("rename:2", ready, argv)
    # replacing a folder is two renames (old aside, new into place): the window between them must exist
    assert wait_ready(proc, ready), f"the write never reached its second rename: {proc.communicate()}"
    proc.kill()
    proc.communicate(timeout=60)
    merge_models(models[:2], output_dir=parent / "other", progress=False)
    survivors = [p for p in parent.iterdir() if p.is_dir() and digest(p) == before]
    assert survivors, "the sweep deleted the previous soup renamed aside by the killed run"


# ------------------------------------------------------------------------------ 2. the OS fails under us


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs at `tmp_path/mnt` with the given options; unmounted afterwards."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
        )
        if done.returncode:
            pytest.skip(
                f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.decode().strip()}"
            )
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_disk_full_names_the_path_and_keeps_the_previous_soup(models, tmpfs):
    """ENOSPC in the middle of the write: a clear error naming the folder; the previous soup and free space kept."""
    from hf_soups import merge_models

    disk = tmpfs("size=160k")  # room for one soup (80 KB of weights + config), not two
    out = disk / "soup"
    merge_models(models[:2], output_dir=out, max_shard_size=SHARD, progress=False)
    before = digest(out)
    free_before = shutil.disk_usage(disk).free
    with pytest.raises((OSError, SoupError)) as info:
        merge_models(models, output_dir=out, max_shard_size=SHARD, progress=False)
    message = str(info.value)
    assert str(disk) in message, f"the disk-full error does not name the path: {message}"
    assert digest(out) == before
    assert leftovers(disk, {"soup"}) == []
    assert shutil.disk_usage(disk).free == free_before  # the partial soup was removed


def test_disk_full_for_a_new_folder_creates_nothing(models, tmpfs):
    from hf_soups import merge_models

    disk = tmpfs("size=40k")
    (disk / "mine.txt").write_text("the user's file")
    with pytest.raises((OSError, SoupError)) as info:
        merge_models(models, output_dir=disk / "soup", max_shard_size=SHARD, progress=False)
    assert str(disk) in str(info.value)
    assert leftovers(disk, {"mine.txt"}) == []
    assert (disk / "mine.txt").read_text() == "the user's file"


def test_disk_full_while_two_workers_write_slices_is_clean(models, tmpfs, monkeypatch):
    """ENOSPC in a slice worker's positional write (the streamed path, two workers): the same clear error, the
    other worker stopped, nothing left on the disk."""
    import torch

    from hf_soups import merge_models
    from hf_soups.core import engine

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1024)  # the tiny BERT's matrices are streamed in slices
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # two slice workers
    try:
        disk = tmpfs("size=40k")
        with pytest.raises((OSError, SoupError)) as info:
            merge_models(models, output_dir=disk / "soup", progress=False)  # one 80 KB shard: it cannot fit
    finally:
        torch.set_num_threads(previous)
    assert str(disk) in str(info.value)
    assert leftovers(disk, set()) == []
    assert shutil.disk_usage(disk).used == 0


def test_read_only_target_is_an_error_and_keeps_the_previous_soup(models, tmpfs):
    """A read-only file system (root ignores chmod, so a read-only mount is the honest test)."""
    from hf_soups import merge_models

    disk = tmpfs("size=1m")
    out = disk / "soup"
    merge_models(models[:2], output_dir=out, max_shard_size=SHARD, progress=False)
    before = digest(out)
    done = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot remount read-only: {done.stderr.decode().strip()}")
    with pytest.raises((OSError, SoupError)) as info:
        merge_models(models, output_dir=out, max_shard_size=SHARD, progress=False)
    assert str(disk) in str(info.value) or "Read-only" in str(info.value)
    assert digest(out) == before
    assert leftovers(disk, {"soup"}) == []


def test_read_only_target_through_the_cli_exits_1(models, tmpfs):
    disk = tmpfs("ro,size=64k")
    done = cli("merge", *models, "--output-dir", disk / "soup", "--quiet")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Read-only" in done.stderr
    assert list(disk.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the chmod case is only meaningful without root")
def test_chmod_read_only_parent_as_root_is_not_a_protection(models, tmp_path):
    """Documented, not a defect: root ignores permission bits, so chmod 555 does not stop a root write."""
    from hf_soups import merge_models

    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        merge_models(models[:2], output_dir=parent / "soup", progress=False)
        assert (parent / "soup" / "config.json").is_file()
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("which", ["aside", "into-place"])
def test_io_error_on_the_commit_rename_keeps_the_previous_soup(models, previous, monkeypatch, which):
    """EIO from the OS on one of the renames of the commit (the OS call fails; our code runs unchanged)."""
    from hf_soups import merge_models

    parent = previous.parent
    before = digest(previous)
    calls = []

    def failing(original):
        def rename(src, dst, *args, **kwargs):
            src_p, dst_p = Path(os.fsdecode(src)).absolute(), Path(os.fsdecode(dst)).absolute()
            concerned = previous in (src_p, dst_p)
            if concerned:
                calls.append((src_p, dst_p))
                fail = (which == "aside" and src_p == previous) or (
                    which == "into-place" and dst_p == previous
                )
                if fail and len([c for c in calls if previous in c]) <= 2:
                    raise OSError(errno.EIO, "Input/output error (injected)", os.fsdecode(src))
            return original(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "replace", failing(os.replace))
    monkeypatch.setattr(os, "rename", failing(os.rename))
    with pytest.raises((OSError, SoupError), match="Input/output error"):
        merge_models(models, output_dir=previous, max_shard_size=SHARD, progress=False)
    monkeypatch.undo()
    assert calls, "the commit never renamed anything through os.replace/os.rename (test needs updating)"
    assert digest(previous) == before
    assert leftovers(parent, {"soup"}) == []


# ------------------------------------------------------------------------------ 3. corrupt ingredients


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def two_same_size(header: dict) -> tuple[str, str]:
    names = [k for k in header if k != "__metadata__"]
    by_size: dict[int, list[str]] = {}
    for k in names:
        begin, end = header[k]["data_offsets"]
        by_size.setdefault(end - begin, []).append(k)
    return next(v[:2] for v in by_size.values() if len(v) >= 2)


def corrupt_truncated(folder: Path) -> str:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return "model.safetensors"


def corrupt_header_length_beyond_file(folder: Path) -> str:
    f = folder / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    return "model.safetensors"


def corrupt_header_not_json(folder: Path) -> str:
    f = folder / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:40] = b"\xff\xfe not json at all {{{{{{{{{{{{"[:32]
    f.write_bytes(bytes(raw))
    return "model.safetensors"


def corrupt_header_is_a_list(folder: Path) -> str:
    f = folder / "model.safetensors"
    _, data = read_header(f)
    raw = b"[1, 2, 3]"
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return "model.safetensors"


def corrupt_offsets_overlap(folder: Path) -> str:
    f = folder / "model.safetensors"
    header, data = read_header(f)
    a, b = two_same_size(header)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b now reads a's bytes
    write_header(f, header, data)
    return "model.safetensors"


def corrupt_offsets_out_of_range(folder: Path) -> str:
    f = folder / "model.safetensors"
    header, data = read_header(f)
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(data) + 64, len(data) + 64 + (end - begin)]
    write_header(f, header, data)
    return "model.safetensors"


def corrupt_offsets_reversed(folder: Path) -> str:
    f = folder / "model.safetensors"
    header, data = read_header(f)
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [end, begin]
    write_header(f, header, data)
    return "model.safetensors"


def corrupt_dtype_unknown(folder: Path) -> str:
    f = folder / "model.safetensors"
    header, data = read_header(f)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "Q7"
    write_header(f, header, data)
    return "model.safetensors"


def corrupt_shape_offset_mismatch(folder: Path) -> str:
    f = folder / "model.safetensors"
    header, data = read_header(f)
    name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 1)
    header[name]["shape"] = [header[name]["shape"][0] + 1]
    write_header(f, header, data)
    return "model.safetensors"


def corrupt_empty_file(folder: Path) -> str:
    (folder / "model.safetensors").write_bytes(b"")
    return "model.safetensors"


def corrupt_config_is_a_list(folder: Path) -> str:
    (folder / "config.json").write_text("[1, 2, 3]")
    return "config.json"


def corrupt_config_invalid_json(folder: Path) -> str:
    (folder / "config.json").write_text('{"model_type": "bert",')
    return "config.json"


def corrupt_config_empty(folder: Path) -> str:
    (folder / "config.json").write_text("")
    return "config.json"


def corrupt_missing_shard(folder: Path) -> str:
    from tests.tiny_models import make_tiny_bert

    shutil.rmtree(folder)
    make_tiny_bert(seed=5).save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    return shard


def corrupt_index_not_json(folder: Path) -> str:
    from tests.tiny_models import make_tiny_bert

    shutil.rmtree(folder)
    make_tiny_bert(seed=5).save_pretrained(folder, max_shard_size="20KB")
    (folder / "model.safetensors.index.json").write_text("{ not json")
    return "model.safetensors.index.json"


CORRUPTIONS = {
    "truncated": corrupt_truncated,
    "header-length-beyond-file": corrupt_header_length_beyond_file,
    "header-not-json": corrupt_header_not_json,
    "header-is-a-list": corrupt_header_is_a_list,
    "offsets-overlap": corrupt_offsets_overlap,
    "offsets-out-of-range": corrupt_offsets_out_of_range,
    "offsets-reversed": corrupt_offsets_reversed,
    "dtype-unknown": corrupt_dtype_unknown,
    "shape-offset-mismatch": corrupt_shape_offset_mismatch,
    "empty-file": corrupt_empty_file,
    "config-json-list": corrupt_config_is_a_list,
    "config-invalid-json": corrupt_config_invalid_json,
    "config-empty": corrupt_config_empty,
    "index-missing-shard": corrupt_missing_shard,
    "index-not-json": corrupt_index_not_json,
}


@pytest.mark.parametrize("shape", list(CORRUPTIONS))
def test_corrupt_ingredient_is_refused_by_name(models, previous, tmp_path, shape):
    """Each corrupt shape: a hf_soups error naming the bad file; the previous soup untouched, nothing left over."""
    from hf_soups import merge_models

    bad = tmp_path / "bad"
    shutil.copytree(models[1], bad)
    culprit = CORRUPTIONS[shape](bad)
    before = digest(previous)
    with pytest.raises(SoupError) as info:
        merge_models([models[0], bad], output_dir=previous, max_shard_size=SHARD, progress=False)
    err = info.value
    assert isinstance(err, (CorruptCheckpointError, IngredientNotFoundError, InvalidArgumentError)), repr(err)
    assert culprit in str(err), f"the error does not name {culprit}: {err}"
    assert "internal error" not in str(err)
    assert digest(previous) == before
    assert leftovers(previous.parent, {"soup"}) == []


def test_corrupt_ingredient_through_the_cli_is_one_line_exit_1(models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(models[1], bad)
    corrupt_truncated(bad)
    done = cli("merge", models[0], bad, "--output-dir", tmp_path / "soup", "--quiet")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "model.safetensors" in done.stderr and not (tmp_path / "soup").exists()


class _Payload:
    """Unpickling this object runs code: it creates `self.path` (a sentinel)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_pickled_code_in_a_bin_checkpoint_never_runs(models, previous, tmp_path, container):
    """A `pytorch_model.bin` whose pickle would create a file when unpickled: refused, and the file never appears."""
    import torch

    from hf_soups import merge_models

    sentinel = tmp_path / "PWNED"
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(models[1] / "config.json", bad / "config.json")
    state = {"bert.embeddings.word_embeddings.weight": torch.zeros(99, 32), "payload": _Payload(sentinel)}
    if container == "zip":
        torch.save(state, bad / "pytorch_model.bin")
    else:
        torch.save(state, bad / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    before = digest(previous)
    with pytest.raises(SoupError) as info:
        merge_models([models[0], bad], output_dir=previous, progress=False)
    assert not sentinel.exists(), "code from a pickled checkpoint ran"
    assert "pytorch_model.bin" in str(info.value)
    assert digest(previous) == before
    assert leftovers(previous.parent, {"soup"}) == []


def test_legacy_bin_checkpoint_without_code_is_read(models, tmp_path):
    """Issue 12 (6): a non-zip (pre-1.6) `pytorch_model.bin` that transformers loads is read, not called corrupt."""
    import torch

    from hf_soups import merge_models

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(models[1] / "config.json", legacy / "config.json")
    from safetensors.torch import load_file

    state = load_file(str(models[1] / "model.safetensors"))
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    soup = merge_models([models[1], legacy], output_dir=tmp_path / "soup", progress=False)
    got = load_file(str(soup.output_dir / "model.safetensors"))
    for k, v in state.items():
        assert torch.equal(got[k], v), k


# ------------------------------------------------------------------ 4. hostile recipes and manifests

EVIL_METRIC = """
import pathlib
pathlib.Path({sentinel!r}).write_text("metric code ran")
"""


def make_evil_metric(folder: Path, sentinel: Path) -> Path:
    """A metric module folder that also creates `sentinel` when imported (a copy of the bundled accuracy)."""
    import hf_soups.evaluation.metrics

    folder.mkdir()
    source = (Path(hf_soups.evaluation.metrics.__file__).parent / "accuracy" / "accuracy.py").read_text()
    (folder / f"{folder.name}.py").write_text(EVIL_METRIC.format(sentinel=str(sentinel)) + source)
    return folder


@pytest.fixture(scope="module")
def text_models(tmp_path_factory) -> tuple[list[Path], Path]:
    """Two tiny BERTs with a tokenizer and a held-out csv (what a greedy recipe needs)."""
    from tests.testing_common import make_text_models, write_eval_csv

    root = tmp_path_factory.mktemp("text_models")
    return make_text_models(root, n=2), write_eval_csv(root / "val.csv")


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def greedy_recipe(text_models, extra: str) -> str:
    (a, b), csv_path = text_models
    return (
        f"method: greedy\ningredients:\n  - {a}\n  - {b}\neval:\n  data: {csv_path}\n  text_columns: sentence\n"
        f"  label_column: label\n{extra}"
    )


def test_recipe_local_metric_folder_needs_trust_remote_code(text_models, tmp_path):
    """`metric: ./folder` runs that folder's Python: refused without the opt-in (exit 2, names the key)."""
    sentinel = tmp_path / "METRIC_RAN"
    make_evil_metric(tmp_path / "evil_metric", sentinel)
    recipe = write_recipe(tmp_path / "r.yaml", greedy_recipe(text_models, "metric: ./evil_metric\n"))
    out = tmp_path / "soup"
    done = cli("cook", recipe, "--output-dir", out, "--quiet")
    assert done.returncode == 2, done.stderr
    assert "metric" in done.stderr and "trust-remote-code" in done.stderr.replace("_", "-")
    assert not sentinel.exists(), "the recipe's metric code ran without trust_remote_code"
    assert not out.exists()

    from hf_soups.api import cook_recipe as cook

    with pytest.raises(InvalidArgumentError, match="trust_remote_code"):
        cook(recipe, output_dir=out, progress=False)
    assert not sentinel.exists() and not out.exists()


@pytest.mark.slow
def test_recipe_local_metric_runs_with_the_opt_in(text_models, tmp_path):
    """With `--trust-remote-code`, the same recipe runs its metric: the opt-in is what makes the difference."""
    sentinel = tmp_path / "METRIC_RAN"
    make_evil_metric(tmp_path / "evil_metric", sentinel)
    recipe = write_recipe(tmp_path / "r.yaml", greedy_recipe(text_models, "metric: ./evil_metric\n"))
    done = cli("cook", recipe, "--output-dir", tmp_path / "soup", "--quiet", "--trust-remote-code")
    assert done.returncode == 0, done.stderr
    assert sentinel.exists() and (tmp_path / "soup" / "config.json").is_file()


def test_recipe_absolute_metric_path_needs_trust_remote_code(text_models, tmp_path):
    sentinel = tmp_path / "METRIC_RAN"
    folder = make_evil_metric(tmp_path / "elsewhere_metric", sentinel)
    recipe = write_recipe(tmp_path / "r.yaml", greedy_recipe(text_models, f"metric: {folder}\n"))
    done = cli("cook", recipe, "--output-dir", tmp_path / "soup", "--quiet")
    assert done.returncode == 2 and not sentinel.exists() and not (tmp_path / "soup").exists()


@pytest.mark.parametrize("spec", ["os:system", "EVIL_MODULE:compute"])
def test_recipe_compute_metrics_import_needs_trust_remote_code(text_models, tmp_path, monkeypatch, spec):
    """`compute_metrics: module:function` imports a module (its top level runs): refused without the opt-in."""
    sentinel = tmp_path / "IMPORTED"
    module = f"evil_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('imported')\n"
        "def compute(p):\n    return {'accuracy': 1.0}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = spec.replace("EVIL_MODULE", module)
    recipe = write_recipe(tmp_path / "r.yaml", greedy_recipe(text_models, f"compute_metrics: {spec}\n"))
    from hf_soups.api import cook_recipe as cook
    from hf_soups.publishing.recipe_file import load_recipe

    with pytest.raises(InvalidArgumentError, match="compute_metrics") as info:
        cook(load_recipe(recipe), output_dir=tmp_path / "soup", progress=False)
    assert "trust_remote_code" in str(info.value)
    assert not sentinel.exists() and module not in sys.modules
    assert not (tmp_path / "soup").exists()
    env = hf_env()
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    done = cli("cook", recipe, "--output-dir", tmp_path / "soup", "--quiet", env=env)
    assert done.returncode == 2 and "compute_metrics" in done.stderr and not sentinel.exists()


YAML_TAGS = [
    "method: !!python/object/apply:os.system ['touch {sentinel}']\ningredients: [a, b]\n",
    "!!python/object/apply:subprocess.call [['touch', '{sentinel}']]\n",
    "method: !!python/name:os.system\ningredients: [a, b]\n",
    "ingredients: !!python/object/new:builtins.open ['{sentinel}', 'w']\n",
]


@pytest.mark.parametrize("text", YAML_TAGS, ids=["apply", "top-level-apply", "name", "new"])
def test_recipe_yaml_python_tags_never_run(tmp_path, text):
    sentinel = tmp_path / "YAML_RAN"
    recipe = write_recipe(tmp_path / "r.yaml", text.format(sentinel=sentinel))
    done = cli("cook", recipe, "--output-dir", tmp_path / "soup", "--quiet")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "r.yaml" in done.stderr
    assert not sentinel.exists() and not (tmp_path / "soup").exists()


def test_recipe_output_dir_pointing_at_user_files_is_refused(models, tmp_path):
    """`output_dir:` in a downloaded recipe aimed at an existing folder the user owns: refused, files intact."""
    victim = tmp_path / "home" / "project"
    (victim / "src").mkdir(parents=True)
    (victim / "src" / "train.py").write_text("print('mine')\n")
    (victim / "config.json").write_text("{}")  # looks like a model folder, but hf_soups did not write it
    before = digest(victim)
    for target in (str(victim), "../" * 8 + str(victim).lstrip("/")):
        recipe = write_recipe(
            tmp_path / "r.yaml", f"ingredients:\n  - {models[0]}\n  - {models[1]}\noutput_dir: {target}\n"
        )
        done = cli("cook", recipe, "--quiet")
        assert done.returncode != 0, f"the recipe replaced {victim}"
        assert "Traceback" not in done.stderr
        assert digest(victim) == before


def test_recipe_ingredient_paths_escaping_give_a_clear_error(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "ingredients:\n  - ../../../../../../etc\n  - /etc\n")
    done = cli("cook", recipe, "--output-dir", tmp_path / "soup", "--quiet")
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr and "etc" in done.stderr
    assert not (tmp_path / "soup").exists()


def test_recipe_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    lines.append("ingredients: *a9\n")
    recipe = write_recipe(tmp_path / "bomb.yaml", "\n".join(lines))
    start = time.monotonic()
    done = cli("cook", recipe, "--output-dir", tmp_path / "soup", "--quiet", timeout=120)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "soup").exists()


def test_recipe_huge_file_is_refused_quickly(tmp_path):
    """A 24 MB 'recipe' (recipes are a few KB): refused with a clear error (exit 2) within seconds.

    Parsing it with PyYAML's pure-Python loader would take minutes; a size limit answers at once.
    """
    recipe = tmp_path / "huge.yaml"
    line = "  - org/model-" + "x" * 80 + "\n"
    recipe.write_text("ingredients:\n" + line * (24 * 2**20 // len(line)))
    try:
        done = cli("cook", recipe, "--output-dir", tmp_path / "soup", "--quiet", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("a 24 MB recipe file was still being read after 30 s (no size limit)")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "huge.yaml" in done.stderr
    assert not (tmp_path / "soup").exists()


@pytest.mark.parametrize(
    "content",
    [os.urandom(4096), b"\x00" * 100, b"\x89PNG\r\n\x1a\n" + os.urandom(200)],
    ids=["random", "nul", "png"],
)
def test_recipe_binary_file_exits_2(tmp_path, content):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    done = cli("cook", recipe, "--output-dir", tmp_path / "soup", "--quiet")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "r.yaml" in done.stderr
    assert not (tmp_path / "soup").exists()


def test_recipe_binary_file_api_raises_recipe_error(tmp_path):
    from hf_soups.publishing.recipe_file import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xff\xfe\x00" + os.urandom(512))
    with pytest.raises(InvalidArgumentError, match="r.yaml"):
        load_recipe(recipe)


# hostile ingredients folders (the layout SoupTrainerCallback writes: soup_ingredients.json + sub-folders)


def make_ingredients_dir(root: Path, models: list[Path]) -> Path:
    from hf_soups.ingredients import INGREDIENT_METADATA, INGREDIENTS_MANIFEST

    root.mkdir()
    (root / INGREDIENTS_MANIFEST).write_text(json.dumps({"format_version": 1}))
    for i, m in enumerate(models):
        shutil.copytree(m, root / f"run-{i}")
        (root / f"run-{i}" / INGREDIENT_METADATA).write_text(
            json.dumps({"created": float(i), "run": f"run-{i}"})
        )
    return root


def test_manifest_paths_are_not_followed(models, tmp_path):
    """Paths written in the manifests are data: the ingredients are the sub-folders, never a path they name."""
    from hf_soups import merge_models
    from hf_soups.ingredients import INGREDIENT_METADATA, INGREDIENTS_MANIFEST

    folder = make_ingredients_dir(tmp_path / "ingredients", models[:2])
    outside = models[2]
    (folder / INGREDIENTS_MANIFEST).write_text(
        json.dumps({"format_version": 1, "ingredients": [str(outside), "../../../../etc"], "path": "/etc"})
    )
    for child, escape in ((folder / "run-0", str(outside)), (folder / "run-1", "../../../../etc")):
        meta = json.loads((child / INGREDIENT_METADATA).read_text())
        meta.update({"path": escape, "model": escape, "checkpoint": escape, "output_dir": escape})
        (child / INGREDIENT_METADATA).write_text(json.dumps(meta))
    soup = merge_models(str(folder), output_dir=tmp_path / "soup", progress=False)
    used = [Path(i.reference).resolve() for i in soup.ingredients]
    assert used == [(folder / "run-0").resolve(), (folder / "run-1").resolve()]


def test_manifest_child_symlinked_outside_is_not_souped(models, tmp_path):
    """A sub-folder that is a symlink to a model outside the ingredients folder is not taken as an ingredient."""
    from hf_soups import merge_models
    from hf_soups.ingredients import INGREDIENT_METADATA

    folder = make_ingredients_dir(tmp_path / "ingredients", models[:2])
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(models[2], elsewhere)
    (elsewhere / INGREDIENT_METADATA).write_text(json.dumps({"created": 9.0}))
    (folder / "run-9").symlink_to(elsewhere, target_is_directory=True)
    try:
        soup = merge_models(str(folder), output_dir=tmp_path / "soup", progress=False)
    except SoupError as err:
        assert "run-9" in str(err)
        return
    used = {Path(i.reference).resolve() for i in soup.ingredients}
    assert elsewhere.resolve() not in used, "a symlink escaping the ingredients folder was souped"


@pytest.mark.parametrize(
    "meta",
    [
        b"[1, 2, 3]",
        b'"just a string"',
        b'{"created": "yesterday"}',
        b'{"created": [1]}',
        b"{not json",
        b"\xff\xfe\x00",
    ],
    ids=["list", "string", "created-text", "created-list", "invalid-json", "binary"],
)
def test_hostile_ingredient_metadata_is_a_clear_error(models, tmp_path, meta):
    from hf_soups import merge_models
    from hf_soups.ingredients import INGREDIENT_METADATA

    folder = make_ingredients_dir(tmp_path / "ingredients", models[:2])
    before = digest(folder)
    (folder / "run-1" / INGREDIENT_METADATA).write_bytes(meta)
    before = digest(folder)
    with pytest.raises(InvalidArgumentError) as info:
        merge_models(str(folder), output_dir=tmp_path / "soup", progress=False)
    assert INGREDIENT_METADATA in str(info.value) and "run-1" in str(info.value)
    assert digest(folder) == before and not (tmp_path / "soup").exists()


@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "ABSOLUTE"])
def test_weight_index_escaping_its_folder_is_refused(models, tmp_path, shard):
    """Issue 12 (5): an index naming a shard outside its folder is refused (it could read any file)."""
    from hf_soups import merge_models
    from tests.tiny_models import make_tiny_bert

    outside = tmp_path / "outside"
    shutil.copytree(models[2], outside)
    bad = tmp_path / "bad"
    make_tiny_bert(seed=7).save_pretrained(bad, max_shard_size="20KB")
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    target = str(outside / "model.safetensors") if shard == "ABSOLUTE" else shard
    for f in set(index["weight_map"].values()):
        (bad / f).unlink()
    index["weight_map"] = {k: target for k in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    with pytest.raises(SoupError) as info:
        merge_models([models[0], bad], output_dir=tmp_path / "soup", progress=False)
    assert "model.safetensors.index.json" in str(info.value)
    assert not (tmp_path / "soup").exists()


def test_pickle_module_unused_by_the_loader():
    """Guard for the payload tests above: the class really runs code when unpickled with plain pickle."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"payload-{uuid.uuid4().hex}"
    try:
        pickle.loads(pickle.dumps(_Payload(path)))
        assert path.exists()
    finally:
        path.unlink(missing_ok=True)
