"""Delayed updates (run-config key ``max-staleness`` τ), without Flower and without timing.

The real server half and client halves are driven by plain calls, with scripted late
replies: the reply of the first client of S_k (after busy clients are skipped) is
delivered d rounds later. Checked:

1. against the delayed-update equations of docs/algorithms.md, written out plainly below
   (`reference`), for diana, artemis, mcm (replaying families: a late client catches up by
   replaying the broadcast log) and rand-mcm, p = 1 and p = 0.5, PP1 and PP2, with replies
   of staleness 1 and 2 under τ = 2; the state digests agree in every round;
2. τ = 0 is today's behaviour: a late reply is refused, and the run equals bit for bit the
   run in which that reply was lost; τ = 2 with no late reply equals τ = 0 bit for bit;
3. a reply older than τ is refused, a reply after a newer downlink is refused, and in
   both cases the client rolls back and the next digests agree;
4. on resume from a checkpoint, outstanding replies are dropped (the safe choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from compression import decode, parse_compressor
from strategies import checkpoint
from strategies.client_half import ClientState, client_round, initial_client_state
from strategies.encoding import derive_seed
from strategies.local import FaultKind, run_local
from strategies.messages import Uplink
from strategies.registry import PRESETS, client_apply, get_preset, make_server
from strategies.sampling import sample_clients
from strategies.server_half import RoundStats, ServerHalf
from strategies.settings import AlgorithmSettings, resolve_settings
from tasks.synthetic import make_lsq_task

N, D, LR, SEED = 6, 10, 0.1, 11


def _q(spec: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """C(x) as the receiver decodes it from the wire."""
    return decode(parse_compressor(spec).compress(x, seed=seed).to_bytes()).dense()


def _grad():
    task = make_lsq_task(num_partitions=N, dim=D, samples_per_client=30, seed=3)
    A = [task.A(i).float() for i in range(N)]
    b = [task.b(i).float() for i in range(N)]

    def grad(i: int, w: torch.Tensor) -> torch.Tensor:
        return A[i].T @ (A[i] @ w - b[i]) / A[i].shape[0]

    return grad


GRAD = _grad()
W0 = torch.full((D,), 0.5)


def _settings(name: str, p: float, pp: str = "pp2", tau: int = 2) -> AlgorithmSettings:
    return resolve_settings(
        get_preset(name), D, server_lr=LR, participation=p, pp_variant=pp, seed=SEED,
        max_staleness=tau,
    )  # fmt: skip


# ----------------------------------------------------------------------------- driver
@dataclass
class Trace:
    server: ServerHalf
    committed: dict[int, ClientState]
    pending: dict[int, ClientState | None]
    models: list[torch.Tensor] = field(default_factory=list)
    stats: list[RoundStats] = field(default_factory=list)
    sampled: list[list[int]] = field(default_factory=list)
    late_outcomes: list[str] = field(default_factory=list)


def drive(
    s: AlgorithmSettings,
    rounds: int,
    delays: dict[int, int],
    *,
    resample: dict[int, int] | None = None,
    lost: bool = False,
) -> Trace:
    """`rounds` rounds; in round k ∈ `delays` the first client of S_k replies d = delays[k]
    rounds late (delivered at the start of round k + d; with `lost` never). `resample`
    {round: client} sends that client a downlink in that round even if it is busy."""
    server = make_server(s, W0, expected_clients=N)
    apply = client_apply(s)
    t = Trace(
        server,
        {i: initial_client_state(W0, s) for i in range(N)},
        {i: None for i in range(N)},
    )
    rng = np.random.default_rng(s.seed)
    queue: dict[int, list[tuple[int, Uplink]]] = {}
    for k in range(1, rounds + 1):
        server.set_members(range(N))
        nodes, expected = sample_clients(list(range(N)), s.participation, "bernoulli", rng)
        server.begin_round(k)
        nodes = server.skip_busy(nodes)
        if resample and k in resample and resample[k] not in nodes:
            nodes = sorted([*nodes, resample[k]])
        t.sampled.append(nodes)
        for node, uplink in queue.pop(k, []):  # late replies arrive first
            t.late_outcomes.append(server.receive(k, node, uplink))
        late_now = []
        for idx, i in enumerate(nodes):
            down = server.downlink_for(k, i)

            def compute(w: torch.Tensor, i: int = i) -> tuple[torch.Tensor, float, int]:
                return GRAD(i, w), 0.0, 1

            step = client_round(s, t.committed[i], t.pending[i], down, W0, apply, compute)
            t.committed[i], t.pending[i] = step.committed, step.pending
            if idx == 0 and k in delays:
                if not lost:
                    queue.setdefault(k + delays[k], []).append((i, step.uplink))
                late_now.append(i)
                continue
            assert server.receive(k, i, step.uplink) == "ok"
        for i in late_now:
            server.timeout(k, i)
        t.stats.append(server.finish_round(k, expected))
        t.models.append(server.evaluation_model().clone())
    # deliver what is left (refused or applied by the caller's expectations: not here)
    return t


# ----------------------------------------------------------------------------- equations
def reference(s: AlgorithmSettings, rounds: int, delays: dict[int, int]) -> list[torch.Tensor]:
    """Delayed updates, plainly (docs/algorithms.md, "Delayed updates"). The reply of round
    k that arrives in round j = k + d (1 ≤ d ≤ τ) carries Δ̂_i computed at round k's state
    (the model x_i the client held then, its h_i then); round j aggregates it with its own
    replies, all with the weight 1/(pN):

        A_j = {i ∈ S_j replying in time} ∪ {i whose reply of round j − d arrives now}
        PP1:  ĝ_j = (1/(pN)) Σ_{i∈A_j} (Δ̂_i + h_i),  h_i ← h_i + α_up Δ̂_i  (i ∈ A_j)
        PP2:  ĝ_j = (1/(pN)) Σ_{i∈A_j} Δ̂_i + h,      h ← h + α_up (1/(pN)) Σ_{i∈A_j} Δ̂_i

    and the family moves the model by ĝ_j as for a round without late replies. A client
    whose reply is outstanding is skipped from the draw of S in rounds k+1..k+d.
    """
    d, a_up, a_dn, kind = s.dim, s.up_memory_rate, s.down_memory_rate, s.model
    zeros = torch.zeros(d)
    w = W0.clone()
    H = W0.clone() if kind == "preserved" else zeros.clone()
    w_hat = W0.clone()
    h_global = zeros.clone()  # PP2's h
    h_server = {i: zeros.clone() for i in range(N)}  # the server's h_i
    h = {i: zeros.clone() for i in range(N)}  # the clients' h_i
    H_i = {i: W0.clone() for i in range(N)}  # Rand-MCM
    rng = np.random.default_rng(s.seed)
    arriving: dict[int, list[tuple[int, torch.Tensor]]] = {}
    busy_until = {i: 0 for i in range(N)}
    pN = s.participation * N
    models = []
    for k in range(1, rounds + 1):
        while True:
            mask = rng.random(N) < s.participation
            if mask.any():
                break
        S = [i for i in range(N) if mask[i] and busy_until[i] < k]
        applied = arriving.pop(k, [])
        for idx, i in enumerate(S):
            if kind == "preserved":
                x = w_hat
            elif kind == "preserved-rand":
                omega_i = _q(s.downlink, w - H_i[i], derive_seed(s.seed, k, i, 2))
                x = H_i[i] + omega_i
                H_i[i] = H_i[i] + a_dn * omega_i
            else:
                x = w
            delta = GRAD(i, x) - h[i]
            delta_hat = _q(s.uplink, delta, derive_seed(s.seed, k, i, 1))
            h[i] = h[i] + a_up * delta_hat  # the client's h_i moves when it replies
            if idx == 0 and k in delays:
                arriving.setdefault(k + delays[k], []).append((i, delta_hat))
                busy_until[i] = k + delays[k]
            else:
                applied.append((i, delta_hat))
        if s.pp_variant == "pp1":
            g_hat = sum((dh + h_server[i] for i, dh in applied), zeros) / pN
        else:
            mean = sum((dh for _, dh in applied), zeros) / pN
            g_hat = mean + h_global
            h_global = h_global + a_up * mean
        for i, dh in applied:
            h_server[i] = h_server[i] + a_up * dh
        if kind in ("exact", "preserved", "preserved-rand"):
            w = w - LR * g_hat
            if kind == "preserved":
                omega = _q(s.downlink, w - H, derive_seed(s.seed, k, 0, 2))
                w_hat, H = H + omega, H + a_dn * omega
        else:  # artemis: degraded, no downlink memory
            omega = _q(s.downlink, g_hat, derive_seed(s.seed, k, 0, 2))
            w = w - LR * omega
        models.append(w.clone())
    return models


#: reply of round 2 applied in round 3 (staleness 1), of round 4 in round 6 (staleness 2)
DELAYS = {2: 1, 4: 2}
FAMILIES = ["diana", "artemis", "mcm", "rand-mcm"]


@pytest.mark.parametrize("pp", ["pp1", "pp2"])
@pytest.mark.parametrize("p", [1.0, 0.5])
@pytest.mark.parametrize("name", FAMILIES)
def test_delayed_updates_match_the_equations(name: str, p: float, pp: str) -> None:
    s = _settings(name, p, pp)
    assert name != "artemis" or not s.down_memory  # the reference's artemis
    rounds = 9
    t = drive(s, rounds, DELAYS)
    want = reference(s, rounds, DELAYS)
    for k, (got, exp) in enumerate(zip(t.models, want, strict=True), start=1):
        assert torch.allclose(got, exp, rtol=1e-5, atol=1e-6), (name, p, pp, k, got, exp)
    assert t.late_outcomes == ["ok", "ok"]
    applied = [e for st in t.stats for e in st.late_replies]
    assert [(e["round"], e["staleness"], e["applied"]) for e in applied] == [
        (2, 1, True),
        (4, 2, True),
    ]
    assert sum(st.late_applied for st in t.stats) == 2
    assert sum(st.late_refused + st.late_expired for st in t.stats) == 0
    assert sum(st.busy_skipped for st in t.stats) >= (2 if p == 1 else 0)
    # the digests agreed in every round (no mismatch, no resync), and the memories too
    assert sum(st.digest_mismatches + st.resyncs + st.rejected for st in t.stats) == 0
    assert sum(st.digest_checks for st in t.stats) == sum(len(x) for x in t.sampled)
    for i in range(N):
        if s.up_memory:
            state = t.pending[i] or t.committed[i]
            assert torch.equal(t.server.client_memory(i), state.up_memory), i  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_applies_late_replies_with_agreeing_digests(name: str) -> None:
    """Every family (and its error-feedback residuals, Dore's shared model, signum's
    momentum, which the client promotes with its pending state) takes late replies of
    staleness 1 and 2, and both sides stay in step to the end."""
    lr = 0.01 if name.startswith("sign") else LR
    s = resolve_settings(
        get_preset(name), D, server_lr=lr, participation=1.0, seed=SEED, max_staleness=2
    )
    t = drive(s, 9, DELAYS)
    assert t.late_outcomes == ["ok", "ok"]
    assert sum(st.late_applied for st in t.stats) == 2
    assert sum(st.digest_mismatches + st.resyncs + st.rejected for st in t.stats) == 0
    assert sum(st.digest_checks for st in t.stats) == sum(len(x) for x in t.sampled)
    assert bool(torch.isfinite(t.models[-1]).all()) and not torch.equal(t.models[-1], W0)


def test_a_late_client_promotes_its_pending_state_on_the_next_downlink() -> None:
    """After its late reply of round 2 is applied in round 3, the client's next downlink
    acknowledges round 2 and the client's digest (h_i, H, ŵ) equals the server's."""
    s = _settings("mcm", 1.0)
    t = drive(s, 5, {2: 1})
    late_client = t.sampled[1][0]
    assert late_client not in t.sampled[2]  # busy in round 3
    assert late_client in t.sampled[3]  # back in round 4, accepted with the digest check
    book = t.server.books[late_client]
    assert book.acked_round == 5
    assert t.stats[3].digest_checks == len(t.sampled[3]) and t.stats[3].digest_mismatches == 0


# ----------------------------------------------------------------------------- τ = 0
@pytest.mark.parametrize("name", ["diana", "mcm", "rand-mcm", "signum-mv"])
def test_tau_0_refuses_late_replies_exactly_as_a_lost_reply(name: str) -> None:
    s = _settings(name, 1.0, tau=0)
    late = drive(s, 6, {2: 1})
    lost = drive(s, 6, {2: 1}, lost=True)
    assert late.late_outcomes == ["dropped"]
    for a, b in zip(late.models, lost.models, strict=True):
        assert torch.equal(a, b)
    assert late.stats[2].late_refused == 1 and late.stats[2].rejected == 1
    assert late.stats[2].late_replies[0]["staleness"] == 1
    assert sum(st.busy_skipped + st.late_applied for st in late.stats) == 0
    assert sum(st.digest_mismatches + st.resyncs for st in late.stats) == 0


@pytest.mark.parametrize("name", ["artemis", "rand-mcm", "signsgd-mv"])
def test_tau_without_late_replies_changes_nothing(name: str) -> None:
    p = 0.5
    runs = [
        run_local(_settings(name, p, tau=tau), W0, lambda i, w: (GRAD(i, w), 0.0), N, 8)
        for tau in (0, 2)
    ]
    a, b = (r.server.evaluation_model() for r in runs)
    assert torch.equal(a, b)
    assert runs[0].sampled == runs[1].sampled


def test_run_local_late_fault_is_applied_with_tau() -> None:
    """benchmarks.faults' ``late`` fault: refused with τ = 0, applied with τ = 1."""

    def grad(i: int, w: torch.Tensor) -> tuple[torch.Tensor, float]:
        return GRAD(i, w), 0.0

    def fault(k: int, i: int) -> FaultKind | None:
        return "late" if (k, i) == (3, 2) else None

    stats = {
        tau: run_local(_settings("diana", 1.0, tau=tau), W0, grad, N, 6, fault=fault).history
        for tau in (0, 1)
    }
    assert stats[0][3].late_refused == 1 and stats[0][3].late_applied == 0
    assert stats[1][3].late_applied == 1 and stats[1][3].busy_skipped == 1
    assert sum(st.digest_mismatches + st.resyncs for st in stats[1]) == 0


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", ["diana", "artemis", "mcm", "rand-mcm"])
def test_staleness_beyond_tau_is_refused_and_both_sides_roll_back(name: str) -> None:
    """τ = 1, a reply of round 2 delivered in round 4: the outstanding reply expired at the
    end of round 3, the reply is refused, and the client (rolled back by the next
    downlink's ack round) replies with a digest equal to the server's."""
    s = _settings(name, 1.0, tau=1)
    t = drive(s, 7, {2: 2})
    assert t.late_outcomes == ["dropped"]
    assert t.stats[2].late_expired == 1
    entry = t.stats[3].late_replies[0]
    assert entry["staleness"] == 2 and entry["applied"] is False
    assert "max-staleness 1" in entry["reason"]
    assert t.stats[3].late_refused == 1
    assert sum(st.late_applied + st.digest_mismatches + st.resyncs for st in t.stats) == 0
    late_client = t.sampled[1][0]
    assert any(late_client in x for x in t.sampled[3:])  # sampled again, digest agreed


@pytest.mark.parametrize("name", ["diana", "mcm", "rand-mcm"])
def test_a_reply_after_a_newer_downlink_is_refused(name: str) -> None:
    """The late client is sent a newer downlink in round 3 (ack round older than 2, so it
    drops the state its round-2 reply was computed at); that reply, arriving in round 4
    within τ, is refused, and the round-3 reply is taken with agreeing digests."""
    s = _settings(name, 1.0, tau=2)
    first = drive(s, 1, {}).sampled[0][0]  # the first client of S_2 at p = 1
    t = drive(s, 6, {2: 2}, resample={3: first})
    assert first in t.sampled[2]
    assert t.late_outcomes == ["dropped"]
    entry = t.stats[3].late_replies[0]
    assert entry["applied"] is False and "no longer outstanding" in entry["reason"]
    assert sum(st.late_applied + st.digest_mismatches + st.resyncs for st in t.stats) == 0
    assert t.server.books[first].acked_round == 6
    state = t.pending[first]
    assert state is not None and torch.equal(t.server.client_memory(first), state.up_memory)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- resume
def test_outstanding_replies_are_dropped_on_resume(tmp_path) -> None:
    """A checkpoint taken with a reply outstanding restores without it: the late reply is
    refused, and the client, whose next downlink acks the older round, rolls back; its
    digest then agrees with the restored server's."""
    s = _settings("diana", 1.0, tau=2)
    t = drive(s, 2, {2: 1})  # round 2's first reply is outstanding after round 2
    assert len(t.server.outstanding) == 1
    (node,) = t.server.outstanding
    path = tmp_path / "ck.pt"
    checkpoint.save(checkpoint.capture(t.server), path)
    fresh = make_server(s, W0, expected_clients=N)
    checkpoint.restore(fresh, checkpoint.load(path))
    assert fresh.outstanding == {}
    assert torch.equal(fresh.w, t.server.w)
    # round 3 on the restored server: the late reply is refused, the client is sampled
    fresh.set_members(range(N))
    fresh.begin_round(3)
    assert fresh.skip_busy([node]) == [node]
    state = t.pending[node]
    assert state is not None
    late = Uplink(2, "ok", b"", 0, b"", 0.0, 1)
    assert fresh.receive(3, node, late) == "dropped"
    down = fresh.downlink_for(3, node)
    step = client_round(
        s, t.committed[node], t.pending[node], down, W0, client_apply(s),
        lambda w: (GRAD(node, w), 0.0, 1),
    )  # fmt: skip
    assert fresh.receive(3, node, step.uplink) == "ok"
    assert fresh.stats.digest_mismatches == 0 and fresh.stats.late_refused == 1
