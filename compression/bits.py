"""Vectorized bit-level codes used by the wire formats (numpy, CPU).

Every function here works on whole arrays at once (no Python loop over coordinates; the few
loops run over bit positions or fixed-size chunks). Encoders take non-negative integer arrays
and return ``numpy.uint8`` arrays; decoders take ``uint8`` arrays and raise
:class:`compression.wire.CodecError` on anything that is not a valid code.

Codes:

* :func:`pack_fixed` / :func:`unpack_fixed` -- fixed width ``w`` bits per value (MSB first),
  ``ceil(n w / 8)`` bytes.
* :func:`pack_base3` / :func:`unpack_base3` -- symbols in {0, 1, 2}, five per byte
  (3^5 = 243 <= 256), i.e. 1.6 bits per symbol.
* :func:`rice_encode` / :func:`rice_decode` -- Golomb-Rice code with parameter ``k`` for
  non-negative run lengths g: quotient ``g >> k`` in unary (``q`` one-bits and a zero-bit)
  and remainder in ``k`` bits, ``q + 1 + k`` bits per value. The unary parts and the
  remainders are written as two separate streams so that both directions vectorize: the
  zero-bits of the unary stream mark where each value ends.
* :func:`varint_encode` / :func:`varint_decode` -- LEB128 (7 bits per byte, high bit set on
  all but the last byte of a value).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from compression.wire import CodecError

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

_CHUNK = 1 << 16


def pack_fixed(values: npt.NDArray[np.integer], width: int) -> U8:
    """Pack non-negative integers ``values < 2**width`` into ``ceil(n * width / 8)`` bytes."""
    n = int(values.size)
    if width == 0 or n == 0:
        return np.zeros(0, dtype=np.uint8)
    if not 1 <= width <= 64:
        raise ValueError(f"bit width must be in 1..64, got {width}")
    if width == 8:
        return values.astype(np.uint8, copy=False).reshape(-1)
    if width == 1:
        return np.packbits(values.astype(np.uint8, copy=False))
    out = np.empty((n * width + 7) // 8, dtype=np.uint8)
    # Chunks of a multiple of 8 values always end on a byte boundary.
    pos = 0
    for start in range(0, n, _CHUNK):
        nb = 4 if width <= 32 else 8
        big = values[start : start + _CHUNK].astype(f">u{nb}")
        bits = np.unpackbits(big.view(np.uint8)).reshape(-1, 8 * nb)[:, 8 * nb - width :]
        packed = np.packbits(bits.reshape(-1))
        out[pos : pos + packed.size] = packed
        pos += packed.size
    return out


def check_fixed_size(data: U8, n: int, width: int) -> None:
    """A fixed-width section of n values of ``width`` bits has ceil(n width / 8) bytes."""
    need = (n * width + 7) // 8
    if data.size != need:
        raise CodecError(f"fixed-width section has {data.size} bytes, expected {need}")


def unpack_fixed(data: U8, n: int, width: int) -> npt.NDArray[np.unsignedinteger]:
    """Inverse of :func:`pack_fixed`: ``n`` values of ``width`` (<= 64) bits from ``data``
    (uint32 for widths up to 32, else uint64)."""
    if width == 0 or n == 0:
        check_fixed_size(data, 0, 0)
        return np.zeros(n, dtype=np.uint32)
    if not 1 <= width <= 64:
        raise CodecError(f"bit width must be in 1..64, got {width}")
    check_fixed_size(data, n, width)
    if width == 8:
        return data.astype(np.uint32)
    if width == 1:
        return np.unpackbits(data, count=n).astype(np.uint32)
    if width < 8:
        # pad each value's bits on the left to one byte and pack: one byte per value
        bits = np.unpackbits(data, count=n * width).reshape(n, width)
        full = np.zeros((n, 8), dtype=np.uint8)
        full[:, 8 - width :] = bits
        return np.packbits(full.reshape(-1)).astype(np.uint32)  # 8 bits per row: a byte
    nb = 4 if width <= 32 else 8
    out: npt.NDArray[np.unsignedinteger] = np.empty(n, dtype=np.uint32 if nb == 4 else np.uint64)
    step = _CHUNK  # multiple of 8 values -> chunk starts on a byte boundary
    for start in range(0, n, step):
        m = min(step, n - start)
        first = start * width // 8
        nbytes = (m * width + 7) // 8
        bits = np.unpackbits(data[first : first + nbytes], count=m * width).reshape(m, width)
        full = np.zeros((m, 8 * nb), dtype=np.uint8)
        full[:, 8 * nb - width :] = bits
        # rows of 8 nb bits: packing the flat array gives each row's nb bytes
        out[start : start + m] = np.packbits(full.reshape(-1)).view(f">u{nb}")
    return out


_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
#: Row v: the five symbols t0..t4 of the base-3 byte v.
BASE3_SYMBOLS = np.array(
    [[(v // 3**j) % 3 for j in range(5)] for v in range(256)], dtype=np.uint8
)  # rows 243..255 are never valid and are rejected before lookup


def pack_base3(symbols: U8) -> U8:
    """Pack symbols in {0, 1, 2} five per byte: byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4."""
    n = int(symbols.size)
    pad = (-n) % 5
    if pad:
        symbols = np.concatenate([symbols, np.zeros(pad, dtype=np.uint8)])
    groups = symbols.reshape(-1, 5)
    out = groups[:, 0].copy()
    for j in range(1, 5):
        out += groups[:, j] * _POW3[j]
    return out


def unpack_base3(data: U8, n: int) -> U8:
    """Inverse of :func:`pack_base3`, ``n`` symbols."""
    check_base3_size(data, n)
    if data.size:
        check_base3_top(int(data.max()))
    return BASE3_SYMBOLS[data].reshape(-1)[:n]


def check_base3_size(data: U8, n: int) -> None:
    """A base-3 section of n symbols has (n + 4) // 5 bytes."""
    if data.size != (n + 4) // 5:
        raise CodecError(f"base-3 section has {data.size} bytes, expected {(n + 4) // 5}")


def check_base3_top(top: int) -> None:
    """The largest byte ``top`` of a base-3 section must be a code (at most 242)."""
    if top > 242:
        raise CodecError("base-3 section holds a byte above 242 (3^5 - 1)")


def rice_cost_bits(gaps: npt.NDArray[np.int64], k: int) -> int:
    """Length in bits of the Rice code of ``gaps`` with parameter ``k``: sum(g>>k) + n(k+1)."""
    return int((gaps >> k).sum()) + int(gaps.size) * (k + 1)


def best_rice_parameter(gaps: npt.NDArray[np.int64]) -> int:
    """The ``k`` minimizing the Rice code length (searched around log2 of the mean gap)."""
    if gaps.size == 0:
        return 0
    mean = float(gaps.mean())
    centre = max(0, int(np.floor(np.log2(mean * np.log(2) + 1e-12))) if mean > 0 else 0)
    candidates = range(max(0, centre - 2), min(40, centre + 3))
    return min(candidates, key=lambda k: rice_cost_bits(gaps, k))


class BitWriter:
    """Appends arrays of bits (uint8 0/1, MSB first) and packs whole bytes as it goes, so a
    long stream is built chunk by chunk with memory bounded by the chunk."""

    def __init__(self) -> None:
        self._bytes: list[U8] = []
        self._pending: U8 = np.zeros(0, dtype=np.uint8)
        self.nbits = 0

    def append(self, bit_array: U8) -> None:
        self.nbits += int(bit_array.size)
        if self._pending.size:
            bit_array = np.concatenate([self._pending, bit_array])
        whole = bit_array.size // 8 * 8
        if whole:
            self._bytes.append(np.packbits(bit_array[:whole]))
        self._pending = bit_array[whole:].copy()

    def finish(self, pad_bit: int = 0) -> U8:
        """The packed stream; a last partial byte is filled with ``pad_bit``."""
        if self._pending.size:
            fill = np.full(8 - self._pending.size, pad_bit, dtype=np.uint8)
            self._bytes.append(np.packbits(np.concatenate([self._pending, fill])))
            self._pending = np.zeros(0, dtype=np.uint8)
        if not self._bytes:
            return np.zeros(0, dtype=np.uint8)
        return np.concatenate(self._bytes)


def fixed_bits(values: npt.NDArray[np.integer], width: int) -> U8:
    """The ``width``-bit binary digits of each value, MSB first, as a flat 0/1 array."""
    if width == 0 or values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if not 1 <= width <= 64:
        raise ValueError(f"bit width must be in 1..64, got {width}")
    # the value's low ``width`` bits: the tail of its big-endian bytes, unpacked eight at a
    # time by table lookup
    nb = 1 if width <= 8 else 2 if width <= 16 else 4 if width <= 32 else 8
    big = values.reshape(-1).astype(np.uint8 if nb == 1 else f">u{nb}")
    bits = np.unpackbits(big.view(np.uint8)).reshape(-1, 8 * nb)
    return bits[:, 8 * nb - width :].reshape(-1)


class RiceWriter:
    """Streaming Rice encoder with parameter ``k`` (see :func:`rice_encode`)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.count = 0
        self._unary = BitWriter()
        self._rem = BitWriter()

    def add(self, values: npt.NDArray[np.int64]) -> None:
        """Append non-negative values."""
        n = int(values.size)
        if n == 0:
            return
        q = values >> self.k
        unary = np.ones(int(q.sum()) + n, dtype=np.uint8)
        unary[np.cumsum(q + 1) - 1] = 0
        self._unary.append(unary)
        if self.k:
            self._rem.append(fixed_bits(values & ((1 << self.k) - 1), self.k))
        self.count += n

    def finish(self) -> tuple[U8, U8]:
        """(unary stream padded with one-bits, remainder stream padded with zero-bits)."""
        return self._unary.finish(pad_bit=1), self._rem.finish(pad_bit=0)


def rice_encode(gaps: npt.NDArray[np.int64], k: int) -> tuple[U8, U8]:
    """Rice-code ``gaps >= 0``: (unary stream, remainder stream).

    The unary stream holds, for each g, ``g >> k`` one-bits followed by one zero-bit; it is
    padded with one-bits to a whole byte. The remainder stream is ``g mod 2^k`` in ``k`` bits.
    """
    writer = RiceWriter(k)
    writer.add(gaps)
    return writer.finish()


def best_rice_parameter_from_counts(counts: npt.NDArray[np.int64]) -> tuple[int, int]:
    """(k, bits) minimizing the Rice code length of a multiset given by its histogram
    (``counts[v]`` values equal to v)."""
    values = np.arange(counts.size, dtype=np.int64)
    n = int(counts.sum())
    best = (0, 0)
    for k in range(max(1, int(counts.size).bit_length() + 1)):
        cost = int((counts * (values >> k)).sum()) + n * (k + 1)
        if k == 0 or cost < best[1]:
            best = (k, cost)
    return best


#: The largest value an int64 holds; the default bound of :func:`rice_decode`.
INT64_MAX = (1 << 63) - 1


def rice_decode(
    unary: U8, rem: U8, n: int, k: int, *, limit: int = INT64_MAX
) -> npt.NDArray[np.int64]:
    """Inverse of :func:`rice_encode`: ``n`` values, each at most ``limit`` (< 2^63).

    Rejects streams that do not hold exactly ``n`` codes, whose padding is not all
    one-bits, or that hold a value above ``limit``. No value can wrap int64: a quotient is
    below the number of unary bits, so when that number shifted by k fits in int64 the
    values are computed and bounded in one pass; otherwise the quotients are bounded first
    (q <= limit >> k, so ``q << k`` cannot wrap)."""
    if not 0 <= k <= 62:
        raise CodecError(f"Rice parameter {k} out of range 0..62")
    if not 0 <= limit <= INT64_MAX:
        raise ValueError(f"limit must be in 0..2^63-1, got {limit}")
    bits = np.unpackbits(unary)
    ends = np.flatnonzero(bits == 0)
    check_rice_streams(n, int(ends.size), bits.size, int(ends[-1]) if ends.size else -1, k, rem)
    q = np.diff(ends, prepend=-1) - 1
    check_rice_quotients(n, bits.size, k, limit, lambda: int(q.max()))
    out = q.astype(np.int64, copy=False)
    if k:
        out = (out << k) | unpack_fixed(rem, n, k).astype(np.int64)
    if n:
        check_rice_top(int(out.max()), limit)
    return out


def check_rice_streams(n: int, codes: int, nbits: int, last_zero: int, k: int, rem: U8) -> None:
    """The stream checks of :func:`rice_decode`: the ``nbits``-bit unary stream holds
    ``codes`` codes (zero-bits, the last at bit ``last_zero``), exactly n, and less than a
    byte of padding after them; no remainder stream when k = 0."""
    if codes != n:
        raise CodecError(f"unary stream holds {codes} codes, header says {n}")
    if n and nbits - last_zero - 1 >= 8:
        raise CodecError("unary stream has a whole byte of padding")
    if k == 0 and rem.size:
        raise CodecError("remainder stream must be empty when k = 0")


def check_rice_quotients(n: int, nbits: int, k: int, limit: int, q_max: Callable[[], int]) -> None:
    """When a quotient (below ``nbits``) shifted by k could pass int64, the largest
    (``q_max()``) must be at most limit >> k."""
    if n and (nbits + 1) << k > INT64_MAX:
        top = q_max()
        if top > limit >> k:
            raise CodecError(f"Rice value above {limit} (quotient {top} with k = {k})")


def check_rice_top(top: int, limit: int) -> None:
    """The largest decoded value ``top`` must be at most ``limit``."""
    if top > limit:
        raise CodecError(f"Rice value {top} above {limit}")


def varint_encode(values: npt.NDArray[np.int64]) -> U8:
    """LEB128-encode non-negative int64 values (vectorized over values, loop over bytes)."""
    v = values.astype(np.uint64)
    nbytes = np.ones(v.size, dtype=np.int64)
    for j in range(1, 10):
        nbytes += v >= np.uint64(1 << (7 * j))
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.zeros(int(ends[-1]) if v.size else 0, dtype=np.uint8)
    for j in range(int(nbytes.max()) if v.size else 0):
        sel = nbytes > j
        byte = ((v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= np.where(nbytes[sel] > j + 1, 0x80, 0).astype(np.uint8)
        out[starts[sel] + j] = byte
    return out


def varint_decode(data: U8, n: int) -> npt.NDArray[np.int64]:
    """Inverse of :func:`varint_encode`: exactly ``n`` values filling ``data`` exactly."""
    last = np.flatnonzero(data < 0x80)
    if last.size != n:
        raise CodecError(f"varint section holds {last.size} values, expected {n}")
    if n == 0:
        if data.size:
            raise CodecError("varint section has trailing bytes")
        return np.zeros(0, dtype=np.int64)
    if int(last[-1]) != data.size - 1:
        raise CodecError("varint section ends inside a value")
    starts = np.concatenate([[0], last[:-1] + 1])
    lengths = last - starts + 1
    if int(lengths.max()) > 9:
        raise CodecError("varint value longer than 9 bytes (above 2^63)")
    out = np.zeros(n, dtype=np.int64)
    for j in range(int(lengths.max())):
        sel = lengths > j
        out[sel] |= (data[starts[sel] + j].astype(np.int64) & 0x7F) << (7 * j)
    return out
