"""Compression operators C and their codecs.

Notation (ALGORITHMS.md): x in R^d, C(x) the compressed vector. An unbiased operator has
E C(x) = x and E||C(x) - x||^2 <= omega ||x||^2; a biased one is a contraction,
||C(x) - x||^2 <= (1 - delta) ||x||^2 (in expectation for biased rand-k).

Operators act on the flattened tensor, either per tensor or per bucket: the flat vector is cut
into consecutive buckets of ``bucket`` coordinates (the last one may be shorter) and norms or
scales are taken per bucket; ``bucket=0`` means one bucket holding the whole tensor. All math
runs on the tensor's own device with torch ops over whole arrays (chunked to bound memory, no
Python loop over coordinates); bit packing runs on the CPU with numpy. Random draws come from
a ``torch.Generator`` on the tensor's device seeded with ``seed``; rand-k's indices come from a
CPU generator so that any receiver regenerates them from the seed alone.

:class:`Compressed` holds the compressed message in symbolic form (norms, levels, signs,
indices); ``to_bytes()`` serializes it (see :mod:`compression.wire`) with the smallest code of
the operator, ``dense()`` rebuilds C(x), and :func:`decode` parses bytes back into a
:class:`Compressed` whose ``dense()`` is bit-for-bit the sender's.
"""

from __future__ import annotations

import math
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import torch

from compression import bits
from compression.wire import FORMAT_VERSION, MAGIC, MAX_NDIM, CodecError, Reader, Writer

__all__ = [
    "OPERATORS",
    "Compressed",
    "Compressor",
    "decode",
    "parse_compressor",
]

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Coordinates processed per step; bounds the temporaries of encode to a few MB.
CHUNK = 1 << 18
#: Block of the envelopes q of QSGD's thinning (s = 1): a block of a bucket whose size is a
#: multiple of it; a tighter envelope than the whole bucket's leaves fewer candidates.
_THIN_BLOCK = 256
#: Levels per step of the level codecs: a multiple of 5 (base-3 groups) and of 8 (bytes).
_LEVEL_CHUNK = 5 * 8 * (1 << 13)
_LEVEL_CODES = {"dense": 0, "base3": 0, "sparse": 1, "rice": 2}
#: k_mags value meaning "magnitudes - 1 in fixed width ceil(log2 s)" in the sparse code.
_FIXED_MAGS = 255
#: Default bound on decoded coordinates per payload byte (see :func:`decode`).
MAX_COORDS_PER_BYTE = 1 << 15
#: The most coordinates any payload may declare, whatever the caller allows (so positions
#: and run sums stay far from int64's limit).
MAX_NUMEL = 1 << 48

Fields = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def _check_finite_sum(f32: torch.Tensor) -> None:
    """Raise ValueError if ``f32`` holds NaN or inf (one reduction; exact check only when the
    sum is not finite, which also happens when finite values overflow the sum)."""
    if not math.isfinite(float(f32.sum())) and not bool(torch.isfinite(f32).all()):
        raise ValueError("input contains NaN or inf")


def _bucket_size(bucket: int, d: int) -> int:
    return d if bucket == 0 or bucket > d else bucket


def _bucket_reduce(f32: torch.Tensor, b: int, ord: float) -> torch.Tensor:
    """Per-bucket vector norm of order ``ord`` (1, 2 or inf), float32 of length ceil(d/b)."""
    d = f32.numel()
    nfull = d // b
    parts = []
    if nfull:
        parts.append(torch.linalg.vector_norm(f32[: nfull * b].view(nfull, b), ord=ord, dim=1))
    if d % b:
        parts.append(torch.linalg.vector_norm(f32[nfull * b :], ord=ord).reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _bucket_peaks(f32: torch.Tensor, b: int) -> torch.Tensor:
    """max_j |x_j| per bucket, float32, as max(max_j x_j, -min_j x_j): two reductions
    straight over the data, no |x| temporary."""
    d = f32.numel()
    nfull = d // b
    parts = []
    if nfull:
        view = f32[: nfull * b].view(nfull, b)
        parts.append(torch.maximum(view.amax(dim=1), view.amin(dim=1).neg_()))
    if d % b:
        tail = f32[nfull * b :]
        parts.append(torch.maximum(tail.amax(), tail.amin().neg()).reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _bucket_lengths(d: int, b: int, device: torch.device) -> torch.Tensor:
    nb = -(-d // b)
    lengths = torch.full((nb,), float(b), dtype=torch.float32, device=device)
    if d % b:
        lengths[-1] = float(d % b)
    return lengths


def _segments(d: int, b: int, chunk: int = CHUNK) -> Iterator[tuple[int, int, int, int]]:
    """Cut [0, d) into pieces ``(start, rows, cols, bucket)``: the piece is the flat slice
    ``[start, start + rows * cols)`` viewed as ``(rows, cols)``, row r lying in bucket
    ``bucket + r``. When b <= chunk a piece is up to chunk // b whole buckets (or the short
    last bucket); when b > chunk it is one row of at most ``chunk`` coordinates of a bucket."""
    if b <= chunk:
        nfull = d // b
        per = max(1, chunk // b)
        for i in range(0, nfull, per):
            yield i * b, min(per, nfull - i), b, i
        if d % b:
            yield nfull * b, 1, d % b, nfull
    else:
        for i in range(-(-d // b)):
            end = min(d, (i + 1) * b)
            for start in range(i * b, end, chunk):
                yield start, 1, min(chunk, end - start), i


def _tensor_bytes(t: torch.Tensor) -> npt.NDArray[np.uint8]:
    """Raw little-endian bytes of a tensor (any dtype), as a uint8 numpy array."""
    flat = t.detach().reshape(-1).contiguous()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    arr: npt.NDArray[np.uint8] = flat.cpu().numpy().view(np.uint8)
    return arr


def _bytes_tensor(
    data: npt.NDArray[np.uint8], dtype: torch.dtype, n: int, what: str = "value"
) -> torch.Tensor:
    """Inverse of :func:`_tensor_bytes`: ``n`` values of ``dtype``, on the CPU (decoders
    validate on the CPU and move to the target device only after)."""
    item = torch.empty((), dtype=dtype).element_size()
    if data.size != n * item:
        raise CodecError(f"{what} section has {data.size} bytes, expected {n * item}")
    return torch.from_numpy(data.copy()).view(_INT_VIEW[item]).view(dtype)


def _float_array(t: torch.Tensor) -> npt.NDArray[np.floating]:
    """A CPU tensor's values as numpy (bfloat16 widened exactly to float32): the decoders'
    checks run in numpy, whose small ops cost a fraction of torch's."""
    return (t.to(torch.float32) if t.dtype == torch.bfloat16 else t).numpy()


def _check_finite_decoded(t: torch.Tensor, what: str) -> None:
    """No payload legitimately carries NaN or inf (the encoders refuse such inputs and
    their norms and scales are finite), so a non-finite float is a crafted or corrupt
    payload. A float64 value must also be finite as float32 (the math runs in float32 and
    the encoders refuse inputs whose float32 image overflows). One sum decides the common
    case: it is finite only if every term is; the exact check runs when it is not."""
    if not t.numel():
        return
    a = _float_array(t)
    with np.errstate(over="ignore", invalid="ignore"):
        if not math.isfinite(float(a.sum())) and not bool(np.isfinite(a).all()):
            raise CodecError(f"{what} contain NaN or inf")
        if a.dtype == np.float64 and not bool(np.isfinite(a.astype(np.float32)).all()):
            raise CodecError(f"{what} lie outside float32's range")


def _runs_to_index(
    runs: npt.NDArray[np.int64], d: int, what: str = "zero runs"
) -> npt.NDArray[np.int64]:
    """Positions of the n = len(runs) - 1 kept coordinates from the zero runs r_0..r_n
    before each of them and after the last: index_i = sum_{j <= i} (r_j + 1) - 1.

    Valid iff every r_j >= 0 and sum_j r_j + n = d; then 0 <= index_0 < ... < index_{n-1} < d.
    The check cannot be fooled by int64 wrap-around (runs [2^63-1, 2^63-1, 100] sum to 98
    modulo 2^64): every run is first bounded by d - n, so each step r_j + 1 <= d + 1
    <= 2^48 + 1 (``MAX_NUMEL``); the partial sums then grow strictly, and when
    n (d - n + 1) < 2^63 they cannot wrap at all; otherwise the first wrap would turn one
    negative (and they stay negative for at least 2^14 steps), which is checked.
    """
    n = int(runs.size) - 1
    if n < 0:
        raise CodecError(f"{what}: none")
    top = d - n
    if top < 0:
        raise CodecError(f"{what}: {n} kept coordinates exceed the declared size {d}")
    low, high = int(runs.min()), int(runs.max())
    if low < 0 or high > top:
        raise CodecError(f"{what}: a run of {high if high > top else low} zeros, outside 0..{top}")
    ends = np.cumsum(runs + 1)
    if (n + 1) * (top + 1) >= 1 << 63 and int(ends.min()) <= 0:
        raise CodecError(f"{what}: the positions overflow")
    if int(ends[-1]) != d + 1:
        raise CodecError(f"{what} do not add up to the declared size {d}")
    return ends[:-1] - 1


#: float32's largest finite value
_F32_MAX = float(np.finfo(np.float32).max)


def _check_scaled(values: torch.Tensor, scale: float) -> None:
    """Rand-k's unbiased values (d/k) x_j (``values`` already finite), computed as
    ``_dense`` computes them, must be finite: finite x_j near float32's maximum overflow
    once scaled. max |x_j| (d/k) in float64 decides unless it lies within 2^-20 of
    float32's maximum, where the exact float32 product is computed."""
    if not values.numel():
        return
    peak = float(np.abs(_float_array(values)).max()) * scale
    if peak <= _F32_MAX * (1 - 2**-20):
        return
    if peak >= _F32_MAX * (1 + 2**-20) or not bool(
        torch.isfinite(values.to(torch.float32) * scale).all()
    ):
        raise CodecError(f"values times d/k = {scale:g} overflow float32")


def _fields_to(fields: Fields, device: torch.device) -> Fields:
    """The validated CPU fields of a decoded message, tensors moved to ``device``."""
    if device.type == "cpu":
        return fields
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _section_bits(*nbits: int) -> int:
    """Bits that sections holding ``nbits`` bits each take on the wire: whole bytes plus
    their length varints."""
    total = 0
    for n in nbits:
        nbytes = -(-n // 8)
        total += 8 * (nbytes + _varint_len(nbytes))
    return total


def _entropy_bits(counts: npt.NDArray[np.int64]) -> float:
    """n * H(empirical distribution) in bits, for symbol counts ``counts``."""
    counts = counts[counts > 0].astype(np.float64)
    n = counts.sum()
    if n == 0:
        return 0.0
    return float(-(counts * np.log2(counts / n)).sum())


def _pack_signs(f32: torch.Tensor) -> npt.NDArray[np.uint8]:
    """Bit j of the result is 1 iff x_j < 0 (so sign(0) = +1), MSB first, ceil(d/8) bytes."""
    d = f32.numel()
    out = np.empty((d + 7) // 8, dtype=np.uint8)
    step = 1 << 16
    if f32.device.type == "cpu":
        arr = f32.numpy()
        buf = np.empty(step, dtype=bool)
        for start in range(0, d, step):
            m = min(step, d - start)
            np.less(arr[start : start + m], 0, out=buf[:m])
            out[start // 8 : (start + m + 7) // 8] = np.packbits(buf[:m])
    else:
        for start in range(0, d, CHUNK):
            neg = (f32[start : start + CHUNK] < 0).cpu().numpy()
            out[start // 8 : (start + neg.size + 7) // 8] = np.packbits(neg)
    return out


#: Row v holds the eight values (-1 if bit set else +1) of byte v, MSB first.
_SIGN_TABLE = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(bool), -1.0, 1.0
).astype(np.float32)


def _signs_dense(
    packed: npt.NDArray[np.uint8], d: int, device: torch.device, scale: torch.Tensor | None
) -> torch.Tensor:
    """The float32 vector (-1)^bit_j * scale (scale 1 when None) for packed sign bits: one
    table lookup per byte, eight floats at a time."""
    table = _SIGN_TABLE
    if scale is not None:
        table = table * np.float32(float(scale.reshape(()).to(torch.float32).cpu()))
    index = torch.from_numpy(packed).to(device=device, dtype=torch.int64)
    out = torch.empty(packed.size, 8, dtype=torch.float32, device=device)
    torch.index_select(torch.from_numpy(table).to(device), 0, index, out=out)
    return out.view(-1)[:d]


# --------------------------------------------------------------------------- Compressed


@dataclass
class _Plan:
    """The code chosen to serialize a message and its predicted size in bits."""

    code: str
    bits: int
    extra: dict[str, Any] = field(default_factory=dict)


class Compressed:
    """One compressed tensor: symbols in memory, bytes on demand.

    ``dense()`` is C(x) with the input's shape, dtype and device; ``to_bytes()`` the wire
    format; ``nbytes`` its measured length; ``predicted_nbytes`` the length the chosen code's
    formula predicts (payload only, without the < 64 byte header); ``information_limit_bits()``
    the empirical entropy of the symbols carried plus 32 bits per float.
    """

    def __init__(
        self,
        compressor: Compressor,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        fields: Fields,
        payload: bytes | None = None,
    ) -> None:
        self.compressor = compressor
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.fields = fields
        self.numel = math.prod(shape)
        self._payload = payload
        self._plan: _Plan | None = None
        self._wire_code: str | None = None  # set by decode(): the code the payload used

    def __repr__(self) -> str:
        return (
            f"Compressed({self.spec!r}, shape={self.shape}, dtype={self.dtype}, code={self.code!r})"
        )

    @property
    def spec(self) -> str:
        return self.compressor.spec

    @property
    def unbiased(self) -> bool:
        return self.compressor.unbiased

    def plan(self) -> _Plan:
        if self._plan is None:
            self._plan = self.compressor._plan(self.fields, self.numel)
        return self._plan

    @property
    def code(self) -> str:
        """Name of the code used on the wire (e.g. ``dense``, ``base3``, ``rice``, ``sparse``)."""
        return self._wire_code or self.plan().code

    def dense(self) -> torch.Tensor:
        """C(x): same shape, dtype and device as the compressed input."""
        flat = self.compressor._dense(self.fields, self.numel, self.device)
        if flat.dtype != self.dtype:
            flat = flat.to(self.dtype)
        return flat.reshape(self.shape)

    def to_bytes(self) -> bytes:
        """The wire format, with the operator's smallest code (cached)."""
        if self._payload is None:
            self._payload = self._serialize(self.plan())
        return self._payload

    def to_bytes_with(self, code: str) -> bytes:
        """The wire format with a given code instead of the smallest (for benchmarks and
        tests: e.g. ``"base3"``/``"dense"``, ``"rice"`` or ``"sparse"`` for QSGD); any
        code decodes to the same ``dense()``."""
        return self._serialize(self.compressor._plan_for(self.fields, self.numel, code))

    def _serialize(self, plan: _Plan) -> bytes:
        w = Writer()
        w._parts.append(MAGIC)
        w.u8(FORMAT_VERSION)
        w.u8(self.compressor.op_code)
        w.u8(DTYPE_CODES[self.dtype])
        w.u8(len(self.shape))
        for n in self.shape:
            w.varint(n)
        self.compressor._write(w, self.fields, self.numel, plan)
        return w.finish()

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())

    @property
    def predicted_nbytes(self) -> int:
        return -(-self.plan().bits // 8)

    def information_limit_bits(self) -> float:
        """Empirical entropy of the symbols carried (n H(p̂)) plus the bits of the floats."""
        return self.compressor._info_bits(self.fields, self.numel, self.dtype)


# --------------------------------------------------------------------------- base class


def _parse_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"parameter {name}={value!r} is not an integer") from None


def _parse_float(name: str, value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise ValueError(f"parameter {name}={value!r} is not a number") from None
    if not math.isfinite(out):
        raise ValueError(f"parameter {name}={value!r} is not finite")
    return out


def _parse_bool(name: str, value: str) -> bool:
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"parameter {name}={value!r} is not a boolean (true/false)")


def _fmt_float(value: float) -> str:
    return repr(float(value)).rstrip("0").rstrip(".") if "e" not in repr(value) else repr(value)


class Compressor(ABC):
    """A compression operator C. Build one with :func:`parse_compressor`."""

    name: ClassVar[str]
    op_code: ClassVar[int]
    params_help: ClassVar[str] = ""
    unbiased: bool = True

    @property
    @abstractmethod
    def spec(self) -> str:
        """Canonical spec string; ``parse_compressor(c.spec)`` rebuilds ``c``."""

    def __repr__(self) -> str:
        return f"parse_compressor({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compressor) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def omega(self, d: int) -> float:
        """Variance factor omega for dimension d (unbiased operators)."""
        raise ValueError(f"{self.spec} is biased: it has a contraction factor delta, not omega")

    def delta(self, d: int) -> float:
        """Contraction factor delta for dimension d (biased operators)."""
        raise ValueError(f"{self.spec} is unbiased: it has a variance factor omega, not delta")

    @classmethod
    @abstractmethod
    def from_params(cls, params: dict[str, str]) -> Compressor: ...

    def compress(self, x: torch.Tensor, seed: int = 0) -> Compressed:
        """Compress ``x`` (any shape, float32/float16/bfloat16/float64, any device) with
        randomness drawn from ``seed``; the same seed gives the same message."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in DTYPE_CODES:
            raise ValueError(
                f"unsupported dtype {x.dtype}; use one of float32, float16, bfloat16, float64"
            )
        if x.numel() == 0:
            raise ValueError("cannot compress an empty tensor")
        if len(x.shape) > MAX_NDIM:
            raise ValueError(f"tensor has {len(x.shape)} dimensions, at most {MAX_NDIM}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        flat = x.detach().reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        f32 = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        fields = self._compress(f32, flat, seed)
        return Compressed(self, tuple(x.shape), x.dtype, x.device, fields)

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    # -- operator specific parts
    @abstractmethod
    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields: ...

    @abstractmethod
    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor: ...

    @abstractmethod
    def _plan(self, fields: Fields, d: int) -> _Plan: ...

    def _plan_for(self, fields: Fields, d: int, code: str) -> _Plan:
        plan = self._plan(fields, d)
        if plan.code != code:
            raise ValueError(f"{self.spec} has no code {code!r}; it uses {plan.code!r}")
        return plan

    @abstractmethod
    def _write(self, w: Writer, fields: Fields, d: int, plan: _Plan) -> None: ...

    @classmethod
    @abstractmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        """Parse and validate the operator's fields of a message of d coordinates, on the
        CPU: every count, index and float checked, so that ``_dense`` cannot fail."""

    @abstractmethod
    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float: ...


def _take(params: dict[str, str], allowed: dict[str, str | None], op: str) -> dict[str, str]:
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for {op!r}; allowed: {sorted(allowed)}"
        )
    out = {k: v for k, v in allowed.items() if v is not None}
    out.update(params)
    return out


class _Parameterless(Compressor):
    """An operator without parameters: its spec is its name and it accepts none."""

    @property
    def spec(self) -> str:
        return self.name

    @classmethod
    def from_params(cls, params: dict[str, str]) -> Self:
        _take(params, {}, cls.name)
        return cls()


# --------------------------------------------------------------------------- identity


class Identity(_Parameterless):
    """C(x) = x; omega = 0; the raw floats of the input dtype on the wire."""

    name = "identity"
    op_code = 0

    def omega(self, d: int) -> float:
        return 0.0

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        _check_finite_sum(f32)
        return {"values": flat}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        values: torch.Tensor = fields["values"]
        return values.clone()

    def _plan(self, fields: Fields, d: int) -> _Plan:
        return _Plan("raw", d * fields["values"].element_size() * 8)

    def _write(self, w: Writer, fields: Fields, d: int, plan: _Plan) -> None:
        w.section(_tensor_bytes(fields["values"]))

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        values = _bytes_tensor(r.section(), dtype, d)
        _check_finite_decoded(values, "values")
        return cls(), {"values": values}

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        return float(d * fields["values"].element_size() * 8)


# --------------------------------------------------------------------------- level quantizers


class _LevelQuantizer(Compressor):
    """Shared part of QSGD and natural dithering: per bucket B a float32 norm ||x_B||, and per
    coordinate a signed level l_j in {-s..s}. Three codes, the smallest is sent:

    * dense: symbol l_j + s in ceil(log2(2s+1)) = 1 + ceil(log2(s+1)) bits (for s = 1 the
      three symbols are packed five per byte, 1.6 bits);
    * rice: |l_j| Rice-coded for every coordinate, plus one sign bit per non-zero (small
      levels dominate when s is large);
    * sparse: positions of the non-zero levels as Rice-coded zero runs, one sign bit and
      |l_j| - 1 Rice-coded (or in ceil(log2 s) bits) per non-zero.

    Fields: ``norms`` (float32, one per bucket) and either ``levels`` (int16, d) or the sparse
    pair ``index`` (int64, sorted) + ``nzlevels`` (int16).
    """

    s: int
    bucket: int

    def _level_table(self, device: torch.device) -> torch.Tensor:
        """float32 values of the signed levels -s..s (index level + s)."""
        raise NotImplementedError

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        norms: torch.Tensor = fields["norms"]
        b = _bucket_size(self.bucket, d)
        table = self._level_table(device)
        if "levels" in fields:
            levels: torch.Tensor = fields["levels"]
            out = torch.empty(d, dtype=torch.float32, device=device)
            for start, rows, cols, bk in _segments(d, b):
                n = rows * cols
                lev = levels[start : start + n].view(rows, cols).to(torch.int64) + self.s
                torch.mul(
                    table[lev],
                    norms[bk : bk + rows, None],
                    out=out[start : start + n].view(rows, cols),
                )
            return out
        index: torch.Tensor = fields["index"]
        if device.type == "cpu":
            # numpy, single-threaded (these small ops only lose time to thread hand-offs),
            # into calloc'd zeros: the OS hands out zeroed pages as they are first written,
            # one pass over the output instead of a memset and then the page faults
            idx = index.numpy()
            nz = fields["nzlevels"].numpy().astype(np.intp) + self.s
            values = table.numpy()[nz] * norms.numpy()[idx // b]
            zeros = np.zeros(d, dtype=np.float32)
            zeros[idx] = values
            return torch.from_numpy(zeros)
        vals = table[fields["nzlevels"].to(torch.int64) + self.s] * norms[index // b]
        out = torch.zeros(d, dtype=torch.float32, device=device)
        out.index_put_((index,), vals)
        return out

    def _level_chunks(self, fields: Fields, d: int) -> Iterator[npt.NDArray[np.int16]]:
        """The signed levels, ``_LEVEL_CHUNK`` coordinates at a time (numpy int16)."""
        if "levels" in fields:
            levels: torch.Tensor = fields["levels"]
            for start in range(0, d, _LEVEL_CHUNK):
                yield levels[start : start + _LEVEL_CHUNK].cpu().numpy()
            return
        idx = fields["index"].cpu().numpy()
        nz = fields["nzlevels"].cpu().numpy()
        for start in range(0, d, _LEVEL_CHUNK):
            end = min(d, start + _LEVEL_CHUNK)
            lo, hi = np.searchsorted(idx, [start, end])
            arr = np.zeros(end - start, dtype=np.int16)
            arr[idx[lo:hi] - start] = nz[lo:hi]
            yield arr

    def _nonzero_chunks(
        self, fields: Fields, d: int
    ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]]:
        """(zero runs, levels) of the non-zero levels in order, chunk by chunk: the run before
        each non-zero; the last chunk carries one more run, from the last non-zero to d."""
        if "index" in fields:
            idx = fields["index"].cpu().numpy().astype(np.int64)
            nz = fields["nzlevels"].cpu().numpy()
            yield np.diff(np.append(idx, d), prepend=-1) - 1, nz
            return
        last = -1
        for start, arr in zip(
            range(0, d, _LEVEL_CHUNK), self._level_chunks(fields, d), strict=True
        ):
            pos = np.flatnonzero(arr) + start
            if pos.size:
                yield np.diff(pos, prepend=last) - 1, arr[pos - start]
                last = int(pos[-1])
        yield np.array([d - 1 - last], dtype=np.int64), np.zeros(0, dtype=np.int16)

    def _histogram(self, fields: Fields, d: int) -> npt.NDArray[np.int64]:
        """counts[l + s] = number of coordinates with level l, for l in -s..s."""
        s = self.s
        if "index" in fields:
            nz = fields["nzlevels"].cpu().numpy().astype(np.int64)
            counts = np.bincount(nz + s, minlength=2 * s + 1)
            counts[s] = d - nz.size
            return counts
        counts = np.zeros(2 * s + 1, dtype=np.int64)
        for arr in self._level_chunks(fields, d):
            counts += np.bincount(arr.astype(np.int32) + s, minlength=2 * s + 1)
        return counts

    def _dense_bits(self, d: int) -> int:
        if self.s == 1:
            return 8 * ((d + 4) // 5)
        return d * (2 * self.s).bit_length()

    def _plans(self, fields: Fields, d: int, want: str | None = None) -> dict[str, _Plan]:
        """Sizes of the codes: dense (fixed width or base 3), rice (every |l_j| Rice-coded,
        then a sign bit per non-zero) and, when it can win or is asked for, sparse (zero runs
        and |l_j| - 1 Rice-coded, or |l_j| - 1 in fixed width when smaller, and signs)."""
        s = self.s
        # every code: the code byte and the norms section
        head = 8 + _section_bits(32 * fields["norms"].numel())
        signed = self._histogram(fields, d)
        mags = signed[s:].copy()
        mags[1:] += signed[:s][::-1]
        nnz = d - int(mags[0])
        dense_code = "base3" if s == 1 else "dense"
        plans = {dense_code: _Plan(dense_code, head + _section_bits(self._dense_bits(d)))}
        k, cost = bits.best_rice_parameter_from_counts(mags)
        rice_bits = 8 + _section_bits(cost - d * k, d * k, nnz)
        plans["rice"] = _Plan("rice", head + rice_bits, {"k": k})
        fixed_width = (s - 1).bit_length()
        k_mags, mag_cost = bits.best_rice_parameter_from_counts(mags[1:])
        mag_sections = _section_bits(mag_cost - nnz * k_mags, nnz * k_mags)
        if _section_bits(0, fixed_width * nnz) <= mag_sections:
            k_mags, mag_sections = _FIXED_MAGS, _section_bits(0, fixed_width * nnz)
        # every non-zero costs at least its sign and the end of its run
        if want == "sparse" or head + 2 * nnz + mag_sections < min(p.bits for p in plans.values()):
            mean_run = (d - nnz) / (nnz + 1)
            centre = int(np.floor(np.log2(mean_run * np.log(2)))) if mean_run >= 1 else 0
            ks = range(max(0, centre - 2), centre + 3)
            run_bits = dict.fromkeys(ks, 0)
            for runs, _ in self._nonzero_chunks(fields, d):
                for kk in ks:
                    run_bits[kk] += bits.rice_cost_bits(runs, kk)
            k_runs = min(ks, key=run_bits.__getitem__)
            rem_runs = (nnz + 1) * k_runs
            sparse_bits = 16 + 8 * _varint_len(nnz) + mag_sections
            sparse_bits += _section_bits(run_bits[k_runs] - rem_runs, rem_runs, nnz)
            plans["sparse"] = _Plan(
                "sparse", head + sparse_bits, {"k": k_runs, "k_mags": k_mags, "nnz": nnz}
            )
        return plans

    def _plan(self, fields: Fields, d: int) -> _Plan:
        return min(self._plans(fields, d).values(), key=lambda p: p.bits)

    def _plan_for(self, fields: Fields, d: int, code: str) -> _Plan:
        plans = self._plans(fields, d, want=code)
        if code not in plans:
            raise ValueError(f"{self.spec} has no code {code!r}; codes: {sorted(plans)}")
        return plans[code]

    def _write_params(self, w: Writer) -> None:
        w.varint(self.s)
        w.varint(self.bucket)

    def _write(self, w: Writer, fields: Fields, d: int, plan: _Plan) -> None:
        s = self.s
        self._write_params(w)
        w.u8(_LEVEL_CODES[plan.code])
        w.section(_tensor_bytes(fields["norms"].to(torch.float32)))
        if plan.code in ("dense", "base3"):
            width = (2 * s).bit_length()
            parts = []
            for arr in self._level_chunks(fields, d):
                symbols = arr.astype(np.int32) + s
                if s == 1:
                    parts.append(bits.pack_base3(symbols.astype(np.uint8)))
                else:
                    parts.append(bits.pack_fixed(symbols, width))
            w.section_parts(parts)
            return
        signs = bits.BitWriter()
        if plan.code == "rice":
            k = plan.extra["k"]
            rice = bits.RiceWriter(k)
            for arr in self._level_chunks(fields, d):
                rice.add(np.abs(arr).astype(np.int64))
                signs.append((arr[arr != 0] < 0).astype(np.uint8))
            unary, rem = rice.finish()
            w.u8(k)
            w.section(unary)
            w.section(rem)
            w.section(signs.finish())
            return
        k_runs, k_mags = plan.extra["k"], plan.extra["k_mags"]
        runs = bits.RiceWriter(k_runs)
        mags_rice = bits.RiceWriter(k_mags if k_mags != _FIXED_MAGS else 0)
        mags_fixed = bits.BitWriter()
        width = (s - 1).bit_length()
        for gaps, nz in self._nonzero_chunks(fields, d):
            runs.add(gaps)
            signs.append((nz < 0).astype(np.uint8))
            mags = np.abs(nz).astype(np.int64) - 1
            if k_mags == _FIXED_MAGS:
                mags_fixed.append(bits.fixed_bits(mags, width))
            else:
                mags_rice.add(mags)
        w.u8(k_runs)
        w.u8(k_mags)
        w.varint(plan.extra["nnz"])
        for section in runs.finish():
            w.section(section)
        w.section(signs.finish())
        if k_mags == _FIXED_MAGS:
            w.section(b"")
            w.section(mags_fixed.finish())
        else:
            for section in mags_rice.finish():
                w.section(section)

    @classmethod
    def _read_params(cls, r: Reader) -> _LevelQuantizer:
        raise NotImplementedError

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        comp = cls._read_params(r)
        s = comp.s
        code = r.u8()
        b = _bucket_size(comp.bucket, d)
        nb = -(-d // b)
        norms = _bytes_tensor(r.section(), torch.float32, nb, "norm")
        _check_finite_decoded(norms, "norms")
        if bool((norms.numpy() < 0).any()):
            raise CodecError("negative norm")
        if code == 0:
            data = r.section()
            if s == 1:
                symbols = bits.unpack_base3(data, d).astype(np.int16)
            else:
                sym32 = bits.unpack_fixed(data, d, (2 * s).bit_length())
                if sym32.size and int(sym32.max()) > 2 * s:
                    raise CodecError(f"level symbol above 2s = {2 * s}")
                symbols = sym32.astype(np.int16)
            levels = torch.from_numpy(symbols - np.int16(s))
            code_name = "base3" if s == 1 else "dense"
            return comp, {"norms": norms, "levels": levels, "wire_code": code_name}
        if code == 2:
            k = r.u8()
            if k > 62:
                raise CodecError(f"Rice parameter {k} out of range")
            try:
                mags = bits.rice_decode(r.section(), r.section(), d, k, limit=s)
            except CodecError as exc:
                raise CodecError(f"levels (at most s = {s}): {exc}") from None
            nonzero = mags != 0
            nnz = int(np.count_nonzero(nonzero))
            signs_raw = r.section()
            if signs_raw.size != (nnz + 7) // 8:
                raise CodecError("sign section has the wrong length")
            levels16 = mags.astype(np.int16)
            neg = np.unpackbits(signs_raw, count=nnz).astype(bool)
            levels16[np.flatnonzero(nonzero)[neg]] *= -1
            return comp, {"norms": norms, "levels": torch.from_numpy(levels16), "wire_code": "rice"}
        if code != 1:
            raise CodecError(f"unknown level code {code}")
        k = r.u8()
        k_mags = r.u8()
        if k > 62 or (k_mags > 62 and k_mags != _FIXED_MAGS):
            raise CodecError(f"Rice parameters {k}, {k_mags} out of range")
        nnz = r.varint(limit=d, name="nnz (non-zero levels)")
        try:
            runs = bits.rice_decode(r.section(), r.section(), nnz + 1, k, limit=d - nnz)
        except CodecError as exc:
            raise CodecError(f"zero runs: {exc}") from None
        index = _runs_to_index(runs, d)
        signs_raw = r.section()
        if signs_raw.size != (nnz + 7) // 8:
            raise CodecError("sign section has the wrong length")
        neg = np.unpackbits(signs_raw, count=nnz).astype(bool)
        mags_unary, mags_rem = r.section(), r.section()
        if k_mags == _FIXED_MAGS:
            if mags_unary.size:
                raise CodecError("fixed-width magnitudes with a unary stream")
            mags = bits.unpack_fixed(mags_rem, nnz, (s - 1).bit_length()).astype(np.int64) + 1
            if nnz and int(mags.max()) > s:
                raise CodecError(f"level above s = {s}")
        else:
            try:
                mags = bits.rice_decode(mags_unary, mags_rem, nnz, k_mags, limit=s - 1) + 1
            except CodecError as exc:
                raise CodecError(f"magnitudes - 1 (at most s - 1 = {s - 1}): {exc}") from None
        nzlevels = np.where(neg, -mags, mags).astype(np.int16)
        return comp, {
            "norms": norms,
            "index": torch.from_numpy(index),
            "nzlevels": torch.from_numpy(nzlevels),
            "wire_code": "sparse",
        }

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        return _entropy_bits(self._histogram(fields, d)) + 32.0 * fields["norms"].numel()


class QSGD(_LevelQuantizer):
    """s-quantization (Alistarh et al. 2017), per bucket B of size d_B:

        C(x)_j = ||x_B|| sign(x_j) xi_j / s,   xi_j = floor(s |x_j| / ||x_B|| + u_j),
        u_j ~ U[0, 1),

    with ||.|| the L2 norm (``norm=l2``) or the max norm (``norm=max``). Unbiased with
    omega = min(d_B / s^2, sqrt(d_B) / s). For s = 1 with the L2 norm the non-zero levels are
    drawn by thinning (each coordinate a candidate with probability q_B = max_j |x_j|/||x_B||
    from Poisson points, each kept with probability (|x_j|/||x_B||) / q_B), the same law
    P(xi_j = 1) = |x_j| / ||x_B|| while drawing only about q d random numbers.
    """

    name = "qsgd"
    op_code = 1
    params_help = "s=1, bucket=4096 (0 = per tensor), norm=l2|max"
    #: thinning on the CPU with the compiled kernel (False: the torch code of other devices)
    _cpu_kernel: ClassVar[bool] = True

    def __init__(self, s: int = 1, bucket: int = 4096, norm: str = "l2") -> None:
        if s < 1:
            raise ValueError(f"qsgd needs s >= 1, got s={s}")
        if s > 32767:
            raise ValueError(f"qsgd supports s <= 32767, got s={s}")
        if bucket < 0:
            raise ValueError(f"bucket must be >= 0 (0 = per tensor), got {bucket}")
        if norm not in ("l2", "max"):
            raise ValueError(f"qsgd norm must be l2 or max, got {norm!r}")
        self.s = s
        self.bucket = bucket
        self.norm = norm

    @property
    def spec(self) -> str:
        return f"qsgd:s={self.s},bucket={self.bucket},norm={self.norm}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> QSGD:
        p = _take(params, {"s": "1", "bucket": "4096", "norm": "l2"}, cls.name)
        return cls(_parse_int("s", p["s"]), _parse_int("bucket", p["bucket"]), p["norm"])

    def omega(self, d: int) -> float:
        b = _bucket_size(self.bucket, d)
        return min(b / self.s**2, math.sqrt(b) / self.s)

    def _level_table(self, device: torch.device) -> torch.Tensor:
        return torch.arange(-self.s, self.s + 1, device=device, dtype=torch.float32) / self.s

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        d = f32.numel()
        b = _bucket_size(self.bucket, d)
        thinned = self.s == 1 and self.norm == "l2"
        norms = _bucket_reduce(f32, b, 2.0 if self.norm == "l2" else math.inf)
        if not bool(torch.isfinite(norms).all()):
            _check_finite_sum(f32)
            raise ValueError("the norm of a bucket overflows float32; scale the input down")
        g = self._generator(f32.device, seed)
        if thinned:
            fields = self._compress_thinned(f32, norms, b, g, seed)
            if fields is not None:
                return fields
        return self._compress_dense(f32, norms, b, g)

    def _compress_dense(
        self, f32: torch.Tensor, norms: torch.Tensor, b: int, g: torch.Generator
    ) -> Fields:
        d = f32.numel()
        s = self.s
        inv = torch.where(norms > 0, s / norms, torch.zeros_like(norms))
        levels = torch.empty(d, dtype=torch.int16, device=f32.device)
        for start, rows, cols, bk in _segments(d, b):
            n = rows * cols
            x = f32[start : start + n].view(rows, cols)
            p = x.abs().mul_(inv[bk : bk + rows, None])
            p.add_(torch.rand(p.shape, generator=g, device=p.device)).floor_().clamp_(max=s)
            lev = p.to(torch.int16)
            levels[start : start + n].view(rows, cols).copy_(torch.where(x < 0, -lev, lev))
        return {"norms": norms, "levels": levels}

    def _compress_thinned(
        self, f32: torch.Tensor, norms: torch.Tensor, b: int, g: torch.Generator, seed: int
    ) -> Fields | None:
        """s = 1 by thinning. Per block K (the bucket B, or when d_B is a multiple of 256 each
        block of 256 coordinates of it), q_K = max_{j in K} p_j with p_j = |x_j| / ||x_B||
        and lambda_K = -log(1 - q_K). Every coordinate of K is a candidate with probability
        1 - exp(-lambda_K) = q_K, independently, and a candidate is kept with probability
        p_j / q_K. So P(xi_j = 1) = p_j, independently, as in QSGD, with about
        sum_K d_K q_K draws instead of d (the tighter per-block envelope leaves ~20% fewer
        candidates than one per bucket for Gaussian data). lambda_K is capped at 17 (q_K
        within 4e-8 of 1, below float32's 2^-24 resolution of a uniform draw). Returns None
        when thinning would not save draws (more than d/4).

        On the CPU (:meth:`_thin_cpu`) the candidates are found by geometric skipping in
        compiled code. On other devices, torch draws N_K ~ Poisson(d_K lambda_K) points
        uniformly on the block's coordinates: each coordinate then gets Poisson(lambda_K)
        points, independently, so it is hit with probability q_K; the distinct coordinates
        hit are the candidates.
        """
        d = f32.numel()
        device = f32.device
        bucket_norms = norms
        if b % _THIN_BLOCK == 0 and b > _THIN_BLOCK:  # envelopes per block of the bucket
            norms = norms.repeat_interleave(b // _THIN_BLOCK)[: -(-d // _THIN_BLOCK)]
            b = _THIN_BLOCK
        nb = norms.numel()
        peaks = _bucket_peaks(f32, b)
        q = torch.where(norms > 0, peaks / norms, torch.zeros_like(peaks))
        lam = torch.log1p(-q.to(torch.float64).clamp_(max=1.0)).neg_().clamp_(max=17.0)
        lengths = _bucket_lengths(d, b, device).to(torch.float64)
        rate = lengths * lam
        if float(rate.sum()) > d / 4:
            return None
        if device.type == "cpu" and self._cpu_kernel:
            return {"norms": bucket_norms, **self._thin_cpu(f32, norms, lam, b, seed)}
        counts = torch.poisson(rate, generator=g).to(torch.int64)
        itype = torch.int32 if d < 1 << 31 else torch.int64
        bucket = torch.repeat_interleave(torch.arange(nb, dtype=itype, device=device), counts)
        # uniform offsets in float64 (53-bit draws: uniform over any bucket length)
        u = torch.rand(bucket.numel(), dtype=torch.float64, generator=g, device=device)
        tail = d - (nb - 1) * b
        last = int(counts[-1])
        if tail != b and last:  # the short last bucket: uniform over its own length
            u[-last:] *= tail / b
        pos = u.mul_(float(b)).to(itype).clamp_(max=b - 1)
        if tail != b and last:
            pos[-last:].clamp_(max=tail - 1)
        pos.add_(bucket * b)
        if device.type == "cpu":  # numpy's vectorized sort is several times torch's here
            ordered = torch.from_numpy(np.sort(pos.numpy()))
        else:
            ordered = torch.sort(pos).values
        cand = torch.unique_consecutive(ordered).to(torch.int64)
        block = cand >> (b.bit_length() - 1) if b & (b - 1) == 0 else cand // b
        # keep candidate j with probability p_j / q_B = |x_j| / (||x_B|| (1 - exp(-lambda_B)))
        hit = torch.expm1(lam.neg()).neg_().to(torch.float32)
        inv = torch.where(hit > 0, 1 / (norms * hit), torch.zeros_like(hit))
        xc = torch.index_select(f32, 0, cand)
        u = torch.rand(cand.numel(), generator=g, device=device)
        kept = torch.nonzero(u < xc.abs().mul_(torch.index_select(inv, 0, block))).view(-1)
        index = torch.index_select(cand, 0, kept)
        lev = torch.index_select(xc, 0, kept).sign_().to(torch.int16)
        return {"norms": bucket_norms, "index": index, "nzlevels": lev}

    @staticmethod
    def _thin_cpu(
        f32: torch.Tensor, norms: torch.Tensor, lam: torch.Tensor, b: int, seed: int
    ) -> Fields:
        """The thinning of :meth:`_compress_thinned` on the CPU: the candidates by geometric
        skipping in compiled code (:mod:`compression._thin`), random numbers from numpy's
        PCG64 seeded with ``seed``; ``norms`` and ``lam`` per block of ``b``."""
        from compression._thin import thin

        lam64 = lam.numpy()
        # keep candidate j with probability p_j / q = |x_j| / (||x_B|| (1 - exp(-lambda)))
        scale = norms.numpy().astype(np.float64) * -np.expm1(-lam64)
        keep_scale = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        index, levels = thin(f32.numpy(), lam64, keep_scale.astype(np.float32), b, seed)
        return {"index": torch.from_numpy(index), "nzlevels": torch.from_numpy(levels)}

    def _write_params(self, w: Writer) -> None:
        super()._write_params(w)
        w.u8(0 if self.norm == "l2" else 1)

    @classmethod
    def _read_params(cls, r: Reader) -> QSGD:
        s = r.varint(limit=32767, name="qsgd s")
        bucket = r.varint(name="bucket")
        norm = r.u8()
        if s < 1 or norm > 1:
            raise CodecError(f"bad qsgd parameters s={s} norm code={norm}")
        return cls(s, bucket, "l2" if norm == 0 else "max")


class NaturalDithering(_LevelQuantizer):
    """Natural dithering (Horváth et al.) with s levels, per bucket B:

        C(x)_j = ||x_B||_2 sign(x_j) l_j,   l_j in {0, 2^(1-s), ..., 1/2, 1},

    where |x_j|/||x_B|| in [a, b] between two consecutive levels is rounded up to b with
    probability (|x_j|/||x_B|| - a) / (b - a). Unbiased with
    omega = 1/8 + sqrt(d_B) 2^(1-s) min(1, sqrt(d_B) 2^(1-s)).
    """

    name = "dither"
    op_code = 3
    params_help = "s=8 (1..64), bucket=4096 (0 = per tensor)"

    def __init__(self, s: int = 8, bucket: int = 4096) -> None:
        if s < 1:
            raise ValueError(f"dither needs s >= 1, got s={s}")
        if s > 64:
            raise ValueError(f"dither supports s <= 64 levels, got s={s}")
        if bucket < 0:
            raise ValueError(f"bucket must be >= 0 (0 = per tensor), got {bucket}")
        self.s = s
        self.bucket = bucket

    @property
    def spec(self) -> str:
        return f"dither:s={self.s},bucket={self.bucket}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> NaturalDithering:
        p = _take(params, {"s": "8", "bucket": "4096"}, cls.name)
        return cls(_parse_int("s", p["s"]), _parse_int("bucket", p["bucket"]))

    def omega(self, d: int) -> float:
        b = _bucket_size(self.bucket, d)
        t = math.sqrt(b) * 2.0 ** (1 - self.s)
        return 1 / 8 + t * min(1.0, t)

    def _level_table(self, device: torch.device) -> torch.Tensor:
        pos = [0.0] + [2.0 ** (i - self.s) for i in range(1, self.s + 1)]
        signed = [-v for v in reversed(pos[1:])] + pos
        return torch.tensor(signed, dtype=torch.float32, device=device)

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        d = f32.numel()
        s = self.s
        b = _bucket_size(self.bucket, d)
        norms = _bucket_reduce(f32, b, 2.0)
        if not bool(torch.isfinite(norms).all()):
            _check_finite_sum(f32)
            raise ValueError("the norm of a bucket overflows float32; scale the input down")
        g = self._generator(f32.device, seed)
        table = self._level_table(f32.device)[s:]  # levels 0..s
        inv = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
        levels = torch.empty(d, dtype=torch.int16, device=f32.device)
        for start, rows, cols, bk in _segments(d, b):
            n = rows * cols
            x = f32[start : start + n].view(rows, cols)
            p = (x.abs() * inv[bk : bk + rows, None]).clamp_(max=1.0)
            _, e = torch.frexp(p)  # p in [2^(e-1), 2^e)
            t = (e.to(torch.int64) - 1 + s).clamp_(max=s)
            lo = torch.where((p > 0) & (t >= 1), t, torch.zeros_like(t))
            hi = (lo + 1).clamp_(max=s)
            lo_v, hi_v = table[lo], table[hi]
            width = hi_v - lo_v
            up_prob = torch.where(width > 0, (p - lo_v) / width, torch.zeros_like(p))
            u = torch.rand(p.shape, generator=g, device=p.device)
            lev = (lo + (u < up_prob).to(torch.int64)).to(torch.int16)
            levels[start : start + n].view(rows, cols).copy_(torch.where(x < 0, -lev, lev))
        return {"norms": norms, "levels": levels}

    @classmethod
    def _read_params(cls, r: Reader) -> NaturalDithering:
        s = r.varint(limit=64, name="dither s")
        bucket = r.varint(name="bucket")
        if s < 1:
            raise CodecError("dither s must be >= 1")
        return cls(s, bucket)


# --------------------------------------------------------------------------- natural compression


class NaturalCompression(_Parameterless):
    """Natural compression (Horváth et al.): each x_j with 2^e <= |x_j| < 2^(e+1) becomes
    sign(x_j) 2^(e+1) with probability (|x_j| - 2^e) / 2^e, else sign(x_j) 2^e.
    Unbiased, omega = 1/8 (for normal floats; values that would round to 2^128 are kept at
    2^127). On the wire: the sign bit and the 8-bit float32 exponent, 9 bits per coordinate.
    Computed on the float32 bit pattern: the mantissa m (23 bits) rounds the exponent up iff a
    uniform 23-bit integer is below m.
    """

    name = "natural"
    op_code = 2

    def omega(self, d: int) -> float:
        return 1 / 8

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        d = f32.numel()
        g = self._generator(f32.device, seed)
        ints = f32.view(torch.int32)
        exps = torch.empty(d, dtype=torch.uint8, device=f32.device)
        for start in range(0, d, CHUNK):
            word = ints[start : start + CHUNK]
            exp = (word >> 23) & 0xFF
            if bool((exp == 0xFF).any()):
                raise ValueError("input contains NaN or inf")
            mant = word & 0x7FFFFF
            r = torch.randint(
                0, 1 << 23, word.shape, generator=g, device=word.device, dtype=torch.int32
            )
            exp += (r < mant).to(torch.int32)
            exps[start : start + word.numel()] = exp.clamp_(max=254).to(torch.uint8)
        return {"exps": exps, "signs": _pack_signs_bits(f32)}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        exps: torch.Tensor = fields["exps"]
        out = _signs_dense(fields["signs"], d, device, None)
        for start in range(0, d, CHUNK):
            end = min(d, start + CHUNK)
            out[start:end].mul_((exps[start:end].to(torch.int32) << 23).view(torch.float32))
        return out

    def _plan(self, fields: Fields, d: int) -> _Plan:
        return _Plan("dense", 9 * d)

    def _write(self, w: Writer, fields: Fields, d: int, plan: _Plan) -> None:
        w.section(fields["signs"])
        w.section(fields["exps"].cpu().numpy())

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        signs = r.section()
        if signs.size != (d + 7) // 8:
            raise CodecError("sign section has the wrong length")
        exps = r.section()
        if exps.size != d:
            raise CodecError(f"exponent section has {exps.size} bytes, expected {d}")
        if d and int(exps.max()) == 0xFF:
            raise CodecError("exponent 255 (NaN or inf)")
        return cls(), {"signs": signs.copy(), "exps": torch.from_numpy(exps.copy())}

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        neg = np.unpackbits(fields["signs"], count=d).astype(np.int64)
        sym = (neg << 8) | fields["exps"].cpu().numpy().astype(np.int64)
        return _entropy_bits(np.bincount(sym, minlength=512))


def _pack_signs_bits(f32: torch.Tensor) -> npt.NDArray[np.uint8]:
    """Packed sign *bits* of the float32 pattern (so -0.0 keeps its sign), MSB first."""
    d = f32.numel()
    out = np.empty((d + 7) // 8, dtype=np.uint8)
    for start in range(0, d, CHUNK):
        neg = (f32[start : start + CHUNK].view(torch.int32) < 0).cpu().numpy()
        out[start // 8 : (start + neg.size + 7) // 8] = np.packbits(neg)
    return out


# --------------------------------------------------------------------------- rand-k, top-k


def _k_for(k: int | None, frac: float | None, d: int) -> int:
    if k is not None:
        if not 1 <= k <= d:
            raise ValueError(f"k={k} out of range for a tensor of {d} coordinates (1..{d})")
        return k
    assert frac is not None
    return max(1, min(d, round(frac * d)))


def randk_indices(d: int, k: int, seed: int) -> torch.Tensor:
    """The sorted k-subset of [0, d) that rand-k with ``seed`` selects, uniformly at random.

    Drawn on the CPU generator (so sender and receiver agree whatever their devices): for
    k > d/4 a random permutation's first k entries; otherwise uniform draws in [0, d) with
    repeats discarded until k distinct values are seen (sampling without replacement).
    """
    g = torch.Generator()
    g.manual_seed(seed)
    if 4 * k > d:
        return torch.randperm(d, generator=g)[:k].sort().values
    draws = torch.empty(0, dtype=torch.int64)
    while True:
        missing = k - (torch.unique(draws).numel() if draws.numel() else 0)
        extra = missing + int(missing * k / d) + 16
        draws = torch.cat([draws, torch.randint(0, d, (extra,), generator=g)])
        values, inverse = torch.unique(draws, return_inverse=True)
        if values.numel() >= k:
            break
    first = torch.full((values.numel(),), draws.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
    order = torch.argsort(first)[:k]
    return values[order].sort().values


class RandK(Compressor):
    """rand-k: keep k coordinates chosen uniformly at random (indices from the seed),
    C(x) = (d/k) x_S (unbiased, omega = d/k - 1) or x_S (biased, delta = k/d in expectation).
    On the wire: the seed and the k values in the input dtype; the indices cost nothing.
    (So the header's shape is the only statement of d: any d >= k is a consistent message;
    the CRC-32 guards it like every other byte.)"""

    name = "randk"
    op_code = 4
    params_help = "frac=0.01 or k=K; unbiased=true|false"

    def __init__(
        self, k: int | None = None, frac: float | None = None, unbiased: bool = True
    ) -> None:
        _check_k_frac(k, frac, self.name)
        self.k = k
        self.frac = frac
        self.unbiased = unbiased

    @property
    def spec(self) -> str:
        size = f"k={self.k}" if self.k is not None else f"frac={_fmt_float(self.frac or 0)}"
        return f"randk:{size},unbiased={'true' if self.unbiased else 'false'}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> RandK:
        p = _take(params, {"k": None, "frac": None, "unbiased": "true"}, cls.name)
        k, frac = _k_frac_params(p)
        return cls(k, frac, _parse_bool("unbiased", p["unbiased"]))

    def k_for(self, d: int) -> int:
        return _k_for(self.k, self.frac, d)

    def omega(self, d: int) -> float:
        if not self.unbiased:
            return super().omega(d)
        return d / self.k_for(d) - 1

    def delta(self, d: int) -> float:
        if self.unbiased:
            return super().delta(d)
        return self.k_for(d) / d

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        _check_finite_sum(f32)
        d = f32.numel()
        k = self.k_for(d)
        index = randk_indices(d, k, seed).to(f32.device)
        values = flat[index]
        if self.unbiased:
            try:
                _check_scaled(values, d / k)
            except CodecError as exc:
                raise ValueError(f"{exc}; scale the input down") from None
        return {"values": values, "index": index, "seed": seed, "k": k}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        values: torch.Tensor = fields["values"]
        out = torch.zeros(d, dtype=torch.float32, device=device)
        vals = values.to(torch.float32)
        if self.unbiased:
            vals = vals * (d / fields["k"])
        out[fields["index"]] = vals
        return out

    def _plan(self, fields: Fields, d: int) -> _Plan:
        return _Plan(
            "values+seed", 64 + fields["values"].numel() * fields["values"].element_size() * 8
        )

    def _write(self, w: Writer, fields: Fields, d: int, plan: _Plan) -> None:
        w.varint(fields["k"])
        w.u8(1 if self.unbiased else 0)
        w.varint(fields["seed"])
        w.section(_tensor_bytes(fields["values"]))

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        k = r.varint(limit=d, name="rand-k k")
        unbiased = r.u8()
        seed = r.varint(limit=(1 << 64) - 1, name="rand-k seed")
        if k < 1 or unbiased > 1:
            raise CodecError(f"bad rand-k parameters k={k}, unbiased code={unbiased}")
        values = _bytes_tensor(r.section(), dtype, k)
        _check_finite_decoded(values, "values")
        if unbiased:
            _check_scaled(values, d / k)
        index = randk_indices(d, k, seed)
        comp = cls(k=k, unbiased=bool(unbiased))
        return comp, {"values": values, "index": index, "seed": seed, "k": k}

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        return float(fields["values"].numel() * fields["values"].element_size() * 8)


def _check_k_frac(k: int | None, frac: float | None, op: str) -> None:
    if (k is None) == (frac is None):
        raise ValueError(f"{op} needs exactly one of k=... or frac=...")
    if k is not None and k < 1:
        raise ValueError(f"{op} needs k >= 1, got k={k}")
    if frac is not None and not 0 < frac <= 1:
        raise ValueError(f"{op} needs 0 < frac <= 1, got frac={frac}")


def _k_frac_params(p: dict[str, str]) -> tuple[int | None, float | None]:
    k = _parse_int("k", p["k"]) if "k" in p else None
    frac = _parse_float("frac", p["frac"]) if "frac" in p else None
    if k is None and frac is None:
        frac = 0.01
    return k, frac


def _topk_abs_index(f32: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of k coordinates of largest |x_j|, selected chunk by chunk: the running
    best k is merged with each chunk's best k, so memory stays O(k + chunk)."""
    d = f32.numel()
    step = max(4 * CHUNK, 2 * k)
    if d <= step:
        return torch.topk(f32.abs(), k, sorted=False).indices.sort().values
    best_v = torch.empty(0, dtype=torch.float32, device=f32.device)
    best_i = torch.empty(0, dtype=torch.int64, device=f32.device)
    for start in range(0, d, step):
        a = f32[start : start + step].abs()
        v, i = torch.topk(a, min(k, a.numel()), sorted=False)
        best_v = torch.cat([best_v, v])
        best_i = torch.cat([best_i, i + start])
        if best_v.numel() > k:
            best_v, j = torch.topk(best_v, k, sorted=False)
            best_i = best_i[j]
    return best_i.sort().values


class TopK(Compressor):
    """top-k: keep the k coordinates of largest |x_j|; biased with delta = k/d, since
    ||C(x) - x||^2 = sum of the d - k smallest x_j^2 <= (1 - k/d) ||x||^2. On the wire: the k
    values in the input dtype and the sorted indices as LEB128 gaps or a d-bit bitmap,
    whichever is smaller."""

    name = "topk"
    op_code = 5
    params_help = "frac=0.01 or k=K"
    unbiased = False

    def __init__(self, k: int | None = None, frac: float | None = None) -> None:
        _check_k_frac(k, frac, self.name)
        self.k = k
        self.frac = frac

    @property
    def spec(self) -> str:
        size = f"k={self.k}" if self.k is not None else f"frac={_fmt_float(self.frac or 0)}"
        return f"topk:{size}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> TopK:
        p = _take(params, {"k": None, "frac": None}, cls.name)
        k, frac = _k_frac_params(p)
        return cls(k, frac)

    def k_for(self, d: int) -> int:
        return _k_for(self.k, self.frac, d)

    def delta(self, d: int) -> float:
        return self.k_for(d) / d

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        _check_finite_sum(f32)
        d = f32.numel()
        k = self.k_for(d)
        index = _topk_abs_index(f32, k)
        return {"values": flat[index], "index": index}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        out = torch.zeros(d, dtype=torch.float32, device=device)
        out[fields["index"]] = fields["values"].to(torch.float32)
        return out

    def _plan(self, fields: Fields, d: int) -> _Plan:
        idx = fields["index"].cpu().numpy().astype(np.int64)
        # zero runs before each kept index, and after the last: they add up to d - k
        gaps = np.diff(np.append(idx, d), prepend=-1) - 1
        varint = bits.varint_encode(gaps)
        values_bits = idx.size * fields["values"].element_size() * 8
        if 8 * varint.size <= d:
            return _Plan("varint", values_bits + 8 * varint.size, {"index": varint})
        return _Plan("bitmap", values_bits + 8 * ((d + 7) // 8))

    def _write(self, w: Writer, fields: Fields, d: int, plan: _Plan) -> None:
        k = fields["values"].numel()
        w.varint(k)
        w.section(_tensor_bytes(fields["values"]))
        if plan.code == "varint":
            w.u8(0)
            w.section(plan.extra["index"])
        else:
            w.u8(1)
            mask = np.zeros(d, dtype=bool)
            mask[fields["index"].cpu().numpy()] = True
            w.section(np.packbits(mask))

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        k = r.varint(limit=d, name="top-k k")
        if k < 1:
            raise CodecError("top-k with k = 0")
        values = _bytes_tensor(r.section(), dtype, k)
        _check_finite_decoded(values, "values")
        code = r.u8()
        data = r.section()
        if code == 0:
            try:
                gaps = bits.varint_decode(data, k + 1)
            except CodecError as exc:
                raise CodecError(f"top-k zero runs: {exc}") from None
            index = _runs_to_index(gaps, d, "top-k zero runs")
        elif code == 1:
            if data.size != (d + 7) // 8:
                raise CodecError("top-k bitmap has the wrong length")
            index = np.flatnonzero(np.unpackbits(data, count=d))
            if index.size != k:
                raise CodecError(f"top-k bitmap marks {index.size} coordinates, expected {k}")
        else:
            raise CodecError(f"unknown top-k index code {code}")
        return cls(k=k), {
            "values": values,
            "index": torch.from_numpy(index.astype(np.int64)),
            "wire_code": "varint" if code == 0 else "bitmap",
        }

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        k = fields["values"].numel()
        choose = (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)
        return choose + k * fields["values"].element_size() * 8


# --------------------------------------------------------------------------- signs


class ScaledSign(Compressor):
    """Scaled sign, per bucket B: C(x)_j = (||x_B||_1 / d_B) sign(x_j), sign(0) = +1.
    Biased: ||C(x) - x||^2 = ||x||^2 - sum_B ||x_B||_1^2 / d_B, so delta >= 1/d_B (reported);
    1 bit per coordinate plus one float32 scale per bucket."""

    name = "scaled_sign"
    op_code = 6
    params_help = "bucket=0 (per tensor) or bucket=N"
    unbiased = False

    def __init__(self, bucket: int = 0) -> None:
        if bucket < 0:
            raise ValueError(f"bucket must be >= 0 (0 = per tensor), got {bucket}")
        self.bucket = bucket

    @property
    def spec(self) -> str:
        return "scaled_sign" if self.bucket == 0 else f"scaled_sign:bucket={self.bucket}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ScaledSign:
        p = _take(params, {"bucket": "0"}, cls.name)
        return cls(_parse_int("bucket", p["bucket"]))

    def delta(self, d: int) -> float:
        return 1 / _bucket_size(self.bucket, d)

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        d = f32.numel()
        b = _bucket_size(self.bucket, d)
        l1 = _bucket_reduce(f32, b, 1.0)
        if not bool(torch.isfinite(l1).all()):
            _check_finite_sum(f32)
            raise ValueError("the L1 norm of a bucket overflows float32; scale the input down")
        scales = l1 / _bucket_lengths(d, b, f32.device)
        return {"scales": scales, "signs": _pack_signs(f32)}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        scales: torch.Tensor = fields["scales"]
        b = _bucket_size(self.bucket, d)
        if scales.numel() == 1:
            return _signs_dense(fields["signs"], d, device, scales)
        out = _signs_dense(fields["signs"], d, device, None)
        for start, rows, cols, bk in _segments(d, b):
            out[start : start + rows * cols].view(rows, cols).mul_(scales[bk : bk + rows, None])
        return out

    def _plan(self, fields: Fields, d: int) -> _Plan:
        return _Plan("bits", 32 * fields["scales"].numel() + d)

    def _write(self, w: Writer, fields: Fields, d: int, plan: _Plan) -> None:
        w.varint(self.bucket)
        w.section(_tensor_bytes(fields["scales"]))
        w.section(fields["signs"])

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        bucket = r.varint(name="bucket")
        comp = cls(bucket)
        nb = -(-d // _bucket_size(bucket, d))
        scales = _bytes_tensor(r.section(), torch.float32, nb, "scale")
        _check_finite_decoded(scales, "scales")
        if bool((scales.numpy() < 0).any()):
            raise CodecError("negative scale")
        signs = r.section()
        if signs.size != (d + 7) // 8:
            raise CodecError("sign section has the wrong length")
        return comp, {"scales": scales, "signs": signs.copy()}

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        neg = int(np.unpackbits(fields["signs"], count=d).sum(dtype=np.int64))
        return _entropy_bits(np.array([neg, d - neg])) + 32.0 * fields["scales"].numel()


class Sign(_Parameterless):
    """Plain sign for majority vote (signSGD, Bernstein et al.): C(x)_j = sign(x_j) in
    {-1, +1}, sign(0) = +1; 1 bit per coordinate. Biased and not a contraction (no scale),
    so it has neither omega nor delta."""

    name = "sign"
    op_code = 7
    unbiased = False

    def delta(self, d: int) -> float:
        raise ValueError("sign is not a contraction (no scale): it has no delta")

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        _check_finite_sum(f32)
        return {"signs": _pack_signs(f32)}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        return _signs_dense(fields["signs"], d, device, None)

    def _plan(self, fields: Fields, d: int) -> _Plan:
        return _Plan("bits", d)

    def _write(self, w: Writer, fields: Fields, d: int, plan: _Plan) -> None:
        w.section(fields["signs"])

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        signs = r.section()
        if signs.size != (d + 7) // 8:
            raise CodecError("sign section has the wrong length")
        return cls(), {"signs": signs.copy()}

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        neg = int(np.unpackbits(fields["signs"], count=d).sum(dtype=np.int64))
        return _entropy_bits(np.array([neg, d - neg]))


# --------------------------------------------------------------------------- registry


OPERATORS: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (Identity, QSGD, NaturalCompression, NaturalDithering, RandK, TopK, ScaledSign, Sign)
}
_BY_CODE: dict[int, type[Compressor]] = {cls.op_code: cls for cls in OPERATORS.values()}


def parse_compressor(spec: str) -> Compressor:
    """Build an operator from a spec such as ``"qsgd:s=1,bucket=4096"``.

    Specs are ``name`` or ``name:key=value,key=value`` (case-insensitive, spaces ignored):
    identity; qsgd (s, bucket, norm); natural; dither (s, bucket); randk (frac or k,
    unbiased); topk (frac or k); scaled_sign (bucket); sign. ``c.spec`` is the canonical form.
    """
    if not isinstance(spec, str):
        raise TypeError(f"compressor spec must be a string, got {type(spec).__name__}")
    text = spec.replace(" ", "").lower()
    name, _, rest = text.partition(":")
    if name not in OPERATORS:
        raise ValueError(
            f"unknown compressor {name!r} in spec {spec!r}; known: {', '.join(OPERATORS)}"
        )
    params: dict[str, str] = {}
    if rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                raise ValueError(f"bad parameter {item!r} in spec {spec!r}: expected key=value")
            if key in params:
                raise ValueError(f"parameter {key!r} given twice in spec {spec!r}")
            params[key] = value
    elif text.endswith(":"):
        raise ValueError(f"spec {spec!r} has a ':' but no parameters")
    return OPERATORS[name].from_params(params)


def decode(
    payload: bytes | bytearray | memoryview,
    device: str | torch.device = "cpu",
    *,
    expected_numel: int | None = None,
    max_numel: int | None = None,
) -> Compressed:
    """Parse a payload made by ``Compressed.to_bytes()``; ``decode(p).dense()`` is bit-exact
    the sender's ``dense()``.

    Args:
        payload: the bytes received.
        device: where the decoded tensors go; every check runs on the CPU before that.
        expected_numel: the number of coordinates the receiver expects (its model size d).
            A payload declaring any other size is refused right after the header, before
            anything of its size is allocated. Given, it replaces the default per-byte cap
            and the free-memory check (the receiver vouches for that size).
        max_numel: a cap on the declared coordinates (default, without ``expected_numel``:
            2^20 + 2^15 per payload byte, and at most half the memory available now).

    Raises:
        CodecError: for every malformed payload, with a message naming what was wrong:
            bad framing or checksum, unknown version/operator/dtype/code, a declared size
            other than ``expected_numel`` or above the cap, counts, runs or indices that
            do not add up to the declared size, levels above s, NaN/inf or negative norms
            and scales, NaN/inf values. When it returns, ``dense()`` cannot fail and has
            exactly the declared shape.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if expected_numel is not None:
        if isinstance(expected_numel, bool) or not isinstance(expected_numel, int | np.integer):
            raise TypeError(f"expected_numel must be an integer, got {expected_numel!r}")
        expected_numel = int(expected_numel)
        if expected_numel < 1:
            raise ValueError(f"expected_numel must be >= 1, got {expected_numel}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"cannot decode to {dev}: CUDA is not available")
    data = bytes(payload)
    try:
        r = Reader(data)
        version = r.u8()
        if version != FORMAT_VERSION:
            raise CodecError(
                f"unknown format version {version} (this build reads {FORMAT_VERSION})"
            )
        op = r.u8()
        if op not in _BY_CODE:
            raise CodecError(f"unknown operator code {op}")
        dcode = r.u8()
        if dcode not in CODE_DTYPES:
            raise CodecError(f"unknown dtype code {dcode}")
        dtype = CODE_DTYPES[dcode]
        ndim = r.u8()
        if ndim > MAX_NDIM:
            raise CodecError(f"{ndim} dimensions, at most {MAX_NDIM}")
        shape = tuple(r.varint(limit=1 << 48, name="shape dimension") for _ in range(ndim))
        d = math.prod(shape)
        if d == 0:
            raise CodecError("declared tensor is empty")
        if d > MAX_NUMEL:
            raise CodecError(f"declared {d} coordinates exceed the format's limit 2^48")
        if expected_numel is not None and d != expected_numel:
            raise CodecError(
                f"payload declares {d} coordinates (shape {shape}), "
                f"the receiver expects {expected_numel}"
            )
        cap = max_numel
        if cap is None and expected_numel is None:
            cap = (1 << 20) + MAX_COORDS_PER_BYTE * len(data)
        if cap is not None and d > cap:
            raise CodecError(f"declared {d} coordinates exceed the limit {cap} for this payload")
        if expected_numel is None:
            _check_memory(d)
        comp, fields = _BY_CODE[op]._read(r, d, dtype)
        r.done()
    except CodecError:
        raise
    except (ValueError, IndexError, OverflowError, RuntimeError, struct.error, TypeError) as exc:
        raise CodecError(f"malformed payload: {exc}") from exc
    wire_code = fields.pop("wire_code", None)
    out = Compressed(comp, shape, dtype, dev, _fields_to(fields, dev), payload=data)
    out._wire_code = wire_code
    return out


#: below this many coordinates (512 MiB as float64) a payload is decoded without asking the
#: OS how much memory is free, so the common message costs no system call
_MEMORY_CHECK_ABOVE = 1 << 26


def _check_memory(d: int) -> None:
    if d < _MEMORY_CHECK_ABOVE:
        return
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:  # psutil missing or unsupported platform: only the size cap applies
        return
    if d * 8 > available // 2:
        raise CodecError(f"declared {d} coordinates would need more memory than is available")
