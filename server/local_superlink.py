"""A local SuperLink in simulation mode that this process starts, owns and stops.

`LocalSuperLink` starts ``flower-superlink --simulation`` on a free port with its own
``FLWR_HOME`` (holding a ``config.toml`` whose one connection points at that port) and
with runtime dependency installation disabled, so nothing touches ``~/.flwr`` or the
shared port 39091 of Flower's lazily started SuperLink and several can run side by side.
It runs the flwr CLI against itself (``flwr run``, ``flwr ls``, ``flwr stop``) and stops,
by PID, itself and whatever it spawned.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.flower_env import flower_env, flower_executable, terminate_then_kill
from server.app_dir import ConfigValue, SimulationError, run_config_arg
from server.flwr_connection import CONNECTION_NAME, write_flower_config


def executable(name: str) -> str:
    """A Flower console script of this environment (`flower_executable`); a missing one
    is a SimulationError."""
    try:
        return flower_executable(name)
    except FileNotFoundError as exc:
        raise SimulationError(str(exc)) from None


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _terminate_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM process `pid` (one we started), wait, SIGKILL; then any descendant left."""
    import psutil

    try:
        root = psutil.Process(pid)
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    terminate_then_kill([root], timeout)
    # the SuperLink's SuperExec and simulation processes normally exit with it
    _, alive = psutil.wait_procs(descendants, timeout=timeout)
    terminate_then_kill(alive, 3.0)


class LocalSuperLink:
    """A SuperLink in simulation mode that this process starts, owns and stops.

    Its FLWR_HOME gets a ``config.toml`` with one connection, ``fedsqueeze``, pointing at
    the SuperLink's HTTP port (an explicit address, so the flwr CLI never starts its own
    shared SuperLink on port 39091).
    """

    def __init__(
        self,
        flwr_home: str | os.PathLike[str],
        port: int | None = None,
        startup_timeout: float = 90.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.flwr_home = Path(flwr_home).expanduser().resolve()
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.flwr_home / "superlink.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def env(self) -> dict[str, str]:
        """Environment for the SuperLink and for the flwr CLI calls that talk to it."""
        # the SuperLink starts `flower-superexec` and `flwr-simulation` by name:
        # flower_env puts the ones beside this interpreter first on PATH
        env = flower_env(self.flwr_home, self.extra_env)
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        return env

    def healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"http://{self.address}/health", timeout=1.0).is_success
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        if self.process is not None:
            raise SimulationError("this SuperLink is already started")
        write_flower_config(self.flwr_home, self.address)
        command = [
            executable("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.flwr_home / "superlink-state.db"),
            "--log-file",
            str(self.log_path),
            "--disable-runtime-dependency-installation",
        ]
        with (self.flwr_home / "superlink.out").open("ab") as out:
            # its own session: a Ctrl-C in the terminal reaches us, and we stop it in order
            self.process = subprocess.Popen(
                command,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self.process = None
                raise SimulationError(
                    f"flower-superlink exited with code {code} while starting; see "
                    f"{self.log_path} and {self.flwr_home / 'superlink.out'}"
                )
            if self.healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise SimulationError(
            f"flower-superlink did not answer on {self.address} within "
            f"{self.startup_timeout:.0f}s; see {self.log_path}"
        )

    def stop(self) -> None:
        """Stop the SuperLink (SIGTERM, then SIGKILL) and whatever it spawned."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            _terminate_tree(process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ------------------------------------------------------------ the flwr CLI against it
    def flwr(
        self, args: Sequence[str], cwd: Path | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command against this SuperLink."""
        try:
            return subprocess.run(
                [executable("flwr"), *args],
                env=self.env(),
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SimulationError(
                f"`flwr {' '.join(args[:2])}` timed out after {timeout}s"
            ) from exc

    def submit(
        self,
        app_dir: Path,
        overrides: dict[str, ConfigValue],
        federation: dict[str, int | float | bool | str],
    ) -> int:
        """``flwr run``: start one run; return Flower's run id."""
        args = ["run", str(app_dir), CONNECTION_NAME, "--format", "json"]
        if overrides:
            args += ["--run-config", run_config_arg(overrides)]
        if federation:
            args += ["--federation-config", run_config_arg(dict(federation))]
        done = self.flwr(args, cwd=app_dir, timeout=300.0)
        payload = _json_in(done.stdout)
        if done.returncode != 0 or not payload or not payload.get("success"):
            detail = (payload or {}).get("error-message") or (done.stderr or done.stdout).strip()
            raise SimulationError(f"flwr run failed (exit {done.returncode}): {detail}")
        return int(payload["run-id"])

    def status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
        done = self.flwr(["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"])
        payload = _json_in(done.stdout)
        runs = (payload or {}).get("runs") or []
        if done.returncode != 0 or not runs:
            return "unknown"
        return str(runs[0].get("status", "unknown"))

    def stop_run(self, run_id: int) -> None:
        with contextlib.suppress(SimulationError):
            self.flwr(["stop", str(run_id), CONNECTION_NAME], timeout=30.0)


def _json_in(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
