"""Server optimisers (`strategies.server_opt`) and Signum with majority vote, without Flower.

1. Each optimiser's transform against its equations written out below (Reddi et al. 2021,
   Algorithm 2; AMSGrad; heavy ball), pure and O(d).
2. Every algorithm with a server optimiser against the plain update equations of
   `tests/test_algorithms.reference_run` (p = 1 and p = 0.5): the broadcast carries the
   optimiser's step, the clients' digests match the server's every round.
3. Refused combinations name their keys; checkpoints cover the optimiser's state and older
   checkpoints still restore.
4. signum-mv: 1 bit per coordinate of its momentum on the uplink (measured), the momentum
   in the client's context.state.
5. (slow) On the least-squares claims problem, every memory algorithm still converges with
   server momentum or AMSGrad.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from test_algorithms import _small_problem, reference_run
from test_checkpoint import Federation, _same

from strategies import checkpoint, server_opt
from strategies.client_half import client_uplink, initial_client_state
from strategies.local import run_local
from strategies.registry import PRESETS, get_preset, make_server, settings_from_config
from strategies.server_opt import ServerOptSettings, ServerOptState
from strategies.settings import resolve_settings

D = 10


def _grads(n: int, d: int = 7, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) * (1 + k % 3) for k in range(n)]


# ----------------------------------------------------------------------------- transforms
def test_momentum_is_heavy_ball() -> None:
    opt = server_opt.momentum(0.9)
    state = opt.init(7)
    m = torch.zeros(7)
    for g in _grads(6):
        u, state = opt.update(g, state)
        m = 0.9 * m + g  # m ← β m + ĝ ; u = m
        assert torch.allclose(u, m, atol=1e-6)


@pytest.mark.parametrize("name", ["adam", "amsgrad", "yogi"])
def test_adaptive_steps_follow_the_equations(name: str) -> None:
    b1, b2, tau = 0.9, 0.99, 1e-3
    opt = server_opt.from_settings(ServerOptSettings(name=name))  # type: ignore[arg-type]
    state = opt.init(7)
    m, v, v_hat = torch.zeros(7), torch.full((7,), tau**2), torch.full((7,), tau**2)
    for k, g in enumerate(_grads(12)):
        g = g * (0.1 if k > 6 else 1.0)  # shrinking updates: AMSGrad's v̂ keeps its max
        before = [t.clone() for t in state if t is not None]
        u, new = opt.update(g, state)
        after = [t for t in state if t is not None]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # pure
        state = new
        m = b1 * m + (1 - b1) * g
        if name == "yogi":
            v = v - (1 - b2) * g**2 * torch.sign(v - g**2)
        else:
            v = b2 * v + (1 - b2) * g**2
        v_hat = torch.maximum(v_hat, v)
        want = m / ((v_hat if name == "amsgrad" else v).sqrt() + tau)
        assert torch.allclose(u, want, rtol=1e-5, atol=1e-7), (name, k)
    if name == "amsgrad":
        assert state.nu is not None and state.nu_max is not None
        assert bool((state.nu_max > state.nu).any())  # v̂ held an earlier, larger v


def test_sgd_returns_the_aggregate_itself_and_state_is_o_of_d() -> None:
    g = torch.randn(5)
    u, state = server_opt.sgd().update(g, server_opt.sgd().init(5))
    assert u is g and state == ServerOptState()
    sizes = {}
    for name in server_opt.SERVER_OPTS:
        st = server_opt.from_settings(ServerOptSettings(name=name)).init(1000)
        sizes[name] = sum(t.numel() for t in st if t is not None)
    assert sizes == {"sgd": 0, "momentum": 1000, "adam": 2000, "amsgrad": 3000, "yogi": 2000}


# ----------------------------------------------------------------------------- algorithms
def _opt_cases() -> list[tuple[str, str, float]]:
    cases = []
    for name in sorted(PRESETS):
        for opt in ("momentum", "amsgrad"):
            for p in (1.0, 0.5):
                cases.append((name, opt, p))
    cases += [(name, opt, 0.5) for name in ("artemis", "mcm") for opt in ("adam", "yogi")]
    return cases


@pytest.mark.parametrize(("name", "opt", "p"), _opt_cases())
def test_server_optimiser_matches_plain_equations(name: str, opt: str, p: float) -> None:
    _, grad = _small_problem()
    w0 = torch.full((D,), 0.5)
    sign_vote = get_preset(name).model == "sign-vote"
    lr = 0.01 if sign_vote or opt != "momentum" else 0.05
    extra: dict[str, Any] = {"server_opt": ServerOptSettings(name=opt)}  # type: ignore[arg-type]
    if sign_vote and opt != "momentum":
        extra["downlink"] = "identity"  # a 1-bit broadcast of an adaptive step is refused
    rounds = 8
    expected = reference_run(name, grad, w0, 6, rounds, p, "pp2", lr, seed=11, **extra)
    settings = resolve_settings(
        get_preset(name), D, server_lr=lr, participation=p, pp_variant="pp2", seed=11, **extra
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
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (name, opt, k, got, want)
    # every client that replied held the server's model bit for bit (exact digest)
    assert sum(h.digest_mismatches + h.resyncs for h in run.history) == 0
    assert sum(h.digest_checks for h in run.history) == sum(len(s) for s in run.sampled)
    assert run.server.opt_state.mu is not None and bool(run.server.opt_state.mu.abs().sum() > 0)


def test_momentum_zero_moves_every_model_exactly_as_sgd() -> None:
    """u = 0·m + ĝ = ĝ bit for bit: the step reaches each family's model (and broadcast)
    once per round, no more, no less."""
    _, grad = _small_problem()
    w0 = torch.full((D,), 0.5)
    for name in ("artemis", "mcm", "rand-mcm", "signsgd-mv", "dore", "diana"):
        models = []
        for opt in (ServerOptSettings(), ServerOptSettings(name="momentum", momentum=0.0)):
            s = resolve_settings(get_preset(name), D, participation=0.5, seed=3, server_opt=opt)
            run = run_local(s, w0, lambda i, w: (grad(i, w), 0.0), 6, 5)
            models.append(run.server.evaluation_model())
        assert torch.equal(models[0], models[1]), name
        assert not torch.equal(models[0], w0)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"server-opt": "nadam"}, "server-opt must be one of"),
        ({"server-momentum": 0.5}, "server-momentum: server-opt='sgd' does not use it"),
        ({"server-opt": "momentum", "server-eps": 1e-6}, "server-eps: server-opt='momentum'"),
        ({"server-opt": "momentum", "server-momentum": 1.0}, "server-momentum must be in"),
        ({"server-opt": "adam", "server-eps": 0.0}, "server-eps must be > 0"),
        ({"server-opt": "amsgrad", "server-beta1": 0.999}, "server-beta1=0.999 and server-beta2"),
        ({"strategy": "signsgd-mv", "server-opt": "adam"}, "downlink 'sign'"),
        ({"strategy": "signum-mv", "server-opt": "yogi"}, "server-opt='momentum'"),
        ({"strategy": "artemis", "client-momentum": 0.5}, "client-momentum: only signum-mv"),
        ({"strategy": "signum-mv", "client-momentum": 1.0}, "client-momentum must be"),
    ],
)
def test_meaningless_combinations_are_refused_naming_the_keys(
    config: dict[str, Any], match: str
) -> None:
    from server.config import check_run

    with pytest.raises(ValueError, match=re.escape(match)):
        check_run({"task-options": "dim=8", **config})


def test_flwr_fedavg_takes_no_server_optimiser() -> None:
    from core.runconfig import load_config
    from strategies.registry import ALGORITHMS

    with pytest.raises(ValueError, match="server-opt: flwr-fedavg"):
        load_config({"strategy": "flwr-fedavg", "server-opt": "adam"}, algorithms=ALGORITHMS)
    config = load_config({"strategy": "sgd", "server-opt": "adam"}, algorithms=ALGORITHMS)
    assert config["server-opt"] == "adam"


def test_sign_vote_with_an_adaptive_step_and_a_magnitude_downlink_is_accepted() -> None:
    s = settings_from_config(
        {"strategy": "signsgd-mv", "server-opt": "amsgrad", "downlink": "identity"}, D
    )
    assert s.server_opt.name == "amsgrad" and s.downlink == "identity"


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    ("name", "opt"), [("artemis", "amsgrad"), ("mcm", "yogi"), ("diana", "momentum")]
)
def test_optimiser_state_is_checkpointed_and_continues_bit_for_bit(
    name: str, opt: str, tmp_path
) -> None:
    settings = settings_from_config({"strategy": name, "participation": 0.5,
                                     "server-opt": opt, "server-lr": 0.02}, 16)  # fmt: skip
    w0 = torch.randn(16, generator=torch.Generator().manual_seed(2))
    server = make_server(settings, w0, expected_clients=6)
    clients = Federation(settings, w0)
    rng = np.random.default_rng(settings.seed)
    for k in range(1, 4):
        clients.round(server, rng, k)
    path = tmp_path / "c.ckpt"
    checkpoint.save(checkpoint.capture(server), path)
    restored = make_server(settings, w0, expected_clients=6)
    checkpoint.restore(restored, checkpoint.load(path))
    assert type(restored.opt_state) is ServerOptState
    assert _same(list(restored.opt_state), list(server.opt_state))
    a, b = clients.copy(), clients
    for k in (4, 5):
        assert _same(
            a.round(restored, np.random.default_rng(k), k),
            b.round(server, np.random.default_rng(k), k),
        )
    # a checkpoint of other optimiser settings does not restore
    other = make_server(
        settings_from_config({"strategy": name, "participation": 0.5, "server-lr": 0.02}, 16),
        w0,
        expected_clients=6,
    )
    with pytest.raises(checkpoint.CheckpointError, match="other algorithm settings"):
        checkpoint.restore(other, checkpoint.load(path))


def test_format_1_checkpoint_of_a_plain_run_still_restores(tmp_path) -> None:
    """Written before server optimisers: format 1, no `opt_state`, settings without the
    optimiser's fields."""
    settings = settings_from_config({"strategy": "artemis", "participation": 0.5}, 16)
    w0 = torch.randn(16, generator=torch.Generator().manual_seed(2))
    server = make_server(settings, w0, expected_clients=6)
    clients = Federation(settings, w0)
    rng = np.random.default_rng(settings.seed)
    for k in range(1, 3):
        clients.round(server, rng, k)
    state = checkpoint.capture(server)
    state["format"] = 1
    del state["attributes"]["opt_state"]
    assert "server_opt" not in state["settings"] and "client_momentum" not in state["settings"]
    checkpoint.save(state, tmp_path / "old.ckpt")
    restored = make_server(settings, w0, expected_clients=6)
    checkpoint.restore(restored, checkpoint.load(tmp_path / "old.ckpt"))
    a, b = clients.copy(), clients
    assert _same(
        a.round(restored, np.random.default_rng(3), 3), b.round(server, np.random.default_rng(3), 3)
    )


# ----------------------------------------------------------------------------- signum-mv
def test_signum_sends_one_bit_per_coordinate_of_its_momentum() -> None:
    d = 4096
    s = resolve_settings(get_preset("signum-mv"), d)
    assert s.client_momentum == 0.9
    state = initial_client_state(torch.zeros(d), s)
    assert state.momentum is not None
    g1, g2 = _grads(2, d)
    _, state = client_uplink(s, state, g1, seed=1)
    wire2, state = client_uplink(s, state, g2, seed=2)
    m = 0.9 * (0.1 * g1) + 0.1 * g2
    assert state.momentum is not None and torch.allclose(state.momentum, m, atol=1e-6)
    from compression import decode

    assert torch.equal(decode(wire2.payload).dense().reshape(-1), torch.where(m >= 0, 1.0, -1.0))
    assert d / 8 <= wire2.nbytes <= d / 8 + 64  # measured: 1 bit per coordinate + header
    # signsgd-mv keeps no momentum
    assert initial_client_state(torch.zeros(d), resolve_settings(get_preset("signsgd-mv"), d)) \
        .momentum is None  # fmt: skip


def test_signum_momentum_lives_in_the_context_state() -> None:
    from client.app import _load_state, _save_state

    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    s = resolve_settings(get_preset("signum-mv"), D)
    state = initial_client_state(torch.zeros(D), s)
    _, state = client_uplink(s, state, torch.arange(D, dtype=torch.float32), seed=1)
    _save_state(context, "k.pending", state)
    back = _load_state(context, "k.pending", torch.device("cpu"))
    assert back is not None and back.momentum is not None and state.momentum is not None
    assert torch.equal(back.momentum, state.momentum)


def test_signum_differs_from_signsgd_and_learns() -> None:
    task, grad = _small_problem()
    w0 = torch.full((D,), 0.5)
    out = {}
    for name in ("signsgd-mv", "signum-mv"):
        s = resolve_settings(get_preset(name), D, server_lr=0.02, seed=1)
        run = run_local(s, w0, lambda i, w: (grad(i, w), 0.0), 6, 40)
        out[name] = run.server.evaluation_model()
        assert sum(h.digest_mismatches for h in run.history) == 0
        # measured: 0.48 (signsgd-mv) and 0.46 (signum-mv) of the initial excess loss
        assert task.excess_loss(out[name]) < 0.6 * task.excess_loss(w0), name
    assert not torch.equal(out["signsgd-mv"], out["signum-mv"])


# ----------------------------------------------------------------------------- claims
#: (server-opt, γ, rounds): heavy ball with β = 0.9 at γ = 0.02 moves like the claims'
#: γ = 0.2 (γ/(1 − β)); AMSGrad's per-coordinate step is γ/(√v̂ + τ). Measured excess-loss
#: ratios after 250 rounds: 5.5e-9 (artemis, momentum), 1.1e-7 (mcm, momentum), 1.2e-8
#: (artemis, amsgrad); about 1e-5 after 150.
CLAIM_OPTS = [("momentum", 0.02, 250), ("amsgrad", 0.05, 250)]


@pytest.fixture(scope="module")
def opt_claims() -> dict[tuple[str, str], float]:
    """Excess loss ratio F(w_K) − F(w*) over F(w_0) − F(w*) per (algorithm, optimiser), on
    `tests/test_algorithms`' heterogeneous least squares (N = 20, d = 20, QSGD s = 1)."""
    from test_algorithms import _lsq_claims_problem

    task, grad = _lsq_claims_problem()
    w0 = torch.zeros(20)
    start = task.excess_loss(w0)
    out = {}
    for opt, lr, rounds in CLAIM_OPTS:
        for name in ("diana", "artemis", "dore", "mcm", "rand-mcm"):
            s = resolve_settings(get_preset(name), 20, server_lr=lr, seed=0,
                                 server_opt=ServerOptSettings(name=opt))  # type: ignore[arg-type]  # fmt: skip
            run = run_local(s, w0, grad, 20, rounds)
            assert sum(h.digest_mismatches for h in run.history) == 0
            out[(name, opt)] = task.excess_loss(run.server.evaluation_model()) / start
    return out


@pytest.mark.slow
@pytest.mark.parametrize("opt", [o for o, _, _ in CLAIM_OPTS])
@pytest.mark.parametrize("name", ["diana", "artemis", "dore", "mcm", "rand-mcm"])
def test_memory_methods_still_converge_with_a_server_optimiser(
    opt_claims: dict[tuple[str, str], float], name: str, opt: str
) -> None:
    assert opt_claims[(name, opt)] <= 1e-6, opt_claims
