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
