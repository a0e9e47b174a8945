"""The round-history store on SQLite and PostgreSQL: migrations, recorder, stale runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, inspect, select, text

from api.db import (
    SchemaError,
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    make_engine,
    upgrade,
)
from api.errors import ConflictError, InvalidError, NotFoundError
from api.models import ApiToken, Base, ClientRound, Round, Run
from api.settings import Settings, resolve_database_url
from api.store import SqlRecorder, Store, hash_token, open_store
from core.records import ClientRoundRecord, RoundRecord, RunInfo

REPO_ROOT = Path(__file__).resolve().parent.parent
BIG_NODE_ID = (1 << 64) - 12345  # Flower node ids are unsigned 64-bit


def make_info(**kw: object) -> RunInfo:
    base: dict[str, object] = {
        "strategy": "artemis",
        "uplink_compressor": "sq:s=1",
        "downlink_compressor": "sq:s=1",
        "task": "fashion_mnist",
        "config": {"num-server-rounds": 3, "lr": 0.1},
        "num_parameters": 1000,
    }
    base.update(kw)
    return RunInfo(**base)  # type: ignore[arg-type]


def make_round(t: int, n_clients: int = 3, accuracy: float | None = None) -> RoundRecord:
    clients = [
        ClientRoundRecord(
            node_id=BIG_NODE_ID if i == 0 else 100 + i,
            outcome="ok" if i < n_clients - 1 else "failed",
            uplink_bytes=100 * (i + 1) if i < n_clients - 1 else 0,
            downlink_bytes=50 * (i + 1),
            num_examples=10 * (i + 1),
            local_loss=0.5 / t,
            duration_s=0.01,
            error=None if i < n_clients - 1 else "boom",
        )
        for i in range(n_clients)
    ]
    return RoundRecord(
        round=t,
        sampled=n_clients,
        replied=n_clients - 1,
        failed=1,
        uplink_bytes=sum(c.uplink_bytes for c in clients),
        downlink_bytes=sum(c.downlink_bytes for c in clients),
        predicted_uplink_bytes=sum(c.uplink_bytes for c in clients) - 1,
        predicted_downlink_bytes=sum(c.downlink_bytes for c in clients) - 1,
        train_loss=1.0 / t,
        eval_loss=1.2 / t,
        eval_accuracy=accuracy if accuracy is not None else 0.5 + 0.01 * t,
        phase_seconds={"configure": 0.1, "train": 1.0, "aggregate": 0.2, "evaluate": 0.3},
        clients=clients,
        extra={"resyncs": t % 2},
    )


@pytest.fixture
def store(database_url: str) -> Store:
    return open_store(database_url)


# ---------------------------------------------------------------- migrations and engine


def test_migrations_match_models_and_downgrade_works(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(database_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
        assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
        downgrade(engine, "base")
        assert current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) & set(Base.metadata.tables) == set()
        upgrade(engine)  # and back up again
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_token_scopes_migration_maps_and_revokes(database_url: str) -> None:
    """0001 -> 0002: is_admin becomes scope admin, other tokens writer; back down, tokens
    the old schema cannot restrict (reader, enrol, run-bound) are revoked."""
    engine = make_engine(database_url)
    now = datetime.now(UTC)
    try:
        upgrade(engine, "0001")
        with engine.begin() as conn:
            for name, admin in (("ops", True), ("serverapp", False)):
                conn.execute(
                    text(
                        "INSERT INTO api_tokens (name, token_sha256, is_admin, created_at) "
                        "VALUES (:n, :h, :a, :t)"
                    ),
                    {"n": name, "h": hash_token(name), "a": admin, "t": now},
                )
        upgrade(engine)
        store = Store(engine)
        ops, serverapp = store.verify_token("ops"), store.verify_token("serverapp")
        assert ops is not None and (ops.scope, ops.run_id) == ("admin", None)
        assert serverapp is not None and (serverapp.scope, serverapp.run_id) == ("writer", None)
        run_id = store.create_run(RunInfo("a", "b", "c", "d", {}))
        store.create_token("reader", scope="reader")
        store.create_token("bound", scope="writer", run_id=run_id)
        store.append_round(run_id, RoundRecord(1, 1, 1, 0, 1, 1, 1, 1))
        downgrade(engine, "0001")
        with engine.connect() as conn:  # the schema change kept every row
            assert conn.execute(text("SELECT count(*) FROM rounds")).scalar() == 1
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT name, is_admin, revoked_at IS NOT NULL FROM api_tokens")
            ).all()
        assert {r[0]: (bool(r[1]), bool(r[2])) for r in rows} == {
            "ops": (True, False),
            "serverapp": (False, False),
            "reader": (False, True),
            "bound": (False, True),
        }
    finally:
        engine.dispose()


def test_ensure_schema_refuses_foreign_database(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE something_else (x INTEGER)"))
        with pytest.raises(SchemaError, match="no fedsqueeze schema revision"):
            ensure_schema(engine)
    finally:
        engine.dispose()


def test_connections_the_server_closed_are_replaced(database_url: str) -> None:
    """Pooled and append connections are checked at checkout without a round trip (no
    pre-ping): one the server terminated (a restart, an administrator) is replaced, and
    the read or append that follows succeeds."""
    import psycopg

    store = open_store(database_url)
    if store.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL connections")
    run_id = store.create_run(make_info())
    store.append_round(run_id, make_round(1))
    with store.engine.connect() as conn:
        pooled = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    appender = store._postgres_appender
    assert appender is not None
    appending = appender._idle[0].info.backend_pid
    admin = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        for pid in (pooled, appending):
            assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        deadline = time.monotonic() + 10
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid IN (%s, %s)", (pooled, appending)
        ).fetchone() != (0,):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    time.sleep(0.1)  # the termination notice reaches the client sockets
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pooled
    store.append_round(run_id, make_round(2))
    assert appender._idle[0].info.backend_pid != appending
    assert store.get_run(run_id).rounds_done == 2


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x' / 'f.db'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


def test_database_url_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("FEDSQUEEZE_HOME", str(tmp_path))
    assert resolve_database_url() == f"sqlite:///{tmp_path}/fedsqueeze.db"
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h:5/db")
    assert resolve_database_url() == "postgresql+psycopg://u@h:5/db"
    assert resolve_database_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ValueError, match="unsupported database URL"):
        resolve_database_url("mysql://x")
    monkeypatch.setenv("FEDSQUEEZE_CORS_ORIGINS", "http://a, http://b")
    assert Settings.from_env().cors_origins == ["http://a", "http://b"]
    monkeypatch.setenv("FEDSQUEEZE_STALE_AFTER_S", "soon")
    with pytest.raises(ValueError, match="FEDSQUEEZE_STALE_AFTER_S"):
        Settings.from_env()


# ---------------------------------------------------------------- recorder


def test_recorder_round_trip_and_totals(database_url: str) -> None:
    recorder = SqlRecorder(database_url)
    run_id = recorder.start_run(make_info(flower_run_id=(1 << 63) + 7))
    accuracies = [0.6, 0.9, 0.7]
    for t, acc in enumerate(accuracies, start=1):
        recorder.record_round(run_id, make_round(t, accuracy=acc))
    recorder.finish_run(run_id, "finished")
    store = recorder.store

    run = store.get_run(run_id)
    assert run.status == "finished" and run.ended_at is not None
    assert run.flower_run_id == (1 << 63) + 7
    assert run.started_at.tzinfo is not None
    assert (run.rounds_done, run.last_round) == (3, 3)
    assert (run.best_eval_accuracy, run.best_eval_round) == (0.9, 2)
    # the running totals equal an aggregate over the stored rounds
    with store.session() as s:
        agg = s.execute(
            select(
                func.count(),
                func.sum(Round.uplink_bytes),
                func.sum(Round.downlink_bytes),
                func.sum(Round.sampled),
                func.sum(Round.replied),
                func.sum(Round.predicted_uplink_bytes),
            ).where(Round.run_id == run_id)
        ).one()
        assert tuple(agg) == (
            run.rounds_done,
            run.uplink_bytes_total,
            run.downlink_bytes_total,
            run.sampled_total,
            run.replied_total,
            run.predicted_uplink_bytes_total,
        )
        client_up = s.execute(
            select(func.sum(ClientRound.uplink_bytes)).join(Round).where(Round.run_id == run_id)
        ).scalar_one()
        assert client_up == run.uplink_bytes_total
    rnd, clients = store.get_round(run_id, 2)
    assert rnd.eval_accuracy == 0.9 and rnd.phase_seconds["train"] == 1.0
    assert rnd.extra == {"resyncs": 0}
    assert [c.node_id for c in clients] == [BIG_NODE_ID, 101, 102]
    assert clients[2].outcome == "failed" and clients[2].error == "boom"
    assert store.participation([BIG_NODE_ID])[BIG_NODE_ID].rounds == 3


def test_duplicate_round_is_refused_and_changes_nothing(store: Store) -> None:
    run_id = store.create_run(make_info())
    store.append_round(run_id, make_round(1))
    before = store.get_run(run_id)
    with pytest.raises(ConflictError, match="already has round 1"):
        store.append_round(run_id, make_round(1, n_clients=5))
    after = store.get_run(run_id)
    assert (after.rounds_done, after.uplink_bytes_total, after.sampled_total) == (
        before.rounds_done,
        before.uplink_bytes_total,
        before.sampled_total,
    )
    _, clients = store.get_round(run_id, 1)
    assert len(clients) == 3


def test_closed_unknown_and_invalid(store: Store) -> None:
    run_id = store.create_run(make_info())
    with pytest.raises(NotFoundError):
        store.append_round(run_id + 1000, make_round(1))
    bad = make_round(1)
    bad.clients[0].outcome = "exploded"
    with pytest.raises(InvalidError, match=r"clients\[0\]\.outcome"):
        store.append_round(run_id, bad)
    bad = make_round(1)
    bad.replied = 10
    with pytest.raises(InvalidError, match="exceed sampled"):
        store.append_round(run_id, bad)
    assert store.list_rounds(run_id).total == 0
    assert store.get_run(run_id).rounds_done == 0
    with pytest.raises(InvalidError, match="status must be one of"):
        store.finish_run(run_id, "done")
    store.finish_run(run_id, "failed")
    store.finish_run(run_id, "failed")  # idempotent
    with pytest.raises(ConflictError, match="already failed"):
        store.finish_run(run_id, "finished")
    with pytest.raises(ConflictError, match="no longer"):
        store.append_round(run_id, make_round(1))
    with pytest.raises(InvalidError, match="strategy"):
        store.create_run(make_info(strategy=""))


def test_non_finite_metrics_are_kept_as_null_and_noted(store: Store) -> None:
    run_id = store.create_run(make_info())
    record = make_round(1)
    record.train_loss = float("nan")
    record.eval_accuracy = float("inf")
    store.append_round(run_id, record)
    rnd, _ = store.get_round(run_id, 1)
    assert rnd.train_loss is None and rnd.eval_accuracy is None
    assert rnd.extra["non_finite"] == {"train_loss": "nan", "eval_accuracy": "inf"}
    assert store.get_run(run_id).best_eval_accuracy is None


def test_deleting_a_run_cascades(store: Store) -> None:
    run_id = store.create_run(make_info())
    store.append_round(run_id, make_round(1))
    with store.engine.begin() as conn:
        conn.execute(delete(Run).where(Run.id == run_id))
    with store.session() as s:
        assert s.execute(select(func.count()).select_from(Round)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(ClientRound)).scalar_one() == 0


def test_tokens_are_stored_hashed(store: Store) -> None:
    token_id, token = store.create_token("ci", admin=True)
    assert len(token) >= 40
    with store.session() as s:
        row = s.get(ApiToken, token_id)
        assert row is not None and row.token_sha256 == hash_token(token)
        assert token not in (row.token_sha256, row.name)
    found = store.verify_token(token)
    assert found is not None and found.is_admin and found.scope == "admin"
    with pytest.raises(InvalidError, match="only writer tokens"):
        store.create_token("x", scope="reader", run_id=1)
    with pytest.raises(NotFoundError, match="run 4242"):
        store.create_token("x", scope="writer", run_id=4242)
    with pytest.raises(InvalidError, match="scope must be one of"):
        store.create_token("x", scope="root")
    with pytest.raises(NotFoundError):
        store.revoke_token(1 << 70)
    assert store.verify_token(token + "x") is None
    store.revoke_token(token_id)
    assert store.verify_token(token) is None
    with pytest.raises(NotFoundError):
        store.revoke_token(token_id)


def test_clients_enrol_disable_remove(store: Store) -> None:
    c = store.enroll_client(name="pi-1", public_key_pem="PEM", node_id=BIG_NODE_ID)
    assert c.node_id == BIG_NODE_ID and c.status == "active"
    with pytest.raises(ConflictError, match="name"):
        store.enroll_client(name="pi-1", public_key_pem="PEM", node_id=None)
    with pytest.raises(ConflictError, match="node id"):
        store.enroll_client(name="pi-2", public_key_pem="PEM", node_id=BIG_NODE_ID)
    run_id = store.create_run(make_info())
    store.append_round(run_id, make_round(1))
    assert store.get_client(c.id).last_seen_at is not None
    assert store.set_client_status(c.id, "disabled").status == "disabled"
    store.delete_client(c.id)
    with pytest.raises(NotFoundError):
        store.get_client(c.id)
    assert store.list_rounds(run_id).total == 1  # history stays


# ---------------------------------------------------------------- stale runs and crashes


def test_stale_runs_are_marked_interrupted(store: Store) -> None:
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    dead_run = store.create_run(make_info(), recorder_host=host, recorder_pid=dead.pid)
    live_run = store.create_run(make_info(), recorder_host=host, recorder_pid=os.getpid())
    remote_run = store.create_run(make_info(), recorder_host="elsewhere", recorder_pid=1)
    finished = store.create_run(make_info(), recorder_host=host, recorder_pid=dead.pid)
    store.finish_run(finished, "finished")
    assert store.mark_stale_runs(3600) == [dead_run]
    later = datetime.now(UTC) + timedelta(hours=2)
    assert store.mark_stale_runs(3600, now=later) == [live_run, remote_run]
    assert store.get_run(dead_run).status == "interrupted"
    assert store.get_run(finished).status == "finished"


CRASHING_RECORDER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from api.store import SqlRecorder
    from tests.test_store import make_info, make_round
    rec = SqlRecorder({url!r})
    run_id = rec.start_run(make_info())
    for t in range(1, 4):
        rec.record_round(run_id, make_round(t))
    print(run_id, flush=True)
    if {hard}:
        os._exit(3)  # a crash: no clean-up code runs
    """
)


@pytest.mark.parametrize("hard", [True, False], ids=["crash", "exit-without-finish"])
def test_recorder_process_dies_mid_run(database_url: str, hard: bool) -> None:
    script = CRASHING_RECORDER.format(root=str(REPO_ROOT), url=database_url, hard=hard)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert out.returncode == (3 if hard else 0), out.stderr
    run_id = int(out.stdout.split()[0])
    store = open_store(database_url)  # start-up runs the stale check
    run = store.get_run(run_id)
    assert run.status == "interrupted"
    assert run.rounds_done == 3 and store.list_rounds(run_id).total == 3
