"""Local training: the update g_i a client computes at the model it holds.

With K local steps of plain SGD at learning rate η from w_start,

    g_i = (w_start − w_end) / η,

so K = 1 gives a stochastic gradient (a full gradient for full-batch tasks) and K > 1 gives
the FedAvg / FedPAQ pseudo-gradient. The model's parameters, flattened in
`model.parameters()` order, are the vector w of the algorithms (buffers are not
communicated; the built-in models have none).

The SGD step is written out (``p -= η · ∇p``, what ``torch.optim.SGD`` does without
momentum or weight decay) rather than taken from ``torch.optim``: constructing a torch
optimizer imports ``torch._dynamo`` (800-odd modules, sympy among them: about 1.4 s of CPU),
and in deployment every train message runs in a fresh ClientApp process that would pay it
again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.base import Task


def resolve_device(spec: str) -> torch.device:
    """'auto' → cuda when available, else cpu; otherwise the named device (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available here")
    return device


def flatten(model: nn.Module) -> torch.Tensor:
    """w: the parameters as one float32 vector (on the model's device)."""
    return nn.utils.parameters_to_vector([p.detach() for p in model.parameters()]).to(torch.float32)


def load_flat(model: nn.Module, w: torch.Tensor) -> None:
    """Copy the vector w into the model's parameters."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if w.numel() != total:
        raise ValueError(f"vector has {w.numel()} values, the model has {total} parameters")
    # copy (vector_to_parameters would make the parameters views of w, and training would
    # then overwrite the caller's w_start)
    with torch.no_grad():
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(w[offset : offset + n].view_as(p))
            offset += n


def _sgd_step(params: list[nn.Parameter], lr: float) -> None:
    """One plain SGD step in place: p ← p − lr · p.grad (parameters without a gradient,
    i.e. unused by the loss, stay as they are, as with torch.optim.SGD)."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)


def local_update(
    task: Task,
    model: nn.Module,
    data: Dataset[Any],
    w_start: torch.Tensor,
    lr: float,
    local_steps: int,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> tuple[torch.Tensor, float, int]:
    """K SGD steps from w_start; return (g_i = (w_start − w_end)/η, mean loss, examples seen)."""
    model.to(device)
    load_flat(model, w_start)
    model.train()
    n = len(data)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("this client's partition is empty")
    if task.full_batch:
        batch_size = n
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=min(batch_size, n), shuffle=True, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    seen = 0
    it = iter(loader)
    for _ in range(local_steps):
        try:
            inputs, targets = next(it)
        except StopIteration:
            it = iter(loader)
            inputs, targets = next(it)
        inputs, targets = inputs.to(device), targets.to(device)
        for p in params:
            p.grad = None
        loss = task.loss(model(inputs), targets)
        loss.backward()
        _sgd_step(params, lr)
        losses.append(float(loss.detach()))
        seen += int(targets.shape[0])
    w_end = flatten(model)
    g = (w_start.to(device) - w_end) / lr
    return g, sum(losses) / len(losses), seen
