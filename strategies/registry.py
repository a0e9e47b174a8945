"""Algorithm names → presets, server halves and client halves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from strategies import artemis, mcm, signsgd
from strategies.client_half import ApplyDownlinkFn
from strategies.server_half import ServerHalf
from strategies.server_opt import ServerOptSettings
from strategies.settings import (
    DEFAULT_CLIENT_MOMENTUM,
    AlgorithmSettings,
    Preset,
    parse_flag,
    resolve_settings,
)

PRESETS: dict[str, Preset] = {**artemis.PRESETS, **mcm.PRESETS, **signsgd.PRESETS}

#: Flower's own FedAvg with plain float32 arrays: the baseline, not a preset of our equations
FLWR_FEDAVG = "flwr-fedavg"

ALGORITHMS: tuple[str, ...] = (*PRESETS, FLWR_FEDAVG)

_SERVERS: dict[str, type[ServerHalf]] = {
    "exact": artemis.BroadcastServer,
    "degraded": artemis.BroadcastServer,
    "preserved": mcm.PreservedServer,
    "preserved-rand": mcm.PreservedServer,
    "sign-vote": signsgd.MajorityVoteServer,
}

_CLIENTS: dict[str, ApplyDownlinkFn] = {
    "exact": artemis.apply_downlink,
    "degraded": artemis.apply_downlink,
    "preserved": mcm.apply_downlink,
    "preserved-rand": mcm.apply_downlink,
    "sign-vote": signsgd.apply_downlink,
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(ALGORITHMS)
        raise ValueError(f"unknown strategy {name!r}: use one of {known}") from None


def settings_from_config(config: dict[str, Any], dim: int) -> AlgorithmSettings:
    """AlgorithmSettings from run-config keys (kebab-case, see docs/running-simulations.md)."""
    preset = get_preset(str(config.get("strategy", "artemis")))
    server_lr = float(config.get("server-lr", -1.0))
    if server_lr < 0:
        server_lr = float(config.get("client-lr", 0.1))
    return resolve_settings(
        preset,
        dim,
        uplink=str(config.get("uplink", "")),
        downlink=str(config.get("downlink", "")),
        up_memory_rate=float(config.get("up-memory-rate", -1.0)),
        down_memory_rate=float(config.get("down-memory-rate", -1.0)),
        up_ef=parse_flag(config.get("up-ef", ""), "up-ef"),
        down_ef=parse_flag(config.get("down-ef", ""), "down-ef"),
        server_lr=server_lr,
        participation=float(config.get("participation", 1.0)),
        participation_mode=str(config.get("participation-mode", "bernoulli")),
        pp_variant=str(config.get("pp-variant", "pp2")),
        seed=int(config.get("seed", 0)),
        up_ef_rate=float(config.get("up-ef-rate", -1.0)),
        down_ef_rate=float(config.get("down-ef-rate", -1.0)),
        model_step=float(config.get("model-step", 1.0)),
        ef_scaled=bool(parse_flag(config.get("ef-scale", ""), "ef-scale")),
        client_momentum=float(config.get("client-momentum", DEFAULT_CLIENT_MOMENTUM)),
        server_opt=server_opt_from_config(config),
        max_staleness=int(config.get("max-staleness", 0)),
    )


def server_opt_from_config(config: dict[str, Any]) -> ServerOptSettings:
    """The server optimiser's settings from the run-config keys server-opt, server-momentum,
    server-beta1, server-beta2, server-eps (checked by `resolve_settings`)."""
    default = ServerOptSettings()
    return ServerOptSettings(
        name=str(config.get("server-opt", default.name)),  # type: ignore[arg-type]
        momentum=float(config.get("server-momentum", default.momentum)),
        beta1=float(config.get("server-beta1", default.beta1)),
        beta2=float(config.get("server-beta2", default.beta2)),
        eps=float(config.get("server-eps", default.eps)),
    )


def make_server(
    settings: AlgorithmSettings,
    w0: torch.Tensor,
    store_dir: str | Path | None = None,
    expected_clients: int = 0,
) -> ServerHalf:
    return _SERVERS[settings.model](settings, w0, store_dir, expected_clients)


def client_apply(settings: AlgorithmSettings) -> ApplyDownlinkFn:
    return _CLIENTS[settings.model]


ServerFactory = Callable[..., ServerHalf]
