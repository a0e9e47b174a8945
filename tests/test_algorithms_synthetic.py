"""The synthetic convex tasks: optima, heterogeneity, the Task interface."""

from __future__ import annotations

import pytest
import torch

from client.training import flatten, load_flat, local_update
from tasks.base import load_task
from tasks.synthetic import (
    LeastSquaresTask,
    LogisticRegressionTask,
    make_logreg_task,
    make_lsq_task,
)


@pytest.mark.parametrize("factory", [make_lsq_task, make_logreg_task])
def test_global_optimum_is_stationary(factory) -> None:
    task = factory(num_partitions=6, dim=8, samples_per_client=50, seed=2)
    w_star = task.global_optimum()
    grad = sum(task.client_gradient(i, w_star) for i in range(6)) / 6
    assert float(grad.norm()) < 1e-8
    assert task.excess_loss(w_star) == pytest.approx(0.0, abs=1e-12)
    assert task.excess_loss(torch.zeros(8)) > 0


def test_heterogeneity_controls_client_optima() -> None:
    same = make_lsq_task(num_partitions=4, dim=6, heterogeneity=0.0, noise=0.0, seed=1)
    apart = make_lsq_task(num_partitions=4, dim=6, heterogeneity=2.0, noise=0.0, seed=1)
    # with no heterogeneity and no noise every client's gradient vanishes at the optimum
    w = same.global_optimum()
    assert all(float(same.client_gradient(i, w).norm()) < 1e-8 for i in range(4))
    w = apart.global_optimum()
    assert min(float(apart.client_gradient(i, w).norm()) for i in range(4)) > 0.1


def test_test_set_does_not_depend_on_the_number_of_clients() -> None:
    a = make_lsq_task(num_partitions=3, seed=5).load_test()
    b = make_lsq_task(num_partitions=20, seed=5).load_test()
    assert torch.equal(a[:][0], b[:][0]) and torch.equal(a[:][1], b[:][1])
    # and client i's data does not depend on it either
    assert torch.equal(make_lsq_task(num_partitions=3).A(1), make_lsq_task(num_partitions=9).A(1))


def test_full_batch_update_is_the_gradient() -> None:
    task = make_lsq_task(num_partitions=3, dim=5, seed=0)
    model = task.make_model()
    w = torch.linspace(-1, 1, 5)
    g, loss, n = local_update(
        task, model, task.load_partition(1), w, 0.1, 1, 7, torch.device("cpu"), 0
    )
    assert n == task.samples_per_client
    assert torch.allclose(g, task.client_gradient(1, w).float(), atol=1e-5)
    assert loss == pytest.approx(float(task.client_loss(1, w)), rel=1e-5)
    assert torch.equal(w, torch.linspace(-1, 1, 5))  # the caller's vector is untouched
    load_flat(model, w)
    assert torch.equal(flatten(model), w)


def test_registered_names_and_evaluation() -> None:
    lsq = load_task("synthetic-lsq", num_partitions=4, seed=0, data_dir="/nowhere")
    logreg = load_task("synthetic-logreg", num_partitions=4, seed=0, partitioning="iid")
    assert isinstance(lsq, LeastSquaresTask) and isinstance(logreg, LogisticRegressionTask)
    model = logreg.make_model()
    load_flat(model, logreg.global_optimum().float())
    metrics = logreg.evaluate(model, logreg.load_test(), torch.device("cpu"))
    assert metrics["accuracy"] > 0.8
    assert set(lsq.evaluate(lsq.make_model(), lsq.load_test(), torch.device("cpu"))) == {"loss"}


@pytest.mark.parametrize(
    "options",
    [{"dim": 0}, {"samples_per_client": 0}, {"heterogeneity": -1.0}, {"num_partitions": 0}],
)
def test_bad_options_are_refused(options) -> None:
    with pytest.raises(ValueError):
        make_lsq_task(**options)
    with pytest.raises(ValueError, match="l2"):
        make_logreg_task(l2=-1.0)


def test_sgd_with_local_steps_is_fedavg() -> None:
    """K local steps, γ = η, p = 1: w ← w − γ (1/N) Σ (w − w_end,i)/η = (1/N) Σ w_end,i."""
    from strategies.local import run_local
    from strategies.registry import get_preset
    from strategies.settings import resolve_settings

    task = make_logreg_task(num_partitions=4, dim=6, samples_per_client=40, seed=3)
    task.full_batch = False  # mini-batches of 8, so K = 3 steps see different data
    model = task.make_model()
    lr, steps, cpu = 0.5, 3, torch.device("cpu")
    data = [task.load_partition(i) for i in range(4)]

    def update(i: int, w: torch.Tensor) -> tuple[torch.Tensor, float]:
        g, loss, _ = local_update(task, model, data[i], w, lr, steps, 8, cpu, seed=i)
        return g, loss

    settings = resolve_settings(get_preset("sgd"), 6, server_lr=lr, participation=1.0)
    w = torch.zeros(6)
    expected = []
    for _ in range(3):
        ends = []
        for i in range(4):
            local = task.make_model()
            load_flat(local, w)
            optimizer = torch.optim.SGD(local.parameters(), lr=lr)
            gen = torch.Generator().manual_seed(i)
            batches = iter(torch.utils.data.DataLoader(data[i], batch_size=8, shuffle=True,
                                                       generator=gen))  # fmt: skip
            for _ in range(steps):
                x, y = next(batches)
                optimizer.zero_grad()
                task.loss(local(x), y).backward()
                optimizer.step()
            ends.append(flatten(local))
        w = torch.stack(ends).mean(dim=0)
        expected.append(w)
    got: list[torch.Tensor] = []
    run_local(settings, torch.zeros(6), update, 4, 3,
              on_round=lambda k, r: got.append(r.server.evaluation_model().clone()))  # fmt: skip
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a, b)
