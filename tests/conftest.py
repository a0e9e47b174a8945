"""Shared fixtures: throwaway databases (SQLite and PostgreSQL) and a live REST service.

PostgreSQL: the server at ``FSQ_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``) is used to create a database
``fsq_test_<random>`` per test, dropped afterwards; tests needing it are skipped only when
the server is unreachable.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "FSQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


def _pg_conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def postgres_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(_pg_conninfo(POSTGRES_ADMIN_URL), connect_timeout=3):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Create database ``fsq_test_<random>``; yield its URL; drop it (even on failure)."""
    import psycopg
    from sqlalchemy.engine import make_url

    if not postgres_reachable():
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}")
    name = f"fsq_test_{secrets.token_hex(6)}"
    with psycopg.connect(_pg_conninfo(POSTGRES_ADMIN_URL), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        from api.db import _engines

        for key in [k for k in _engines if k.endswith("/" + name)]:
            _engines.pop(key).dispose()
        with psycopg.connect(_pg_conninfo(POSTGRES_ADMIN_URL), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fedsqueeze.db'}"
        from api.db import _engines

        for key in [k for k in _engines if str(tmp_path) in k]:
            _engines.pop(key).dispose()
    else:
        with throwaway_postgres() as url:
            yield url


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveService:
    """A `fedsqueeze api serve` process (real uvicorn) on a free port."""

    def __init__(
        self,
        database_url: str,
        home: Path,
        env: dict[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        options: tuple[str, ...] = (),
    ) -> None:
        self.database_url = database_url
        self.host, self.options = host, list(options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.log_path = home / "api.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        import httpx

        env = dict(os.environ)
        env.update(
            {"FEDSQUEEZE_HOME": str(self.home), "DATABASE_URL": self.database_url} | self.extra_env
        )
        self.home.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "api", "serve", "--host", self.host,
             "--port", str(self.port), "--database-url", self.database_url, *self.options],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"api serve exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"api serve did not come up: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def live_service(database_url: str, tmp_path: Path) -> Iterator[LiveService]:
    service = LiveService(database_url, tmp_path / "home")
    try:
        service.start()
        yield service
    finally:
        service.stop()


def simulate_in_process(server_app: Any, client_app: Any, num_supernodes: int, tmp: Path) -> None:
    """Flower's in-process simulation engine (`flwr.simulation.run_simulation`, Ray) with
    its own FLWR_HOME and a SQLite store under `tmp` (the ServerApp takes its store from
    $DATABASE_URL: database-url is no run-config key); both variables are restored after,
    even when the simulation fails."""
    from flwr.simulation import run_simulation

    env = {"FLWR_HOME": str(tmp / "flwr-home"), "DATABASE_URL": f"sqlite:///{tmp / 'history.db'}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config={
                "client_resources": {"num_cpus": 1},
                "init_args": {"num_cpus": 2, "include_dashboard": False},
            },
        )
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
