"""The consistency protocol that keeps each client's memories and model in step with the
server's view of them, and the exact state digest it checks.

Every downlink message carries the round stamp of the client's last reply the server
accepted (``ack_round``) and the model version the server believes the client holds
(``base_version``). The client keeps two states: *committed* (as of its last accepted reply)
and *pending* (after its latest round). On the next message it promotes pending to committed
if the server acknowledged that round, and otherwise throws pending away, so that a lost
reply (crash, timeout, dropped or invalid payload) rolls both sides back to the last state
they share (`strategies.client_half.client_round`).

The client reports an exact digest of the state (h_i, H, w) it computed its update at::

    digest = BLAKE2b-128(h_i) ‖ BLAKE2b-128(H) ‖ BLAKE2b-128(w)      (`DIGEST_BYTES` bytes)

and the server compares it with the digest of its own view (`ServerHalf.receive`): equal
digests mean bit-identical tensors (no tolerance). On a mismatch, or when a client says its
state does not match (e.g. it lost its state), both sides reset that client's memories to
their initial values (h_i = e_i = 0; MCM's H and Rand-MCM's H_i = w_0) and the server sends a
full-precision snapshot. Every such event is logged and counted (`RoundStats`).

Delayed updates (run-config key ``max-staleness`` τ ≥ 0; τ = 0 is the protocol above: a
reply that misses its round is lost). A reply of round k that arrives in round j with
1 ≤ j − k ≤ τ is applied in round j, as if it had arrived in time, by the rules below:

1. Outstanding replies. When client i sampled in round k does not reply before the round's
   deadline (`ServerHalf.timeout`), the server keeps what it expected from i
   (`OutstandingReply`: the round k, the target version, the expected digest of the state
   i computed its update at, and Rand-MCM's H_i commit) and the Flower glue keeps the
   message id, pulling its reply in every later round (`FedSqueezeStrategy._exchange`;
   round k + τ, the reply's last chance, also waits for it up to the round timeout).
2. A late reply is applied only while nothing newer was sent to its client. A downlink of
   round j' > k acks the client's last accepted round (< k), which makes the client drop the
   pending state its round-k reply was computed at; that reply can then never be applied.
   So a client with an outstanding reply is *busy*: S_j is drawn as always from (seed,
   round, partitions), then busy clients are removed from it (`ServerHalf.skip_busy`,
   counted in `busy_skipped`; pN stays the draw's), so the draw of every round, and with
   τ = 0 the whole run, is unchanged. Should a busy client be sent a downlink all the same,
   its outstanding reply is void, and refused when it arrives.
3. Applying it (`ServerHalf.receive` → `_receive_late`): the reply is checked as a timely
   one (round stamp k, size, decoding, the digest against the one expected in round k);
   then the server acks round k (`acked_round = k`, the client's version = round k's target
   version), commits Rand-MCM's H_i of round k, and Δ̂_i joins round j's aggregation, with
   the uplink memory update h_i ← h_i + α_up Δ̂_i the client made in round k
   (`strategies.aggregation`). The next downlink to i acks round k: the client promotes its
   pending state (h_i, e_i, H_i, its model at round k's version), and the server brings it
   from that version to the current one (broadcast log or snapshot,
   `strategies.catchup`): both sides hold the same state again, and the digest says so.
4. Refused: a late reply whose staleness exceeds τ, that is no longer outstanding (a newer
   downlink was sent, the client left C), or that fails a check; and an outstanding reply
   that has not arrived by the end of round k + τ is dropped (`late_expired`). Each is
   logged and counted (`late_refused`); the client rolls back on its next downlink, as
   for a lost reply. Every late reply that arrives is listed with its staleness in the
   round's `late_replies` (RoundRecord.extra).
5. Resume: outstanding replies are not checkpointed (`strategies.checkpoint.IN_FLIGHT`):
   a resumed run cannot pull the old run's replies, so they count as timed out, and the
   clients roll back.
"""

from __future__ import annotations

import hashlib

import torch

#: bytes of one part of the state digest (BLAKE2b-128), and of the whole digest (3 parts)
DIGEST_PART_BYTES = 16
DIGEST_BYTES = 3 * DIGEST_PART_BYTES
DIGEST_PARTS = ("uplink memory h_i", "downlink memory H", "model")


def tensor_digest(t: torch.Tensor | None) -> bytes:
    """BLAKE2b-128 of a tensor's dtype, shape and contiguous CPU bytes; an absent tensor has
    its own digest. Both sides hold bit-identical float32 state, so equal digests mean equal
    tensors (no tolerance); both sides compute their digests with this one function."""
    h = hashlib.blake2b(digest_size=DIGEST_PART_BYTES, person=b"fedsqueeze-state")
    if t is None:
        h.update(b"absent")
        return h.digest()
    c = t.detach().to("cpu").contiguous()
    h.update(f"{c.dtype}{tuple(c.shape)}".encode())
    h.update(c.reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def state_digest(
    up_memory: torch.Tensor | None, down_memory: torch.Tensor | None, model: torch.Tensor | None
) -> bytes:
    """digest(h_i) ‖ digest(H) ‖ digest(w): `DIGEST_BYTES` bytes (absent parts included)."""
    return tensor_digest(up_memory) + tensor_digest(down_memory) + tensor_digest(model)


def digest_difference(reported: bytes, expected: bytes) -> str:
    """The parts (`DIGEST_PARTS`) in which two state digests differ, for the log."""
    n = DIGEST_PART_BYTES
    return ", ".join(
        name
        for j, name in enumerate(DIGEST_PARTS)
        if reported[j * n : (j + 1) * n] != expected[j * n : (j + 1) * n]
    )
