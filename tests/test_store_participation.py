"""Participation counters (issue 11): the counters answer exactly as the grouped query
over client-rounds did, on random data and both backends; migration 0003 backfills them
and reverts; PostgreSQL appends a round in one statement."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, event, func, inspect, select, text

from api.appends import APPEND_POSTGRESQL, PARTICIPATION_TABLE
from api.db import downgrade, upgrade
from api.errors import ConflictError, InvalidError
from api.models import OUTCOMES, Run
from api.store import Store, open_store
from benchmarks.store import grouped_participation
from core.records import ClientRoundRecord, RoundRecord, RunInfo

BIG_NODE_ID = (1 << 64) - 3  # stored as a negative BIGINT
NODES = [*range(1, 9), BIG_NODE_ID]
START = datetime(2026, 3, 1, tzinfo=UTC)


def random_round(rng: random.Random, t: int) -> RoundRecord:
    """A round of 0-12 client-rounds: nodes may repeat, outcomes and bytes vary."""
    clients = [
        ClientRoundRecord(
            node_id=rng.choice(NODES),
            outcome=rng.choice(OUTCOMES),
            uplink_bytes=rng.choice([0, rng.randint(1, 10**6), 1 << 40]),
            downlink_bytes=rng.randint(0, 10**6),
            num_examples=rng.randint(0, 600),
            local_loss=rng.choice([None, 0.5, float("nan")]),
            error=rng.choice([None, "boom"]),
        )
        for _ in range(rng.randint(0, 12))
    ]
    began = START + timedelta(minutes=rng.randint(0, 10**5))  # ends not in round order
    return RoundRecord(
        round=t, sampled=len(clients), replied=0, failed=0,
        uplink_bytes=rng.randint(0, 10**6), downlink_bytes=0,
        predicted_uplink_bytes=0, predicted_downlink_bytes=0,
        started_at=began, ended_at=began + timedelta(seconds=rng.randint(0, 90)),
        clients=clients,
    )  # fmt: skip


def fill(store: Store, seed: int) -> list[int]:
    """Three runs of random rounds, with refused appends among them (a duplicate round,
    a closed run) that must leave the counters alone."""
    rng = random.Random(seed)
    run_ids = []
    for r in range(3):
        run_id = store.create_run(RunInfo("artemis", "sq", "sq", "task", {}))
        run_ids.append(run_id)
        for t in range(1, 16):
            store.append_round(run_id, random_round(rng, t))
        with pytest.raises(ConflictError):
            store.append_round(run_id, random_round(rng, 3))
        if r == 0:
            store.finish_run(run_id, "finished")
            with pytest.raises(ConflictError):
                store.append_round(run_id, random_round(rng, 99))
    return run_ids


def counters_answer(store: Store) -> dict[int, tuple[object, ...]]:
    return {k: tuple(vars(v).values()) for k, v in store.participation(NODES).items()}


def test_counters_answer_like_the_grouped_query(database_url: str) -> None:
    store = open_store(database_url)
    run_ids = fill(store, seed=0)
    expected = grouped_participation(store.engine, NODES)
    assert len(expected) == len(NODES)  # every node took part, the big one too
    assert counters_answer(store) == expected
    assert store.participation([12345]) == {}  # a node that never took part
    # the outcome counts the endpoint does not show: failed, and other (dropped, timeout)
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT outcome, count(*) FROM client_rounds GROUP BY outcome"))
        by_outcome: dict[str, int] = {outcome: int(n) for outcome, n in rows}
        kept = conn.execute(
            select(*(func.sum(PARTICIPATION_TABLE.c[n]) for n in ("ok", "failed", "other")))
        ).one()
    assert tuple(kept) == (
        by_outcome["ok"],
        by_outcome["failed"],
        by_outcome["dropped"] + by_outcome["timeout"],
    )
    # a deleted run takes its counters with it (and its client-rounds)
    with store.engine.begin() as conn:
        conn.execute(delete(Run).where(Run.id == run_ids[1]))
    assert counters_answer(store) == grouped_participation(store.engine, NODES)


def test_one_node_past_2_63_in_one_round(database_url: str) -> None:
    """A node's bytes in one round may sum past 2^63 - 1 (each client-round is bounded,
    their number is not): accepted, and read back (as the grouped query did: exact on
    PostgreSQL, a float's precision on SQLite)."""
    store = open_store(database_url)
    run_id = store.create_run(RunInfo("artemis", "sq", "sq", "task", {}))
    big = (1 << 62) - 1
    heavy = [ClientRoundRecord(node_id=77, outcome="ok", uplink_bytes=big)] * 3
    store.append_round(run_id, RoundRecord(1, 3, 3, 0, 1, 1, 1, 1, clients=heavy))
    store.append_round(run_id, RoundRecord(2, 3, 3, 0, 1, 1, 1, 1, clients=heavy))
    part = store.participation([77])[77]
    assert part.rounds == 6 and part.ok == 6
    assert abs(part.uplink_bytes - 6 * big) <= 6 * big * 1e-15
    if store.engine.dialect.name == "postgresql":
        assert part.uplink_bytes == 6 * big


def test_refused_overflowing_round_changes_no_counter(database_url: str) -> None:
    store = open_store(database_url)
    run_id = store.create_run(RunInfo("artemis", "sq", "sq", "task", {}))
    one = [ClientRoundRecord(node_id=5, outcome="ok", uplink_bytes=10)]
    store.append_round(run_id, RoundRecord(1, 1, 1, 0, (1 << 63) - 10, 0, 0, 0, clients=one))
    with pytest.raises(InvalidError, match="2\\^63"):
        store.append_round(run_id, RoundRecord(2, 1, 1, 0, 100, 0, 0, 0, clients=one))
    assert store.participation([5])[5].rounds == 1


def test_migration_0003_backfills_and_reverts(database_url: str) -> None:
    store = open_store(database_url)
    fill(store, seed=1)
    engine = store.engine

    def counter_rows() -> list[tuple[object, ...]]:
        with engine.connect() as conn:
            rows = conn.execute(select(PARTICIPATION_TABLE).order_by("node_id", "run_id"))
            return [tuple(int(v) if isinstance(v, float) else v for v in r) for r in rows]

    kept, answer = counter_rows(), counters_answer(store)
    with engine.connect() as conn:
        client_rounds = conn.execute(text("SELECT count(*) FROM client_rounds")).scalar()
    downgrade(engine, "0002")
    assert "client_participation" not in inspect(engine).get_table_names()
    with engine.connect() as conn:  # the history it was computed from stays
        assert conn.execute(text("SELECT count(*) FROM client_rounds")).scalar() == client_rounds
    upgrade(engine)
    assert counter_rows() == kept  # the backfill rebuilt exactly what the appends kept
    assert counters_answer(store) == answer == grouped_participation(engine, NODES)


def test_postgresql_appends_a_round_in_one_statement(database_url: str) -> None:
    """One statement per appended round on PostgreSQL, short enough (and with few enough
    parameters) for psycopg to cache its parsed form."""
    from psycopg._queries import MAX_CACHED_STATEMENT_LENGTH, MAX_CACHED_STATEMENT_PARAMS
    from sqlalchemy.dialects import postgresql

    compiled = APPEND_POSTGRESQL.compile(dialect=postgresql.psycopg.dialect())
    assert len(str(compiled)) <= MAX_CACHED_STATEMENT_LENGTH
    assert len(compiled.params) <= MAX_CACHED_STATEMENT_PARAMS
    store = open_store(database_url)
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite appends in steps inside one transaction")
    run_id = store.create_run(RunInfo("artemis", "sq", "sq", "task", {}))
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    rng = random.Random(2)
    record = next(r for r in (random_round(rng, 1) for _ in range(100)) if r.clients)
    store.append_round(run_id, record)
    assert len(statements) == 1
    with store.engine.connect() as conn:
        nodes = conn.execute(select(func.count()).select_from(PARTICIPATION_TABLE)).scalar()
    assert nodes == len({c.node_id for c in record.clients}) > 0
