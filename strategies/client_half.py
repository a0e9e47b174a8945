"""The client half every algorithm shares: the client's state, its uplink, and one round.

Uplink of client i ∈ S_k (ALGORITHMS.md), given its update g_i (a stochastic gradient, or
(w_start − w_end)/η after K local steps of learning rate η)::

    m_i ← β m_i + (1 − β) g_i ;  g_i ← m_i   (client momentum: signum-mv only)
    Δ_i = g_i − h_i + λ_up e_i ;  Δ̂_i = C_up(Δ_i)   (encoded and sent)
    e_i ← Δ_i − Δ̂_i          (error feedback only; λ_up = 1 for a biased C_up)
    h_i ← h_i + α_up Δ̂_i     (uplink memory only)

What the client does with the downlink (how its model and downlink memory H move) is the
family's `apply_downlink` (`strategies.artemis`, `strategies.mcm`, `strategies.signsgd`);
`client_round` wires the two together under the consistency protocol
(`strategies.consistency`): committed and pending states stamped with their round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from strategies.consistency import state_digest
from strategies.encoding import Wire, encode, get_compressor
from strategies.messages import Downlink, Uplink
from strategies.settings import AlgorithmSettings


@dataclass
class ClientState:
    """Client i's algorithm state, stamped with the round of the reply it belongs to."""

    stamp: int = 0
    version: int = 0
    model: torch.Tensor | None = None  # the model the client computes its update at
    down_memory: torch.Tensor | None = None  # H (MCM, Artemis with memory) or H_i (Rand-MCM)
    up_memory: torch.Tensor | None = None  # h_i
    up_residual: torch.Tensor | None = None  # e_i
    #: m_i, the client momentum of signum-mv (client-only state: not in the digest)
    momentum: torch.Tensor | None = None

    def copy(self) -> ClientState:
        def c(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.clone()

        return ClientState(
            self.stamp,
            self.version,
            c(self.model),
            c(self.down_memory),
            c(self.up_memory),
            c(self.up_residual),
            c(self.momentum),
        )


@dataclass
class ClientStep:
    """The result of one client round: the reply and the two states to keep."""

    uplink: Uplink
    committed: ClientState
    pending: ClientState | None


UpdateFn = Callable[[torch.Tensor], tuple[torch.Tensor, float, int]]
"""Given the model vector, return (g_i, mean local loss, examples seen)."""

ApplyDownlinkFn = Callable[["AlgorithmSettings", ClientState, Downlink, str], ClientState]


def initial_client_state(w0: torch.Tensor, settings: AlgorithmSettings) -> ClientState:
    """The state every client starts from (and falls back to on a resync).

    h_i = 0, e_i = 0, m_i = 0 (signum-mv's momentum); the downlink memory is H_0 = w_0 for
    MCM / Rand-MCM (a model-space memory, as in the MCM paper's initialisation: with H_0 = 0
    the first perturbed model ŵ = C(w) would carry variance ω‖w‖², far larger than the
    model itself) and H_0 = 0 for the Artemis family (a gradient-space memory).
    """
    zeros = torch.zeros_like(w0)
    down_memory: torch.Tensor | None = None
    if settings.model in ("preserved", "preserved-rand"):
        down_memory = w0.clone()
    elif settings.down_memory:
        down_memory = zeros.clone()
    return ClientState(
        stamp=0,
        version=0,
        model=w0.clone(),
        down_memory=down_memory,
        up_memory=zeros.clone() if settings.up_memory else None,
        up_residual=zeros.clone() if settings.up_ef else None,
        momentum=zeros.clone() if settings.preset.client_momentum else None,
    )


def client_uplink(
    settings: AlgorithmSettings,
    state: ClientState,
    g: torch.Tensor,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[Wire, ClientState]:
    """Δ_i = g_i − h_i + λ_up e_i; Δ̂_i = C_up(Δ_i); e_i ← Δ_i − Δ̂_i; h_i ← h_i + α_up Δ̂_i.

    (With `ef-scale=on`, Δ̂_i is the decoded C_up(Δ_i) times 1/(ω_up + 1), on both sides.)
    With a client momentum (signum-mv, Bernstein et al.), g_i is first replaced by
    m_i ← β m_i + (1 − β) g_i, so that Δ̂_i = sign(m_i).
    """
    new = state.copy()
    delta = g.to(torch.float32)
    if new.momentum is not None:
        new.momentum = settings.client_momentum * new.momentum + (
            1.0 - settings.client_momentum
        ) * delta.to(new.momentum.device)
        delta = new.momentum
    if new.up_memory is not None:
        delta = delta - new.up_memory
    if new.up_residual is not None:
        delta = delta + settings.up_ef_rate * new.up_residual
    wire, delta_hat = encode(get_compressor(settings.uplink), delta, seed, device)
    delta_hat = delta_hat * settings.up_scale
    if new.up_residual is not None:
        new.up_residual = delta - delta_hat
    if new.up_memory is not None:
        new.up_memory = new.up_memory + settings.up_memory_rate * delta_hat
    return wire, new


def client_round(
    settings: AlgorithmSettings,
    committed: ClientState,
    pending: ClientState | None,
    downlink: Downlink,
    w0: torch.Tensor,
    apply_downlink: ApplyDownlinkFn,
    compute_update: UpdateFn,
    device: str | torch.device = "cpu",
) -> ClientStep:
    """The client half of one round, for every algorithm.

    1. promote `pending` to committed if the server acknowledged its round, else drop it;
    2. on `reset`, zero the memories (the common state after a resync);
    3. check that the committed state is the one the server assumes (else reply "resync");
    4. apply the downlink (family-specific), compute g_i at the resulting model, encode the
       uplink, and return the new pending state stamped with this round.
    """
    if pending is not None and pending.stamp == downlink.ack_round:
        committed = pending
    if downlink.reset:
        committed = initial_client_state(w0, settings)
        committed.stamp = downlink.ack_round
        committed.version = -1
    elif committed.stamp != downlink.ack_round or (
        downlink.kind == "log" and committed.version != downlink.base_version
    ):
        detail = (
            f"client state (round {committed.stamp}, version {committed.version}) does not "
            f"match the server's (round {downlink.ack_round}, version {downlink.base_version})"
        )
        return ClientStep(
            Uplink(downlink.round, "resync", b"", 0, b"", math.nan, 0, detail),
            committed,
            None,
        )
    state = apply_downlink(settings, committed.copy(), downlink, str(device))
    state.version = downlink.target_version
    digest = state_digest(state.up_memory, state.down_memory, state.model)
    if state.model is None:
        raise RuntimeError(f"{settings.name}: the downlink left the client without a model")
    g, loss, n = compute_update(state.model)
    wire, after = client_uplink(settings, state, g, downlink.uplink_seed, device)
    after.stamp = downlink.round
    uplink = Uplink(downlink.round, "ok", wire.payload, wire.predicted_nbytes, digest, loss, n)
    return ClientStep(uplink, committed, after)
