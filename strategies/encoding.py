"""Vectors on the wire: compressors by spec, encoding, decoding and the seeds that drive them.

The one rule both halves follow (ALGORITHMS.md): a vector x crosses the wire as the bytes of
x̂ = C(x), and the *sender* goes on with the x̂ the *receiver* decodes from those bytes, never
with its own float copy, so that both ends hold bit-identical state::

    wire = bytes(C(x; seed)) ;  x̂ = decode(wire)   (the same x̂ on both sides)

Seeds are derived from (run seed, round k, node i, direction) so that a run is reproducible
and both sides agree on a shared-seed compressor's randomness.

The compressors and codecs themselves live in `compression`; this module is the thin,
typed boundary through which every strategy reaches them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class Encoded(Protocol):
    """What `compression` returns from `compress` / `decode` (see compression's docs)."""

    @property
    def nbytes(self) -> int: ...

    @property
    def predicted_nbytes(self) -> int: ...

    def dense(self) -> torch.Tensor: ...

    def to_bytes(self) -> bytes: ...


class Compressor(Protocol):
    """A compression operator C: unbiased with variance factor ω, or biased with
    contraction δ (ALGORITHMS.md, "Compressors")."""

    unbiased: bool

    def omega(self, d: int) -> float: ...

    def delta(self, d: int) -> float: ...

    def compress(self, x: torch.Tensor, seed: int) -> Encoded: ...


@functools.lru_cache(maxsize=64)
def get_compressor(spec: str) -> Compressor:
    """`compression.parse_compressor(spec)`, with a clear error naming the spec."""
    from compression import parse_compressor

    try:
        return parse_compressor(spec)
    except Exception as exc:
        raise ValueError(f"bad compressor spec {spec!r}: {exc}") from exc


def decode_payload(
    payload: bytes, device: str | torch.device = "cpu", expected_numel: int | None = None
) -> Encoded:
    """`compression.decode`; a payload declaring other than `expected_numel` coordinates
    (the model size d) is refused with CodecError before anything of its size exists."""
    from compression import decode

    return decode(payload, device=str(device), expected_numel=expected_numel)


def decode_wires(
    payloads: Sequence[bytes], device: str, expected_numel: int | None = None
) -> list[torch.Tensor]:
    """Each payload decoded to a flat float32 vector x̂ on `device` (see `decode_payload`)."""
    return [
        decode_payload(p, device, expected_numel).dense().reshape(-1).to(torch.float32)
        for p in payloads
    ]


def codec_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions a decoder raises for bytes it refuses (CodecError, ValueError)."""
    from compression import CodecError

    return (CodecError, ValueError)


@dataclass(frozen=True)
class Wire:
    """One encoded vector as it travels: the bytes and the codec's predicted size."""

    payload: bytes
    predicted_nbytes: int

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def encode(
    compressor: Compressor, x: torch.Tensor, seed: int, device: str | torch.device = "cpu"
) -> tuple[Wire, torch.Tensor]:
    """Compress x and return (wire, x̂) where x̂ is what the *receiver* decodes from the wire.

    The sender uses exactly the receiver's x̂, which keeps both ends bit-identical.
    """
    message = compressor.compress(x.detach().to(torch.float32).contiguous(), seed=seed)
    payload = message.to_bytes()
    # compression guarantees decode(m.to_bytes()).dense() == m.dense() bit for bit
    decoded = message.dense().reshape(-1).to(torch.float32)
    return Wire(payload, int(message.predicted_nbytes)), decoded


def derive_seed(*parts: int) -> int:
    """A reproducible 31-bit seed from integers (run seed, round, node, direction)."""
    seq = np.random.SeedSequence([abs(int(p)) % (2**63) for p in parts])
    return int(seq.generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)
