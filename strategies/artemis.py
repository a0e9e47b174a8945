"""Artemis and the algorithms that are settings of its equations: sgd, qsgd, diana, biqsgd,
artemis, dore, doublesqueeze, ef-sgd (both halves: server and client).

Uplink (client i ∈ S_k): see `strategies.client_half` (Δ_i = g_i − h_i + e_i, Δ̂_i = C_up(Δ_i));
aggregation: `strategies.aggregation` (ĝ by PP1 or PP2 dividing by pN).

Downlink, two model kinds:

With a server optimiser (`strategies.server_opt`, run-config key ``server-opt``) ĝ is first
turned into its step u = server_opt(ĝ) and u takes ĝ's place below, so that a broadcast
carries the optimiser's step and every client replaying it stays equal to the server
(u = ĝ for the default server-opt=sgd).

- "exact" (no downlink compression; sgd, qsgd, diana, ef-sgd)::

      w ← w − γ ĝ ;  the next participants receive w (full precision).

- "degraded" (compressed broadcast; biqsgd, artemis, doublesqueeze)::

      Ω = C_dwn(ĝ − H + λ_dwn e_s)
      e_s ← (ĝ − H + λ_dwn e_s) − Ω   (server error feedback: doublesqueeze)
      w ← w − γ (Ω + H)
      H ← H + α_dwn Ω                 (downlink memory: off in Artemis' experiments)

  DoubleSqueeze (Tang et al.) is this with H off and λ_dwn = 1 for its biased scaled sign:
  v = ĝ + δ, broadcast C(v), δ ← v − C(v), w ← w − γ C(v); its clients' uplink is
  v_i = g_i + λ_up δ_i, C(v_i), δ_i ← v_i − C(v_i) (`strategies.client_half.client_uplink`).

- "degraded" with a model residual (dore; Liu et al., arXiv 1910.07561, Algorithm 1),
  x̂ the model every side holds, e the server's residual (model space)::

      x_{k+1} = x̂_k − γ ĝ_k
      q_k = x_{k+1} − x̂_k + η e_k
      q̂_k = C_dwn(q_k)                (broadcast)
      e_{k+1} = q_k − q̂_k
      x̂_{k+1} = x̂_k + β q̂_k          (server and clients)

  Every client applies the same message, so client models equal the (degraded) central model.
  A client that missed rounds receives the missed messages in order, or a full-precision snapshot
  of (w, H), whichever is smaller (`strategies.catchup.catch_up`).
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

#: The presets' QSGD s = 1, on buckets of 64 coordinates: ω = min(d_B, √d_B) = 8 per bucket.
#: Buckets of 4096 would cost 0.12 bits/coordinate instead of ~0.9 (one float32 norm per
#: bucket, 0.5 bits/coordinate here, plus the sparser levels), but with ω = 64 the
#: memory rates α = 1/(2(ω+1)) ≈ 0.008 and the noise √ω‖x‖ on every compressed vector make
#: the downlink-compressed methods barely learn in the first tens of rounds (Fashion-MNIST
#: CNN, 5 rounds: artemis 0.18 vs sgd 0.56 accuracy at bucket 4096, 0.56 at bucket 64).
QSGD_S1 = "qsgd:s=1,bucket=64"
#: 1-bit scaled sign (‖x_B‖₁/d_B) sign(x) per bucket of 64 (1.5 bits/coordinate): the
#: compressor of EF-SGD and DoubleSqueeze. One scale for the whole model (`scaled_sign`)
#: is a poor contraction when layers' updates differ in size (Fashion-MNIST CNN, 5 rounds:
#: ef-sgd 0.32 accuracy with one scale, 0.51 per bucket of 64; doublesqueeze 0.20 vs 0.49).
SIGN_B64 = "scaled_sign:bucket=64"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "sgd", "artemis", "exact", False, False, False, False, False, False,
            "identity", "identity",
            "distributed SGD (FedAvg with local steps K > 1), no compression",
        ),
        Preset(
            "qsgd", "artemis", "exact", True, False, False, False, False, False,
            QSGD_S1, "identity",
            "compressed uplink without memory (FedPAQ with K > 1)",
        ),
        Preset(
            "diana", "artemis", "exact", True, True, False, False, False, False,
            QSGD_S1, "identity",
            "compressed uplink with memory h_i (DIANA)",
        ),
        Preset(
            "biqsgd", "artemis", "degraded", True, False, False, True, False, False,
            QSGD_S1, QSGD_S1,
            "compression both ways, no memory (Bi-QSGD)",
        ),
        Preset(
            "artemis", "artemis", "degraded", True, True, False, True, False, False,
            QSGD_S1, QSGD_S1,
            "compression both ways, uplink memory (Artemis)",
        ),
        Preset(
            "dore", "artemis", "degraded", True, True, False, True, False, True,
            QSGD_S1, QSGD_S1,
            "DIANA uplink, compressed model residual with error feedback (Dore)",
            model_residual=True,
        ),
        Preset(
            "doublesqueeze", "artemis", "degraded", True, False, True, True, False, True,
            SIGN_B64, SIGN_B64,
            "error feedback both ways (DoubleSqueeze)",
        ),
        Preset(
            "ef-sgd", "artemis", "exact", True, False, True, False, False, False,
            SIGN_B64, "identity",
            "biased uplink compression with error feedback (EF-SGD)",
        ),
    ]
}  # fmt: skip


# ----------------------------------------------------------------------------- both sides
def degraded_step(
    w: torch.Tensor,
    down_memory: torch.Tensor | None,
    omega: torch.Tensor,
    gamma: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w ← w − γ(Ω + H); H ← H + α_dwn Ω. The same code runs on server and clients."""
    if down_memory is None:
        return w - gamma * omega, None
    return w - gamma * (omega + down_memory), down_memory + alpha * omega


def shared_model_step(x_hat: torch.Tensor, q_hat: torch.Tensor, beta: float) -> torch.Tensor:
    """Dore: x̂ ← x̂ + β q̂. The same code runs on server and clients."""
    return x_hat + beta * q_hat


# ----------------------------------------------------------------------------- client half
def apply_downlink(
    settings: AlgorithmSettings, state: ClientState, message: Downlink, device: str
) -> ClientState:
    """Bring the client's model (and H) to the server's version."""
    if message.kind == "snapshot":
        tensors = decode_wires(message.payloads, device, settings.dim)
        state.model = tensors[0]
        if settings.down_memory:
            state.down_memory = tensors[1]
        return state
    if message.kind != "log":
        raise ValueError(f"{settings.name}: unexpected downlink kind {message.kind!r}")
    if state.model is None:
        raise ValueError(f"{settings.name}: client state lacks its model")
    for decoded in decode_wires(message.payloads, device, settings.dim):
        omega = decoded * settings.down_scale
        if settings.preset.model_residual:
            state.model = shared_model_step(state.model, omega, settings.model_step)
            continue
        state.model, state.down_memory = degraded_step(
            state.model, state.down_memory, omega, settings.server_lr, settings.down_memory_rate
        )
    return state


# ----------------------------------------------------------------------------- server half
class BroadcastServer(ServerHalf):
    """Server half of the exact and degraded kinds (one message for all participants)."""

    kinds = ("exact", "degraded")

    def __init__(
        self,
        settings: AlgorithmSettings,
        w0: torch.Tensor,
        store_dir: str | Path | None = None,
        expected_clients: int = 0,
        max_uplink_bytes: int | None = None,
    ) -> None:
        super().__init__(settings, w0, store_dir, expected_clients, max_uplink_bytes)
        self.H = torch.zeros(self.dim) if settings.down_memory else None
        self.e_server = torch.zeros(self.dim) if settings.down_ef else None
        n_snapshot = 2 if settings.down_memory else 1
        self.snapshot_nbytes = n_snapshot * len(encode_snapshot([self.w])[0][0])
        self.log = BroadcastLog(self.snapshot_nbytes if settings.model == "degraded" else 0)
        self._snapshot_cache = SnapshotCache()
        self._digest_cache: tuple[int, tuple[bytes, bytes]] | None = None

    def _snapshot_now(self) -> tuple[list[bytes], int]:
        """A snapshot of (w, H), or of w when there is no downlink memory."""
        return self._snapshot_cache.get(
            self.version, lambda: [self.w] if self.H is None else [self.w, self.H]
        )

    def _downlink_payload(
        self, node: int, book: ClientBook, k: int
    ) -> tuple[Downlink, DownlinkCommit]:
        message = catch_up(self, book, k, self.log, self._snapshot_now, self.snapshot_nbytes)
        return message, DownlinkCommit()

    def _expected_digest_down(self, node: int, commit: DownlinkCommit) -> tuple[bytes, bytes]:
        if self._digest_cache is None or self._digest_cache[0] != self.version:
            self._digest_cache = (self.version, (tensor_digest(self.H), tensor_digest(self.w)))
        return self._digest_cache[1]

    def _advance(self, g_hat: torch.Tensor, k: int) -> None:
        s = self.settings
        u = self.server_step(g_hat)  # u = server_opt(ĝ) (u = ĝ for server-opt=sgd)
        if s.model == "exact":
            self.w = self.w - s.server_lr * u
            self.version += 1
            return
        if s.preset.model_residual:
            self._advance_dore(u, k)
            return
        to_send = u if self.H is None else u - self.H
        if self.e_server is not None:
            to_send = to_send + s.down_ef_rate * self.e_server
        wire, decoded = encode(self.down_compressor, to_send, derive_seed(s.seed, k, 0, 2))
        omega = decoded if s.down_scale == 1.0 else decoded * s.down_scale  # ·1: the same bits
        if self.e_server is not None:
            self.e_server = to_send - omega
        self.w, self.H = degraded_step(self.w, self.H, omega, s.server_lr, s.down_memory_rate)
        self.version += 1
        self.log.append(self.version, wire)

    def _advance_dore(self, u: torch.Tensor, k: int) -> None:
        """Dore's master step (Algorithm 1 of Liu et al.); self.w is x̂, self.e_server is e,
        u the server optimiser's step (ĝ_k itself with server-opt=sgd)."""
        s = self.settings
        x_next = self.w - s.server_lr * u  # x_{k+1} = x̂_k − γ ĝ_k
        q = x_next - self.w  # the model residual
        if self.e_server is not None:
            q = q + s.down_ef_rate * self.e_server  # q_k = x_{k+1} − x̂_k + η e_k
        wire, decoded = encode(self.down_compressor, q, derive_seed(s.seed, k, 0, 2))
        q_hat = decoded if s.down_scale == 1.0 else decoded * s.down_scale  # q̂_k = C_dwn(q_k)
        if self.e_server is not None:
            self.e_server = q - q_hat  # e_{k+1} = q_k − q̂_k
        self.w = shared_model_step(self.w, q_hat, s.model_step)  # x̂_{k+1} = x̂_k + β q̂_k
        self.version += 1
        self.log.append(self.version, wire)
