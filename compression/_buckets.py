"""Compiled CPU kernels of the bucketed operators: QSGD's quantization and scaled sign.

Each kernel makes one pass over the flat float32 vector x, bucket by bucket (buckets of b
coordinates, the last one may be shorter), doing all of a bucket's work while its values
sit in the L1 cache (the QSGD kernels block by block, a block being a whole number of
buckets of about 4096 coordinates or 4096 coordinates of a larger bucket: first every
bucket's norm and scale, then the levels in a branch-free loop over pairs of coordinates
that compilers vectorize, then for s = 1 the positions of the non-zero levels):

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

The kernels (:mod:`compression._buckets_jit`) are compiled by numba on first use
(``cache=True``: later processes load the machine code from ``__pycache__``); numba is
imported only then, as in :mod:`compression._thin`, and only for d >= :data:`MIN_NUMEL`
(or the threshold of a `kernels_from` block).
A kernel returns -1 when a bucket's norm or scale is not finite (NaN or inf in x, or a
sum that overflows float32); its outputs are then garbage and the caller raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import numpy.typing as npt

#: Smallest d from which the operators run these kernels on the CPU; below it they run the
#: torch code (the random draws of torch's generator, as before the kernels). A process
#: pays numba's import and the load of the cached machine code once, 0.4 s + 0.3-0.6 s of
#: CPU measured on the loaded 2-core machine (load average 14); in a deployment each
#: message is sent by a fresh ClientApp process, so for models below a few million
#: coordinates that would cost more than the kernels save (docs/compression.md).
MIN_NUMEL = 1 << 22
#: What a long-lived process that encodes and decodes many messages (the server half,
#: `strategies.server_half`) passes to `kernels_from`: from 2^14 coordinates on, the
#: kernels beat the torch code 1.4-13x per message once numba is loaded
#: (docs/compression.md).
LONG_LIVED_MIN_NUMEL = 1 << 14

_kernels_from: ContextVar[int | None] = ContextVar("kernels_from", default=None)


def min_numel() -> int:
    """Smallest d from which the CPU runs the kernels here and now: the value a
    `kernels_from` block in this thread (or task) set, else :data:`MIN_NUMEL`."""
    value = _kernels_from.get()
    return MIN_NUMEL if value is None else value


@contextmanager
def kernels_from(numel: int) -> Iterator[None]:
    """Run the compiled CPU kernels from `numel` coordinates on inside the block (this
    thread or task only). Decoded vectors are the same bit for bit on both paths, so a
    process may use them where its peers do not; the random draws of an encode differ (the
    kernels' counter-based uniforms against torch's generator), so the bytes of a message
    depend on the path, as they do on the seed."""
    if numel < 1:
        raise ValueError(f"kernels_from: numel must be >= 1, got {numel}")
    token = _kernels_from.set(numel)
    try:
        yield
    finally:
        _kernels_from.reset(token)


__all__ = [
    "kernels_from",
    "levels_dense",
    "min_numel",
    "qsgd_levels",
    "seed_key",
    "sign_pack",
    "sign_unpack",
]

_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1

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


def _kernel(name: str) -> Any:
    """The compiled kernel ``name`` (imports numba and loads or compiles on first use)."""
    from compression import _buckets_jit

    return getattr(_buckets_jit, name)


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
        n = _kernel("qsgd_sparse_kernel")(x, b, l2, np.uint64(seed_key(seed)), norms, index, signs)
        if n < 0:
            return None
        return norms, index[:n].copy(), signs[:n].copy()
    levels = np.empty(d, dtype=np.int16)
    n = _kernel("qsgd_dense_kernel")(x, b, s, l2, np.uint64(seed_key(seed)), norms, levels)
    return None if n < 0 else (norms, None, levels)


def sign_pack(
    x: npt.NDArray[np.float32], b: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]] | None:
    """(scales ||x_B||_1 / d_B, sign bits) of scaled sign on buckets of ``b``; None when a
    scale is not finite."""
    d = x.size
    scales = np.empty(-(-d // b), dtype=np.float32)
    signs = np.empty((d + 7) // 8, dtype=np.uint8)
    if _kernel("sign_pack_kernel")(x, b, scales, signs) < 0:
        return None
    return scales, signs


def sign_unpack(
    signs: npt.NDArray[np.uint8], scales: npt.NDArray[np.float32], b: int, d: int
) -> npt.NDArray[np.float32]:
    """(-1)^bit_j scale_B for every coordinate j of bucket B."""
    out = np.empty(d, dtype=np.float32)
    _kernel("sign_unpack_kernel")(signs, scales, b, _SIGN_TABLE, out)
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
    _kernel("levels_dense_kernel")(levels, norms, table, s, b, out)
    return out
