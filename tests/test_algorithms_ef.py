"""Error feedback as the papers define it: Dore, DoubleSqueeze, EF-SGD.

1. One or two rounds of each algorithm written out by hand from the paper's equations, against
   the implementation (which moves every vector as encoded bytes), bit for bit.
2. The run-config keys of these algorithms (α = up-memory-rate, β = model-step,
   η / λ = down-ef-rate, up-ef-rate, ef-scale) and their checks.
3. On the least-squares problem of tests/test_algorithms.py (N = 20, d = 20, full gradients,
   QSGD s = 1, γ = 0.2): DoubleSqueeze given QSGD levels off at Bi-QSGD's floor instead of
   drifting upward, as it did with the 1/(ω+1)-scaled messages (`ef-scale=on`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_algorithms import (
    _lsq_claims_problem,  # the claims problem: N = 20, d = 20, full gradients
)

from compression import decode, parse_compressor
from core.runconfig import load_config
from strategies.client_half import ClientState
from strategies.encoding import derive_seed
from strategies.local import LocalRun, run_local
from strategies.registry import ALGORITHMS, get_preset, settings_from_config
from strategies.settings import AlgorithmSettings, resolve_settings

N, D, GAMMA = 3, 12, 0.1
QSGD = "qsgd:s=1,bucket=64"
SIGN = "scaled_sign:bucket=64"


def _c(spec: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """C(x) as the receiver decodes it from the wire."""
    return decode(parse_compressor(spec).compress(x, seed=seed).to_bytes()).dense()


Grad = Callable[[int, torch.Tensor], torch.Tensor]


def _problem() -> tuple[torch.Tensor, Grad]:
    gen = torch.Generator().manual_seed(5)
    A = [torch.randn(D, D, generator=gen) / D**0.5 for _ in range(N)]
    b = [torch.randn(D, generator=gen) for _ in range(N)]

    def grad(i: int, w: torch.Tensor) -> torch.Tensor:
        return A[i].T @ (A[i] @ w - b[i])

    return torch.full((D,), 0.3), grad


def _run(settings: AlgorithmSettings, w0: torch.Tensor, grad: Grad, rounds: int) -> LocalRun:
    return run_local(settings, w0, lambda i, w: (grad(i, w), 0.0), N, rounds)


def _pending(run: LocalRun, i: int) -> ClientState:
    """Client i's state after its last round."""
    state = run.pending[i]
    assert state is not None
    return state


def _residual(run: LocalRun, i: int) -> torch.Tensor:
    """Client i's uplink residual e_i after its last round."""
    residual = _pending(run, i).up_residual
    assert residual is not None
    return residual


def _settings(strategy: str, **config: Any) -> AlgorithmSettings:
    cfg = {"strategy": strategy, "server-lr": GAMMA, "seed": 7, **config}
    return settings_from_config(load_config(cfg, algorithms=ALGORITHMS).as_flat(), D)


# ----------------------------------------------------------------------------- by hand
def test_dore_two_rounds_by_hand() -> None:
    """Algorithm 1 of Liu et al. (arXiv 1910.07561), with β and η away from their defaults."""
    w0, grad = _problem()
    s = _settings("dore", **{"model-step": 0.5, "down-ef-rate": 0.3, "up-memory-rate": 0.2})
    alpha, beta, eta = 0.2, 0.5, 0.3
    assert (s.up_memory_rate, s.model_step, s.down_ef_rate) == (alpha, beta, eta)
    assert s.up_scale == s.down_scale == 1.0
    x_hat = w0.clone()  # x̂, held by every worker and the master
    h_i = [torch.zeros(D) for _ in range(N)]
    h = torch.zeros(D)
    e = torch.zeros(D)
    for k in (1, 2):
        deltas = []
        for i in range(N):  # workers
            g = grad(i, x_hat)
            delta = g - h_i[i]  # gradient residual Δ_i = g_i − h_i
            delta_hat = _c(QSGD, delta, derive_seed(7, k, i, 1))  # Δ̂_i = Q(Δ_i)
            h_i[i] = h_i[i] + alpha * delta_hat  # h_i ← h_i + α Δ̂_i
            deltas.append(delta_hat)
        total = torch.zeros(D)  # master
        for delta_hat in deltas:
            total += delta_hat
        mean = total / N  # Δ̂ = (1/n) Σ Δ̂_i
        g_hat = mean + h  # ĝ = h + Δ̂
        h = h + alpha * mean  # h ← h + α Δ̂
        x_next = x_hat - GAMMA * g_hat  # x_{k+1} = x̂_k − γ ĝ
        q = x_next - x_hat + eta * e  # model residual q = x_{k+1} − x̂_k + η e
        q_hat = _c(QSGD, q, derive_seed(7, k, 0, 2))  # q̂ = Q(q), broadcast
        e = q - q_hat  # e ← q − q̂
        x_hat = x_hat + beta * q_hat  # x̂ ← x̂ + β q̂ (master and workers)
    run = _run(s, w0, grad, 2)
    server: Any = run.server
    assert torch.equal(server.w, x_hat)
    assert torch.equal(server.e_server, e)
    assert torch.equal(server.h_global, h)
    for i in range(N):
        state = run.pending[i]
        assert state is not None and state.up_memory is not None
        assert torch.equal(state.up_memory, h_i[i])
    # the workers' x̂ after round 2's broadcast: round 3's downlink delivers it
    run3 = _run(s, w0, grad, 3)
    for i in range(N):
        model = _pending(run3, i).model
        assert model is not None and torch.equal(model, x_hat)


@pytest.mark.parametrize(
    ("spec", "config", "rate"),
    [
        (SIGN, {}, 1.0),  # the paper's setting: a biased 1-bit compressor, full residual
        (QSGD, {}, 1 / math.sqrt(D)),  # unbiased, ω = √12 > 1: the residual is damped by 1/ω
        (QSGD, {"up-ef-rate": 0.5, "down-ef-rate": 0.25}, None),
    ],
)
def test_doublesqueeze_two_rounds_by_hand(
    spec: str, config: dict[str, Any], rate: float | None
) -> None:
    """Tang et al.: client v_i = g_i + λ δ_i, send C(v_i), δ_i ← v_i − C(v_i); server
    v = (1/n) Σ C(v_i) + λ δ, broadcast C(v), δ ← v − C(v), every model x ← x − γ C(v)."""
    w0, grad = _problem()
    s = _settings("doublesqueeze", uplink=spec, downlink=spec, **config)
    lam_up = s.up_ef_rate if rate is None else rate
    lam_dn = s.down_ef_rate if rate is None else rate
    assert (s.up_ef_rate, s.down_ef_rate) == pytest.approx((lam_up, lam_dn))
    if rate is None:
        assert (lam_up, lam_dn) == (0.5, 0.25)
    x = w0.clone()
    delta_i = [torch.zeros(D) for _ in range(N)]
    delta = torch.zeros(D)
    for k in (1, 2):
        sent = []
        for i in range(N):
            v_i = grad(i, x) + s.up_ef_rate * delta_i[i]
            c_i = _c(spec, v_i, derive_seed(7, k, i, 1))
            delta_i[i] = v_i - c_i
            sent.append(c_i)
        total = torch.zeros(D)
        for c_i in sent:
            total += c_i
        v = total / N + s.down_ef_rate * delta
        c = _c(spec, v, derive_seed(7, k, 0, 2))
        delta = v - c
        x = x - GAMMA * c
    run = _run(s, w0, grad, 2)
    assert torch.equal(run.server.w, x)
    server: Any = run.server
    assert torch.equal(server.e_server, delta)
    for i in range(N):
        assert torch.equal(_residual(run, i), delta_i[i])


def test_ef_sgd_two_rounds_by_hand_and_the_papers_form() -> None:
    """Karimireddy et al.: p_i = γ g_i + e_i, send C(p_i), e_i ← p_i − C(p_i), x ← x − mean C(p_i).
    The implementation keeps the residual in gradient units (e_i/γ): Δ_i = g_i + e_i/γ,
    x ← x − γ mean C(Δ_i), the same for a positively homogeneous C such as scaled sign."""
    w0, grad = _problem()
    s = _settings("ef-sgd")
    assert s.uplink == SIGN and s.up_ef_rate == 1.0 and s.up_scale == 1.0
    x = w0.clone()
    x_paper = w0.clone()
    e = [torch.zeros(D) for _ in range(N)]  # gradient units, as implemented
    e_paper = [torch.zeros(D) for _ in range(N)]  # model units, as in the paper
    for k in (1, 2):
        sent, sent_paper = [], []
        for i in range(N):
            seed = derive_seed(7, k, i, 1)
            delta = grad(i, x) + e[i]
            c = _c(SIGN, delta, seed)
            e[i] = delta - c
            sent.append(c)
            p = GAMMA * grad(i, x_paper) + e_paper[i]
            c_p = _c(SIGN, p, seed)
            e_paper[i] = p - c_p
            sent_paper.append(c_p)
        total = torch.zeros(D)
        for c in sent:
            total += c
        x = x - GAMMA * (total / N)
        x_paper = x_paper - sum(sent_paper, torch.zeros(D)) / N
    run = _run(s, w0, grad, 2)
    assert torch.equal(run.server.w, x)
    assert torch.allclose(x, x_paper, rtol=1e-5, atol=1e-6)
    for i in range(N):
        assert torch.equal(_residual(run, i), e[i])
        assert torch.allclose(GAMMA * e[i], e_paper[i], rtol=1e-4, atol=1e-6)


def test_ef_scale_option_keeps_the_scaled_variant() -> None:
    """`ef-scale=on`: both sides scale an unbiased C's output by 1/(ω+1), EF rates 1."""
    w0, grad = _problem()
    s = _settings("doublesqueeze", uplink=QSGD, downlink=QSGD, **{"ef-scale": "on"})
    omega = parse_compressor(QSGD).omega(D)
    assert s.up_scale == s.down_scale == pytest.approx(1 / (omega + 1))
    assert s.up_ef_rate == s.down_ef_rate == 1.0
    x = w0.clone()
    delta_i = [torch.zeros(D) for _ in range(N)]
    delta = torch.zeros(D)
    for k in (1, 2):
        total = torch.zeros(D)
        for i in range(N):
            v_i = grad(i, x) + delta_i[i]
            c_i = _c(QSGD, v_i, derive_seed(7, k, i, 1)) * s.up_scale
            delta_i[i] = v_i - c_i
            total += c_i
        v = total / N + delta
        c = _c(QSGD, v, derive_seed(7, k, 0, 2)) * s.down_scale
        delta = v - c
        x = x - GAMMA * c
    run = _run(s, w0, grad, 2)
    assert torch.allclose(run.server.w, x, rtol=1e-6, atol=1e-7)
    # dore's default is the paper's (β = 1) with a damped residual, and no scaling
    dore = _settings("dore")
    assert dore.model_step == 1.0 and dore.up_scale == dore.down_scale == 1.0
    assert dore.down_ef_rate == pytest.approx(1 / parse_compressor(QSGD).omega(D))


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"model-step": 0.0}, "model-step"),
        ({"model-step": 1.5}, "model-step"),
        ({"up-ef-rate": 2.0}, "up-ef-rate"),
        ({"down-ef-rate": -0.5}, "down-ef-rate"),
        ({"ef-scale": "maybe"}, "ef-scale"),
    ],
)
def test_bad_ef_keys_are_refused(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config({"strategy": "dore", **config}, algorithms=ALGORITHMS)


def test_settings_refuse_what_the_algorithm_lacks() -> None:
    with pytest.raises(ValueError, match="model-step: only dore"):
        resolve_settings(get_preset("artemis"), D, model_step=0.5)
    with pytest.raises(ValueError, match="down-memory-rate: dore has no downlink memory"):
        resolve_settings(get_preset("dore"), D, down_memory_rate=0.1)
    with pytest.raises(ValueError, match="up-ef-rate"):
        resolve_settings(get_preset("ef-sgd"), D, up_ef_rate=1.5)


# ----------------------------------------------------------------------------- least squares
ROUNDS = 200


def _geomean(curve: list[float], first: int, last: int) -> float:
    """Geometric mean of the excess-loss ratio over rounds first..last (1-based)."""
    window = curve[first - 1 : last]
    return math.exp(sum(math.log(v) for v in window) / len(window))


@pytest.fixture(scope="module")
def lsq_curves() -> dict[str, list[float]]:
    """Excess-loss ratio (F(w_k) − F*)/(F(w_0) − F*) per round, QSGD s = 1 both ways."""
    task, grad = _lsq_claims_problem()
    w0 = torch.zeros(20)
    start = task.excess_loss(w0)
    out: dict[str, list[float]] = {}
    for name in ("biqsgd", "doublesqueeze"):
        s = resolve_settings(
            get_preset(name), 20, uplink=QSGD, downlink=QSGD, server_lr=0.2, seed=0
        )
        curve: list[float] = []

        def record(k: int, run: LocalRun, curve: list[float] = curve) -> None:
            curve.append(task.excess_loss(run.server.evaluation_model()) / start)

        run_local(s, w0, grad, 20, ROUNDS, on_round=record)
        out[name] = curve
        print(name, [f"{_geomean(curve, a + 1, a + 50):.3g}" for a in range(0, ROUNDS, 50)])
    return out


def test_doublesqueeze_with_qsgd_levels_off(lsq_curves: dict[str, list[float]]) -> None:
    ds, bi = lsq_curves["doublesqueeze"], lsq_curves["biqsgd"]
    assert all(math.isfinite(v) for v in ds)
    # no upward drift after round 100: the last 50 rounds are not above rounds 101-150
    assert _geomean(ds, ROUNDS - 49, ROUNDS) <= 2 * _geomean(ds, 101, 150), lsq_curves
    # and its floor is Bi-QSGD's, within a small factor
    assert _geomean(ds, ROUNDS - 49, ROUNDS) <= 3 * _geomean(bi, ROUNDS - 49, ROUNDS)
    # a floor, not convergence: neither method has memory
    assert _geomean(ds, ROUNDS - 49, ROUNDS) > 1e-4
