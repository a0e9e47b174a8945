"""The Flower app a simulation runs: its directory, run-config defaults and checked overrides.

`read_app` reads ``[tool.flwr.app.config]`` (the run-config keys and their defaults) and
the default simulated federation size from the app's pyproject.toml. Overrides, given as
``--run-config "key=value ..."`` strings (`parse_raw_overrides`) or as values, are checked
against those keys and their types (`check_overrides`): Flower itself would silently drop
an unknown key. `check_run_config` is the pre-start check: it refuses, before anything
starts, what the ServerApp would refuse. `run_config_arg` writes the checked overrides as
the one ``--run-config`` argument of ``flwr run``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.runconfig import refused_key_message

ConfigValue = bool | int | float | str

_RAW_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


class SimulationError(RuntimeError):
    """Bad input to a simulation (its app, its run config), or a simulation that could not
    be started or did not finish: the error the simulate command reports in one line."""


# ----------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class AppInfo:
    """What simulate needs to know about the Flower app it runs."""

    path: Path
    run_config: dict[str, ConfigValue]
    num_supernodes: int


def default_app_dir() -> Path:
    """The repository root (where pyproject.toml carries ``[tool.flwr.app]``)."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here, Path.cwd()):
        if _has_flower_app(candidate):
            return candidate
    return here


def _has_flower_app(path: Path) -> bool:
    pyproject = path / "pyproject.toml"
    if not pyproject.is_file():
        return False
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return "app" in data.get("tool", {}).get("flwr", {})


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def read_app(app_dir: str | os.PathLike[str] | None = None) -> AppInfo:
    """Read the run-config defaults and the default simulated federation size of an app."""
    path = Path(app_dir).expanduser().resolve() if app_dir else default_app_dir()
    pyproject = path / "pyproject.toml"
    if not pyproject.is_file():
        raise SimulationError(f"no pyproject.toml in {path}: not a Flower app directory")
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SimulationError(f"{pyproject}: invalid TOML: {exc}") from exc
    flwr_table = data.get("tool", {}).get("flwr", {})
    if "app" not in flwr_table:
        raise SimulationError(f"{pyproject} has no [tool.flwr.app] table: not a Flower app")
    run_config = _flatten(flwr_table["app"].get("config", {}))
    num_supernodes = 0
    federations = flwr_table.get("federations", {})
    default_federation = federations.get("default")
    if isinstance(default_federation, str):
        options = federations.get(default_federation, {}).get("options", {})
        num_supernodes = int(options.get("num-supernodes", 0) or 0)
    if not num_supernodes:
        partitions = run_config.get("num-partitions")
        num_supernodes = int(partitions) if isinstance(partitions, int) and partitions > 0 else 20
    return AppInfo(path=path, run_config=run_config, num_supernodes=num_supernodes)


# ----------------------------------------------------------------------------- run config


def parse_raw_overrides(items: Sequence[str]) -> dict[str, ConfigValue]:
    """Parse ``--run-config`` strings ``"key=value key2='text'"`` (values in TOML syntax).

    A bare word that is not valid TOML (``device=cpu``) is taken as a string.
    """
    parsed: dict[str, ConfigValue] = {}
    for item in items:
        if not item.strip():
            continue
        pairs = _RAW_PAIR.findall(item)
        leftover = _RAW_PAIR.sub("", item).strip()
        if leftover or not pairs:
            raise SimulationError(
                f"cannot parse --run-config {item!r}: write space-separated key=value pairs, "
                "e.g. \"strategy='artemis' num-server-rounds=5\""
            )
        for key, text in pairs:
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                value = text
            if not isinstance(value, bool | int | float | str):
                raise SimulationError(
                    f"--run-config {key}: only booleans, integers, floats and strings are "
                    f"allowed, got {text!r}"
                )
            parsed[key] = value
    return parsed


def check_overrides(
    defaults: dict[str, ConfigValue], overrides: dict[str, ConfigValue]
) -> dict[str, ConfigValue]:
    """Check every override names a run-config key of the app and has that key's type.

    Integers are accepted for float keys (and converted); anything else must match.
    """
    checked: dict[str, ConfigValue] = {}
    for key, value in overrides.items():
        if (refused := refused_key_message(key)) is not None:
            raise SimulationError(refused)
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "(none)"
            raise SimulationError(f"unknown run-config key {key!r}: this app's keys are {known}")
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok:
                value = float(value)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise SimulationError(
                f"run-config {key}={value!r}: expected a {type(default).__name__} "
                f"like the default {default!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise SimulationError(f"run-config {key}: {value} is not a finite number")
        checked[key] = value
    return checked


def toml_value(value: ConfigValue) -> str:
    """One run-config value in the TOML syntax `flwr run --run-config` parses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SimulationError(f"{value} is not a finite number")
        return repr(value)
    if "\n" in value or ('"' in value and "'" in value):
        raise SimulationError(f"run-config string {value!r} cannot hold both quote kinds")
    return f"'{value}'" if '"' in value else json.dumps(value)


def run_config_arg(overrides: dict[str, ConfigValue]) -> str:
    """The single ``--run-config`` argument carrying every override."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in overrides.items())


def check_run_config(
    config: dict[str, ConfigValue], num_partitions: int, app_dir: Path | None = None
) -> None:
    """Refuse, before anything starts, what the ServerApp would refuse (`server.config.
    check_run`: keys, ranges, strategy, compressor specs, the task and its data files).

    The simulated ServerApp and ClientApps run on this machine with this environment, so
    what is missing here would make the run fail later, with the reason buried in a log.
    Apps other than fedsqueeze's (run-config keys this project does not know) are only
    checked against their own keys and types (`check_overrides`).
    """
    import sys

    from core.runconfig import KEYS
    from server.config import check_run

    if not set(config) <= set(KEYS):
        return
    # a user's task (`task = "examples.my_task:make_task"`) is imported from the app's
    # directory, which Flower puts on the path of the ServerApp and ClientApps: so here too
    extra = str(app_dir.resolve()) if app_dir is not None else None
    added = extra is not None and extra not in sys.path
    if added:
        sys.path.insert(0, str(extra))
    try:
        check_run(config, num_partitions)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None
    finally:
        if added:
            sys.path.remove(str(extra))
