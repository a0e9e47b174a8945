"""MCM's downlink memory starts at the initial model (H_0 = H_0^i = w_0, MCM paper Alg. 1).

With H_0 = 0 the first perturbed model is ŵ = C(w) and ‖ŵ − w‖ scales with ‖w‖ (≈ √ω‖w‖),
not with the distance the model has moved: a network trained at such models diverges.
QSGD s = 1 gives C(x) entries in {0, ±‖x‖_B}, so ‖C(x)‖ ≤ √d‖x‖ and, deterministically,
‖C(x) − x‖ ≤ (√d + 1)‖x‖: the bounds below cannot flake.
"""

from __future__ import annotations

import math

import pytest
import torch

from strategies.local import LocalRun, run_local
from strategies.registry import get_preset
from strategies.settings import resolve_settings
from tasks.synthetic import make_lsq_task

D = 20
N = 10


def _grad():
    task = make_lsq_task(num_partitions=N, dim=D, samples_per_client=50, seed=1)
    A = [task.A(i).float() for i in range(N)]
    b = [task.b(i).float() for i in range(N)]

    def grad(i: int, w: torch.Tensor) -> tuple[torch.Tensor, float]:
        return A[i].T @ (A[i] @ w - b[i]) / A[i].shape[0], 0.0

    return grad


@pytest.mark.parametrize("name", ["mcm", "rand-mcm"])
@pytest.mark.parametrize("p", [1.0, 0.5])
def test_perturbed_model_error_scales_with_the_move_not_the_model(name: str, p: float) -> None:
    w0 = torch.full((D,), 10.0)  # far from 0: ‖w_0‖ ≈ 44.7
    s = resolve_settings(get_preset(name), D, server_lr=0.01, participation=p, seed=5)
    bound = math.sqrt(D) + 1
    checked = 0
    previous: dict[int, torch.Tensor] = {}

    def on_round(k: int, run: LocalRun) -> None:
        nonlocal checked
        for i in run.sampled[-1]:
            state = run.pending[i]
            assert state is not None and state.model is not None
            # the model client i computed at this round vs the central model it approximates
            w_then = previous.get(k - 1, w0)
            err = float((state.model - w_then).norm())
            moved = float((w_then - w0).norm())
            assert err <= bound * moved + 1e-4, (name, k, i, err, moved)
            checked += 1
        previous[k] = run.server.evaluation_model().clone()

    run = run_local(s, w0, _grad(), N, 6, on_round=on_round)
    assert checked > 0
    assert sum(h.digest_mismatches + h.resyncs for h in run.history) == 0


def test_memories_start_at_w0_on_both_sides() -> None:
    w0 = torch.linspace(-3.0, 5.0, D)
    for name in ("mcm", "rand-mcm"):
        s = resolve_settings(get_preset(name), D, server_lr=0.01, participation=0.5, seed=2)
        run = run_local(s, w0, _grad(), N, 1)
        sampled = set(run.sampled[0])
        for i in range(N):
            client_H = (run.pending[i] or run.committed[i]).down_memory
            assert client_H is not None
            if i not in sampled:
                assert torch.equal(client_H, w0), (name, i)
            if name == "rand-mcm":
                # the server's H_i: w_0 for idle clients, the client's own for the others
                assert torch.allclose(run.server.client_down_memory(i), client_H), (name, i)  # type: ignore[attr-defined]
