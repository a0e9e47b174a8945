"""MCM and Rand-MCM: bidirectional compression with a preserved central model (both halves).

Uplink and aggregation as in `strategies.client_half` and `strategies.aggregation` (uplink
memory h_i, ĝ by PP1/PP2 over pN).
The server keeps the exact model::

    w ← w − γ ĝ                      (never degraded by downlink compression; with a server
                                     optimiser w ← w − γ u, u = server_opt(ĝ))

MCM (one downlink memory H shared by all clients)::

    Ω = C_dwn(w − H);  ŵ = H + Ω;  H ← H + α_dwn Ω

Each client sets its local model ŵ = H + Ω and updates H the same way; it computes its next
update at the perturbed model ŵ. The server evaluates w. A client that missed rounds replays
the missed Ω in order (each: ŵ = H + Ω, H ← H + α_dwn Ω) or receives a full-precision
snapshot of (ŵ, H), whichever is smaller.

Rand-MCM (for partial participation: one memory H_i per client, compressed independently)::

    Ω_i = C_dwn(w − H_i);  ŵ_i = H_i + Ω_i;  H_i ← H_i + α_dwn Ω_i

H_i moves only when client i receives a message, so an idle client needs no catch-up.

Initialisation (MCM paper, Algorithm 1): H_0 = H_0^i = w_0, ŵ_0 = w_0, h_i = 0. H is a
model-space memory; starting it at 0 instead makes the first perturbed models
ŵ = C(w) with E‖ŵ − w‖² = ω‖w‖² (ω = 64 for QSGD s = 1 on buckets of 4096: ‖ŵ − w‖ ≈ 7‖w‖),
and with α_dwn = 1/(2(ω+1)) H needs hundreds of rounds to reach w: a CNN trained at such
models diverges. A resync resets H (H_i) to w_0 on both sides. The
server keeps the H_i in a `TensorStore` (RAM, or a memory-mapped file with an LRU cache when
N·d does not fit), updating H_i only once client i's reply is accepted (from the bytes of
Ω_i kept with the pending reply, so pending replies cost no d-vectors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from strategies.artemis import QSGD_S1
from strategies.catchup import BroadcastLog, SnapshotCache, catch_up, encode_snapshot
from strategies.client_half import ClientState
from strategies.consistency import tensor_digest
from strategies.encoding import decode_wires, derive_seed, encode
from strategies.memory_store import TensorStore
from strategies.messages import Downlink
from strategies.server_half import ClientBook, DownlinkCommit, ServerHalf
from strategies.settings import AlgorithmSettings, Preset

#: MCM's downlink: QSGD s = 4 on buckets of 64, ω = min(64/4², 8/4) = 2 (the uplink keeps
#: s = 1, ω = 8). MCM's clients compute their update at ŵ = H + C(w − H), whose error
#: √ω‖w − H‖ is model noise that no memory removes. Measured with benchmarks.convergence's
#: workload (Fashion-MNIST CNN, 20 clients, Dirichlet 0.5, K = 10, seed 0), accuracy after
#: 10 rounds at p = 1, FedAvg 0.66: s = 1 (ω = 8) 0.59 and oscillating by ±0.05 from round
#: to round; α_dwn = 0.11 or 0.25 instead of 1/(2(ω+1)) = 0.056 did not help (0.53, 0.60);
#: s = 2 (ω = 4) 0.60; s = 4 (ω = 2, α_dwn = 1/6) 0.66. At p = 0.5: s = 1 0.49, s = 4 0.66.
#: s = 4 costs 1.5× the downlink bytes of s = 1 (the whole run: about 1/20 of FedAvg's
#: bytes per round at p = 1). One setting for every seed and p, chosen on seed 0.
MCM_DOWNLINK = "qsgd:s=4,bucket=64"
#: Rand-MCM's downlink: QSGD s = 2 on buckets of 64, ω = min(64/2², 8/2) = 4. Each client's
#: Ω_i is compressed independently, so the model noise of the K updates averages out over
#: the clients of a round (the point of Rand-MCM) and a larger ω than MCM's is tolerable.
#: Same workload, p = 1, accuracy at rounds 10 / 12: s = 1 0.61 / -, s = 2 0.65 / 0.68,
#: s = 4 0.64 / 0.68 for 1.2× the bytes of s = 2 (FedAvg at round 10: 0.66).
RAND_MCM_DOWNLINK = "qsgd:s=2,bucket=64"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "mcm", "mcm", "preserved", True, True, False, True, True, False,
            QSGD_S1, MCM_DOWNLINK,
            "preserved central model, one downlink memory H (MCM)",
        ),
        Preset(
            "rand-mcm", "mcm", "preserved-rand", True, True, False, True, True, False,
            QSGD_S1, RAND_MCM_DOWNLINK,
            "preserved central model, one downlink memory H_i per client (Rand-MCM)",
        ),
    ]
}  # fmt: skip


def perturbed_step(
    down_memory: torch.Tensor,
    omega: torch.Tensor,
    alpha: float,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ŵ = H + Ω; H ← H + α_dwn Ω (same code on both sides), written into `out`'s two
    d-vectors when given (the server's kept scratch), else into new ones. H + α_dwn Ω is
    computed as (α_dwn Ω) + H: one rounding per operation, the same bits in either order."""
    model_out, memory_out = out if out is not None else (None, None)
    return (
        torch.add(down_memory, omega, out=model_out),
        torch.mul(omega, alpha, out=memory_out).add_(down_memory),
    )


# ----------------------------------------------------------------------------- client half
def apply_downlink(
    settings: AlgorithmSettings, state: ClientState, message: Downlink, device: str
) -> ClientState:
    if state.down_memory is None:
        raise ValueError(f"{settings.name}: client state lacks its downlink memory")
    if message.kind == "snapshot":
        state.model, state.down_memory = decode_wires(message.payloads, device, settings.dim)
        return state
    if message.kind not in ("log", "fresh"):
        raise ValueError(f"{settings.name}: unexpected downlink kind {message.kind!r}")
    for omega in decode_wires(message.payloads, device, settings.dim):
        state.model, state.down_memory = perturbed_step(
            state.down_memory, omega, settings.down_memory_rate
        )
    return state


# ----------------------------------------------------------------------------- server half
class PreservedServer(ServerHalf):
    """Server half of MCM (kind "preserved") and Rand-MCM (kind "preserved-rand")."""

    kinds = ("preserved", "preserved-rand")
    #: Rand-MCM's two scratch d-vectors of `_downlink_payload` (no state between calls)
    checkpoint_exclude = ("_down_scratch",)

    def __init__(
        self,
        settings: AlgorithmSettings,
        w0: torch.Tensor,
        store_dir: str | Path | None = None,
        expected_clients: int = 0,
        max_uplink_bytes: int | None = None,
    ) -> None:
        super().__init__(settings, w0, store_dir, expected_clients, max_uplink_bytes)
        self.w0 = self.w.clone()
        self.H = self.w0.clone()  # H_0 = w_0 (a model-space memory; see the module docstring)
        self.w_hat = self.w.clone()  # the perturbed model clients at the current version hold
        self.snapshot_nbytes = 2 * len(encode_snapshot([self.w])[0][0])
        self.log = BroadcastLog(self.snapshot_nbytes)
        self.H_store = (
            TensorStore(
                self.dim,
                directory=(Path(store_dir) / "downlink") if store_dir else None,
                expected_clients=expected_clients,
                initial=self.w0,
            )
            if settings.model == "preserved-rand"
            else None
        )
        self._snapshot_cache = SnapshotCache()
        self._digest_cache: tuple[int, tuple[bytes, bytes]] | None = None
        self._down_scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def _snapshot_now(self) -> tuple[list[bytes], int]:
        """A snapshot of (ŵ, H), what MCM's clients at the current version hold."""
        return self._snapshot_cache.get(self.version, lambda: [self.w_hat, self.H])

    def _downlink_payload(
        self, node: int, book: ClientBook, k: int
    ) -> tuple[Downlink, DownlinkCommit]:
        if self.H_store is None:
            message = catch_up(self, book, k, self.log, self._snapshot_now, self.snapshot_nbytes)
            return message, DownlinkCommit()
        s = self.settings
        # H_i read in place; Ω_i, ŵ_i and H_i + α_dwn Ω_i live only for this call: the pending
        # reply keeps Ω_i's bytes and the two digests, so the server's RAM per round stays O(d)
        # however many replies are pending (was two d-vectors per sampled client)
        H_i = self.H_store.view(node)
        seed = derive_seed(s.seed, k, self.seed_key(node), 2)
        if self._down_scratch is None:  # two d-vectors kept: fresh ones cost page faults
            self._down_scratch = (torch.empty(self.dim), torch.empty(self.dim))
        to_send = torch.sub(self.w, H_i, out=self._down_scratch[0])
        wire, omega = encode(self.down_compressor, to_send, seed)
        w_hat_i, H_next = perturbed_step(H_i, omega, s.down_memory_rate, self._down_scratch)
        digests = (tensor_digest(H_next), tensor_digest(w_hat_i))
        message = Downlink(
            k, "fresh", book.version, self.version, 0, False, 0, [wire.payload],
            wire.predicted_nbytes,
        )  # fmt: skip
        return message, DownlinkCommit(payload=wire.payload, digests=digests)

    def _expected_digest_down(self, node: int, commit: DownlinkCommit) -> tuple[bytes, bytes]:
        if self.H_store is None:
            if self._digest_cache is None or self._digest_cache[0] != self.version:
                digests = (tensor_digest(self.H), tensor_digest(self.w_hat))
                self._digest_cache = (self.version, digests)
            return self._digest_cache[1]
        if commit.digests is None:
            raise RuntimeError("Rand-MCM: a pending reply without its downlink digests")
        return commit.digests

    def _commit_client(self, node: int, commit: DownlinkCommit) -> None:
        """H_i ← H_i + α_dwn Ω_i, Ω_i decoded again from the bytes sent: bit for bit the
        H_next of `_downlink_payload` (the same float32 product and sum), since H_i changes
        only here and in `_reset_client`, both of which void any other pending reply."""
        if self.H_store is None or commit.payload is None:
            return
        (omega,) = decode_wires([commit.payload], "cpu", self.dim)
        omega.mul_(self.settings.down_memory_rate)
        self.H_store.modify(node).add_(omega)
        if commit.digests is not None:
            self.H_store.set_digest(node, commit.digests[0])

    def _reset_client(self, node: int) -> None:
        if self.H_store is not None:
            self.H_store.set(node, self.w0.clone())

    def client_down_memory(self, node: int) -> torch.Tensor:
        """H_i (Rand-MCM) or H (MCM) as the server holds it, for tests and diagnostics."""
        return self.H.clone() if self.H_store is None else self.H_store.get(node)

    def _advance(self, g_hat: torch.Tensor, k: int) -> None:
        s = self.settings
        self.w = self.w - s.server_lr * self.server_step(g_hat)  # w ← w − γ server_opt(ĝ)
        self.version += 1
        if self.H_store is not None:
            self.H_store.flush()
            return
        wire, omega = encode(self.down_compressor, self.w - self.H, derive_seed(s.seed, k, 0, 2))
        self.w_hat, self.H = perturbed_step(self.H, omega, s.down_memory_rate)
        self.log.append(self.version, wire)

    def close(self) -> None:
        super().close()
        if self.H_store is not None:
            self.H_store.close()
