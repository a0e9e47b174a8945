"""Compiled CPU kernels of the bucketed operators: QSGD's quantization and scaled sign.

Each kernel makes one pass over the flat float32 vector x, bucket by bucket (buckets of b
coordinates, the last one may be shorter), doing all of a bucket's work while its values
sit in the L1 cache:

* :func:`qsgd_levels` -- the norm ||x_B|| (L2 or max; sums in float64 over four lanes,
  cast to float32) and the levels xi_j = floor(s |x_j| / ||x_B|| + u_j), signed; for s = 1
  only the non-zero levels, as sorted positions and signs (the sparse fields), since at
  most sqrt(d_B) of a bucket's levels are non-zero on average.
* :func:`sign_pack` -- the scale ||x_B||_1 / d_B (float64 sum, float32) and the sign bits
  (1 iff x_j < 0, MSB first, continuing across buckets); :func:`sign_unpack`, its dense
  (-1)^bit_j scale_B.
* :func:`levels_dense` -- C(x)_j = ||x_B|| v(l_j) from int16 levels and the table v.

Random numbers are counter-based: u_j is the top 24 bits of one half of the 64-bit word
SplitMix64(key + (j >> 1) gamma) (Steele, Lea and Flood, OOPSLA 2014), the low half for
even j, the high half for odd j, with key the SplitMix64 finaliser of the message's seed.
So u_j depends only on (seed, j): no generator state, no bulk draw, and a draw costs a few
instructions inside the loop that uses it (torch's Mersenne Twister draws alone take three
times the whole round-trip budget of a preset's message at d = 10^7). u_j takes the values
k 2^-24 as torch.rand's float32 draws do: P(u_j < p) = ceil(p 2^24) 2^-24, within 2^-24
of p.

Compiled by numba on first use (``cache=True``: later processes load the machine code
from ``__pycache__``); numba is imported only then, as in :mod:`compression._thin`.
A kernel returns -1 when a bucket's norm or scale is not finite (NaN or inf in x, or a
sum that overflows float32); its outputs are then garbage and the caller raises.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["levels_dense", "qsgd_levels", "seed_key", "sign_pack", "sign_unpack"]

_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1

_kernels: dict[str, Any] = {}
#: Row v holds the eight values (-1 if bit set else +1) of byte v, MSB first.
_SIGN_TABLE = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(bool), -1.0, 1.0
).astype(np.float32)


def seed_key(seed: int) -> int:
    """The SplitMix64 finaliser of ``seed`` (0 <= seed < 2^64): the base of the counters."""
    z = (seed + _GAMMA) & _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def uniforms(key: int, n: int) -> npt.NDArray[np.float32]:
    """u_0..u_{n-1} of the kernels for ``key``, in numpy (the reference for tests)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + np.arange((n + 1) // 2, dtype=np.uint64) * np.uint64(_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        z ^= z >> np.uint64(31)
    halves = np.stack([z & np.uint64(0xFFFFFFFF), z >> np.uint64(32)], axis=1).reshape(-1)[:n]
    return ((halves >> np.uint64(8)).astype(np.float64) * 2.0**-24).astype(np.float32)


def _compile() -> dict[str, Any]:
    import numba

    gamma, m1, m2 = np.uint64(_GAMMA), np.uint64(_M1), np.uint64(_M2)
    s30, s27, s31, s40, s8 = (np.uint64(v) for v in (30, 27, 31, 40, 8))
    low24 = np.uint64(0xFFFFFF)
    unit = np.float32(2.0**-24)
    inf = np.inf

    @numba.njit(cache=True, nogil=True, inline="always")
    def word(key: np.uint64, i: int) -> np.uint64:
        z = key + np.uint64(i) * gamma
        z = (z ^ (z >> s30)) * m1
        z = (z ^ (z >> s27)) * m2
        return z ^ (z >> s31)

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
            lo = np.int64((r >> s8) & low24)
            hi = np.int64(r >> s40)
            t = 2 * i - base
            u[t] = np.float32(lo) * unit
            u[t + 1] = np.float32(hi) * unit
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
            if not nrm < inf:
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
            if not nrm < inf:
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
            if not scale < inf:
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

    return {
        "qsgd_sparse": qsgd_sparse_kernel,
        "qsgd_dense": qsgd_dense_kernel,
        "sign_pack": sign_pack_kernel,
        "sign_unpack": sign_unpack_kernel,
        "levels_dense": levels_dense_kernel,
    }


def _kernel(name: str) -> Any:
    if not _kernels:
        _kernels.update(_compile())
    return _kernels[name]


def qsgd_levels(
    x: npt.NDArray[np.float32], b: int, s: int, l2: bool, seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64] | None, npt.NDArray[np.int16]] | None:
    """(norms, index, levels) of QSGD with ``s`` levels on buckets of ``b``: for s = 1 the
    sorted positions of the non-zero levels and their signs (int16 +-1), for s > 1
    ``index`` None and every level (int16, -s..s). None when a norm is not finite."""
    d = x.size
    nb = -(-d // b)
    norms = np.empty(nb, dtype=np.float32)
    if s == 1:
        # pages of the worst case (every level non-zero) are only touched as written
        index = np.empty(d, dtype=np.int64)
        signs = np.empty(d, dtype=np.int16)
        n = _kernel("qsgd_sparse")(x, b, l2, np.uint64(seed_key(seed)), norms, index, signs)
        if n < 0:
            return None
        return norms, index[:n].copy(), signs[:n].copy()
    levels = np.empty(d, dtype=np.int16)
    n = _kernel("qsgd_dense")(x, b, s, l2, np.uint64(seed_key(seed)), norms, levels)
    return None if n < 0 else (norms, None, levels)


def sign_pack(
    x: npt.NDArray[np.float32], b: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]] | None:
    """(scales ||x_B||_1 / d_B, sign bits) of scaled sign on buckets of ``b``; None when a
    scale is not finite."""
    d = x.size
    scales = np.empty(-(-d // b), dtype=np.float32)
    signs = np.empty((d + 7) // 8, dtype=np.uint8)
    if _kernel("sign_pack")(x, b, scales, signs) < 0:
        return None
    return scales, signs


def sign_unpack(
    signs: npt.NDArray[np.uint8], scales: npt.NDArray[np.float32], b: int, d: int
) -> npt.NDArray[np.float32]:
    """(-1)^bit_j scale_B for every coordinate j of bucket B."""
    out = np.empty(d, dtype=np.float32)
    _kernel("sign_unpack")(signs, scales, b, _SIGN_TABLE, out)
    return out


def levels_dense(
    levels: npt.NDArray[np.int16],
    norms: npt.NDArray[np.float32],
    table: npt.NDArray[np.float32],
    s: int,
    b: int,
) -> npt.NDArray[np.float32]:
    """||x_B|| table[l_j + s] for every coordinate j of bucket B."""
    out = np.empty(levels.size, dtype=np.float32)
    _kernel("levels_dense")(levels, norms, table, s, b, out)
    return out
