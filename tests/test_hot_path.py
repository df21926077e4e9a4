"""The streaming hot path: slice reads, slice writes and the slice-by-slice engine give the same bytes as the
whole-tensor path, keep the error contract, and leave torch's thread setting as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_soups import NonFiniteTensorError, merge_models
from hf_soups.core import engine as engine_module
from hf_soups.core.engine import DictSink, WriterSink, combine
from hf_soups.core.plan import MergePlan, TensorPlan
from hf_soups.core.sources import (
    SafetensorsSource,
    ShardedSafetensorsWriter,
    StateDictSource,
    find_weight_files,
)
from hf_soups.errors import SoupError


def _ingredient_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big.f32": torch.randn(301, 7, generator=g),  # 2107 elements: several slices and a ragged last one
        "big.bf16": torch.randn(1000, generator=g).to(torch.bfloat16),
        "big.f16": torch.randn(40, 30, generator=g).to(torch.float16),
        "small.bias": torch.randn(5, generator=g),
        "ids": torch.arange(300),  # integer buffer: copied, never averaged
    }


def _plan(tensors: dict[str, torch.Tensor], n: int, dtype: torch.dtype | None = None) -> MergePlan:
    return MergePlan(
        tensors=[
            TensorPlan(
                name=k,
                shape=tuple(v.shape),
                dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype,
                source_keys=[k] * n,
                row_permutations=[None] * n,
                mergeable=v.is_floating_point(),
            )
            for k, v in tensors.items()
        ],
        config={},
        reference_index=0,
        names=[f"ing-{i}" for i in range(n)],
    )


def _sources(tmp_path, n: int):
    """n ingredients: safetensors files, except the last one, which is an in-memory state dict."""
    all_tensors = [_ingredient_tensors(i) for i in range(n)]
    for i, t in enumerate(all_tensors[:-1]):
        save_file(t, tmp_path / f"ing{i}.safetensors")
    sources = [SafetensorsSource([tmp_path / f"ing{i}.safetensors"]) for i in range(n - 1)]
    sources.append(StateDictSource(all_tensors[-1]))
    return all_tensors, sources


def _write(tmp_path, name, plan, sources, coefficients):
    out = tmp_path / name
    out.mkdir()
    writer = ShardedSafetensorsWriter(
        out, [(t.name, t.shape, t.dtype) for t in plan.tensors], max_shard_size="10KB"
    )
    combine(
        plan, sources, coefficients, WriterSink(writer, max(t.nbytes for t in plan.tensors)), progress=False
    )
    writer.close()
    got = {}
    for f in find_weight_files(out).files:
        got.update(load_file(f))
    return got


@pytest.fixture
def torch_threads():
    """Set torch's thread count for one test (the slice workers follow it), restored afterwards."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("coefficients", [[0.25, 0.25, 0.5], [0.0, 0.7, 0.3], [1.0, 0.0, 0.0]])
def test_sliced_combine_equals_whole_tensor_combine(
    tmp_path, monkeypatch, torch_threads, coefficients, dtype, threads
):
    """Slices summed by one worker or by two side by side (each casting into its own buffer, written in order)
    give the bytes of the whole-tensor path."""
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 256)
    tensors, sources = _sources(tmp_path, 3)
    plan = _plan(tensors[0], 3, dtype)
    whole = DictSink()  # no write_chunk: every tensor takes the whole-tensor path
    combine(plan, sources, coefficients, whole, progress=False)
    torch_threads(threads)
    got = _write(tmp_path, "sliced", plan, sources, coefficients)
    assert got.keys() == whole.tensors.keys()
    for k, v in whole.tensors.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k  # same float32 operations in the same order: identical bytes
    # and both are the weighted mean, within float32 rounding
    for k in ("big.f32", "big.bf16", "big.f16"):
        expected = sum(c * t[k].double() for c, t in zip(coefficients, tensors))
        tol = 1e-5 if got[k].dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[k].double(), expected.to(got[k].dtype).double(), rtol=tol, atol=tol)


def test_large_tensor_is_streamed_at_the_default_slice_size(tmp_path, monkeypatch):
    n_elem = 3 * engine_module.CHUNK_ELEMENTS + 17
    g = torch.Generator().manual_seed(0)
    ingredients = [{"w": torch.randn(n_elem, generator=g)} for _ in range(2)]
    for i, t in enumerate(ingredients):
        save_file(t, tmp_path / f"i{i}.safetensors")
    sources = [SafetensorsSource([tmp_path / f"i{i}.safetensors"]) for i in range(2)]
    reads = []
    original = SafetensorsSource.get_range

    def counting_get_range(self, name, start, count, buffer=None):
        reads.append(count)
        return original(self, name, start, count, buffer)

    # count the slices the engine asks for (the reading itself is the real one)
    monkeypatch.setattr(SafetensorsSource, "get_range", counting_get_range)
    got = _write(tmp_path, "out", _plan(ingredients[0], 2), sources, [0.5, 0.5])
    assert max(reads) == engine_module.CHUNK_ELEMENTS and len(reads) == 2 * 4
    torch.testing.assert_close(got["w"], (ingredients[0]["w"] + ingredients[1]["w"]) / 2, rtol=0, atol=1e-6)


def test_non_finite_value_in_a_slice_names_ingredient_and_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 256)
    tensors, sources = _sources(tmp_path, 3)
    bad = dict(tensors[1])
    bad["big.f32"] = bad["big.f32"].clone()
    bad["big.f32"][250, 3] = float("nan")  # in a late slice
    save_file(bad, tmp_path / "ing1.safetensors")
    sources[1] = SafetensorsSource([tmp_path / "ing1.safetensors"])
    with pytest.raises(NonFiniteTensorError, match="ing-1") as e:
        _write(tmp_path, "out", _plan(tensors[0], 3), sources, [1 / 3] * 3)
    assert e.value.ingredient == "ing-1" and e.value.tensor_name == "big.f32"


def test_thread_setting_is_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 256)
    tensors, sources = _sources(tmp_path, 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _write(tmp_path, "out", _plan(tensors[0], 2), sources, [0.5, 0.5])  # sliced and small tensors
        assert torch.get_num_threads() == 2
        combine(_plan(tensors[0], 2), sources, [0.5, 0.5], DictSink(), progress=False)  # whole tensors
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_garbage_collector_paused_while_combining_and_restored(tmp_path, monkeypatch):
    """The cyclic collector is off inside the loop (it walks every object torch loaded, for nothing) and comes back
    as it was: on after a soup, still off when the caller had turned it off, on after an error."""
    import gc

    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 256)
    tensors, sources = _sources(tmp_path, 2)
    seen = []

    class Probe(DictSink):
        def write(self, plan, tensor):
            seen.append(gc.isenabled())
            super().write(plan, tensor)

    assert gc.isenabled()
    combine(_plan(tensors[0], 2), sources, [0.5, 0.5], Probe(), progress=False)
    assert seen and not any(seen) and gc.isenabled()
    gc.disable()
    try:
        combine(_plan(tensors[0], 2), sources, [0.5, 0.5], DictSink(), progress=False)
        assert not gc.isenabled()
    finally:
        gc.enable()

    class Broken(DictSink):
        def write(self, plan, tensor):
            raise OSError("disk full")

    with pytest.raises(OSError):
        combine(_plan(tensors[0], 2), sources, [0.5, 0.5], Broken(), progress=False)
    assert gc.isenabled()


def test_safetensors_get_range_reads_only_the_slice_into_the_buffer(tmp_path):
    tensors = _ingredient_tensors(0)
    save_file(tensors, tmp_path / "m.safetensors")
    src = SafetensorsSource([tmp_path / "m.safetensors"])
    buf = torch.empty(64, dtype=torch.uint8)
    assert src.range_readable("big.f32")
    for name in ("big.f32", "big.bf16", "ids"):
        flat = tensors[name].reshape(-1)
        for start, count in ((0, 5), (13, 3), (flat.numel() - 4, 4), (7, 0)):
            got = src.get_range(name, start, count, buf)
            assert got.dtype == flat.dtype and torch.equal(got, flat[start : start + count]), (name, start)
            if count:
                assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert torch.equal(
        src.get_range("big.f32", 2000, 107), tensors["big.f32"].reshape(-1)[2000:]
    )  # own buffer
    with pytest.raises(SoupError, match="out of range"):
        src.get_range("big.f32", 2100, 8, buf)
    src.close()


def test_state_dict_get_range_is_a_view_and_non_contiguous_tensors_still_work():
    base = torch.randn(6, 4)
    src = StateDictSource({"c": base, "t": base.t()})
    assert src.range_readable("c") and not src.range_readable("t")
    view = src.get_range("c", 4, 8)
    assert view.data_ptr() == base.reshape(-1)[4:].data_ptr() and torch.equal(view, base.reshape(-1)[4:12])
    assert torch.equal(src.get_range("t", 3, 5), base.t().reshape(-1)[3:8])


def test_writer_chunks_round_trip_and_refuse_overflow(tmp_path):
    a, b = torch.randn(10), torch.randn(3, 2).to(torch.bfloat16)
    writer = ShardedSafetensorsWriter(tmp_path, [("a", (10,), a.dtype), ("b", (3, 2), b.dtype)])
    writer.write_chunk("a", a[:4])
    with pytest.raises(SoupError, match="out of order"):
        writer.write_chunk("b", b.reshape(-1))
    with pytest.raises(SoupError, match="written whole after 16 bytes"):
        writer.write("a", a)
    with pytest.raises(SoupError, match="would have 44 bytes, 40 were planned"):
        writer.write_chunk("a", a[:7])
    writer.write_chunk("a", a[4:])
    writer.write_chunk("b", b.reshape(-1)[:5])
    with pytest.raises(SoupError, match="never written"):
        writer.close()

    out = tmp_path / "second"
    out.mkdir()
    writer = ShardedSafetensorsWriter(out, [("a", (10,), a.dtype), ("b", (3, 2), b.dtype)], max_shard_size=41)
    for piece in a.split(3):
        writer.write_chunk("a", piece)
    writer.write("b", b)
    writer.close()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }
    assert torch.equal(load_file(out / "model-00001-of-00002.safetensors")["a"], a)
    assert torch.equal(load_file(out / "model-00002-of-00002.safetensors")["b"], b)


def test_merge_models_streams_slices_end_to_end(tiny_bert_dirs, tmp_path, monkeypatch):
    """Through the public API (Kitchen, WriterSink, atomic writer): the sliced soup is the mean."""
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 100)  # every matrix of the tiny BERT is sliced
    merge_models(tiny_bert_dirs, output_dir=tmp_path / "soup", weights=[1, 2, 5], progress=False)
    out = load_file(tmp_path / "soup" / "model.safetensors")
    sds = [load_file(d / "model.safetensors") for d in tiny_bert_dirs]
    assert any(v.numel() > 100 for v in out.values())
    for k, v in out.items():
        expected = sum(c * sd[k].double() for c, sd in zip([1 / 8, 2 / 8, 5 / 8], sds))
        if v.is_floating_point():
            torch.testing.assert_close(v.double(), expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, sds[0][k])
