"""Nothing the user owns is lost through `output_dir`: ownership marker, ingredient folders, signals, disk full.

Issue 12, defects 1, 8 and the output parts of 16.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hf_soups import InvalidArgumentError, merge_models
from hf_soups.cli import main as cli_main
from hf_soups.core.output_dir import MARKER_NAME, read_marker
from hf_soups.core.sources import AtomicDirectory
from hf_soups.errors import OutputDirError, OutputWriteError
from tests.testing_common import float64_mean
from tests.testing_common import read_safetensors as _weights

REPO = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (relative path -> bytes, None for folders), hidden ones included."""
    out: dict[str, bytes | None] = {}
    for p in sorted(folder.rglob("*")):
        out[p.relative_to(folder).as_posix()] = p.read_bytes() if p.is_file() else None
    return out


def _mean_of(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The expected uniform soup, computed independently in float64."""
    return float64_mean([_weights(f) for f in folders])


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".hfsoups") or ".tmp-" in p.name)


@pytest.fixture
def trainer_dir(tmp_path, tiny_bert_dirs):
    """A transformers.Trainer output folder: two checkpoints, TensorBoard runs, trainer state, final model."""
    t = tmp_path / "trainer-out"
    shutil.copytree(tiny_bert_dirs[0], t / "checkpoint-100")
    shutil.copytree(tiny_bert_dirs[1], t / "checkpoint-200")
    (t / "checkpoint-200" / "trainer_state.json").write_text('{"global_step": 200}')
    (t / "runs" / "Nov30_run").mkdir(parents=True)
    (t / "runs" / "Nov30_run" / "events.out.tfevents.1").write_bytes(b"\x00tensorboard")
    (t / "trainer_state.json").write_text('{"best_model_checkpoint": "checkpoint-200"}')
    shutil.copy(tiny_bert_dirs[1] / "config.json", t / "config.json")
    shutil.copy(tiny_bert_dirs[1] / "model.safetensors", t / "model.safetensors")
    return t


# ------------------------------------------------------------------------------------- ownership (defect 1)


def test_trainer_output_folder_is_refused_before_any_work_and_kept(trainer_dir):
    before = _snapshot(trainer_dir)
    refs = [trainer_dir / "checkpoint-100", trainer_dir / "checkpoint-200"]
    with pytest.raises(OutputDirError) as e:
        # an unreachable Hub ID too: the refusal comes before any download
        merge_models([*refs, "nobody/not-on-any-hub"], output_dir=trainer_dir, progress=False)
    message = str(e.value)
    assert "contains the folder of ingredient" in message and "checkpoint-100" in message
    assert isinstance(e.value, InvalidArgumentError) and e.value.path == str(trainer_dir.resolve())
    assert _snapshot(trainer_dir) == before
    assert _leftovers(trainer_dir.parent) == []


def test_trainer_output_folder_without_its_checkpoints_as_ingredients_is_refused(trainer_dir, tiny_bert_dirs):
    """Not an ingredient folder, but not ours either: a Trainer folder holds config.json, runs/, checkpoints."""
    before = _snapshot(trainer_dir)
    with pytest.raises(OutputDirError, match="was not written by hf_soups") as e:
        merge_models(tiny_bert_dirs[1:], output_dir=trainer_dir, progress=False)
    assert "checkpoint-100/" in str(e.value) and "runs/" in str(e.value) and "delete" in str(e.value)
    assert _snapshot(trainer_dir) == before


def test_output_dir_that_is_an_ingredient_is_refused_even_when_hf_soups_wrote_it(tmp_path, tiny_bert_dirs):
    soup_dir = tmp_path / "soup"
    merge_models(tiny_bert_dirs[:2], output_dir=soup_dir, progress=False)
    before = _snapshot(soup_dir)
    with pytest.raises(OutputDirError, match="is the folder of ingredient 'soup'"):
        merge_models([soup_dir, tiny_bert_dirs[2]], output_dir=soup_dir, progress=False)
    assert _snapshot(soup_dir) == before
    # the same soup loaded in memory: the folder it was loaded from is protected too
    loaded = merge_models(tiny_bert_dirs[:2], output_dir=soup_dir, progress=False).model
    before = _snapshot(soup_dir)
    with pytest.raises(OutputDirError, match="is the folder of ingredient 'BertForSequenceClassification"):
        merge_models([loaded, tiny_bert_dirs[2]], output_dir=soup_dir, progress=False)
    assert _snapshot(soup_dir) == before
    # through a symlink to it, too
    link = tmp_path / "link"
    link.symlink_to(soup_dir)
    with pytest.raises(OutputDirError, match="is the folder of ingredient"):
        merge_models([soup_dir, tiny_bert_dirs[2]], output_dir=link, progress=False)
    assert _snapshot(soup_dir) == before


def test_output_dir_inside_an_ingredient_or_the_base_is_refused(tmp_path, tiny_bert_dirs):
    before = _snapshot(tiny_bert_dirs[0])
    with pytest.raises(OutputDirError, match="lies inside the folder of ingredient 'ft-0'"):
        merge_models(tiny_bert_dirs, output_dir=tiny_bert_dirs[0] / "soup", progress=False)
    with pytest.raises(OutputDirError, match="lies inside the folder of the base model 'ft-0'"):
        merge_models(
            tiny_bert_dirs[1:],
            method="wise-ft",
            base_model=tiny_bert_dirs[0],
            alpha=0.5,
            output_dir=tiny_bert_dirs[0] / "wise",
            progress=False,
        )
    assert _snapshot(tiny_bert_dirs[0]) == before


def test_saved_model_with_user_files_is_refused_and_intact(tmp_path, tiny_bert_dirs):
    mine = tmp_path / "my-model"
    shutil.copytree(tiny_bert_dirs[2], mine)
    (mine / "src").mkdir()
    (mine / "src" / "train.py").write_text("print('my training code')\n")
    (mine / "notes.txt").write_text("lr 3e-5 was best")
    before = _snapshot(mine)
    with pytest.raises(OutputDirError, match="was not written by hf_soups"):
        merge_models(tiny_bert_dirs[:2], output_dir=mine, progress=False)
    assert _snapshot(mine) == before
    assert _leftovers(tmp_path) == []


def test_rerun_into_its_own_previous_output_replaces_it(tmp_path, tiny_bert_dirs):
    out = tmp_path / "soup"
    merge_models(tiny_bert_dirs[:2], output_dir=out, progress=False)
    marker = read_marker(out)
    assert marker is not None and marker["state"] == "complete"
    assert "model.safetensors" in marker["files"] and "soup_recipe.yaml" in marker["files"]
    merge_models(tiny_bert_dirs, output_dir=out, progress=False)  # the same command, more ingredients
    expected = _mean_of(tiny_bert_dirs)
    got = _weights(out)
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, atol=1e-6, rtol=0)
    assert _leftovers(tmp_path) == []
    # a file the user added to the soup folder is not ours: the next re-run refuses rather than deleting it
    (out / "notes.txt").write_text("keep me")
    before = _snapshot(out)
    with pytest.raises(OutputDirError, match="entries it did not write: notes.txt"):
        merge_models(tiny_bert_dirs[:2], output_dir=out, progress=False)
    assert _snapshot(out) == before


def test_empty_existing_folder_is_written(tmp_path, tiny_bert_dirs):
    out = tmp_path / "empty"
    out.mkdir()
    merge_models(tiny_bert_dirs[:2], output_dir=out, progress=False)
    assert (out / "model.safetensors").is_file() and read_marker(out) is not None
    assert _leftovers(tmp_path) == []


def test_save_pretrained_follows_the_same_rules(tmp_path, tiny_bert_dirs):
    soup = merge_models(tiny_bert_dirs[:2], progress=False)  # in memory
    before = _snapshot(tiny_bert_dirs[0])
    with pytest.raises(OutputDirError, match="save_directory=.* is the folder of ingredient 'ft-0'"):
        soup.save_pretrained(tiny_bert_dirs[0])
    assert _snapshot(tiny_bert_dirs[0]) == before
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.csv").write_text("a,b\n")
    with pytest.raises(OutputDirError):
        soup.save_pretrained(user)
    assert (user / "data.csv").read_text() == "a,b\n" and len(list(user.iterdir())) == 1
    out = soup.save_pretrained(tmp_path / "saved")
    soup.save_pretrained(tmp_path / "saved")  # its own earlier save: replaced
    assert read_marker(out) is not None and (out / "model.safetensors").is_file()
    # a streamed soup saved onto its own folder
    streamed = merge_models(tiny_bert_dirs[:2], output_dir=tmp_path / "streamed", progress=False)
    streamed.save_pretrained(tmp_path / "streamed")
    assert read_marker(tmp_path / "streamed") is not None
    assert _leftovers(tmp_path) == []


def test_cli_merge_into_a_trainer_folder_exits_nonzero_and_keeps_everything(trainer_dir, capsys):
    before = _snapshot(trainer_dir)
    code = cli_main(
        [
            "merge",
            str(trainer_dir / "checkpoint-100"),
            str(trainer_dir / "checkpoint-200"),
            "--output-dir",
            str(trainer_dir),
            "--quiet",
        ]
    )
    assert code == 2
    assert "contains the folder of ingredient" in capsys.readouterr().err
    assert _snapshot(trainer_dir) == before


def test_recipe_file_into_a_user_folder_is_refused(tmp_path, tiny_bert_dirs, capsys):
    mine = tmp_path / "mine"
    shutil.copytree(tiny_bert_dirs[2], mine)  # a saved model of the user's ...
    (mine / "thesis.tex").write_text("\\section{Soups}")  # ... beside their own work
    before = _snapshot(mine)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"method: uniform\ningredients: [{tiny_bert_dirs[0]}, {tiny_bert_dirs[1]}]\noutput_dir: mine\n"
    )
    assert cli_main(["cook", str(recipe), "--quiet"]) == 2
    assert "was not written by hf_soups" in capsys.readouterr().err
    assert _snapshot(mine) == before


# ------------------------------------------------------------------------------------- signals (defect 8)


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hf_soups import merge_models
    from hf_soups.core import sources as tensors

    ready, out, *models = sys.argv[1:]
    original = tensors.ShardedSafetensorsWriter.write
    calls = {"n": 0}

    def write_then_wait(self, name, tensor):  # timing only: hold the write open after a few tensors
        original(self, name, tensor)
        calls["n"] += 1
        if calls["n"] == 6:
            Path(ready).write_text("writing")
            time.sleep(120)

    tensors.ShardedSafetensorsWriter.write = write_then_wait
    merge_models(models, output_dir=out, max_shard_size=4000, progress=False)
    print("finished")
    """
)


def _start_writer(tmp_path: Path, out: Path, models: list[Path]) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(ready), str(out), *map(str, models)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            out_, err = child.communicate()
            pytest.fail(f"the writer never reached the write: {out_}\n{err}")
        time.sleep(0.05)
    return child, ready


@pytest.mark.slow
def test_sigterm_during_a_multi_shard_write_removes_the_temp_folder_and_keeps_the_old_soup(
    tmp_path, tiny_bert_dirs
):
    out = tmp_path / "soup"
    merge_models(tiny_bert_dirs[:2], output_dir=out, progress=False)
    before = _snapshot(out)
    child, _ = _start_writer(tmp_path, out, tiny_bert_dirs)
    try:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".hfsoups-tmp-")]
        assert len(temps) == 1 and len(list(temps[0].glob("model-*-of-*.safetensors"))) > 1  # mid multi-shard
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 143, stderr  # as SIGTERM's default would end it (128 + 15)
    assert "finished" not in stdout
    assert _leftovers(tmp_path) == []
    assert _snapshot(out) == before


@pytest.mark.slow
def test_sigkill_leftover_is_swept_by_the_next_write(tmp_path, tiny_bert_dirs):
    out = tmp_path / "soup"
    child, _ = _start_writer(tmp_path, out, tiny_bert_dirs)
    child.kill()  # SIGKILL cannot be caught: the temporary folder stays
    child.communicate()
    assert len(_leftovers(tmp_path)) == 1 and not out.exists()
    merge_models(tiny_bert_dirs[:2], output_dir=tmp_path / "other-soup", progress=False)
    assert _leftovers(tmp_path) == []


def _fake_work_dir(parent: Path, name: str, marker: dict | None) -> Path:
    d = parent / name
    d.mkdir()
    (d / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 64)
    if marker is not None:
        (d / MARKER_NAME).write_text(json.dumps(marker))
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_folders_of_killed_runs_are_swept_and_nothing_else(tmp_path, tiny_bert_dirs):
    host = socket.gethostname()
    dead = _dead_pid()

    def marker(token, pid, **kw):
        return {"written_by": "hf_soups", "state": "writing", "id": token, "pid": pid, "host": host, **kw}

    stale = _fake_work_dir(tmp_path, ".hfsoups-tmp-deadbeef", marker("deadbeef", dead, target="soup"))
    foreign = _fake_work_dir(tmp_path, ".hfsoups-tmp-0badf00d", None)  # same pattern, no marker: not ours
    live = _fake_work_dir(
        tmp_path, ".hfsoups-tmp-1234abcd", marker("1234abcd", os.getpid())
    )  # a running write
    elsewhere = _fake_work_dir(
        tmp_path, ".hfsoups-tmp-abcdef12", {**marker("abcdef12", dead), "host": "other"}
    )
    lookalike = _fake_work_dir(tmp_path, ".hfsoups-tmp-deadbeef-mine", marker("deadbeef", dead))
    merge_models(tiny_bert_dirs[:2], output_dir=tmp_path / "soup", progress=False)
    assert not stale.exists()
    for kept in (foreign, live, elsewhere, lookalike):
        assert (kept / "model-00001-of-00002.safetensors").is_file(), kept.name


def test_a_write_killed_between_its_two_renames_gets_the_previous_soup_back(tmp_path, tiny_bert_dirs):
    """Killed after moving the previous soup aside, before moving the new one in: the sweep restores it."""
    out = tmp_path / "soup"
    merge_models(tiny_bert_dirs[:2], output_dir=out, progress=False)
    before = _snapshot(out)
    token = "feedf00d"
    os.replace(out, tmp_path / f".hfsoups-old-{token}")
    _fake_work_dir(
        tmp_path,
        f".hfsoups-tmp-{token}",
        {
            "written_by": "hf_soups",
            "state": "complete",
            "id": token,
            "pid": _dead_pid(),
            "host": socket.gethostname(),
            "target": "soup",
        },
    )
    merge_models(tiny_bert_dirs[1:], output_dir=tmp_path / "elsewhere", progress=False)  # same parent
    assert _snapshot(out) == before
    assert _leftovers(tmp_path) == []


def test_write_restores_the_previous_sigterm_handler(tmp_path):
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with AtomicDirectory(tmp_path / "out") as tmp:
            assert signal.getsignal(signal.SIGTERM) is not mine  # ours while writing
            (tmp.path / "config.json").write_text("{}")
            tmp.commit()
        assert signal.getsignal(signal.SIGTERM) is mine
        # SIGTERM mid-write with a handler of the caller: cleaned up, then the caller's handler runs
        with pytest.raises(KeyboardInterrupt):
            with AtomicDirectory(tmp_path / "out") as tmp:
                (tmp.path / "config.json").write_text('{"new": 1}')
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        assert seen == [signal.SIGTERM]
        assert (tmp_path / "out" / "config.json").read_text() == "{}"
        assert _leftovers(tmp_path) == []
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------- defect 16


def test_a_250_character_output_name_works(tmp_path, tiny_bert_dirs):
    out = tmp_path / ("s" * 250)
    merge_models(tiny_bert_dirs[:2], output_dir=out, progress=False)
    merge_models(tiny_bert_dirs, output_dir=out, progress=False)  # and its replacement
    assert (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_symlinked_output_dir_is_written_through_and_the_link_kept(tmp_path, tiny_bert_dirs):
    real = tmp_path / "disk" / "soup"
    merge_models(tiny_bert_dirs[:2], output_dir=real, progress=False)
    link = tmp_path / "soup-link"
    link.symlink_to(real)
    soup = merge_models(tiny_bert_dirs, output_dir=link, progress=False)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "ft-0", "ft-1", "ft-2", "soup-link"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["soup"]
    expected = _mean_of(tiny_bert_dirs)
    got = _weights(real)
    torch.testing.assert_close(
        got["classifier.weight"].double(), expected["classifier.weight"], atol=1e-6, rtol=0
    )
    # the soup loads through the link, and holds what the real folder holds
    torch.testing.assert_close(
        soup.model.classifier.weight.double(), expected["classifier.weight"], atol=1e-6, rtol=0
    )
    # a link to a folder that is not ours is refused like the folder itself
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    other = tmp_path / "other-link"
    other.symlink_to(mine)
    with pytest.raises(OutputDirError, match="was not written by hf_soups"):
        merge_models(tiny_bert_dirs[:2], output_dir=other, progress=False)
    assert other.is_symlink() and (mine / "notes.txt").read_text() == "x"


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command here: cannot make a small disk to fill")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_names_the_path_and_keeps_the_previous_soup(tiny_disk, tiny_bert_dirs):
    out = tiny_disk / "soup"
    merge_models(tiny_bert_dirs[:2], output_dir=out, progress=False)
    before = _snapshot(out)
    soup_bytes = sum(len(v or b"") for v in before.values())
    free = shutil.disk_usage(tiny_disk).free
    (tiny_disk / "filler").write_bytes(b"\x00" * max(0, free - soup_bytes // 2))
    with pytest.raises(OutputWriteError) as e:
        merge_models(tiny_bert_dirs, output_dir=out, progress=False)
    message = str(e.value)
    assert str(out) in message and "disk is full" in message and "another disk" in message
    assert e.value.path is not None and e.value.path.startswith(str(tiny_disk))
    assert isinstance(e.value, OSError) and e.value.errno == 28
    assert _snapshot(out) == before
    assert _leftovers(tiny_disk) == []
