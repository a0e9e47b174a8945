"""signSGD and Signum with majority vote (Bernstein et al.), both halves.

Client i ∈ S_k sends the sign of its update (1 bit per coordinate, `C_up` = sign); under
Signum (signum-mv) the sign of its momentum, kept in the client's state::

    signsgd-mv:  Δ̂_i = sign(g_i)
    signum-mv:   m_i ← β m_i + (1 − β) g_i ;  Δ̂_i = sign(m_i)     (β = client-momentum, 0.9)

The server takes the coordinate-wise majority vote and broadcasts it (1 bit per coordinate)::

    v = sign(Σ_{i∈S_k} sign(Δ̂_i))     (ties, Σ = 0, go to +1 so that v ∈ {−1, +1}^d)
    u = server_opt(v)                   (u = v with the default server-opt=sgd)
    w ← w − γ C_dwn(u)                  (C_dwn = sign: C_dwn(v) = v)

Every client applies the same v, so client models equal the central model. An idle client
replays the missed votes in order or receives a full-precision snapshot of w, whichever is
smaller. Both directions use the plain `sign` operator (1 bit per coordinate, no scale); the
vote v ∈ {−1, +1}^d crosses the wire exactly. The momentum m_i never leaves the client and
is not part of the state digest (the server holds no copy of it); like h_i it is committed
only when the server acknowledges the reply, and a resync resets it to 0.

References: Bernstein, Wang, Azizzadenesheli, Anandkumar, "signSGD: compressed optimisation
for non-convex problems" (ICML 2018, Signum: Algorithm 2); Bernstein, Zhao, Azizzadenesheli,
Anandkumar, "signSGD with majority vote is communication efficient and fault tolerant"
(ICLR 2019, Algorithm 1 with momentum).
"""

from __future__ import annotations

from pathlib import Path

import torch

from strategies.catchup import BroadcastLog, SnapshotCache, catch_up, encode_snapshot
from strategies.client_half import ClientState
from strategies.consistency import tensor_digest
from strategies.encoding import decode_wires, derive_seed, encode
from strategies.messages import Downlink
from strategies.server_half import ClientBook, DownlinkCommit, ServerHalf
from strategies.settings import AlgorithmSettings, Preset

PRESETS: dict[str, Preset] = {
    "signsgd-mv": Preset(
        "signsgd-mv", "signsgd", "sign-vote", True, False, False, True, False, False,
        "sign", "sign",
        "1-bit signs up, 1-bit majority vote down (signSGD-MV)",
    ),
    "signum-mv": Preset(
        "signum-mv", "signsgd", "sign-vote", True, False, False, True, False, False,
        "sign", "sign",
        "1-bit signs of a client momentum up, 1-bit majority vote down (Signum-MV)",
        client_momentum=True,
    ),
}  # fmt: skip


def add_vote(total: torch.Tensor, delta_hat: torch.Tensor) -> None:
    """Σ_i sign(Δ̂_i) += sign(Δ̂_i), one vote as it arrives (in place)."""
    total += torch.sign(delta_hat)


def majority_vote(total: torch.Tensor) -> torch.Tensor:
    """v = sign(Σ_i sign(Δ̂_i)) with ties to +1, from the votes' sum (`add_vote`)."""
    return torch.where(total >= 0, 1.0, -1.0)


def apply_downlink(
    settings: AlgorithmSettings, state: ClientState, message: Downlink, device: str
) -> ClientState:
    if message.kind == "snapshot":
        state.model = decode_wires(message.payloads, device, settings.dim)[0]
        return state
    if message.kind != "log":
        raise ValueError(f"{settings.name}: unexpected downlink kind {message.kind!r}")
    if state.model is None:
        raise ValueError(f"{settings.name}: client state lacks its model")
    for vote in decode_wires(message.payloads, device, settings.dim):
        state.model = state.model - settings.server_lr * vote
    return state


class MajorityVoteServer(ServerHalf):
    kinds = ("sign-vote",)

    def __init__(
        self,
        settings: AlgorithmSettings,
        w0: torch.Tensor,
        store_dir: str | Path | None = None,
        expected_clients: int = 0,
        max_uplink_bytes: int | None = None,
    ) -> None:
        super().__init__(settings, w0, store_dir, expected_clients, max_uplink_bytes)
        self.snapshot_nbytes = len(encode_snapshot([self.w])[0][0])
        self.log = BroadcastLog(self.snapshot_nbytes)
        self._snapshot_cache = SnapshotCache()

    def _snapshot_now(self) -> tuple[list[bytes], int]:
        return self._snapshot_cache.get(self.version, lambda: [self.w])

    def _downlink_payload(
        self, node: int, book: ClientBook, k: int
    ) -> tuple[Downlink, DownlinkCommit]:
        message = catch_up(self, book, k, self.log, self._snapshot_now, self.snapshot_nbytes)
        return message, DownlinkCommit()

    def _expected_digest_down(self, node: int, commit: DownlinkCommit) -> tuple[bytes, bytes]:
        return tensor_digest(None), tensor_digest(self.w)

    def _add_to_sum(self, node: int, delta_hat: torch.Tensor) -> None:
        """Count Δ̂_i's vote as it arrives (the server holds the O(d) sum, not the votes)."""
        if self._sum is None:
            self._sum = torch.zeros(self.dim)
        add_vote(self._sum, delta_hat)

    def aggregate(self, expected: float) -> torch.Tensor:
        """The vote replaces the averaging (pN plays no role in a majority vote)."""
        return majority_vote(self._sum if self._sum is not None else torch.zeros(self.dim))

    def _advance(self, g_hat: torch.Tensor, k: int) -> None:
        s = self.settings
        if self._sum is None:  # nobody voted: no step, nothing to broadcast
            return
        u = self.server_step(g_hat)  # u = server_opt(v)
        wire, vote = encode(self.down_compressor, u, derive_seed(s.seed, k, 0, 2))
        self.w = self.w - s.server_lr * vote
        self.version += 1
        self.log.append(self.version, wire)
