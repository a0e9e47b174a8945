"""Run an algorithm's two halves in one process, without Flower.

The same `ServerHalf` and `client_round` code the Flower strategy and ClientApp use, wired
together by plain function calls: what the math tests and quick experiments drive. Bytes are
still real (every vector crosses as its encoded payload).

Faults can be injected per round and client (`run_local(fault=...)`, kinds in
`FAULT_KINDS`), and the set of connected clients can change from round to round
(`run_local(members=...)`: a client leaves for good, or joins late), so that tests and
`benchmarks.faults` drive the recovery paths with the real halves and real wire bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from strategies.client_half import ClientState, client_round, initial_client_state
from strategies.messages import Uplink
from strategies.registry import client_apply, make_server
from strategies.sampling import sample_clients
from strategies.server_half import RoundStats, ServerHalf
from strategies.settings import AlgorithmSettings

#: (client index, model vector) -> (g_i, loss)
GradientFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, float]]

FaultKind = Literal["crash", "lost", "corrupt", "crafted", "late", "state-loss"]
#: What can go wrong with one sampled client in one round:
#:
#: - ``crash``: the client trains and keeps its new (pending) state, then dies before
#:   replying; the server sees a failed reply.
#: - ``lost``: the reply is sent and lost on the way; the server sees no reply (timeout).
#: - ``corrupt``: the reply arrives with bytes of its payload flipped.
#: - ``crafted``: the reply carries a hostile payload with a valid header and CRC
#:   (`crafted_payload`).
#: - ``late``: the reply arrives after the round's timeout, during the next round (refused
#:   with max-staleness τ = 0, folded into that round's ĝ with τ ≥ 1).
#: - ``state-loss``: the client lost its state (a restart without its ``context.state``)
#:   before the round, and starts over from the initial state.
FAULT_KINDS: tuple[FaultKind, ...] = ("crash", "lost", "corrupt", "crafted", "late", "state-loss")

#: (round k, client i) -> the fault that hits client i in round k, or None
FaultFn = Callable[[int, int], FaultKind | None]


@dataclass
class LocalRun:
    server: ServerHalf
    committed: dict[int, ClientState]
    pending: dict[int, ClientState | None]
    history: list[RoundStats] = field(default_factory=list)
    sampled: list[list[int]] = field(default_factory=list)
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    #: faults injected, by kind
    faults: dict[str, int] = field(default_factory=dict)


def crafted_payload(dim: int) -> bytes:
    """A top-k payload of `dim` coordinates whose header, sections and CRC-32 are valid but
    whose LEB128 index gaps are [2^63 − 1, 2^63 − 1, dim]: their int64 sum wraps around to
    exactly dim − k, so a decoder that checks only that sum derives negative indices."""
    from compression import TopK
    from compression.wire import DTYPE_CODES, FORMAT_VERSION, MAGIC

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    def section(data: bytes) -> bytes:
        return varint(len(data)) + data

    big = (1 << 63) - 1
    body = b"".join(
        [
            MAGIC,
            bytes([FORMAT_VERSION, TopK.op_code, DTYPE_CODES[torch.float32], 1]),
            varint(dim),  # shape
            varint(2),  # k
            section(np.array([1.0, -1.0], dtype=np.float32).tobytes()),
            b"\x00",  # the index as LEB128 gaps
            section(varint(big) + varint(big) + varint(dim)),
        ]
    )
    return body + struct.pack("<I", zlib.crc32(body))


def corrupt_payload(payload: bytes, rng: np.random.Generator) -> bytes:
    """`payload` with 1-4 random bytes replaced by different random values."""
    data = bytearray(payload)
    if not data:
        return bytes([int(rng.integers(256))])
    for pos in rng.choice(len(data), size=min(len(data), int(rng.integers(1, 5))), replace=False):
        data[pos] ^= int(rng.integers(1, 256))
    return bytes(data)


def run_local(
    settings: AlgorithmSettings,
    w0: torch.Tensor,
    gradient: GradientFn,
    num_clients: int,
    rounds: int,
    *,
    lose_reply: Callable[[int, int], bool] | None = None,
    on_round: Callable[[int, LocalRun], None] | None = None,
    revert_lost_state: bool = True,
    members: Callable[[int], Sequence[int]] | None = None,
    fault: FaultFn | None = None,
    fault_seed: int = 0,
) -> LocalRun:
    """`rounds` rounds of `settings` with clients 0..num_clients-1.

    `members(k)` is the set of clients connected in round k (default: all of them), what the
    server counts and samples from (`ServerHalf.set_members`); a client absent from it has
    left, and one that appears in a later round joins late. `fault(k, i)` names the fault
    (`FAULT_KINDS`) that hits sampled client i in round k, if any; `fault_seed` seeds the
    bytes a corruption flips.

    `lose_reply(k, i)` True drops client i's reply in round k after the client has updated
    its state (the ``crash`` fault); `revert_lost_state=False` makes the client keep its
    unacknowledged uplink memory (the bug the round stamps prevent and the state digest
    detects), for tests.
    """
    server = make_server(settings, w0, expected_clients=num_clients)
    apply = client_apply(settings)
    run = LocalRun(
        server,
        {i: initial_client_state(w0, settings) for i in range(num_clients)},
        {i: None for i in range(num_clients)},
    )
    rng = np.random.default_rng(settings.seed)
    fault_rng = np.random.default_rng(fault_seed)
    late: list[tuple[int, Uplink]] = []  # replies that arrive during the next round
    for k in range(1, rounds + 1):
        connected = list(range(num_clients)) if members is None else sorted(members(k))
        server.begin_round(k)  # first: it clears the round's counters set_members fills
        server.set_members(connected)
        nodes, expected = sample_clients(
            connected, settings.participation, settings.participation_mode, rng
        )
        nodes = server.skip_busy(nodes)  # τ > 0: clients with a reply outstanding wait
        run.sampled.append(nodes)
        arriving_late, late = late, []
        for i in nodes:

            def compute(w: torch.Tensor, i: int = i) -> tuple[torch.Tensor, float, int]:
                g, loss = gradient(i, w)
                return g, loss, 1

            kind = fault(k, i) if fault is not None else None
            if kind is None and lose_reply is not None and lose_reply(k, i):
                kind = "crash"
            if kind is not None:
                run.faults[kind] = run.faults.get(kind, 0) + 1
            if kind == "state-loss":
                run.committed[i] = initial_client_state(w0, settings)
                run.pending[i] = None
            message = server.downlink_for(k, i)
            run.downlink_bytes += message.nbytes
            step = client_round(
                settings,
                run.committed[i],
                run.pending[i],
                message,
                w0,
                apply,
                compute,
            )
            run.committed[i], run.pending[i] = step.committed, step.pending
            for node, stale in [(n, u) for n, u in arriving_late if n == i]:
                server.receive(k, node, stale)  # last round's reply, arriving now
            uplink = step.uplink
            if kind in ("crash", "lost", "late"):
                if kind == "late":
                    late.append((i, uplink))
                if kind == "crash":
                    server.receive(k, i, None, "crashed after training")
                else:  # no reply before the round's deadline (τ > 0: it becomes outstanding)
                    server.timeout(k, i)
                if not revert_lost_state and step.pending is not None:
                    # the bug: keep the unacknowledged uplink memory and residual
                    run.committed[i] = replace(
                        step.committed,
                        up_memory=step.pending.up_memory,
                        up_residual=step.pending.up_residual,
                    )
                continue
            if kind == "corrupt":
                uplink = replace(uplink, payload=corrupt_payload(uplink.payload, fault_rng))
            elif kind == "crafted":
                uplink = replace(uplink, payload=crafted_payload(settings.dim))
            run.uplink_bytes += uplink.nbytes
            server.receive(k, i, uplink)
        for node, stale in arriving_late:
            if node not in nodes:
                server.receive(k, node, stale)
        run.history.append(server.finish_round(k, expected))
        if on_round is not None:
            on_round(k, run)
    return run
