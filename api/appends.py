"""The statements that append one round to the store, compiled once per process.

An appended round changes six tables at once: the run's running totals (``runs``), the
round (``rounds``), its client-rounds (``client_rounds``), each node's participation
counters for the run (``client_participation``, an upsert) and over all runs
(``node_participation``, an upsert into the run's shard), and the enrolled clients'
``last_seen_at``. Either
all of it happens or none.

The statements are SQLAlchemy constructs, compiled once into SQL text with positional
parameters (`Positional`) and executed on the driver's own cursor: SQLAlchemy's per-call
work (cache key, parameter processing of every row, result set-up) cost more CPU than
the database's work on both backends. The values still pass SQLAlchemy's bind processors
of each column type (UTC timestamps, unsigned node ids, JSON), so they are stored exactly
as through the ORM.

- SQLite (in-process, no network): the steps in one transaction, the run's UPDATE first
  (it takes the write lock, so concurrent appends serialize cleanly): `UPDATE_TOTALS`,
  `INSERT_ROUND`, `INSERT_CLIENT_ROUND`, `UPSERT_PARTICIPATION_SQLITE`,
  `UPSERT_NODE_PARTICIPATION_SQLITE` and `SEEN_UPDATE` (executemany where there is a row
  per client or node).
- PostgreSQL: the same six changes as ONE statement (`APPEND_POSTGRESQL`: data-modifying
  CTEs, the client-rounds passed as arrays and unnested, so the statement text and its
  number of parameters do not depend on the number of clients), prepared once per
  connection (`PostgresAppender`) and executed in autocommit mode: one round trip and one
  implicit transaction per round. The arrays are passed as PostgreSQL array literals built
  here (`pg_array`; psycopg's generic list dumping was most of the client's CPU). Each CTE
  reads the one before it, so nothing is inserted unless the run's UPDATE matched (a
  running run whose totals stay below 2^63); a duplicate round number fails the whole
  statement. The per-node rows are locked in node id order, so concurrent appends whose
  runs share a shard (`api.models.NODE_SHARDS`) and nodes wait for each other but never
  deadlock. Its commit waits for the
  write-ahead-log flush like every other commit: an appended round survives a crash of
  the database server.
"""

from __future__ import annotations

import contextlib
import math
import threading
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    LABEL_STYLE_NONE,
    BigInteger,
    Engine,
    Float,
    Integer,
    String,
    Table,
    Text,
    any_,
    bindparam,
    case,
    event,
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
from sqlalchemy.engine import Dialect

from api.db import socket_readable
from api.models import (
    NODE_SHARDS,
    ClientParticipation,
    ClientRound,
    NodeParticipation,
    Round,
    Run,
    UTCDateTime,
    u64_to_i64,
)
from api.validation import MAX_TOTAL
from core.records import ClientRoundRecord, RoundRecord

RUNS_TABLE = typing.cast(Table, Run.__table__)
ROUNDS_TABLE = typing.cast(Table, Round.__table__)
CLIENT_ROUNDS_TABLE = typing.cast(Table, ClientRound.__table__)
PARTICIPATION_TABLE = typing.cast(Table, ClientParticipation.__table__)
NODE_PARTICIPATION_TABLE = typing.cast(Table, NodeParticipation.__table__)
CLIENTS_TABLE = ClientRound.metadata.tables["clients"]

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


# ``a<i>``: what the round adds to the run's total of SUMMED[i]; ``m<i>``: the room left
# under 2^63 - 1 for BYTE_FIELDS[i]; ``r<i>``: ROUND_FIELDS[i] of the round; ``c<i>``: the
# array of CLIENT_FIELDS[i].
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
        t = out.get(c.node_id)
        if t is None:
            t = out[c.node_id] = NodeTotals()
        t.rounds += 1
        if c.outcome == "ok":
            t.ok += 1
        elif c.outcome == "failed":
            t.failed += 1
        else:
            t.other += 1
        t.uplink_bytes += c.uplink_bytes
        t.downlink_bytes += c.downlink_bytes
        t.num_examples += c.num_examples
    return out


def node_shard(run_id: int) -> int:
    """The shard of a run's rows in ``node_participation`` (`api.models.NODE_SHARDS`)."""
    return run_id % NODE_SHARDS


def seen_nodes(record: RoundRecord) -> list[int]:
    """The nodes that replied this round (their enrolment's ``last_seen_at`` moves)."""
    return sorted({c.node_id for c in record.clients if c.outcome == "ok"})


# ---------------------------------------------------------------- compiled once


def _bind_processor(type_: Any, dialect: Dialect) -> Any:
    """The function SQLAlchemy applies to a value of `type_` bound for `dialect`."""
    return type_.dialect_impl(dialect).bind_processor(dialect)


class Positional:
    """`statement` compiled once for `dialect` into SQL text with positional parameters,
    and the bind processors of its parameters' types for `bind_dialect` (default
    `dialect`; `raw`: names passed as given).

    ``params(values)`` orders and processes a mapping of parameter values as the driver
    wants them, as SQLAlchemy would for each execution, without its per-call machinery.
    A parameter missing from `values` takes the value bound in the statement."""

    def __init__(
        self,
        statement: Any,
        dialect: Dialect,
        raw: Sequence[str] = (),
        bind_dialect: Dialect | None = None,
    ) -> None:
        compiled = statement.compile(dialect=dialect)
        bind_dialect = bind_dialect or dialect
        self.sql = str(compiled)
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        binds = compiled.binds
        self._defaults = {name: binds[name].value for name in self.names}
        self._steps = [
            (name, None if name in raw else _bind_processor(binds[name].type, bind_dialect))
            for name in self.names
        ]

    def params(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        out = []
        for name, process in self._steps:
            value = values[name] if name in values else self._defaults[name]
            out.append(value if process is None or value is None else process(value))
        return tuple(out)


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


def _upsert_counters(stmt: Any, table: Table, keys: Sequence[str], latest: Any) -> Any:
    """`stmt` (a dialect's INSERT into a counters table keyed by `keys`) made an upsert:
    on a key that has counters, add this round's to them and keep the later
    ``last_round_at`` (`latest`: the dialect's two-argument maximum)."""
    c, new = table.c, stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=[c[k] for k in keys],
        set_={
            **{name: c[name] + new[name] for name in COUNTER_FIELDS},
            "last_round_at": latest(c.last_round_at, new.last_round_at),
        },
    )


def _values(table: Table, names: Sequence[str]) -> dict[str, Any]:
    return {name: bindparam(name, type_=table.c[name].type) for name in names}


# ---------------------------------------------------------------- SQLite: the steps

UPDATE_TOTALS = _update_totals()
INSERT_ROUND = insert(ROUNDS_TABLE).values(_values(ROUNDS_TABLE, ("run_id", *ROUND_FIELDS)))
INSERT_CLIENT_ROUND = insert(CLIENT_ROUNDS_TABLE).values(
    _values(CLIENT_ROUNDS_TABLE, ("round_id", *CLIENT_FIELDS))
)


def _sqlite_upsert_counters(table: Table, keys: Sequence[str]) -> Any:
    """SQLite's upsert of one row of `table`'s counters (keyed by `keys`)."""
    row = _values(table, (*keys, *COUNTER_FIELDS, "last_round_at"))
    return _upsert_counters(sqlite.insert(table).values(row), table, keys, func.max)


UPSERT_PARTICIPATION_SQLITE = _sqlite_upsert_counters(PARTICIPATION_TABLE, ("node_id", "run_id"))
UPSERT_NODE_PARTICIPATION_SQLITE = _sqlite_upsert_counters(
    NODE_PARTICIPATION_TABLE, ("node_id", "shard")
)
SEEN_UPDATE = (
    update(CLIENTS_TABLE)
    .where(CLIENTS_TABLE.c.node_id == bindparam("node_id", type_=CLIENTS_TABLE.c.node_id.type))
    .values(last_seen_at=bindparam("last_seen_at", type_=UTCDateTime()))
)


def counter_rows(record: RoundRecord) -> list[dict[str, Any]]:
    """This round's counters per node with ``last_round_at``: the rows of the SQLite
    upserts (to which ``run_id`` or ``shard`` is added)."""
    # a node's sums over one round may pass 2^63 - 1, more than SQLite binds as an integer:
    # bound as a REAL then, as SQLite's own integer overflow would make it
    return [
        {
            "node_id": node,
            "last_round_at": record.ended_at,
            **{k: float(v) if v > MAX_TOTAL else v for k, v in vars(t).items()},
        }
        for node, t in node_totals(record).items()
    ]


class SqliteSteps:
    """The SQLite steps of an append, compiled for one engine's dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.update_totals = Positional(UPDATE_TOTALS, dialect)
        self.insert_round = Positional(INSERT_ROUND, dialect)
        self.insert_client_round = Positional(INSERT_CLIENT_ROUND, dialect)
        self.upsert_participation = Positional(UPSERT_PARTICIPATION_SQLITE, dialect)
        self.upsert_node_participation = Positional(UPSERT_NODE_PARTICIPATION_SQLITE, dialect)
        self.seen_update = Positional(SEEN_UPDATE, dialect)

    def append(
        self,
        cursor: Any,
        run_id: int,
        record: RoundRecord,
        totals: dict[str, Any],
        round_row: dict[str, Any],
    ) -> int | None:
        """Run the steps on `cursor` (inside the caller's transaction); the new round's
        row id, or None if the run's UPDATE matched no row (nothing else was done). A
        duplicate round number raises the driver's IntegrityError."""
        cursor.execute(self.update_totals.sql, self.update_totals.params(totals))
        if cursor.rowcount == 0:
            return None
        cursor.execute(
            self.insert_round.sql, self.insert_round.params({"run_id": run_id, **round_row})
        )
        round_id = int(cursor.lastrowid)
        if not record.clients:
            return round_id
        rows = self.insert_client_round
        cursor.executemany(
            rows.sql, [rows.params({"round_id": round_id, **client_row(c)}) for c in record.clients]
        )
        counters = counter_rows(record)
        per_run = self.upsert_participation
        cursor.executemany(per_run.sql, [per_run.params({"run_id": run_id, **r}) for r in counters])
        per_node = self.upsert_node_participation
        shard = node_shard(run_id)
        cursor.executemany(per_node.sql, [per_node.params({"shard": shard, **r}) for r in counters])
        seen = self.seen_update
        at = record.ended_at
        cursor.executemany(
            seen.sql,
            [seen.params({"node_id": n, "last_seen_at": at}) for n in seen_nodes(record)],
        )
        return round_id


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
#: the parameters passed as array literals (`pg_array`), not through a bind processor
ARRAY_PARAMS = (*(f"c{i}" for i in range(len(CLIENT_FIELDS))), "seen")


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
    per_node = (
        select(
            new.node_id,
            func.count().label("rounds"),
            func.count().filter(new.outcome == ok).label("ok"),
            func.count().filter(new.outcome == failed).label("failed"),
            func.count().filter(new.outcome != ok, new.outcome != failed).label("other"),
            func.sum(new.uplink_bytes).label("uplink_bytes"),
            func.sum(new.downlink_bytes).label("downlink_bytes"),
            func.sum(new.num_examples).label("num_examples"),
        )
        .group_by(new.node_id)
        .cte("g")
    )
    g = per_node.c
    counters = [g[name] for name in COUNTER_FIELDS]
    # both upserts take their rows in node id order: concurrent appends lock the nodes'
    # rows in the same order, so they may wait for each other but never deadlock
    run_counters = _upsert_counters(
        postgresql.insert(PARTICIPATION_TABLE).from_select(
            ["node_id", "run_id", *COUNTER_FIELDS, "last_round_at"],
            select(g.node_id, run_id, *counters, ended_at)
            .order_by(g.node_id)
            .set_label_style(LABEL_STYLE_NONE),
        ),
        PARTICIPATION_TABLE,
        ("node_id", "run_id"),
        func.greatest,
    ).cte("n")
    node_counters = _upsert_counters(
        postgresql.insert(NODE_PARTICIPATION_TABLE).from_select(
            ["node_id", "shard", *COUNTER_FIELDS, "last_round_at"],
            select(g.node_id, bindparam("shard", type_=Integer), *counters, ended_at)
            .order_by(g.node_id)
            .set_label_style(LABEL_STYLE_NONE),
        ),
        NODE_PARTICIPATION_TABLE,
        ("node_id", "shard"),
        func.greatest,
    ).cte("nn")
    seen = (
        update(CLIENTS_TABLE)
        .where(
            CLIENTS_TABLE.c.node_id == any_(bindparam("seen", type_=postgresql.ARRAY(BigInteger))),
            exists(select(new_round.c.id)),
        )
        .values(last_seen_at=ended_at)
        .cte("s")
    )
    return select(new_round.c.id).add_cte(run_counters, node_counters, seen)


APPEND_POSTGRESQL = _build_append_postgresql()


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pg_array(values: Sequence[Any]) -> str:
    """A PostgreSQL array literal of `values`: ints, finite floats (as `repr`, which
    reads back as the same float8), strings (quoted) or None (NULL)."""
    return (
        "{"
        + ",".join(
            "NULL" if v is None else _quoted(v) if isinstance(v, str) else repr(v) for v in values
        )
        + "}"
    )


def _int_array(values: Iterator[int]) -> str:
    """`pg_array` of ints (validated: `int`s, no None), the common case made cheap."""
    return "{" + ",".join(map(str, values)) + "}"


def _float_array(values: Iterator[float | None]) -> str:
    """`pg_array` of `finite` floats: None, NaN and infinities as NULL."""
    return (
        "{"
        + ",".join("NULL" if v is None or not math.isfinite(v) else repr(float(v)) for v in values)
        + "}"
    )


def postgresql_params(
    run_id: int,
    record: RoundRecord,
    totals: dict[str, Any],
    round_row: dict[str, Any],
) -> dict[str, Any]:
    """The parameters of `APPEND_POSTGRESQL`: the totals', the round's (``r<i>``), the
    client-rounds as array literals (``c<i>``) and the nodes seen (``seen``). Node ids are
    mapped to signed BIGINTs here (arrays bypass the `UInt64` column type)."""
    clients = record.clients
    params = {**totals, **{f"r{i}": round_row[name] for i, name in enumerate(ROUND_FIELDS)}}
    params["shard"] = node_shard(run_id)
    params["c0"] = _int_array(u64_to_i64(c.node_id) for c in clients)
    # outcomes are validated words of OUTCOMES: nothing to quote
    params["c1"] = "{" + ",".join(c.outcome for c in clients) + "}"
    params["c2"] = _int_array(int(c.uplink_bytes) for c in clients)
    params["c3"] = _int_array(int(c.downlink_bytes) for c in clients)
    params["c4"] = _int_array(int(c.num_examples) for c in clients)
    params["c5"] = _float_array(c.local_loss for c in clients)
    params["c6"] = _float_array(c.duration_s for c in clients)
    params["c7"] = pg_array([c.error for c in clients])
    params["seen"] = _int_array(u64_to_i64(node) for node in seen_nodes(record))
    return params


class PostgresAppender:
    """Appends rounds on PostgreSQL through psycopg connections of its own (autocommit,
    `APPEND_POSTGRESQL` prepared on each), at most `max_connections` at once.

    An idle connection is checked before use without a round trip (`api.db.socket_readable`:
    closed or told something by the server, it is replaced). A connection that failed is
    closed, never reused."""

    def __init__(self, engine: Engine, max_connections: int = 8) -> None:
        import psycopg

        self._psycopg = psycopg
        self.statement = Positional(
            APPEND_POSTGRESQL,
            postgresql.psycopg.dialect(paramstyle="numeric_dollar"),
            raw=ARRAY_PARAMS,
            bind_dialect=engine.dialect,  # its own processors (JSON, UTC timestamps)
        )
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        self._connect_args = (list(cargs), dict(cparams))
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    def _new_connection(self) -> Any:
        cargs, cparams = self._connect_args
        return self._psycopg.connect(*cargs, **cparams, autocommit=True)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """An autocommit psycopg connection for one append (returned to the idle ones
        unless it failed)."""
        with self._slots:
            conn = None
            with self._lock:
                while self._idle and conn is None:
                    candidate = self._idle.pop()
                    if not socket_readable(candidate):
                        conn = candidate
                    else:
                        candidate.close()
            if conn is None:
                conn = self._new_connection()
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            with self._lock:
                self._idle.append(conn)

    def append(self, params: Mapping[str, Any]) -> int | None:
        """Execute `APPEND_POSTGRESQL`: the new round's id, or None if the run's UPDATE
        matched no row. Raises psycopg's errors (IntegrityError: a duplicate round)."""
        statement = self.statement
        values = statement.params(params)
        with self.connection() as conn:
            cursor = self._psycopg.RawCursor(conn)
            cursor.execute(statement.sql, values, prepare=True)
            row = cursor.fetchone()
            cursor.close()
        return None if row is None else int(row[0])

    def close(self) -> None:
        """Close the idle connections (those in use close when they fail)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()
