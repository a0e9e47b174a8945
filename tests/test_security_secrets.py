"""A database password never leaves its place (issue 8.2, 8.3).

A random sentinel password is put into the store URL (PostgreSQL here trusts local
connections, so any password works) and then looked for everywhere it could leak: every
row of every table of the store, the REST answers, every file a run leaves (Flower's state
database and its WAL, the logs, the FLWR_HOME, the FEDSQUEEZE_HOME) and the output of the
commands, including commands that fail (a missing database, a refused run-config key, a
URL of an unsupported kind), which must each end in one error line without a traceback.

The deployment side (the same checks on `fedsqueeze server start` + `fedsqueeze run`) is
`tests/test_deploy.py::test_deployment_records_to_postgresql`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core.secrets import redact_text

FEDSQUEEZE = str(Path(sys.executable).with_name("fedsqueeze"))
ROOT = Path(__file__).resolve().parents[1]


def _sentinel() -> str:
    return "pw-sentinel-" + secrets.token_hex(8)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "FEDSQUEEZE_HOME": str(tmp_path / "home"), "COLUMNS": "300"}
    for name in ("DATABASE_URL", "FEDSQUEEZE_DEBUG", "FEDSQUEEZE_TOKEN"):
        env.pop(name, None)
    return env


def _cli(
    tmp_path: Path, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDSQUEEZE, *args],
        cwd=ROOT,
        env=_env(tmp_path) | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def files_holding(secret: str, *roots: Path) -> list[Path]:
    """Every file under `roots` whose bytes contain `secret`."""
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
                found.append(path)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_redaction_helpers_cover_the_forms_a_password_takes() -> None:
    pw = _sentinel()
    for text in (
        f"postgresql://postgres:{pw}@127.0.0.1:5432/x",
        f"Could not parse URL 'postgresql+psycopg://u:{pw}@h/db'",
        f"host=h password={pw} dbname=x",
        f"http://u:{pw}@127.0.0.1:1/runs",
    ):
        assert pw not in redact_text(text), text


@pytest.mark.postgres
def test_failing_commands_show_one_line_and_no_password(tmp_path: Path) -> None:
    from conftest import postgres_reachable

    if not postgres_reachable():
        pytest.skip("PostgreSQL unreachable")
    pw = _sentinel()
    missing = f"postgresql://postgres:{pw}@127.0.0.1:5432/fsq_missing_{secrets.token_hex(4)}"
    server = tmp_path / "server"
    cases: list[tuple[tuple[str, ...], int]] = [
        (("db", "upgrade", "--database-url", missing), 1),
        (("db", "current", "--database-url", missing), 1),
        (("db", "downgrade", "base", "--yes", "--database-url", missing), 1),
        (("db", "mark-stale", "--database-url", missing), 1),
        (("simulate", "--database-url", f"mysql://u:{pw}@h/x", "--no-progress"), 2),
        (("simulate", "-c", f"database-url='{missing}'", "--no-progress"), 2),
        (("run", "--strategy", "artemis", "-c", f"database-url='{missing}'",
          "--data-dir", str(tmp_path / "no-server")), 2),
        (("server", "start", "--data-dir", str(server), "--database-url", missing,
          "--superlink-port", str(_free_port()), "--api-port", str(_free_port())), 1),
    ]  # fmt: skip
    try:
        for args, code in cases:
            done = _cli(tmp_path, *args)
            out = done.stdout + done.stderr
            assert done.returncode == code, (args[:2], done.returncode, out)
            assert pw not in out, (args[:2], out)
            assert "Traceback" not in out and "locals" not in out, (args[:2], out)
            errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and done.stderr.strip().endswith(errors[0]), (args[:2], out)
    finally:
        if (server / "server.json").exists():
            _cli(tmp_path, "server", "stop", "--data-dir", str(server))
    # the failed start keeps the URL only in its own 0600 configuration file
    leaks = [p for p in files_holding(pw, tmp_path) if p != server / "server.json"]
    assert leaks == []
    if (server / "server.json").exists():
        assert (server / "server.json").stat().st_mode & 0o077 == 0


@pytest.mark.postgres
def test_debug_traceback_is_redacted_and_has_no_locals(tmp_path: Path) -> None:
    from conftest import postgres_reachable

    if not postgres_reachable():
        pytest.skip("PostgreSQL unreachable")
    pw = _sentinel()
    missing = f"postgresql://postgres:{pw}@127.0.0.1:5432/fsq_missing_{secrets.token_hex(4)}"
    done = _cli(tmp_path, "db", "upgrade", "--database-url", missing, FEDSQUEEZE_DEBUG="1")
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr  # asked for, so shown ...
    assert pw not in done.stdout + done.stderr  # ... redacted
    assert "dialect = <" not in done.stderr and "│" not in done.stderr  # no locals, no boxes
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")  # still one error line


@pytest.mark.slow
@pytest.mark.postgres
def test_simulation_keeps_the_store_password_out_of_configs_state_logs_and_answers(
    tmp_path: Path,
) -> None:
    from conftest import LiveService, throwaway_postgres
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    pw = _sentinel()
    flwr_home = tmp_path / "flwr-home"
    out_json = tmp_path / "results.json"
    with throwaway_postgres() as plain_url:
        url = make_url(plain_url).set(password=pw).render_as_string(hide_password=False)
        done = _cli(tmp_path, "simulate", "--strategy", "artemis", "--rounds", "2",
                    "--clients", "2", "--database-url", url, "--flwr-home", str(flwr_home),
                    "--json", str(out_json), "--no-progress", timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (result,) = json.loads(out_json.read_text())
        assert [r["round"] for r in result["rounds"]] == [1, 2]
        run_id = result["store_run_id"]
        assert run_id is not None
        # the store: the rounds landed there, and no row of any table holds the password
        engine = create_engine(plain_url)
        try:
            with engine.connect() as conn:
                tables = conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
                rows = [
                    row
                    for table in list(tables)
                    for row in conn.execute(
                        text(f'SELECT row_to_json(t)::text FROM "{table}" t')
                    ).scalars()
                ]
                stored = conn.execute(
                    text("SELECT config FROM runs WHERE id = :r"), {"r": run_id}
                ).scalar_one()
        finally:
            engine.dispose()
        assert len(rows) > 3 and not [r for r in rows if pw in r]
        config = stored if isinstance(stored, dict) else json.loads(stored)
        assert config["strategy"] == "artemis" and "database-url" not in config
        # the REST service, over HTTP, answers without it
        service = LiveService(url, tmp_path / "api-home")
        try:
            service.start()
            bodies = [
                httpx.get(service.url + path, timeout=30)
                for path in ("/runs", f"/runs/{run_id}", f"/runs/{run_id}/rounds",
                             f"/compare?runs={run_id}")
            ]  # fmt: skip
        finally:
            service.stop()
        assert [b.status_code for b in bodies[:3]] == [200, 200, 200]
        assert not [b.request.url for b in bodies if pw in b.text]
    # nothing the run left holds it: Flower's state (and WAL), logs, FLWR_HOME, homes
    assert list(flwr_home.glob("superlink-state.db*")) and list(flwr_home.glob("logs/*.log"))
    assert files_holding(pw, tmp_path) == []
    assert pw not in done.stdout + done.stderr
