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
def _sparsify(tbuf, theta, base, b0, m, mode, value_bits, tied_kept, dare_start, dare_limit, density):
    """tbuf[:m] = the trimmed (mode 0) or dropped-and-rescaled (mode 1) task vector of elements b0..b0+m.

    Each loop indexes slices from 0 and writes one array, so that LLVM's loop vectoriser takes it (numba's arrays
    carry no aliasing information: a loop writing several arrays would need more run-time overlap checks than it
    allows, and an offset index a wrap-around check, and either keeps it scalar)."""
    th = theta[b0 : b0 + m]
    bs = base[b0 : b0 + m]
    t = tbuf[:m]
    for j in range(m):
        t[j] = th[j] - bs[j]
    tbits = t.view(np.int32)
    if mode == 0:
        tied = tied_kept - b0  # entries j < tied keep a magnitude equal to the threshold
        for j in range(m):
            # the entries kept: |tau| > threshold, or == threshold at an index up to the last kept tie
            limit = value_bits - 1 if j < tied else value_bits
            a = tbits[j]
            tbits[j] = a if (a & 0x7FFFFFFF) > limit else 0
    else:
        start = dare_start + np.uint64(b0)
        for j in range(m):
            x = (start + np.uint64(j)) & mask32  # lowbias32 of the counter, modulo 2**32
            x ^= x >> np.uint64(16)
            x = (x * np.uint64(0x7FEB352D)) & mask32
            x ^= x >> np.uint64(15)
            x = (x * np.uint64(0x846CA68B)) & mask32
            x ^= x >> np.uint64(16)
            a = tbits[j]
            tbits[j] = a if np.int64(x >> np.uint64(1)) < dare_limit else 0
        for j in range(m):
            t[j] = t[j] / density


@njit(nogil=True, cache=True)
def disjoint(base, thetas, weights, lam, mode, value_bits, tied_kept, dare_start, dare_limit, density, out):
    """TIES (mode 0) or DARE-TIES (mode 1) on one slice: sparsify, elect the sign, disjoint mean, apply."""
    n, count = thetas.shape
    tbuf = np.empty(BLOCK, f32)
    mass = np.empty(BLOCK, f32)
    mbits = mass.view(np.int32)
    ps = np.empty(BLOCK, f32)
    ns = np.empty(BLOCK, f32)
    pc = np.empty(BLOCK, f32)
    nc = np.empty(BLOCK, f32)
    one, zero, minus = f32(1.0), f32(0.0), f32(-1.0)
    for b0 in range(0, count, BLOCK):
        m = min(BLOCK, count - b0)
        ps[:m] = zero
        ns[:m] = zero
        pc[:m] = zero
        nc[:m] = zero
        for i in range(n):
            _sparsify(
                tbuf, thetas[i], base, b0, m, mode, value_bits[i], tied_kept[i], dare_start[i], dare_limit, density,
            )  # fmt: skip
            w = weights[i]
            if i == 0:
                for j in range(m):
                    mass[j] = tbuf[j]
            else:
                for j in range(m):
                    mass[j] = mass[j] + tbuf[j]
            for j in range(m):
                t = tbuf[j]
                p = one if t > zero else zero
                ps[j] = ps[j] + (t * w) * p
                pc[j] = pc[j] + p
            for j in range(m):
                t = tbuf[j]
                sg = minus if t < zero else zero
                ns[j] = ns[j] + (t * w) * sg  # the negated sum of the negative entries
                nc[j] = nc[j] - sg
        o = out[b0 : b0 + m]
        bs = base[b0 : b0 + m]
        for j in range(m):
            pos = ps[j] / max(pc[j], one)
            neg = -(ns[j] / max(nc[j], one))
            d = neg if mbits[j] < 0 else pos  # the elected sign: the sign bit of the mass
            o[j] = d * lam + bs[j]


@njit(nogil=True, cache=True)
def dare_linear(base, thetas, weights, lam, dare_start, dare_limit, density, out):
    """DARE-linear on one slice: drop and rescale each task vector, weight, sum, apply."""
    n, count = thetas.shape
    tbuf = np.empty(BLOCK, f32)
    acc = np.empty(BLOCK, f32)
    for b0 in range(0, count, BLOCK):
        m = min(BLOCK, count - b0)
        for i in range(n):
            _sparsify(tbuf, thetas[i], base, b0, m, 1, 0, 0, dare_start[i], dare_limit, density)
            w = weights[i]
            if i == 0:
                for j in range(m):
                    acc[j] = tbuf[j] * w
            else:
                for j in range(m):
                    acc[j] = acc[j] + tbuf[j] * w
        o = out[b0 : b0 + m]
        bs = base[b0 : b0 + m]
        for j in range(m):
            o[j] = acc[j] * lam + bs[j]


@njit(nogil=True, cache=True)
def _task_slice(out, theta, base, start, task):
    """out[:] = theta - base (rounded to out's dtype) on the elements start..start + out.size, or theta when not
    `task`: one loop over slices indexed from 0, which the compiler vectorises."""
    m = out.size
    th = theta[start : start + m]
    if task:
        bs = base[start : start + m]
        for j in range(m):
            out[j] = th[j] - bs[j]
    else:
        for j in range(m):
            out[j] = th[j]


@njit(nogil=True, cache=True)
def band_scan(theta, base, lo, hi):
    """TIES's threshold scan of a float32 block of the task vector theta - base (of theta itself when `base` is
    empty): the number of magnitudes above `hi`, and the bit patterns and positions of those in [lo, hi].

    Per 1024 elements: the differences, a counting loop and a flagging loop (both vectorised), then the flagged
    entries collected eight flags at a time (most groups of eight hold none)."""
    count = theta.size
    task = base.size > 0
    span = np.uint32(hi - lo)  # a in [lo, hi] <=> a - lo in [0, hi - lo] as unsigned 32-bit integers
    tbuf = np.empty(BLOCK, f32)
    flags = np.zeros(BLOCK, np.uint8)
    groups = flags.view(np.uint64)
    values = np.empty(count, np.int32)  # the worst case; only the entries written are touched
    index = np.empty(count, np.int32)
    above = 0
    k = 0
    for b0 in range(0, count, BLOCK):
        m = min(BLOCK, count - b0)
        t = tbuf[:m]
        _task_slice(t, theta, base, b0, task)
        bits = t.view(np.int32)
        for j in range(m):
            above += np.int64((bits[j] & 0x7FFFFFFF) > hi)
        f = flags[:m]
        for j in range(m):
            f[j] = np.uint8(np.uint32((bits[j] & 0x7FFFFFFF) - lo) <= span)
        whole = m >> 3
        for g in range(whole):
            if groups[g] != 0:
                for j in range(g << 3, (g << 3) + 8):
                    if f[j]:
                        values[k] = bits[j] & 0x7FFFFFFF
                        index[k] = b0 + j
                        k += 1
        for j in range(whole << 3, m):
            if f[j]:
                values[k] = bits[j] & 0x7FFFFFFF
                index[k] = b0 + j
                k += 1
    return above, values[:k].copy(), index[:k].copy()


@njit(nogil=True, cache=True)
def chunk_dots(rows, base, chunk, out):
    """out[p, c] = the float64 dot product of rows i and j (the p-th pair i <= j) on chunk c, of the task vectors
    rows - base when `base` has elements (each difference rounded to float32 first, as the torch path), else of
    the rows themselves. The products (exact in float64) of a chunk are summed by a fixed pairwise tree: halving
    adds down to 16 partial sums, then ((s0 + s8) + (s4 + s12)) + ... (every loop vectorised)."""
    n, count = rows.shape
    task = base.size > 0
    vec = np.empty((n, chunk), rows.dtype)
    tmp = np.empty(chunk, np.float64)
    for c in range(count // chunk):
        lo = c * chunk
        for i in range(n):
            _task_slice(vec[i], rows[i], base, lo, task)
        p = 0
        for i in range(n):
            vi = vec[i]
            for j in range(i, n):
                vj = vec[j]
                for e in range(chunk):
                    tmp[e] = np.float64(vi[e]) * np.float64(vj[e])
                w = chunk // 2
                while w >= 16:
                    for e in range(w):
                        tmp[e] = tmp[e] + tmp[e + w]
                    w //= 2
                s = tmp
                out[p, c] = (((s[0] + s[8]) + (s[4] + s[12])) + ((s[2] + s[10]) + (s[6] + s[14]))) + (
                    ((s[1] + s[9]) + (s[5] + s[13])) + ((s[3] + s[11]) + (s[7] + s[15]))
                )
                p += 1
