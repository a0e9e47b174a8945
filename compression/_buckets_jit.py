"""The numba kernels of :mod:`compression._buckets` (imported by it on first use only: importing
this module imports numba). Module-level functions, so that numba's on-disk cache finds them
again in a new process (a closure over other compiled functions gets a new cache key in
every process, and would be compiled again each time)."""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt
from numba.cpython.unsafe.numbers import trailing_zeros

from compression._buckets import _GAMMA, _M1, _M2

GAMMA, M1, M2 = np.uint64(_GAMMA), np.uint64(_M1), np.uint64(_M2)
_S30, _S27, _S31, _S40, _S8 = (np.uint64(v) for v in (30, 27, 31, 40, 8))
_LOW24 = np.uint64(0xFFFFFF)
_UNIT = np.float32(2.0**-24)
_GATHER = np.uint64(0x0102040810204080)
_S56 = np.uint64(56)
_INF = np.inf


@numba.njit(cache=True, nogil=True, inline="always")
def word(key: np.uint64, i: int) -> np.uint64:
    z = key + np.uint64(i) * GAMMA
    z = (z ^ (z >> _S30)) * M1
    z = (z ^ (z >> _S27)) * M2
    return z ^ (z >> _S31)


@numba.njit(cache=True, nogil=True, inline="always")
def bucket_norm(x: npt.NDArray[np.float32], start: int, end: int, l2: bool) -> float:
    a0 = a1 = a2 = a3 = 0.0
    j = start
    if l2:
        while j + 4 <= end:
            v0, v1, v2, v3 = float(x[j]), float(x[j + 1]), float(x[j + 2]), float(x[j + 3])
            a0 += v0 * v0
            a1 += v1 * v1
            a2 += v2 * v2
            a3 += v3 * v3
            j += 4
        while j < end:
            v = float(x[j])
            a0 += v * v
            j += 1
        return np.sqrt((a0 + a1) + (a2 + a3))
    m = 0.0
    while j < end:
        v = abs(float(x[j]))
        if v > m or v != v:  # NaN propagates
            m = v
        j += 1
    return m


#: Coordinates per block of the QSGD kernels: a whole number of buckets when d_B <= BLOCK
#: (an even number of them when d_B is odd, so that a block starts on a word of uniforms),
#: else BLOCK coordinates of one bucket; with its scales and flags (5 bytes a coordinate)
#: it stays in the L1 cache.
BLOCK = 4096


@numba.njit(cache=True, nogil=True, inline="always")
def block_length(b: int) -> int:
    if b > BLOCK:
        return BLOCK
    buckets = BLOCK // b
    return (buckets + (buckets & b & 1)) * b


@numba.njit(cache=True, nogil=True, inline="always")
def block_scales(
    x: npt.NDArray[np.float32],
    bs: int,
    be: int,
    b: int,
    l2: bool,
    s: np.float32,
    inv: np.float32,
    norms: npt.NDArray[np.float32],
    scale: npt.NDArray[np.float32],
) -> np.float32:
    """The prologue of both QSGD kernels for the block [bs, be): for each bucket B that
    starts in it, norms[B] = ||x_B|| and inv = s / ||x_B|| (0 for a zero norm); scale[j - bs]
    = inv of j's bucket. ``inv`` comes in as the scale of a bucket begun in an earlier block
    and goes out as the last one's; -1 when a norm is not finite."""
    d = x.size
    k = bs // b
    start = k * b
    while start < be:
        end = min(d, start + b)
        if start >= bs:
            nrm = np.float32(bucket_norm(x, start, end, l2))
            norms[k] = nrm
            if not nrm < _INF:
                return np.float32(-1.0)
            inv = s / nrm if nrm > 0 else np.float32(0.0)
        scale[max(start, bs) - bs : min(end, be) - bs] = inv  # a slice: vectorized
        start += b
        k += 1
    return inv


@numba.njit(cache=True, nogil=True, inline="always")
def lowest_bit(w: np.uint64) -> np.int64:
    """Position of the lowest set bit of w (w != 0)."""
    return np.int64(trailing_zeros(w))  # type: ignore[call-arg]


@numba.njit(cache=True, nogil=True, inline="always")
def low_uniform(r: np.uint64) -> np.float32:
    """u of the even coordinate of word r: its low half's top 24 bits, times 2^-24."""
    return np.float32(np.int32((r >> _S8) & _LOW24)) * _UNIT


@numba.njit(cache=True, nogil=True, inline="always")
def high_uniform(r: np.uint64) -> np.float32:
    """u of the odd coordinate of word r: its high half's top 24 bits, times 2^-24."""
    return np.float32(np.int32(r >> _S40)) * _UNIT


@numba.njit(cache=True, nogil=True)
def qsgd_sparse_kernel(
    x: npt.NDArray[np.float32],
    b: int,
    l2: bool,
    key: np.uint64,
    norms: npt.NDArray[np.float32],
    index: npt.NDArray[np.int64],
    signs: npt.NDArray[np.int16],
) -> int:
    """s = 1: positions of the non-zero levels into ``index`` and their signs into
    ``signs`` (both with room for d); returns their count. Block by block: the scales,
    then the flags u_j < |x_j| inv_B in a branch-free loop over pairs of coordinates (one
    word of uniforms each), then the flagged positions, 64 flags at a time."""
    d = x.size
    length = block_length(b)
    scale = np.empty(length, dtype=np.float32)
    flags = np.zeros((length + 63) & ~63, dtype=np.uint8)
    groups = flags.view(np.uint64)
    inv = np.float32(0.0)
    n = 0
    for bs in range(0, d, length):
        be = min(d, bs + length)
        inv = block_scales(x, bs, be, b, l2, np.float32(1.0), inv, norms, scale)
        if inv < 0:
            return -1
        m = be - bs
        xb = x[bs:be]
        first = bs >> 1  # blocks start on even coordinates
        for i in range(m >> 1):
            r = word(key, first + i)
            flags[2 * i] = low_uniform(r) < abs(xb[2 * i]) * scale[2 * i]
            flags[2 * i + 1] = high_uniform(r) < abs(xb[2 * i + 1]) * scale[2 * i + 1]
        if m & 1:
            t = m - 1
            flags[t] = low_uniform(word(key, first + (t >> 1))) < abs(xb[t]) * scale[t]
        for t in range(m, (m + 63) & ~63):
            flags[t] = 0
        for g in range(0, ((m + 63) >> 6) << 3, 8):
            # 64 flags as the bits of one word: byte i of a group (0 or 1, little endian)
            # lands on bit 56 + i of its product with _GATHER
            w = np.uint64(0)
            for q in range(8):
                w |= ((groups[g + q] * _GATHER) >> _S56) << np.uint64(8 * q)
            while w:
                t = 8 * g + int(lowest_bit(w))
                index[n] = bs + t
                signs[n] = -1 if xb[t] < 0 else 1
                n += 1
                w &= w - np.uint64(1)
    return n


@numba.njit(cache=True, nogil=True)
def qsgd_dense_kernel(
    x: npt.NDArray[np.float32],
    b: int,
    s: int,
    l2: bool,
    key: np.uint64,
    norms: npt.NDArray[np.float32],
    levels: npt.NDArray[np.int16],
) -> int:
    """Every signed level into ``levels``; returns 0. Block by block: the scales, then the
    levels over pairs of coordinates (one word of uniforms each)."""
    d = x.size
    fs = np.float32(s)
    length = block_length(b)
    scale = np.empty(length, dtype=np.float32)
    inv = np.float32(0.0)
    for bs in range(0, d, length):
        be = min(d, bs + length)
        inv = block_scales(x, bs, be, b, l2, fs, inv, norms, scale)
        if inv < 0:
            return -1
        m = be - bs
        xb = x[bs:be]
        out = levels[bs:be]
        first = bs >> 1
        for i in range(m >> 1):
            r = word(key, first + i)
            v0, v1 = xb[2 * i], xb[2 * i + 1]
            l0 = np.int16(min(np.floor(abs(v0) * scale[2 * i] + low_uniform(r)), fs))
            l1 = np.int16(min(np.floor(abs(v1) * scale[2 * i + 1] + high_uniform(r)), fs))
            out[2 * i] = -l0 if v0 < 0 else l0
            out[2 * i + 1] = -l1 if v1 < 0 else l1
        if m & 1:
            t = m - 1
            v = xb[t]
            u = low_uniform(word(key, first + (t >> 1)))
            lev = np.int16(min(np.floor(abs(v) * scale[t] + u), fs))
            out[t] = -lev if v < 0 else lev
    return 0


@numba.njit(cache=True, nogil=True)
def sign_pack_kernel(
    x: npt.NDArray[np.float32],
    b: int,
    scales: npt.NDArray[np.float32],
    signs: npt.NDArray[np.uint8],
) -> int:
    d = x.size
    acc = 0
    nbits = 0
    out = 0
    for k in range((d + b - 1) // b):
        start = k * b
        end = min(d, start + b)
        a0 = a1 = a2 = a3 = 0.0
        j = start
        while j + 4 <= end:
            a0 += abs(float(x[j]))
            a1 += abs(float(x[j + 1]))
            a2 += abs(float(x[j + 2]))
            a3 += abs(float(x[j + 3]))
            j += 4
        while j < end:
            a0 += abs(float(x[j]))
            j += 1
        scale = np.float32(((a0 + a1) + (a2 + a3)) / (end - start))
        scales[k] = scale
        if not scale < _INF:
            return -1
        for j in range(start, end):
            acc = (acc << 1) | (1 if x[j] < 0 else 0)
            nbits += 1
            if nbits == 8:
                signs[out] = acc
                out += 1
                acc = 0
                nbits = 0
    if nbits:
        signs[out] = acc << (8 - nbits)
    return 0


@numba.njit(cache=True, nogil=True)
def sign_unpack_kernel(
    signs: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    b: int,
    table: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
) -> None:
    d = out.size
    for k in range((d + b - 1) // b):
        start = k * b
        end = min(d, start + b)
        scale = scales[k]
        j = start
        while j < end and (j & 7 or j + 8 > end):  # up to a whole byte inside B
            out[j] = table[signs[j >> 3], j & 7] * scale
            j += 1
        while j + 8 <= end:  # whole bytes: eight coordinates from one table row
            row = table[signs[j >> 3]]
            for t in range(8):
                out[j + t] = row[t] * scale
            j += 8
        while j < end:
            out[j] = table[signs[j >> 3], j & 7] * scale
            j += 1


@numba.njit(cache=True, nogil=True)
def levels_dense_kernel(
    levels: npt.NDArray[np.int16],
    norms: npt.NDArray[np.float32],
    table: npt.NDArray[np.float32],
    s: int,
    b: int,
    out: npt.NDArray[np.float32],
) -> None:
    d = out.size
    for k in range((d + b - 1) // b):
        start = k * b
        end = min(d, start + b)
        nrm = norms[k]
        for j in range(start, end):
            out[j] = table[levels[j] + s] * nrm
