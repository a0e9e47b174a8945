"""The numba kernels of :mod:`compression._level_codes` (imported by it on first use only:
importing this module imports numba). Module-level functions, so that numba's on-disk cache
finds them again in a new process.

Bit streams are MSB first, as :mod:`compression.bits` writes them: a writer keeps the bits
not yet written in a 64-bit accumulator and stores each byte as it fills; a reader loads
bytes into one as it needs them. Writers never store past their buffer (they count the bytes
they would have written, and the caller checks the count); readers only read what the
caller has checked is there.
"""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt
from numba.cpython.unsafe.numbers import leading_zeros

_U8 = np.uint64(8)
_BYTE = np.uint64(0xFF)
_ONES32 = np.uint64(0xFFFFFFFF)
_ONE = np.uint64(1)


@numba.njit(cache=True, nogil=True, inline="always")
def put_bits(
    out: npt.NDArray[np.uint8], p: int, acc: np.uint64, nacc: int, value: np.uint64, nbits: int
) -> tuple[int, np.uint64, int]:
    """Append the ``nbits`` (<= 32) low bits of ``value`` (no higher bits set) to the stream
    (out[:p] written, ``nacc`` < 8 bits pending in ``acc``); returns the new (p, acc, nacc).
    (Storing a byte at a time measured three times faster here than four at a time.)"""
    acc = (acc << np.uint64(nbits)) | value
    nacc += nbits
    while nacc >= 8:
        nacc -= 8
        if p < out.size:
            out[p] = np.uint8((acc >> np.uint64(nacc)) & _BYTE)
        p += 1
    return p, acc, nacc


@numba.njit(cache=True, nogil=True, inline="always")
def put_wide(
    out: npt.NDArray[np.uint8], p: int, acc: np.uint64, nacc: int, value: np.uint64, nbits: int
) -> tuple[int, np.uint64, int]:
    """Append the ``nbits`` (<= 64) low bits of ``value``."""
    if nbits > 32:
        p, acc, nacc = put_bits(out, p, acc, nacc, value >> np.uint64(32), nbits - 32)
        return put_bits(out, p, acc, nacc, value & _ONES32, 32)
    if nbits:
        return put_bits(out, p, acc, nacc, value, nbits)
    return p, acc, nacc


@numba.njit(cache=True, nogil=True, inline="always")
def flush(out: npt.NDArray[np.uint8], p: int, acc: np.uint64, nacc: int, pad_ones: bool) -> int:
    """Write the pending bits, the last byte filled with one-bits or zero-bits; returns the
    byte count."""
    while nacc >= 8:
        nacc -= 8
        if p < out.size:
            out[p] = np.uint8((acc >> np.uint64(nacc)) & _BYTE)
        p += 1
    if nacc:
        fill = np.uint64(8 - nacc)
        byte = (acc << fill) & _BYTE
        if pad_ones:
            byte |= (_ONE << fill) - _ONE
        if p < out.size:
            out[p] = np.uint8(byte)
        p += 1
    return p


@numba.njit(cache=True, nogil=True, inline="always")
def end_code(out: npt.NDArray[np.uint8], pos: int) -> None:
    """Clear bit ``pos`` (MSB first) of a stream filled with one-bits: the zero-bit that ends
    a unary code. Writing a unary stream this way costs one store per code whatever its
    length, and no branch."""
    if pos >> 3 < out.size:
        out[pos >> 3] &= ~np.uint8(0x80 >> (pos & 7))


@numba.njit(cache=True, nogil=True, inline="always")
def set_bit(out: npt.NDArray[np.uint8], pos: int, bit: int) -> None:
    """OR ``bit`` (0 or 1) into bit ``pos`` (MSB first) of a zeroed stream."""
    if pos >> 3 < out.size:
        out[pos >> 3] |= np.uint8(bit << (7 - (pos & 7)))


@numba.njit(cache=True, nogil=True, inline="always")
def get_bits(
    data: npt.NDArray[np.uint8], p: int, acc: np.uint64, nacc: int, nbits: int
) -> tuple[np.uint64, int, np.uint64, int]:
    """The next ``nbits`` (<= 32) bits; returns (value, p, acc, nacc)."""
    while nacc < nbits:
        acc = (acc << _U8) | np.uint64(data[p])
        p += 1
        nacc += 8
    nacc -= nbits
    return (acc >> np.uint64(nacc)) & ((_ONE << np.uint64(nbits)) - _ONE), p, acc, nacc


@numba.njit(cache=True, nogil=True, inline="always")
def highest_bit_from_top(w: np.uint64) -> np.int64:
    """How many bits above the highest set bit of w (w != 0): its position MSB first."""
    return np.int64(leading_zeros(w))  # type: ignore[call-arg]


@numba.njit(cache=True, nogil=True)
def histogram_kernel(values: npt.NDArray[np.int16], s: int) -> npt.NDArray[np.int64]:
    """counts[v + s] for v in -s..s; counts[2s + 1] counts the values outside. Eight rows of
    counters, one per position modulo 8, so that runs of equal values do not wait on one
    counter (about twice as fast as one row here; a counting pass per level was slower)."""
    width = 2 * s + 1
    rows = np.zeros((8, width + 1), dtype=np.int64)
    for j in range(values.size):
        t = np.int64(values[j]) + s
        rows[j & 7, t if 0 <= t < width else width] += 1
    return rows.sum(axis=0)


@numba.njit(cache=True, nogil=True)
def run_costs_kernel(
    index: npt.NDArray[np.int64], d: int, k0: int, nk: int
) -> npt.NDArray[np.int64]:
    """sum_i r_i >> k for k = k0..k0+nk-1 (nk <= 5) over the zero runs r_i before each
    position of the sorted ``index`` and after the last (to d); five sums in registers."""
    s0 = s1 = s2 = s3 = s4 = 0
    prev = -1
    n = index.size
    for i in range(n):
        j = index[i]
        r = j - prev - 1
        prev = j
        s0 += r >> k0
        s1 += r >> (k0 + 1)
        s2 += r >> (k0 + 2)
        s3 += r >> (k0 + 3)
        s4 += r >> (k0 + 4)
    r = d - prev - 1
    sums = np.array([s0, s1, s2, s3, s4], dtype=np.int64)
    for t in range(5):
        sums[t] += r >> (k0 + t)
    return sums[:nk]


@numba.njit(cache=True, nogil=True)
def level_run_costs_kernel(
    levels: npt.NDArray[np.int16], k0: int, nk: int
) -> npt.NDArray[np.int64]:
    """:func:`run_costs_kernel` of the positions of the non-zero ``levels``, then their
    count, gathering the positions 4096 levels at a time into a small buffer (branch-free)
    rather than all at once (memory)."""
    s0 = s1 = s2 = s3 = s4 = 0
    count = 0
    prev = -1
    n = levels.size
    kept = np.empty(4096, dtype=np.int64)
    for cs in range(0, n, 4096):
        m = 0
        for j in range(cs, min(n, cs + 4096)):
            kept[m] = j
            m += levels[j] != 0
        for i in range(m):
            r = kept[i] - prev - 1
            prev = kept[i]
            s0 += r >> k0
            s1 += r >> (k0 + 1)
            s2 += r >> (k0 + 2)
            s3 += r >> (k0 + 3)
            s4 += r >> (k0 + 4)
        count += m
    r = n - prev - 1
    sums = np.array([s0, s1, s2, s3, s4, count], dtype=np.int64)
    for t in range(5):
        sums[t] += r >> (k0 + t)
    return np.concatenate((sums[:nk], sums[5:]))


@numba.njit(cache=True, nogil=True)
def sparse_from_levels_kernel(
    levels: npt.NDArray[np.int16], index: npt.NDArray[np.int64], nz: npt.NDArray[np.int16]
) -> int:
    """Positions and values of the non-zero levels (room for all); returns their count."""
    n = 0
    for j in range(levels.size):
        v = levels[j]
        index[n] = j
        nz[n] = v
        n += v != 0
    return n


@numba.njit(cache=True, nogil=True)
def rice_runs_kernel(
    index: npt.NDArray[np.int64],
    d: int,
    k: int,
    unary: npt.NDArray[np.uint8],
    rem: npt.NDArray[np.uint8],
) -> tuple[int, int]:
    """Rice code (parameter k) of the zero runs of the sorted ``index`` (before each position
    and after the last, to d) into ``unary`` (filled with one-bits) and ``rem``; returns the
    byte counts (unary, remainders)."""
    pos = -1
    pr, ar, nr = 0, np.uint64(0), 0
    mask = (_ONE << np.uint64(k)) - _ONE
    prev = -1
    n = index.size
    for i in range(n + 1):
        j = index[i] if i < n else d
        r = j - prev - 1
        prev = j
        pos += (r >> k) + 1
        end_code(unary, pos)
        pr, ar, nr = put_wide(rem, pr, ar, nr, np.uint64(r) & mask, k)
    return (pos + 8) >> 3, flush(rem, pr, ar, nr, False)


@numba.njit(cache=True, nogil=True)
def rice_magnitudes_kernel(
    values: npt.NDArray[np.int16],
    offset: int,
    k: int,
    unary: npt.NDArray[np.uint8],
    rem: npt.NDArray[np.uint8],
    with_signs: bool,
    signs: npt.NDArray[np.uint8],
) -> tuple[int, int, int]:
    """Rice code (parameter k) of |v| - offset for every value into ``unary`` (filled with
    one-bits) and ``rem`` and, when ``with_signs``, in the same pass one sign bit per
    non-zero value (1 iff negative) into ``signs`` (zeroed); returns the byte counts
    (unary, remainders, signs)."""
    pos = -1
    pr, ar, nr = 0, np.uint64(0), 0
    nsigns = 0
    mask = (_ONE << np.uint64(k)) - _ONE
    for v in values:
        m = abs(int(v)) - offset
        pos += (m >> k) + 1
        end_code(unary, pos)
        pr, ar, nr = put_wide(rem, pr, ar, nr, np.uint64(m) & mask, k)
        if with_signs:
            set_bit(signs, nsigns, int(v < 0))
            nsigns += v != 0
    return (pos + 8) >> 3, flush(rem, pr, ar, nr, False), (nsigns + 7) >> 3


@numba.njit(cache=True, nogil=True)
def fixed_magnitudes_kernel(
    values: npt.NDArray[np.int16], offset: int, width: int, out: npt.NDArray[np.uint8]
) -> int:
    """|v| - offset in ``width`` bits for every value; returns the byte count."""
    p, acc, nacc = 0, np.uint64(0), 0
    for v in values:
        p, acc, nacc = put_wide(out, p, acc, nacc, np.uint64(abs(int(v)) - offset), width)
    return flush(out, p, acc, nacc, False)


@numba.njit(cache=True, nogil=True)
def sign_bits_kernel(values: npt.NDArray[np.int16], out: npt.NDArray[np.uint8]) -> int:
    """One bit per non-zero value, 1 iff negative, into ``out`` (zeroed); returns the byte
    count. Branch-free: a zero value ORs a zero-bit where the next sign goes."""
    n = 0
    for v in values:
        set_bit(out, n, int(v < 0))
        n += v != 0
    return (n + 7) >> 3


@numba.njit(cache=True, nogil=True)
def pack_levels_kernel(
    levels: npt.NDArray[np.int16], s: int, width: int, out: npt.NDArray[np.uint8]
) -> int:
    """The dense code: symbol l + s of every level in ``width`` bits; returns the byte
    count."""
    p, acc, nacc = 0, np.uint64(0), 0
    for v in levels:
        p, acc, nacc = put_wide(out, p, acc, nacc, np.uint64(int(v) + s), width)
    return flush(out, p, acc, nacc, False)


@numba.njit(cache=True, nogil=True)
def pack_base3_kernel(levels: npt.NDArray[np.int16], out: npt.NDArray[np.uint8]) -> None:
    """The base3 code of levels in -1..1: symbols t = l + 1 five per byte, t0 + 3 t1 + 9 t2
    + 27 t3 + 81 t4, the last group padded with zero symbols (``out`` has (n + 4) // 5
    bytes)."""
    n = levels.size
    for g in range(out.size):
        byte = 0
        scale = 1
        for t in range(5 * g, min(n, 5 * g + 5)):
            byte += (int(levels[t]) + 1) * scale
            scale *= 3
        out[g] = np.uint8(byte)


@numba.njit(cache=True, nogil=True)
def unpack_levels_kernel(
    data: npt.NDArray[np.uint8], s: int, width: int, out: npt.NDArray[np.int16]
) -> int:
    """Inverse of :func:`pack_levels_kernel` into ``out`` (``data`` holds its exact bytes);
    returns the largest symbol (a level is wrong where it passes 2s)."""
    p, acc, nacc = 0, np.uint64(0), 0
    top = 0
    for j in range(out.size):
        if width > 32:
            hi, p, acc, nacc = get_bits(data, p, acc, nacc, width - 32)
            lo, p, acc, nacc = get_bits(data, p, acc, nacc, 32)
            symbol = int((hi << np.uint64(32)) | lo)
        else:
            value, p, acc, nacc = get_bits(data, p, acc, nacc, width)
            symbol = int(value)
        top = max(top, symbol)
        out[j] = symbol - s
    return top


@numba.njit(cache=True, nogil=True)
def unpack_base3_kernel(
    data: npt.NDArray[np.uint8], table: npt.NDArray[np.uint8], out: npt.NDArray[np.int16]
) -> int:
    """Inverse of :func:`pack_base3_kernel` into ``out`` through ``table`` (row v: the five
    symbols of byte v; ``data`` holds (n + 4) // 5 bytes); returns the largest byte (one
    above 242 is not a code)."""
    n = out.size
    top = 0
    for g in range(data.size):
        byte = int(data[g])
        top = max(top, byte)
        row = table[min(byte, 242)]
        for t in range(5):
            if 5 * g + t < n:
                out[5 * g + t] = np.int16(row[t]) - 1
    return top


@numba.njit(cache=True, nogil=True)
def rice_decode_kernel(
    unary: npt.NDArray[np.uint8],
    rem: npt.NDArray[np.uint8],
    n: int,
    k: int,
    read_rem: bool,
    out: npt.NDArray[np.int64] | npt.NDArray[np.int16],
) -> tuple[int, int, int, np.uint64, int]:
    """Decode up to n Rice codes into ``out`` (values (q << k) | r, the remainders read only
    when ``read_rem``). Returns (codes in the unary stream, bit position of its last zero-bit
    or -1, largest of the n quotients, largest value (uint64, wrapped when q << k overflows),
    number of non-zero values). The unary stream is scanned 64 bits at a time; bits after its
    end count as one-bits."""
    size = unary.size
    count = 0
    prev = -1
    q_max = 0
    v_max = np.uint64(0)
    nonzero = 0
    pr, ar, nr = 0, np.uint64(0), 0
    kk = np.uint64(k)
    for start in range(0, size, 8):
        w = np.uint64(0)
        for t in range(start, start + 8):
            w = (w << _U8) | np.uint64(unary[t] if t < size else 255)
        zeros = ~w
        while zeros:
            lz = highest_bit_from_top(zeros)
            pos = 8 * start + int(lz)
            q = pos - prev - 1
            prev = pos
            if count < n:
                r = np.uint64(0)
                if read_rem:
                    if k > 32:
                        hi, pr, ar, nr = get_bits(rem, pr, ar, nr, k - 32)
                        lo, pr, ar, nr = get_bits(rem, pr, ar, nr, 32)
                        r = (hi << np.uint64(32)) | lo
                    elif k:
                        r, pr, ar, nr = get_bits(rem, pr, ar, nr, k)
                v = (np.uint64(q) << kk) | r
                out[count] = v
                q_max = max(q_max, q)
                v_max = max(v_max, v)
                nonzero += v != 0
            count += 1
            zeros ^= _ONE << np.uint64(63 - lz)
    return count, prev, q_max, v_max, nonzero


@numba.njit(cache=True, nogil=True)
def runs_to_index_kernel(
    runs: npt.NDArray[np.int64], index: npt.NDArray[np.int64]
) -> tuple[int, int, np.int64, np.int64]:
    """index_i = sum_{j <= i} (r_j + 1) - 1 for the n = len(runs) - 1 kept coordinates, in
    int64 arithmetic that wraps as numpy's cumsum does. Returns (min r, max r, min of the
    partial sums, last partial sum)."""
    low = runs[0]
    high = runs[0]
    ends = np.uint64(0)
    ends_min = np.int64(0x7FFFFFFFFFFFFFFF)
    n = runs.size - 1
    for i in range(n + 1):
        r = runs[i]
        low = min(low, r)
        high = max(high, r)
        ends += np.uint64(r) + _ONE
        e = np.int64(ends)
        ends_min = min(ends_min, e)
        if i < n:
            index[i] = e - 1
    return low, high, ends_min, np.int64(ends)


@numba.njit(cache=True, nogil=True)
def signed_levels_kernel(
    mags: npt.NDArray[np.int64], signs: npt.NDArray[np.uint8], out: npt.NDArray[np.int16]
) -> None:
    """out_i = -mags_i where sign bit i is set, else mags_i."""
    for i in range(mags.size):
        neg = (signs[i >> 3] >> (7 - (i & 7))) & 1
        out[i] = -mags[i] if neg else mags[i]


@numba.njit(cache=True, nogil=True)
def apply_signs_kernel(levels: npt.NDArray[np.int16], signs: npt.NDArray[np.uint8]) -> None:
    """Negate the i-th non-zero level where sign bit i is set (``signs`` holds one byte more
    than the bits need). Branch-free: every level is multiplied by +-1."""
    i = 0
    for j in range(levels.size):
        v = levels[j]
        nonzero = v != 0
        bit = (signs[i >> 3] >> (7 - (i & 7))) & 1
        levels[j] = v * (1 - 2 * np.int16(bit))
        i += nonzero


@numba.njit(cache=True, nogil=True)
def scatter_levels_kernel(
    index: npt.NDArray[np.int64],
    nz: npt.NDArray[np.int16],
    norms: npt.NDArray[np.float32],
    table: npt.NDArray[np.float32],
    s: int,
    b: int,
    out: npt.NDArray[np.float32],
) -> None:
    """out[index_i] = table[l_i + s] ||x_B|| with B the bucket of index_i (out zeroed)."""
    if b & (b - 1) == 0:
        shift = 0
        while (1 << shift) < b:
            shift += 1
        for i in range(index.size):
            j = index[i]
            out[j] = table[nz[i] + s] * norms[j >> shift]
    else:
        for i in range(index.size):
            j = index[i]
            out[j] = table[nz[i] + s] * norms[j // b]
