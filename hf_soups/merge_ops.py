"""Model-free merge math: task arithmetic, TIES, DARE, SLERP and Model Stock, one tensor name at a time.

Small tensor-in / tensor-out functions in the spirit of `peft.utils.merge_utils`, written so that the
streaming engine can drive every method with one loop over slices:

- a method is a [`TensorRecipe`]: the per-tensor statistics it needs (`needs`), gathered in a first pass,
  and an element-wise `combine(base, thetas, stats, offset)` applied to each flat slice in a second pass;
- the statistics are exact functions of the whole tensor, never of how it was sliced: magnitude thresholds
  by an exact radix selection, Gram matrices (dot products and squared norms) by a fixed pairwise summation
  tree, and DARE's random mask is a counter-based hash of `(seed, ingredient index, tensor name, flat
  element index)`. A soup is therefore bit-for-bit the same whatever the slice size, thread count or order
  of reading ([`merge_tensor`] is the reference driver that proves it in the tests).

With base θ₀, ingredients θᵢ and task vectors τᵢ = θᵢ − θ₀ of one tensor:

| function | result |
| --- | --- |
| [`task_arithmetic`] | θ₀ + λ Σ wᵢ τᵢ |
| [`ties`] | θ₀ + λ · disjoint_mean(trim(τᵢ)) (sign elected on the unweighted trimmed τᵢ) |
| [`dare_linear`] | θ₀ + λ Σ wᵢ drop(τᵢ) |
| [`dare_ties`] | θ₀ + λ · disjoint_mean(drop(τᵢ)) |
| [`slerp`] | spherical interpolation of θ_a and θ_b (linear when nearly parallel) |
| [`model_stock`] | t · mean(θᵢ) + (1 − t) · θ₀ with t = N·cos / (1 + (N − 1)·cos) |

Everything is computed in float32 (reductions in float64) and returned in float32: the caller casts to the
output dtype. The conventions (ties at the magnitude threshold, zero-norm tensors, negative cosines) are
documented in `docs/methods.md`.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# |cos| above which SLERP falls back to linear interpolation (the value mergekit uses): the two tensors
# are then within ~1.8 degrees of each other (or of opposite directions) and sin(angle) is too small to
# divide by safely. Linear interpolation differs from the spherical one there by about 1e-4 relative at
# most (1 - cos(angle / 2) ~ 1.3e-4 at t = 0.5).
SLERP_PARALLEL_THRESHOLD = 0.9995

# Fan-in of the pairwise summation tree used for every float64 reduction (dot products, norms).
_TREE_FAN_IN = 1024
# Sample size of the magnitude selection's first guess (TIES): tensors of more than 4x this many elements are
# trimmed from a band around the sample's estimate of the threshold, found in one pass.
_SAMPLE = 1 << 16
# Elements processed at once by the whole-tensor loops (magnitude selection, DARE mask): bounds their
# temporaries to a few MB whatever the tensor size.
_BLOCK = 1 << 17

# splitmix64 constants (Steele, Lea & Flood 2014): the per-segment keys of DARE's random stream.
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# lowbias32 multipliers (C. Wellons, "Hash function prospector", 2018) as signed int32: DARE's per-element hash.
_LB_MUL1 = 0x7FEB352D
_LB_MUL2 = 0x846CA68B - (1 << 32)


# --------------------------------------------------------------------------------------------------
# argument checks


def check_density(density: Any, *, argument: str = "density") -> float:
    """Validate a keep fraction: a finite number in (0, 1].

    Args:
        density (`float`):
            The fraction of each task vector to keep (TIES) or the keep probability (DARE).
        argument (`str`, *optional*, defaults to `"density"`):
            The name shown in the error.

    Returns:
        `float`: `density` as a float.

    Raises:
        [`InvalidArgumentError`]: if `density` is not a number in (0, 1].
    """
    value = _number(density, argument)
    if not 0.0 < value <= 1.0:
        raise InvalidArgumentError(
            f"{argument}={density!r} is outside (0, 1]: it is the fraction of each task vector kept "
            "(1 keeps everything). Pass a value such as 0.5."
        )
    return value


def check_t(t: Any) -> float:
    """Validate SLERP's interpolation parameter `t`: a finite number in [0, 1] (0 gives the first ingredient)."""
    value = _number(t, "t")
    if not 0.0 <= value <= 1.0:
        raise InvalidArgumentError(f"t={t!r} is outside [0, 1] (0 gives the first ingredient, 1 the second).")
    return value


def check_seed(seed: Any) -> int:
    """Validate DARE's `seed`: an integer in [0, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(
            f"seed={seed!r} is not an integer; DARE's random drop is reproducible only from an integer seed "
            "such as seed=0."
        )
    if not 0 <= seed < 1 << 64:
        raise InvalidArgumentError(f"seed={seed} is outside [0, 2**64).")
    return seed


def _number(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{argument}={value!r} is not a number.")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidArgumentError(f"{argument}={value!r} is not finite.")
    return out


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-ingredient weights as floats (default: 1.0 each), not normalised."""
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise InvalidArgumentError(f"weights={weights!r} is not a list of numbers (one per ingredient).")
    if len(weights) != n:
        raise InvalidArgumentError(
            f"weights has {len(weights)} values for {n} ingredients; give one per ingredient."
        )
    return [_number(w, f"weights[{i}]") for i, w in enumerate(weights)]


def _check_inputs(
    base: torch.Tensor | None, thetas: Sequence[torch.Tensor], *, needs_base: bool = True
) -> None:
    if isinstance(thetas, (str, bytes)) or not isinstance(thetas, Sequence) or len(thetas) == 0:
        raise InvalidArgumentError("thetas is empty: give at least one ingredient tensor.")
    if needs_base and base is None:
        raise InvalidArgumentError("base is None: this method combines task vectors theta_i - base.")
    shape = tuple(base.shape) if base is not None else tuple(thetas[0].shape)
    what = "base" if base is not None else "thetas[0]"
    for i, theta in enumerate(thetas):
        if tuple(theta.shape) != shape:
            raise InvalidArgumentError(
                f"thetas[{i}] has shape {tuple(theta.shape)} but {what} has shape {shape}: every ingredient "
                "slice must have the same shape."
            )


def _f32(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _task_vector(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """θ − θ₀ in float32 (one new tensor; bf16/fp16 inputs are widened before subtracting)."""
    import torch

    out = theta.to(torch.float32, copy=True)
    out.sub_(base)
    return out


# --------------------------------------------------------------------------------------------------
# task arithmetic


def task_arithmetic(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): `base + scaling * sum_i weights[i] * (thetas[i] - base)`.

    Element-wise: works on whole tensors or on matching slices of them.

    Args:
        base (`torch.Tensor`):
            The pre-trained tensor θ₀ (or a slice of it).
        thetas (`Sequence[torch.Tensor]`):
            The fine-tuned tensors θᵢ, same shape as `base`.
        weights (`Sequence[float]`, *optional*):
            One weight per ingredient, used as given (not normalised). Defaults to 1.0 each.
        scaling (`float`, *optional*, defaults to `1.0`):
            λ, applied to the weighted sum of task vectors.

    Returns:
        `torch.Tensor`: the merged tensor in float32.

    Raises:
        [`InvalidArgumentError`]: mismatched shapes, wrong number of weights, non-finite weights or scaling.

    Example:

    ```python
    >>> import torch
    >>> from hf_soups.merge_ops import task_arithmetic
    >>> task_arithmetic(torch.zeros(2), [torch.ones(2), 3 * torch.ones(2)], scaling=0.5)
    tensor([2., 2.])

    ```
    """
    _check_inputs(base, thetas)
    ws = _weights(weights, len(thetas))
    lam = _number(scaling, "scaling")
    acc = _weighted_task_sum(base, thetas, ws)
    return _apply(base, acc, lam)


def _weighted_task_sum(base, thetas, ws) -> torch.Tensor:
    import torch

    acc = torch.zeros(base.shape, dtype=torch.float32)
    for theta, w in zip(thetas, ws):
        tau = _task_vector(theta, base)
        if w != 1.0:
            tau.mul_(w)
        acc.add_(tau)
    return acc


def _apply(base: torch.Tensor, delta: torch.Tensor, scaling: float) -> torch.Tensor:
    """`base + scaling * delta` in float32 (delta is overwritten); a separate multiply and add, never a fused
    one, so that the vectorised body and the scalar tail of torch's kernels round alike."""
    if scaling != 1.0:
        delta.mul_(scaling)
    return delta.add_(_f32(base))


# --------------------------------------------------------------------------------------------------
# magnitude trimming (TIES)


@dataclass(frozen=True)
class MagnitudeThreshold:
    """Which entries of one task vector TIES keeps: exactly its `k` largest magnitudes.

    Entry `j` (flat, row-major index) is kept when `|τ_j| > value`, or when `|τ_j| == value` and
    `j <= last_tie_index`: among entries tied at the threshold, the lowest flat indices are kept, so that
    exactly `k` entries survive whatever the slicing.

    Attributes:
        k (`int`): `int(density * numel)`, the number of entries kept.
        value (`float`): the k-th largest magnitude (`inf` when `k == 0`: nothing is kept).
        last_tie_index (`int`): flat index of the last kept entry whose magnitude equals `value` (-1: none).
    """

    k: int
    value: float
    last_tie_index: int


def magnitude_threshold(
    task_vector: torch.Tensor, density: float, *, map_blocks: Callable[..., Any] | None = None
) -> MagnitudeThreshold:
    """The [`MagnitudeThreshold`] keeping the `int(density * numel)` largest magnitudes of a whole task vector.

    This is the first pass of TIES for one ingredient, and it is exact. For tensors of more than 262,144 elements
    an evenly strided sample of 65,536 magnitudes brackets the threshold, and one pass counts the entries above
    the bracket and collects the few inside it (with their flat indices), where the k-th largest and the kept
    ties are found ([`_threshold_from_band`]). When the sample misleads (a band that misses the threshold) and
    for small tensors, a radix selection on the float32 bit patterns (non-negative floats sort like their bits)
    does it: two counting passes of 32768 and 65536 bins over blocks of the tensor, plus one pass to place the
    ties. Unlike `torch.kthvalue` on the whole tensor (which copies it and allocates int64 indices: 12 bytes per
    element) neither needs memory beyond the task vector itself and a few MB, so the peak of TIES's first
    pass is one float32 copy of the largest tensor (the task vector of one ingredient at a time), whatever N.

    Args:
        task_vector (`torch.Tensor`):
            The whole τᵢ = θᵢ − θ₀ of one tensor (any shape, float32 or narrower).
        density (`float`):
            Fraction kept, in (0, 1]; `k = int(density * numel)` as in PEFT's `magnitude_based_pruning`
            (so a tensor with `density * numel < 1` keeps nothing).
        map_blocks (`Callable`, *optional*):
            `map_blocks(fn, starts)` yields `fn(start, slot)` for every block start, in order: how the one-pass
            scan of large tensors is run (e.g. on several threads, as the engine does). Default: in this thread.

    Returns:
        [`MagnitudeThreshold`]

    Raises:
        [`InvalidArgumentError`]: if `density` is outside (0, 1].
    """
    import torch

    density = check_density(density)
    flat = task_vector.detach().reshape(-1)
    numel = flat.numel()
    k = int(density * numel)
    if k == 0:
        return MagnitudeThreshold(k=0, value=math.inf, last_tie_index=-1)

    def blocks():
        for start in range(0, numel, _BLOCK):
            yield start, _magnitude_bits(flat[start : start + _BLOCK])

    if numel > 4 * _SAMPLE:
        found = _threshold_from_band(flat, numel, k, map_blocks)
        if found is not None:
            return found

    # pass 1: histogram of the high 16 bits (sign bit is 0: values 0..32767)
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    for _, bits in blocks():
        hist += torch.bincount(bits >> 16, minlength=1 << 15)
    high, above = _select_bin(hist, k)
    # pass 2: among entries with that high half, histogram of the low 16 bits
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for _, bits in blocks():
        low = bits[(bits >> 16) == high] & 0xFFFF
        if low.numel():
            hist += torch.bincount(low, minlength=1 << 16)
    low, above_low = _select_bin(hist, k - above)
    pattern = (high << 16) | low
    value = float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32))
    ties_needed = k - above - above_low  # >= 1: the kept entries equal to `value`
    # pass 3: the flat index of the ties_needed-th entry equal to `value`
    seen = 0
    for start, bits in blocks():
        eq = bits == pattern
        count = int(eq.sum())
        if seen + count >= ties_needed:
            index = start + int(eq.nonzero()[ties_needed - seen - 1])
            return MagnitudeThreshold(k=k, value=value, last_tie_index=index)
        seen += count
    raise AssertionError("unreachable: the selected value occurs in the tensor")  # pragma: no cover


def _magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of `|values|` as int32 (non-negative floats order like their bits)."""
    import torch

    return _f32(values).view(torch.int32).bitwise_and(0x7FFFFFFF)


def _threshold_from_band(
    flat: torch.Tensor, numel: int, k: int, map_blocks: Callable[..., Any] | None
) -> MagnitudeThreshold | None:
    """The exact [`MagnitudeThreshold`] in one pass, when an evenly strided sample brackets it well enough.

    The sample's order statistics give a band of magnitudes [lo, hi] that holds the k-th largest with a margin
    of four binomial standard deviations ([`magnitude_band`]); one pass counts the entries above `hi` and
    collects the (about 2%) entries inside the band with their flat indices ([`band_scan`]); the k-th largest and
    the kept ties are then found inside the band exactly ([`threshold_in_band`]). Returns None when the band
    missed it (the caller falls back to the radix selection).
    """
    stride = numel // _SAMPLE
    lo, hi = magnitude_band(_magnitude_bits(flat[::stride][:_SAMPLE]), k, numel)

    def scan(start: int, slot: int = 0):
        return band_scan(flat[start : start + _BLOCK], lo, hi, start)

    starts = range(0, numel, _BLOCK)
    scans = list(map_blocks(scan, starts) if map_blocks is not None else (scan(s) for s in starts))
    return threshold_in_band(k, scans)


def magnitude_band(sample: torch.Tensor, k: int, numel: int, runs: int = 1) -> tuple[int, int]:
    """Bit patterns `(lo, hi)` of magnitudes that bracket the k-th largest of a tensor, from a sample of its
    magnitude bits ([`_magnitude_bits`]): the sample's order statistics four standard deviations either side of
    the expected rank. With `runs > 1` the sample is that many equal runs of contiguous elements, and the
    standard deviation is the larger of the binomial one and the one the runs' disagreement shows (neighbouring
    entries are alike: rows of a weight matrix differ in scale).
    """
    import torch

    m = sample.numel()
    p = k / numel
    sd = math.sqrt(m * p * (1.0 - p))
    rank = p * m  # expected 0-based rank of the k-th largest in the sample, from the top
    ascending = torch.sort(
        sample.reshape(-1)
    ).values  # one ascending sort (a descending one is several times slower)
    if runs > 1:
        estimate = int(ascending[m - 1 - min(m - 1, math.floor(rank))])
        above = (sample.view(runs, -1) > estimate).sum(dim=1, dtype=torch.float64)
        sd = max(sd, float(above.std()) * math.sqrt(runs))  # the sd of the sum of `runs` run counts
    margin = 4.0 * sd + 8.0
    top, bottom = math.floor(rank - margin), math.ceil(rank + margin)
    # the sample's top-th and bottom-th largest (0-based)
    hi = int(ascending[m - 1 - top]) if top >= 0 else (1 << 31) - 1
    lo = int(ascending[m - 1 - bottom]) if bottom < m else 0
    return lo, hi


def band_scan(
    block: torch.Tensor, lo: int, hi: int, start: int, base: torch.Tensor | None = None
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """One block of TIES's threshold scan: `(above, start, values, where)`, the number of magnitudes of `block`
    (of the task vector `block - base` when `base` is given, as [`_task_vector`]) whose bits exceed `hi`, and the
    bits (int32) and positions in the block (int32) of those in [lo, hi]."""
    import numpy as np
    import torch

    block = block.reshape(-1)
    if base is not None:
        base = base.reshape(-1)
    fused = all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in (block, base))
    if fused and _fusable(block, [block]):
        from . import kernels  # one compiled pass: the same counts and entries

        flat_base = np.empty(0, np.float32) if base is None else base.numpy()
        above, values, where = kernels.get("band_scan")(block.numpy(), flat_base, lo, hi)
        return int(above), start, torch.from_numpy(values), torch.from_numpy(where)
    if base is not None:
        block = _task_vector(block, base)
    bits = _magnitude_bits(block)
    where = ((bits >= lo) & (bits <= hi)).nonzero().view(-1)
    return int((bits > hi).sum()), start, bits[where], where.to(torch.int32)


def threshold_in_band(
    k: int, scans: Sequence[tuple[int, int, torch.Tensor, torch.Tensor]]
) -> MagnitudeThreshold | None:
    """The exact [`MagnitudeThreshold`] keeping `k` entries from the [`band_scan`] of every block, in order; None
    when the band does not hold the k-th largest magnitude."""
    import numpy as np
    import torch

    above = sum(scan[0] for scan in scans)
    band = torch.cat([scan[2] for scan in scans])
    rank_in_band = k - above  # the k-th largest is the rank_in_band-th largest of the band
    if not 1 <= rank_in_band <= band.numel():
        return None
    # the k-th largest is the (j + 1)-th smallest: numpy's selection (a third faster than torch.kthvalue)
    j = band.numel() - rank_in_band
    pattern = int(np.partition(band.numpy(), j)[j])
    ties_needed = k - above - int((band > pattern).sum())
    del band
    for _, start, values, where in scans:  # the ties_needed-th entry equal to the pattern, in flat order
        tied = where[values == pattern]
        if ties_needed <= tied.numel():
            value = float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32))
            return MagnitudeThreshold(k=k, value=value, last_tie_index=start + int(tied[ties_needed - 1]))
        ties_needed -= tied.numel()
    raise AssertionError("unreachable: the pattern occurs in the band")  # pragma: no cover


def _select_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry (1-based) of a histogram, and how many entries lie above it."""
    import torch

    # cumulative counts from the top bin down: above[b] = entries in bins > b
    from_top = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # entries in bins >= b
    b = int((from_top >= k).nonzero().max())
    return b, int(from_top[b] - hist[b])


def magnitude_mask(
    task_vector: torch.Tensor, threshold: MagnitudeThreshold, *, offset: int = 0
) -> torch.Tensor:
    """Boolean keep-mask of a task vector (or of the flat slice starting at element `offset`) under `threshold`.

    Args:
        task_vector (`torch.Tensor`):
            The task vector, whole (`offset=0`) or a flat slice of it.
        threshold ([`MagnitudeThreshold`]):
            From [`magnitude_threshold`] on the whole task vector.
        offset (`int`, *optional*, defaults to `0`):
            Flat index of the slice's first element in the whole tensor.

    Returns:
        `torch.Tensor`: a bool tensor of `task_vector`'s shape.
    """
    mags = _f32(task_vector).abs()
    keep = mags > threshold.value
    n = mags.numel()
    if threshold.last_tie_index < offset:
        return keep
    ties = (mags == threshold.value).reshape(-1)
    ties[max(0, threshold.last_tie_index - offset + 1) :] = False  # ties after the last kept one are dropped
    return keep.logical_or_(ties.view(keep.shape)) if n else keep


def _trim_(tau: torch.Tensor, threshold: MagnitudeThreshold, offset: int) -> torch.Tensor:
    """Zero, in place, the entries of a contiguous float32 task vector (slice) that `threshold` does not keep.

    The same entries as [`magnitude_mask`], with integer arithmetic on the float32 bit patterns (non-negative
    floats order like their bits): with `a` the magnitude's bits and `v` the threshold's, `(v - a) >> 31` is -1
    exactly where `a > v`, and `(v - a - 1) >> 31` where `a >= v` (the range of ties that is kept).
    """
    import torch

    if threshold.k == 0:
        return tau.zero_()
    bits = tau.view(torch.int32).view(-1)
    value_bits = _float_bits(threshold.value)
    mask = bits.bitwise_and(0x7FFFFFFF).neg_().add_(value_bits)  # v - a: no overflow, both in [0, 2**31)
    tied_kept = min(bits.numel(), threshold.last_tie_index - offset + 1)  # entries [0, tied_kept) keep ties
    if tied_kept > 0:
        mask[:tied_kept].sub_(1)
    bits.bitwise_and_(mask.bitwise_right_shift_(31))
    return tau


def magnitude_prune(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `int(density * numel)` largest magnitudes of a whole task vector, zero the rest (float32).

    The whole-tensor form of [`magnitude_threshold`] + [`magnitude_mask`]; equals PEFT's
    `magnitude_based_pruning` except that ties at the threshold keep the lowest flat indices.
    """
    threshold = magnitude_threshold(task_vector, density)
    tau = _f32(task_vector)
    return tau * magnitude_mask(tau, threshold)


# --------------------------------------------------------------------------------------------------
# sign election and disjoint merge (TIES, DARE-TIES)


def disjoint_merge(
    task_vectors: Callable[[int], torch.Tensor], n: int, weights: Sequence[float]
) -> torch.Tensor:
    """TIES's elect-and-merge on sparsified task vectors: the result before `base + scaling * ...`.

    The sign of each entry is elected by the summed mass of the *unweighted* sparsified task vectors
    (`+1` where the sum is `>= 0`, as PEFT's `calculate_majority_sign_mask(method="total")`); the result is
    the sum of the *weighted* entries whose sign agrees, divided by the number of agreeing entries
    (at least 1), as PEFT's `disjoint_merge` (not by the sum of their weights, as mergekit does). Zeros
    (trimmed or dropped entries) never agree.

    Args:
        task_vectors (`Callable[[int], torch.Tensor]`):
            `task_vectors(i)` returns the i-th sparsified task vector (float32, a new tensor the merge may
            overwrite). It is called once per ingredient, so that memory holds a fixed number of tensors
            (five accumulators) whatever `n`.
        n (`int`):
            The number of ingredients.
        weights (`Sequence[float]`):
            One weight per ingredient.

    Returns:
        `torch.Tensor`: the merged task vector in float32.
    """
    import torch

    # One pass: the sums and counts of the positive and of the negative entries are kept apart, and the elected
    # sign picks one of the two at the end. The same additions in the same order as summing the agreeing entries
    # after the election (a non-agreeing entry adds a zero), so the same bits, with each task vector computed
    # once and no boolean kernels (several times slower per element than float ones in torch).
    mass = pos_sum = neg_sum = pos_count = neg_count = None
    sign = pos = None
    for i in range(n):
        tau = task_vectors(i)
        if mass is None:
            mass = tau.clone()
            pos_sum, neg_sum = torch.zeros_like(tau), torch.zeros_like(tau)
            pos_count, neg_count = torch.zeros_like(tau), torch.zeros_like(tau)
            sign, pos = torch.empty_like(tau), torch.empty_like(tau)
        else:
            mass.add_(tau)
        torch.sign(tau, out=sign)
        torch.clamp(sign, min=0.0, out=pos)  # 1 where tau > 0
        sign.sub_(pos)  # -1 where tau < 0
        if weights[i] != 1.0:
            tau.mul_(weights[i])
        pos_sum.addcmul_(tau, pos)
        neg_sum.addcmul_(tau, sign)  # the negated sum of the negative entries (negation is exact)
        pos_count.add_(pos)
        neg_count.sub_(sign)
    pos_sum.div_(pos_count.clamp_(min=1.0))
    neg_sum.div_(neg_count.clamp_(min=1.0)).neg_()
    # the elected sign is + where mass >= 0, i.e. where its sign bit is clear (-0.0 only arises when every task
    # vector is -0.0 there, where both candidates are zero): a bitwise select keeps each candidate's exact bits
    select = mass.view(torch.int32).bitwise_right_shift_(31)  # -1 where mass < 0
    pos_bits = pos_sum.view(torch.int32)
    return (
        (pos_bits ^ neg_sum.view(torch.int32)).bitwise_and_(select).bitwise_xor_(pos_bits).view(torch.float32)
    )


def ties(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    thresholds: Sequence[MagnitudeThreshold],
    *,
    weights: Sequence[float] | None = None,
    scaling: float = 1.0,
    offset: int = 0,
) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge, then `base + scaling * merged`.

    The second pass: element-wise on whole tensors or flat slices, given each ingredient's
    [`MagnitudeThreshold`] from the first pass ([`magnitude_threshold`] on its whole task vector).

    Args:
        base (`torch.Tensor`):
            θ₀ (whole, or the flat slice starting at `offset`).
        thetas (`Sequence[torch.Tensor]`):
            θᵢ, matching `base`.
        thresholds (`Sequence[MagnitudeThreshold]`):
            One per ingredient.
        weights (`Sequence[float]`, *optional*):
            One per ingredient (default 1.0): multiply the trimmed task vectors in the disjoint mean.
        scaling (`float`, *optional*, defaults to `1.0`):
            λ.
        offset (`int`, *optional*, defaults to `0`):
            Flat index of the slice in the whole tensor.

    Returns:
        `torch.Tensor`: float32.
    """
    _check_inputs(base, thetas)
    ws = _weights(weights, len(thetas))
    lam = _number(scaling, "scaling")
    if len(thresholds) != len(thetas):
        raise InvalidArgumentError(f"thresholds has {len(thresholds)} entries for {len(thetas)} ingredients.")

    if _fusable(base, thetas):
        value_bits = [_float_bits(t.value) if t.k else 0x7FFFFFFF for t in thresholds]
        tied_kept = [t.last_tie_index - offset + 1 if t.k else -1 for t in thresholds]
        return _fused(base, thetas, ws, lam, "ties", value_bits=value_bits, tied_kept=tied_kept)

    def trimmed(i: int) -> torch.Tensor:
        return _trim_(_task_vector(thetas[i], base), thresholds[i], offset)

    return _apply(base, disjoint_merge(trimmed, len(thetas), ws), lam)


# --------------------------------------------------------------------------------------------------
# DARE


def _signed(x: int, bits: int) -> int:
    """The two's-complement value of the low `bits` bits of `x` (torch has no unsigned 32/64-bit arithmetic)."""
    x &= (1 << bits) - 1
    return x - (1 << bits) if x >= 1 << (bits - 1) else x


def _splitmix64(z: int) -> int:
    """splitmix64's output function (Steele, Lea & Flood 2014) on a Python integer."""
    m64 = (1 << 64) - 1
    z &= m64
    z = ((z ^ (z >> 30)) * _MIX1) & m64
    z = ((z ^ (z >> 27)) * _MIX2) & m64
    return z ^ (z >> 31)


def dare_stream_key(seed: int, ingredient_index: int, tensor_name: str) -> int:
    """The 64-bit key of DARE's random stream for one (seed, ingredient, tensor): blake2b of the three."""
    seed = check_seed(seed)
    data = f"hf_soups.dare\0{seed}\0{int(ingredient_index)}\0{tensor_name}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _segment_key(key: int, segment: int) -> int:
    """The 32-bit key of flat indices `segment * 2**32 .. (segment + 1) * 2**32 - 1` of one stream."""
    return _splitmix64(key + (segment + 1) * _GOLDEN_GAMMA) & 0xFFFFFFFF


def dare_uniform_bits(key: int, offset: int, count: int) -> torch.Tensor:
    """32 random bits per flat index `offset .. offset + count - 1` of one stream, as int32 bit patterns.

    A counter-based generator: element `j` gets `lowbias32((j mod 2**32 + k) mod 2**32)`, `k` the 32-bit key of
    the segment `j // 2**32` ([`_segment_key`]) and `lowbias32` Wellons' 32-bit integer hash (shift-xor 16,
    multiply by 0x7FEB352D, shift-xor 15, multiply by 0x846CA68B, shift-xor 16, all modulo 2**32). It is a
    pure function of the key and of `j`, so any slice of the tensor gets the same bits wherever it is
    computed; and it runs on 32-bit lanes (about 1 ns per element on one core, where a 64-bit hash in torch's
    int64 arithmetic took 20). The bits read as an unsigned integer `u` are uniform on [0, 2**32).
    """
    import torch

    out = torch.empty(count, dtype=torch.int32)
    done = 0
    while done < count:  # one piece per 2**32 segment (a single piece for any tensor of < 4G elements)
        j = offset + done
        piece = min(count - done, (1 << 32) - (j & 0xFFFFFFFF))
        x = out[done : done + piece]
        start = _signed((j & 0xFFFFFFFF) + _segment_key(key, j >> 32), 32)
        torch.arange(piece, dtype=torch.int32, out=x)
        x.add_(start)  # wraps modulo 2**32
        _lowbias32_(x)
        done += piece
    return out


def _lowbias32_(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 hash, in place on int32 bit patterns (logical shifts by masking)."""
    import torch

    t = torch.empty_like(x)
    for shift, mul in ((16, _LB_MUL1), (15, _LB_MUL2), (16, None)):
        torch.bitwise_right_shift(x, shift, out=t)
        t.bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(t)
        if mul is not None:
            x.mul_(mul)
    return x


def dare_mask(
    shape: Sequence[int] | int,
    *,
    density: float,
    seed: int,
    ingredient_index: int,
    tensor_name: str,
    offset: int = 0,
) -> torch.Tensor:
    """DARE's keep-mask: each entry is kept with probability `density`, independently.

    Entry `j` (flat index in the whole tensor) is kept when `u_j >> 1 < ceil(density * 2**31)`, `u_j` the unsigned
    value of [`dare_uniform_bits`] from the stream of `(seed, ingredient_index, tensor_name)` (so the keep
    probability is `density` rounded up to a multiple of 2**-31). The mask of a slice is the slice of the whole
    mask: independent of chunking, thread count and order of reading.

    Args:
        shape (`Sequence[int]` or `int`):
            Shape of the tensor or slice (flat slices: its length).
        density (`float`):
            Keep probability, in (0, 1].
        seed (`int`):
            The recipe's seed.
        ingredient_index (`int`):
            Position of the ingredient in the recipe's ingredient list (not counting the base).
        tensor_name (`str`):
            The output tensor's name.
        offset (`int`, *optional*, defaults to `0`):
            Flat index of the first element.

    Returns:
        `torch.Tensor`: a bool tensor of `shape`.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    key = dare_stream_key(seed, ingredient_index, tensor_name)
    return _dare_keep_bits(math.prod(shape), check_density(density), key, offset).ne(0).view(shape)


def _dare_keep_bits(numel: int, density: float, key: int, offset: int) -> torch.Tensor:
    """[`dare_mask`] as int32 words: -1 (all bits set) where the entry is kept, 0 where it is dropped.

    Integer arithmetic only (torch's boolean kernels cost several times more per element): with
    `v = u >> 1` in [0, 2**31) and `L = ceil(density * 2**31)`, `(v - L) >> 31` (arithmetic) is -1 exactly when
    `v < L`, and `v - L` cannot overflow.
    """
    import torch

    limit = math.ceil(density * float(1 << 31))  # exact: density * 2**31 is exact in float64
    if limit >= 1 << 31:  # density 1 (or within 2**-31 of it): everything is kept
        return torch.full((numel,), -1, dtype=torch.int32)
    out = torch.empty(numel, dtype=torch.int32)
    for start in range(0, numel, _BLOCK):
        count = min(_BLOCK, numel - start)
        bits = dare_uniform_bits(key, offset + start, count)
        piece = out[start : start + count]
        torch.bitwise_right_shift(bits, 1, out=piece)
        piece.bitwise_and_(0x7FFFFFFF).sub_(limit).bitwise_right_shift_(31)
    return out


def dare_drop(
    task_vector: torch.Tensor,
    *,
    density: float,
    seed: int,
    ingredient_index: int,
    tensor_name: str,
    offset: int = 0,
) -> torch.Tensor:
    """DARE's drop-and-rescale of one task vector (or flat slice): `where(mask, τ, 0) / density`, float32.

    The division (not a multiplication by `1 / density`) rounds as PEFT's `random_pruning(rescale=True)`.
    """
    key = dare_stream_key(seed, ingredient_index, tensor_name)
    return _dare_drop_(_f32(task_vector).clone(), check_density(density), key, offset)


def _dare_drop_(tau: torch.Tensor, density: float, key: int, offset: int) -> torch.Tensor:
    """[`dare_drop`] in place on a contiguous float32 task vector the caller owns, from the stream key."""
    if density == 1.0:
        return tau
    import torch

    keep = _dare_keep_bits(tau.numel(), density, key, offset)
    tau.view(torch.int32).view(-1).bitwise_and_(keep)  # dropped entries become +0.0 (view: never a copy)
    return tau.div_(density)


def dare_linear(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    *,
    density: float,
    seed: int,
    tensor_name: str,
    weights: Sequence[float] | None = None,
    scaling: float = 1.0,
    offset: int = 0,
) -> torch.Tensor:
    """DARE (Yu et al. 2024), linear form: `base + scaling * sum_i weights[i] * drop(thetas[i] - base)`.

    Element-wise (no first pass): whole tensors or flat slices starting at `offset`. See [`dare_mask`].

    Returns:
        `torch.Tensor`: float32.
    """
    _check_inputs(base, thetas)
    ws = _weights(weights, len(thetas))
    lam = _number(scaling, "scaling")
    density = check_density(density)
    seed = check_seed(seed)
    if _fusable(base, thetas, offset):
        keys = [dare_stream_key(seed, i, tensor_name) for i in range(len(thetas))]
        return _fused(base, thetas, ws, lam, "dare-linear", density=density, keys=keys, offset=offset)
    acc = None
    for i, theta in enumerate(thetas):
        tau = _dare_drop_(_task_vector(theta, base), density, dare_stream_key(seed, i, tensor_name), offset)
        if ws[i] != 1.0:
            tau.mul_(ws[i])
        acc = tau if acc is None else acc.add_(tau)
    return _apply(base, acc, lam)


def dare_ties(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    *,
    density: float,
    seed: int,
    tensor_name: str,
    weights: Sequence[float] | None = None,
    scaling: float = 1.0,
    offset: int = 0,
) -> torch.Tensor:
    """DARE, TIES form: drop and rescale each task vector, then TIES's sign election and disjoint merge.

    Element-wise (no first pass). The sign is elected on the dropped-and-rescaled unweighted task vectors,
    as PEFT's `dare_ties`. See [`dare_mask`] and [`disjoint_merge`].

    Returns:
        `torch.Tensor`: float32.
    """
    _check_inputs(base, thetas)
    ws = _weights(weights, len(thetas))
    lam = _number(scaling, "scaling")
    density = check_density(density)
    seed = check_seed(seed)
    if _fusable(base, thetas, offset):
        keys = [dare_stream_key(seed, i, tensor_name) for i in range(len(thetas))]
        return _fused(base, thetas, ws, lam, "dare-ties", density=density, keys=keys, offset=offset)

    def dropped(i: int) -> torch.Tensor:
        return _dare_drop_(
            _task_vector(thetas[i], base), density, dare_stream_key(seed, i, tensor_name), offset
        )

    return _apply(base, disjoint_merge(dropped, len(thetas), ws), lam)


# --------------------------------------------------------------------------------------------------
# the fused kernels (numba, optional: hf_soups.kernels)


def _fusable(base: torch.Tensor, thetas: Sequence[torch.Tensor], offset: int = 0) -> bool:
    """Whether [`_fused`] can compute this slice: numba available, float inputs, one segment of DARE's stream."""
    from . import kernels

    if not thetas or (offset & 0xFFFFFFFF) + thetas[0].numel() > 1 << 32:
        return False
    if not all(t.dtype.is_floating_point and t.dtype.itemsize <= 4 for t in [base, *thetas]):
        return False
    return kernels.available()


def _float_bits(value: float) -> int:
    """The bit pattern of `value` rounded to float32, as a signed 32-bit integer."""
    return int.from_bytes(struct.pack("<f", value), "little", signed=True)


def _as_rows(thetas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The flat float32 `thetas` as the rows of one (N, numel) tensor: a view when they already are (equally
    spaced in one storage, as the engine's slice buffers), else a copy (widening narrower floats exactly)."""
    import torch

    first = thetas[0]
    count = first.numel()
    if all(t.dtype == torch.float32 and t.is_contiguous() for t in thetas):
        storage = first.untyped_storage().data_ptr()
        step = (thetas[1].data_ptr() - first.data_ptr()) // 4 if len(thetas) > 1 else count
        if (
            step >= count
            and all(t.untyped_storage().data_ptr() == storage for t in thetas)
            and all(t.data_ptr() - first.data_ptr() == k * step * 4 for k, t in enumerate(thetas))
        ):
            return first.as_strided((len(thetas), count), (step, 1))
    rows = torch.empty(len(thetas), count, dtype=torch.float32)
    for row, t in zip(rows, thetas):
        row.copy_(t.reshape(-1))
    return rows


def _fused(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    ws: Sequence[float],
    lam: float,
    method: str,
    *,
    value_bits: Sequence[int] = (),
    tied_kept: Sequence[int] = (),
    density: float = 1.0,
    keys: Sequence[int] = (),
    offset: int = 0,
) -> torch.Tensor:
    """TIES, DARE-TIES or DARE-linear of one slice by one fused kernel ([`hf_soups.kernels`]): the same float32
    operations in the same order as the torch path, hence the same bits (tested)."""
    import numpy as np
    import torch

    from . import kernels

    n = len(thetas)
    rows = _as_rows(thetas).numpy()
    flat_base = _f32(base).reshape(-1).contiguous().numpy()
    out = torch.empty(base.shape, dtype=torch.float32)
    weights = np.asarray(ws, dtype=np.float32)
    lam32 = np.float32(lam)
    starts = np.asarray(
        [((offset & 0xFFFFFFFF) + _segment_key(key, offset >> 32)) & 0xFFFFFFFF for key in keys] or [0] * n,
        dtype=np.uint64,
    )
    limit = min(math.ceil(density * float(1 << 31)), 1 << 31)
    if method == "dare-linear":
        kernels.get("dare_linear")(
            flat_base, rows, weights, lam32, starts, limit, np.float32(density), out.view(-1).numpy()
        )
        return out
    mode = 0 if method == "ties" else 1
    kernels.get("disjoint")(
        flat_base,
        rows,
        weights,
        lam32,
        mode,
        np.asarray(value_bits or [0] * n, dtype=np.int32),
        np.asarray(tied_kept or [0] * n, dtype=np.int64),
        starts,
        limit,
        np.float32(density),
        out.view(-1).numpy(),
    )
    return out


# --------------------------------------------------------------------------------------------------
# float64 reductions, independent of slicing


class _TreeSum:
    """Sums of `rows` streams of float64 values, each by a fixed pairwise tree (fan-in 1024 per level).

    Values are grouped by their global position (1024 consecutive values, then 1024 group sums, ...),
    partial groups wait for the next call, and each group is reduced by element-wise halving adds. The
    result is therefore the same bits however the stream is cut into calls, and about as accurate as
    pairwise summation (error ~ log2(n) ulp). The streams advance together (one (rows, c) block per call), each
    reduced exactly as it would be alone.
    """

    def __init__(self, rows: int = 1) -> None:
        self.rows = rows
        self._pending: list[torch.Tensor] = []

    def add(self, values: torch.Tensor) -> None:
        """Add the next `c` values of every stream: a (rows, c) float64 tensor (or c values when rows == 1)."""
        import torch

        level = 0
        v = values.reshape(self.rows, -1)
        while v.shape[1]:
            if level == len(self._pending):
                self._pending.append(v.new_empty(self.rows, 0))
            buf = torch.cat([self._pending[level], v], dim=1) if self._pending[level].shape[1] else v
            full = buf.shape[1] // _TREE_FAN_IN * _TREE_FAN_IN
            self._pending[level] = buf[:, full:].clone()
            if full == 0:
                return
            v = _halving_sum(buf[:, :full].reshape(-1, _TREE_FAN_IN)).view(self.rows, -1)
            level += 1

    def results(self) -> torch.Tensor:
        """The (rows,) float64 sums of the streams."""
        import torch

        carry = None
        for pending in self._pending:
            row = torch.zeros(self.rows, _TREE_FAN_IN, dtype=torch.float64)
            r = pending.shape[1]
            row[:, :r] = pending
            if carry is not None:
                row[:, r] = carry  # pending holds < fan-in values: there is room
            carry = _halving_sum(row)
        return torch.zeros(self.rows, dtype=torch.float64) if carry is None else carry

    def result(self) -> float:
        """The sum of the one stream (rows == 1)."""
        return float(self.results()[0])

    def copy(self) -> _TreeSum:
        out = _TreeSum(self.rows)
        out._pending = [p.clone() for p in self._pending]
        return out


def _halving_sum(rows: torch.Tensor) -> torch.Tensor:
    """Row sums of a (n, 2**m) float64 matrix by m rounds of element-wise pair adds (bitwise deterministic)."""
    while rows.shape[1] > 1:
        rows = rows[:, 0::2] + rows[:, 1::2]
    return rows[:, 0]


class GramAccumulator:
    """The float64 Gram matrix `G[i, j] = <v_i, v_j>` of N vectors streamed in matching slices.

    The vectors are cut into chunks of 1024 elements at fixed global positions (partial chunks wait for the next
    slice); the dot products of every pair on every chunk come from one kernel (products of float32 values are
    exact in float64): a fused compiled loop with a fixed summation order when numba is installed
    ([`hf_soups.kernels`]), else one batched float64 matrix product on one thread; and the chunk sums of each pair
    are added by a fixed pairwise tree, all pairs at once. The result is therefore bit-for-bit the same whatever
    the slicing, and costs about one multiply-add per element and pair. Memory: the N partial chunks and a few KB
    per pair. (The two kernels may differ in the last bits of a chunk's dot product.)

    Args:
        n (`int`): the number of vectors.

    Example:

    ```python
    >>> import torch
    >>> from hf_soups.merge_ops import GramAccumulator
    >>> acc = GramAccumulator(2)
    >>> acc.add([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])
    >>> acc.add([torch.tensor([2.0]), torch.tensor([0.5])])
    >>> acc.result().tolist()
    [[9.0, 12.0], [12.0, 25.25]]

    ```
    """

    def __init__(self, n: int):
        self.n = n
        self._pairs = [(i, j) for i in range(n) for j in range(i, n)]
        self._sums = _TreeSum(len(self._pairs))
        self._pending: torch.Tensor | None = None  # (n, r) float64, r < 1024: the current partial chunk

    def add(self, vectors: Sequence[torch.Tensor]) -> None:
        """Add the next slice of every vector (same length, same position in each)."""
        import torch

        if len(vectors) != self.n:
            raise InvalidArgumentError(f"GramAccumulator({self.n}) got {len(vectors)} vectors.")
        rows = torch.stack([v.reshape(-1).to(torch.float64) for v in vectors])
        if self._pending is not None and self._pending.shape[1]:
            rows = torch.cat([self._pending, rows], dim=1)
        full = rows.shape[1] // _TREE_FAN_IN * _TREE_FAN_IN
        self._pending = rows[:, full:].clone()
        if full:
            self._sums.add(_chunk_dots(rows[:, :full], self.n))

    CHUNK = _TREE_FAN_IN
    """Elements per chunk: slices whose length is a multiple of it can go through [`chunk_dots`]."""

    def chunk_dots(self, vectors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
        """The (pairs, C) dot products of the C whole chunks of `vectors` (a length that is a multiple of `CHUNK`),
        or of the task vectors `vectors[i] - base` (each difference rounded to float32, as [`_task_vector`]).

        A pure function (threads may compute those of several slices at once); [`add_chunk_dots`] then adds
        them in stream order.
        """
        import torch

        count = vectors[0].numel()
        if count % _TREE_FAN_IN:
            raise InvalidArgumentError(f"chunk_dots: {count} elements is not a multiple of {_TREE_FAN_IN}.")
        if _fusable(vectors[0], vectors) and (base is None or base.dtype == torch.float32):
            # float32 rows (a view when they already are); the kernel takes the differences and widens
            flat_base = None if base is None else base.reshape(-1).contiguous()
            return _chunk_dots(_as_rows(vectors), self.n, flat_base)
        if base is not None:
            vectors = [_task_vector(v, base) for v in vectors]
        return _chunk_dots(torch.stack([v.reshape(-1).to(torch.float64) for v in vectors]), self.n)

    def add_chunk_dots(self, dots: torch.Tensor) -> None:
        """Add [`chunk_dots`] of the next slice (only while no partial chunk is waiting)."""
        if self._pending is not None and self._pending.shape[1]:
            raise InvalidArgumentError("add_chunk_dots after a slice that ended inside a chunk: use add().")
        self._sums.add(dots)

    def result(self) -> torch.Tensor:
        """The (n, n) float64 Gram matrix."""
        import torch

        sums = self._sums
        if self._pending is not None and self._pending.shape[1]:  # the last partial chunk, zero-padded
            padded = torch.zeros(self.n, _TREE_FAN_IN, dtype=torch.float64)
            padded[:, : self._pending.shape[1]] = self._pending
            sums = sums.copy()  # result() leaves the stream open
            sums.add(_chunk_dots(padded, self.n))
        totals = sums.results()
        out = torch.zeros(self.n, self.n, dtype=torch.float64)
        for p, (i, j) in enumerate(self._pairs):
            out[i, j] = out[j, i] = totals[p]
        return out


def _chunk_dots(rows: torch.Tensor, n: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """(pairs, C) float64 dot products of the C 1024-element chunks of `rows` (n, C * 1024), float32 or float64,
    for the pairs (i, j), i <= j, in row-major order; on one thread. With `base` (float32 rows and base only, the
    fused kernel), of the task vectors `rows[i] - base`."""
    import numpy as np
    import torch

    from . import kernels
    from .utils import single_threaded

    if kernels.available():
        out = torch.empty(n * (n + 1) // 2, rows.shape[1] // _TREE_FAN_IN, dtype=torch.float64)
        flat_base = np.empty(0, np.float32) if base is None else base.numpy()
        kernels.get("chunk_dots")(rows.numpy(), flat_base, _TREE_FAN_IN, out.numpy())
        return out
    if base is not None:  # the callers pass a base only on the fused path
        raise InvalidArgumentError("_chunk_dots: base= needs the fused kernels.")  # pragma: no cover
    chunks = rows.to(torch.float64).reshape(n, -1, _TREE_FAN_IN).transpose(0, 1).contiguous()  # (C, n, 1024)
    with single_threaded():  # one kernel, one summation order, whatever the caller's thread count
        dots = torch.bmm(chunks, chunks.transpose(1, 2))
    i, j = torch.triu_indices(n, n)
    return dots[:, i, j].T.contiguous()


def _blockwise_gram(base: torch.Tensor | None, thetas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gram matrix of the whole task vectors θᵢ − base (of the θᵢ themselves when `base` is None), computed
    block by block so that temporaries stay small whatever N and the tensor size (same bits as any slicing).
    """
    acc = GramAccumulator(len(thetas))
    flats = [th.reshape(-1) for th in thetas]
    flat_base = None if base is None else base.reshape(-1)
    for start in range(0, flats[0].numel(), _BLOCK):
        piece = [f[start : start + _BLOCK] for f in flats]
        if flat_base is not None:
            piece = [_task_vector(p, flat_base[start : start + _BLOCK]) for p in piece]
        acc.add(piece)
    return acc.result()


# --------------------------------------------------------------------------------------------------
# SLERP


def slerp_coefficients(gram: torch.Tensor, t: float) -> tuple[float, float]:
    """`(c_a, c_b)` such that SLERP's result is `c_a * θ_a + c_b * θ_b`, from their 2x2 Gram matrix.

    With `cos = <a, b> / (|a| |b|)` and `Ω = arccos(cos)`: `c_a = sin((1 - t) Ω) / sin Ω`,
    `c_b = sin(t Ω) / sin Ω` (the weights themselves are interpolated, not their normalised directions, as
    mergekit). Linear interpolation `(1 - t, t)` when `|cos| > SLERP_PARALLEL_THRESHOLD` (nearly parallel or
    opposite) or when either tensor is all zeros.

    Args:
        gram (`torch.Tensor`): [[<a,a>, <a,b>], [<a,b>, <b,b>]] in float64.
        t (`float`): in [0, 1].

    Returns:
        `tuple[float, float]`
    """
    t = check_t(t)
    aa, ab, bb = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
    if aa <= 0.0 or bb <= 0.0:
        return 1.0 - t, t
    cos = ab / (math.sqrt(aa) * math.sqrt(bb))
    if abs(cos) > SLERP_PARALLEL_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp(
    theta_a: torch.Tensor,
    theta_b: torch.Tensor,
    t: float,
    *,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spherical linear interpolation of two ingredients' weights, per tensor.

    Args:
        theta_a (`torch.Tensor`):
            The first ingredient's tensor (the result at `t=0`), whole or a flat slice.
        theta_b (`torch.Tensor`):
            The second (the result at `t=1`).
        t (`float`):
            In [0, 1].
        gram (`torch.Tensor`, *optional*):
            The 2x2 float64 Gram matrix of the *whole* tensors (first pass, [`GramAccumulator`]); required
            for slices, computed from `theta_a` and `theta_b` when omitted.

    Returns:
        `torch.Tensor`: float32. See [`slerp_coefficients`].
    """
    _check_inputs(None, [theta_a, theta_b], needs_base=False)
    if gram is None:
        gram = _blockwise_gram(None, [theta_a, theta_b])
    ca, cb = slerp_coefficients(gram, t)
    out = _f32(theta_a) * ca
    return out.add_(_f32(theta_b) * cb)


# --------------------------------------------------------------------------------------------------
# Model Stock


def model_stock_ratio(gram: torch.Tensor) -> tuple[float, float]:
    """Model Stock's interpolation ratio `t = N·cos / (1 + (N − 1)·cos)` from the task vectors' Gram matrix.

    `cos` is the mean over the N(N − 1)/2 pairs of the cosine between task vectors. A pair in which a task
    vector is all zeros (an ingredient that did not change this tensor) counts as cosine 0; the mean is
    clamped to [0, 1], so `t` lies in [0, 1]: with orthogonal or opposed task vectors (cos <= 0) the tensor
    stays at the base, where mergekit would extrapolate away from it (t < 0).

    Args:
        gram (`torch.Tensor`): the (N, N) float64 Gram matrix of τ₁..τ_N, N >= 2.

    Returns:
        `tuple[float, float]`: `(t, cos)`, cos being the mean pairwise cosine before clamping.

    Raises:
        [`InvalidArgumentError`]: fewer than two task vectors.
    """
    n = int(gram.shape[0])
    if n < 2:
        raise InvalidArgumentError(
            f"thetas has {n} ingredient(s): Model Stock needs at least two fine-tunes (and the base)."
        )
    total = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            ii, jj = float(gram[i, i]), float(gram[j, j])
            if ii > 0.0 and jj > 0.0:
                total += max(-1.0, min(1.0, float(gram[i, j]) / (math.sqrt(ii) * math.sqrt(jj))))
    cos = total / (n * (n - 1) / 2)
    c = max(0.0, min(1.0, cos))
    return n * c / (1.0 + (n - 1) * c), cos


def model_stock(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    *,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model Stock (Jang et al. 2024), per tensor: `t * mean_i(thetas[i]) + (1 - t) * base`.

    Args:
        base (`torch.Tensor`):
            θ₀, whole or a flat slice.
        thetas (`Sequence[torch.Tensor]`):
            At least two fine-tuned tensors.
        gram (`torch.Tensor`, *optional*):
            The float64 Gram matrix of the whole task vectors (first pass); required for slices, computed
            when omitted. See [`model_stock_ratio`].

    Returns:
        `torch.Tensor`: float32.
    """
    _check_inputs(base, thetas)
    if len(thetas) < 2:
        raise InvalidArgumentError(
            f"thetas has {len(thetas)} ingredient: Model Stock needs at least two fine-tunes (and the base)."
        )
    if gram is None:
        gram = _blockwise_gram(base, thetas)
    t, _ = model_stock_ratio(gram)
    return _model_stock_combine(base, thetas, t)


def _model_stock_combine(base, thetas, t: float) -> torch.Tensor:
    mean = None
    for theta in thetas:
        mean = _f32(theta).clone() if mean is None else mean.add_(theta)
    mean.div_(len(thetas))
    mean.mul_(t)
    return mean.add_(_f32(base) * (1.0 - t))


# --------------------------------------------------------------------------------------------------
# the two-pass protocol

NEEDS = frozenset({"thresholds", "task_gram", "weight_gram"})


@dataclass
class TensorStats:
    """What the first pass gathered for one tensor name, handed to every `combine` call of the second.

    Attributes:
        name (`str`): the output tensor's name (keys DARE's random stream).
        numel (`int`): its number of elements.
        thresholds (`list[MagnitudeThreshold]`, *optional*): per ingredient (`"thresholds"`).
        gram (`torch.Tensor`, *optional*): float64 Gram matrix of the task vectors (`"task_gram"`) or of
            the weights (`"weight_gram"`).
    """

    name: str
    numel: int
    thresholds: list[MagnitudeThreshold] | None = None
    gram: torch.Tensor | None = None


@dataclass(frozen=True)
class TensorRecipe:
    """A merge method as the engine sees it: per-tensor statistics, then an element-wise combine.

    Pass 1 gathers `needs` for a tensor name:

    - `"thresholds"`: per ingredient, [`magnitude_threshold`]`(θᵢ − θ₀, density)` on the whole task
      vector, one ingredient at a time (peak: one float32 copy of the tensor; N scalars kept);
    - `"task_gram"`: [`GramAccumulator`] over slices of τ₁..τ_N;
    - `"weight_gram"`: [`GramAccumulator`] over slices of θ₁..θ_N.

    Pass 2 calls `combine(base, thetas, stats, offset)` on matching flat slices (or whole tensors with
    `offset=0`) and gets the float32 result for that slice. Methods with empty `needs` run in one pass.

    Attributes:
        method (`str`): the method's name.
        needs (`frozenset[str]`): subset of `NEEDS`.
        combine (`Callable`): `(base | None, thetas, TensorStats, offset) -> float32 tensor`.
        needs_base (`bool`): whether θ₀ is an input.
        min_ingredients (`int`), max_ingredients (`int | None`): how many θᵢ the method takes.
        params (`dict`): the validated parameters (density for `"thresholds"`, ...).
    """

    method: str
    needs: frozenset[str]
    combine: Callable[..., torch.Tensor]
    needs_base: bool = True
    min_ingredients: int = 1
    max_ingredients: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def check_ingredients(self, n: int, *, has_base: bool) -> None:
        """Raise [`InvalidArgumentError`] when `n` ingredients (and a base or not) do not fit this method."""
        if self.needs_base and not has_base:
            raise InvalidArgumentError(
                f"method={self.method!r} needs base_model= (the pre-trained model the fine-tunes started from)."
            )
        if n < self.min_ingredients or (self.max_ingredients is not None and n > self.max_ingredients):
            want = (
                f"exactly {self.min_ingredients}"
                if self.min_ingredients == self.max_ingredients
                else f"at least {self.min_ingredients}"
            )
            raise InvalidArgumentError(f"method={self.method!r} takes {want} ingredients (models=), got {n}.")


def task_arithmetic_recipe(*, weights: Sequence[float] | None = None, scaling: float = 1.0) -> TensorRecipe:
    """[`TensorRecipe`] of [`task_arithmetic`] (one pass)."""
    lam = _number(scaling, "scaling")
    if weights is not None:
        _weights(weights, len(weights))

    def combine(base, thetas, stats, offset):
        return task_arithmetic(base, thetas, weights=weights, scaling=lam)

    return TensorRecipe("task-arithmetic", frozenset(), combine, params={"weights": weights, "scaling": lam})


def ties_recipe(
    *, density: float, weights: Sequence[float] | None = None, scaling: float = 1.0
) -> TensorRecipe:
    """[`TensorRecipe`] of [`ties`] (thresholds in pass 1)."""
    density = check_density(density)
    lam = _number(scaling, "scaling")
    if weights is not None:
        _weights(weights, len(weights))

    def combine(base, thetas, stats, offset):
        return ties(base, thetas, stats.thresholds, weights=weights, scaling=lam, offset=offset)

    params = {"density": density, "weights": weights, "scaling": lam}
    return TensorRecipe("ties", frozenset({"thresholds"}), combine, params=params)


def dare_recipe(
    *,
    density: float,
    seed: int,
    form: str = "linear",
    weights: Sequence[float] | None = None,
    scaling: float = 1.0,
) -> TensorRecipe:
    """[`TensorRecipe`] of [`dare_linear`] (`form="linear"`) or [`dare_ties`] (`form="ties"`), one pass."""
    density = check_density(density)
    seed = check_seed(seed)
    lam = _number(scaling, "scaling")
    if weights is not None:
        _weights(weights, len(weights))
    if form not in ("linear", "ties"):
        raise InvalidArgumentError(f"form={form!r} is not 'linear' or 'ties'.")
    fn = dare_linear if form == "linear" else dare_ties

    def combine(base, thetas, stats, offset):
        return fn(
            base,
            thetas,
            density=density,
            seed=seed,
            tensor_name=stats.name,
            weights=weights,
            scaling=lam,
            offset=offset,
        )

    params = {"density": density, "seed": seed, "weights": weights, "scaling": lam}
    return TensorRecipe(f"dare-{form}", frozenset(), combine, params=params)


def slerp_recipe(*, t: float) -> TensorRecipe:
    """[`TensorRecipe`] of [`slerp`]: exactly two ingredients, no base, Gram of the weights in pass 1."""
    t = check_t(t)

    def combine(base, thetas, stats, offset):
        if len(thetas) != 2:
            raise InvalidArgumentError(
                f"method='slerp' takes exactly 2 ingredients (models=), got {len(thetas)}."
            )
        return slerp(thetas[0], thetas[1], t, gram=stats.gram)

    return TensorRecipe(
        "slerp",
        frozenset({"weight_gram"}),
        combine,
        needs_base=False,
        min_ingredients=2,
        max_ingredients=2,
        params={"t": t},
    )


def model_stock_recipe() -> TensorRecipe:
    """[`TensorRecipe`] of [`model_stock`]: a base and at least two ingredients, Gram of τᵢ in pass 1."""

    def combine(base, thetas, stats, offset):
        _check_inputs(base, thetas)
        t, _ = model_stock_ratio(stats.gram)
        return _model_stock_combine(base, thetas, t)

    return TensorRecipe("model-stock", frozenset({"task_gram"}), combine, min_ingredients=2)


def merge_tensor(
    recipe: TensorRecipe,
    tensor_name: str,
    base: torch.Tensor | None,
    thetas: Sequence[torch.Tensor],
    *,
    slice_elements: int | None = None,
) -> torch.Tensor:
    """Reference driver of the two-pass protocol for one tensor: what the engine does, on in-memory tensors.

    Pass 1 gathers `recipe.needs` over flat slices of `slice_elements` elements (thresholds: on each
    whole task vector, one ingredient at a time); pass 2 calls `recipe.combine` on each slice. With
    `slice_elements=None` both passes see whole tensors. The result is the same bits for every slicing.

    Args:
        recipe ([`TensorRecipe`]): the method.
        tensor_name (`str`): the tensor's name.
        base (`torch.Tensor`, *optional*): θ₀ (`None` when `recipe.needs_base` is False).
        thetas (`Sequence[torch.Tensor]`): θ₁..θ_N.
        slice_elements (`int`, *optional*): slice length; whole tensors when `None`.

    Returns:
        `torch.Tensor`: float32, of the tensors' shape.
    """
    import torch

    recipe.check_ingredients(len(thetas), has_base=base is not None)
    if not recipe.needs_base:
        base = None
    _check_inputs(base, thetas, needs_base=recipe.needs_base)
    if slice_elements is not None and (
        isinstance(slice_elements, bool) or not isinstance(slice_elements, int) or slice_elements < 1
    ):
        raise InvalidArgumentError(f"slice_elements={slice_elements!r} must be a positive integer.")
    shape = tuple(thetas[0].shape)
    numel = thetas[0].numel()
    step = numel if slice_elements is None else slice_elements
    bounds = [(s, min(step, numel - s)) for s in range(0, numel, max(step, 1))]

    def sliced(start: int, count: int):
        if slice_elements is None:
            return base, list(thetas)
        b = None if base is None else base.reshape(-1)[start : start + count]
        return b, [th.reshape(-1)[start : start + count] for th in thetas]

    stats = TensorStats(name=tensor_name, numel=numel)
    # pass 1
    if "thresholds" in recipe.needs:
        stats.thresholds = []
        for theta in thetas:  # one whole task vector at a time
            tau = _task_vector(theta, base)
            stats.thresholds.append(magnitude_threshold(tau, recipe.params["density"]))
            del tau
    if recipe.needs & {"task_gram", "weight_gram"}:
        acc = GramAccumulator(len(thetas))
        for start, count in bounds:
            sb, st = sliced(start, count)
            acc.add([_task_vector(th, sb) for th in st] if "task_gram" in recipe.needs else st)
        stats.gram = acc.result()
    # pass 2
    out = torch.empty(numel, dtype=torch.float32)
    for start, count in bounds:
        sb, st = sliced(start, count)
        out[start : start + count] = recipe.combine(sb, st, stats, start).reshape(-1)
    return out.view(shape)
