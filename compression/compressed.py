"""The compressed message: :class:`Compressed` holds C(x) in symbolic form.

A message keeps the operator's symbols in memory (norms, levels, signs, indices, values:
its ``fields``) and makes the rest on demand: ``dense()`` rebuilds C(x) with the input's
shape, dtype and device; ``to_bytes()`` serializes it with the operator's smallest code
(:class:`Plan`: the code and its size in bits predicted by formula) behind the header of
:mod:`compression.wire`; ``information_limit_bits()`` is the empirical entropy n H(p̂) of
the symbols carried plus the bits of its floats. :func:`compression.decoding.decode` parses
bytes back into a :class:`Compressed` whose ``dense()`` is bit-for-bit the sender's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from compression.wire import DTYPE_CODES, FORMAT_VERSION, MAGIC, Writer

if TYPE_CHECKING:
    from compression.base import Compressor

__all__ = ["Compressed", "Fields", "Plan"]

#: The symbols of one message, by name (``norms``, ``levels``, ``signs``, ``index``, ...).
Fields = dict[str, Any]


@dataclass
class Plan:
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
        self._plan: Plan | None = None
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

    def plan(self) -> Plan:
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

    def _serialize(self, plan: Plan) -> bytes:
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
