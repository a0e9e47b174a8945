"""Participation counters (issue 11): the counters answer exactly as the grouped query
over client-rounds did, on random data and both backends; the per-node totals are the sums
of the per-run counters, also after a run is deleted; migrations 0003 and 0004 backfill
them and revert; PostgreSQL appends a round in one prepared statement."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import delete, func, inspect, select, text

from api.appends import (
    COUNTER_FIELDS,
    NODE_PARTICIPATION_TABLE,
    PARTICIPATION_TABLE,
    PostgresAppender,
)
from api.db import downgrade, upgrade
from api.errors import ConflictError, InvalidError
from api.models import NODE_SHARDS, OUTCOMES, Run
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


def node_rows_from_run_counters(store: Store) -> list[tuple[object, ...]]:
    """node_participation as it must be: the per-run counters summed per node and shard
    (run id mod NODE_SHARDS)."""
    p = PARTICIPATION_TABLE.c
    shard = p.run_id % NODE_SHARDS
    sums = [func.sum(p[name]) for name in COUNTER_FIELDS]
    query = select(p.node_id, shard, *sums, func.max(p.last_round_at)).group_by(p.node_id, shard)
    return rows_of(store, query.order_by(p.node_id, shard))


def rows_of(store: Store, query: Any) -> list[tuple[object, ...]]:
    with store.engine.connect() as conn:
        return [
            tuple(int(v) if isinstance(v, float | Decimal) else v for v in r)
            for r in conn.execute(query)
        ]


def node_rows(store: Store) -> list[tuple[object, ...]]:
    n = NODE_PARTICIPATION_TABLE.c
    return rows_of(store, select(NODE_PARTICIPATION_TABLE).order_by(n.node_id, n.shard))


def test_node_totals_are_the_sums_of_the_run_counters(database_url: str) -> None:
    """Every column of node_participation (failed, other and the latest round's end too)
    is the sum (maximum) over the node's per-run counters of its shard's runs, after
    appends, refusals and the deletion of a run (the trigger recounts the nodes it took
    part in from the shard's other runs)."""
    store = open_store(database_url)
    run_ids = fill(store, seed=3)
    # a run in the same shard as the third: its counters add to the same rows
    rng = random.Random(6)
    same_shard = [store.create_run(RunInfo("mcm", "sq", "sq", "t", {})) for _ in range(8)][-1]
    assert same_shard % NODE_SHARDS == run_ids[2] % NODE_SHARDS
    for t in range(1, 9):
        store.append_round(same_shard, random_round(rng, t))
    expected = node_rows_from_run_counters(store)
    assert {r[0] for r in expected} == set(NODES) and {r[1] for r in expected} == {1, 2, 3}
    assert node_rows(store) == expected
    with store.engine.begin() as conn:
        conn.execute(delete(Run).where(Run.id == run_ids[2]))
    after = node_rows_from_run_counters(store)
    assert after != expected and node_rows(store) == after
    with store.engine.begin() as conn:  # every run gone: no node has totals left
        conn.execute(delete(Run))
    assert node_rows(store) == [] and store.participation(NODES) == {}


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


def test_migration_0004_backfills_and_reverts(database_url: str) -> None:
    store = open_store(database_url)
    fill(store, seed=4)
    engine = store.engine
    kept, answer = node_rows(store), counters_answer(store)
    downgrade(engine, "0003")
    assert "node_participation" not in inspect(engine).get_table_names()
    with engine.begin() as conn:  # the trigger went with it: deleting counters still works
        conn.execute(delete(PARTICIPATION_TABLE).where(PARTICIPATION_TABLE.c.node_id == 3))
    upgrade(engine)
    assert node_rows(store) == node_rows_from_run_counters(store)
    assert [r for r in kept if r[0] != 3] == node_rows(store)
    assert len(kept) > len(NODES)  # nodes in runs of several shards: several rows
    assert {k: v for k, v in answer.items() if k != 3} == counters_answer(store)
    fill(store, seed=5)  # appends after the upgrade keep them (and the trigger is back)
    assert node_rows(store) == node_rows_from_run_counters(store)
    with engine.begin() as conn:
        conn.execute(delete(Run).where(Run.id == 1))
    assert node_rows(store) == node_rows_from_run_counters(store)


def test_postgresql_appends_a_round_in_one_statement(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One prepared statement per appended round on PostgreSQL and nothing else sent (no
    ping before it), its parameters the same whatever the number of clients."""
    import psycopg

    store = open_store(database_url)
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite appends in steps inside one transaction")
    run_id = store.create_run(RunInfo("artemis", "sq", "sq", "task", {}))
    rng = random.Random(2)
    records = [r for r in (random_round(rng, 1) for _ in range(100)) if r.clients][:3]
    sent: list[tuple[str, bool | None]] = []
    execute = psycopg.Cursor.execute

    def counted(self: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append((str(query), kwargs.get("prepare")))
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counted)
    for t, record in enumerate(records, start=1):
        sent.clear()
        store.append_round(run_id, dataclasses.replace(record, round=t))
        assert len(sent) == 1 and sent[0][1] is True  # prepared
    monkeypatch.undo()
    assert sent[0][0] == PostgresAppender(store.engine).statement.sql
    nodes = {c.node_id for r in records for c in r.clients}
    with store.engine.connect() as conn:
        for table in (PARTICIPATION_TABLE, NODE_PARTICIPATION_TABLE):
            assert conn.execute(select(func.count()).select_from(table)).scalar() == len(nodes)


def test_pg_array_literals_read_back_exactly(database_url: str) -> None:
    """`pg_array` literals (quotes, backslashes, NULLs, floats' repr, negative ids) read
    back as the values they were built from."""
    from api.appends import pg_array

    store = open_store(database_url)
    if store.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL array literals")
    texts = ['a "quoted" \\ back\\slash', "{braces}, commas", "NULL", "", None, "ünï ✓"]
    floats = [0.1, 1e-300, -2.5e17, 1 / 3, None]
    ints = [0, -(1 << 63), (1 << 63) - 1, 12345]
    with store.engine.connect() as conn:
        got = conn.execute(
            text("SELECT CAST(:t AS TEXT[]), CAST(:f AS FLOAT[]), CAST(:i AS BIGINT[])"),
            {"t": pg_array(texts), "f": pg_array(floats), "i": pg_array(ints)},
        ).one()
    assert list(got) == [texts, floats, ints]
