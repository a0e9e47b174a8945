"""Downlink catch-up: what a client that missed rounds receives when it is sampled again.

Under partial participation a client sampled in round k may hold an old model version v
(its last accepted round) while the server is at version V. For the families whose clients
all apply one broadcast (`strategies.artemis`, MCM in `strategies.mcm`, `strategies.signsgd`),
the server sends (ALGORITHMS.md, "Idle clients")::

    the missed broadcasts Ω_{v+1}, ..., Ω_V in order      if their bytes < a snapshot's
    a full-precision snapshot of what the client holds    otherwise, or after a reset
      (w, and the downlink memory H where there is one)

This traffic is real downlink traffic and is counted (`RoundStats.catchup_messages`,
`catchup_bytes`, `snapshots`). Rand-MCM needs no catch-up: each H_i moves only when client
i receives a message.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

from strategies.encoding import Wire, encode, get_compressor
from strategies.messages import Downlink
from strategies.server_half import ClientBook, ServerHalf


class BroadcastLog:
    """The broadcast downlink messages of the last rounds, for catching idle clients up.

    Entry v turns a client at version v − 1 into version v. Entries are kept only while the
    bytes needed to replay them stay below `limit_bytes` (a full snapshot's size): a client
    further behind gets the snapshot anyway.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._entries: deque[tuple[int, Wire]] = deque()
        self._bytes = 0

    def append(self, version: int, wire: Wire) -> None:
        self._entries.append((version, wire))
        self._bytes += wire.nbytes
        while self._entries and self._bytes > self.limit_bytes:
            _, old = self._entries.popleft()
            self._bytes -= old.nbytes

    def since(self, version: int, latest: int) -> list[Wire] | None:
        """Entries version+1..latest, or None when some are no longer kept."""
        needed = [w for v, w in self._entries if v > version]
        if len(needed) != latest - version:
            return None
        return needed


def catch_up(
    server: ServerHalf,
    book: ClientBook,
    k: int,
    log_: BroadcastLog,
    snapshot: Callable[[], tuple[list[bytes], int]],
    snapshot_nbytes: int,
) -> Downlink:
    """Missed broadcasts in order, or a full snapshot, whichever is smaller in bytes.

    Args:
        server: the server half (its model version V and this round's `stats`, which count
            the catch-up traffic beyond the latest broadcast).
        book: what the server knows of the client (its version v, whether it must reset).
        k: the round.
        log_: the broadcasts kept for replay.
        snapshot: the snapshot of version V (payloads, predicted bytes), built on demand.
        snapshot_nbytes: a snapshot's size, the bound the replayed bytes must stay under.

    Returns:
        A "log" Downlink with Ω_{v+1}..Ω_V (none when v = V), or a "snapshot" Downlink;
        its stamps (ack round, reset, seed) are set by `ServerHalf.downlink_for`.
    """
    stats = server.stats
    if not book.needs_reset and book.version == server.version:
        return Downlink(k, "log", book.version, server.version, 0, False, 0)
    entries = None if book.needs_reset else log_.since(book.version, server.version)
    if entries is not None and sum(w.nbytes for w in entries) < snapshot_nbytes:
        if len(entries) > 1:
            stats.catchup_messages += len(entries) - 1
            stats.catchup_bytes += sum(w.nbytes for w in entries[:-1])
        return Downlink(
            k,
            "log",
            book.version,
            server.version,
            0,
            False,
            0,
            [w.payload for w in entries],
            sum(w.predicted_nbytes for w in entries),
        )
    payloads, predicted = snapshot()
    stats.snapshots += 1
    if book.version < server.version - 1 or book.needs_reset:
        stats.catchup_bytes += sum(len(p) for p in payloads)
    return Downlink(k, "snapshot", book.version, server.version, 0, False, 0, payloads, predicted)


class SnapshotCache:
    """The snapshot of the server's current model version, encoded once per version (every
    client that needs a snapshot in a round receives the same bytes)."""

    def __init__(self) -> None:
        self._version: int | None = None
        self._snapshot: tuple[list[bytes], int] = ([], 0)

    def get(
        self, version: int, tensors: Callable[[], Sequence[torch.Tensor]]
    ) -> tuple[list[bytes], int]:
        """`encode_snapshot(tensors())` of model version `version`, from the cache when it
        holds that version."""
        if self._version != version:
            self._snapshot = encode_snapshot(tensors())
            self._version = version
        return self._snapshot


def encode_snapshot(tensors: Sequence[torch.Tensor]) -> tuple[list[bytes], int]:
    """A full-precision snapshot: each tensor as an identity-coded (float32) payload, and
    the codec's predicted size of them all."""
    identity = get_compressor("identity")
    payloads, predicted = [], 0
    for t in tensors:
        wire, _ = encode(identity, t, 0)
        payloads.append(wire.payload)
        predicted += wire.predicted_nbytes
    return payloads, predicted
