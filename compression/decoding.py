"""Decoding a received payload into a :class:`~compression.compressed.Compressed`.

:func:`decode` reads the header of :mod:`compression.wire`, refuses a declared size d
other than the receiver's or above the caps (a bound per payload byte, half the free
memory, 2^48) before allocating anything of that size, lets the operator named by the
header (:data:`compression.registry.OPERATORS_BY_CODE`) parse and validate its fields on
the CPU, and only then moves them to the target device: when it returns, ``dense()``
cannot fail. Every failure is one :class:`~compression.wire.CodecError`.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from compression.compressed import Compressed, Fields
from compression.registry import OPERATORS_BY_CODE
from compression.wire import (
    CODE_DTYPES,
    FORMAT_VERSION,
    MAX_NDIM,
    MAX_NUMEL,
    CodecError,
    Reader,
)

__all__ = ["MAX_COORDS_PER_BYTE", "decode"]


#: Default bound on decoded coordinates per payload byte (see :func:`decode`).
MAX_COORDS_PER_BYTE = 1 << 15


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
        if op not in OPERATORS_BY_CODE:
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
        comp, fields = OPERATORS_BY_CODE[op]._read(r, d, dtype)
        r.done()
    except CodecError:
        raise
    except (ValueError, IndexError, OverflowError, RuntimeError, struct.error, TypeError) as exc:
        raise CodecError(f"malformed payload: {exc}") from exc
    wire_code = fields.pop("wire_code", None)
    out = Compressed(comp, shape, dtype, dev, _fields_to(fields, dev), payload=data)
    out._wire_code = wire_code
    return out


def _fields_to(fields: Fields, device: torch.device) -> Fields:
    """The validated CPU fields of a decoded message, tensors moved to ``device``."""
    if device.type == "cpu":
        return fields
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}


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
