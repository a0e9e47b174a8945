"""Validation of a client's reply before anything of it reaches the server's state.

A reply of round k is taken in only if every check passes; otherwise it is refused with a
reason naming what was wrong (`ServerHalf.receive` logs and counts it, and the round goes
on). In order:

1. the reply is stamped with round k;
2. its payload is non-empty bytes of at most `max_uplink_bytes` (by default 8d + 64 KiB,
   twice a float32 copy of the model plus headers);
3. its state digest has `DIGEST_BYTES` bytes (`strategies.consistency`);
4. the payload decodes (the codec refuses any payload declaring other than d coordinates
   before allocating it) to Δ̂_i with exactly d values, all finite.

The digest's *value* is checked afterwards, against the state the server expects the client
to hold (`strategies.consistency`).
"""

from __future__ import annotations

import math

import torch

from strategies.consistency import DIGEST_BYTES
from strategies.encoding import codec_error_types, decode_payload
from strategies.messages import Uplink


def default_max_uplink_bytes(dim: int) -> int:
    """The largest uplink payload accepted for a model of d coordinates: 8d + 64 KiB."""
    return 8 * dim + 65536


def check_uplink(k: int, uplink: Uplink, max_uplink_bytes: int) -> str:
    """Checks 1-3 of the module docstring: '' when they pass, else the reason."""
    if uplink.round != k:
        return f"reply for round {uplink.round}, expected {k}"
    if not isinstance(uplink.payload, bytes | bytearray) or not uplink.payload:
        return "empty payload"
    if len(uplink.payload) > max_uplink_bytes:
        return f"payload of {len(uplink.payload)} bytes exceeds {max_uplink_bytes}"
    if not isinstance(uplink.digest, bytes) or len(uplink.digest) != DIGEST_BYTES:
        return "bad state digest"
    return ""


def decode_uplink(
    k: int, uplink: Uplink, dim: int, max_uplink_bytes: int
) -> tuple[torch.Tensor | None, str]:
    """(Δ̂_i, '') for a valid reply of round k, else (None, the reason).

    Raises only what a decoder raises beyond `codec_error_types()`: the caller treats any
    exception as a refused reply.
    """
    reason = check_uplink(k, uplink, max_uplink_bytes)
    delta_hat: torch.Tensor | None = None
    if not reason:
        try:
            decoded = decode_payload(uplink.payload, expected_numel=dim)
            delta_hat = decoded.dense().reshape(-1).to(torch.float32)
        except codec_error_types() as exc:
            reason = f"undecodable payload: {exc}"
    if not reason and delta_hat is not None:
        if delta_hat.numel() != dim:
            reason = f"payload has {delta_hat.numel()} values, the model has {dim}"
        elif not all_finite(delta_hat):
            reason = "payload holds non-finite values"
    return delta_hat, reason


def all_finite(x: torch.Tensor) -> bool:
    """Every value of x is finite: the answer of ``torch.isfinite(x).all()``, in one pass
    over x without temporaries in the usual case. A sum of finite floats that comes out
    finite proves them all finite (an inf or a NaN among the terms makes every sum inf or
    NaN: IEEE addition never turns either back into a finite value); only a sum that
    overflows with all terms finite needs the per-value check."""
    if x.is_floating_point() and math.isfinite(float(x.sum())):
        return True
    return bool(torch.isfinite(x).all())
