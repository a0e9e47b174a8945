"""Algorithms with memory under faults and hostile payloads (no Flower; real client and
server halves, real wire bytes, through `strategies.local.run_local`).

1. For every algorithm with uplink memory, PP1 and PP2, p = 1 and p = 0.5: a client whose
   state is wiped mid-run, a client that leaves for good, a client that joins at round 20.
   Each run must end within 10x of the fault-free run's final excess loss (on the objective
   of the clients the server counts at the end), and at or below 1e-6 of the starting excess
   loss where the fault-free run gets there. With p = 1 and PP2, the server's memory must
   equal the mean of the counted clients' memories after every round (docs/algorithms.md:
   the memory invariant).
2. The reproduction of issue 9's finding: diana, p = 1, PP2, one client wiped at round 20 on
   the least-squares problem of tests/test_algorithms.py.
3. `ServerHalf.receive` never raises, whatever a reply carries (hypothesis), and the exact
   state digest catches a one-bit difference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compression import parse_compressor
from strategies.client_half import initial_client_state
from strategies.consistency import DIGEST_BYTES, state_digest
from strategies.local import LocalRun, crafted_payload, run_local
from strategies.messages import Uplink
from strategies.registry import get_preset, make_server
from strategies.server_half import ServerHalf
from strategies.settings import AlgorithmSettings, resolve_settings
from tasks.synthetic import make_lsq_task

MEMORY_ALGOS = ["diana", "artemis", "dore", "mcm", "rand-mcm"]
#: 10 clients: with fewer, one client's share of the objective is so large that a leave or
#: a late join moves the optimum further than 10x of the fault-free run's final excess loss
#: (N = 6: up to 25x), with correct bookkeeping. 75 rounds: the fault-free runs at p = 1 end
#: well below 1e-6 of the starting excess loss, so that a fault's delay stays below the 1e-6
#: bound (at 60 rounds they ended at 5-8e-7 and the faulty runs at 1.2-2.6e-6).
#: Heterogeneity 0.5 (`Problem`): a client joining at round 20 starts its memory h_j 20 rounds
#: late, and at heterogeneity 1.0 the noise of its large early Δ_j left diana (p = 1, N = 10,
#: 75 rounds) 12x above the fault-free run; at 0.5, 0.7x. The issue's own case (heterogeneity
#: 1.0, N = 20) is `test_issue_9_diana_pp2_wipe_keeps_the_memory_unbiased`.
N, D, ROUNDS, GAMMA = 10, 8, 75, 0.2
FAULT_ROUND = 20
VICTIM = 2  # the client hit by the fault
#: excess-loss ratios below this count as converged when comparing a faulty run with the
#: fault-free one: a fault costs a run a few rounds of its linear rate, so the ratio of the
#: two grows with how deep the fault-free run gets. Rand-MCM with its downlink at QSGD s = 2
#: (ω = 4) ends 75 rounds at 1.1e-9 and its wiped run at 1.3e-8 (12x), where at s = 1 they
#: ended at 2.2e-8 and 1.1e-7 (5x): the wipe costs the same rounds, the runs go deeper. A
#: bias left by the fault would stop the run far above (the memory-gap checks catch it too).
CONVERGED = 1e-8


class Problem:
    """Heterogeneous least squares f_i(w) = (1/2n)‖A_i w − b_i‖², F_S = mean over S."""

    def __init__(self, n: int, d: int, samples: int = 50, heterogeneity: float = 0.5) -> None:
        task = make_lsq_task(
            num_partitions=n, dim=d, samples_per_client=samples, seed=0, heterogeneity=heterogeneity
        )
        self.n, self.d = n, d
        self.A = [task.A(i) for i in range(n)]
        self.b = [task.b(i) for i in range(n)]

    def grad(self, i: int, w: torch.Tensor) -> tuple[torch.Tensor, float]:
        w64 = w.to(torch.float64)
        return (self.A[i].T @ (self.A[i] @ w64 - self.b[i]) / self.A[i].shape[0]).float(), 0.0

    def loss(self, w: torch.Tensor, clients: list[int]) -> float:
        w64 = w.to(torch.float64)
        return sum(float(((self.A[i] @ w64 - self.b[i]) ** 2).mean()) / 2 for i in clients) / len(
            clients
        )

    @functools.cache  # noqa: B019 (a few problems per session)
    def optimum(self, clients: tuple[int, ...]) -> torch.Tensor:
        gram = sum(self.A[i].T @ self.A[i] / self.A[i].shape[0] for i in clients)
        rhs = sum(self.A[i].T @ self.b[i] / self.A[i].shape[0] for i in clients)
        return torch.linalg.solve(gram, rhs)

    def excess_ratio(self, w: torch.Tensor, clients: list[int]) -> float:
        """(F_S(w) − F_S(w*_S)) / (F_S(0) − F_S(w*_S)) for the clients S."""
        best = self.loss(self.optimum(tuple(clients)), clients)
        start = self.loss(torch.zeros(self.d), clients)
        return (self.loss(w, clients) - best) / (start - best)


@functools.cache
def _problem(n: int = N, d: int = D) -> Problem:
    return Problem(n, d)


def _settings(name: str, p: float, pp: str, d: int = D) -> AlgorithmSettings:
    return resolve_settings(
        get_preset(name), d, server_lr=GAMMA, participation=p, pp_variant=pp, seed=3
    )


def memory_gap(server: ServerHalf) -> float:
    """‖h − (1/(pN)) Σ_{i∈C} h_i‖ / max(1, ‖h‖) for the clients C the server counts (PP2;
    pN = N at p = 1)."""
    members = server.members()
    assert server.h_global is not None and members
    total = torch.zeros(server.dim)
    for i in members:
        h_i = server.client_memory(i)
        assert h_i is not None
        total = total + h_i
    mean = total / server.expected_participants()
    return float((server.h_global - mean).norm()) / max(1.0, float(server.h_global.norm()))


FAULTS: dict[str, Callable[[int], list[int]] | None] = {
    "wipe": None,
    "leave": lambda k: [i for i in range(N) if not (i == VICTIM and k >= FAULT_ROUND)],
    "join": lambda k: [i for i in range(N) if not (i == VICTIM and k < FAULT_ROUND)],
}


def _counted(fault: str | None) -> list[int]:
    """The clients the server counts at the end of a run with `fault`."""
    return [i for i in range(N) if not (fault == "leave" and i == VICTIM)]


def _run(name: str, p: float, pp: str, fault: str | None) -> tuple[LocalRun, list[float], float]:
    """One run; returns it, with PP2 the memory gap after every round, and its final excess
    loss ratio on the objective of the clients counted at the end: after the last round at
    p = 1 (linear convergence), the mean over the last 10 rounds at p < 1 (where sampling
    leaves the run on a noisy floor, PP1 above all, and one round's value says little)."""
    problem = _problem()
    s = _settings(name, p, pp)
    w0 = torch.zeros(D)
    gaps: list[float] = []
    excess: list[float] = []
    counted = _counted(fault)

    def on_round(k: int, run: LocalRun) -> None:
        if fault == "wipe" and k == FAULT_ROUND - 1:  # lost before round FAULT_ROUND
            run.committed[VICTIM] = initial_client_state(w0, s)
            run.pending[VICTIM] = None
        if pp == "pp2":
            gaps.append(memory_gap(run.server))
        excess.append(problem.excess_ratio(run.server.evaluation_model(), counted))

    members = FAULTS[fault] if fault else None
    run = run_local(s, w0, problem.grad, N, ROUNDS, on_round=on_round, members=members)
    final = excess[-1] if p == 1 else sum(excess[-10:]) / 10
    return run, gaps, final


@functools.cache
def _fault_free(name: str, p: float, pp: str) -> tuple[float, LocalRun]:
    run, _, final = _run(name, p, pp, None)
    return final, run


@pytest.mark.parametrize("fault", ["wipe", "leave", "join"])
@pytest.mark.parametrize("pp", ["pp1", "pp2"])
@pytest.mark.parametrize("p", [1.0, 0.5])
@pytest.mark.parametrize("name", MEMORY_ALGOS)
def test_memory_survives_a_fault(name: str, p: float, pp: str, fault: str) -> None:
    reference, _ = _fault_free(name, p, pp)
    run, gaps, got = _run(name, p, pp, fault)
    counted = _counted(fault)
    assert sorted(run.server.members()) == counted
    assert got <= 10 * max(reference, CONVERGED), (got, reference)
    if reference <= 1e-6:
        assert got <= 1e-6, (got, reference)
    if fault == "wipe":  # the loss was noticed and repaired once
        assert sum(h.resyncs for h in run.history) == 1
        assert sum(h.resets_sent for h in run.history) == 1
    else:
        assert sum(h.resyncs + h.digest_mismatches for h in run.history) == 0
    if gaps:  # PP2: h = (1/(pN)) Σ h_i over the counted clients, after every round
        assert max(gaps) <= 1e-5, max(gaps)
    # every counted client's h_i (as of its last accepted reply) is the server's, bit for bit
    for i in counted:
        pending, book = run.pending[i], run.server.books[i]
        state = pending if pending is not None and pending.stamp == book.acked_round else None
        state = state or run.committed[i]
        h_i = run.server.client_memory(i)
        assert state.up_memory is not None and h_i is not None
        assert torch.equal(state.up_memory, h_i), i


def test_issue_9_diana_pp2_wipe_keeps_the_memory_unbiased() -> None:
    """Issue 9, finding 1: N = 20, d = 20, s = 1, γ = 0.2, 150 rounds, client 5 wiped before
    round 20. Before the fix: excess-loss ratio 2.3e-3 (fault-free 3.9e-13) and
    ‖h − mean h_i‖ = 0.22 for the rest of the run."""
    problem = Problem(20, 20, samples=200, heterogeneity=1.0)
    s = _settings("diana", 1.0, "pp2", d=20)
    w0 = torch.zeros(20)
    gaps: list[float] = []

    def on_round(k: int, run: LocalRun) -> None:
        if k == 19:
            run.committed[5] = initial_client_state(w0, s)
            run.pending[5] = None
        gaps.append(memory_gap(run.server))

    run = run_local(s, w0, problem.grad, 20, 150, on_round=on_round)
    ratio = problem.excess_ratio(run.server.evaluation_model(), list(range(20)))
    assert sum(h.resyncs for h in run.history) == 1
    assert ratio <= 1e-10, ratio
    assert max(gaps) <= 1e-5, max(gaps)


# ----------------------------------------------------------------------------- receive
def _server_in_round(name: str = "diana", pp: str = "pp2") -> ServerHalf:
    server = make_server(_settings(name, 1.0, pp), torch.zeros(D))
    server.set_members(range(3))
    server.begin_round(1)
    for i in range(3):
        server.downlink_for(1, i)
    return server


def test_crafted_payload_is_rejected_and_the_round_goes_on() -> None:
    """Issue 9, finding 2: index gaps that overflow int64 made dense() raise IndexError
    out of receive."""
    server = _server_in_round()
    good = parse_compressor(server.settings.uplink).compress(torch.ones(D), seed=1).to_bytes()
    digest = state_digest(torch.zeros(D), None, torch.zeros(D))
    bad = Uplink(1, "ok", crafted_payload(D), 0, digest, 0.0, 1)
    assert server.receive(1, 0, bad) == "dropped"
    assert server.receive(1, 1, Uplink(1, "ok", good, 0, digest, 0.0, 1)) == "ok"
    stats = server.finish_round(1, 3.0)
    assert stats.rejected == 1 and stats.accepted == 1
    assert torch.isfinite(server.w).all() and not torch.equal(server.w, torch.zeros(D))


def _valid_crc(body: bytes) -> bytes:
    import struct
    import zlib

    return body + struct.pack("<I", zlib.crc32(body))


_REAL = [
    parse_compressor(spec).compress(torch.linspace(-1, 1, D), seed=0).to_bytes()
    for spec in ("qsgd:s=1,bucket=64", "identity", "topk:k=3", "randk:k=3", "natural",
                 "scaled_sign:bucket=4", "qsgd:s=5,bucket=4")
]  # fmt: skip


def _payloads() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and real payloads with some bytes changed and a valid CRC again."""
    real = _REAL

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        body = bytearray(draw(st.sampled_from(real))[:-4])
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(body) - 1))
            body[pos] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, 3))
        return _valid_crc(bytes(body[: len(body) - cut]))

    return st.one_of(
        st.binary(max_size=200), mutated(), st.just(crafted_payload(D)), st.sampled_from(real)
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=_payloads(),
    round_=st.integers(-(2**63), 2**63 - 1) | st.just(1),
    status=st.sampled_from(["ok", "resync", "", "weird"]),
    digest=st.binary(max_size=64) | st.just(b"\0" * DIGEST_BYTES),
    loss=st.floats(allow_nan=True, allow_infinity=True),
    node=st.integers(0, 4),
)
def test_receive_never_raises(
    payload: bytes, round_: int, status: str, digest: bytes, loss: float, node: int
) -> None:
    server = _server_in_round()
    uplink = Uplink(round_, status, payload, 0, digest, loss, 1)  # type: ignore[arg-type]
    outcome = server.receive(1, node, uplink)
    assert outcome in ("ok", "dropped")
    stats = server.finish_round(1, 3.0)
    assert torch.isfinite(server.w).all()
    if outcome == "ok":
        assert stats.accepted == 1 and uplink.payload in _REAL
    else:  # refused (counted), or a resync request
        assert stats.accepted == 0 and stats.rejected + stats.dropped + stats.resyncs >= 1


def test_receive_turns_any_uplink_object_into_a_rejection() -> None:
    server = _server_in_round()
    odd: list[object] = [object(), Uplink(1, "ok", "text", 0, b"", 0.0, 1)]  # type: ignore[arg-type]
    weird = Uplink(1, "ok", b"", 0, b"", 0.0, 1)
    weird.digest = [0.0] * 6  # type: ignore[assignment]
    odd.append(weird)
    for node, up in enumerate(odd):
        assert server.receive(1, node, up) == "dropped"  # type: ignore[arg-type]
    assert server.finish_round(1, 3.0).rejected == 3


# ----------------------------------------------------------------------------- digest
def test_digest_is_exact() -> None:
    x = torch.linspace(-1, 1, 1000)
    y = x.clone()
    y[500] = torch.nextafter(y[500], torch.tensor(2.0))  # one ulp
    assert state_digest(x, None, x) == state_digest(x.clone(), None, x.clone())
    assert state_digest(x, None, x) != state_digest(y, None, x)
    assert state_digest(x, None, x) != state_digest(x, x, x)  # absent is not zeros or x
    assert state_digest(None, None, torch.zeros(3)) != state_digest(
        None, torch.zeros(0), torch.zeros(3)
    )
    # a permutation keeps the sum and the norm (what the old digest compared), not the bytes
    z = x.flip(0)
    assert state_digest(x, None, x) != state_digest(z, None, x)
    assert len(state_digest(x, None, x)) == DIGEST_BYTES


def test_pp2_server_keeps_every_h_i_in_the_store() -> None:
    _, run = _fault_free("diana", 1.0, "pp2")
    for i in range(N):
        state, h_i = run.pending[i], run.server.client_memory(i)
        assert state is not None and state.up_memory is not None and h_i is not None
        assert torch.equal(state.up_memory, h_i)
    assert memory_gap(run.server) <= 1e-5


def test_members_leave_and_return_with_their_share() -> None:
    """A client that leaves takes its h_i share out of h; back, it brings it in again."""
    problem = _problem()
    s = _settings("diana", 1.0, "pp2")
    gaps: list[float] = []
    absent = range(10, 15)

    def members(k: int) -> list[int]:
        return [i for i in range(N) if not (i == 1 and k in absent)]

    run = run_local(
        s, torch.zeros(D), problem.grad, N, 30, members=members,
        on_round=lambda k, r: gaps.append(memory_gap(r.server)),
    )  # fmt: skip
    assert max(gaps) <= 1e-5
    assert sum(h.resyncs for h in run.history) == 0
    assert np.isclose(len(run.server.members()), N)


@pytest.mark.parametrize("fault", ["leave", "join"])
def test_run_local_counts_who_joins_and_leaves_in_the_round_they_do(fault: str) -> None:
    """`run_local` opens the round before it sets the members, so the round's statistics
    keep the joins and leaves `set_members` counts (they were cleared before)."""
    problem = _problem()
    s = _settings("artemis", 1.0, "pp1")
    seen: dict[int, tuple[int, int]] = {}

    def on_round(k: int, run: LocalRun) -> None:
        seen[k] = (run.server.stats.joined, run.server.stats.left)

    run_local(s, torch.zeros(D), problem.grad, N, FAULT_ROUND + 1, on_round=on_round,
              members=FAULTS[fault])  # fmt: skip
    if fault == "leave":
        assert seen[FAULT_ROUND] == (0, 1)
        assert seen[1] == (N, 0)  # every client joins in round 1
    else:
        assert seen[FAULT_ROUND] == (1, 0)
        assert seen[1] == (N - 1, 0)
    assert all(seen[k] == (0, 0) for k in range(2, FAULT_ROUND))
