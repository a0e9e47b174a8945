"""Compiled CPU kernel of QSGD's thinning for s = 1 (see ``QSGD._compress_thinned``).

Per block k of coordinates (a bucket, or a block of a bucket) with envelope
q_k >= p_j = |x_j| / ||x_B|| for every j in k and lambda_k = -log(1 - q_k): every coordinate
is a candidate independently with probability q_k = 1 - exp(-lambda_k). The candidates are
found by skipping: the number of coordinates between consecutive candidates is
floor(E / lambda_k) with E ~ Exp(1), since P(floor(E / lambda) >= s) = exp(-s lambda) =
(1 - q)^s, the geometric law of the gaps between Bernoulli(q) successes. Candidate j is
kept with probability p_j / q_k, that is when u < |x_j| keep_scale_k with u ~ U[0, 1) and
keep_scale_k = 1 / (||x_B|| q_k). So P(xi_j = 1) = p_j, independently, with about
sum_k d_k q_k draws of each kind instead of d.

The loop over candidates runs as machine code compiled by numba (cached on disk after the
first call); its random numbers come from a ``numpy.random.Generator`` (PCG64) seeded with
the message's seed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["thin"]

_kernel: Any = None


def _compile() -> Any:
    import numba

    @numba.njit(cache=True, nogil=True)
    def kernel(
        x: npt.NDArray[np.float32],
        lam: npt.NDArray[np.float64],
        keep_scale: npt.NDArray[np.float32],
        block: int,
        exp: npt.NDArray[np.float64],
        uni: npt.NDArray[np.float32],
        index: npt.NDArray[np.int64],
        level: npt.NDArray[np.int16],
    ) -> int:
        d = x.size
        n = 0
        ie = 0
        iu = 0
        for k in range(lam.size):
            lk = lam[k]
            if lk <= 0.0:
                continue
            inv = 1.0 / lk
            start = k * block
            length = min(block, d - start)
            fl = float(length)
            scale = keep_scale[k]
            pos = -1
            while True:
                if ie == exp.size:
                    return -2
                pos += 1 + int(min(exp[ie] * inv, fl))
                ie += 1
                if pos >= length:
                    break
                if iu == uni.size:
                    return -2
                j = start + pos
                v = x[j]
                # branch-free: always store, advance only when kept (index has room for
                # one more than the uniforms)
                index[n] = j
                level[n] = -1 if v < 0 else 1
                n += uni[iu] < abs(v) * scale
                iu += 1
        return n

    return kernel


def thin(
    x: npt.NDArray[np.float32],
    lam: npt.NDArray[np.float64],
    keep_scale: npt.NDArray[np.float32],
    block: int,
    seed: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]:
    """Sorted indices and signs (+-1, int16) of the kept coordinates; ``x`` flat float32,
    ``lam`` and ``keep_scale`` per block of ``block`` coordinates (the last may be short).

    The exponentials E and uniforms u are drawn in bulk (numpy's vectorized PCG64
    samplers: E first, then u), enough for the expected number of candidates plus one
    E per block plus 8 standard deviations; in the rare case (below 1e-15) that they run
    out, all are drawn again, twice as many, from the same seed."""
    global _kernel
    if _kernel is None:
        _kernel = _compile()
    d = x.size
    lengths = np.full(lam.size, float(block))
    lengths[-1] = d - (lam.size - 1) * block
    mean = float((lengths * -np.expm1(-lam)).sum())
    spread = 8.0 * math.sqrt(mean) + 64
    n_uni = min(d, int(mean + spread))
    n_exp = min(d, int(mean + spread)) + int(np.count_nonzero(lam > 0))
    while True:
        rng = np.random.Generator(np.random.PCG64(seed))
        exp = rng.standard_exponential(n_exp)
        uni = rng.random(n_uni, dtype=np.float32)
        index = np.empty(n_uni + 1, dtype=np.int64)
        level = np.empty(n_uni + 1, dtype=np.int16)
        n = int(_kernel(x, lam, keep_scale, block, exp, uni, index, level))
        if n >= 0:
            return index[:n].copy(), level[:n].copy()
        n_uni = min(d, 2 * n_uni)
        n_exp = min(d + lam.size, 2 * n_exp)
