"""The interface every learning task implements, and how a task is found by name.

A task bundles what a federated run needs to know about the learning problem: the model
factory, each client's partition of the training data, the central test set, the loss and
the metrics. Built-in tasks register themselves in `TASKS`; a user's own task is named in
the run config as ``"package.module:factory"`` where ``factory(**options) -> Task``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Task(ABC):
    """A learning problem split across `num_partitions` clients."""

    #: short name, recorded with each run
    name: str = "task"
    #: True for the papers' convex setting: clients compute full-batch gradients
    full_batch: bool = False
    #: True when `evaluate` reports an accuracy
    classification: bool = True

    def __init__(self, num_partitions: int, seed: int = 0) -> None:
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        self.num_partitions = num_partitions
        self.seed = seed

    @abstractmethod
    def make_model(self) -> nn.Module:
        """A freshly initialised model (same initial weights for the same seed)."""

    @abstractmethod
    def load_partition(self, partition_id: int) -> Dataset[Any]:
        """Client `partition_id`'s training data (0 <= partition_id < num_partitions)."""

    @abstractmethod
    def load_test(self) -> Dataset[Any]:
        """The central evaluation set."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch."""

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: Dataset[Any], device: torch.device, batch_size: int = 1024
    ) -> dict[str, float]:
        """Mean loss (and accuracy for classification tasks) of `model` on `data`."""
        model.eval()
        total, loss_sum, correct = 0, 0.0, 0
        for inputs, targets in DataLoader(data, batch_size=batch_size):
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            n = targets.shape[0]
            loss_sum += float(self.loss(outputs, targets)) * n
            if self.classification:
                correct += int((outputs.argmax(dim=1) == targets).sum())
            total += n
        metrics = {"loss": loss_sum / max(total, 1)}
        if self.classification:
            metrics["accuracy"] = correct / max(total, 1)
        return metrics

    def check_partition_id(self, partition_id: int) -> None:
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(
                f"partition_id {partition_id} out of range for {self.num_partitions} partitions"
            )


TaskFactory = Callable[..., Task]

#: built-in tasks by name -> "module:factory" (imported only when used)
TASKS: dict[str, str] = {
    "synthetic-lsq": "tasks.synthetic:make_lsq_task",
    "synthetic-logreg": "tasks.synthetic:make_logreg_task",
    "fashion-mnist": "tasks.fashion_mnist:make_task",
}


def register_task(name: str, target: str) -> None:
    """Register a built-in task `name` implemented by ``"module:factory"``."""
    TASKS[name] = target


def load_task(spec: str, **options: Any) -> Task:
    """Build the task named `spec`: a built-in name or ``"package.module:factory"``.

    `options` (num_partitions, seed, data_dir, ...) go to the factory.
    """
    target = TASKS.get(spec, spec)
    if ":" not in target:
        known = ", ".join(sorted(TASKS)) or "(none registered)"
        raise ValueError(f"unknown task {spec!r}: use one of {known} or 'package.module:factory'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ValueError(f"task {spec!r}: {module_name!r} has no callable {attr!r}")
    task = factory(**options)
    if not isinstance(task, Task):
        raise TypeError(f"task {spec!r}: factory returned {type(task).__name__}, not a Task")
    return task
