"""Synthetic convex tasks of the papers: least squares and logistic regression, non-i.i.d.

Client i holds n examples (A_i, b_i). Heterogeneity is controlled two ways:

- its own optimum: w*_i = w_true + heterogeneity · ξ_i with ξ_i ~ N(0, I_d), and
- a feature shift: rows of A_i ~ N(feature_shift · μ_i, I_d) with μ_i ~ N(0, I_d / d).

Least squares: f_i(w) = (1 / 2n) ‖A_i w − b_i‖², b_i = A_i w*_i + noise · ε.
Logistic regression: f_i(w) = (1/n) Σ_j log(1 + exp(−y_j ⟨a_j, w⟩)) + (λ/2)‖w‖², with labels
y_j = sign(⟨a_j, w*_i⟩ + noise · ε) in {−1, +1} (stored as classes {0, 1} for the model).

The global objective is F(w) = (1/N) Σ_i f_i(w) (clients weighted uniformly, as in the
papers). `global_optimum()` solves it (normal equations for least squares, Newton for
logistic regression) so tests can measure the excess loss F(w) − F(w*).

The model is one linear layer without bias (d parameters), so the flat parameter vector *is*
w, and the clients compute full-batch gradients (`full_batch = True`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tasks.base import Task


class _SyntheticTask(Task):
    full_batch = True

    def __init__(
        self,
        num_partitions: int = 20,
        seed: int = 0,
        dim: int = 20,
        samples_per_client: int = 200,
        heterogeneity: float = 1.0,
        feature_shift: float = 0.0,
        noise: float = 0.1,
        test_samples: int = 1000,
        **_ignored: Any,
    ) -> None:
        super().__init__(num_partitions=num_partitions, seed=seed)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if samples_per_client < 1:
            raise ValueError(f"samples_per_client must be >= 1, got {samples_per_client}")
        if heterogeneity < 0 or feature_shift < 0 or noise < 0:
            raise ValueError("heterogeneity, feature_shift and noise must be >= 0")
        self.dim = dim
        self.samples_per_client = samples_per_client
        self.heterogeneity = heterogeneity
        self.feature_shift = feature_shift
        self.noise = noise
        gen = torch.Generator().manual_seed(seed)
        self.w_true = torch.randn(dim, generator=gen, dtype=torch.float64)
        self._A: list[torch.Tensor] = []
        self._b: list[torch.Tensor] = []
        self.client_optima: list[torch.Tensor] = []
        for _ in range(num_partitions):
            mu = torch.randn(dim, generator=gen, dtype=torch.float64) / dim**0.5
            a = torch.randn(samples_per_client, dim, generator=gen, dtype=torch.float64)
            a = a + feature_shift * mu
            w_i = self.w_true + heterogeneity * torch.randn(dim, generator=gen, dtype=torch.float64)
            eps = torch.randn(samples_per_client, generator=gen, dtype=torch.float64)
            self._A.append(a)
            self.client_optima.append(w_i)
            self._b.append(self._targets(a, w_i, noise * eps))
        # the test set has its own generator: it must not depend on num_partitions, so the
        # server (which may not know how many clients will connect) builds the same one
        test_gen = torch.Generator().manual_seed(seed + 7919)
        a_test = torch.randn(test_samples, dim, generator=test_gen, dtype=torch.float64)
        eps = torch.randn(test_samples, generator=test_gen, dtype=torch.float64)
        self._a_test = a_test
        self._b_test = self._targets(a_test, self.w_true, noise * eps)
        self._optimum: torch.Tensor | None = None

    # ------------------------------------------------------------ plain tensor accessors
    def A(self, i: int) -> torch.Tensor:
        """Client i's feature matrix A_i (n x d, float64)."""
        self.check_partition_id(i)
        return self._A[i]

    def b(self, i: int) -> torch.Tensor:
        """Client i's targets b_i (n, float64; {0, 1} for logistic regression)."""
        self.check_partition_id(i)
        return self._b[i]

    def client_loss(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """f_i(w) in float64."""
        return self._loss_of(self.A(i), self.b(i), w.to(torch.float64))

    def client_gradient(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """∇f_i(w) in float64 (full batch)."""
        w64 = w.detach().to(torch.float64).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self._loss_of(self.A(i), self.b(i), w64), w64)
        return grad

    def global_loss(self, w: torch.Tensor) -> float:
        """F(w) = (1/N) Σ_i f_i(w)."""
        w64 = w.detach().to(torch.float64)
        return float(sum(self.client_loss(i, w64) for i in range(self.num_partitions))) / (
            self.num_partitions
        )

    def global_optimum(self) -> torch.Tensor:
        """w* = argmin F (float64)."""
        if self._optimum is None:
            self._optimum = self._solve()
        return self._optimum

    def excess_loss(self, w: torch.Tensor) -> float:
        """F(w) − F(w*)."""
        return self.global_loss(w) - self.global_loss(self.global_optimum())

    # ------------------------------------------------------------ Task interface
    def make_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        model = nn.Linear(self.dim, 1, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        return model

    def load_partition(self, partition_id: int) -> Dataset[Any]:
        self.check_partition_id(partition_id)
        return TensorDataset(self._A[partition_id].float(), self._b[partition_id].float())

    def load_test(self) -> Dataset[Any]:
        return TensorDataset(self._a_test.float(), self._b_test.float())

    # ------------------------------------------------------------ per-kind math
    def _targets(self, a: torch.Tensor, w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _loss_of(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _solve(self) -> torch.Tensor:
        raise NotImplementedError


class LeastSquaresTask(_SyntheticTask):
    """Heterogeneous least squares, f_i(w) = (1/2n)‖A_i w − b_i‖²."""

    name = "synthetic-lsq"
    classification = False

    def _targets(self, a: torch.Tensor, w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return a @ w + eps

    def _loss_of(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        r = a @ w - b
        return 0.5 * (r @ r) / a.shape[0]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        r = outputs.reshape(targets.shape) - targets
        return 0.5 * (r * r).mean()

    def _solve(self) -> torch.Tensor:
        n = self.num_partitions
        hessian = sum(a.T @ a / a.shape[0] for a in self._A) / n
        rhs = sum(a.T @ b / a.shape[0] for a, b in zip(self._A, self._b, strict=True)) / n
        return torch.linalg.solve(hessian, rhs)

    def smoothness(self) -> tuple[float, float]:
        """(μ, L): extreme eigenvalues of the Hessian of F."""
        n = self.num_partitions
        hessian = sum(a.T @ a / a.shape[0] for a in self._A) / n
        eig = torch.linalg.eigvalsh(hessian)
        return float(eig[0]), float(eig[-1])


class LogisticRegressionTask(_SyntheticTask):
    """Heterogeneous ℓ2-regularised logistic regression (two classes, one logit)."""

    name = "synthetic-logreg"
    classification = True

    def __init__(self, *args: Any, l2: float = 1e-2, **kwargs: Any) -> None:
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.l2 = l2
        super().__init__(*args, **kwargs)

    def _targets(self, a: torch.Tensor, w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return ((a @ w + eps) > 0).to(torch.float64)

    def _loss_of(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        margins = (2 * b - 1) * (a @ w)
        return nn.functional.softplus(-margins).mean() + 0.5 * self.l2 * (w @ w)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = outputs.reshape(targets.shape)
        return nn.functional.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: Dataset[Any], device: torch.device, batch_size: int = 1024
    ) -> dict[str, float]:
        model.eval()
        inputs, targets = data[:]
        logits = model(inputs.to(device)).reshape(-1)
        targets = targets.to(device)
        return {
            "loss": float(self.loss(logits, targets)),
            "accuracy": float(((logits > 0).to(targets.dtype) == targets).double().mean()),
        }

    def _solve(self) -> torch.Tensor:
        w = torch.zeros(self.dim, dtype=torch.float64)
        for _ in range(50):
            grad = torch.stack(
                [self.client_gradient(i, w) for i in range(self.num_partitions)]
            ).mean(dim=0)
            hess = torch.autograd.functional.hessian(self.global_loss_tensor, w)
            step = torch.linalg.solve(hess, grad)
            w = w - step
            if float(step.norm()) < 1e-13:
                break
        return w

    def global_loss_tensor(self, w: torch.Tensor) -> torch.Tensor:
        return sum(self._loss_of(a, b, w) for a, b in zip(self._A, self._b, strict=True)) / (  # type: ignore[return-value]
            self.num_partitions
        )


def make_lsq_task(**options: Any) -> LeastSquaresTask:
    """Synthetic least squares (options: num_partitions=20, seed, dim=20, samples_per_client,
    heterogeneity, feature_shift, noise)."""
    return LeastSquaresTask(**options)


def make_logreg_task(**options: Any) -> LogisticRegressionTask:
    """Synthetic logistic regression (same options as least squares, plus l2)."""
    return LogisticRegressionTask(**options)
