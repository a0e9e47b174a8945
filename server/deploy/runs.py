"""`fedsqueeze run`: submit the Flower app to the SuperLink of a server data directory.

This is ``flwr run APP fedsqueeze --stream --run-config ...`` with a Flower configuration
(``FLWR_HOME/config.toml``) that this module writes: one SuperLink connection named
``fedsqueeze`` with the server's address and CA certificate. The app's dependencies are
already installed beside the SuperLink, so runtime installation stays off
(``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``).

The ServerApp (which the SuperLink starts on the server host) records each round where the
REST service reads it: it finds the store's URL in the SuperLink's environment
(``DATABASE_URL``, set by `server start`), which its processes inherit. The URL is never
part of a run config (Flower keeps run configs in its state and shows them, and the URL may
hold a password): a ``database-url`` entry is refused (core.runconfig.REFUSED_KEYS).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.flower_env import flower_env, flower_executable
from core.runconfig import refused_key_message
from server.deploy.launcher import ServerConfig, ServerPaths
from server.flwr_connection import CONNECTION_NAME, write_flower_config

RUN_ID_PATTERN = re.compile(r"Successfully started run (\d+)")


def app_config_keys(app_dir: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the app's pyproject.toml."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"{app_dir} is not a Flower app: no pyproject.toml")
    with pyproject.open("rb") as fh:
        data = tomllib.load(fh)
    try:
        return dict(data["tool"]["flwr"]["app"]["config"])
    except KeyError:
        raise ValueError(f"{pyproject} has no [tool.flwr.app.config] table") from None


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if "'" in text:
        raise ValueError(f"run-config value {text!r} must not contain single quotes")
    return f"'{text}'"


def render_run_config(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={toml_literal(v)}" for k, v in values.items())


def default_app_dir() -> Path:
    """The repository root holding this package's pyproject.toml (the fedsqueeze app)."""
    return Path(__file__).resolve().parents[2]


@dataclass
class RunOutcome:
    returncode: int
    flower_run_id: int | None
    lines: list[str]


def submit_run(
    paths: ServerPaths,
    config: ServerConfig,
    run_config: Mapping[str, Any],
    *,
    app_dir: Path | None = None,
    on_line: Callable[[str], None] = lambda _l: None,
    timeout: float | None = None,
) -> RunOutcome:
    """Run the app on the SuperLink, streaming its log lines to `on_line`."""
    app = (app_dir or default_app_dir()).resolve()
    known = app_config_keys(app)
    values = dict(run_config)
    for key in values:
        if (refused := refused_key_message(key)) is not None:
            raise ValueError(refused)
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ValueError(
            f"run-config keys {unknown} are not in {app / 'pyproject.toml'} "
            f"[tool.flwr.app.config] (known: {', '.join(sorted(known))})"
        )
    flwr_home = paths.flwr_home
    write_flower_config(flwr_home, config.superlink_address, paths.tls.ca_cert)
    env = flower_env(flwr_home)
    cmd = [flower_executable("flwr"), "run", str(app), CONNECTION_NAME, "--stream"]
    if values:
        cmd += ["--run-config", render_run_config(values)]
    lines: list[str] = []
    run_id: int | None = None
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                lines.append(line)
                if run_id is None and (m := RUN_ID_PATTERN.search(line)):
                    run_id = int(m.group(1))
                on_line(line)
            returncode = proc.wait(timeout=timeout)
        except BaseException:
            proc.terminate()
            proc.wait(timeout=10)
            raise
    return RunOutcome(returncode, run_id, lines)


@dataclass(frozen=True)
class FlowerRunStatus:
    """A run as the SuperLink reports it (Control API ``ListRuns``)."""

    status: str  # "pending" | "starting" | "running" | "finished"
    sub_status: str  # "completed" | "failed" | "stopped" | "" while not finished
    details: str

    @property
    def ok(self) -> bool:
        return self.status == "finished" and self.sub_status == "completed"


def flower_run_status(address: str, ca_cert: Path, run_id: int) -> FlowerRunStatus:
    """Ask the SuperLink how run `run_id` ended (or whether it still runs)."""
    from flwr.proto.control_pb2 import ListRunsRequest
    from flwr.supercore.control import ControlHttpClient

    client = ControlHttpClient.from_server_address(
        server_address=address,
        insecure=False,
        root_certificates=ca_cert.read_bytes(),
        interceptors=[],
    )
    try:
        response = client.ListRuns(ListRunsRequest(run_id=run_id))
    finally:
        client.close()
    run = response.run_dict.get(run_id)
    if run is None:
        raise LookupError(f"the SuperLink at {address} knows no run {run_id}")
    return FlowerRunStatus(run.status.status, run.status.sub_status, run.status.details)


def store_rounds(api_url: str, flower_run_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The store's run with this Flower run id and its rounds, read over REST."""
    import httpx

    with httpx.Client(base_url=api_url, timeout=30) as http:
        offset = 0
        while True:
            page = http.get("/runs", params={"limit": 100, "offset": offset}).raise_for_status()
            data = page.json()
            for run in data["items"]:
                if run.get("flower_run_id") == flower_run_id:
                    rounds = http.get(
                        f"/runs/{run['id']}/rounds", params={"limit": 1000}
                    ).raise_for_status()
                    return run, list(rounds.json()["items"])
            offset += len(data["items"])
            if not data["items"] or offset >= data["total"]:
                raise LookupError(f"no run with Flower run id {flower_run_id} in the store")


if __name__ == "__main__":  # pragma: no cover - manual use
    sys.exit("use `fedsqueeze run`")
