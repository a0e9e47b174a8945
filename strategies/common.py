"""The machinery every algorithm shares: settings, the client's uplink, the server's uplink
aggregation (PP1 / PP2), catch-up of idle clients, and the round-stamped two-phase commit that
keeps client and server memories in step.

Notation (ALGORITHMS.md): N clients, round k, sampled set S_k, participation probability p,
central model w, server step size γ, uplink compressor C_up (variance ω_up), downlink
compressor C_dwn, memory rates α_up, α_dwn.

Uplink of client i ∈ S_k, given its update g_i (a gradient, or (w_start − w_end)/η after K
local steps)::

    Δ_i = g_i − h_i + λ_up e_i ;  Δ̂_i = C_up(Δ_i) (encoded and sent)
    e_i ← Δ_i − Δ̂_i        (error feedback only; λ_up = 1 for a biased C_up)
    h_i ← h_i + α_up Δ̂_i   (uplink memory only)

Server aggregation, dividing by the expected number of participants pN::

    PP1:  ĝ = (1/(pN)) Σ_{i∈S_k} (Δ̂_i + h_i),  then h_i ← h_i + α_up Δ̂_i  (one h_i per client)
    PP2:  ĝ = (1/(pN)) Σ_{i∈S_k} Δ̂_i + h,      then h ← h + α_up (1/(pN)) Σ_{i∈S_k} Δ̂_i

What happens on the downlink (how w moves, what clients receive) is the family's business:
`strategies.artemis` (uncompressed or compressed broadcast, degraded model),
`strategies.mcm` (preserved central model) and `strategies.signsgd` (majority vote).

Consistency protocol. Every downlink message carries the round stamp of the client's last
reply the server accepted (``ack_round``) and the model version the server believes the client
holds (``base_version``). The client keeps two states: *committed* (as of its last accepted
reply) and *pending* (after its latest round). On the next message it promotes pending to
committed if the server acknowledged that round, and otherwise throws pending away, so that a
lost reply (crash, timeout, dropped or invalid payload) rolls both sides back to the last
state they share. The client reports an exact digest (a hash of the bytes) of the memories
and model it holds; the server compares it with its own view, and on a mismatch, or when a
client says its state does not match (e.g. it lost its state), both sides reset that
client's memories to their initial values (h_i = e_i = 0; MCM's H and Rand-MCM's H_i = w_0)
and the server sends a full-precision snapshot. Every such event is logged and counted.

Memory invariant. The server keeps every client's h_i (PP1 and PP2 alike, in a
`TensorStore`) and counts a set C of clients, N = |C| (`ServerHalf.set_members`: the clients
it samples from; pN the expected number of participants). PP2's update adds
α (1/(pN)) Σ_{i∈S_k} Δ̂_i to h while the h_i add up to α Σ_{i∈S_k} Δ̂_i, and all start at 0,
so at every round::

    h = (1/(pN)) Σ_{i∈C} h_i            (h = (1/N) Σ_{i∈C} h_i at p = 1)

When a client's h_i or C changes outside that update, the server restores the invariant
from the h_i it keeps (with Σ = pN·h before the change)::

    reset of client j (h_j ← 0):        h ← h − h_j / (pN)
    client j leaves C (N ← N − 1):      h ← (pN·h − h_j) / (pN)'   (h ← 0 when C is empty)
    client j joins C (N ← N + 1):       h ← (pN·h + h_j) / (pN)'   (h_j = 0 if new)

where (pN)' is the expected number of participants after the change. A run then goes on
exactly as a fault-free PP2 run of the clients in C with those memories, whose fixed point
(h_i = ∇f_i(w*), h = 0) is unbiased. PP1 needs no correction: its ĝ sums Δ̂_i + h_i, unbiased
whatever the h_i.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import tempfile
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

# a child of Flower's logger, so that our lines appear in `flwr run` log streams
log = logging.getLogger("flwr.fedsqueeze.strategies")

ModelKind = Literal["exact", "degraded", "preserved", "preserved-rand", "sign-vote"]
MODEL_KINDS: tuple[str, ...] = ("exact", "degraded", "preserved", "preserved-rand", "sign-vote")


# ----------------------------------------------------------------------------- compressors
class Encoded(Protocol):
    """What `compression` returns from `compress` / `decode` (see compression's docs)."""

    @property
    def nbytes(self) -> int: ...

    @property
    def predicted_nbytes(self) -> int: ...

    def dense(self) -> torch.Tensor: ...

    def to_bytes(self) -> bytes: ...


class Compressor(Protocol):
    unbiased: bool

    def omega(self, d: int) -> float: ...

    def delta(self, d: int) -> float: ...

    def compress(self, x: torch.Tensor, seed: int) -> Encoded: ...


@functools.lru_cache(maxsize=64)
def get_compressor(spec: str) -> Compressor:
    """`compression.parse_compressor(spec)`, with a clear error naming the spec."""
    from compression import parse_compressor

    try:
        return parse_compressor(spec)
    except Exception as exc:
        raise ValueError(f"bad compressor spec {spec!r}: {exc}") from exc


def decode_payload(
    payload: bytes, device: str | torch.device = "cpu", expected_numel: int | None = None
) -> Encoded:
    """`compression.decode`; a payload declaring other than `expected_numel` coordinates
    (the model size d) is refused with CodecError before anything of its size exists."""
    from compression import decode

    return decode(payload, device=str(device), expected_numel=expected_numel)


def codec_error_types() -> tuple[type[BaseException], ...]:
    from compression import CodecError

    return (CodecError, ValueError)


@dataclass(frozen=True)
class Wire:
    """One encoded vector as it travels: the bytes and the codec's predicted size."""

    payload: bytes
    predicted_nbytes: int

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def encode(
    compressor: Compressor, x: torch.Tensor, seed: int, device: str | torch.device = "cpu"
) -> tuple[Wire, torch.Tensor]:
    """Compress x and return (wire, x̂) where x̂ is what the *receiver* decodes from the wire.

    The sender uses exactly the receiver's x̂, which keeps both ends bit-identical.
    """
    message = compressor.compress(x.detach().to(torch.float32).contiguous(), seed=seed)
    payload = message.to_bytes()
    # compression guarantees decode(m.to_bytes()).dense() == m.dense() bit for bit
    decoded = message.dense().reshape(-1).to(torch.float32)
    return Wire(payload, int(message.predicted_nbytes)), decoded


def default_memory_rate(compressor: Compressor, d: int) -> float:
    """α = 1 / (2(ω + 1)) for an unbiased compressor; δ / 2 for a biased one."""
    if compressor.unbiased:
        return 1.0 / (2.0 * (float(compressor.omega(d)) + 1.0))
    return float(compressor.delta(d)) / 2.0


def derive_seed(*parts: int) -> int:
    """A reproducible 31-bit seed from integers (run seed, round, node, direction)."""
    seq = np.random.SeedSequence([abs(int(p)) % (2**63) for p in parts])
    return int(seq.generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Preset:
    """A named algorithm as a setting of the generic equations (ALGORITHMS.md table)."""

    name: str
    family: str  # module under strategies/ holding both halves
    model: ModelKind
    up_compress: bool
    up_memory: bool
    up_ef: bool
    down_compress: bool
    down_memory: bool
    down_ef: bool
    default_uplink: str
    default_downlink: str
    summary: str
    #: Dore: the broadcast carries the compressed *model* residual q̂ and both sides step
    #: x̂ ← x̂ + β q̂ (`strategies.artemis`), instead of a gradient-space Ω
    model_residual: bool = False


@dataclass(frozen=True)
class AlgorithmSettings:
    """A preset with every knob resolved (compressor specs, rates, flags, participation)."""

    preset: Preset
    uplink: str
    downlink: str
    up_memory_rate: float  # α_up, 0 = no uplink memory
    down_memory_rate: float  # α_dwn, 0 = no downlink memory
    up_ef: bool
    down_ef: bool
    server_lr: float  # γ
    participation: float  # p
    participation_mode: Literal["bernoulli", "fraction"]
    pp_variant: Literal["pp1", "pp2"]
    seed: int
    dim: int
    #: 1/(ω+1) with `ef-scale=on` when error feedback meets an unbiased compressor, else 1
    up_scale: float = 1.0
    down_scale: float = 1.0
    #: λ_up, λ_dwn: the coefficient in front of the residual, Δ_i = g_i − h_i + λ_up e_i and
    #: Ω = C_dwn(ĝ − H + λ_dwn e_s); for dore λ_dwn is η in q = x_{k+1} − x̂_k + η e
    up_ef_rate: float = 1.0
    down_ef_rate: float = 1.0
    #: β, Dore's shared-model step x̂ ← x̂ + β q̂ (1 for every other preset)
    model_step: float = 1.0

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def model(self) -> ModelKind:
        return self.preset.model

    @property
    def up_memory(self) -> bool:
        return self.up_memory_rate > 0

    @property
    def down_memory(self) -> bool:
        return self.down_memory_rate > 0


def parse_flag(value: Any, key: str) -> bool | None:
    """'' → None (preset default); on/off/true/false/1/0 → bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "auto", "-1"):
        return None
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{key}: expected '', 'on' or 'off', got {value!r}")


def resolve_settings(
    preset: Preset,
    dim: int,
    *,
    uplink: str = "",
    downlink: str = "",
    up_memory_rate: float = -1.0,
    down_memory_rate: float = -1.0,
    up_ef: bool | None = None,
    down_ef: bool | None = None,
    server_lr: float = 0.1,
    participation: float = 1.0,
    participation_mode: str = "bernoulli",
    pp_variant: str = "pp2",
    seed: int = 0,
    up_ef_rate: float = -1.0,
    down_ef_rate: float = -1.0,
    model_step: float = 1.0,
    ef_scaled: bool = False,
) -> AlgorithmSettings:
    """Fill the preset's defaults and check every value; raise ValueError naming the key.

    Error feedback (EF) rates λ_up, λ_dwn (-1 = automatic, `ef_damping`): 1 for a biased
    compressor, min(1, 1/ω) for an unbiased one. `ef_scaled=True` is the other option: scale
    an unbiased compressor's decoded output by 1/(ω + 1) on both sides (`ef_scale`), which
    makes it a contraction, and keep λ = 1.
    """
    if dim < 1:
        raise ValueError(f"model dimension must be >= 1, got {dim}")
    up_spec = uplink.strip() or preset.default_uplink
    down_spec = downlink.strip() or preset.default_downlink
    if not preset.down_compress and down_spec != "identity":
        raise ValueError(
            f"downlink: {preset.name} sends the model uncompressed; got downlink={down_spec!r}"
        )
    up_c = get_compressor(up_spec)
    down_c = get_compressor(down_spec)
    if up_memory_rate < 0:
        up_rate = default_memory_rate(up_c, dim) if preset.up_memory else 0.0
    else:
        up_rate = float(up_memory_rate)
    if down_memory_rate < 0:
        down_rate = default_memory_rate(down_c, dim) if preset.down_memory else 0.0
    else:
        down_rate = float(down_memory_rate)
    if not 0 <= up_rate <= 1 or not 0 <= down_rate <= 1:
        raise ValueError("up-memory-rate and down-memory-rate must be in [0, 1] (or -1 = auto)")
    if preset.model in ("exact", "sign-vote") and down_rate > 0:
        raise ValueError(f"down-memory-rate: {preset.name} has no downlink memory")
    if preset.model in ("preserved", "preserved-rand") and down_rate == 0:
        raise ValueError(f"down-memory-rate: {preset.name} needs a downlink memory rate > 0")
    up_ef_v = preset.up_ef if up_ef is None else up_ef
    down_ef_v = preset.down_ef if down_ef is None else down_ef
    if down_ef_v and preset.model != "degraded":
        raise ValueError(f"down-ef: {preset.name} has no compressed broadcast to feed back")
    if preset.model == "sign-vote" and (up_rate > 0 or up_ef_v):
        raise ValueError("signsgd-mv takes neither uplink memory nor error feedback")
    if not math.isfinite(server_lr) or server_lr <= 0:
        raise ValueError(f"server-lr must be > 0, got {server_lr}")
    if not 0 < participation <= 1:
        raise ValueError(f"participation must be in (0, 1], got {participation}")
    if participation_mode not in ("bernoulli", "fraction"):
        raise ValueError(
            f"participation-mode must be 'bernoulli' or 'fraction', got {participation_mode!r}"
        )
    if pp_variant not in ("pp1", "pp2"):
        raise ValueError(f"pp-variant must be 'pp1' or 'pp2', got {pp_variant!r}")
    if preset.model_residual and down_rate > 0:
        raise ValueError(f"down-memory-rate: {preset.name} has no downlink memory")
    if not math.isfinite(model_step) or not 0 < model_step <= 1:
        raise ValueError(f"model-step must be in (0, 1], got {model_step}")
    if model_step != 1 and not preset.model_residual:
        raise ValueError(f"model-step: only dore has a shared-model step β, not {preset.name}")
    up_scale = ef_scale(up_c, dim) if up_ef_v and ef_scaled else 1.0
    down_scale = ef_scale(down_c, dim) if down_ef_v and ef_scaled else 1.0
    rates = []
    for key, value, comp, scale in (
        ("up-ef-rate", up_ef_rate, up_c, up_scale),
        ("down-ef-rate", down_ef_rate, down_c, down_scale),
    ):
        if value < 0:
            value = 1.0 if scale < 1 else ef_damping(comp, dim)
        if not math.isfinite(value) or value > 1:
            raise ValueError(f"{key} must be in [0, 1] (or -1 = auto), got {value}")
        rates.append(float(value))
    return AlgorithmSettings(
        preset=preset,
        uplink=up_spec,
        downlink=down_spec,
        up_memory_rate=up_rate,
        down_memory_rate=down_rate,
        up_ef=up_ef_v,
        down_ef=down_ef_v,
        server_lr=float(server_lr),
        participation=float(participation),
        participation_mode=participation_mode,  # type: ignore[arg-type]
        pp_variant=pp_variant,  # type: ignore[arg-type]
        seed=int(seed),
        dim=int(dim),
        up_scale=up_scale,
        down_scale=down_scale,
        up_ef_rate=rates[0],
        down_ef_rate=rates[1],
        model_step=float(model_step),
    )


def ef_scale(compressor: Compressor, d: int) -> float:
    """The `ef-scale=on` option. Error feedback needs a contraction (‖C(x) − x‖² ≤ (1 − δ)‖x‖²).
    An unbiased C with variance ω is not one when ω ≥ 1, but C/(ω + 1) is, with δ = 1/(ω + 1)
    (Stich & Karimireddy): both sides scale the decoded message by 1/(ω + 1). It keeps EF
    stable but moves the model by a (ω + 1)-th of each update (dore: 0.20-0.27 Fashion-MNIST
    accuracy after 5 rounds against 0.54-0.57 for artemis), hence not the default."""
    return 1.0 / (float(compressor.omega(d)) + 1.0) if compressor.unbiased else 1.0


def ef_damping(compressor: Compressor, d: int) -> float:
    """The automatic EF rate λ in v = x + λ e, e ← v − C(v): 1 for a biased C (EF-SGD,
    DoubleSqueeze), min(1, 1/ω) for an unbiased C with variance ω.

    With an unbiased C, E‖e_{k+1}‖² = ω E‖v_k‖², so the residual grows without bound unless
    λ²ω < 1; the sum of what was sent, Σ C(v_k) = Σ x_k − (1 − λ) Σ e_k − e_K, carries a
    stationary noise of about (1 − λ)² ω/(1 − λ² ω) ‖x‖² per round, smallest at λ = 1/ω.
    A coefficient in front of e damps the residual, as in the Artemis authors' EF baselines
    (theirs is the step size), instead of shrinking every message (`ef_scale`).
    """
    if not compressor.unbiased:
        return 1.0
    omega = float(compressor.omega(d))
    return 1.0 if omega <= 1 else 1.0 / omega


# ----------------------------------------------------------------------------- messages
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


# ----------------------------------------------------------------------------- client half
@dataclass
class ClientState:
    """Client i's algorithm state, stamped with the round of the reply it belongs to."""

    stamp: int = 0
    version: int = 0
    model: torch.Tensor | None = None  # the model the client computes its update at
    down_memory: torch.Tensor | None = None  # H (MCM, Artemis with memory) or H_i (Rand-MCM)
    up_memory: torch.Tensor | None = None  # h_i
    up_residual: torch.Tensor | None = None  # e_i

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

    h_i = 0, e_i = 0; the downlink memory is H_0 = w_0 for MCM / Rand-MCM (a model-space
    memory, as in the MCM paper's initialisation: with H_0 = 0 the first perturbed model
    ŵ = C(w) would carry variance ω‖w‖², far larger than the model itself) and H_0 = 0 for
    the Artemis family (a gradient-space memory).
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
    """
    new = state.copy()
    delta = g.to(torch.float32)
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
    assert state.model is not None
    g, loss, n = compute_update(state.model)
    wire, after = client_uplink(settings, state, g, downlink.uplink_seed, device)
    after.stamp = downlink.round
    uplink = Uplink(downlink.round, "ok", wire.payload, wire.predicted_nbytes, digest, loss, n)
    return ClientStep(uplink, committed, after)


def decode_wires(
    payloads: Sequence[bytes], device: str, expected_numel: int | None = None
) -> list[torch.Tensor]:
    return [
        decode_payload(p, device, expected_numel).dense().reshape(-1).to(torch.float32)
        for p in payloads
    ]


# ----------------------------------------------------------------------------- server store
class TensorStore:
    """One d-vector per client (uplink memories h_i in PP1, downlink memories H_i in Rand-MCM).

    Kept in RAM while N·d·4 bytes stay under `ram_budget_bytes`; beyond that the vectors live
    in a memory-mapped float32 file (one row per client, grown on demand) with an LRU cache of
    `cache_rows` rows in RAM, so the server's resident memory stays O(cache·d), not O(N·d).
    Missing clients read as `initial` (zeros when not given; Rand-MCM's H_i start at w_0).
    """

    def __init__(
        self,
        dim: int,
        ram_budget_bytes: int = 512 * 2**20,
        cache_rows: int = 64,
        directory: str | Path | None = None,
        expected_clients: int = 0,
        initial: torch.Tensor | None = None,
    ) -> None:
        self.dim = dim
        self.initial = (
            torch.zeros(dim)
            if initial is None
            else initial.detach().to("cpu", torch.float32).reshape(-1).clone()
        )
        if self.initial.numel() != dim:
            raise ValueError(f"initial vector has {self.initial.numel()} values, expected {dim}")
        self.cache_rows = cache_rows
        self._ram: dict[int, torch.Tensor] | None = {}
        self._rows: dict[int, int] = {}
        self._mmap: np.memmap | None = None
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._dirty: set[int] = set()
        self._budget = ram_budget_bytes
        self._dir = Path(directory) if directory else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if expected_clients * dim * 4 > ram_budget_bytes:
            self._to_disk(max(expected_clients, 1))

    @property
    def on_disk(self) -> bool:
        return self._mmap is not None

    def __len__(self) -> int:
        return len(self._ram) if self._ram is not None else len(self._rows)

    def __contains__(self, key: int) -> bool:
        return key in (self._ram if self._ram is not None else self._rows)

    def _path(self) -> Path:
        if self._dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedsqueeze-store-")
            self._dir = Path(self._tmp.name)
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir / "memories.f32"

    def _to_disk(self, capacity: int) -> None:
        path = self._path()
        self._mmap = np.memmap(path, dtype=np.float32, mode="w+", shape=(capacity, self.dim))
        log.info("client memories moved to disk: %s (%d rows x %d)", path, capacity, self.dim)
        ram, self._ram = self._ram or {}, None
        for key, value in ram.items():
            self.set(key, value)

    def _grow(self) -> None:
        assert self._mmap is not None
        old = self._mmap
        old.flush()
        capacity = old.shape[0] * 2
        path = Path(old.filename)  # type: ignore[arg-type]
        del old
        self._mmap = None
        with path.open("r+b") as fh:
            fh.truncate(capacity * self.dim * 4)
        self._mmap = np.memmap(path, dtype=np.float32, mode="r+", shape=(capacity, self.dim))

    def get(self, key: int) -> torch.Tensor:
        if self._ram is not None:
            value = self._ram.get(key)
            return self.initial.clone() if value is None else value.clone()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key].clone()
        row = self._rows.get(key)
        if row is None:
            return self.initial.clone()
        assert self._mmap is not None
        value = torch.from_numpy(np.array(self._mmap[row]))
        self._remember(key, value)
        return value.clone()

    def set(self, key: int, value: torch.Tensor) -> None:
        value = value.detach().to("cpu", torch.float32).reshape(-1).clone()
        if self._ram is not None:
            self._ram[key] = value
            if len(self._ram) * self.dim * 4 > self._budget:
                self._to_disk(len(self._ram) * 2)
            return
        if key not in self._rows:
            assert self._mmap is not None
            if len(self._rows) >= self._mmap.shape[0]:
                self._grow()
            self._rows[key] = len(self._rows)
        self._remember(key, value)
        self._dirty.add(key)

    def _remember(self, key: int, value: torch.Tensor) -> None:
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_rows:
            old_key, old_value = self._cache.popitem(last=False)
            if old_key in self._dirty:
                self._write(old_key, old_value)

    def _write(self, key: int, value: torch.Tensor) -> None:
        assert self._mmap is not None
        self._mmap[self._rows[key]] = value.numpy()
        self._dirty.discard(key)

    def export(self) -> tuple[list[int], torch.Tensor]:
        """(keys, rows): every stored vector, row j belonging to keys[j] (for checkpoints).
        On disk the rows are a view of the flushed memory map, not a copy in RAM."""
        if self._ram is not None:
            keys = list(self._ram)
            rows = [self._ram[k] for k in keys]
            return keys, torch.stack(rows) if rows else torch.zeros(0, self.dim)
        self.flush()
        assert self._mmap is not None
        keys = sorted(self._rows, key=self._rows.__getitem__)  # rows are 0..n-1 in this order
        return keys, torch.from_numpy(self._mmap[: len(keys)])

    def load(self, keys: Sequence[int], rows: torch.Tensor) -> None:
        """Replace the contents with `export`'s (keys, rows) (restoring a checkpoint)."""
        if rows.shape != (len(keys), self.dim):
            raise ValueError(
                f"rows of shape {tuple(rows.shape)} for {len(keys)} keys of {self.dim}"
            )
        if self._ram is not None:
            self._ram = {}
        else:
            self._rows.clear()
            self._cache.clear()
            self._dirty.clear()
        for key, row in zip(keys, rows, strict=True):
            self.set(int(key), row)
        self.flush()

    def flush(self) -> None:
        if self._mmap is not None:
            for key in list(self._dirty):
                self._write(key, self._cache[key])
            self._mmap.flush()

    def close(self) -> None:
        self.flush()
        self._mmap = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ----------------------------------------------------------------------------- server half
@dataclass
class ClientBook:
    """What the server knows about client i: last accepted round, the version it holds."""

    acked_round: int = 0
    version: int = 0
    needs_reset: bool = False
    #: in the set C the server counts (N = |C|); see `ServerHalf.set_members`
    counted: bool = False


@dataclass
class PendingReply:
    """What the server expects from client i this round and what to commit if it arrives."""

    target_version: int
    expected_digest: bytes
    commit: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RoundStats:
    """Counters of one round (go to RoundRecord.extra)."""

    accepted: int = 0
    dropped: int = 0
    #: replies that arrived and were refused (bad payload, stale round, digest mismatch)
    rejected: int = 0
    resyncs: int = 0
    digest_checks: int = 0
    digest_mismatches: int = 0
    snapshots: int = 0
    catchup_messages: int = 0
    catchup_bytes: int = 0
    resets_sent: int = 0
    expected_participants: float = 0.0
    downlink_payloads: int = 0  # codec payloads sent (each carries a < 64-byte header)
    uplink_payloads: int = 0
    joined: int = 0  # clients added to the counted set C this round
    left: int = 0  # clients removed from C this round
    members: int = 0  # N = |C| after this round's changes

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ServerHalf:
    """The server side of one algorithm, independent of Flower.

    Per round k: `begin_round(k)`, `set_members(nodes)` with the clients the round samples
    from, `downlink_for(k, i)` for every sampled client (before training), then
    `receive(k, i, uplink)` for every reply, then `finish_round(k, pN)` which forms ĝ and
    moves the central model (family-specific `_advance`).

    Uplink memories: the server keeps every client's h_i in `h_store` (PP1 and PP2) and,
    under PP2, the single memory h in `h_global`, corrected by a client's share whenever
    that share changes outside the aggregation update (reset, leave, join; see the module
    docstring's memory invariant).
    """

    #: family subclasses set this to the model kinds they implement
    kinds: tuple[str, ...] = ()

    def __init__(
        self,
        settings: AlgorithmSettings,
        w0: torch.Tensor,
        store_dir: str | Path | None = None,
        expected_clients: int = 0,
        max_uplink_bytes: int | None = None,
    ) -> None:
        if settings.model not in self.kinds:
            raise ValueError(f"{type(self).__name__} does not implement {settings.model}")
        w0 = w0.detach().to("cpu", torch.float32).reshape(-1).clone()
        if w0.numel() != settings.dim:
            raise ValueError(f"initial model has {w0.numel()} values, settings say {settings.dim}")
        self.settings = settings
        self.dim = settings.dim
        self.w = w0  # the central model (exact, or degraded where the algorithm says)
        self.version = 0
        self.books: dict[int, ClientBook] = {}
        self.pending: dict[int, PendingReply] = {}
        self.up_compressor = get_compressor(settings.uplink)
        self.down_compressor = get_compressor(settings.downlink)
        self.identity = get_compressor("identity")
        self.max_uplink_bytes = max_uplink_bytes or 8 * self.dim + 65536
        self.h_global = (
            torch.zeros(self.dim) if settings.up_memory and settings.pp_variant == "pp2" else None
        )  # PP2: one memory h
        self.h_store = (  # h_i of every client it has seen (PP1 and PP2)
            TensorStore(self.dim, directory=store_dir, expected_clients=expected_clients)
            if settings.up_memory
            else None
        )
        self.stats = RoundStats()
        self._received: list[tuple[int, torch.Tensor]] = []
        self._store_dir = store_dir
        self._expected_clients = expected_clients
        self._round = 0
        #: node → partition id, set by the Flower glue (`strategies.partitions`)
        self.seed_keys: dict[int, int] = {}

    # ---- hooks for the families
    def _downlink_payload(
        self, node: int, book: ClientBook, k: int
    ) -> tuple[Downlink, dict[str, torch.Tensor]]:
        """The message for `node` and what to store for it if its reply is accepted."""
        raise NotImplementedError

    def _expected_digest_down(
        self, node: int, pending_commit: dict[str, torch.Tensor]
    ) -> tuple[bytes, bytes]:
        """`tensor_digest` of the downlink memory and of the model the client will hold."""
        raise NotImplementedError

    def _advance(self, g_hat: torch.Tensor, k: int) -> None:
        raise NotImplementedError

    def _reset_client(self, node: int) -> None:
        """Zero the server's per-client downlink memory (families that keep one)."""

    def _commit_client(self, node: int, commit: dict[str, torch.Tensor]) -> None:
        """Store what the family computed for this client at send time."""

    def evaluation_model(self) -> torch.Tensor:
        """The model to evaluate centrally (w; MCM: the preserved exact model)."""
        return self.w

    def seed_key(self, node: int) -> int:
        """Client i's key in per-client seeds: its partition id when `seed_keys` names it
        (so a run is a function of its seed whatever ids Flower gives the nodes), else the
        node id itself (in-process runs, whose nodes are their partitions)."""
        return self.seed_keys.get(node, node)

    # ---- the clients the server counts
    def members(self) -> list[int]:
        """The clients C the server counts, N = |C| (those it samples from)."""
        return sorted(node for node, book in self.books.items() if book.counted)

    def set_members(self, nodes: Iterable[int]) -> None:
        """Count exactly `nodes` from now on: the clients this round samples from (call after
        `begin_round`). A node not counted before joins, with the h_i the server holds for it
        (0 for a new client, its last h_i for one that comes back); a counted node absent
        from `nodes` leaves, and its h_i is kept for its return. Under PP2, h is corrected so
        that h = (1/(pN)) Σ_{i∈C} h_i still holds (module docstring)."""
        now = {int(node) for node in nodes}
        for node in [n for n, book in self.books.items() if book.counted and n not in now]:
            self._leave(node)
        for node in sorted(now):
            if not self.books.setdefault(node, ClientBook()).counted:
                self._join(node)
        self.stats.members = sum(book.counted for book in self.books.values())

    def expected_participants(self, n: int | None = None) -> float:
        """pN for n counted clients (default: the current N), as `sample_clients` draws them."""
        if n is None:
            n = sum(book.counted for book in self.books.values())
        s = self.settings
        return expected_participants(n, s.participation, s.participation_mode)

    def _join(self, node: int) -> None:
        book = self.books.setdefault(node, ClientBook())
        n = sum(b.counted for b in self.books.values())
        if self.h_global is not None and self.h_store is not None:  # Σ h_i += h_j
            total = self.h_global * self.expected_participants(n) if n else torch.zeros(self.dim)
            self.h_global = (total + self.h_store.get(node)) / self.expected_participants(n + 1)
        book.counted = True
        self.stats.joined += 1
        if self._round > 1:
            log.info("round %d: node %d joins (N = %d)", self._round, node, n + 1)

    def _leave(self, node: int) -> None:
        n = sum(b.counted for b in self.books.values())
        if self.h_global is not None and self.h_store is not None:  # Σ h_i −= h_j
            if n == 1:
                self.h_global = torch.zeros(self.dim)
            else:
                total = self.h_global * self.expected_participants(n) - self.h_store.get(node)
                self.h_global = total / self.expected_participants(n - 1)
        self.books[node].counted = False
        self.stats.left += 1
        log.info("round %d: node %d leaves (N = %d)", self._round, node, n - 1)

    def _reset_uplink_memory(self, node: int) -> None:
        """h_i ← 0 on the server; under PP2 h loses the client's share h_i / (pN)."""
        if self.h_store is None:
            return
        h_i = self.h_store.get(node)
        if self.h_global is not None and self.books[node].counted:
            self.h_global = self.h_global - h_i / self.expected_participants()
        self.h_store.set(node, torch.zeros(self.dim))

    # ---- the round
    def begin_round(self, k: int) -> None:
        self.stats = RoundStats()
        self.pending.clear()
        self._received = []
        self._round = k

    def downlink_for(self, k: int, node: int) -> Downlink:
        book = self.books.setdefault(node, ClientBook())
        if not book.counted:  # sampled without `set_members` saying so: it joins
            self._join(node)
        if book.needs_reset:
            self._reset_uplink_memory(node)
            self._reset_client(node)
        message, commit = self._downlink_payload(node, book, k)
        message.ack_round = book.acked_round
        message.reset = book.needs_reset
        message.uplink_seed = derive_seed(self.settings.seed, k, self.seed_key(node), 1)
        if message.reset:
            self.stats.resets_sent += 1
        h_i = None if self.h_store is None else self.h_store.get(node)
        expected = tensor_digest(h_i) + b"".join(self._expected_digest_down(node, commit))
        self.pending[node] = PendingReply(message.target_version, expected, commit)
        return message

    def receive(self, k: int, node: int, uplink: Uplink | None, error: str = "") -> str:
        """Validate and take in one reply; return its outcome ('ok', 'failed', 'dropped').

        Never raises because of what a reply holds: any failure of a client's payload
        (stale round, size, undecodable bytes, wrong length, non-finite values, malformed
        or mismatching digest, or any other exception while decoding) makes the reply
        rejected, logged and counted (`RoundStats.rejected`), and the round goes on. A reply
        for another round leaves the client's pending reply of this round in place.
        """
        if uplink is not None and getattr(uplink, "round", None) != k:
            stamp = getattr(uplink, "round", None)
            return self.reject(k, node, f"reply for round {stamp!r}, expected {k}", pop=False)
        pending = self.pending.pop(node, None)
        if pending is None:
            log.warning("round %d: reply from node %d that was not sampled: dropped", k, node)
            self.stats.dropped += 1
            return "dropped"
        if uplink is None:
            log.warning("round %d: node %d failed (%s); its state stays as before", k, node, error)
            return "failed"
        book = self.books[node]
        try:
            if uplink.status == "resync":
                log.warning("round %d: node %d asks for a resync: %s", k, node, uplink.detail)
                self.stats.resyncs += 1
                book.needs_reset = True
                return "dropped"
            delta_hat, reason = self._decode_reply(k, uplink)
        except Exception as exc:  # whatever the client's bytes make the decoder do
            delta_hat, reason = None, f"payload failed to decode: {type(exc).__name__}: {exc}"
        if reason or delta_hat is None:
            return self.reject(k, node, reason, pop=False)
        self.stats.digest_checks += 1
        if uplink.digest != pending.expected_digest:
            log.warning(
                "round %d: node %d state digest differs from the server's in %s: resync",
                k,
                node,
                digest_difference(uplink.digest, pending.expected_digest),
            )
            self.stats.digest_mismatches += 1
            self.stats.resyncs += 1
            self.stats.rejected += 1
            book.needs_reset = True
            return "dropped"
        delta_hat = delta_hat * self.settings.up_scale
        book.acked_round = k
        book.version = pending.target_version
        book.needs_reset = False
        self._commit_client(node, pending.commit)
        self._received.append((node, delta_hat))
        self.stats.accepted += 1
        return "ok"

    def reject(self, k: int, node: int, reason: str, pop: bool = True) -> str:
        """Refuse a reply that arrived (its content failed a check): log and count it, and
        with `pop` forget what the server expected from `node` this round. Returns 'dropped'
        (the outcome recorded for the client)."""
        if pop:
            self.pending.pop(node, None)
        log.warning("round %d: node %d reply rejected: %s", k, node, reason)
        self.stats.dropped += 1
        self.stats.rejected += 1
        return "dropped"

    def _decode_reply(self, k: int, uplink: Uplink) -> tuple[torch.Tensor | None, str]:
        """(Δ̂_i, '') for a valid reply, else (None, the reason)."""
        reason = self._validate(k, uplink)
        delta_hat: torch.Tensor | None = None
        if not reason:
            try:
                decoded = decode_payload(uplink.payload, expected_numel=self.dim)
                delta_hat = decoded.dense().reshape(-1).to(torch.float32)
            except codec_error_types() as exc:
                reason = f"undecodable payload: {exc}"
        if not reason and delta_hat is not None:
            if delta_hat.numel() != self.dim:
                reason = f"payload has {delta_hat.numel()} values, the model has {self.dim}"
            elif not bool(torch.isfinite(delta_hat).all()):
                reason = "payload holds non-finite values"
        return delta_hat, reason

    def _validate(self, k: int, uplink: Uplink) -> str:
        if uplink.round != k:
            return f"reply for round {uplink.round}, expected {k}"
        if not isinstance(uplink.payload, bytes | bytearray) or not uplink.payload:
            return "empty payload"
        if len(uplink.payload) > self.max_uplink_bytes:
            return f"payload of {len(uplink.payload)} bytes exceeds {self.max_uplink_bytes}"
        if not isinstance(uplink.digest, bytes) or len(uplink.digest) != DIGEST_BYTES:
            return "bad state digest"
        return ""

    def aggregate(self, expected: float) -> torch.Tensor:
        """ĝ from the accepted Δ̂_i (PP1 / PP2 / no memory), updating the uplink memories."""
        total = torch.zeros(self.dim)
        alpha = self.settings.up_memory_rate
        for node, delta_hat in self._received:
            if self.h_store is not None:  # h_i ← h_i + α Δ̂_i (PP1 and PP2)
                h_i = self.h_store.get(node)
                self.h_store.set(node, h_i + alpha * delta_hat)
                if self.h_global is None:  # PP1: ĝ sums Δ̂_i + h_i
                    delta_hat = delta_hat + h_i
            total += delta_hat
        mean = total / expected
        if self.h_global is not None:  # PP2: ĝ = mean + h, h ← h + α mean
            g_hat = mean + self.h_global
            self.h_global = self.h_global + alpha * mean
            return g_hat
        return mean

    def finish_round(self, k: int, expected: float) -> RoundStats:
        """ĝ = aggregate, then the family moves the model and prepares the next downlink."""
        if expected <= 0:
            raise ValueError(f"expected number of participants must be > 0, got {expected}")
        self.stats.expected_participants = expected
        for node in list(self.pending):  # sampled but never answered
            self.pending.pop(node)
        g_hat = self.aggregate(expected)
        self._advance(g_hat, k)
        if self.h_store is not None:
            self.h_store.flush()
        return self.stats

    def client_memory(self, node: int) -> torch.Tensor | None:
        """h_i as the server holds it (PP1 and PP2), for tests and diagnostics."""
        return None if self.h_store is None else self.h_store.get(node)

    def close(self) -> None:
        if self.h_store is not None:
            self.h_store.close()

    # ---- shared helpers for the families
    def _snapshot(self, tensors: Sequence[torch.Tensor]) -> tuple[list[bytes], int]:
        payloads, predicted = [], 0
        for t in tensors:
            wire, _ = encode(self.identity, t, 0)
            payloads.append(wire.payload)
            predicted += wire.predicted_nbytes
        return payloads, predicted


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
    """Missed broadcasts in order, or a full snapshot, whichever is smaller in bytes."""
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


def replace_model(state: ClientState, model: torch.Tensor) -> ClientState:
    return replace(state, model=model)


# ----------------------------------------------------------------------------- sampling
def sample_clients(
    nodes: Sequence[int],
    participation: float,
    mode: str,
    rng: np.random.Generator,
) -> tuple[list[int], float]:
    """Draw S_k and return (S_k, pN), the expected number of participants.

    "bernoulli": each client joins independently with probability p (redrawn while S_k is
    empty), pN = p·N as in the papers; "fraction": a uniform sample of max(1, round(p·N))
    clients, pN = |S_k|.
    """
    nodes = sorted(nodes)
    n = len(nodes)
    if n == 0:
        raise ValueError("no clients to sample from")
    expected = expected_participants(n, participation, mode)
    if mode == "fraction":
        picked = rng.choice(n, size=int(expected), replace=False)
        return [nodes[i] for i in sorted(picked.tolist())], expected
    while True:
        mask = rng.random(n) < participation
        if mask.any():
            return [nodes[i] for i in np.flatnonzero(mask).tolist()], expected


def expected_participants(n: int, participation: float, mode: str) -> float:
    """pN of `sample_clients`: p·N ("bernoulli") or max(1, round(p·N)) ("fraction")."""
    if mode == "fraction":
        return float(max(1, round(participation * n)))
    if mode != "bernoulli":
        raise ValueError(f"participation-mode must be 'bernoulli' or 'fraction', got {mode!r}")
    return participation * n
