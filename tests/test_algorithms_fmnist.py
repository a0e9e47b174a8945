"""The presets learn on Fashion-MNIST (slow): the rounds-benchmark workload, in process.

20 clients (Dirichlet α = 0.5), p = 0.5, 5 rounds of K = 10 local steps at η = γ = 0.05,
accuracy of the evaluated model (MCM: the preserved central model) on 2,000 test images.
Before MCM's memory started at w_0 and the presets' QSGD buckets shrank from 4096 (ω = 64)
to 64 (ω = 8), artemis ended at 0.18 and mcm diverged while sgd reached 0.58.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from client.training import flatten, load_flat, local_update
from strategies.local import run_local
from strategies.registry import settings_from_config
from tasks import load_task
from tasks.fashion_mnist import CACHE_DIR_ENV, data_available

pytestmark = [
    pytest.mark.slow,
    # five models of 5 rounds each: ~5 min on a quiet machine, 15+ min on a loaded 2-core one
    # (the suite's 900 s limit cut the fixture off there); the limit only catches hangs
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        not data_available(),
        reason="Fashion-MNIST IDX files missing: apt-get install dataset-fashion-mnist",
    ),
]

N, ROUNDS, K, LR = 20, 5, 10, 0.05
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def accuracies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, float]]:
    cache: Path = tmp_path_factory.mktemp("fmnist-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_DIR_ENV, str(cache))
        torch.manual_seed(0)
        task = load_task("fashion-mnist", num_partitions=N, seed=0)
        w0 = flatten(task.make_model()).clone()
        parts = [task.load_partition(i) for i in range(N)]
        test = Subset(task.load_test(), range(2000))
        out: dict[str, float] = {}
        for name in ("sgd", "artemis", "mcm", "rand-mcm", "dore"):
            calls: dict[int, int] = {}

            def grad(
                i: int, w: torch.Tensor, calls: dict[int, int] = calls
            ) -> tuple[torch.Tensor, float]:
                calls[i] = calls.get(i, 0) + 1
                g, loss, _ = local_update(
                    task, task.make_model(), parts[i], w, LR, K, 32, CPU, seed=1000 * i + calls[i]
                )
                return g, loss

            cfg = {"strategy": name, "participation": 0.5, "client-lr": LR, "seed": 0}
            settings = settings_from_config(cfg, w0.numel())
            run = run_local(settings, w0, grad, N, ROUNDS)
            model = task.make_model()
            load_flat(model, run.server.evaluation_model())
            out[name] = task.evaluate(model, test, CPU)["accuracy"]
            print(f"{name}: accuracy {out[name]:.3f} after {ROUNDS} rounds")
        yield out


@pytest.mark.parametrize("name", ["artemis", "mcm", "rand-mcm"])
def test_bidirectional_presets_learn_like_sgd(accuracies: dict[str, float], name: str) -> None:
    assert accuracies["sgd"] >= 0.45, accuracies  # the baseline itself learned
    assert accuracies[name] >= accuracies["sgd"] - 0.12, accuracies


def test_dore_learns_like_artemis(accuracies: dict[str, float]) -> None:
    """Dore with the paper's β = 1 and a damped residual (η = 1/ω): close to artemis.
    With every broadcast scaled by 1/(ω+1) (now `ef-scale=on`) it reached 0.20 against 0.54."""
    assert accuracies["dore"] >= accuracies["artemis"] - 0.08, accuracies
