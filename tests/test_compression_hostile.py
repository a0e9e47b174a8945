"""Hostile payloads: well-framed messages (valid header, section lengths and CRC-32) whose
fields hold extreme values: zero runs and Rice quotients that overflow int64, counts,
shapes and bucket sizes that do not add up, NaN/inf norms, scales and values.

The property, for every operator and code: ``decode(p, expected_numel=d)`` raises
:class:`CodecError`, or returns a message whose ``dense()`` works and has exactly the
declared shape, with finite values wherever the format promises them (float32/float64;
float16/bfloat16 may overflow to inf when C(x) exceeds their range, never NaN).

The payloads are built here byte by byte, independently of ``compression.wire``; a first
test checks that builder against the real encoders.
"""

from __future__ import annotations

import math
import struct
import tracemalloc
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compression import CodecError, _buckets, decode, parse_compressor
from compression import bits as B
from compression.levels import LevelQuantizer
from compression.wire import FORMAT_VERSION, MAGIC

OPS = {
    "identity": 0,
    "qsgd": 1,
    "natural": 2,
    "dither": 3,
    "randk": 4,
    "topk": 5,
    "scaled_sign": 6,
    "sign": 7,
}
DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64}
NP_DTYPES = {0: np.float32, 1: np.float16, 3: np.float64}
INT64_MAX = (1 << 63) - 1
T = TypeVar("T")


# ----------------------------------------------------------------------------- the builder
class Frame:
    """A payload written field by field: header, operator fields, sections, CRC-32."""

    def __init__(self, op: str, shape: tuple[int, ...], dtype_code: int = 0) -> None:
        self.buf = bytearray(MAGIC) + bytes([FORMAT_VERSION, OPS[op], dtype_code, len(shape)])
        for n in shape:
            self.varint(n)

    def u8(self, value: int) -> Frame:
        self.buf.append(value)
        return self

    def varint(self, value: int) -> Frame:
        while True:
            byte, value = value & 0x7F, value >> 7
            self.buf.append(byte | (0x80 if value else 0))
            if not value:
                return self

    def section(self, data: bytes) -> Frame:
        self.varint(len(data))
        self.buf += data
        return self

    def payload(self) -> bytes:
        return bytes(self.buf) + struct.pack("<I", zlib.crc32(self.buf))


def pack_bits(bitstring: str, pad: str) -> bytes:
    """MSB-first bytes of a string of 0/1, the last byte filled with ``pad``."""
    bitstring += pad * (-len(bitstring) % 8)
    return bytes(int(bitstring[i : i + 8], 2) for i in range(0, len(bitstring), 8))


def rice_streams(pairs: list[tuple[int, int]], k: int) -> tuple[bytes, bytes]:
    """Rice code of the values (q << k) | r, given as (quotient, remainder) pairs: the unary
    stream (q one-bits and a zero-bit each, padded with ones) and the k-bit remainders."""
    unary = "".join("1" * q + "0" for q, _ in pairs)
    rem = "".join(format(r, f"0{k}b") for _, r in pairs) if k else ""
    return pack_bits(unary, "1"), pack_bits(rem, "0")


def rice_of(values: list[int], k: int) -> tuple[bytes, bytes]:
    return rice_streams([(v >> k, v & ((1 << k) - 1)) for v in values], k)


def leb128(values: list[int]) -> bytes:
    out = bytearray()
    for v in values:
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def floats(values: Sequence[float], dtype_code: int = 0) -> bytes:
    """Little-endian bytes of ``values`` in the dtype of ``dtype_code`` (out of range: inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = np.array(values, dtype=np.float32)
        if dtype_code == 2:  # bfloat16: the high half of the float32 pattern
            return (f32.view(np.uint32) >> 16).astype("<u2").tobytes()
        return np.array(values, dtype=NP_DTYPES[dtype_code]).tobytes()


def sparse_qsgd(
    d: int,
    runs: list[int],
    *,
    k: int = 62,
    s: int = 1,
    bucket: int = 0,
    norms: list[float] | None = None,
    neg: list[bool] | None = None,
) -> bytes:
    """A QSGD sparse-code payload (magnitudes 1, in fixed width) with the given zero runs
    (nnz + 1 of them), signs (default all positive) and norms (default 1 per bucket)."""
    nnz = len(runs) - 1
    nb = -(-d // (bucket or d))
    f = Frame("qsgd", (d,)).varint(s).varint(bucket).u8(0)  # s, bucket, norm = l2
    f.u8(1).section(floats(norms if norms is not None else [1.0] * nb))  # sparse code, norms
    f.u8(k).u8(255).varint(nnz)  # k_runs, fixed-width magnitudes, nnz
    for part in rice_of(runs, k):
        f.section(part)
    f.section(pack_bits("".join("1" if n else "0" for n in neg or [False] * nnz), "0"))
    f.section(b"").section(pack_bits("0" * nnz * (s - 1).bit_length(), "0"))
    return f.payload()


def topk_varint(d: int, gaps: list[int], values: list[float] | None = None) -> bytes:
    k = len(gaps) - 1
    f = Frame("topk", (d,)).varint(k)
    f.section(floats(values if values is not None else [1.0] * k))
    return f.u8(0).section(leb128(gaps)).payload()


# ----------------------------------------------------------------------------- checks
def decode_or_refuse(payload: bytes, d: int) -> str:
    """Decode with the receiver's expected size; either CodecError or a dense() of exactly
    the declared shape, finite for float32/float64 and never NaN."""
    try:
        m = decode(payload, expected_numel=d)
    except CodecError as exc:
        assert str(exc), "a CodecError must say what was wrong"
        return "refused"
    y = m.dense()
    assert y.numel() == d == m.numel and tuple(y.shape) == m.shape and y.dtype == m.dtype
    if y.dtype in (torch.float32, torch.float64):
        assert bool(torch.isfinite(y).all()), f"non-finite values from {m!r}"
    else:
        assert not bool(torch.isnan(y).any()), f"NaN from {m!r}"
    if d > 1:  # any other expected size is refused before decoding
        with pytest.raises(CodecError, match="expects"):
            decode(payload, expected_numel=d - 1)
    return "decoded"


def test_builder_writes_what_the_encoders_write() -> None:
    """The hand-built frames are byte for byte the encoders' payloads (so the hostile cases
    below are the real wire format with chosen values)."""
    x = torch.zeros(300)
    x[[3, 40, 41, 299]] = torch.tensor([1.0, -2.0, 3.0, 4.0])
    m = parse_compressor("topk:k=4").compress(x, seed=0)
    assert m.code == "varint"
    assert m.to_bytes() == topk_varint(300, [3, 36, 0, 257, 0], [1.0, -2.0, 3.0, 4.0])
    m = parse_compressor("qsgd:s=1,bucket=0").compress(x, seed=0)
    sent = m.to_bytes_with("sparse")
    fields = decode(sent).fields
    idx = fields["index"].numpy()
    runs = [int(r) for r in np.diff(np.append(idx, 300), prepend=-1) - 1]
    k = sent[19]  # header 10, s/bucket/norm 3, code 1, norms section 5: then k_runs
    neg = [bool(v < 0) for v in fields["nzlevels"].numpy()]
    norm = float(fields["norms"][0])
    assert sent == sparse_qsgd(300, runs, k=k, norms=[norm], neg=neg)


# ----------------------------------------------------------------------------- regressions
def test_zero_runs_that_wrap_int64_are_refused() -> None:
    """The issue's payload: runs [2^63-1, 2^63-1, 100] sum to 100 - 2 modulo 2^64, so
    they 'add up' to d = 100 with nnz = 2; their positions are out of range."""
    runs = [INT64_MAX, INT64_MAX, 100]
    for payload in (sparse_qsgd(100, runs), topk_varint(100, runs)):
        with pytest.raises(CodecError, match="run"):
            decode(payload)
        with pytest.raises(CodecError, match="run"):
            decode(payload, expected_numel=100)


def test_rice_quotients_that_overflow_the_shift_are_refused() -> None:
    # q = 4, k = 62: (4 << 62) wraps to 0 in int64, so the value would read as r
    unary, rem = rice_streams([(4, 5)], 62)
    with pytest.raises(CodecError, match="above"):
        B.rice_decode(np.frombuffer(unary, np.uint8), np.frombuffer(rem, np.uint8), 1, 62)
    # through a payload: one zero run (nnz = 0) of (4 << 62) | 96, which int64 wraps to 96 = d
    f = Frame("qsgd", (96,)).varint(1).varint(0).u8(0).u8(1).section(floats([1.0]))
    f.u8(62).u8(255).varint(0)
    for part in rice_streams([(4, 96)], 62):
        f.section(part)
    f.section(b"").section(b"").section(b"")
    with pytest.raises(CodecError, match="above"):
        decode(f.payload(), expected_numel=96)
    # a value at the limit is accepted, one above it is not
    u95, r95 = (np.frombuffer(b, np.uint8) for b in rice_of([95], 3))
    assert B.rice_decode(u95, r95, 1, 3, limit=95).tolist() == [95]
    with pytest.raises(CodecError, match="above 94"):
        B.rice_decode(u95, r95, 1, 3, limit=94)


def test_a_declaration_of_2_pow_31_coordinates_is_refused_without_allocating() -> None:
    """A 60-byte, valid sparse message of 2^31 zeros (one run, Rice k = 31): refused against
    the receiver's size before anything of size d exists."""
    d = 1 << 31
    payload = sparse_qsgd(d, [d], k=31)
    assert len(payload) < 64
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=r"declares 2147483648 coordinates.*expects 1000"):
            decode(payload, expected_numel=1000)
        with pytest.raises(CodecError, match="limit"):
            decode(payload)  # no expected size: the per-byte cap
        with pytest.raises(CodecError, match="limit"):
            decode(payload, max_numel=1 << 30)
        wide = Frame("sign", (1 << 30, 1 << 30)).section(bytes(8)).payload()
        with pytest.raises(CodecError, match="format's limit 2\\^48"):
            decode(wide, max_numel=1 << 70)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # numpy reports its buffers to tracemalloc: nothing of size d
    # the same message at a size the receiver expects decodes (all zeros)
    small = sparse_qsgd(1000, [1000], k=9)
    y = decode(small, expected_numel=1000).dense()
    assert y.shape == (1000,) and not bool(y.any())


def test_a_64_kib_payload_declaring_2_pow_31_coordinates_is_refused() -> None:
    """Under the per-byte default cap (2^15 per byte) 64 KiB would allow 2^31 coordinates:
    the expected size refuses it first, naming both sizes."""
    d = 1 << 31
    f = Frame("identity", (d,)).section(bytes(65536))
    with pytest.raises(CodecError, match="expects 4096"):
        decode(f.payload(), expected_numel=4096)


def test_expected_numel_is_checked_for_every_operator() -> None:
    x = torch.randn(300, generator=torch.Generator().manual_seed(1))
    for spec in ("identity", "qsgd", "natural", "dither", "randk", "topk", "scaled_sign", "sign"):
        payload = parse_compressor(spec).compress(x, seed=3).to_bytes()
        assert decode(payload, expected_numel=300).numel == 300
        for wrong in (1, 299, 301, 1 << 40):
            with pytest.raises(CodecError, match=f"declares 300 coordinates.*expects {wrong}"):
                decode(payload, expected_numel=wrong)
    assert decode(payload, expected_numel=np.int64(300)).numel == 300  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected_numel"):
        decode(payload, expected_numel=0)
    with pytest.raises(TypeError, match="expected_numel"):
        decode(payload, expected_numel=300.0)  # type: ignore[arg-type]


def test_non_finite_floats_in_a_payload_are_refused() -> None:
    d = 64
    nan, inf = math.nan, math.inf
    for bad in (nan, inf, -inf):
        cases = [
            Frame("identity", (d,)).section(floats([1.0] * (d - 1) + [bad])),
            Frame("scaled_sign", (d,)).varint(0).section(floats([bad])).section(bytes(8)),
            Frame("topk", (d,)).varint(1).section(floats([bad])).u8(0).section(leb128([0, 63])),
            Frame("randk", (d,)).varint(1).u8(1).varint(7).section(floats([bad])),
        ]
        for f in cases:
            with pytest.raises(CodecError, match="NaN or inf"):
                decode(f.payload(), expected_numel=d)
        with pytest.raises(CodecError, match="NaN or inf"):
            decode(sparse_qsgd(d, [3, 60], norms=[bad]), expected_numel=d)
    # finite values whose image C(x) overflows float32: rand-k's d/k scale, float64 values
    f = Frame("randk", (d,)).varint(1).u8(1).varint(7).section(floats([3e38]))
    with pytest.raises(CodecError, match="overflow"):
        decode(f.payload(), expected_numel=d)
    f = Frame("identity", (2,), dtype_code=3).section(floats([1.0, 1e300], 3))
    with pytest.raises(CodecError, match="float32"):
        decode(f.payload(), expected_numel=2)
    f = Frame("natural", (8,)).section(bytes(1)).section(bytes([127] * 7 + [255]))
    with pytest.raises(CodecError, match="exponent 255"):
        decode(f.payload(), expected_numel=8)
    # negative norms and scales cannot come from an encoder either
    with pytest.raises(CodecError, match="negative"):
        decode(sparse_qsgd(d, [3, 60], norms=[-1.0]), expected_numel=d)


def test_index_and_count_errors_name_what_was_wrong() -> None:
    cases = {
        "zero runs": sparse_qsgd(100, [10, 10, 10]),  # runs + nnz = 32, not 100
        "nnz": Frame("qsgd", (10,))
        .varint(1)
        .varint(0)
        .u8(0)
        .u8(1)
        .section(floats([1.0]))
        .u8(0)
        .u8(255)
        .varint(11)
        .payload(),
        "top-k zero runs": topk_varint(10, [3, 3, 3]),
        "top-k bitmap": Frame("topk", (10,))
        .varint(2)
        .section(floats([1.0, 2.0]))
        .u8(1)
        .section(bytes([0xFF, 0xC0]))
        .payload(),
        "rand-k": Frame("randk", (10,)).varint(0).u8(1).varint(0).section(b"").payload(),
        "level symbol above": Frame("qsgd", (3,))
        .varint(2)
        .varint(0)
        .u8(0)
        .u8(0)
        .section(floats([1.0]))
        .section(pack_bits("111" * 3, "0"))
        .payload(),
        "fixed-width section": Frame("qsgd", (3,))
        .varint(1)
        .varint(0)
        .u8(0)
        .u8(1)
        .section(floats([1.0]))
        .u8(0)
        .u8(255)
        .varint(1)
        .section(rice_of([0, 2], 0)[0])
        .section(b"")
        .section(bytes(1))
        .section(b"")
        .section(b"\x00")
        .payload(),
    }
    for what, payload in cases.items():
        with pytest.raises(CodecError, match=what):
            decode(payload)


def test_the_server_drops_hostile_uplinks_and_the_round_goes_on() -> None:
    """ServerHalf.receive decodes against the model size: the overflowing runs and a
    declaration of 2^31 coordinates are dropped replies, the round still commits."""
    from strategies.consistency import DIGEST_BYTES
    from strategies.messages import Uplink
    from strategies.registry import get_preset, make_server
    from strategies.settings import resolve_settings

    dim = 100
    s = resolve_settings(get_preset("diana"), dim, pp_variant="pp1", seed=4)
    server = make_server(s, torch.zeros(dim))
    server.begin_round(1)
    for i in range(4):
        server.downlink_for(1, i)
    digest = b"\0" * DIGEST_BYTES  # never checked: the payloads are refused before
    hostile = [
        sparse_qsgd(dim, [INT64_MAX, INT64_MAX, 100]),
        topk_varint(dim, [INT64_MAX, INT64_MAX, 100]),
        sparse_qsgd(1 << 31, [1 << 31], k=31),
    ]
    for node, payload in enumerate(hostile):
        assert server.receive(1, node, Uplink(1, "ok", payload, 0, digest, 1.0, 10)) == "dropped"
    good = parse_compressor(s.uplink).compress(torch.ones(dim), seed=1).to_bytes()
    honest = server.pending[3].expected_digest  # the state the server expects node 3 to hold
    assert server.receive(1, 3, Uplink(1, "ok", good, 0, honest, 1.0, 10)) == "ok"
    stats = server.finish_round(1, 3.0)
    assert stats.dropped == 3 and stats.accepted == 1
    assert bool(torch.isfinite(server.w).all()) and bool(server.w.any())


# ----------------------------------------------------------------------------- strategies
@dataclass
class Case:
    payload: bytes
    d: int


#: sizes: small, around byte and bucket boundaries
dims = st.one_of(st.integers(1, 40), st.sampled_from([63, 64, 65, 255, 256, 257]))
#: floats of every kind a payload can carry: NaN, inf, -0, subnormals, float32's extremes
any_float = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1.0, 3.4028235e38, 1e-45]),
)
pos_float = st.one_of(st.floats(0, 2.0**100, width=32), any_float)
huge = st.sampled_from([INT64_MAX, INT64_MAX - 1, 1 << 62, 1 << 63, 1 << 64, (1 << 64) - 1])


@st.composite
def counted(draw: st.DrawFn, n: int, elements: st.SearchStrategy[T]) -> list[T]:
    """A list of n elements, or of a size off by a little (consistency checks)."""
    size = draw(st.one_of(st.just(n), st.just(n), st.integers(max(0, n - 2), n + 2)))
    return draw(st.lists(elements, min_size=size, max_size=size))


@st.composite
def float_section(
    draw: st.DrawFn, n: int, elements: st.SearchStrategy[float], dt: int = 0, low: float = -1e3
) -> bytes:
    """n floats: sensible ones (in [low, 1e3]), or (one time in three) some extreme ones
    among them; the count is sometimes off by a little."""
    sane = st.floats(low, 1e3, width=32)
    mixed = draw(st.integers(0, 2)) == 0
    values = draw(counted(n, st.one_of(sane, sane, sane, elements) if mixed else sane))
    return floats(values, dt)


@st.composite
def composition(draw: st.DrawFn, total: int, parts: int) -> list[int]:
    """``parts`` non-negative integers adding up to ``total`` (valid zero runs)."""
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=parts - 1, max_size=parts - 1)))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


@st.composite
def runs_for(draw: st.DrawFn, d: int, nnz: int) -> list[int]:
    """nnz + 1 zero runs: valid, off by one, or with values at and past 2^63."""
    valid = draw(composition(max(0, d - nnz), nnz + 1)) if nnz <= d else [0] * (nnz + 1)
    kind = draw(st.sampled_from(["valid", "valid", "off", "extreme"]))
    if kind == "off":
        i = draw(st.integers(0, nnz))
        valid[i] = max(0, valid[i] + draw(st.sampled_from([-1, 1])))
    elif kind == "extreme":
        for _ in range(draw(st.integers(1, 3))):
            valid[draw(st.integers(0, nnz))] = draw(st.one_of(huge, st.integers(0, 1 << 64)))
    return valid


@st.composite
def rice_section_pair(draw: st.DrawFn, values: list[int], k: int) -> tuple[bytes, bytes]:
    """The Rice streams of ``values`` with parameter k where the quotients stay short;
    values too large for that get a random (quotient <= 300, remainder) pair instead,
    whose value may pass 2^63 (k up to 63)."""
    pairs = []
    for v in values:
        q, r = v >> k, v & ((1 << k) - 1)
        if q > 300:
            q = draw(st.integers(0, 300))
        pairs.append((q, r))
    unary, rem = rice_streams(pairs, k)
    if draw(st.integers(0, 9)) == 0:  # a stray padding byte or a missing one
        unary = unary + b"\xff" if draw(st.booleans()) else unary[:-1]
    return unary, rem


def rice_k(limit: int) -> st.SearchStrategy[int]:
    """A Rice parameter: mostly one that keeps quotients short, sometimes 62..255."""
    fit = max(0, limit.bit_length() - 6)
    return st.one_of(st.integers(fit, min(fit + 4, 62)), st.sampled_from([0, 61, 62, 63, 64, 255]))


@st.composite
def level_case(draw: st.DrawFn, op: str) -> Case:
    """QSGD or natural dithering: params, norms, and one of the dense, Rice or sparse codes."""
    d = draw(dims)
    if op == "qsgd":
        s = draw(st.one_of(st.sampled_from([1, 1, 2, 3, 5, 256, 32767]), st.integers(0, 40000)))
    else:
        s = draw(st.one_of(st.sampled_from([1, 2, 8, 64]), st.integers(0, 70)))
    bucket = draw(st.one_of(st.sampled_from([0, 0, 1, 3, 16, d, d + 1]), huge, st.integers(0, 700)))
    f = Frame(op, (d,)).varint(s).varint(min(bucket, (1 << 70) - 1))
    if op == "qsgd":
        f.u8(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 255])))
    code = draw(st.sampled_from([0, 1, 2, 1, 2, 3, 255]))
    f.u8(code)
    b = d if bucket == 0 or bucket > d else bucket
    f.section(draw(float_section(-(-d // b), pos_float, low=0.0)))
    s_ok = max(1, min(s, 32767))
    if code == 0:
        if s_ok == 1:
            data = draw(counted((d + 4) // 5, st.one_of(st.integers(0, 242), st.integers(0, 255))))
            f.section(bytes(data))
        else:
            width = (2 * s_ok).bit_length()
            sym = draw(
                counted(d, st.one_of(st.integers(0, 2 * s_ok), st.integers(0, 2**width - 1)))
            )
            f.section(pack_bits("".join(format(v, f"0{width}b") for v in sym), "0"))
    elif code == 2:
        k = draw(rice_k(s_ok))
        mags = draw(counted(d, st.one_of(st.integers(0, s_ok), st.integers(0, s_ok), huge)))
        f.u8(k)
        for part in draw(rice_section_pair(mags, min(k, 63))):
            f.section(part)
        nnz = sum(1 for m in mags if m)
        f.section(bytes(draw(counted((nnz + 7) // 8, st.integers(0, 255)))))
    elif code == 1:
        nnz = draw(st.one_of(st.integers(0, d), st.integers(0, d), st.sampled_from([d + 1]), huge))
        k = draw(rice_k(max(1, d // (nnz + 1) if nnz <= d else 1)))
        k_mags = draw(st.sampled_from([255, 255, 0, 1, 62, 63, 254]))
        f.u8(k).u8(k_mags).varint(nnz)
        m = min(nnz, d + 2)  # how many non-zeros the sections below describe
        for part in draw(rice_section_pair(draw(runs_for(d, m)), min(k, 63))):
            f.section(part)
        f.section(bytes(draw(counted((m + 7) // 8, st.integers(0, 255)))))
        if k_mags == 255:
            width = (s_ok - 1).bit_length()
            vals = draw(counted(m, st.integers(0, 2**width - 1)))
            f.section(b"").section(pack_bits("".join(format(v, f"0{width}b") for v in vals), "0"))
        else:
            vals = draw(counted(m, st.one_of(st.integers(0, s_ok - 1), huge)))
            for part in draw(rice_section_pair(vals, min(k_mags, 63))):
                f.section(part)
    else:
        f.section(draw(st.binary(max_size=20)))
    return Case(f.payload(), d)


@st.composite
def natural_case(draw: st.DrawFn) -> Case:
    d = draw(dims)
    f = Frame("natural", (d,))
    f.section(bytes(draw(counted((d + 7) // 8, st.integers(0, 255)))))
    exps = st.integers(0, 254)
    if draw(st.integers(0, 2)) == 0:
        exps = st.one_of(exps, st.sampled_from([0, 1, 127, 254, 255]))
    f.section(bytes(draw(counted(d, exps))))
    return Case(f.payload(), d)


@st.composite
def values_case(draw: st.DrawFn, op: str) -> Case:
    """identity, rand-k and top-k: float values of any dtype, plus k, seed and indices."""
    d = draw(dims)
    dt = draw(st.sampled_from([0, 0, 1, 2, 3]))
    f = Frame(op, (d,), dtype_code=dt)
    big = st.one_of(any_float, st.sampled_from([1e300, -1e300, 65504.0, 1e5]))
    if op == "identity":
        f.section(draw(float_section(d, big, dt)))
        return Case(f.payload(), d)
    k = draw(st.one_of(*[st.integers(1, d)] * 4, st.sampled_from([0, d + 1]), huge))
    f.varint(k)
    n = min(k, d + 1)
    if op == "randk":
        f.u8(draw(st.sampled_from([0, 1, 1, 2])))
        f.varint(draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**64 - 1]))))
        f.section(draw(float_section(n, big, dt)))
        return Case(f.payload(), d)
    f.section(draw(float_section(n, big, dt)))
    code = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
    f.u8(code)
    if code == 0:
        gaps = draw(runs_for(d, n))
        as_bytes = leb128([g & ((1 << 70) - 1) for g in gaps])
        if draw(st.integers(0, 9)) == 0:  # an over-long value (10+ bytes) or a cut one
            as_bytes = b"\xff" * 10 + as_bytes if draw(st.booleans()) else as_bytes[:-1]
        f.section(as_bytes)
    elif code == 1:
        marks = draw(counted(d, st.booleans()))
        f.section(pack_bits("".join("1" if m else "0" for m in marks), "0"))
    else:
        f.section(draw(st.binary(max_size=10)))
    return Case(f.payload(), d)


@st.composite
def sign_case(draw: st.DrawFn, op: str) -> Case:
    d = draw(dims)
    f = Frame(op, (d,))
    if op == "scaled_sign":
        bucket = draw(st.one_of(st.sampled_from([0, 0, 1, 7, d, d + 1]), huge, st.integers(0, 700)))
        f.varint(min(bucket, (1 << 70) - 1))
        b = d if bucket == 0 or bucket > d else bucket
        f.section(draw(float_section(-(-d // b), pos_float, low=0.0)))
    f.section(bytes(draw(counted((d + 7) // 8, st.integers(0, 255)))))
    return Case(f.payload(), d)


CASES: dict[str, st.SearchStrategy[Case]] = {
    "identity": values_case("identity"),
    "qsgd": level_case("qsgd"),
    "natural": natural_case(),
    "dither": level_case("dither"),
    "randk": values_case("randk"),
    "topk": values_case("topk"),
    "scaled_sign": sign_case("scaled_sign"),
    "sign": sign_case("sign"),
}


@pytest.mark.parametrize("op", list(CASES))
@given(data=st.data())
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_hostile_payloads_decode_to_the_declared_size_or_raise_codec_error(
    op: str, data: st.DataObject
) -> None:
    case = data.draw(CASES[op])
    decode_or_refuse(case.payload, case.d)


# ------------------------------------------------------- the compiled level codes (d >= 2^22)
def _outcome(payload: bytes, d: int) -> tuple[str, np.ndarray | None]:
    """("decoded", dense) or ("CodecError: message", None)."""
    try:
        y = decode(payload, expected_numel=d).dense()
    except CodecError as exc:
        return f"CodecError: {exc}", None
    return "decoded", y.to(torch.float64).numpy()


def _same_on_both_paths(payload: bytes, d: int, *, min_numel: int | None = None) -> str:
    """Decode with the compiled level codes and with the numpy ones: the same CodecError
    message, or the same dense output. Returns the outcome."""
    with pytest.MonkeyPatch.context() as mp:
        if min_numel is not None:
            mp.setattr(_buckets, "MIN_NUMEL", min_numel)
        assert LevelQuantizer._compiled(d)
        compiled = _outcome(payload, d)
        mp.setattr(LevelQuantizer, "_compiled_codes", False)
        numpy_path = _outcome(payload, d)
    assert compiled[0] == numpy_path[0]
    if compiled[1] is not None and numpy_path[1] is not None:
        assert np.array_equal(compiled[1], numpy_path[1], equal_nan=True)
    return compiled[0]


BIG = (1 << 22) + 5  # above _buckets.MIN_NUMEL: the compiled path in production


def test_hostile_sparse_payloads_at_compiled_sizes_get_the_numpy_paths_errors() -> None:
    d = BIG
    cases = {
        "do not add up": sparse_qsgd(d, [10, 10, 10]),
        "quotient": sparse_qsgd(d, [INT64_MAX, INT64_MAX, 100]),  # would wrap int64
        "above 4194308": sparse_qsgd(d, [d + 5, 0]),  # a run past d - nnz
    }
    for what, payload in cases.items():
        outcome = _same_on_both_paths(payload, d)
        assert outcome.startswith("CodecError") and what in outcome, outcome
    # the Rice streams: codes count, padding, remainders with k = 0, quotients that overflow
    # the shift, remainder length, values above the limit, signs and magnitudes
    runs = [d - 2, 0, 0]

    def frame(
        k: int,
        runs_unary: bytes,
        runs_rem: bytes,
        *,
        signs: bytes = b"\x00",
        s: int = 1,
        k_mags: int = 255,
        mags: tuple[bytes, bytes] = (b"", b""),
    ) -> bytes:
        f = Frame("qsgd", (d,)).varint(s).varint(0).u8(0).u8(1).section(floats([1.0]))
        f.u8(k).u8(k_mags).varint(2).section(runs_unary).section(runs_rem).section(signs)
        return f.section(mags[0]).section(mags[1]).payload()

    unary, rem = rice_of(runs, 20)
    good = frame(20, unary, rem)
    assert _same_on_both_paths(good, d) == "decoded"
    bad = {
        "holds 2 codes": frame(20, rice_of(runs[:2], 20)[0], rem),
        "whole byte of padding": frame(20, unary + b"\xff", rem),
        "must be empty when k = 0": frame(0, rice_of(runs, 0)[0], b"\x00"),
        "quotient": frame(62, *rice_streams([(5, 0), (0, 0), (0, 0)], 62)),
        "fixed-width section": frame(20, unary, rem + b"\x00"),
        "sign section": frame(20, unary, rem, signs=b""),
        "level above s": frame(20, unary, rem, s=3, mags=(b"", bytes([0b11110000]))),
        "magnitudes - 1": frame(20, unary, rem, s=3, k_mags=0, mags=rice_of([0, 7], 0)),
    }
    for what, payload in bad.items():
        outcome = _same_on_both_paths(payload, d)
        assert outcome.startswith("CodecError") and what in outcome, (what, outcome)


def test_hostile_rice_payloads_at_compiled_sizes_get_the_numpy_paths_errors() -> None:
    d = BIG
    mags = [0] * d
    mags[7], mags[d - 1] = 2, 1

    def frame(unary: bytes, rem: bytes, signs: bytes, k: int = 1, s: int = 2) -> bytes:
        f = Frame("qsgd", (d,)).varint(s).varint(0).u8(0).u8(2).section(floats([1.0]))
        return f.u8(k).section(unary).section(rem).section(signs).payload()

    unary, rem = B.rice_encode(np.array(mags, dtype=np.int64), 1)
    u, r = bytes(unary), bytes(rem)
    assert _same_on_both_paths(frame(u, r, b"\x80"), d) == "decoded"
    bad = {
        "sign section": frame(u, r, b""),
        "above 1": frame(u, r, b"\x80", s=1),  # level 2 with s = 1
        "codes": frame(u[:-1], r, b"\x80"),
        "fixed-width section": frame(u, r[:-1], b"\x80"),
    }
    for what, payload in bad.items():
        outcome = _same_on_both_paths(payload, d)
        assert outcome.startswith("CodecError") and what in outcome, (what, outcome)


@pytest.mark.parametrize("op", ["qsgd", "dither"])
@given(data=st.data())
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_hostile_level_payloads_decode_alike_on_the_compiled_and_numpy_paths(
    op: str, data: st.DataObject
) -> None:
    """The kernels run from d = 1 here: every hostile level payload gets the same
    CodecError message, or the same dense output, from both paths."""
    case = data.draw(CASES[op])
    _same_on_both_paths(case.payload, case.d, min_numel=1)


def test_a_compiled_size_declaring_every_level_non_zero_is_refused_without_allocating() -> None:
    """nnz = d at d >= 2^22 with a one-byte unary stream: the count of codes is checked
    before the compiled decoder allocates its n values."""
    d = BIG
    f = Frame("qsgd", (d,)).varint(1).varint(0).u8(0).u8(1).section(floats([1.0]))
    f.u8(3).u8(255).varint(d).section(b"\x00").section(bytes(1))  # 8 codes, not d + 1
    payload = f.section(b"").section(b"").section(b"").payload()
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="holds 8 codes"):
            decode(payload, expected_numel=d)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert _same_on_both_paths(payload, d).startswith("CodecError")


def test_hostile_dense_payloads_at_compiled_sizes_get_the_numpy_paths_errors() -> None:
    d = BIG

    def frame(s: int, data: bytes) -> bytes:
        f = Frame("qsgd", (d,)).varint(s).varint(0).u8(0).u8(0).section(floats([1.0]))
        return f.section(data).payload()

    base3 = bytearray([121]) * ((d + 4) // 5)  # symbols 1: level 0
    width = 3  # s = 2: symbols in 3 bits
    dense = bytearray(bytes([0b01001001, 0b00100100, 0b10010010]) * (d * width // 24 + 1))
    dense = dense[: (d * width + 7) // 8]
    assert _same_on_both_paths(frame(1, bytes(base3)), d) == "decoded"
    assert _same_on_both_paths(frame(2, bytes(dense)), d) == "decoded"
    bad_byte, bad_symbol = bytearray(base3), bytearray(dense)
    bad_byte[-1] = 250
    bad_symbol[len(dense) // 2] = 0xFF  # symbols 7 > 2s = 4
    cases = {
        "byte above 242": frame(1, bytes(bad_byte)),
        "base-3 section has": frame(1, bytes(base3[:-1])),
        "symbol above 2s = 4": frame(2, bytes(bad_symbol)),
        "fixed-width section has": frame(2, bytes(dense) + b"\x00"),
    }
    for what, payload in cases.items():
        outcome = _same_on_both_paths(payload, d)
        assert outcome.startswith("CodecError") and what in outcome, (what, outcome)
