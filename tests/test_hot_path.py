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
    """Slices summed by one worker or by two side by side (each casting into its own buffer and writing its
    slices as it finishes them, in any order) give the bytes of the whole-tensor path."""
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 256)
    tensors, sources = _sources(tmp_path, 3)
    plan = _plan(tensors[0], 3, dtype)
    whole = DictSink()  # no write_slice: every tensor takes the whole-tensor path
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


def test_distance_statistics_do_not_depend_on_the_workers_timing(tmp_path, monkeypatch, torch_threads):
    """The sampled slices' Gram matrices are added in slice order whichever worker measured them: one worker and
    two give the same float64 sums, equal to float64 dot products of the same sampled elements."""
    from hf_soups.core.compat import DistanceStats

    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 32)  # the linear path's slices: 64 elements
    monkeypatch.setattr(engine_module, "STATS_EVERY", 3)  # slices 0, 3, 6, ... of each streamed tensor
    tensors, sources = _sources(tmp_path, 3)
    grams = []
    for threads in (1, 2, 2):
        torch_threads(threads)
        plan = _plan(tensors[0], 3)
        plan.distances = DistanceStats(plan.names)
        _write(tmp_path, f"out{len(grams)}", plan, sources, [1 / 3] * 3)
        grams.append({k: v.clone() for k, v in plan.distances.tensors.items()})
    assert grams[0].keys() == grams[1].keys() >= {"big.f32", "big.bf16", "big.f16"}
    for got in grams[1:]:
        for k in grams[0]:
            assert torch.equal(got[k], grams[0][k]), k
    n, chunk = tensors[0]["big.f32"].numel(), engine_module._linear_chunk()
    stride = engine_module.STATS_STRIDE
    rows = torch.stack([t["big.f32"].reshape(-1).double() for t in tensors])
    sampled = torch.cat([rows[:, s : min(s + chunk, n) : stride] for s in range(0, n, chunk * 3)], dim=1)
    assert sampled.shape[1] < n // 4  # a sample of several slices, not the whole tensor
    torch.testing.assert_close(grams[0]["big.f32"], sampled @ sampled.T, rtol=1e-6, atol=0)


def test_slice_runner_drain_does_each_item_once_and_stops_on_the_first_error():
    import threading

    done, lock = [], threading.Lock()

    def record(item, slot):
        assert slot in (0, 1)
        with lock:
            done.append(item)

    with engine_module._SliceRunner(2) as runner:
        runner.drain(record, range(500))
    assert sorted(done) == list(range(500))

    done.clear()

    def fail_at_ten(item, slot):
        if item == 10:
            raise ValueError("slice 10 is broken")
        record(item, slot)

    with pytest.raises(ValueError, match="slice 10"):
        with engine_module._SliceRunner(2) as runner:
            runner.drain(fail_at_ten, range(100_000))
    assert 10 not in done and len(done) < 1000  # the other worker stopped after its current item


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
    # the linear path's slices: 2 of them for 3 * CHUNK_ELEMENTS + 17 elements, each read from both ingredients
    assert engine_module._linear_chunk() == 2 * engine_module.CHUNK_ELEMENTS
    assert max(reads) == engine_module._linear_chunk() and len(reads) == 2 * 2
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


def test_garbage_collector_paused_while_planning_and_writing_a_soup(tiny_bert_dirs, tmp_path, monkeypatch):
    """A merge to disk plans and writes with the cyclic collector off (one full collection of torch's objects cost
    about a tenth of a second of a 400M soup) and turns it back on when done."""
    import gc

    import hf_soups.kitchen as kitchen_module

    seen = []
    real_build_plan = kitchen_module.build_plan

    def observed_build_plan(*args, **kwargs):
        seen.append(gc.isenabled())
        return real_build_plan(*args, **kwargs)

    monkeypatch.setattr(kitchen_module, "build_plan", observed_build_plan)
    assert gc.isenabled()
    merge_models(tiny_bert_dirs, output_dir=tmp_path / "soup", progress=False)
    assert seen == [False] and gc.isenabled()


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


def test_writer_slices_round_trip_and_refuse_misuse(tmp_path):
    a, b = torch.randn(10), torch.randn(3, 2).to(torch.bfloat16)
    writer = ShardedSafetensorsWriter(tmp_path, [("a", (10,), a.dtype), ("b", (3, 2), b.dtype)])
    writer.write_slice("a", 6, a[6:])  # slices in any order
    with pytest.raises(SoupError, match="out of order"):
        writer.write_slice("b", 0, b.reshape(-1))
    with pytest.raises(SoupError, match="written whole after 16 bytes"):
        writer.write("a", a)
    with pytest.raises(SoupError, match="bytes 28:44 of tensor 'a' are outside its 40"):
        writer.write_slice("a", 7, a[:4])
    with pytest.raises(SoupError, match="slice at byte 24 of tensor 'a' was written twice"):
        writer.write_slice("a", 6, a[6:8])
    writer.write_slice("a", 0, a[:6])
    writer.write_slice("b", 0, b.reshape(-1)[:5])
    with pytest.raises(SoupError, match="never written"):
        writer.close()

    out = tmp_path / "overlap"
    out.mkdir()
    writer = ShardedSafetensorsWriter(out, [("a", (10,), a.dtype)])
    writer.write_slice("a", 0, a[:6])
    with pytest.raises(SoupError, match="overlap or leave a gap"):
        writer.write_slice("a", 5, a[5:9])  # 40 bytes in all, but bytes 20:24 twice and 36:40 never

    out = tmp_path / "second"
    out.mkdir()
    writer = ShardedSafetensorsWriter(out, [("a", (10,), a.dtype), ("b", (3, 2), b.dtype)], max_shard_size=41)
    for start in (9, 3, 0, 6):
        writer.write_slice("a", start, a[start : start + 3])
    writer.write("b", b)
    writer.close()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }
    assert torch.equal(load_file(out / "model-00001-of-00002.safetensors")["a"], a)
    assert torch.equal(load_file(out / "model-00002-of-00002.safetensors")["b"], b)


def test_writer_slices_from_threads_give_the_same_file(tmp_path):
    """Slices written from several threads at once, in a shuffled order, give the bytes of one whole write."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(4099, generator=g).to(torch.bfloat16), torch.randn(7, generator=g)
    spec = [("small", (7,), small.dtype), ("big", (4099,), big.dtype), ("tail", (7,), small.dtype)]
    whole = tmp_path / "whole"
    whole.mkdir()
    writer = ShardedSafetensorsWriter(whole, spec)
    writer.write("small", small)
    writer.write("big", big)
    writer.write("tail", small)
    writer.close()

    sliced = tmp_path / "sliced"
    sliced.mkdir()
    writer = ShardedSafetensorsWriter(sliced, spec)
    writer.write("small", small)
    starts = list(range(0, 4099, 64))
    order = torch.randperm(len(starts), generator=g).tolist()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: writer.write_slice("big", starts[k], big[starts[k] : starts[k] + 64]), order))
    writer.write("tail", small)
    writer.close()
    assert (sliced / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_writer_sink_casts_uncast_slices_from_threads_without_sharing_a_buffer(tmp_path):
    """float32 slices handed to a bfloat16 tensor from several threads at once are cast and written right (each
    into a tensor of its own: the sink's one buffer is never shared between threads)."""
    from concurrent.futures import ThreadPoolExecutor

    n, step = 1 << 20, 1 << 15
    values = torch.randn(n, generator=torch.Generator().manual_seed(1))
    plan = _plan({"w": values.to(torch.bfloat16)}, 1)
    writer = ShardedSafetensorsWriter(tmp_path, [("w", (n,), torch.bfloat16)])
    sink = WriterSink(writer, n * 4)
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(lambda s: sink.write_slice(plan.tensors[0], s, values[s : s + step]), range(0, n, step))
        )
    writer.close()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], values.to(torch.bfloat16))


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


def test_whole_tensor_path_adds_bfloat16_without_a_float32_copy_of_the_tensor():
    """A bfloat16 tensor read whole (a `.bin` checkpoint, a sink without `write_slice`) is added through a float32
    buffer of one slice: `add_` of the whole tensor would allocate a float32 copy of it per ingredient. torch's
    profiler sees every allocation; the only one of the tensor's float32 size is the accumulator."""
    from torch.profiler import ProfilerActivity, profile

    n = 3 * engine_module.CHUNK_ELEMENTS + 5  # several slices and a ragged last one
    tensors = [
        {"w": torch.randn(n, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)} for i in range(3)
    ]
    plan = _plan(tensors[0], 3)
    sink = DictSink()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        combine(plan, [StateDictSource(t) for t in tensors], [0.2, 0.3, 0.5], sink, progress=False)
    full = [e.name for e in prof.events() if e.name.startswith("aten::empty") and e.cpu_memory_usage >= 4 * n]
    assert full == ["aten::empty"], full  # the float32 accumulator, nothing else of its size
    expected = sum(c * t["w"].double() for c, t in zip([0.2, 0.3, 0.5], tensors))
    torch.testing.assert_close(
        sink.tensors["w"].double(), expected.to(torch.bfloat16).double(), rtol=1e-2, atol=1e-2
    )


class _SlicesCounted(engine_module.ModelSink):
    """The live-model sink, counting the slices it is handed (to show that a test took the slice path)."""

    slices = 0

    def write_slice(self, plan, start, piece):
        type(self).slices += 1
        super().write_slice(plan, start, piece)


def _live_model(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A module whose parameters and buffers carry `tensors`' names and shapes (zeros; floats in `dtype`)."""
    root = torch.nn.Module()
    for name, t in tensors.items():
        owner, leaf = root, name.split(".")
        for part in leaf[:-1]:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        value = torch.zeros(t.shape, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        if t.is_floating_point():
            owner.register_parameter(leaf[-1], torch.nn.Parameter(value, requires_grad=False))
        else:
            owner.register_buffer(leaf[-1], value)
    return root


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("live_dtype", [None, torch.bfloat16])  # bfloat16: a live model cast by `eval_dtype`
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_in_memory_soup_streams_slices_into_the_live_model(
    tmp_path, monkeypatch, torch_threads, dtype, live_dtype, threads
):
    """A soup written into a live model (greedy candidates, in-memory soups) goes slice by slice into each
    parameter, in the parameter's dtype, and holds the bytes of the whole-tensor path."""
    tensors, sources = _sources(tmp_path, 3)
    plan = _plan(tensors[0], 3, dtype)
    coefficients = [0.25, 0.25, 0.5]
    monkeypatch.setattr(_SlicesCounted, "slices", 0)
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 4096)  # larger than every tensor: all go whole
    whole = _live_model(tensors[0], live_dtype)
    combine(plan, sources, coefficients, _SlicesCounted(whole), progress=False)
    assert _SlicesCounted.slices == 0
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 256)
    torch_threads(threads)
    model = _live_model(tensors[0], live_dtype)
    combine(plan, sources, coefficients, _SlicesCounted(model), progress=False)
    assert _SlicesCounted.slices >= 2 + 4 + 3  # big.f32, big.bf16 and big.f16 went as slices
    got, expected = model.state_dict(), whole.state_dict()
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k
    for k in (
        "big.f32",
        "big.bf16",
        "big.f16",
    ):  # and both are the weighted mean, within the live dtype's rounding
        mean = sum(c * t[k].double() for c, t in zip(coefficients, tensors))
        tol = 1e-5 if got[k].dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[k].double(), mean.to(got[k].dtype).double(), rtol=tol, atol=tol)


def test_two_pass_soup_streams_slices_into_the_live_model(tmp_path, monkeypatch, torch_threads):
    """TIES into a live model: slices written in place on two workers equal the whole-tensor result."""
    from hf_soups import merge_ops
    from hf_soups.core.engine import RecipeMix, combine_mix

    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 256)
    monkeypatch.setattr(_SlicesCounted, "slices", 0)
    tensors, sources = _sources(tmp_path, 4)
    plan = _plan(tensors[0], 4)
    mix = RecipeMix(merge_ops.ties_recipe(density=0.5), ingredients=(0, 1, 2), base=3)
    whole = DictSink()
    combine_mix(plan, sources, mix, whole, progress=False)
    torch_threads(2)
    model = _live_model(tensors[0])
    combine_mix(plan, sources, mix, _SlicesCounted(model), progress=False)
    assert _SlicesCounted.slices >= 9 + 4 + 5  # slices of 256 elements of the three large tensors
    got = model.state_dict()
    for k, v in whole.tensors.items():
        assert torch.equal(got[k], v), k


def test_in_memory_soup_of_a_transformers_model_is_the_same_streamed_or_whole(tiny_bert_dirs, monkeypatch):
    """`merge_models` without `output_dir` (the live-model sink): slices of 256 elements give the weights of
    the whole-tensor path, which are the float64 weighted mean rounded to float32."""
    from tests.testing_common import read_safetensors

    weights = [1.0, 2.0, 5.0]
    whole = merge_models(tiny_bert_dirs, weights=weights, progress=False).model.state_dict()
    monkeypatch.setattr(engine_module, "CHUNK_ELEMENTS", 256)
    monkeypatch.setattr(_SlicesCounted, "slices", 0)
    import hf_soups.kitchen as kitchen_module

    monkeypatch.setattr(kitchen_module, "ModelSink", _SlicesCounted)  # the same sink, its slices counted
    sliced = merge_models(tiny_bert_dirs, weights=weights, progress=False).model.state_dict()
    assert _SlicesCounted.slices > 0
    assert sliced.keys() == whole.keys()
    for k in whole:
        assert torch.equal(sliced[k], whole[k]), k
    states = [read_safetensors(d) for d in tiny_bert_dirs]
    total = sum(weights)
    for k, v in states[0].items():
        if v.is_floating_point() and k in sliced:
            expected = sum(w / total * s[k].double() for w, s in zip(weights, states))
            torch.testing.assert_close(sliced[k].double(), expected, rtol=0, atol=1e-6)
