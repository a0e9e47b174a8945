"""The two messages of a round, as the algorithms see them (Flower's records are built from
these in `strategies.flower`).

Round k for client i ∈ S_k::

    server → client   Downlink: what brings client i to the server's model version
                      (missed broadcasts Ω in order, a full-precision snapshot, or a message
                      compressed for i alone), plus the consistency stamps (ack round,
                      versions, reset flag; `strategies.consistency`) and the uplink seed
    client → server   Uplink: the encoded Δ̂_i = C_up(Δ_i) and the digest of the state
                      (h_i, H, w) the client computed its update at
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Downlink:
    """What the server sends client i at the start of round k (before it trains).

    kind: "log" (missed broadcasts in order, possibly none), "snapshot" (full-precision copy
    of what the client must hold) or "fresh" (a message compressed for this client alone).
    """

    round: int
    kind: Literal["log", "snapshot", "fresh"]
    base_version: int
    target_version: int
    ack_round: int
    reset: bool
    uplink_seed: int
    payloads: list[bytes] = field(default_factory=list)
    predicted_nbytes: int = 0

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.payloads)


@dataclass
class Uplink:
    """What client i replies: its encoded Δ̂_i and a digest of the state it holds."""

    round: int
    status: Literal["ok", "resync"]
    payload: bytes
    predicted_nbytes: int
    digest: bytes  # `state_digest` of the state the client computed its update at
    loss: float
    num_examples: int
    detail: str = ""

    @property
    def nbytes(self) -> int:
        return len(self.payload)
