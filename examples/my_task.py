"""A user's own task, named in the run config as ``task = "examples.my_task:make_task"``.

Copy this file into your own package and change the data and the model: fedsqueeze needs a
factory ``make_task(**options) -> Task`` that the ServerApp and the ClientApp can import.
Modules inside the app directory ship with the app (``flwr run .`` packs every ``*.py``);
a module installed in the environment works as well.

The problem here is small on purpose: three Gaussian blobs in R^8, x | y=k ~ N(μ_k, I), with
class means μ_k ~ N(0, 4 I) drawn from the seed. Client i sees the classes in proportions
π_i ~ Dir(skew · 1_3), so the clients' data are non-i.i.d.; the model is a two-layer
perceptron trained with the mean cross-entropy −(1/n) Σ_j log softmax(f(x_j))_{y_j}.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tasks.base import Task

NUM_FEATURES = 8
NUM_CLASSES = 3


class BlobsTask(Task):
    """Three Gaussian blobs, label-skewed across clients, classified by a small MLP."""

    name = "my-blobs"
    full_batch = False
    classification = True

    def __init__(
        self,
        num_partitions: int = 20,
        seed: int = 0,
        samples_per_client: int = 128,
        skew: float = 0.5,
        test_samples: int = 600,
    ) -> None:
        super().__init__(num_partitions=num_partitions, seed=seed)
        if samples_per_client < 1:
            raise ValueError(f"samples_per_client must be >= 1, got {samples_per_client}")
        if skew <= 0:
            raise ValueError(f"skew must be > 0, got {skew}")
        self.samples_per_client = samples_per_client
        self.skew = skew
        self.test_samples = test_samples
        gen = torch.Generator().manual_seed(seed)
        self.means = 2.0 * torch.randn(NUM_CLASSES, NUM_FEATURES, generator=gen)
        dirichlet = torch.distributions.Dirichlet(torch.full((NUM_CLASSES,), skew))
        with torch.random.fork_rng(devices=[]):  # Dirichlet draws from the global generator
            torch.manual_seed(seed)
            self.class_mix = dirichlet.sample((num_partitions,))

    def _sample(self, n: int, mix: torch.Tensor, stream: int) -> TensorDataset:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + stream)
        labels = torch.multinomial(mix, n, replacement=True, generator=gen)
        inputs = self.means[labels] + torch.randn(n, NUM_FEATURES, generator=gen)
        return TensorDataset(inputs, labels)

    def make_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))

    def load_partition(self, partition_id: int) -> Dataset[Any]:
        self.check_partition_id(partition_id)
        return self._sample(self.samples_per_client, self.class_mix[partition_id], partition_id)

    def load_test(self) -> Dataset[Any]:
        uniform = torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES)
        return self._sample(self.test_samples, uniform, stream=self.num_partitions)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)


def make_task(**options: Any) -> Task:
    """The factory fedsqueeze calls with the run's options (num_partitions, seed, ...).

    Options this task does not know (they may be meant for other tasks) are ignored.
    """
    known = {"num_partitions", "seed", "samples_per_client", "skew", "test_samples"}
    return BlobsTask(**{k: v for k, v in options.items() if k in known})
