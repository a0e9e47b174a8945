"""The run configuration: keys, defaults, validation (shared by the ServerApp and the ClientApp).

The same keys live in pyproject.toml's ``[tool.flwr.app.config]`` (what `flwr run .` uses,
overridable with ``--run-config``). `DEFAULTS` repeats them so that an in-process simulation
(`flwr.simulation.run_simulation`, which carries no run config) and the tests get the same
values (a test checks that the two agree). Values are never None: "" or -1 mean "automatic"
where a key allows it.

This module is neutral (no torch, no Flower, nothing of the project): the ClientApp on an edge
device reads its run config with it, without any server code. Which algorithm names are valid
is the registry's knowledge (`strategies.registry.ALGORITHMS`), so `load_config` takes them
from its caller. The checks that need the task and the algorithms (`server.config.check_run`)
are the server's.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

#: the server optimisers of ``server-opt`` (`strategies.server_opt` implements them)
ServerOptName = Literal["sgd", "momentum", "adam", "amsgrad", "yogi"]
SERVER_OPTS: tuple[ServerOptName, ...] = get_args(ServerOptName)

#: every key, its default and what it means (tests/test_docs.py holds the table of
#: docs/running-simulations.md, "Run-config keys", to this)
KEYS: dict[str, tuple[Any, str]] = {
    "strategy": ("artemis", "algorithm: sgd qsgd diana biqsgd artemis dore doublesqueeze "
                 "mcm rand-mcm ef-sgd signsgd-mv signum-mv flwr-fedavg"),
    "uplink": ("", "uplink compressor spec, e.g. 'qsgd:s=1,bucket=4096' ('' = preset's)"),
    "downlink": ("", "downlink compressor spec ('' = preset's; 'identity' = none)"),
    "up-memory-rate": (-1.0, "α_up; -1 = 1/(2(ω_up+1)) when the preset has uplink memory, 0 = off"),
    "down-memory-rate": (-1.0, "α_dwn; -1 = 1/(2(ω_dwn+1)) when the preset has downlink memory"),
    "up-ef": ("", "uplink error feedback: '' = preset's, 'on', 'off'"),
    "down-ef": ("", "server-side error feedback: '' = preset's, 'on', 'off'"),
    "up-ef-rate": (-1.0, "λ_up in Δ_i = g_i − h_i + λ_up e_i; -1 = 1 for a biased C_up, "
                   "min(1, 1/ω_up) for an unbiased one"),
    "down-ef-rate": (-1.0, "λ_dwn in front of the server residual (dore: η in "
                     "q = x_{k+1} − x̂_k + η e); -1 = 1 if C_dwn is biased, else min(1, 1/ω_dwn)"),
    "model-step": (1.0, "β, dore's shared-model step x̂ ← x̂ + β q̂ (the paper's 1)"),
    "ef-scale": ("", "'on': scale an unbiased C's output by 1/(ω+1) where EF is on (the old "
                 "variant), and EF rates default to 1; '' or 'off': damp the residual instead"),
    "client-momentum": (0.9, "β of signum-mv's client momentum m_i ← β m_i + (1 − β) g_i "
                        "(Bernstein et al.'s 0.9); signum-mv only"),
    "server-opt": ("sgd", "server optimiser turning ĝ into the step u, w ← w − γ u: sgd "
                   "(u = ĝ), momentum, adam, amsgrad, yogi (docs: equations and sources)"),
    "server-momentum": (0.9, "β of server-opt=momentum, m ← β m + ĝ (FedAvgM's 0.9)"),
    "server-beta1": (0.9, "β₁ of adam/amsgrad/yogi, m ← β₁ m + (1 − β₁) ĝ (Reddi et al. "
                     "2021); amsgrad needs β₁ < √β₂"),
    "server-beta2": (0.99, "β₂ of adam/amsgrad/yogi's second moment v (Reddi et al. 2021)"),
    "server-eps": (1e-3, "τ in u = m / (√v + τ), adam/amsgrad/yogi (Reddi et al. 2021's 1e-3)"),
    "participation": (1.0, "participation probability p (or fraction in 'fraction' mode)"),
    "participation-mode": ("bernoulli", "'bernoulli' (papers: each client with prob. p) or "
                           "'fraction' (fixed-size sample)"),
    "pp-variant": ("pp2", "'pp1' (a memory per client in ĝ) or 'pp2' (one server memory h)"),
    "num-server-rounds": (3, "number of rounds"),
    "server-lr": (-1.0, "server step size γ; -1 = client-lr"),
    "client-lr": (0.05, "client learning rate η"),
    "local-steps": (1, "local steps K; g_i = (w_start − w_end)/η (K = 1: a stochastic gradient)"),
    "batch-size": (32, "local mini-batch size (full-batch tasks ignore it)"),
    "task": ("synthetic-lsq", "synthetic-lsq, synthetic-logreg, fashion-mnist or "
             "'pkg.mod:factory'"),
    "task-options": ("", "extra task options, 'key=value,key=value' (e.g. 'dim=50')"),
    "num-partitions": (-1, "clients' data partitions; -1 = the node config's / connected nodes"),
    "partitioning": ("dirichlet", "'dirichlet' or 'iid' (datasets with labels)"),
    "dirichlet-alpha": (0.5, "Dirichlet concentration α of the label skew"),
    "data-dir": ("", "dataset directory ('' = the task's default)"),
    "seed": (0, "seed of everything (model init, sampling, compression)"),
    "device": ("auto", "client device: 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'"),
    "eval-every": (1, "central evaluation every this many rounds (and the last); 0 = never"),
    "round-timeout": (600.0, "seconds to wait for replies in a round"),
    "max-staleness": (0, "τ: a reply of round k arriving in round j, 1 ≤ j − k ≤ τ, is folded "
                      "into round j's ĝ (docs: delayed updates); 0 = late replies are dropped"),
    "min-nodes": (-1, "wait for this many connected nodes before round 1; -1 = num-partitions"),
    "store-dir": ("", "directory for per-client memories (h_i, Rand-MCM H_i) when spilled to disk"),
    "run-name": ("", "free-form label stored with the run"),
    "checkpoint-dir": ("", "server checkpoints after each round: '' = checkpoints/ beside a "
                       "SQLite store (else $FEDSQUEEZE_HOME/checkpoints), a directory, or 'off'"),
    "resume-run": (0, "store run id to resume from its checkpoint (set by --resume); 0 = new run"),
    "test-fail": ("", "TEST ONLY: 'partition:round' makes that client raise after training"),
    "test-delay": ("", "TEST ONLY: 'partition:round:seconds' makes that client sleep after "
                   "training, before it replies"),
    "test-server-exit": (0, "TEST ONLY: the ServerApp process exits hard after this round is "
                         "stored (0 = never)"),
}  # fmt: skip

DEFAULTS: dict[str, Any] = {k: v for k, (v, _) in KEYS.items()}

#: the environment variable the ServerApp reads its round-history store URL from
STORE_URL_ENV = "DATABASE_URL"

#: keys that are refused on purpose, with the reason shown to whoever sets them
REFUSED_KEYS: dict[str, str] = {
    "database-url": (
        "the store URL is not a run-config key: Flower keeps run configs in its state and "
        "serves them, and the URL may hold a password. The ServerApp reads it from "
        f"${STORE_URL_ENV} in its environment: pass --database-url to `fedsqueeze simulate` "
        "or `fedsqueeze server start`"
    ),
}


def refused_key_message(key: str) -> str | None:
    """Why `key` may not appear in a run config, or None when it may."""
    reason = REFUSED_KEYS.get(key)
    return f"run-config key {key!r} is refused: {reason}" if reason else None


@dataclass(frozen=True)
class RunConfig:
    values: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def strategy(self) -> str:
        return str(self.values["strategy"])

    def task_options(self, num_partitions: int) -> dict[str, Any]:
        """Options for `tasks.load_task`."""
        opts: dict[str, Any] = {
            "num_partitions": num_partitions,
            "seed": int(self["seed"]),
            "partitioning": str(self["partitioning"]),
            "alpha": float(self["dirichlet-alpha"]),
        }
        if self["data-dir"]:
            opts["data_dir"] = str(self["data-dir"])
        opts.update(parse_options(str(self["task-options"])))
        return opts

    def as_flat(self) -> dict[str, Any]:
        return dict(self.values)


def parse_options(text: str) -> dict[str, Any]:
    """'dim=50,noise=0.1,name=x' → {'dim': 50, 'noise': 0.1, 'name': 'x'}."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"task-options: expected key=value, got {part!r}")
        value: Any = raw.strip()
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        out[key.strip().replace("-", "_")] = value
    return out


def parse_failure(text: str) -> tuple[int, int] | None:
    """'3:2' → (partition 3, round 2)."""
    if not text:
        return None
    a, sep, b = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(a), int(b)
    except ValueError:
        raise ValueError(f"test-fail: expected 'partition:round', got {text!r}") from None


def parse_delay(text: str) -> tuple[int, int, float] | None:
    """'3:2:40' → (partition 3, round 2, 40.0 seconds)."""
    if not text:
        return None
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        seconds = float(parts[2])
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError
        return int(parts[0]), int(parts[1]), seconds
    except ValueError:
        raise ValueError(
            f"test-delay: expected 'partition:round:seconds' (seconds >= 0), got {text!r}"
        ) from None


def load_config(
    user: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    algorithms: Collection[str],
) -> RunConfig:
    """Defaults ← run config ← overrides, with every value checked (ValueError naming the key).

    `algorithms` are the valid values of ``strategy`` (`strategies.registry.ALGORITHMS`).
    """
    values = dict(DEFAULTS)
    for source in (user, overrides or {}):
        for key, value in source.items():
            if (refused := refused_key_message(key)) is not None:
                raise ValueError(refused)
            if key not in KEYS:
                known = ", ".join(sorted(KEYS))
                raise ValueError(f"unknown run-config key {key!r}; known keys: {known}")
            values[key] = value
    for key, default in DEFAULTS.items():
        value = values[key]
        try:
            if isinstance(default, bool):
                values[key] = bool(value)
            elif isinstance(default, int):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                values[key] = int(value)
            elif isinstance(default, float):
                values[key] = float(value)
                if not math.isfinite(values[key]):
                    raise ValueError
            else:
                values[key] = str(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"run-config key {key!r}: expected {type(default).__name__}, got {value!r}"
            ) from None
    checks: list[tuple[bool, str]] = [
        (values["num-server-rounds"] >= 1, "num-server-rounds must be >= 1"),
        (values["client-lr"] > 0, "client-lr must be > 0"),
        (values["server-lr"] > 0 or values["server-lr"] == -1, "server-lr must be > 0 or -1"),
        (values["local-steps"] >= 1, "local-steps must be >= 1"),
        (values["batch-size"] >= 1, "batch-size must be >= 1"),
        (values["num-partitions"] >= 1 or values["num-partitions"] == -1,
         "num-partitions must be >= 1 or -1"),
        (values["dirichlet-alpha"] > 0, "dirichlet-alpha must be > 0"),
        (values["eval-every"] >= 0, "eval-every must be >= 0"),
        (values["round-timeout"] > 0, "round-timeout must be > 0"),
        (values["max-staleness"] >= 0, "max-staleness must be >= 0"),
        (values["strategy"] != "flwr-fedavg" or values["max-staleness"] == 0,
         "max-staleness: flwr-fedavg is Flower's own FedAvg, whose loop drops late replies "
         "(use strategy 'sgd' for FedAvg with delayed updates)"),
        (values["min-nodes"] >= 1 or values["min-nodes"] == -1, "min-nodes must be >= 1 or -1"),
        (values["resume-run"] >= 0, "resume-run must be >= 0"),
        (values["test-server-exit"] >= 0, "test-server-exit must be >= 0"),
        (0 < values["participation"] <= 1, "participation must be in (0, 1]"),
        (values["participation-mode"] in ("bernoulli", "fraction"),
         "participation-mode must be 'bernoulli' or 'fraction'"),
        (values["pp-variant"] in ("pp1", "pp2"), "pp-variant must be 'pp1' or 'pp2'"),
        (0 <= values["up-ef-rate"] <= 1 or values["up-ef-rate"] == -1,
         "up-ef-rate must be in [0, 1] or -1"),
        (0 <= values["down-ef-rate"] <= 1 or values["down-ef-rate"] == -1,
         "down-ef-rate must be in [0, 1] or -1"),
        (0 < values["model-step"] <= 1, "model-step must be in (0, 1]"),
        (0 <= values["client-momentum"] < 1, "client-momentum must be in [0, 1)"),
        (values["strategy"] != "flwr-fedavg" or values["server-opt"] == "sgd",
         "server-opt: flwr-fedavg is Flower's own FedAvg and takes no server optimiser "
         "(use strategy 'sgd' for FedAvg with server-opt)"),
        (values["server-opt"] in SERVER_OPTS,
         f"server-opt must be one of {', '.join(SERVER_OPTS)}, got {values['server-opt']!r}"),
        (values["ef-scale"] in ("", "on", "off"), "ef-scale must be '', 'on' or 'off'"),
        (values["partitioning"] in ("dirichlet", "iid"),
         "partitioning must be 'dirichlet' or 'iid'"),
        (values["device"] == "auto" or values["device"] == "cpu"
         or values["device"].startswith("cuda"), "device must be auto, cpu or cuda[:N]"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(f"run config: {message}")
    if values["strategy"] not in algorithms:
        raise ValueError(
            f"run config: unknown strategy {values['strategy']!r}; use one of "
            + ", ".join(algorithms)
        )
    parse_options(values["task-options"])
    parse_failure(values["test-fail"])
    parse_delay(values["test-delay"])
    return RunConfig(values)
