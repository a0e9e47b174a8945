"""`fedsqueeze simulate`: run the Flower app of this repository in Flower's simulation engine.

What it does, step by step (flwr 1.42):

1. Reads the app's run-config defaults from ``[tool.flwr.app.config]`` of the app's
   pyproject.toml and merges the friendly flags (``--strategy``, ``--rounds``, ...) and raw
   ``--run-config "key=value ..."`` overrides into one checked override set: unknown keys
   and values of the wrong type are refused here with a clear message (Flower itself would
   silently drop an unknown key).
2. Starts its own SuperLink (``flower-superlink --simulation``) on a free port with its own
   ``FLWR_HOME`` (a temporary directory unless ``--flwr-home`` is given) holding a
   ``config.toml`` whose one SuperLink connection points at that port, and with runtime
   dependency installation disabled. Nothing touches ``~/.flwr`` or the shared port 39091
   of Flower's lazily started local SuperLink, so several simulations (and tests) can run
   side by side.
3. Submits each run with ``flwr run <app> fedsqueeze --run-config ... --federation-config
   num-supernodes=N ...``, streams its log with ``flwr log RUN --stream`` into a file, and
   shows a progress bar over rounds with the latest loss, accuracy and bytes read from the
   round-history store as the ServerApp records them (rounds counted from the log when no
   store is readable).
4. Stops the SuperLink it started (by PID, then any of its descendants still alive) at the
   end, on error and on Ctrl-C (after asking the SuperLink to stop the run).

Several ``--strategy`` flags run one simulation per strategy on the same SuperLink, one
after the other, and end with a side-by-side table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from core.secrets import redact_text
from server.config import STORE_URL_ENV, refused_key_message
from server.flower_env import flower_env, flower_executable, terminate_then_kill

ConfigValue = bool | int | float | str

#: the SuperLink connection simulate writes into its own FLWR_HOME/config.toml
CONNECTION_NAME = "fedsqueeze"

#: friendly option name -> run-config key of the app
FRIENDLY_KEYS: dict[str, str] = {
    "strategy": "strategy",
    "uplink": "uplink",
    "downlink": "downlink",
    "rounds": "num-server-rounds",
    "participation": "participation",
    "task": "task",
    "partitioning": "partitioning",
    "alpha": "dirichlet-alpha",
    "data_dir": "data-dir",
    "local_steps": "local-steps",
    "batch_size": "batch-size",
    "server_lr": "server-lr",
    "client_lr": "client-lr",
    "seed": "seed",
    "device": "device",
}

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ROUND_LINE = re.compile(r"\[ROUND (\d+)(?:/(\d+))?\]")
_RAW_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


class SimulationError(RuntimeError):
    """A simulation could not be started or did not finish."""


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


# ----------------------------------------------------------------------------- processes


def _venv_bin(name: str) -> str:
    try:
        return flower_executable(name)
    except FileNotFoundError as exc:
        raise SimulationError(str(exc)) from None


def free_port() -> int:
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

    def _write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
            f"[superlink.{CONNECTION_NAME}]\n"
            f'address = "{self.address}"\ninsecure = true\n',
            encoding="utf-8",
        )

    def healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"http://{self.address}/health", timeout=1.0).is_success
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        if self.process is not None:
            raise SimulationError("this SuperLink is already started")
        self._write_connection()
        command = [
            _venv_bin("flower-superlink"),
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
                [_venv_bin("flwr"), *args],
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


# ----------------------------------------------------------------------------- watching a run


@dataclass
class RoundRow:
    """One recorded round, as the progress bar and the summaries use it."""

    round: int
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    seconds: float | None = None  # wall time of the round (ended_at - started_at)
    phase_seconds: dict[str, float] = field(default_factory=dict)


class LogFollower:
    """``flwr log RUN --stream`` in the background: lines go to a file, rounds are counted."""

    def __init__(self, superlink: LocalSuperLink, run_id: int, log_path: Path) -> None:
        self.log_path = log_path
        self.latest_round = 0
        self.tail: deque[str] = deque(maxlen=60)
        self._lock = threading.Lock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [_venv_bin("flwr"), "log", str(run_id), CONNECTION_NAME, "--stream"],
            env=superlink.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        with self.log_path.open("a", encoding="utf-8") as out:
            for raw in self.process.stdout:
                line = redact_text(_ANSI.sub("", raw.rstrip("\n")))
                out.write(line + "\n")
                out.flush()
                with self._lock:
                    self.tail.append(line)
                    match = _ROUND_LINE.search(line)
                    if match:
                        self.latest_round = max(self.latest_round, int(match.group(1)) - 1)

    def done(self) -> bool:
        return self.process.poll() is not None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._thread.join(timeout=5)

    def tail_text(self, lines: int = 25) -> str:
        with self._lock:
            return "\n".join(list(self.tail)[-lines:])


class StoreWatcher:
    """Reads the rounds of one Flower run from the round-history store as they land."""

    def __init__(self, database_url: str | None, flower_run_id: int) -> None:
        self.database_url = database_url or None
        self.flower_run_id = flower_run_id
        self.store_run_id: int | None = None
        self.run_status: str | None = None
        self.rounds: dict[int, RoundRow] = {}
        self.run_facts: dict[str, Any] = {}
        self.error: str | None = None
        self._store: Any = None

    def _open(self) -> Any:
        if self._store is None:
            from api.db import get_engine
            from api.store import Store

            self._store = Store(get_engine(self.database_url))
        return self._store

    def poll(self) -> list[RoundRow]:
        """New rounds since the last poll (empty if none, or if the store is unreadable)."""
        try:
            return self._poll()
        except Exception as exc:  # the store may not exist yet; the run goes on
            self.error = f"{type(exc).__name__}: {exc}"
            return []

    def _poll(self) -> list[RoundRow]:
        from sqlalchemy import select

        from api.models import Round, Run

        store = self._open()
        with store.session() as session:
            if self.store_run_id is None:
                run_id = session.scalars(
                    select(Run.id)
                    .where(Run.flower_run_id == self.flower_run_id)
                    .order_by(Run.id.desc())
                ).first()
                if run_id is None:
                    return []
                self.store_run_id = int(run_id)
            run = session.get(Run, self.store_run_id)
            if run is not None:
                self.run_status = run.status
                self.run_facts = {
                    "uplink_compressor": run.uplink_compressor,
                    "downlink_compressor": run.downlink_compressor,
                    "num_parameters": run.num_parameters,
                }
            rows = session.scalars(
                select(Round)
                .where(Round.run_id == self.store_run_id, Round.round.not_in(list(self.rounds)))
                .order_by(Round.round)
            ).all()
            new = [_round_row(r) for r in rows]
        for row in new:
            self.rounds[row.round] = row
        self.error = None
        return new


class JsonlWatcher:
    """Reads the rounds of one Flower run from a `JsonlRecorder` file (``jsonl:PATH``)."""

    def __init__(self, path: str | os.PathLike[str], flower_run_id: int) -> None:
        self.path = Path(path).expanduser()
        self.flower_run_id = flower_run_id
        self.store_run_id: int | None = None
        self.run_status: str | None = None
        self.rounds: dict[int, RoundRow] = {}
        self.run_facts: dict[str, Any] = {}
        self.error: str | None = None
        self._offset = 0

    def poll(self) -> list[RoundRow]:
        new: list[RoundRow] = []
        try:
            with self.path.open("r", encoding="utf-8") as fh:
                fh.seek(self._offset)
                while True:
                    line = fh.readline()
                    if not line.endswith("\n"):
                        break  # nothing more, or a line still being written
                    self._offset = fh.tell()
                    row = self._event(json.loads(line))
                    if row is not None and row.round not in self.rounds:
                        self.rounds[row.round] = row
                        new.append(row)
        except (OSError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        return new

    def _event(self, event: dict[str, Any]) -> RoundRow | None:
        kind = event.get("event")
        if kind == "start_run":
            info = event.get("info") or {}
            if self.store_run_id is not None and event.get("run_id") == self.store_run_id:
                self.store_run_id = -1  # a later run reuses the id: ours is over
            if info.get("flower_run_id") == self.flower_run_id:
                self.store_run_id = int(event["run_id"])
                self.run_status = "running"
                self.run_facts = {
                    "uplink_compressor": info.get("uplink_compressor"),
                    "downlink_compressor": info.get("downlink_compressor"),
                    "num_parameters": info.get("num_parameters"),
                }
        elif kind == "round" and event.get("run_id") == self.store_run_id:
            record = dict(event.get("record") or {})
            for key in ("started_at", "ended_at"):
                if isinstance(record.get(key), str):
                    record[key] = datetime.fromisoformat(record[key])
            return _round_row(_Obj(record))
        elif kind == "finish_run" and event.get("run_id") == self.store_run_id:
            self.run_status = str(event.get("status"))
        return None


class _Obj:
    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        return None


def make_watcher(database_url: str | None, flower_run_id: int) -> StoreWatcher | JsonlWatcher:
    """The reader of the ServerApp's round history for this run's ``database-url``."""
    if database_url and database_url.startswith("jsonl:"):
        return JsonlWatcher(database_url.removeprefix("jsonl:"), flower_run_id)
    return StoreWatcher(database_url, flower_run_id)


def _round_row(r: Any) -> RoundRow:
    seconds = None
    started, ended = getattr(r, "started_at", None), getattr(r, "ended_at", None)
    if isinstance(started, datetime) and isinstance(ended, datetime):
        seconds = (ended - started).total_seconds()
    return RoundRow(
        round=int(r.round),
        sampled=int(r.sampled or 0),
        replied=int(r.replied or 0),
        failed=int(r.failed or 0),
        uplink_bytes=int(r.uplink_bytes or 0),
        downlink_bytes=int(r.downlink_bytes or 0),
        train_loss=r.train_loss,
        eval_loss=r.eval_loss,
        eval_accuracy=r.eval_accuracy,
        seconds=seconds,
        phase_seconds=dict(getattr(r, "phase_seconds", None) or {}),
    )


class ServerMemorySampler:
    """Peak resident memory of the run's server process (``flwr-simulation``).

    In Flower's simulation engine the ServerApp runs inside the ``flwr-simulation`` process
    that the SuperLink's SuperExec spawns per run (the ClientApps run in Ray workers). On
    Linux the kernel's high-water mark VmHWM is read; elsewhere RSS is sampled.
    """

    def __init__(self, superlink_pid: int | None, interval: float = 0.25) -> None:
        self.superlink_pid = superlink_pid
        self.interval = interval
        self.peak_bytes = 0
        self._seen_before: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        for proc in self._servers():
            self._seen_before.add(proc.pid)  # processes of earlier runs do not count

    def _servers(self) -> list[Any]:
        import psutil

        if self.superlink_pid is None:
            return []
        try:
            children = psutil.Process(self.superlink_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for proc in children:
            with contextlib.suppress(psutil.Error):
                if any("flwr-simulation" in part for part in proc.cmdline()):
                    found.append(proc)
        return found

    @staticmethod
    def _peak_of(proc: Any) -> int:
        status = Path(f"/proc/{proc.pid}/status")
        with contextlib.suppress(OSError, ValueError):
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        with contextlib.suppress(Exception):
            return int(proc.memory_info().rss)
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        for proc in self._servers():
            if proc.pid not in self._seen_before:
                self.peak_bytes = max(self.peak_bytes, self._peak_of(proc))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_mb(self) -> float | None:
        return self.peak_bytes / 2**20 if self.peak_bytes else None


# ----------------------------------------------------------------------------- one run


@dataclass
class RunSpec:
    """One simulation to run: a label and its checked run-config overrides."""

    label: str
    overrides: dict[str, ConfigValue]
    num_supernodes: int
    cpus_per_client: int = 1
    timeout_s: float = 0.0  # 0 = no limit


@dataclass
class SimulationResult:
    """What one simulation did, as measured."""

    label: str
    flower_run_id: int
    status: str
    store_run_id: int | None
    rounds: list[RoundRow]
    num_rounds: int
    wall_s: float
    server_peak_rss_mb: float | None
    log_path: str
    overrides: dict[str, ConfigValue]
    store_status: str | None = None
    #: what the ServerApp recorded about the run: resolved compressor specs, model size
    run_facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"

    @property
    def final(self) -> RoundRow | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def uplink_bytes(self) -> int:
        return sum(r.uplink_bytes for r in self.rounds)

    @property
    def downlink_bytes(self) -> int:
        return sum(r.downlink_bytes for r in self.rounds)

    @property
    def final_accuracy(self) -> float | None:
        for row in reversed(self.rounds):
            if row.eval_accuracy is not None:
                return row.eval_accuracy
        return None

    @property
    def final_eval_loss(self) -> float | None:
        for row in reversed(self.rounds):
            if row.eval_loss is not None:
                return row.eval_loss
        return None

    @property
    def mean_round_s(self) -> float | None:
        times = [r.seconds for r in self.rounds if r.seconds is not None]
        return sum(times) / len(times) if times else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            ok=self.ok,
            uplink_bytes=self.uplink_bytes,
            downlink_bytes=self.downlink_bytes,
            final_accuracy=self.final_accuracy,
            final_eval_loss=self.final_eval_loss,
            mean_round_s=self.mean_round_s,
        )
        return data


ProgressCallback = Callable[[int, RoundRow | None], None]


def run_one(
    superlink: LocalSuperLink,
    app: AppInfo,
    spec: RunSpec,
    log_dir: Path,
    on_progress: ProgressCallback | None = None,
    poll_interval: float = 0.5,
) -> SimulationResult:
    """Submit one run to `superlink`, follow it to the end, and collect its rounds.

    `on_progress(rounds_done, latest_recorded_round)` is called as rounds land. On Ctrl-C
    the run is stopped on the SuperLink and KeyboardInterrupt propagates.
    """
    merged = {**app.run_config, **spec.overrides}
    num_rounds = int(merged.get("num-server-rounds", 0) or 0)
    # the store the ServerApp records into: the one its environment names (never the run
    # config, see server.config.REFUSED_KEYS), else the default one
    database_url = superlink.env().get(STORE_URL_ENV) or None
    federation: dict[str, int | float | bool | str] = {
        "num-supernodes": spec.num_supernodes,
        "client-resources-num-cpus": spec.cpus_per_client,
    }
    memory = ServerMemorySampler(superlink.pid)
    started = time.monotonic()
    run_id = superlink.submit(app.path, spec.overrides, federation)
    memory.start()
    log_path = log_dir / f"run-{spec.label}-{run_id}.log"
    follower = LogFollower(superlink, run_id, log_path)
    watcher = make_watcher(database_url, run_id)
    status = "running"
    last_done = -1
    try:
        while True:
            new = watcher.poll()
            recorded = max(watcher.rounds) if watcher.rounds else 0
            done = max(recorded, follower.latest_round)
            if on_progress is not None and (new or done != last_done):
                latest = watcher.rounds[max(watcher.rounds)] if watcher.rounds else None
                on_progress(done, latest)
                last_done = done
            if follower.done():
                status = superlink.status(run_id)
                if status.startswith("finished"):
                    break
                # the log stream ended early: poll the run's status instead
                time.sleep(1.0)
                continue
            if spec.timeout_s and time.monotonic() - started > spec.timeout_s:
                superlink.stop_run(run_id)
                status = "timeout"
                break
            time.sleep(poll_interval)
    except KeyboardInterrupt:
        superlink.stop_run(run_id)
        raise
    finally:
        follower.stop()
        memory.sample()
        memory.stop()
    # the last round lands in the store just before the run ends; read what is left
    deadline = time.monotonic() + 5.0
    while True:
        watcher.poll()
        if watcher.run_status not in (None, "running") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rounds = [watcher.rounds[k] for k in sorted(watcher.rounds)]
    if on_progress is not None:
        finished_all = num_rounds if status == "finished:completed" else 0
        done = max([r.round for r in rounds] + [follower.latest_round, finished_all])
        on_progress(done, rounds[-1] if rounds else None)
    return SimulationResult(
        label=spec.label,
        flower_run_id=run_id,
        status=status,
        store_run_id=watcher.store_run_id,
        rounds=rounds,
        num_rounds=num_rounds,
        wall_s=time.monotonic() - started,
        server_peak_rss_mb=memory.peak_mb,
        log_path=str(log_path),
        overrides=dict(spec.overrides),
        store_status=watcher.run_status,
        run_facts=dict(watcher.run_facts),
    )


# ----------------------------------------------------------------------------- several runs


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GB"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so the SuperLink is stopped either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_simulations(
    app: AppInfo,
    specs: Sequence[RunSpec],
    *,
    flwr_home: Path | None = None,
    console: Any = None,
    show_progress: bool = True,
    keep_flwr_home: bool = False,
    database_url: str | None = None,
) -> list[SimulationResult]:
    """Run every spec, one after the other, on one SuperLink this call starts and stops.

    With `flwr_home` None a temporary FLWR_HOME is used; it is removed afterwards when
    every run completed (kept, and its path printed, otherwise). `database_url` (else
    ``$DATABASE_URL``, else the default SQLite store) reaches the ServerApp as
    ``$DATABASE_URL`` of the SuperLink's environment, which its processes inherit: it is
    never part of a run config, so Flower neither stores nor shows it.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    temporary = flwr_home is None
    home = (
        Path(flwr_home).expanduser()
        if flwr_home is not None
        else Path(tempfile.mkdtemp(prefix="fedsqueeze-flwr-"))
    )
    home.mkdir(parents=True, exist_ok=True)
    log_dir = home / "logs"
    results: list[SimulationResult] = []
    superlink = LocalSuperLink(
        home, extra_env={STORE_URL_ENV: database_url} if database_url else None
    )
    success = False
    try:
        with _sigterm_as_interrupt():
            console.print(f"[bold]Starting a local SuperLink[/] (FLWR_HOME={home})")
            superlink.start()
            console.print(f"SuperLink up on {superlink.address} (pid {superlink.pid})")
            for spec in specs:
                merged = {**app.run_config, **spec.overrides}
                total = int(merged.get("num-server-rounds", 0) or 0) or None
                desc = f"{spec.label}"
                with Progress(
                    TextColumn("[bold blue]{task.description}"),
                    BarColumn(),
                    TextColumn("round {task.completed}/{task.total}"),
                    TextColumn("{task.fields[metrics]}"),
                    TimeElapsedColumn(),
                    console=console,
                    disable=not show_progress,
                    transient=False,
                ) as progress:
                    task_id = progress.add_task(desc, total=total, metrics="starting...")

                    def on_progress(
                        done: int, latest: RoundRow | None, _t: Any = task_id, _p: Any = progress
                    ) -> None:
                        metrics = "running"
                        if latest is not None:
                            metrics = (
                                f"loss {_fmt(latest.train_loss, '.4f')}  "
                                f"acc {_fmt(latest.eval_accuracy, '.3f')}  "
                                f"up {_fmt_bytes(latest.uplink_bytes)}  "
                                f"down {_fmt_bytes(latest.downlink_bytes)}"
                            )
                        _p.update(_t, completed=done, metrics=metrics)

                    result = run_one(superlink, app, spec, log_dir, on_progress)
                results.append(result)
                if not result.ok:
                    console.print(
                        f"[red]run {result.flower_run_id} ({spec.label}) ended with status "
                        f"{result.status}[/]; log: {result.log_path}"
                    )
                    with contextlib.suppress(OSError):
                        tail = Path(result.log_path).read_text(encoding="utf-8").splitlines()
                        console.print(
                            redact_text("\n".join(tail[-30:])), markup=False, highlight=False
                        )
        success = bool(results) and all(r.ok for r in results)
    finally:
        pid = superlink.pid
        superlink.stop()
        if pid is not None:
            console.print(f"SuperLink stopped (pid {pid})")
        if temporary and success and not keep_flwr_home:
            shutil.rmtree(home, ignore_errors=True)
        elif not success:
            console.print(f"Logs kept in {home}")
    return results


def results_table(results: Sequence[SimulationResult], title: str = "Simulations") -> Any:
    """A rich table: one row per run with status, accuracy, loss, bytes each way, time."""
    from rich.table import Table

    table = Table(title=title)
    for column in (
        "strategy",
        "status",
        "rounds",
        "accuracy",
        "eval loss",
        "uplink",
        "downlink",
        "s/round",
        "run id",
    ):
        table.add_column(column, justify="left" if column in ("strategy", "status") else "right")
    for r in results:
        table.add_row(
            r.label,
            r.status.removeprefix("finished:"),
            f"{len(r.rounds)}/{r.num_rounds}",
            _fmt(r.final_accuracy, ".4f"),
            _fmt(r.final_eval_loss, ".4f"),
            _fmt_bytes(r.uplink_bytes),
            _fmt_bytes(r.downlink_bytes),
            _fmt(r.mean_round_s, ".2f"),
            str(r.store_run_id) if r.store_run_id is not None else "-",
        )
    return table


# ----------------------------------------------------------------------------- the command


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

    from server.config import KEYS, check_run

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


def check_store_url(url: str | None) -> str | None:
    """`url` checked as a round-history store (``jsonl:PATH`` or a database URL the store
    accepts); None stays None (the ServerApp then uses ``$DATABASE_URL`` or the default)."""
    if url is None:
        return None
    if url.startswith("jsonl:"):
        if not url.removeprefix("jsonl:").strip():
            raise SimulationError("--database-url jsonl:PATH needs a path")
        return url
    from api.settings import normalize_database_url

    try:
        normalize_database_url(url)
    except ValueError:
        raise SimulationError(
            f"--database-url {redact_text(url)!r}: use sqlite:///PATH, "
            "postgresql://USER@HOST/DB or jsonl:PATH"
        ) from None
    return url


def build_specs(
    app: AppInfo,
    strategies: Sequence[str],
    friendly: dict[str, Any],
    raw: Sequence[str],
    clients: int | None,
    cpus_per_client: int,
    timeout_s: float,
) -> list[RunSpec]:
    """Checked run specs: one per strategy (or one with the app's default strategy)."""
    overrides: dict[str, ConfigValue] = {}
    for option, value in friendly.items():
        if value is None:
            continue
        key = FRIENDLY_KEYS[option]
        if key not in app.run_config:
            raise SimulationError(
                f"--{option.replace('_', '-')}: this app has no run-config key {key!r}"
            )
        overrides[key] = value
    overrides.update(parse_raw_overrides(raw))
    if clients is not None:
        if clients < 1:
            raise SimulationError(f"--clients must be >= 1, got {clients}")
        if "num-partitions" in app.run_config:
            overrides["num-partitions"] = clients
    overrides = check_overrides(app.run_config, overrides)
    num_supernodes = clients or int(overrides.get("num-partitions", 0) or 0) or app.num_supernodes
    if cpus_per_client <= 0:
        raise SimulationError(f"--cpus-per-client must be > 0, got {cpus_per_client}")
    labels = list(dict.fromkeys(strategies))
    if not labels:
        default = app.run_config.get("strategy")
        labels = [str(overrides.get("strategy", default if default is not None else "default"))]
        per_run = [overrides]
    else:
        if "strategy" not in app.run_config:
            raise SimulationError("--strategy: this app has no run-config key 'strategy'")
        per_run = [check_overrides(app.run_config, {**overrides, "strategy": s}) for s in labels]
    for o in per_run:
        check_run_config({**app.run_config, **o}, num_supernodes, app.path)
    return [
        RunSpec(
            label=label,
            overrides=o,
            num_supernodes=num_supernodes,
            cpus_per_client=cpus_per_client,
            timeout_s=timeout_s,
        )
        for label, o in zip(labels, per_run, strict=True)
    ]


def resume_spec(
    app: AppInfo,
    run_id: int,
    database_url: str | None,
    clients: int | None,
    cpus_per_client: int,
    timeout_s: float,
) -> RunSpec:
    """The spec that resumes store run `run_id`: its stored run config, ``resume-run`` set
    (the ServerApp then restores its checkpoint). Checked before anything starts."""
    from server.checkpoints import ResumeError, stored_run_to_resume

    try:
        config, _path = stored_run_to_resume(database_url, run_id)
    except ResumeError as exc:
        raise SimulationError(str(exc)) from None
    overrides: dict[str, ConfigValue] = {k: v for k, v in config.items() if k in app.run_config}
    overrides.update({"resume-run": run_id, "test-server-exit": 0})
    overrides = check_overrides(app.run_config, overrides)
    if cpus_per_client <= 0:
        raise SimulationError(f"--cpus-per-client must be > 0, got {cpus_per_client}")
    partitions = int(overrides.get("num-partitions", 0) or 0)
    num_supernodes = clients or (partitions if partitions > 0 else app.num_supernodes)
    check_run_config({**app.run_config, **overrides}, num_supernodes, app.path)
    return RunSpec(
        label=str(overrides.get("strategy", "resumed")),
        overrides=overrides,
        num_supernodes=num_supernodes,
        cpus_per_client=cpus_per_client,
        timeout_s=timeout_s,
    )


def simulate(
    strategy: list[str] = typer.Option(
        [],
        "--strategy",
        "-s",
        help="Algorithm (run-config 'strategy'), e.g. artemis, mcm, sgd, flwr-fedavg. "
        "Repeat to run several one after the other and compare them.",
    ),
    uplink: str | None = typer.Option(
        None, help="Uplink compressor spec (run-config 'uplink'), e.g. 'qsgd:s=1,bucket=4096'."
    ),
    downlink: str | None = typer.Option(
        None, help="Downlink compressor spec (run-config 'downlink')."
    ),
    rounds: int | None = typer.Option(
        None, "--rounds", "-r", min=1, help="Number of rounds (run-config 'num-server-rounds')."
    ),
    clients: int | None = typer.Option(
        None,
        "--clients",
        "-n",
        min=1,
        help="Number of simulated clients (SuperNodes); also the number of data partitions. "
        "Default: the app's num-partitions, else 20.",
    ),
    participation: float | None = typer.Option(
        None, "--participation", "-p", help="Participation probability p (run-config)."
    ),
    task: str | None = typer.Option(
        None,
        help="Task: fashion-mnist, synthetic-lsq, synthetic-logreg or 'package.module:factory'.",
    ),
    partitioning: str | None = typer.Option(
        None, help="Data partitioning of the task: dirichlet or iid."
    ),
    alpha: float | None = typer.Option(
        None, "--alpha", help="Dirichlet concentration α of the non-i.i.d. partition."
    ),
    data_dir: str | None = typer.Option(None, help="Data directory of the task."),
    local_steps: int | None = typer.Option(None, help="Local steps K per round."),
    batch_size: int | None = typer.Option(None, help="Client batch size."),
    server_lr: float | None = typer.Option(None, help="Server learning rate γ."),
    client_lr: float | None = typer.Option(None, help="Client learning rate η."),
    seed: int | None = typer.Option(None, help="Random seed."),
    device: str | None = typer.Option(None, help="Client device: auto, cpu, cuda, cuda:1 ..."),
    database_url: str | None = typer.Option(
        None,
        help="Round-history store URL (sqlite:///..., postgresql://..., jsonl:PATH); "
        "default: $DATABASE_URL, else the SQLite file under $FEDSQUEEZE_HOME (~/.fedsqueeze). "
        "The ServerApp gets it as $DATABASE_URL of the SuperLink's environment, never in "
        "the run config (which Flower stores and shows).",
    ),
    run_config: list[str] = typer.Option(
        [],
        "--run-config",
        "-c",
        help='Raw run-config overrides "key=value ..." (TOML values); repeatable; '
        "applied after the flags above.",
    ),
    cpus_per_client: int = typer.Option(
        1, min=1, help="CPU cores reserved per simulated client (Ray); fewer = more in parallel."
    ),
    timeout: float = typer.Option(
        0.0, min=0.0, help="Stop a run that takes longer than this many seconds (0 = never)."
    ),
    app_dir: Path | None = typer.Option(
        None, help="Flower app directory (default: this repository)."
    ),
    flwr_home: Path | None = typer.Option(
        None,
        help="FLWR_HOME for the SuperLink and the flwr CLI (kept afterwards). "
        "Default: a temporary directory, removed when every run completed.",
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Write the results (one record per run, every round) here."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    resume: int | None = typer.Option(
        None,
        "--resume",
        help="Resume store run RUN after a crash of its ServerApp, from its last checkpoint "
        "(same run id; run config taken from the stored run; give the same --database-url).",
        metavar="RUN",
    ),
) -> None:
    """Run the federated app in Flower's simulation engine on a local SuperLink."""
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    errors = Console(stderr=True, soft_wrap=True)  # one line per error, on stderr
    friendly = {
        "uplink": uplink,
        "downlink": downlink,
        "rounds": rounds,
        "participation": participation,
        "task": task,
        "partitioning": partitioning,
        "alpha": alpha,
        "data_dir": data_dir,
        "local_steps": local_steps,
        "batch_size": batch_size,
        "server_lr": server_lr,
        "client_lr": client_lr,
        "seed": seed,
        "device": device,
    }
    try:
        store_url = check_store_url(database_url)
        app = read_app(app_dir)
        if resume is not None:
            given = [f"--{k.replace('_', '-')}" for k, v in friendly.items() if v is not None]
            given += ["--strategy"] * bool(strategy) + ["--run-config"] * bool(run_config)
            given = [g for g in given if g != "--database-url"]
            if given:
                raise SimulationError(
                    f"--resume takes the run config from the stored run; drop {', '.join(given)}"
                )
            specs = [resume_spec(app, resume, database_url, clients, cpus_per_client, timeout)]
        else:
            specs = build_specs(
                app, strategy, friendly, run_config, clients, cpus_per_client, timeout
            )
    except SimulationError as exc:
        errors.print(f"[red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
        raise typer.Exit(2) from None
    try:
        results = run_simulations(
            app,
            specs,
            flwr_home=flwr_home,
            console=console,
            show_progress=not no_progress,
            database_url=store_url,
        )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: run stopped, SuperLink stopped[/]")
        raise typer.Exit(130) from None
    except SimulationError as exc:
        errors.print(f"[red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
        raise typer.Exit(1) from None
    console.print(results_table(results))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(
            json.dumps([r.to_json() for r in results], indent=2, default=str), encoding="utf-8"
        )
        console.print(f"results written to {json_out}")
    if not all(r.ok for r in results):
        raise typer.Exit(1)
