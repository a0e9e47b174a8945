"""Algorithm settings: named presets and the resolved knobs of one run.

Every named algorithm is a setting of the same equations (ALGORITHMS.md, "Named algorithms
as settings of the above"): a `Preset` says which directions compress, keep a memory or
feed back an error, and what happens to the central model; `resolve_settings` fills in the
compressor specs and rates and checks every value, giving an `AlgorithmSettings`.

Defaults it derives, in the papers' notation (C with variance ω, or contraction δ)::

    α = 1 / (2(ω + 1))          memory rate of a direction with an unbiased C
    α = δ / 2                   memory rate of a direction with a biased C
    λ = 1  (biased C),  λ = min(1, 1/ω)  (unbiased C)   error-feedback rate, `ef_damping`
    1/(ω + 1)                   the optional `ef-scale=on` factor on decoded messages
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from strategies.encoding import Compressor, get_compressor
from strategies.server_opt import ServerOptSettings, check_server_opt

ModelKind = Literal["exact", "degraded", "preserved", "preserved-rand", "sign-vote"]


@dataclass(frozen=True)
class Preset:
    """A named algorithm as a setting of the generic equations (ALGORITHMS.md table)."""

    name: str
    family: str  # module under strategies/ holding both halves
    model: ModelKind
    up_compress: bool
    up_memory: bool
    up_ef: bool
    down_compress: bool
    down_memory: bool
    down_ef: bool
    default_uplink: str
    default_downlink: str
    summary: str
    #: Dore: the broadcast carries the compressed *model* residual q̂ and both sides step
    #: x̂ ← x̂ + β q̂ (`strategies.artemis`), instead of a gradient-space Ω
    model_residual: bool = False
    #: signum-mv: each client keeps a momentum m_i ← β m_i + (1 − β) g_i and compresses
    #: m_i instead of g_i (`strategies.client_half.client_uplink`)
    client_momentum: bool = False


#: β of signum-mv's client momentum: 0.9, the value of Bernstein et al.'s experiments
#: (signSGD, ICML 2018, and "signSGD with majority vote", ICLR 2019)
DEFAULT_CLIENT_MOMENTUM = 0.9


@dataclass(frozen=True)
class AlgorithmSettings:
    """A preset with every knob resolved (compressor specs, rates, flags, participation)."""

    preset: Preset
    uplink: str
    downlink: str
    up_memory_rate: float  # α_up, 0 = no uplink memory
    down_memory_rate: float  # α_dwn, 0 = no downlink memory
    up_ef: bool
    down_ef: bool
    server_lr: float  # γ
    participation: float  # p
    participation_mode: Literal["bernoulli", "fraction"]
    pp_variant: Literal["pp1", "pp2"]
    seed: int
    dim: int
    #: 1/(ω+1) with `ef-scale=on` when error feedback meets an unbiased compressor, else 1
    up_scale: float = 1.0
    down_scale: float = 1.0
    #: λ_up, λ_dwn: the coefficient in front of the residual, Δ_i = g_i − h_i + λ_up e_i and
    #: Ω = C_dwn(ĝ − H + λ_dwn e_s); for dore λ_dwn is η in q = x_{k+1} − x̂_k + η e
    up_ef_rate: float = 1.0
    down_ef_rate: float = 1.0
    #: β, Dore's shared-model step x̂ ← x̂ + β q̂ (1 for every other preset)
    model_step: float = 1.0
    #: β of the client momentum m_i ← β m_i + (1 − β) g_i (signum-mv; 0 for the others)
    client_momentum: float = 0.0
    #: the server optimiser turning ĝ into the step u, w ← w − γ u (`strategies.server_opt`)
    server_opt: ServerOptSettings = field(default_factory=ServerOptSettings)
    #: τ, the staleness bound of delayed updates: a reply of round k that arrives in round j,
    #: 1 ≤ j − k ≤ τ, is folded into round j's ĝ (`strategies.consistency`); 0 = dropped
    max_staleness: int = 0

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def model(self) -> ModelKind:
        return self.preset.model

    @property
    def up_memory(self) -> bool:
        return self.up_memory_rate > 0

    @property
    def down_memory(self) -> bool:
        return self.down_memory_rate > 0


def parse_flag(value: Any, key: str) -> bool | None:
    """'' → None (preset default); on/off/true/false/1/0 → bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "auto", "-1"):
        return None
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{key}: expected '', 'on' or 'off', got {value!r}")


def resolve_settings(
    preset: Preset,
    dim: int,
    *,
    uplink: str = "",
    downlink: str = "",
    up_memory_rate: float = -1.0,
    down_memory_rate: float = -1.0,
    up_ef: bool | None = None,
    down_ef: bool | None = None,
    server_lr: float = 0.1,
    participation: float = 1.0,
    participation_mode: str = "bernoulli",
    pp_variant: str = "pp2",
    seed: int = 0,
    up_ef_rate: float = -1.0,
    down_ef_rate: float = -1.0,
    model_step: float = 1.0,
    ef_scaled: bool = False,
    client_momentum: float = DEFAULT_CLIENT_MOMENTUM,
    server_opt: ServerOptSettings | None = None,
    max_staleness: int = 0,
) -> AlgorithmSettings:
    """Fill the preset's defaults and check every value; raise ValueError naming the key.

    Error feedback (EF) rates λ_up, λ_dwn (-1 = automatic, `ef_damping`): 1 for a biased
    compressor, min(1, 1/ω) for an unbiased one. `ef_scaled=True` is the other option: scale
    an unbiased compressor's decoded output by 1/(ω + 1) on both sides (`ef_scale`), which
    makes it a contraction, and keep λ = 1.
    """
    if dim < 1:
        raise ValueError(f"model dimension must be >= 1, got {dim}")
    up_spec = uplink.strip() or preset.default_uplink
    down_spec = downlink.strip() or preset.default_downlink
    if not preset.down_compress and down_spec != "identity":
        raise ValueError(
            f"downlink: {preset.name} sends the model uncompressed; got downlink={down_spec!r}"
        )
    up_c = get_compressor(up_spec)
    down_c = get_compressor(down_spec)
    if up_memory_rate < 0:
        up_rate = default_memory_rate(up_c, dim) if preset.up_memory else 0.0
    else:
        up_rate = float(up_memory_rate)
    if down_memory_rate < 0:
        down_rate = default_memory_rate(down_c, dim) if preset.down_memory else 0.0
    else:
        down_rate = float(down_memory_rate)
    if not 0 <= up_rate <= 1 or not 0 <= down_rate <= 1:
        raise ValueError("up-memory-rate and down-memory-rate must be in [0, 1] (or -1 = auto)")
    if preset.model in ("exact", "sign-vote") and down_rate > 0:
        raise ValueError(f"down-memory-rate: {preset.name} has no downlink memory")
    if preset.model in ("preserved", "preserved-rand") and down_rate == 0:
        raise ValueError(f"down-memory-rate: {preset.name} needs a downlink memory rate > 0")
    up_ef_v = preset.up_ef if up_ef is None else up_ef
    down_ef_v = preset.down_ef if down_ef is None else down_ef
    if down_ef_v and preset.model != "degraded":
        raise ValueError(f"down-ef: {preset.name} has no compressed broadcast to feed back")
    if preset.model == "sign-vote" and (up_rate > 0 or up_ef_v):
        raise ValueError(f"{preset.name} takes neither uplink memory nor error feedback")
    if not math.isfinite(client_momentum) or not 0 <= client_momentum < 1:
        raise ValueError(f"client-momentum must be in [0, 1), got {client_momentum}")
    if client_momentum != DEFAULT_CLIENT_MOMENTUM and not preset.client_momentum:
        raise ValueError(
            f"client-momentum: only signum-mv keeps a client momentum, not {preset.name}"
        )
    server_opt = server_opt or ServerOptSettings()
    check_server_opt(server_opt, preset.name, preset.model == "sign-vote", down_spec)
    if not math.isfinite(server_lr) or server_lr <= 0:
        raise ValueError(f"server-lr must be > 0, got {server_lr}")
    if not 0 < participation <= 1:
        raise ValueError(f"participation must be in (0, 1], got {participation}")
    if participation_mode not in ("bernoulli", "fraction"):
        raise ValueError(
            f"participation-mode must be 'bernoulli' or 'fraction', got {participation_mode!r}"
        )
    if pp_variant not in ("pp1", "pp2"):
        raise ValueError(f"pp-variant must be 'pp1' or 'pp2', got {pp_variant!r}")
    if preset.model_residual and down_rate > 0:
        raise ValueError(f"down-memory-rate: {preset.name} has no downlink memory")
    if int(max_staleness) != max_staleness or max_staleness < 0:
        raise ValueError(f"max-staleness must be an integer >= 0, got {max_staleness}")
    if not math.isfinite(model_step) or not 0 < model_step <= 1:
        raise ValueError(f"model-step must be in (0, 1], got {model_step}")
    if model_step != 1 and not preset.model_residual:
        raise ValueError(f"model-step: only dore has a shared-model step β, not {preset.name}")
    up_scale = ef_scale(up_c, dim) if up_ef_v and ef_scaled else 1.0
    down_scale = ef_scale(down_c, dim) if down_ef_v and ef_scaled else 1.0
    rates = []
    for key, value, comp, scale in (
        ("up-ef-rate", up_ef_rate, up_c, up_scale),
        ("down-ef-rate", down_ef_rate, down_c, down_scale),
    ):
        if value < 0:
            value = 1.0 if scale < 1 else ef_damping(comp, dim)
        if not math.isfinite(value) or value > 1:
            raise ValueError(f"{key} must be in [0, 1] (or -1 = auto), got {value}")
        rates.append(float(value))
    return AlgorithmSettings(
        preset=preset,
        uplink=up_spec,
        downlink=down_spec,
        up_memory_rate=up_rate,
        down_memory_rate=down_rate,
        up_ef=up_ef_v,
        down_ef=down_ef_v,
        server_lr=float(server_lr),
        participation=float(participation),
        participation_mode=participation_mode,  # type: ignore[arg-type]
        pp_variant=pp_variant,  # type: ignore[arg-type]
        seed=int(seed),
        dim=int(dim),
        up_scale=up_scale,
        down_scale=down_scale,
        up_ef_rate=rates[0],
        down_ef_rate=rates[1],
        model_step=float(model_step),
        client_momentum=float(client_momentum) if preset.client_momentum else 0.0,
        server_opt=server_opt,
        max_staleness=int(max_staleness),
    )


def ef_scale(compressor: Compressor, d: int) -> float:
    """The `ef-scale=on` option. Error feedback needs a contraction (‖C(x) − x‖² ≤ (1 − δ)‖x‖²).
    An unbiased C with variance ω is not one when ω ≥ 1, but C/(ω + 1) is, with δ = 1/(ω + 1)
    (Stich & Karimireddy): both sides scale the decoded message by 1/(ω + 1). It keeps EF
    stable but moves the model by a (ω + 1)-th of each update (dore: 0.20-0.27 Fashion-MNIST
    accuracy after 5 rounds against 0.54-0.57 for artemis), hence not the default."""
    return 1.0 / (float(compressor.omega(d)) + 1.0) if compressor.unbiased else 1.0


def ef_damping(compressor: Compressor, d: int) -> float:
    """The automatic EF rate λ in v = x + λ e, e ← v − C(v): 1 for a biased C (EF-SGD,
    DoubleSqueeze), min(1, 1/ω) for an unbiased C with variance ω.

    With an unbiased C, E‖e_{k+1}‖² = ω E‖v_k‖², so the residual grows without bound unless
    λ²ω < 1; the sum of what was sent, Σ C(v_k) = Σ x_k − (1 − λ) Σ e_k − e_K, carries a
    stationary noise of about (1 − λ)² ω/(1 − λ² ω) ‖x‖² per round, smallest at λ = 1/ω.
    A coefficient in front of e damps the residual, as in the Artemis authors' EF baselines
    (theirs is the step size), instead of shrinking every message (`ef_scale`).
    """
    if not compressor.unbiased:
        return 1.0
    omega = float(compressor.omega(d))
    return 1.0 if omega <= 1 else 1.0 / omega


def default_memory_rate(compressor: Compressor, d: int) -> float:
    """α = 1 / (2(ω + 1)) for an unbiased compressor; δ / 2 for a biased one."""
    if compressor.unbiased:
        return 1.0 / (2.0 * (float(compressor.omega(d)) + 1.0))
    return float(compressor.delta(d)) / 2.0
