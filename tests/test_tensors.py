"""Lazy reading and streamed, sharded, atomic writing, on random tensors (no models)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_soups.core.sources import (
    AtomicDirectory,
    SafetensorsSource,
    ShardedSafetensorsWriter,
    find_weight_files,
)
from hf_soups.errors import CorruptCheckpointError, SoupError
from hf_soups.utils import parse_size


def _random_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, generator=g).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).view(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.scalar": torch.tensor(3.5),
    }


def test_reader_matches_safetensors_and_reuses_buffer(tmp_path):
    tensors = _random_tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    src = SafetensorsSource([tmp_path / "model.safetensors"])
    assert set(src.keys()) == set(tensors)
    buf = torch.empty(1024, dtype=torch.uint8)
    for name, t in tensors.items():
        info = src.info(name)
        assert info.shape == tuple(t.shape) and info.dtype == t.dtype
        got = src.get(name, buf)
        assert torch.equal(got, t), name
        if t.numel():
            assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    src.close()


@pytest.mark.parametrize("max_shard_size", ["50GB", 60, "100B"])
def test_writer_round_trip_with_shards(tmp_path, max_shard_size):
    tensors = _random_tensors()
    order = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, order, max_shard_size=max_shard_size)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    weights = find_weight_files(tmp_path)
    loaded = {}
    for f in weights.files:
        loaded.update(load_file(f))  # the reference implementation accepts our files
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k])
    if len(weights.files) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_writer_refuses_out_of_order_and_missing(tmp_path):
    t = torch.zeros(2)
    writer = ShardedSafetensorsWriter(tmp_path, [("x", (2,), t.dtype), ("y", (2,), t.dtype)])
    with pytest.raises(SoupError, match="out of order"):
        writer.write("y", t)
    writer.write("x", t)
    with pytest.raises(SoupError, match="never written"):
        writer.close()


def test_header_pointing_past_the_end(tmp_path):
    save_file({"w": torch.zeros(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CorruptCheckpointError, match="truncated") as e:
        SafetensorsSource([tmp_path / "model.safetensors"])
    assert e.value.tensor_name == "w"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError):
        parse_size("lots")


def test_atomic_directory_replaces_only_on_commit(tmp_path):
    target = tmp_path / "out"
    with AtomicDirectory(target) as tmp:  # a folder hf_soups wrote (marked): it may be replaced
        (tmp.path / "config.json").write_text("old")
        tmp.commit()
    with AtomicDirectory(target) as tmp:
        (tmp.path / "config.json").write_text("new")
        assert (target / "config.json").read_text() == "old"
        tmp.commit()
    assert (target / "config.json").read_text() == "new"
    with pytest.raises(RuntimeError):
        with AtomicDirectory(target) as tmp:
            (tmp.path / "config.json").write_text("newer")
            raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "present, chosen",
    [
        (["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"], "model.safetensors"),
        (["model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"], "index"),
        (["pytorch_model.bin", "pytorch_model.bin.index.json"], "pytorch_model.bin"),
        (["pytorch_model.bin.index.json"], "index"),
        ([], None),
    ],
)
def test_find_weight_files_follows_from_pretrained_order(tmp_path, present, chosen):
    """transformers' order: model.safetensors, its index, pytorch_model.bin, its index (first present)."""
    for name in present:
        if name.endswith(".index.json"):
            shard = name.replace(".index.json", "").replace(".", "-00001-of-00001.", 1)
            (tmp_path / shard).write_bytes(b"")
            (tmp_path / name).write_text(json.dumps({"weight_map": {"w": shard}}))
        else:
            (tmp_path / name).write_bytes(b"")
    weights = find_weight_files(tmp_path)
    if chosen is None:
        assert weights is None
        return
    if chosen == "index":
        assert weights.index == tmp_path / present[0] and len(weights.files) == 1
    else:
        assert weights.files == (tmp_path / chosen,) and weights.index is None
    assert set(weights.ignored) == {tmp_path / n for n in present} - {weights.index or weights.files[0]}


def test_index_shards_are_plain_names_inside_the_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.safetensors").write_bytes(b"")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "sub/a.safetensors"}}))
    assert find_weight_files(tmp_path).files == (tmp_path / "sub" / "a.safetensors",)
    for bad in ["../a.safetensors", "/etc/passwd", "sub/../../a.safetensors", "", "C:/x.safetensors", "a\\b"]:
        index.write_text(json.dumps({"weight_map": {"w": bad}}))
        with pytest.raises(CorruptCheckpointError, match="weight_map"):
            find_weight_files(tmp_path)
