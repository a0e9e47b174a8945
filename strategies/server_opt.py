"""Server optimisers: the step u the central model takes from the aggregate ĝ, w ← w − γ u.

Each optimiser is a pair of pure functions, as in optax: ``init(d)`` gives its state (a
small NamedTuple of d-vectors, O(d) memory: at most three), ``update(ĝ, state)`` returns
``(u, new_state)`` and never changes its arguments. In the notation of Reddi et al.
(``server-beta1`` β₁, ``server-beta2`` β₂, ``server-eps`` τ, ``server-momentum`` β), with
m₀ = 0 and v₀ = v̂₀ = τ² (the paper's v₋₁ ≥ τ²)::

    sgd        u = ĝ                                             (today's step, bit for bit)
    momentum   m ← β m + ĝ ;  u = m                              (heavy ball, FedAvgM)
    adam       m ← β₁ m + (1 − β₁) ĝ ;  v ← β₂ v + (1 − β₂) ĝ² ;  u = m / (√v + τ)
    amsgrad    m, v as adam ;  v̂ ← max(v̂, v) ;  u = m / (√v̂ + τ)
    yogi       m as adam ;  v ← v − (1 − β₂) ĝ² sign(v − ĝ²) ;  u = m / (√v + τ)

(squares, roots, max and division per coordinate; no bias correction, as in Reddi et al.'s
Algorithm 2.) The server half (`strategies.server_half.ServerHalf.server_step`) keeps the
state and applies u where its family moves the model by ĝ: to w where the central model is
exact or preserved, and to what the broadcast compresses where clients replay it, so that
every client's model stays equal to the server's. The state is part of the server's
checkpoint; clients hold none of it.

Defaults and the conditions they satisfy:

- β = 0.9: heavy-ball server momentum as in FedAvgM (Hsu, Qi, Brown, "Measuring the effects
  of non-identical data distribution", 2019) and Flower's ``server_momentum``. On a quadratic
  with curvatures λ heavy ball converges iff 0 ≤ β < 1 and 0 < γλ < 2(1 + β).
- β₁ = 0.9, β₂ = 0.99, τ = 10⁻³: FedAdam / FedYogi / FedAdagrad (Reddi, Charles, Zaheer,
  Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive federated optimization", ICLR 2021),
  whose tuned server step sizes lie in 10^-2..10^-1 (the default server-lr, = client-lr
  0.05, is in that range).
- AMSGrad (Reddi, Kale, Kumar, "On the convergence of Adam and beyond", ICLR 2018) requires
  β₁ < √β₂ (its Theorem 4; 0.9 < √0.99 ≈ 0.995 holds), and `check_server_opt` refuses
  values that break it. Its v̂ never decreases, so the effective step γ/(√v̂ + τ) never
  grows: the condition of Chen, Liu, Sun, Hong's analysis of Adam-type methods ("On the
  convergence of a class of Adam-type algorithms for non-convex optimization", ICLR 2019),
  which Adam and Yogi do not satisfy, and the reason AMSGrad is the reference combination
  with compressed, error-fed updates (1-bit Adam, Tang et al. 2021, and Efficient-Adam,
  Chen et al. 2022, study Adam-type steps on compressed updates with error feedback).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from core.runconfig import SERVER_OPTS
from core.runconfig import ServerOptName as OptName


@dataclass(frozen=True)
class ServerOptSettings:
    """The run-config keys of the server optimiser (see the module docstring for sources)."""

    name: OptName = "sgd"  # server-opt
    momentum: float = 0.9  # server-momentum, β
    beta1: float = 0.9  # server-beta1, β₁
    beta2: float = 0.99  # server-beta2, β₂
    eps: float = 1e-3  # server-eps, τ


class ServerOptState(NamedTuple):
    """The optimiser's state: m (momentum and the adaptive ones), v (adaptive), v̂ (AMSGrad);
    None where the optimiser keeps no such vector."""

    mu: torch.Tensor | None = None
    nu: torch.Tensor | None = None
    nu_max: torch.Tensor | None = None


class ServerOptimizer(NamedTuple):
    """A pair of pure functions: init(d) → state; update(ĝ, state) → (u, new state)."""

    init: Callable[[int], ServerOptState]
    update: Callable[[torch.Tensor, ServerOptState], tuple[torch.Tensor, ServerOptState]]


def sgd() -> ServerOptimizer:
    """u = ĝ (the same tensor: no arithmetic, so the model moves exactly as without it)."""

    def init(d: int) -> ServerOptState:
        return ServerOptState()

    def update(g: torch.Tensor, state: ServerOptState) -> tuple[torch.Tensor, ServerOptState]:
        return g, state

    return ServerOptimizer(init, update)


def momentum(beta: float) -> ServerOptimizer:
    """Heavy ball: m ← β m + ĝ; u = m."""

    def init(d: int) -> ServerOptState:
        return ServerOptState(mu=torch.zeros(d))

    def update(g: torch.Tensor, state: ServerOptState) -> tuple[torch.Tensor, ServerOptState]:
        if state.mu is None:
            raise ValueError("server-opt momentum: state lacks its momentum m")
        mu = beta * state.mu + g
        return mu, ServerOptState(mu=mu)

    return ServerOptimizer(init, update)


def scale_by_adaptive(
    beta1: float, beta2: float, eps: float, *, second_moment: Literal["adam", "yogi"], amsgrad: bool
) -> ServerOptimizer:
    """m ← β₁ m + (1 − β₁) ĝ; v by Adam's or Yogi's rule; v̂ ← max(v̂, v) if `amsgrad`;
    u = m / (√v̂ + τ) (v̂ = v without `amsgrad`); m₀ = 0, v₀ = v̂₀ = τ²."""

    def init(d: int) -> ServerOptState:
        v0 = torch.full((d,), eps * eps)
        return ServerOptState(torch.zeros(d), v0, v0.clone() if amsgrad else None)

    def update(g: torch.Tensor, state: ServerOptState) -> tuple[torch.Tensor, ServerOptState]:
        if state.mu is None or state.nu is None or (amsgrad and state.nu_max is None):
            raise ValueError("adaptive server optimiser: state lacks its moments")
        g2 = g * g
        mu = beta1 * state.mu + (1 - beta1) * g
        if second_moment == "yogi":
            nu = state.nu - (1 - beta2) * g2 * torch.sign(state.nu - g2)
        else:
            nu = beta2 * state.nu + (1 - beta2) * g2
        nu_max = torch.maximum(state.nu_max, nu) if state.nu_max is not None else None
        denominator = torch.sqrt(nu if nu_max is None else nu_max) + eps
        return mu / denominator, ServerOptState(mu, nu, nu_max)

    return ServerOptimizer(init, update)


adam = functools.partial(scale_by_adaptive, second_moment="adam", amsgrad=False)
amsgrad = functools.partial(scale_by_adaptive, second_moment="adam", amsgrad=True)
yogi = functools.partial(scale_by_adaptive, second_moment="yogi", amsgrad=False)


def from_settings(s: ServerOptSettings) -> ServerOptimizer:
    """The optimiser the settings name."""
    if s.name == "sgd":
        return sgd()
    if s.name == "momentum":
        return momentum(s.momentum)
    if s.name == "adam":
        return adam(s.beta1, s.beta2, s.eps)
    if s.name == "amsgrad":
        return amsgrad(s.beta1, s.beta2, s.eps)
    if s.name == "yogi":
        return yogi(s.beta1, s.beta2, s.eps)
    raise ValueError(f"server-opt must be one of {', '.join(SERVER_OPTS)}, got {s.name!r}")


#: the run-config key of each hyper-parameter, and the optimisers that use it
_USED_BY: dict[str, tuple[str, tuple[str, ...]]] = {
    "momentum": ("server-momentum", ("momentum",)),
    "beta1": ("server-beta1", ("adam", "amsgrad", "yogi")),
    "beta2": ("server-beta2", ("adam", "amsgrad", "yogi")),
    "eps": ("server-eps", ("adam", "amsgrad", "yogi")),
}


def check_server_opt(s: ServerOptSettings, strategy: str, sign_vote: bool, downlink: str) -> None:
    """Refuse values and combinations that mean nothing; ValueError naming the keys.

    - each hyper-parameter in range: β, β₁, β₂ in [0, 1), τ > 0;
    - a hyper-parameter set to other than its default while the chosen optimiser does not
      use it (e.g. ``server-momentum`` with ``server-opt=adam``);
    - AMSGrad with β₁ ≥ √β₂ (outside its convergence condition);
    - an adaptive optimiser on a majority-vote algorithm whose broadcast is a plain sign:
      sign(m / (√v + τ)) = sign(m), so the adaptive scaling never reaches the model (it
      would be server-opt=momentum's vote under another name).
    """
    if s.name not in SERVER_OPTS:
        raise ValueError(f"server-opt must be one of {', '.join(SERVER_OPTS)}, got {s.name!r}")
    defaults = ServerOptSettings()
    for field, (key, users) in _USED_BY.items():
        value = getattr(s, field)
        low_ok = value > 0 if field == "eps" else value >= 0
        if not math.isfinite(value) or not low_ok or (field != "eps" and value >= 1):
            bound = "> 0" if field == "eps" else "in [0, 1)"
            raise ValueError(f"{key} must be {bound}, got {value}")
        if value != getattr(defaults, field) and s.name not in users:
            raise ValueError(
                f"{key}: server-opt={s.name!r} does not use it (only {', '.join(users)})"
            )
    if s.name == "amsgrad" and not s.beta1 < math.sqrt(s.beta2):
        raise ValueError(
            f"server-beta1={s.beta1} and server-beta2={s.beta2}: AMSGrad converges only "
            "when server-beta1 < sqrt(server-beta2)"
        )
    if sign_vote and s.name in ("adam", "amsgrad", "yogi") and downlink.split(":")[0] == "sign":
        raise ValueError(
            f"server-opt={s.name!r} with strategy {strategy!r} and downlink {downlink!r}: the "
            "1-bit broadcast sign(m / (sqrt(v) + eps)) equals sign(m), the adaptive scaling "
            "never reaches the model; use server-opt='momentum', or a downlink that keeps "
            "magnitudes (e.g. downlink='identity')"
        )
