"""The algorithms' math, without Flower.

1. Every algorithm against a direct single-process implementation of its update equations
   (ALGORITHMS.md), written out plainly below: same seeds, same numbers to float tolerance,
   for p = 1 and p = 0.5, PP1 and PP2. The implementation under test moves every vector as
   encoded bytes and catches idle clients up from its broadcast log or a snapshot; the
   reference simply lets every client read the server's variables.
2. The papers' claims on heterogeneous least squares with full gradients (N = 20, s = 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from compression import decode, parse_compressor
from strategies.encoding import derive_seed
from strategies.local import run_local
from strategies.mcm import PreservedServer
from strategies.registry import PRESETS, get_preset
from strategies.settings import resolve_settings
from tasks.synthetic import make_lsq_task

MEMORY_ALGOS = ["diana", "artemis", "dore", "mcm", "rand-mcm"]
NO_MEMORY_ALGOS = ["sgd", "qsgd", "biqsgd", "doublesqueeze", "ef-sgd", "signsgd-mv", "signum-mv"]


def _q(spec: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """C(x) as the receiver decodes it from the wire."""
    return decode(parse_compressor(spec).compress(x, seed=seed).to_bytes()).dense()


def reference_run(
    name: str,
    grad,  # (i, w) -> g
    w0: torch.Tensor,
    n_clients: int,
    rounds: int,
    p: float,
    pp: str,
    lr: float,
    seed: int,
    **extra: Any,
) -> list[torch.Tensor]:
    """The update equations of ALGORITHMS.md, plainly. Returns the evaluated model per round.
    `extra` goes to `resolve_settings` (a server optimiser, signum's β)."""
    s = resolve_settings(
        get_preset(name),
        w0.numel(),
        server_lr=lr,
        participation=p,
        pp_variant=pp,
        seed=seed,
        **extra,
    )
    d = w0.numel()
    a_up, a_dn = s.up_memory_rate, s.down_memory_rate
    kind = s.preset.model
    zeros = torch.zeros(d)
    w = w0.clone()  # central model
    # downlink memory: MCM's starts at the model (H_0 = w_0), the Artemis family's (gradient
    # space, when on) at 0
    H = w0.clone() if kind == "preserved" else zeros.clone()
    w_hat = w0.clone()  # MCM perturbed model
    e_server = zeros.clone()
    h_server = zeros.clone()  # PP2
    h_server_i = {i: zeros.clone() for i in range(n_clients)}  # PP1
    h = {i: zeros.clone() for i in range(n_clients)}  # clients' uplink memories
    e = {i: zeros.clone() for i in range(n_clients)}
    H_i = {i: w0.clone() for i in range(n_clients)}  # Rand-MCM: H_0^i = w_0
    m = {i: zeros.clone() for i in range(n_clients)}  # signum-mv's client momenta
    opt = s.server_opt  # the server optimiser's state: m_s, v, v̂ (v_0 = v̂_0 = τ²)
    m_s, v, v_max = zeros.clone(), torch.full((d,), opt.eps**2), torch.full((d,), opt.eps**2)
    rng = np.random.default_rng(seed)
    models = []
    for k in range(1, rounds + 1):
        # S_k: Bernoulli(p) per client, redrawn while empty
        while True:
            mask = rng.random(n_clients) < p
            if mask.any():
                break
        S = [i for i in range(n_clients) if mask[i]]
        pN = p * n_clients
        deltas = {}
        for i in S:
            if kind == "preserved":
                x = w_hat
            elif kind == "preserved-rand":
                omega_i = _q(s.downlink, w - H_i[i], derive_seed(seed, k, i, 2))
                x = H_i[i] + omega_i
                H_i[i] = H_i[i] + a_dn * omega_i
            else:
                x = w
            g = grad(i, x)
            if s.preset.client_momentum:  # m_i ← β m_i + (1 − β) g_i ; send sign(m_i)
                m[i] = s.client_momentum * m[i] + (1 - s.client_momentum) * g
                g = m[i]
            delta = g - (h[i] if s.up_memory else 0) + (s.up_ef_rate * e[i] if s.up_ef else 0)
            delta_hat = _q(s.uplink, delta, derive_seed(seed, k, i, 1)) * s.up_scale
            if s.up_ef:
                e[i] = delta - delta_hat
            if s.up_memory:
                h[i] = h[i] + a_up * delta_hat
            deltas[i] = delta_hat
        # aggregation
        if kind == "sign-vote":
            total = sum((torch.sign(v) for v in deltas.values()), zeros)
            g_hat = torch.where(total >= 0, 1.0, -1.0)
        elif s.up_memory and pp == "pp1":
            g_hat = sum((deltas[i] + h_server_i[i] for i in S), zeros) / pN
            for i in S:
                h_server_i[i] = h_server_i[i] + a_up * deltas[i]
        elif s.up_memory:
            mean = sum(deltas.values(), zeros) / pN
            g_hat = mean + h_server
            h_server = h_server + a_up * mean
        else:
            g_hat = sum(deltas.values(), zeros) / pN
        # server optimiser: u replaces ĝ in the model's step (and in what is broadcast)
        if opt.name == "momentum":
            m_s = opt.momentum * m_s + g_hat
            g_hat = m_s
        elif opt.name in ("adam", "amsgrad", "yogi"):
            m_s = opt.beta1 * m_s + (1 - opt.beta1) * g_hat
            if opt.name == "yogi":
                v = v - (1 - opt.beta2) * g_hat**2 * torch.sign(v - g_hat**2)
            else:
                v = opt.beta2 * v + (1 - opt.beta2) * g_hat**2
            v_max = torch.maximum(v_max, v)
            g_hat = m_s / (torch.sqrt(v_max if opt.name == "amsgrad" else v) + opt.eps)
        # downlink
        if kind in ("exact", "preserved", "preserved-rand"):
            w = w - lr * g_hat
            if kind == "preserved":
                omega = _q(s.downlink, w - H, derive_seed(seed, k, 0, 2))
                w_hat = H + omega
                H = H + a_dn * omega
        elif kind == "sign-vote":
            vote = _q(s.downlink, g_hat, derive_seed(seed, k, 0, 2))
            w = w - lr * vote
        elif s.preset.model_residual:  # Dore: w is x̂, e_server is e (model space)
            x_next = w - lr * g_hat
            q = x_next - w + (s.down_ef_rate * e_server if s.down_ef else 0)
            q_hat = _q(s.downlink, q, derive_seed(seed, k, 0, 2)) * s.down_scale
            if s.down_ef:
                e_server = q - q_hat
            w = w + s.model_step * q_hat
        else:  # degraded
            to_send = (
                g_hat
                - (H if s.down_memory else 0)
                + (s.down_ef_rate * e_server if s.down_ef else 0)
            )
            omega = _q(s.downlink, to_send, derive_seed(seed, k, 0, 2)) * s.down_scale
            if s.down_ef:
                e_server = to_send - omega
            w = w - lr * (omega + (H if s.down_memory else 0))
            if s.down_memory:
                H = H + a_dn * omega
        models.append(w.clone())
    return models


def _small_problem(seed: int = 3):
    task = make_lsq_task(num_partitions=6, dim=10, samples_per_client=30, seed=seed)
    A = [task.A(i).float() for i in range(6)]
    b = [task.b(i).float() for i in range(6)]

    def grad(i: int, w: torch.Tensor) -> torch.Tensor:
        return A[i].T @ (A[i] @ w - b[i]) / A[i].shape[0]

    return task, grad


CASES = [(a, p, pp) for a in MEMORY_ALGOS for p in (1.0, 0.5) for pp in ("pp1", "pp2")] + [
    (a, p, "pp2") for a in NO_MEMORY_ALGOS for p in (1.0, 0.5)
]


def test_every_preset_is_covered() -> None:
    assert sorted(MEMORY_ALGOS + NO_MEMORY_ALGOS) == sorted(PRESETS)


@pytest.mark.parametrize(("name", "p", "pp"), CASES)
def test_matches_plain_equations(name: str, p: float, pp: str) -> None:
    _, grad = _small_problem()
    w0 = torch.full((10,), 0.5)
    lr = 0.01 if name == "signsgd-mv" else 0.1
    rounds = 8
    expected = reference_run(name, grad, w0, 6, rounds, p, pp, lr, seed=11)
    settings = resolve_settings(
        get_preset(name), 10, server_lr=lr, participation=p, pp_variant=pp, seed=11
    )
    seen: list[torch.Tensor] = []
    run = run_local(
        settings,
        w0,
        lambda i, w: (grad(i, w), 0.0),
        6,
        rounds,
        on_round=lambda k, r: seen.append(r.server.evaluation_model().clone()),
    )
    for k, (got, want) in enumerate(zip(seen, expected, strict=True), start=1):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (name, k, got, want)
    # the two sides never disagreed, and something did move
    assert sum(h.digest_mismatches + h.resyncs for h in run.history) == 0
    assert sum(h.digest_checks for h in run.history) == sum(len(s) for s in run.sampled)
    assert not torch.allclose(seen[-1], w0)
    if p < 1 and settings.model in ("degraded", "preserved", "sign-vote"):
        # idle clients were caught up (log replay or snapshot) along the way
        assert sum(h.catchup_messages + h.snapshots for h in run.history) > 0


def test_client_memories_equal_server_memories_pp1() -> None:
    _, grad = _small_problem()
    w0 = torch.zeros(10)
    s = resolve_settings(get_preset("artemis"), 10, participation=0.5, pp_variant="pp1", seed=2)
    run = run_local(s, w0, lambda i, w: (grad(i, w), 0.0), 6, 6)
    for i in range(6):
        server_h = run.server.client_memory(i)
        state = run.pending[i] or run.committed[i]
        assert state.up_memory is not None and server_h is not None
        assert torch.equal(server_h, state.up_memory)


# ----------------------------------------------------------------------------- claims
def _lsq_claims_problem():
    task = make_lsq_task(num_partitions=20, dim=20, samples_per_client=200, seed=0,
                         heterogeneity=1.0)  # fmt: skip
    A = [task.A(i) for i in range(20)]
    b = [task.b(i) for i in range(20)]

    def grad(i: int, w: torch.Tensor) -> tuple[torch.Tensor, float]:
        w64 = w.to(torch.float64)
        return (A[i].T @ (A[i] @ w64 - b[i]) / A[i].shape[0]).float(), 0.0

    return task, grad


@pytest.fixture(scope="module")
def claims() -> dict[str, float]:
    """Excess loss ratio F(w_K) − F(w*) over F(w_0) − F(w*) after K rounds, per algorithm."""
    task, grad = _lsq_claims_problem()
    _mu, L = task.smoothness()
    omega = parse_compressor("qsgd:s=1,bucket=4096").omega(20)
    # a step size the papers allow: γ <= 1 / (2L(1 + ω/N))
    assert 1 / (2 * L * (1 + omega / 20)) >= 0.2
    w0 = torch.zeros(20)
    start = task.excess_loss(w0)
    out = {}
    for name in ["diana", "artemis", "mcm", "dore", "qsgd", "biqsgd"]:
        s = resolve_settings(get_preset(name), 20, server_lr=0.2, participation=1.0, seed=0)
        assert s.uplink.startswith("qsgd:s=1")
        run = run_local(s, w0, grad, 20, 150)
        out[name] = task.excess_loss(run.server.evaluation_model()) / start
    out["L"] = L
    return out


@pytest.mark.parametrize("name", ["diana", "artemis", "mcm", "dore"])
def test_memory_methods_converge_linearly(claims: dict[str, float], name: str) -> None:
    assert claims[name] <= 1e-6, claims


@pytest.mark.parametrize("name", ["qsgd", "biqsgd"])
def test_memoryless_methods_stall(claims: dict[str, float], name: str) -> None:
    best_memory = max(claims["diana"], claims["artemis"], claims["mcm"])
    assert claims[name] >= 100 * best_memory, claims
    assert claims[name] > 1e-4, claims  # a floor, not slow convergence to 0


def test_rand_mcm_server_and_client_downlink_memories_agree_bit_for_bit() -> None:
    """The server applies H_i ← H_i + α_dwn Ω_i from Ω_i's bytes when i's reply is accepted
    (it keeps no d-vectors per pending reply): after partial participation with lost replies,
    every H_i it holds equals the client's, bit for bit, and no digest ever disagreed."""
    _, grad = _small_problem()
    w0 = torch.full((10,), 0.5)
    s = resolve_settings(get_preset("rand-mcm"), 10, participation=0.5, pp_variant="pp1", seed=5)
    lost = {(3, 0), (4, 1), (6, 4), (9, 2)}  # (round, client), all of them sampled
    run = run_local(
        s, w0, lambda i, w: (grad(i, w), 0.0), 6, 10, lose_reply=lambda k, i: (k, i) in lost
    )
    assert run.faults == {"crash": len(lost)}
    assert sum(h.digest_mismatches + h.resyncs for h in run.history) == 0
    server = run.server
    assert isinstance(server, PreservedServer)
    moved = 0
    for i in range(6):
        last = max((k for k, nodes in enumerate(run.sampled, 1) if i in nodes), default=0)
        # the client's latest state is the server's once its reply was accepted
        state = run.committed[i] if (last, i) in lost else (run.pending[i] or run.committed[i])
        assert state.down_memory is not None
        server_H = server.client_down_memory(i)
        assert torch.equal(server_H, state.down_memory), i
        moved += int(not torch.equal(server_H, w0))
    assert moved >= 4  # the memories did move
    assert all(
        not isinstance(v, torch.Tensor)
        for p in server.pending.values()
        for v in vars(p.commit).values()
    )


@pytest.mark.parametrize("name", ["artemis", "rand-mcm", "mcm", "dore", "signsgd-mv"])
def test_a_server_on_the_compiled_codecs_agrees_with_clients_on_the_torch_code(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server half encodes and decodes with the kernels from 2^14 coordinates on; the
    clients of `run_local` (outside its block) keep the torch code below 2^22. Their digests
    agree in every round, and the run converges as with a server on the torch code, with
    other draws where the codec draws any."""
    import strategies.server_half as server_half

    d = 3 * 2**14
    target = torch.randn(d, generator=torch.Generator().manual_seed(1))

    def gradient(i: int, w: torch.Tensor) -> tuple[torch.Tensor, float]:
        return w - target * (1 + 0.1 * i), 0.0

    def run(kernels_from: int) -> torch.Tensor:
        monkeypatch.setattr(server_half, "LONG_LIVED_MIN_NUMEL", kernels_from)
        lr = 0.05
        s = resolve_settings(get_preset(name), d, server_lr=lr, participation=0.5, seed=3)
        result = run_local(s, torch.zeros(d), gradient, 4, 10)
        assert sum(h.digest_mismatches + h.resyncs for h in result.history) == 0
        assert sum(h.digest_checks for h in result.history) == sum(map(len, result.sampled))
        return result.server.evaluation_model()

    compiled, torch_code = run(2**14), run(1 << 62)
    start = float((target * 1.15).norm())  # from w_0 = 0 to the mean of the optima
    for w in (compiled, torch_code):
        assert float((w - target * 1.15).norm()) < 0.9 * start
    # QSGD's draws differ between the paths; sign and its majority vote draw nothing
    assert torch.equal(compiled, torch_code) == (name == "signsgd-mv")
