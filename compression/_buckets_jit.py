"""The numba kernels of :mod:`compression._buckets` (imported by it on first use only: importing
this module imports numba). Module-level functions, so that numba's on-disk cache finds them
again in a new process (a closure over other compiled functions gets a new cache key in
every process, and would be compiled again each time)."""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt

from compression._buckets import _GAMMA, _M1, _M2

GAMMA, M1, M2 = np.uint64(_GAMMA), np.uint64(_M1), np.uint64(_M2)
_S30, _S27, _S31, _S40, _S8 = (np.uint64(v) for v in (30, 27, 31, 40, 8))
_LOW24 = np.uint64(0xFFFFFF)
_UNIT = np.float32(2.0**-24)
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


@numba.njit(cache=True, nogil=True, inline="always")
def bucket_uniforms(key: np.uint64, start: int, end: int, u: npt.NDArray[np.float32]) -> int:
    """u_j for j in [start, end) into u[j - base]; returns base = start rounded down
    to even (one 64-bit word per pair of coordinates)."""
    base = start & ~1
    for i in range(base >> 1, (end + 1) >> 1):
        r = word(key, i)
        lo = np.int64((r >> _S8) & _LOW24)
        hi = np.int64(r >> _S40)
        t = 2 * i - base
        u[t] = np.float32(lo) * _UNIT
        u[t + 1] = np.float32(hi) * _UNIT
    return base


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
    ``signs`` (both with room for d); returns their count."""
    d = x.size
    u = np.empty(b + 2, dtype=np.float32)
    n = 0
    for k in range((d + b - 1) // b):
        start = k * b
        end = min(d, start + b)
        nrm = np.float32(bucket_norm(x, start, end, l2))
        norms[k] = nrm
        if not nrm < _INF:
            return -1
        inv = np.float32(1.0) / nrm if nrm > 0 else np.float32(0.0)
        base = bucket_uniforms(key, start, end, u)
        for j in range(start, end):
            v = x[j]
            if u[j - base] < abs(v) * inv:  # taken for ~1/sqrt(d_B) of them
                index[n] = j
                signs[n] = -1 if v < 0 else 1
                n += 1
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
    """Every signed level into ``levels``; returns 0."""
    d = x.size
    fs = np.float32(s)
    u = np.empty(b + 2, dtype=np.float32)
    for k in range((d + b - 1) // b):
        start = k * b
        end = min(d, start + b)
        nrm = np.float32(bucket_norm(x, start, end, l2))
        norms[k] = nrm
        if not nrm < _INF:
            return -1
        inv = fs / nrm if nrm > 0 else np.float32(0.0)
        base = bucket_uniforms(key, start, end, u)
        for j in range(start, end):
            v = x[j]
            lev = np.int16(min(np.floor(abs(v) * inv + u[j - base]), fs))
            levels[j] = -lev if v < 0 else lev
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
