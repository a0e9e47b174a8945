"""Run an algorithm's two halves in one process, without Flower.

The same `ServerHalf` and `client_round` code the Flower strategy and ClientApp use, wired
together by plain function calls: what the math tests and quick experiments drive. Bytes are
still real (every vector crosses as its encoded payload).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from strategies.common import (
    AlgorithmSettings,
    ClientState,
    RoundStats,
    ServerHalf,
    client_round,
    initial_client_state,
    sample_clients,
)
from strategies.registry import client_apply, make_server

#: (client index, model vector) -> (g_i, loss)
GradientFn = Callable[[int, torch.Tensor], tuple[torch.Tensor, float]]


@dataclass
class LocalRun:
    server: ServerHalf
    committed: dict[int, ClientState]
    pending: dict[int, ClientState | None]
    history: list[RoundStats] = field(default_factory=list)
    sampled: list[list[int]] = field(default_factory=list)
    uplink_bytes: int = 0
    downlink_bytes: int = 0


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
) -> LocalRun:
    """`rounds` rounds of `settings` with clients 0..num_clients-1.

    `lose_reply(k, i)` True drops client i's reply in round k after the client has updated
    its state (a crash after training); `revert_lost_state=False` makes the client keep its
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
    for k in range(1, rounds + 1):
        nodes, expected = sample_clients(
            list(range(num_clients)), settings.participation, settings.participation_mode, rng
        )
        run.sampled.append(nodes)
        server.begin_round(k)
        for i in nodes:

            def compute(w: torch.Tensor, i: int = i) -> tuple[torch.Tensor, float, int]:
                g, loss = gradient(i, w)
                return g, loss, 1

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
            if lose_reply is not None and lose_reply(k, i):
                server.receive(k, i, None, "reply lost (test)")
                if not revert_lost_state and step.pending is not None:
                    # the bug: keep the unacknowledged uplink memory and residual
                    run.committed[i] = replace(
                        step.committed,
                        up_memory=step.pending.up_memory,
                        up_residual=step.pending.up_residual,
                    )
                continue
            run.uplink_bytes += step.uplink.nbytes
            server.receive(k, i, step.uplink)
        run.history.append(server.finish_round(k, expected))
        if on_round is not None:
            on_round(k, run)
    return run
