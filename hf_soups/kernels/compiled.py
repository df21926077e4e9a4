"""The numba kernels of [`hf_soups.kernels`] (imported only when numba is installed; compiled on first use and
cached on disk next to this file). See that module for what they do and why the bits match the torch path."""

import numpy as np
from numba import njit

# Elements processed per inner block: the running sums and counts of one block stay in the L1 cache, and each
# inner loop (one ingredient over one block) is a branch-free loop the compiler can vectorise.
BLOCK = 1024

KERNELS = ("chunk_dots", "disjoint", "dare_linear", "band_scan")

f32 = np.float32
mask32 = np.uint64(0xFFFFFFFF)


@njit(nogil=True, cache=True)
def _sparsify(tbuf, tbits, theta, base, b0, m, mode, value_bits, tied_kept, dare_start, dare_limit, density):
    """tbuf[:m] = the trimmed (mode 0) or dropped-and-rescaled (mode 1) task vector of elements b0..b0+m."""
    for j in range(m):
        tbuf[j] = theta[b0 + j] - base[b0 + j]
    if mode == 0:
        for j in range(m):
            # the entries kept: |tau| > threshold, or == threshold at an index up to the last kept tie
            limit = value_bits - 1 if b0 + j < tied_kept else value_bits
            keep = (tbits[j] & 0x7FFFFFFF) > limit
            tbits[j] = tbits[j] if keep else 0
    else:
        for j in range(m):
            x = (dare_start + np.uint64(b0 + j)) & mask32  # lowbias32 of the counter, modulo 2**32
            x ^= x >> np.uint64(16)
            x = (x * np.uint64(0x7FEB352D)) & mask32
            x ^= x >> np.uint64(15)
            x = (x * np.uint64(0x846CA68B)) & mask32
            x ^= x >> np.uint64(16)
            keep = np.int64(x >> np.uint64(1)) < dare_limit
            tbits[j] = tbits[j] if keep else 0
        for j in range(m):
            tbuf[j] = tbuf[j] / density


@njit(nogil=True, cache=True)
def disjoint(base, thetas, weights, lam, mode, value_bits, tied_kept, dare_start, dare_limit, density, out):
    """TIES (mode 0) or DARE-TIES (mode 1) on one slice: sparsify, elect the sign, disjoint mean, apply."""
    n, count = thetas.shape
    tbuf = np.empty(BLOCK, f32)
    tbits = tbuf.view(np.int32)
    mass = np.empty(BLOCK, f32)
    mbits = mass.view(np.int32)
    ps = np.empty(BLOCK, f32)
    ns = np.empty(BLOCK, f32)
    pc = np.empty(BLOCK, f32)
    nc = np.empty(BLOCK, f32)
    one, zero, minus = f32(1.0), f32(0.0), f32(-1.0)
    for b0 in range(0, count, BLOCK):
        m = min(BLOCK, count - b0)
        for j in range(m):
            ps[j] = zero
            ns[j] = zero
            pc[j] = zero
            nc[j] = zero
        for i in range(n):
            _sparsify(
                tbuf, tbits, thetas[i], base, b0, m, mode, value_bits[i], tied_kept[i], dare_start[i],
                dare_limit, density,
            )  # fmt: skip
            w = weights[i]
            for j in range(m):
                t = tbuf[j]
                mass[j] = t if i == 0 else mass[j] + t
                p = one if t > zero else zero
                sg = minus if t < zero else zero
                s = t * w
                ps[j] = ps[j] + s * p
                ns[j] = ns[j] + s * sg  # the negated sum of the negative entries
                pc[j] = pc[j] + p
                nc[j] = nc[j] - sg
        for j in range(m):
            pos = ps[j] / max(pc[j], one)
            neg = -(ns[j] / max(nc[j], one))
            d = neg if mbits[j] < 0 else pos  # the elected sign: the sign bit of the mass
            out[b0 + j] = d * lam + base[b0 + j]


@njit(nogil=True, cache=True)
def dare_linear(base, thetas, weights, lam, dare_start, dare_limit, density, out):
    """DARE-linear on one slice: drop and rescale each task vector, weight, sum, apply."""
    n, count = thetas.shape
    tbuf = np.empty(BLOCK, f32)
    tbits = tbuf.view(np.int32)
    acc = np.empty(BLOCK, f32)
    for b0 in range(0, count, BLOCK):
        m = min(BLOCK, count - b0)
        for i in range(n):
            _sparsify(tbuf, tbits, thetas[i], base, b0, m, 1, 0, 0, dare_start[i], dare_limit, density)
            w = weights[i]
            for j in range(m):
                s = tbuf[j] * w
                acc[j] = s if i == 0 else acc[j] + s
        for j in range(m):
            out[b0 + j] = acc[j] * lam + base[b0 + j]


@njit(nogil=True, cache=True)
def band_scan(tau, lo, hi):
    """TIES's threshold scan of a float32 block: the number of magnitudes above `hi`, and the bit patterns and
    positions of those in [lo, hi]."""
    bits = tau.view(np.int32)
    above = 0
    inside = 0
    for j in range(bits.size):
        a = bits[j] & 0x7FFFFFFF
        above += a > hi
        inside += (a >= lo) & (a <= hi)
    values = np.empty(inside, np.int32)
    index = np.empty(inside, np.int32)
    k = 0
    for j in range(bits.size):
        a = bits[j] & 0x7FFFFFFF
        if a >= lo and a <= hi:
            values[k] = a
            index[k] = j
            k += 1
    return above, values, index


@njit(nogil=True, cache=True)
def chunk_dots(rows, chunk, out):
    """out[p, c] = the float64 dot product of rows i and j (the p-th pair i <= j) on chunk c: 8 partial sums
    over the chunk's elements (element e into sum e % 8), added as ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + ...)."""
    n, count = rows.shape
    for c in range(count // chunk):
        p = 0
        lo = c * chunk
        for i in range(n):
            for j in range(i, n):
                s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
                for e in range(lo, lo + chunk, 8):
                    s0 += np.float64(rows[i, e]) * np.float64(rows[j, e])
                    s1 += np.float64(rows[i, e + 1]) * np.float64(rows[j, e + 1])
                    s2 += np.float64(rows[i, e + 2]) * np.float64(rows[j, e + 2])
                    s3 += np.float64(rows[i, e + 3]) * np.float64(rows[j, e + 3])
                    s4 += np.float64(rows[i, e + 4]) * np.float64(rows[j, e + 4])
                    s5 += np.float64(rows[i, e + 5]) * np.float64(rows[j, e + 5])
                    s6 += np.float64(rows[i, e + 6]) * np.float64(rows[j, e + 6])
                    s7 += np.float64(rows[i, e + 7]) * np.float64(rows[j, e + 7])
                out[p, c] = ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))
                p += 1
