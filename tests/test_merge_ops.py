"""The model-free merge math of `hf_soups.merge_ops`, against independent float64 computations and PEFT.

The references below are written from the papers' definitions (float64, whole tensors, sorting instead of
selection); they never call `merge_ops`' helpers. Test data is built so that `theta - base` is exact in
float32 and magnitudes are distinct unless a test is about ties, so that float32 and float64 trim alike.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from hf_soups import merge_ops as mo
from hf_soups.errors import InvalidArgumentError
from tests.testing_common import _dare_keep

SHAPE = (37, 61)  # 2257 elements: not a multiple of the slice sizes, more than one summation group


def make_data(n: int, shape=SHAPE, seed: int = 0):
    """base and n thetas in float32 such that theta - base is exact and the |tau| are all distinct."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    base = torch.randint(-(1 << 12), 1 << 12, shape, generator=g).to(torch.float32) / 1024
    thetas = []
    for _ in range(n):
        mags = (torch.randperm(numel, generator=g) + 1).to(torch.float32) / 4096  # distinct, < 1
        signs = torch.randint(0, 2, (numel,), generator=g).to(torch.float32) * 2 - 1
        thetas.append(base + (mags * signs).view(shape))
    return base, thetas


def taus64(base, thetas):
    return [t.double() - base.double() for t in thetas]


def ref_keep(tau: torch.Tensor, density: float) -> torch.Tensor:
    """The int(density * numel) largest |tau|, ties broken by the lowest flat index (stable sort)."""
    flat = tau.reshape(-1).double().abs()
    k = int(density * flat.numel())
    order = torch.argsort(-flat, stable=True)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(tau.shape)


def ref_elect_merge(sparse: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES steps 2-3 in float64: sign by summed unweighted mass (>= 0 -> +), mean of agreeing weighted entries."""
    mass = sum(sparse)
    elected = torch.where(mass >= 0, 1.0, -1.0).double()
    num = sum(w * s * (torch.sign(s) == elected) for s, w in zip(sparse, weights))
    cnt = sum((torch.sign(s) == elected).double() for s in sparse)
    return num / torch.clamp(cnt, min=1.0)


def close(actual: torch.Tensor, expected: torch.Tensor, atol=1e-6, rtol=1e-6) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# task arithmetic


def test_task_arithmetic_matches_float64_definition():
    base, thetas = make_data(3)
    weights, lam = [0.5, 1.5, -0.25], 0.7
    expected = base.double() + lam * sum(w * t for w, t in zip(weights, taus64(base, thetas)))
    close(mo.task_arithmetic(base, thetas, weights=weights, scaling=lam), expected)
    # default weights are 1 each, not normalised
    close(mo.task_arithmetic(base, thetas), base.double() + sum(taus64(base, thetas)))


def test_task_arithmetic_widens_bfloat16_before_subtracting():
    base, thetas = make_data(2)
    b16, t16 = base.bfloat16(), [t.bfloat16() for t in thetas]
    expected = b16.double() + 0.5 * sum(t.double() - b16.double() for t in t16)
    close(mo.task_arithmetic(b16, t16, scaling=0.5), expected)


# --------------------------------------------------------------------------------------------------
# magnitude trimming


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.2, 0.5, 0.9, 0.9999, 1.0])
def test_magnitude_threshold_keeps_exactly_the_k_largest(density):
    _, [tau] = make_data(1, seed=3)
    tau = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    threshold = mo.magnitude_threshold(tau, density)
    k = int(density * tau.numel())
    assert threshold.k == k
    if k:
        assert threshold.value == float(torch.sort(tau.abs().reshape(-1), descending=True).values[k - 1])
    assert torch.equal(mo.magnitude_mask(tau, threshold), ref_keep(tau, density))


def test_magnitude_ties_at_the_threshold_keep_the_lowest_indices_and_exactly_k():
    # many equal magnitudes (as in bf16 checkpoints): 0, +-1, +-2 only
    g = torch.Generator().manual_seed(0)
    tau = (torch.randint(-2, 3, (5000,), generator=g)).to(torch.float32)
    for density in (0.1, 0.33, 0.5, 0.77, 1.0):
        threshold = mo.magnitude_threshold(tau, density)
        mask = mo.magnitude_mask(tau, threshold)
        assert int(mask.sum()) == int(density * 5000)
        assert torch.equal(mask, ref_keep(tau, density))
        # the same mask slice by slice
        pieces = [mo.magnitude_mask(tau[s : s + 333], threshold, offset=s) for s in range(0, 5000, 333)]
        assert torch.equal(torch.cat(pieces), mask)


@pytest.mark.parametrize("kind", ["normal", "ties", "strided"])
def test_magnitude_threshold_on_large_tensors_is_exact(kind):
    """Tensors large enough for the sampled band (and one whose strided sample is misleading: the radix fallback)."""
    n = 4 * (1 << 16) * 3 + 12345
    g = torch.Generator().manual_seed(11)
    if kind == "normal":
        tau = torch.randn(n, generator=g)
    elif kind == "ties":  # a handful of magnitudes, as in low-precision checkpoints
        tau = torch.randint(-3, 4, (n,), generator=g).to(torch.float32)
    else:  # every sampled entry is tiny, the rest large: the sample's estimate is far off
        tau = torch.randn(n, generator=g) + 10.0
        tau[:: n // (1 << 16)] = 1e-3
    from hf_soups.core.engine import _SliceRunner

    for density in (0.01, 0.3, 0.77):
        threshold = mo.magnitude_threshold(tau, density)
        with _SliceRunner(2) as runner:  # the engine's scan of the blocks on two threads: the same threshold
            assert mo.magnitude_threshold(tau, density, map_blocks=runner.map) == threshold
        expected = ref_keep(tau, density)
        assert torch.equal(mo.magnitude_mask(tau, threshold), expected)
        # the integer-mask trim of the two-pass path keeps the same entries, slice by slice
        pieces = [mo._trim_(tau[s : s + 100003].clone(), threshold, s) for s in range(0, n, 100003)]
        assert torch.equal(torch.cat(pieces), torch.where(expected, tau, 0.0))


def test_magnitude_small_tensor_keeps_nothing_below_one_element():
    tau = torch.tensor([3.0, -1.0, 2.0])
    threshold = mo.magnitude_threshold(tau, 0.3)  # int(0.9) == 0, as PEFT's topk(k=0)
    assert threshold.k == 0
    assert not mo.magnitude_mask(tau, threshold).any()


def test_magnitude_prune_matches_peft():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    _, thetas = make_data(1)
    tau = thetas[0] - make_data(1)[0]
    for density in (0.01, 0.3, 0.8):
        assert torch.equal(
            mo.magnitude_prune(tau, density), merge_utils.magnitude_based_pruning(tau, density)
        )
    tiny = torch.tensor([[0.5, -3.0], [2.0, 0.1]])
    assert torch.equal(mo.magnitude_prune(tiny, 0.2), merge_utils.magnitude_based_pruning(tiny, 0.2))  # k = 0


def test_weighted_magnitude_prune_sum_matches_peft_magnitude_prune():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    base, thetas = make_data(3)
    taus = [t - base for t in thetas]
    weights = [0.2, 1.0, 0.7]
    ours = sum(w * mo.magnitude_prune(t, 0.4) for w, t in zip(weights, taus))
    close(ours, merge_utils.magnitude_prune(taus, torch.tensor(weights), 0.4))


# --------------------------------------------------------------------------------------------------
# TIES


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_ties_matches_float64_definition(density):
    base, thetas = make_data(4, seed=5)
    weights, lam = [1.0, 0.5, 2.0, 0.75], 0.8
    trimmed = [t * ref_keep(t, density) for t in taus64(base, thetas)]
    expected = base.double() + lam * ref_elect_merge(trimmed, weights)
    thresholds = [mo.magnitude_threshold(t - base, density) for t in thetas]
    close(mo.ties(base, thetas, thresholds, weights=weights, scaling=lam), expected)


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_ties_matches_peft_ties(density):
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    base, thetas = make_data(3, seed=7)
    weights, lam = [0.3, 1.2, 0.9], 1.5
    recipe = mo.ties_recipe(density=density, weights=weights, scaling=lam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density=1 prunes nothing
        peft = merge_utils.ties([t - base for t in thetas], torch.tensor(weights), density)
    close(mo.merge_tensor(recipe, "w", base, thetas), base + lam * peft)


def test_ties_with_nothing_kept_returns_the_base():
    base, thetas = make_data(2, shape=(3,))
    out = mo.merge_tensor(mo.ties_recipe(density=0.2), "w", base, thetas)  # int(0.6) == 0 entries kept
    assert torch.equal(out, base)


# --------------------------------------------------------------------------------------------------
# DARE


def test_dare_mask_is_the_documented_counter_based_hash():
    # 75 indices across the 2**32 boundary (two segment keys; a length that is not a multiple of the SIMD width)
    indices = (
        list(range(0, 300))
        + list(range(10**9, 10**9 + 50))
        + [2**40 + 7]
        + list(range(2**32 - 37, 2**32 + 38))
    )
    for density in (0.1, 0.5, 0.9):
        expected = _dare_keep(12345, 2, "encoder.layer.0.weight", density, indices)
        got = torch.cat(
            [
                mo.dare_mask(
                    300, density=density, seed=12345, ingredient_index=2, tensor_name="encoder.layer.0.weight"
                ),
                mo.dare_mask(
                    50,
                    density=density,
                    seed=12345,
                    ingredient_index=2,
                    tensor_name="encoder.layer.0.weight",
                    offset=10**9,
                ),
                mo.dare_mask(
                    1,
                    density=density,
                    seed=12345,
                    ingredient_index=2,
                    tensor_name="encoder.layer.0.weight",
                    offset=2**40 + 7,
                ),
                mo.dare_mask(
                    75,
                    density=density,
                    seed=12345,
                    ingredient_index=2,
                    tensor_name="encoder.layer.0.weight",
                    offset=2**32 - 37,
                ),
            ]
        )
        assert torch.equal(got, expected)


def test_dare_mask_is_independent_of_slicing():
    kwargs = dict(density=0.37, seed=7, ingredient_index=1, tensor_name="lm_head.weight")
    whole = mo.dare_mask((300, 1000), **kwargs).reshape(-1)
    for size in (7, 1000, (1 << 17) + 3):
        pieces = [
            mo.dare_mask(min(size, whole.numel() - s), offset=s, **kwargs)
            for s in range(0, whole.numel(), size)
        ]
        assert torch.equal(torch.cat(pieces), whole)
    # read in reverse order: the same
    rev = [
        mo.dare_mask(min(1000, whole.numel() - s), offset=s, **kwargs)
        for s in reversed(range(0, whole.numel(), 1000))
    ]
    assert torch.equal(torch.cat(rev[::-1]), whole)


def test_dare_drop_rate_and_independence():
    n, density = 1_000_000, 0.3
    m0 = mo.dare_mask(n, density=density, seed=0, ingredient_index=0, tensor_name="w")
    m1 = mo.dare_mask(n, density=density, seed=0, ingredient_index=1, tensor_name="w")
    m2 = mo.dare_mask(n, density=density, seed=1, ingredient_index=0, tensor_name="w")
    m3 = mo.dare_mask(n, density=density, seed=0, ingredient_index=0, tensor_name="v")
    sigma = math.sqrt(density * (1 - density) / n)
    for m in (m0, m1, m2, m3):
        assert abs(float(m.double().mean()) - density) < 6 * sigma  # drop rate 1 - density
    for other in (m1, m2, m3):  # independent streams: overlap ~ density**2
        assert abs(float((m0 & other).double().mean()) - density**2) < 6 * math.sqrt(density**2 / n)
    assert mo.dare_mask(1000, density=1.0, seed=0, ingredient_index=0, tensor_name="w").all()


def _masks(base, thetas, density, seed, name):
    return [
        mo.dare_mask(base.shape, density=density, seed=seed, ingredient_index=i, tensor_name=name)
        for i in range(len(thetas))
    ]


def test_dare_linear_and_ties_match_float64_definition_given_the_mask():
    base, thetas = make_data(3, seed=11)
    weights, lam, density, seed = [0.5, 1.0, 1.5], 0.9, 0.4, 99
    masks = _masks(base, thetas, density, seed, "w")
    dropped = [t * m / density for t, m in zip(taus64(base, thetas), masks)]
    close(
        mo.dare_linear(
            base, thetas, density=density, seed=seed, tensor_name="w", weights=weights, scaling=lam
        ),
        base.double() + lam * sum(w * d for w, d in zip(weights, dropped)),
    )
    close(
        mo.dare_ties(base, thetas, density=density, seed=seed, tensor_name="w", weights=weights, scaling=lam),
        base.double() + lam * ref_elect_merge(dropped, weights),
    )


@pytest.mark.parametrize("form", ["linear", "ties"])
def test_dare_matches_peft_given_the_same_mask(form, monkeypatch):
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    base, thetas = make_data(3, seed=13)
    weights, lam, density, seed = [0.7, 1.1, 0.4], 1.3, 0.25, 5
    masks = iter(_masks(base, thetas, density, seed, "blocks.3.attn.weight"))
    # PEFT draws its mask with torch.bernoulli, once per task tensor in order: hand it ours
    monkeypatch.setattr(torch, "bernoulli", lambda p: next(masks).to(p.dtype))
    peft_fn = merge_utils.dare_linear if form == "linear" else merge_utils.dare_ties
    peft = peft_fn([t - base for t in thetas], torch.tensor(weights), density)
    monkeypatch.undo()
    recipe = mo.dare_recipe(density=density, seed=seed, form=form, weights=weights, scaling=lam)
    close(mo.merge_tensor(recipe, "blocks.3.attn.weight", base, thetas), base + lam * peft)


# --------------------------------------------------------------------------------------------------
# SLERP


def ref_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a, b = a.double(), b.double()
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def test_slerp_endpoints_are_exact():
    _, (a, b) = make_data(2)
    assert torch.equal(mo.slerp(a, b, 0.0), a)
    assert torch.equal(mo.slerp(a, b, 1.0), b)


def test_slerp_matches_float64_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for t in (0.1, 0.5, 0.83):
        close(mo.slerp(a, b, t), ref_slerp(a, b, t), atol=1e-5, rtol=1e-5)


def test_slerp_of_orthogonal_tensors_is_the_closed_form():
    a = torch.zeros(4, 4)
    b = torch.zeros(4, 4)
    a[0, :] = torch.tensor([3.0, 0.0, 4.0, 0.0])
    b[1, :] = torch.tensor([0.0, 5.0, 0.0, 0.0])  # orthogonal, same norm 5
    for t in (0.25, 0.5, 0.9):
        out = mo.slerp(a, b, t)
        expected = math.cos(t * math.pi / 2) * a.double() + math.sin(t * math.pi / 2) * b.double()
        close(out, expected)
        assert abs(float(out.double().norm()) - 5.0) < 1e-5  # stays on the sphere


def test_slerp_falls_back_to_linear_when_nearly_parallel():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, generator=g)
    b = 2.0 * a + 0.01 * torch.randn(1000, generator=g)  # cos ~ 0.99999 > 0.9995
    t = 0.3
    expected = (1 - t) * a.double() + t * b.double()
    close(mo.slerp(a, b, t), expected)
    # just below the threshold the spherical formula is used
    c = a + 0.05 * a.norm() * torch.nn.functional.normalize(torch.randn(1000, generator=g), dim=0)
    cos = float((a.double() @ c.double()) / (a.double().norm() * c.double().norm()))
    assert cos < mo.SLERP_PARALLEL_THRESHOLD
    close(mo.slerp(a, c, t), ref_slerp(a, c, t), atol=1e-5, rtol=1e-5)
    # an all-zero tensor: linear
    close(mo.slerp(torch.zeros(5), torch.ones(5), 0.25), torch.full((5,), 0.25, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# Model Stock


def test_model_stock_ratio_closed_form():
    for phi in (0.2, 0.7, 1.3):
        taus = torch.tensor(
            [[2.0, 0.0, 0.0], [3 * math.cos(phi), 3 * math.sin(phi), 0.0]], dtype=torch.float64
        )
        t, cos = mo.model_stock_ratio(taus @ taus.T)
        assert cos == pytest.approx(math.cos(phi), abs=1e-12)
        assert t == pytest.approx(2 * math.cos(phi) / (1 + math.cos(phi)), abs=1e-12)
    # N = 3 with every pairwise cosine equal to c: tau_i = sqrt(c) u + sqrt(1 - c) e_i
    c = 0.3
    u, e = torch.eye(4, dtype=torch.float64)[0], torch.eye(4, dtype=torch.float64)[1:]
    taus = torch.stack([math.sqrt(c) * u + math.sqrt(1 - c) * e[i] for i in range(3)])
    t, cos = mo.model_stock_ratio(taus @ taus.T)
    assert cos == pytest.approx(c, abs=1e-12)
    assert t == pytest.approx(3 * c / (1 + 2 * c), abs=1e-12)


def test_model_stock_matches_float64_definition():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(SHAPE, generator=g)
    common = torch.randn(SHAPE, generator=g)
    thetas = [base + common + 0.8 * torch.randn(SHAPE, generator=g) for _ in range(3)]
    taus = [th.double() - base.double() for th in thetas]
    cosines = [
        float((taus[i] * taus[j]).sum() / (taus[i].norm() * taus[j].norm()))
        for i in range(3)
        for j in range(i + 1, 3)
    ]
    cos = sum(cosines) / 3
    assert 0.2 < cos < 0.9
    t = 3 * cos / (1 + 2 * cos)
    expected = t * sum(th.double() for th in thetas) / 3 + (1 - t) * base.double()
    close(mo.model_stock(base, thetas), expected, atol=1e-5, rtol=1e-5)


def test_model_stock_stays_at_the_base_for_opposed_or_zero_task_vectors():
    base = torch.arange(6, dtype=torch.float32)
    d = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    t, cos = mo.model_stock_ratio(mo.GramAccumulator(2).result())  # all zero: cos 0
    assert (t, cos) == (0.0, 0.0)
    assert torch.equal(mo.model_stock(base, [base + d, base - d]), base)  # cos = -1 is clamped to 0: t = 0
    # one ingredient did not change this tensor: its pairs count as cosine 0
    t, cos = mo.model_stock_ratio(torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, 4.0], [0.0, 4.0, 4.0]]))
    assert cos == pytest.approx(1 / 3) and t == pytest.approx(1 / (1 + 2 / 3))


# --------------------------------------------------------------------------------------------------
# the two-pass protocol


RECIPES = {
    "task-arithmetic": (lambda: mo.task_arithmetic_recipe(weights=[0.5, 1.0, 0.25], scaling=0.9), 3),
    "ties": (lambda: mo.ties_recipe(density=0.3, weights=[1.0, 0.6, 0.9], scaling=1.1), 3),
    "dare-linear": (lambda: mo.dare_recipe(density=0.5, seed=3, weights=[1.0, 0.5, 2.0]), 3),
    "dare-ties": (lambda: mo.dare_recipe(density=0.5, seed=3, form="ties", scaling=0.7), 3),
    "slerp": (lambda: mo.slerp_recipe(t=0.35), 2),
    "model-stock": (lambda: mo.model_stock_recipe(), 3),
}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_every_method_is_bit_identical_whatever_the_slicing(method):
    make, n = RECIPES[method]
    recipe = make()
    g = torch.Generator().manual_seed(4)
    base = torch.randn(SHAPE, generator=g)
    thetas = [base + 0.3 * torch.randn(SHAPE, generator=g) for _ in range(n)]
    whole = mo.merge_tensor(recipe, "layer.weight", base, thetas)
    assert whole.shape == SHAPE and whole.dtype == torch.float32
    for size in (7, 1000):
        assert torch.equal(mo.merge_tensor(recipe, "layer.weight", base, thetas, slice_elements=size), whole)


def test_driver_equals_the_whole_tensor_functions():
    base, thetas = make_data(3, seed=21)
    assert torch.equal(
        mo.merge_tensor(mo.model_stock_recipe(), "w", base, thetas, slice_elements=100),
        mo.model_stock(base, thetas),
    )
    assert torch.equal(
        mo.merge_tensor(mo.slerp_recipe(t=0.4), "w", None, thetas[:2], slice_elements=100),
        mo.slerp(thetas[0], thetas[1], 0.4),
    )
    assert torch.equal(
        mo.merge_tensor(
            mo.dare_recipe(density=0.6, seed=1, form="ties"), "w", base, thetas, slice_elements=100
        ),
        mo.dare_ties(base, thetas, density=0.6, seed=1, tensor_name="w"),
    )


def test_gram_is_bit_identical_across_slicings_and_accurate():
    g = torch.Generator().manual_seed(5)
    n = (1 << 21) + 12345  # three levels of the summation tree
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    results = []
    for sizes in ([n], [1 << 17], [1000, 7, (1 << 20) + 1, 333333]):
        acc, start, i = mo.GramAccumulator(2), 0, 0
        while start < n:
            size = sizes[i % len(sizes)]
            acc.add([a[start : start + size], b[start : start + size]])
            start, i = start + size, i + 1
        results.append(acc.result())
    assert all(torch.equal(r, results[0]) for r in results[1:])
    # against the correctly rounded sums (math.fsum of the exact float64 products): pairwise-summation accuracy
    for (i, x), (j, y) in [((0, a), (0, a)), ((0, a), (1, b)), ((1, b), (1, b))]:
        products = (x.double() * y.double()).tolist()
        exact = math.fsum(products)
        assert abs(float(results[0][i, j]) - exact) <= 1e-14 * math.fsum(abs(p) for p in products)


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_density_outside_unit_interval_is_refused(density):
    base, thetas = make_data(2, shape=(4,))
    with pytest.raises(InvalidArgumentError, match="density"):
        mo.ties_recipe(density=density)
    with pytest.raises(InvalidArgumentError, match="density"):
        mo.dare_linear(base, thetas, density=density, seed=0, tensor_name="w")
    with pytest.raises(InvalidArgumentError, match="density"):
        mo.magnitude_threshold(thetas[0], density)


def test_slerp_needs_exactly_two_ingredients():
    base, thetas = make_data(3, shape=(4,))
    recipe = mo.slerp_recipe(t=0.5)
    with pytest.raises(InvalidArgumentError, match="exactly 2 ingredients"):
        recipe.check_ingredients(3, has_base=False)
    with pytest.raises(InvalidArgumentError, match="exactly 2 ingredients"):
        mo.merge_tensor(recipe, "w", None, thetas)
    with pytest.raises(InvalidArgumentError, match="exactly 2 ingredients"):
        recipe.combine(None, thetas, mo.TensorStats("w", 4), 0)
    with pytest.raises(InvalidArgumentError, match="t="):
        mo.slerp_recipe(t=1.2)


def test_mismatched_shapes_and_counts_are_refused():
    base, thetas = make_data(2, shape=(4, 3))
    with pytest.raises(InvalidArgumentError, match=r"thetas\[1\] has shape \(3, 4\)"):
        mo.task_arithmetic(base, [thetas[0], thetas[1].T])
    with pytest.raises(InvalidArgumentError, match="weights has 3 values for 2 ingredients"):
        mo.task_arithmetic(base, thetas, weights=[1.0, 1.0, 1.0])
    with pytest.raises(InvalidArgumentError, match="thetas is empty"):
        mo.task_arithmetic(base, [])
    with pytest.raises(InvalidArgumentError, match="scaling"):
        mo.task_arithmetic(base, thetas, scaling=float("nan"))
    with pytest.raises(InvalidArgumentError, match="base"):
        mo.merge_tensor(mo.model_stock_recipe(), "w", None, thetas)
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        mo.merge_tensor(mo.model_stock_recipe(), "w", base, thetas[:1])
    with pytest.raises(InvalidArgumentError, match="seed"):
        mo.dare_recipe(density=0.5, seed=None)
    with pytest.raises(InvalidArgumentError, match="seed"):
        mo.dare_recipe(density=0.5, seed=-1)


def test_docstring_examples_run():
    import doctest

    assert doctest.testmod(mo).failed == 0
