"""The compiled CPU path of the level codes of :mod:`compression.levels` (dense, rice, sparse),
used from ``_buckets.MIN_NUMEL`` coordinates on: the same bytes as the numpy code of
:mod:`compression.bits`, and on decode the same checks in the same order with the same
:class:`CodecError` messages (the checks are the functions of :mod:`compression.bits` and
:mod:`compression._tensors`, fed with what the kernels count).

Each step is one pass of a numba kernel (:mod:`compression._level_codes_jit`, imported on
first use as :mod:`compression._buckets_jit` is) over the sorted positions and levels of the
non-zero levels, or over all d levels:

* planning: the level histogram; the Rice costs sum_i (r_i >> k) of the zero runs r_i for
  the candidate k's in one pass over the positions (over dense levels, 4096 at a time);
* encoding: zero runs, magnitudes (Rice or fixed width) and sign bits, each straight into
  a byte buffer of its exact or bounded size; the dense code's symbols (fixed width, or
  five per byte for s = 1);
* decoding: the Rice streams (64 bits of the unary stream at a time) with the counts the
  checks need, the dense code's symbols, zero runs to positions, signs onto the
  magnitudes, and the scatter of the sparse levels into the zeroed dense output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from compression import bits
from compression._tensors import check_run_bounds, check_run_sums
from compression.wire import CodecError

__all__ = [
    "apply_signs",
    "decode_dense",
    "encode_dense",
    "encode_rice",
    "encode_sparse",
    "histogram",
    "rice_decode",
    "run_costs",
    "runs_to_index",
    "scatter_levels",
    "signed_levels",
    "sparse_from_levels",
]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
I16 = npt.NDArray[np.int16]


def _kernel(name: str) -> Any:
    """The compiled kernel ``name`` (imports numba and loads or compiles on first use)."""
    from compression import _level_codes_jit

    return getattr(_level_codes_jit, name)


def histogram(values: I16, s: int) -> I64:
    """counts[l + s] = number of values equal to l, for l in -s..s."""
    counts: I64 = _kernel("histogram_kernel")(values, s)
    if counts[-1]:
        raise ValueError(f"{int(counts[-1])} levels outside -{s}..{s}")
    return counts[:-1]


def run_costs(positions: I64 | I16, d: int, ks: range, *, levels: bool = False) -> dict[int, int]:
    """Bits of the Rice code of the n + 1 zero runs of the sorted positions (before each and
    after the last, to d) for each k of ``ks`` (at most five): sum_i (r_i >> k) +
    (n + 1)(k + 1). With ``levels``, ``positions`` are the d levels and the positions those
    of the non-zero ones (counted without gathering them)."""
    if len(ks) > 5:
        raise ValueError(f"at most five Rice parameters at a time, got {len(ks)}")
    if levels:
        sums = _kernel("level_run_costs_kernel")(positions, ks.start, len(ks))
        runs = int(sums[-1]) + 1
    else:
        sums = _kernel("run_costs_kernel")(positions, d, ks.start, len(ks))
        runs = positions.size + 1
    return {k: int(sums[t]) + runs * (k + 1) for t, k in enumerate(ks)}


def sparse_from_levels(levels: I16) -> tuple[I64, I16]:
    """(positions, values) of the non-zero levels."""
    index = np.empty(levels.size, dtype=np.int64)
    nz = np.empty(levels.size, dtype=np.int16)
    n = _kernel("sparse_from_levels_kernel")(levels, index, nz)
    return index[:n], nz[:n]


def _trimmed(buf: U8, used: int, exact: bool) -> U8:
    """The first ``used`` bytes of ``buf``, after checking the kernel stayed inside it."""
    if used > buf.size or (exact and used != buf.size):
        raise RuntimeError(f"a level-code kernel wrote {used} bytes into a {buf.size}-byte buffer")
    return buf[:used]


def _rice_magnitudes(
    values: I16, offset: int, k: int, unary_bound: int, with_signs: bool = False
) -> tuple[U8, U8, U8]:
    """Rice streams of |v| - offset (parameter k) for every value, the unary stream at most
    ``unary_bound`` bits; and when ``with_signs`` the sign bits of the non-zero values."""
    unary = np.full((unary_bound + 7) // 8, 255, dtype=np.uint8)
    rem = np.empty((values.size * k + 7) // 8, dtype=np.uint8)
    signs = np.zeros((values.size + 7) // 8 if with_signs else 0, dtype=np.uint8)
    pu, pr, ps = _kernel("rice_magnitudes_kernel")(values, offset, k, unary, rem, with_signs, signs)
    return _trimmed(unary, pu, False), _trimmed(rem, pr, True), _trimmed(signs, ps, False)


def _sign_bits(values: I16) -> U8:
    """One bit per non-zero value, 1 iff negative."""
    out = np.zeros((values.size + 7) // 8, dtype=np.uint8)
    return _trimmed(out, _kernel("sign_bits_kernel")(values, out), False)


def encode_rice(levels: I16, k: int, s: int) -> tuple[U8, U8, U8]:
    """The sections of the rice code: every |l_j| (at most s) Rice-coded with parameter k
    (unary stream, remainders), then the sign bits of the non-zero levels; one pass."""
    return _rice_magnitudes(levels, 0, k, levels.size * ((s >> k) + 1), with_signs=True)


def encode_dense(levels: I16, s: int) -> U8:
    """The dense code's section: for s = 1 the symbols l + 1 five per byte (base3), else
    l + s in (2s).bit_length() bits."""
    if s == 1:
        out = np.empty((levels.size + 4) // 5, dtype=np.uint8)
        _kernel("pack_base3_kernel")(levels, out)
        return out
    width = (2 * s).bit_length()
    out = np.empty((levels.size * width + 7) // 8, dtype=np.uint8)
    return _trimmed(out, _kernel("pack_levels_kernel")(levels, s, width, out), True)


def decode_dense(data: U8, d: int, s: int) -> I16:
    """The d levels of the dense code's section, with the numpy path's checks: the
    section's size, and no byte above 242 (base3) or symbol above 2s."""
    out = np.empty(d, dtype=np.int16)
    if s == 1:
        bits.check_base3_size(data, d)
        bits.check_base3_top(int(_kernel("unpack_base3_kernel")(data, bits.BASE3_SYMBOLS, out)))
        return out
    width = (2 * s).bit_length()
    bits.check_fixed_size(data, d, width)
    if d and int(_kernel("unpack_levels_kernel")(data, s, width, out)) > 2 * s:
        raise CodecError(f"level symbol above 2s = {2 * s}")
    return out


def encode_sparse(
    index: I64, nz: I16, d: int, k_runs: int, k_mags: int | None, width: int
) -> tuple[U8, U8, U8, U8, U8]:
    """The sections of the sparse code: the zero runs Rice-coded with parameter ``k_runs``
    (unary, remainders), the sign bits, and |l_i| - 1 Rice-coded with ``k_mags`` (unary,
    remainders) or, when ``k_mags`` is None, an empty section and |l_i| - 1 in ``width``
    bits."""
    n = index.size
    # the runs add up to d - n: at most (d - n) >> k one-bits and n + 1 zero-bits
    unary = np.full((((d - n) >> k_runs) + n + 1 + 7) // 8, 255, dtype=np.uint8)
    rem = np.empty(((n + 1) * k_runs + 7) // 8, dtype=np.uint8)
    pu, pr = _kernel("rice_runs_kernel")(index, d, k_runs, unary, rem)
    runs_unary, runs_rem = _trimmed(unary, pu, False), _trimmed(rem, pr, True)
    signs = _sign_bits(nz)
    if k_mags is None:
        fixed = np.empty((n * width + 7) // 8, dtype=np.uint8)
        used = _kernel("fixed_magnitudes_kernel")(nz, 1, width, fixed)
        return runs_unary, runs_rem, signs, np.zeros(0, np.uint8), _trimmed(fixed, used, True)
    bound = n * ((_max_magnitude(nz) >> k_mags) + 1)
    mags_unary, mags_rem, _ = _rice_magnitudes(nz, 1, k_mags, bound)
    return runs_unary, runs_rem, signs, mags_unary, mags_rem


def _max_magnitude(nz: I16) -> int:
    return int(np.abs(nz.astype(np.int32)).max()) if nz.size else 0


def rice_decode(
    unary: U8, rem: U8, n: int, k: int, limit: int, dtype: type[np.integer[Any]] = np.int64
) -> tuple[npt.NDArray[Any], int]:
    """:func:`compression.bits.rice_decode` in one compiled pass: (the n values, as
    ``dtype``, which must hold ``limit``; how many are non-zero), with the same checks."""
    if not 0 <= k <= 62:
        raise CodecError(f"Rice parameter {k} out of range 0..62")
    if not 0 <= limit <= bits.INT64_MAX or limit > np.iinfo(dtype).max:
        raise ValueError(f"limit must be in 0..{np.iinfo(dtype).max}, got {limit}")
    nbits = 8 * unary.size
    codes = nbits - int(np.bitwise_count(unary).sum(dtype=np.int64))  # its zero-bits
    if codes != n:  # the first check: before anything of size n is allocated
        bits.check_rice_streams(n, codes, nbits, -1, k, rem)
    out = np.empty(n, dtype=dtype)
    rem_ok = rem.size == (n * k + 7) // 8 if k else True
    codes, last, q_max, v_max, nonzero = _kernel("rice_decode_kernel")(
        unary, rem, n, k, bool(k) and rem_ok, out
    )
    bits.check_rice_streams(n, codes, nbits, last, k, rem)
    bits.check_rice_quotients(n, nbits, k, limit, lambda: int(q_max))
    if k:
        bits.check_fixed_size(rem, n, k)
    if n:
        bits.check_rice_top(int(v_max), limit)
    return out, int(nonzero)


def runs_to_index(runs: I64, d: int, what: str = "zero runs") -> I64:
    """:func:`compression._tensors.runs_to_index` in one compiled pass, same checks."""
    n = int(runs.size) - 1
    if n < 0:
        raise CodecError(f"{what}: none")
    index = np.empty(n, dtype=np.int64)
    low, high, ends_min, last = _kernel("runs_to_index_kernel")(runs, index)
    check_run_bounds(what, n, d, int(low), int(high))
    check_run_sums(what, n, d, lambda: int(ends_min), int(last))
    return index


def signed_levels(mags: I64, signs: U8) -> I16:
    """-m_i where sign bit i is set, else m_i (``signs`` holds at least len(mags) bits)."""
    out = np.empty(mags.size, dtype=np.int16)
    _kernel("signed_levels_kernel")(mags, signs, out)
    return out


def apply_signs(levels: I16, signs: U8) -> None:
    """Negate, in place, the i-th non-zero level where sign bit i is set (``signs`` holds at
    least one bit per non-zero level)."""
    padded = np.zeros(signs.size + 1, dtype=np.uint8)  # the kernel reads one byte ahead
    padded[:-1] = signs
    _kernel("apply_signs_kernel")(levels, padded)


def scatter_levels(
    index: I64,
    nz: I16,
    norms: npt.NDArray[np.float32],
    table: npt.NDArray[np.float32],
    s: int,
    b: int,
    d: int,
) -> npt.NDArray[np.float32]:
    """The dense C(x): table[l_i + s] ||x_B|| at the sorted positions ``index`` (in 0..d-1,
    levels in -s..s), zero elsewhere (calloc'd zeros: pages are zeroed as first written)."""
    out = np.zeros(d, dtype=np.float32)
    _kernel("scatter_levels_kernel")(index, nz, norms, table, s, b, out)
    return out
