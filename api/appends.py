"""The statements that append one round to the store, built once per process.

An appended round changes five tables at once: the run's running totals (``runs``), the
round (``rounds``), its client-rounds (``client_rounds``), each node's participation
counters for the run (``client_participation``, an upsert) and the enrolled clients'
``last_seen_at``. Either all of it happens or none.

- SQLite (in-process, no network): the steps in one transaction, the run's UPDATE first
  (it takes the write lock, so concurrent appends serialize cleanly): `UPDATE_TOTALS`,
  `INSERT_ROUND`, `INSERT_CLIENT_ROUND` (executemany), `UPSERT_PARTICIPATION_SQLITE`
  (executemany) and `seen_update`.
- PostgreSQL: the same five changes as ONE statement (`APPEND_POSTGRESQL`: data-modifying
  CTEs, the client-rounds and per-node totals passed as arrays and unnested, so the
  statement text and its number of parameters do not depend on the number of clients),
  executed on an autocommit connection: one round trip and one implicit transaction per
  round. Each CTE reads the one before it, so nothing is inserted unless the run's UPDATE
  matched (a running run whose totals stay below 2^63); a duplicate round number fails
  the whole statement. Its commit waits for the write-ahead-log flush like every other
  commit: an appended round survives a crash of the database server. That flush (2.6 ms
  on the development machine) alone limits one writer to ~390 rounds/s; committing without
  it (``synchronous_commit = off``) would be faster but could lose the last rounds a run
  reported, so the store does not.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    LABEL_STYLE_NONE,
    BigInteger,
    Float,
    Insert,
    Integer,
    String,
    Table,
    Text,
    any_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from api.models import ClientParticipation, ClientRound, Round, Run, UTCDateTime, u64_to_i64
from api.validation import MAX_TOTAL
from core.records import ClientRoundRecord, RoundRecord

RUNS_TABLE = typing.cast(Table, Run.__table__)
ROUNDS_TABLE = typing.cast(Table, Round.__table__)
CLIENT_ROUNDS_TABLE = typing.cast(Table, ClientRound.__table__)
PARTICIPATION_TABLE = typing.cast(Table, ClientParticipation.__table__)

BYTE_FIELDS = (
    "uplink_bytes",
    "downlink_bytes",
    "predicted_uplink_bytes",
    "predicted_downlink_bytes",
)
ROUND_FIELDS = (
    "round",
    "sampled",
    "replied",
    "failed",
    *BYTE_FIELDS,
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "phase_seconds",
    "started_at",
    "ended_at",
    "extra",
)
CLIENT_FIELDS = (
    "node_id",
    "outcome",
    "uplink_bytes",
    "downlink_bytes",
    "num_examples",
    "local_loss",
    "duration_s",
    "error",
)
COUNTER_FIELDS = (
    "rounds",
    "ok",
    "failed",
    "other",
    "uplink_bytes",
    "downlink_bytes",
    "num_examples",
)


# ---------------------------------------------------------------- parameters


# Parameter names are short: the PostgreSQL statement stays under psycopg's 4,096
# characters, the longest statement whose parsed form it caches (parsing it again costs
# 1.8 ms per round, more than the database's work). ``a<i>``: what the round adds to the
# run's total of SUMMED[i]; ``m<i>``: the room left under 2^63 - 1 for BYTE_FIELDS[i];
# ``r<i>``: ROUND_FIELDS[i] of the round; ``c<i>``: the array of CLIENT_FIELDS[i].
SUMMED = ("sampled", "replied", "failed", *BYTE_FIELDS)


def totals_params(
    run_id: int, record: RoundRecord, accuracy: float | None, now: datetime
) -> dict[str, Any]:
    """The parameters of `UPDATE_TOTALS`."""
    return {
        "run": run_id,
        "rnd": record.round,
        "acc": accuracy,
        "now": now,
        **{f"a{i}": getattr(record, name) for i, name in enumerate(SUMMED)},
        **{f"m{i}": MAX_TOTAL - getattr(record, name) for i, name in enumerate(BYTE_FIELDS)},
    }


def finite(value: float | None) -> float | None:
    """`value` as a float, or None if it is None, NaN or infinite (stored as NULL)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def client_row(c: ClientRoundRecord) -> dict[str, Any]:
    """A client-round's column values (non-finite floats stored as NULL)."""
    return {
        "node_id": c.node_id,
        "outcome": c.outcome,
        "uplink_bytes": c.uplink_bytes,
        "downlink_bytes": c.downlink_bytes,
        "num_examples": c.num_examples,
        "local_loss": finite(c.local_loss),
        "duration_s": finite(c.duration_s),
        "error": c.error,
    }


@dataclass
class NodeTotals:
    """One node's client-rounds in one round, summed (a node may appear more than once)."""

    rounds: int = 0
    ok: int = 0
    failed: int = 0
    other: int = 0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    num_examples: int = 0


def node_totals(record: RoundRecord) -> dict[int, NodeTotals]:
    """Per node id, the totals this round adds to its participation counters."""
    out: dict[int, NodeTotals] = {}
    for c in record.clients:
        t = out.setdefault(c.node_id, NodeTotals())
        t.rounds += 1
        if c.outcome in ("ok", "failed"):
            setattr(t, c.outcome, getattr(t, c.outcome) + 1)
        else:
            t.other += 1
        t.uplink_bytes += c.uplink_bytes
        t.downlink_bytes += c.downlink_bytes
        t.num_examples += c.num_examples
    return out


def seen_nodes(record: RoundRecord) -> list[int]:
    """The nodes that replied this round (their enrolment's ``last_seen_at`` moves)."""
    return sorted({c.node_id for c in record.clients if c.outcome == "ok"})


# ---------------------------------------------------------------- shared statement parts


def _update_totals() -> Any:
    """The run's totals updated in SQL (x = x + :v) so concurrent appends cannot lose an
    update, and only while x <= 2^63 - 1 - v (no total overflows a BIGINT); the best
    accuracy and its round change only when the new accuracy is higher (a NULL one never
    is, a NULL best always is lower: both compared as -inf)."""
    runs = RUNS_TABLE.c
    no_acc = bindparam("ninf", float("-inf"), type_=Float)
    acc = func.coalesce(bindparam("acc", type_=Float), no_acc)
    rnd = bindparam("rnd", type_=Integer)
    better = func.coalesce(runs.best_eval_accuracy, no_acc) < acc
    return (
        update(RUNS_TABLE)
        .where(
            runs.id == bindparam("run", type_=Integer),
            runs.status == literal_column("'running'"),
            *(
                runs[f"{name}_total"] <= bindparam(f"m{i}", type_=BigInteger)
                for i, name in enumerate(BYTE_FIELDS)
            ),
        )
        .values(
            rounds_done=runs.rounds_done + literal_column("1"),
            **{
                f"{name}_total": runs[f"{name}_total"] + bindparam(f"a{i}", type_=BigInteger)
                for i, name in enumerate(SUMMED)
            },
            last_round=case(
                (or_(runs.last_round.is_(None), runs.last_round < rnd), rnd),
                else_=runs.last_round,
            ),
            best_eval_accuracy=case((better, acc), else_=runs.best_eval_accuracy),
            best_eval_round=case((better, rnd), else_=runs.best_eval_round),
            updated_at=bindparam("now", type_=UTCDateTime()),
        )
    )


def _upsert_participation(stmt: Any, latest: Any) -> Any:
    """`stmt` (a dialect's INSERT into client_participation) made an upsert: on a
    (node, run) that has counters, add this round's to them and keep the later
    ``last_round_at`` (`latest`: the dialect's two-argument maximum)."""
    table, new = PARTICIPATION_TABLE.c, stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=[table.node_id, table.run_id],
        set_={
            **{name: table[name] + new[name] for name in COUNTER_FIELDS},
            "last_round_at": latest(table.last_round_at, new.last_round_at),
        },
    )


def seen_update(nodes: list[int], ended_at: datetime) -> Any:
    """Enrolled clients among `nodes` were last seen at `ended_at`."""
    clients = ClientRound.metadata.tables["clients"]
    return update(clients).where(clients.c.node_id.in_(nodes)).values(last_seen_at=ended_at)


# ---------------------------------------------------------------- SQLite: the steps

UPDATE_TOTALS = _update_totals()
INSERT_ROUND: Insert = insert(ROUNDS_TABLE).returning(ROUNDS_TABLE.c.id)
INSERT_CLIENT_ROUND: Insert = insert(CLIENT_ROUNDS_TABLE)
UPSERT_PARTICIPATION_SQLITE = _upsert_participation(sqlite.insert(PARTICIPATION_TABLE), func.max)


def participation_rows(run_id: int, record: RoundRecord) -> list[dict[str, Any]]:
    """The rows of `UPSERT_PARTICIPATION_SQLITE` for this round (one per node)."""
    # a node's sums over one round may pass 2^63 - 1, more than SQLite binds as an integer:
    # bound as a REAL then, as SQLite's own integer overflow would make it
    return [
        {
            "node_id": node,
            "run_id": run_id,
            "last_round_at": record.ended_at,
            **{k: float(v) if v > MAX_TOTAL else v for k, v in vars(t).items()},
        }
        for node, t in node_totals(record).items()
    ]


# ---------------------------------------------------------------- PostgreSQL: one statement

_CLIENT_ARRAY_TYPES: Mapping[str, Any] = {
    "node_id": BigInteger,
    "outcome": String,
    "uplink_bytes": BigInteger,
    "downlink_bytes": BigInteger,
    "num_examples": BigInteger,
    "local_loss": Float,
    "duration_s": Float,
    "error": Text,
}


def _client_arrays() -> Any:
    """``unnest(:c0::T0[], :c1::T1[], ...) AS c(c0, c1, ...)``: the client-rounds, column
    c<i> holding CLIENT_FIELDS[i]."""
    names = [f"c{i}" for i in range(len(CLIENT_FIELDS))]
    arrays = [
        bindparam(name, type_=postgresql.ARRAY(_CLIENT_ARRAY_TYPES[field]))
        for name, field in zip(names, CLIENT_FIELDS, strict=True)
    ]
    return func.unnest(*arrays).table_valued(*names).render_derived(name="c")


def _build_append_postgresql() -> Any:
    run_id = bindparam("run", type_=Integer)
    ended_at = bindparam(f"r{ROUND_FIELDS.index('ended_at')}", type_=UTCDateTime())
    totals = _update_totals().returning(RUNS_TABLE.c.id).cte("t")
    round_values = [
        bindparam(f"r{i}", type_=ROUNDS_TABLE.c[name].type) for i, name in enumerate(ROUND_FIELDS)
    ]
    new_round = (
        insert(ROUNDS_TABLE)
        .from_select(
            ["run_id", *ROUND_FIELDS],
            select(totals.c.id, *round_values).set_label_style(LABEL_STYLE_NONE),
        )
        .returning(ROUNDS_TABLE.c.id)
        .cte("r")
    )
    clients = _client_arrays()
    cr = CLIENT_ROUNDS_TABLE.c
    client_rounds = (
        insert(CLIENT_ROUNDS_TABLE)
        .from_select(
            ["round_id", *CLIENT_FIELDS],
            select(new_round.c.id, *clients.c)
            .select_from(new_round.join(clients, true()))
            .set_label_style(LABEL_STYLE_NONE),
        )
        .returning(cr.node_id, cr.outcome, cr.uplink_bytes, cr.downlink_bytes, cr.num_examples)
        .cte("cr")
    )
    # this round's counters per node, summed over the client-rounds just inserted
    new = client_rounds.c
    ok: Any = literal_column("'ok'")
    failed: Any = literal_column("'failed'")
    outcome_count = {
        "ok": func.count().filter(new.outcome == ok),
        "failed": func.count().filter(new.outcome == failed),
        "other": func.count().filter(new.outcome != ok, new.outcome != failed),
    }
    counters = _upsert_participation(
        postgresql.insert(PARTICIPATION_TABLE).from_select(
            ["node_id", "run_id", *COUNTER_FIELDS, "last_round_at"],
            select(
                new.node_id,
                run_id,
                func.count(),
                *outcome_count.values(),
                func.sum(new.uplink_bytes),
                func.sum(new.downlink_bytes),
                func.sum(new.num_examples),
                ended_at,
            )
            .group_by(new.node_id)
            .set_label_style(LABEL_STYLE_NONE),
        ),
        func.greatest,
    ).cte("n")
    clients_table = ClientRound.metadata.tables["clients"]
    seen = (
        update(clients_table)
        .where(
            clients_table.c.node_id == any_(bindparam("seen", type_=postgresql.ARRAY(BigInteger))),
            exists(select(new_round.c.id)),
        )
        .values(last_seen_at=ended_at)
        .cte("s")
    )
    return select(new_round.c.id).add_cte(counters, seen)


APPEND_POSTGRESQL = _build_append_postgresql()


def postgresql_params(
    run_id: int,
    record: RoundRecord,
    totals: dict[str, Any],
    round_row: dict[str, Any],
) -> dict[str, Any]:
    """The parameters of `APPEND_POSTGRESQL`: the totals', the round's (``r<i>``), the
    client-rounds as arrays (``c<i>``) and the nodes seen (``seen``). Node ids are mapped to
    signed BIGINTs here (arrays bypass the `UInt64` column type)."""
    rows = [client_row(c) for c in record.clients]
    params = {**totals, **{f"r{i}": round_row[name] for i, name in enumerate(ROUND_FIELDS)}}
    for i, name in enumerate(CLIENT_FIELDS):
        values = [r[name] for r in rows]
        params[f"c{i}"] = [u64_to_i64(v) for v in values] if name == "node_id" else values
    params["seen"] = [u64_to_i64(node) for node in seen_nodes(record)]
    return params
