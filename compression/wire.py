"""Framing of the wire format: header fields, length-prefixed sections, CRC-32 trailer.

Layout of one compressed tensor (all integers little endian, ``varint`` = LEB128)::

    magic  b"FSQZ"                                  4 bytes
    version                                         u8   (FORMAT_VERSION)
    operator code                                   u8   (compression.registry.OPERATORS_BY_CODE)
    dtype code                                      u8   (DTYPE_CODES: float32, float16, ...)
    ndim                                            u8   (<= MAX_NDIM)
    shape                                           ndim varints (product <= MAX_NUMEL)
    operator parameters                             operator specific (varints, u8 flags)
    sections                                        varint byte length + bytes, each
    crc32 of everything above                       u32

A reader validates every field as it goes and raises :class:`CodecError` (a ``ValueError``)
on anything malformed: short or long payloads, bad magic, unknown version, lengths past the
end, bad checksum.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import numpy.typing as npt
import torch

MAGIC = b"FSQZ"
FORMAT_VERSION = 1
MAX_NDIM = 16
#: The most coordinates any payload may declare, whatever the caller allows (so positions
#: and run sums stay far from int64's limit).
MAX_NUMEL = 1 << 48
#: The header's code of each input dtype.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class CodecError(ValueError):
    """A payload is malformed: truncated, corrupt, unknown version, inconsistent sizes, or
    declaring a size too large to decode."""


class Writer:
    """Accumulates header fields and sections, then :meth:`finish` appends the CRC-32."""

    def __init__(self) -> None:
        self._parts: list[bytes | memoryview] = []

    def u8(self, value: int) -> None:
        self._parts.append(bytes((value,)))

    def varint(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"varint must be non-negative, got {value}")
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
        self._parts.append(bytes(out))

    def section(self, data: bytes | npt.NDArray[np.uint8]) -> None:
        raw = data if isinstance(data, bytes) else np.ascontiguousarray(data, dtype=np.uint8).data
        view = memoryview(raw).cast("B")
        self.varint(view.nbytes)
        self._parts.append(view)

    def section_parts(self, parts: list[npt.NDArray[np.uint8]]) -> None:
        """One section made of several arrays, without joining them first."""
        self.varint(sum(int(p.size) for p in parts))
        for part in parts:
            self._parts.append(
                memoryview(np.ascontiguousarray(part, dtype=np.uint8).data).cast("B")
            )

    def finish(self) -> bytes:
        """The payload: every part and the CRC-32 of them all, joined with one copy."""
        crc = 0
        for part in self._parts:
            crc = zlib.crc32(part, crc)
        return b"".join([*self._parts, struct.pack("<I", crc)])


class Reader:
    """Reads what :class:`Writer` wrote; every read is bounds-checked."""

    def __init__(self, payload: bytes | bytearray | memoryview) -> None:
        view = memoryview(payload).cast("B")
        if view.nbytes < len(MAGIC) + 4 + 4:
            raise CodecError(f"payload of {view.nbytes} bytes is too short to hold a header")
        body = view[:-4]
        (crc,) = struct.unpack("<I", view[-4:])
        if zlib.crc32(body) != crc:
            raise CodecError("checksum mismatch: the payload is corrupt or truncated")
        if bytes(body[:4]) != MAGIC:
            raise CodecError("bad magic: not a fedsqueeze compressed tensor")
        self._buf = body
        self._pos = 4
        self.total = view.nbytes

    @property
    def remaining(self) -> int:
        return self._buf.nbytes - self._pos

    def u8(self) -> int:
        if self._pos >= self._buf.nbytes:
            raise CodecError("payload ends inside the header")
        value = self._buf[self._pos]
        self._pos += 1
        return int(value)

    def varint(self, limit: int = 1 << 63, name: str = "header field") -> int:
        """A LEB128 value of at most 10 bytes and at most ``limit``; errors name ``name``."""
        value = 0
        for shift in range(0, 70, 7):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > limit:
                    raise CodecError(f"{name} {value} exceeds its limit {limit}")
                return value
        raise CodecError(f"{name}: varint longer than 10 bytes")

    def section(self) -> npt.NDArray[np.uint8]:
        length = self.varint()
        if length > self.remaining:
            raise CodecError(f"section of {length} bytes runs past the end of the payload")
        out = np.frombuffer(self._buf, dtype=np.uint8, count=length, offset=self._pos)
        self._pos += length
        return out

    def done(self) -> None:
        if self.remaining:
            raise CodecError(f"{self.remaining} unexpected bytes after the last section")
