"""The fused kernels (hf_soups.kernels, numba) and the torch path they replace: the same bits for TIES, DARE-TIES
and DARE-linear; Gram matrices within float64 rounding of each other and each independent of slicing; and both
paths through the streaming engine (the joint threshold pass of TIES included) against the float64 definitions.

Each test runs on both paths: `HF_SOUPS_DISABLE_NUMBA=1` forces the torch path. numba is a dev dependency (the
`dev` extra installs it), so a test environment without it fails here instead of skipping the fused path unseen;
`test_library_runs_without_numba` covers installs without it.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from safetensors.torch import save_file

from hf_soups import kernels
from hf_soups import merge_ops as mo
from hf_soups.core import engine
from hf_soups.core.engine import DictSink, RecipeMix, combine_mix
from hf_soups.core.sources import SafetensorsSource
from tests.test_hot_path import _plan
from tests.testing_common import assert_state_close, family_reference

# the dev extra installs numba: its absence is a broken test environment, not a reason to skip
NUMBA_MISSING = "numba is not importable; install the dev dependencies: pip install -e '.[dev]'"


@pytest.fixture(params=["numba", "torch"])
def path(request, monkeypatch):
    """Which path merge_ops takes: the fused kernels or torch's kernels."""
    if request.param == "numba":
        monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert kernels.available() == (request.param == "numba"), NUMBA_MISSING
    return request.param


def _both(monkeypatch, fn):
    """`fn()` on the torch path, then on the fused path."""
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    torch_result = fn()
    monkeypatch.delenv(kernels.DISABLE_ENV)
    assert kernels.available(), NUMBA_MISSING
    return torch_result, fn()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_give_the_torch_paths_bits(monkeypatch, dtype):
    """Slices at an offset, negative and fractional weights, a scaling, ties at the threshold (entries equal to the
    base), density 1 and a density that keeps nothing: bit for bit the torch path's result (+0.0 and -0.0 apart)."""
    g = torch.Generator().manual_seed(3)
    numel = 5003
    base = torch.randn(numel, generator=g).to(dtype)
    thetas = [(base.float() + 0.01 * (i + 1) * torch.randn(numel, generator=g)).to(dtype) for i in range(3)]
    thetas[0][:500] = base[:500]  # 500 task-vector entries exactly 0: ties at the threshold
    thetas[1][100:200] = base[100:200] + 0.25  # equal magnitudes
    weights = [1.0, -0.5, 1.7]
    for density in (0.3, 1.0, 1e-6):
        thresholds = [mo.magnitude_threshold(mo._task_vector(t, base), density) for t in thetas]
        for offset, count in ((0, numel), (150, 2049)):
            b, ts = base[offset : offset + count], [t[offset : offset + count] for t in thetas]
            common = dict(weights=weights, offset=offset)
            dare = dict(density=density, seed=5, tensor_name="w", **common)
            calls = [
                partial(mo.ties, b, ts, thresholds, scaling=1.3, **common),
                partial(mo.dare_linear, b, ts, scaling=0.9, **dare),
                partial(mo.dare_ties, b, ts, **dare),
            ]
            for call in calls:
                torch_result, fused = _both(monkeypatch, call)
                assert _same_bits(torch_result, fused), (density, offset)


@pytest.mark.parametrize("rows", [2, 5])
def test_gram_is_independent_of_slicing_on_both_paths_and_they_agree(monkeypatch, rows):
    g = torch.Generator().manual_seed(9)
    n = 3 * 4096 + 77
    vectors = [torch.randn(n, generator=g) for _ in range(rows)]

    def gram(sizes):
        acc, start, i = mo.GramAccumulator(rows), 0, 0
        while start < n:
            size = sizes[i % len(sizes)]
            piece = [v[start : start + size] for v in vectors]
            if size % acc.CHUNK == 0 and start % acc.CHUNK == 0 and start + size <= n:
                acc.add_chunk_dots(acc.chunk_dots(piece))  # the engine's way for whole chunks
            else:
                acc.add(piece)
            start, i = start + size, i + 1
        return acc.result()

    slicings = ([n], [4096], [1000, 7, 2048 + 1])
    per_path = {}
    for disabled in ["1", ""]:
        monkeypatch.setenv(kernels.DISABLE_ENV, disabled)
        assert kernels.available() == (not disabled), NUMBA_MISSING
        results = [gram(s) for s in slicings]
        assert all(torch.equal(r, results[0]) for r in results[1:])
        per_path[disabled] = results[0]
    exact = torch.stack([v.double() for v in vectors])
    exact = exact @ exact.T
    for result in per_path.values():
        torch.testing.assert_close(result, exact, rtol=1e-13, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_vector_forms_of_the_scan_and_the_gram_equal_the_task_vectors_own(path, dtype):
    """band_scan(theta, ..., base) and GramAccumulator.chunk_dots(thetas, base) (the kernels form θ − θ₀ themselves
    for float32 inputs) give what they give on the task vectors `merge_ops._task_vector` computes."""
    g = torch.Generator().manual_seed(5)
    n = 4 * 1024 + 512  # whole chunks, and blocks of the scan that end inside one
    base = torch.randn(n, generator=g).to(dtype)
    thetas = [(base.float() + 0.1 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]
    taus = [mo._task_vector(t, base) for t in thetas]
    bits = taus[0].view(torch.int32).bitwise_and(0x7FFFFFFF).sort().values
    lo, hi = int(bits[n // 2 - 200]), int(bits[n // 2 + 200])
    above, start, values, where = mo.band_scan(thetas[0], lo, hi, 7, base)
    expected = mo.band_scan(taus[0], lo, hi, 7)
    assert (
        (above, start) == expected[:2]
        and torch.equal(values, expected[2])
        and torch.equal(where, expected[3])
    )
    m = 4 * 1024
    acc = mo.GramAccumulator(3)
    got = acc.chunk_dots([t[:m] for t in thetas], base[:m])
    assert torch.equal(got, acc.chunk_dots([t[:m] for t in taus]))


def _family(tmp_path):
    """A base and three ingredients with tensors above the joint threshold pass's size (4 x 65,536 elements): one
    float32, one bfloat16, one whose task vectors are tiny exactly where that pass samples them (its band misses:
    the whole-task-vector fallback) and a small one."""
    g = torch.Generator().manual_seed(0)
    base = {
        "w.f32": torch.randn(600, 500, generator=g),
        "w.bf16": torch.randn(280_001, generator=g).to(torch.bfloat16),
        "w.misled": torch.zeros(300_000),
        "small": torch.randn(7, 3, generator=g),
    }
    n = 300_000
    run = engine._sample_run(n)
    sampled = torch.zeros(n, dtype=torch.bool)
    for r in range(engine.SAMPLE_RUNS):
        at = r * (n - run) // (engine.SAMPLE_RUNS - 1)
        sampled[at : at + run] = True
    ingredients = []
    for _ in range(3):
        t = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
        t["w.misled"] = torch.where(sampled, 1e-3, 1.0) * torch.randn(n, generator=g)
        ingredients.append(t)
    paths = []
    for i, t in enumerate([*ingredients, base]):
        save_file(t, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    return base, ingredients, paths


METHODS = {
    "ties": (lambda: mo.ties_recipe(density=0.4, weights=[1.0, 2.0, 0.5], scaling=1.3), {}),
    "dare-ties": (lambda: mo.dare_recipe(density=0.6, seed=7, form="ties", weights=[0.5, 1.0, 2.0]), {}),
    "dare-linear": (lambda: mo.dare_recipe(density=0.6, seed=7, scaling=0.9), {}),
    "model-stock": (mo.model_stock_recipe, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_engine_on_both_paths_equals_the_float64_definition(tmp_path, monkeypatch, path, method):
    """The streaming engine (slices of the default size, two workers, TIES's joint threshold pass and its
    fallback) equals the reference driver on whole tensors bit for bit, and the float64 definition."""
    base, ingredients, paths = _family(tmp_path)
    recipe = METHODS[method][0]()
    sink = DictSink()
    combine_mix(
        _plan(base, 4),
        [SafetensorsSource([p]) for p in paths],
        RecipeMix(recipe, ingredients=(0, 1, 2), base=3),
        sink,
        progress=False,
    )
    for name, value in sink.tensors.items():
        whole = mo.merge_tensor(recipe, name, base[name], [t[name] for t in ingredients]).to(value.dtype)
        assert torch.equal(value, whole), name
    kwargs = {k: v for k, v in recipe.params.items() if v is not None}
    expected = family_reference(method, base, ingredients, **kwargs)
    # float32 tensors (the bfloat16 one is bit for bit the reference driver's, above)
    assert_state_close(
        {k: v for k, v in sink.tensors.items() if v.dtype == torch.float32}, expected, atol=2e-6
    )


def test_without_numba_the_torch_path_runs():
    """numba not importable (sys.modules entry None: `import numba` raises ImportError): no kernels, the same soup."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from hf_soups import kernels, merge_ops as mo\n"
        "assert not kernels.available()\n"
        "base = torch.zeros(6); thetas = [torch.tensor([1., -2., 3., 0., 5., -6.]), torch.ones(6)]\n"
        "thr = [mo.magnitude_threshold(t, 0.5) for t in thetas]\n"
        "print(mo.ties(base, thetas, thr).tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # kept: |tau| top 3 of each (-6, 5, 3 and the first three ones); elected signs from their sums
    assert done.stdout.strip() == "[1.0, 1.0, 2.0, 0.0, 5.0, -6.0]"
