"""A user's own task (examples/my_task.py) is found by `load_task` and behaves as a Task.

That a real simulation runs it is checked end to end in tests/test_simulate.py
(`test_simulate_runs_two_strategies_with_a_users_task`).
"""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path
from typing import cast

import pytest
import torch
from torch.utils.data import DataLoader

from tasks import Task, load_task

ROOT = Path(__file__).resolve().parents[1]
SPEC = "examples.my_task:make_task"


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # the module sits in the app directory, as a user's module would
    monkeypatch.syspath_prepend(str(ROOT))


def test_load_task_finds_the_users_factory() -> None:
    task = load_task(SPEC, num_partitions=5, seed=3, partitioning="dirichlet", alpha=0.5)
    assert isinstance(task, Task)
    assert task.name == "my-blobs" and task.num_partitions == 5
    data = task.load_partition(4)
    assert len(cast(Sized, data)) == 128
    x, y = data[0]
    assert x.shape == (8,) and 0 <= int(y) < 3
    assert task.make_model()(torch.zeros(2, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="out of range"):
        task.load_partition(5)


def test_users_task_is_deterministic_and_non_iid() -> None:
    a = load_task(SPEC, num_partitions=6, seed=1)
    b = load_task(SPEC, num_partitions=6, seed=1)
    c = load_task(SPEC, num_partitions=6, seed=2, skew=0.1)
    xa, ya = a.load_partition(2)[:]
    xb, yb = b.load_partition(2)[:]
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for p, q in zip(a.make_model().parameters(), b.make_model().parameters(), strict=True):
        assert torch.equal(p, q)
    # strong skew: most clients' data is dominated by one class
    shares = [
        torch.bincount(c.load_partition(i)[:][1], minlength=3).max().item() / 128 for i in range(6)
    ]
    assert sum(s > 0.7 for s in shares) >= 4, shares


def test_users_task_learns() -> None:
    task = load_task(SPEC, num_partitions=2, seed=0, skew=50.0, samples_per_client=512)
    model = task.make_model()
    before = task.evaluate(model, task.load_test(), torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    for _ in range(5):
        for x, y in DataLoader(task.load_partition(0), batch_size=32, shuffle=True):
            opt.zero_grad()
            task.loss(model(x), y).backward()
            opt.step()
    after = task.evaluate(model, task.load_test(), torch.device("cpu"))
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.9, after


def test_a_bad_task_spec_is_reported() -> None:
    with pytest.raises(ValueError, match=r"cannot import module 'examples\.nope'"):
        load_task("examples.nope:make_task")
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        load_task("examples.my_task:missing")
    with pytest.raises(ValueError, match="skew must be > 0"):
        load_task(SPEC, skew=0.0)
