"""The round-history store: the SQL recorder and the queries of the REST service.

`SqlRecorder` implements `core.records.ResumableRecorder`: ``start_run`` inserts a run,
``record_round`` appends one round with its client-rounds and updates the run's running
totals and its nodes' participation counters in a single transaction (`api.appends`: a
crash of the process loses at most the round in flight, a crash of the database server
none that was acknowledged), and
``finish_run`` closes the run. `Store` holds the read and write operations shared by the
recorder, the REST service and the command line.

Run summary (all from the run row, kept up to date as rounds are appended):

- rounds done R, bytes up U = sum_t U_t and down D = sum_t D_t (measured);
- float32 baseline: an uncompressed message of a model with d parameters is 4d bytes,
  so the baseline is U32 = 4d * sum_t replied_t up and D32 = 4d * sum_t sampled_t down;
- compression ratios U32/U, D32/D and (U32+D32)/(U+D).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import sqlite3
import threading
import typing
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    Table,
    and_,
    any_,
    bindparam,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from api.appends import (
    BYTE_FIELDS,
    CLIENTS_TABLE,
    NODE_PARTICIPATION_TABLE,
    ROUND_FIELDS,
    ROUNDS_TABLE,
    RUNS_TABLE,
    PostgresAppender,
    SqliteSteps,
    finite,
    postgresql_params,
    totals_params,
)
from api.db import ensure_schema, get_engine, session_factory
from api.errors import ConflictError, ForbiddenError, InvalidError, NotFoundError, StoreError
from api.models import (
    CLIENT_STATUSES,
    OUTCOMES,
    RUN_STATUSES,
    TOKEN_SCOPES,
    ApiToken,
    Client,
    ClientRound,
    Round,
    Run,
    u64_to_i64,
)
from api.validation import MAX_TOTAL, check_json, check_text
from core.records import ResumableRecorder, RoundRecord, RunInfo
from core.secrets import redact_mapping

log = logging.getLogger("fedsqueeze.api.store")

INT32_MAX = (1 << 31) - 1
#: config keys never stored (at any depth): the store's own URL and its credentials
DROPPED_CONFIG_KEYS = frozenset({"database-url", "database_url"})
FINAL_STATUSES = ("finished", "failed", "interrupted")
RUN_SORT_KEYS = ("id", "started_at", "strategy", "status", "rounds_done", "best_eval_accuracy")
MAX_COMPARE_RUNS = 20


def utcnow() -> datetime:
    return datetime.now(UTC)


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a token (tokens are 256-bit random, so no salt is needed)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_nonneg(name: str, value: int, top: int = MAX_TOTAL) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise InvalidError(f"{name} must be an integer in [0, {top}], got {value!r}")


def scrub_config(value: Any, key: str = "") -> Any:
    """A run config as it may be stored: keys in `DROPPED_CONFIG_KEYS` removed at every
    depth, URL passwords and ``password=...`` values redacted (`core.secrets`)."""
    if isinstance(value, Mapping):
        return {
            k: scrub_config(v, k)
            for k, v in value.items()
            if not (isinstance(k, str) and k.lower() in DROPPED_CONFIG_KEYS)
        }
    if isinstance(value, list | tuple):
        return [scrub_config(v) for v in value]
    if isinstance(value, str):
        return redact_mapping({key: value})[key]
    return value


def validate_round(record: RoundRecord) -> None:
    """Raise `InvalidError` naming the first bad field of a round record: counts are
    32-bit, byte counts at most 2^63 - 1, texts valid Unicode without NUL, `extra` and
    `phase_seconds` storable JSON (`api.validation.check_json`)."""
    for name in ("round", "sampled", "replied", "failed"):
        _check_nonneg(name, getattr(record, name), INT32_MAX)
    for name in (
        "uplink_bytes",
        "downlink_bytes",
        "predicted_uplink_bytes",
        "predicted_downlink_bytes",
    ):
        _check_nonneg(name, getattr(record, name))
    check_json(record.phase_seconds, "phase_seconds")
    check_json(record.extra, "extra")
    if record.replied + record.failed > record.sampled:
        raise InvalidError(
            f"replied ({record.replied}) + failed ({record.failed}) exceed sampled "
            f"({record.sampled})"
        )
    if record.ended_at < record.started_at:
        raise InvalidError("ended_at is before started_at")
    u64_max = (1 << 64) - 1
    for i, c in enumerate(record.clients):
        if c.outcome not in OUTCOMES:
            raise InvalidError(f"clients[{i}].outcome {c.outcome!r} is not one of {OUTCOMES}")
        # the common case checked inline; the field's name is formatted only on failure
        for name, top in (("node_id", u64_max), *_CLIENT_COUNTS):
            value = getattr(c, name)
            if type(value) is not int or not 0 <= value <= top:
                _check_nonneg(f"clients[{i}].{name}", value, top)
        if c.error is not None:
            check_text(c.error, f"clients[{i}].error")


_CLIENT_COUNTS = tuple(
    (name, MAX_TOTAL) for name in ("uplink_bytes", "downlink_bytes", "num_examples")
)


@dataclass
class Page:
    items: list[Any]
    total: int
    limit: int
    offset: int


@dataclass
class Participation:
    rounds: int = 0
    ok: int = 0
    failed: int = 0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    num_examples: int = 0
    last_round_at: datetime | None = None


class RunVersion(typing.NamedTuple):
    """The columns of a run that change whenever anything a read shows of it changes: an
    appended round (rounds_done, updated_at), finishing, resuming, a stale mark (status).
    A ``finished`` run never changes again (no append or resume is allowed on it)."""

    status: str
    rounds_done: int
    last_round: int | None
    updated_at: datetime
    ended_at: datetime | None


def _page(
    session: Session,
    entity: Any,
    conditions: list[Any],
    ordering: list[Any],
    limit: int,
    offset: int,
) -> Page:
    """One page and the total count from ONE statement (the count as an uncorrelated
    scalar subquery, evaluated once), so both come from the same snapshot even while
    rounds are being appended. ORM entities come back as objects, tables as rows."""
    total = select(func.count()).select_from(entity).where(*conditions).scalar_subquery()
    rows = session.execute(
        select(entity, total.label("total_count"))
        .where(*conditions)
        .order_by(*ordering)
        .limit(limit)
        .offset(offset)
    ).all()
    if isinstance(entity, Table):
        items: list[Any] = list(rows)
    else:
        items = [r[0] for r in rows]
    if rows:
        return Page(items, int(rows[0].total_count), limit, offset)
    count = session.execute(select(func.count()).select_from(entity).where(*conditions))
    return Page([], int(count.scalar_one()), limit, offset)


def _process_alive(pid: int, not_after: datetime) -> bool:
    """Whether process `pid` exists, was created no later than `not_after` and has not
    ended (a zombie, e.g. a crashed ServerApp its parent has not reaped yet, has ended)."""
    import psutil

    try:
        process = psutil.Process(pid)
        created = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
    return created <= not_after.timestamp() + 1.0


class Store:
    """Operations on the round-history store (one short transaction each)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = session_factory(engine)
        self._postgres_appender: PostgresAppender | None = None
        self._sqlite_steps: SqliteSteps | None = None
        self._appender_lock = threading.Lock()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    # ------------------------------------------------------------------ runs: write
    def create_run(
        self,
        info: RunInfo,
        recorder_host: str | None = None,
        recorder_pid: int | None = None,
        owner_token_id: int | None = None,
    ) -> int:
        """Insert a running run; return its id. The config is checked (`check_json`) and
        stored scrubbed of credentials (`scrub_config`); `owner_token_id` is the REST token
        that may write to it (None: only this process, through `SqlRecorder`)."""
        for name in ("strategy", "uplink_compressor", "downlink_compressor", "task"):
            if not getattr(info, name):
                raise InvalidError(f"{name} must not be empty")
            check_text(getattr(info, name), name)
        config = scrub_config(check_json(dict(info.config), "config"))
        num_parameters = info.num_parameters
        if num_parameters is None:
            for key in ("num-parameters", "num_parameters"):
                if isinstance(info.config.get(key), int):
                    num_parameters = int(info.config[key])
        if num_parameters is not None and num_parameters <= 0:
            raise InvalidError("num_parameters must be positive")
        now = utcnow()
        with self._sessions.begin() as session:
            run = Run(
                flower_run_id=info.flower_run_id,
                strategy=info.strategy,
                uplink_compressor=info.uplink_compressor,
                downlink_compressor=info.downlink_compressor,
                task=info.task,
                config=config,
                num_parameters=num_parameters,
                status="running",
                started_at=info.started_at,
                updated_at=now,
                recorder_host=recorder_host,
                recorder_pid=recorder_pid,
                owner_token_id=owner_token_id,
                rounds_done=0,
                sampled_total=0,
                replied_total=0,
                failed_total=0,
                uplink_bytes_total=0,
                downlink_bytes_total=0,
                predicted_uplink_bytes_total=0,
                predicted_downlink_bytes_total=0,
            )
            session.add(run)
            session.flush()
            return run.id

    def append_round(self, run_id: int, record: RoundRecord) -> int:
        """Append one round and its client-rounds in one transaction; return its row id.

        Raises `NotFoundError` for an unknown run, `ConflictError` if the run is closed
        or already has this round number, `InvalidError` for a bad record.
        """
        validate_round(record)
        accuracy = finite(record.eval_accuracy)
        extra = dict(record.extra)
        non_finite = {
            name: repr(getattr(record, name))
            for name in ("train_loss", "eval_loss", "eval_accuracy")
            if getattr(record, name) is not None and finite(getattr(record, name)) is None
        }
        if non_finite:
            extra["non_finite"] = non_finite
        round_row = {
            **{name: getattr(record, name) for name in ROUND_FIELDS},
            "train_loss": finite(record.train_loss),
            "eval_loss": finite(record.eval_loss),
            "eval_accuracy": accuracy,
            "phase_seconds": dict(record.phase_seconds),
            "extra": extra,
        }
        totals = totals_params(run_id, record, accuracy, utcnow())
        if self.engine.dialect.name == "postgresql":
            return self._append_in_one_statement(run_id, record, totals, round_row)
        steps = self._sqlite_steps
        if steps is None:
            steps = self._sqlite_steps = SqliteSteps(self.engine.dialect)
        with self.engine.begin() as conn:
            # the driver's cursor inside SQLAlchemy's transaction (`api.appends`); the
            # run's UPDATE comes first: it takes the write lock, so concurrent appends to
            # one run serialize cleanly
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:  # on a duplicate the whole transaction (totals update too) rolls back
                round_id = steps.append(cursor, run_id, record, totals, round_row)
            except sqlite3.IntegrityError as exc:
                raise ConflictError(f"run {run_id} already has round {record.round}") from exc
            finally:
                cursor.close()
            if round_id is None:
                _raise_refusal(conn, run_id, record)
            return round_id

    def _append_in_one_statement(
        self,
        run_id: int,
        record: RoundRecord,
        totals: dict[str, Any],
        round_row: dict[str, Any],
    ) -> int:
        """`append_round` on PostgreSQL: one prepared statement, one round trip
        (`api.appends.PostgresAppender`)."""
        import psycopg

        appender = self._postgres_appender
        if appender is None:
            with self._appender_lock:
                if self._postgres_appender is None:
                    self._postgres_appender = PostgresAppender(self.engine)
                appender = self._postgres_appender
        params = postgresql_params(run_id, record, totals, round_row)
        try:
            round_id = appender.append(params)
        except psycopg.IntegrityError as exc:
            raise ConflictError(f"run {run_id} already has round {record.round}") from exc
        except psycopg.Error as exc:  # as SQLAlchemy would raise it (OperationalError, ...)
            raise DBAPIError.instance(appender.statement.sql, None, exc, psycopg.Error) from exc
        if round_id is None:
            with self.engine.connect() as conn:
                _raise_refusal(conn, run_id, record)
        return round_id

    def finish_run(self, run_id: int, status: str) -> None:
        if status not in FINAL_STATUSES:
            raise InvalidError(f"status must be one of {FINAL_STATUSES}, got {status!r}")
        now = utcnow()
        with self.engine.begin() as conn:
            result = conn.execute(
                update(Run)
                .where(Run.id == run_id, Run.status == "running")
                .values(status=status, ended_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 0:
                current = conn.execute(select(Run.status).where(Run.id == run_id)).scalar()
                if current is None:
                    raise NotFoundError(f"run {run_id} not found")
                if current != status:
                    raise ConflictError(f"run {run_id} is already {current}")

    def check_resumable(self, run_id: int) -> Run:
        """The run, if it can be resumed: it exists, is not finished and no live process
        records it (`NotFoundError` / `ConflictError` naming why not, otherwise)."""
        run = self.get_run(run_id)
        if run.status == "finished":
            raise ConflictError(f"run {run_id} is finished; there is nothing to resume")
        if (
            run.status == "running"
            and run.recorder_host == socket.gethostname()
            and run.recorder_pid is not None
            and _process_alive(run.recorder_pid, run.updated_at)
        ):
            raise ConflictError(
                f"run {run_id} is still running (recorded by process {run.recorder_pid})"
            )
        return run

    def resume_run(
        self,
        run_id: int,
        flower_run_id: int | None = None,
        recorder_host: str | None = None,
        recorder_pid: int | None = None,
    ) -> int:
        """Reopen an interrupted or failed run (status back to ``running``, new recorder
        and Flower run id) and return its last stored round (0 if none)."""
        run = self.check_resumable(run_id)
        now = utcnow()
        with self.engine.begin() as conn:
            result = conn.execute(
                update(Run)
                .where(Run.id == run_id, Run.status == run.status)
                .values(
                    status="running",
                    ended_at=None,
                    updated_at=now,
                    flower_run_id=flower_run_id if flower_run_id is not None else run.flower_run_id,
                    recorder_host=recorder_host,
                    recorder_pid=recorder_pid,
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 0:
                raise ConflictError(f"run {run_id} changed while being resumed")
            last = conn.execute(select(func.max(Round.round)).where(Round.run_id == run_id))
            return int(last.scalar() or 0)

    def mark_stale_runs(self, stale_after_s: float, now: datetime | None = None) -> list[int]:
        """Mark ``running`` runs whose recorder is gone as ``interrupted``; return their ids.

        A run is stale when its recording process on this host no longer exists, or when
        nothing was recorded for `stale_after_s` seconds (runs recorded from other hosts).
        """
        now = now or utcnow()
        host = socket.gethostname()
        cutoff = now - timedelta(seconds=stale_after_s)
        with self._sessions() as session:
            running = session.execute(
                select(Run.id, Run.recorder_host, Run.recorder_pid, Run.updated_at).where(
                    Run.status == "running"
                )
            ).all()
        stale: list[int] = []
        for run_id, rec_host, rec_pid, updated_at in running:
            gone = (
                rec_host == host and rec_pid is not None and not _process_alive(rec_pid, updated_at)
            )
            if gone or updated_at < cutoff:
                stale.append(run_id)
        if stale:
            with self.engine.begin() as conn:
                conn.execute(
                    update(Run)
                    .where(Run.id.in_(stale), Run.status == "running")
                    .values(status="interrupted", ended_at=Run.updated_at)
                    .execution_options(synchronize_session=False)
                )
        return stale

    # ------------------------------------------------------------------ runs: read
    def get_run(self, run_id: int) -> Run:
        with self._sessions() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise NotFoundError(f"run {run_id} not found")
            return run

    def run_version(self, run_id: int) -> RunVersion:
        """The run's `RunVersion` (one primary-key read; `NotFoundError` if none)."""
        c = RUNS_TABLE.c
        with self.engine.connect() as conn:
            row = conn.execute(
                select(c.status, c.rounds_done, c.last_round, c.updated_at, c.ended_at).where(
                    c.id == run_id
                )
            ).first()
        if row is None:
            raise NotFoundError(f"run {run_id} not found")
        return RunVersion(*row)

    def list_runs(
        self,
        *,
        status: str | None = None,
        strategy: str | None = None,
        sort: str = "id",
        order: str = "desc",
        limit: int = 50,
        offset: int = 0,
    ) -> Page:
        if sort not in RUN_SORT_KEYS:
            raise InvalidError(f"sort must be one of {RUN_SORT_KEYS}")
        if order not in ("asc", "desc"):
            raise InvalidError("order must be asc or desc")
        conditions = []
        if status is not None:
            conditions.append(Run.status == status)
        if strategy is not None:
            conditions.append(Run.strategy == check_text(strategy, "strategy"))
        column = getattr(Run, sort)
        # NULLs (e.g. no accuracy yet) last in both orders, the same on every backend
        ordering = [(column.asc() if order == "asc" else column.desc()).nulls_last()]
        if sort != "id":
            ordering.append(Run.id.asc() if order == "asc" else Run.id.desc())
        with self._sessions() as session:
            return _page(session, Run, conditions, ordering, limit, offset)

    def list_rounds(
        self,
        run_id: int,
        *,
        from_round: int | None = None,
        to_round: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page:
        c = ROUNDS_TABLE.c
        conditions = [c.run_id == run_id]
        if from_round is not None:
            conditions.append(c.round >= from_round)
        if to_round is not None:
            conditions.append(c.round <= to_round)
        with self._sessions() as session:
            if session.execute(select(Run.id).where(Run.id == run_id)).first() is None:
                raise NotFoundError(f"run {run_id} not found")
            # plain rows (no ORM identity map): a page of rounds is read-only data
            return _page(session, ROUNDS_TABLE, conditions, [c.round], limit, offset)

    def get_round(self, run_id: int, round_number: int) -> tuple[Round, list[ClientRound]]:
        with self._sessions() as session:
            rnd = session.scalars(
                select(Round).where(Round.run_id == run_id, Round.round == round_number)
            ).first()
            if rnd is None:
                if session.get(Run, run_id) is None:
                    raise NotFoundError(f"run {run_id} not found")
                raise NotFoundError(f"run {run_id} has no round {round_number}")
            clients = list(
                session.scalars(
                    select(ClientRound)
                    .where(ClientRound.round_id == rnd.id)
                    .order_by(ClientRound.id)
                )
            )
            return rnd, clients

    def series(self, run_ids: Sequence[int]) -> dict[int, list[tuple[Any, ...]]]:
        """Per run: (round, train_loss, eval_loss, eval_accuracy, up, down, t_end) rows
        (Core rows, no ORM loading: a series is many small read-only rows)."""
        ids = list(dict.fromkeys(run_ids))
        out: dict[int, list[tuple[Any, ...]]] = {i: [] for i in ids}
        c = ROUNDS_TABLE.c
        with self.engine.connect() as conn:
            found = set(conn.scalars(select(RUNS_TABLE.c.id).where(RUNS_TABLE.c.id.in_(ids))))
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFoundError(f"run(s) {missing} not found")
            rows = conn.execute(
                select(
                    c.run_id,
                    c.round,
                    c.train_loss,
                    c.eval_loss,
                    c.eval_accuracy,
                    c.uplink_bytes,
                    c.downlink_bytes,
                    c.ended_at,
                )
                .where(c.run_id.in_(ids))
                .order_by(c.run_id, c.round)
            ).all()
        for row in rows:
            out[row[0]].append(tuple(row[1:]))
        return out

    def runs_by_ids(self, run_ids: Sequence[int]) -> list[Run]:
        ids = list(dict.fromkeys(run_ids))
        with self._sessions() as session:
            runs = {r.id: r for r in session.scalars(select(Run).where(Run.id.in_(ids)))}
        missing = [i for i in ids if i not in runs]
        if missing:
            raise NotFoundError(f"run(s) {missing} not found")
        return [runs[i] for i in ids]

    # ------------------------------------------------------------------ clients
    def enroll_client(
        self,
        *,
        name: str,
        public_key_pem: str,
        node_id: int | None,
        location: str | None = None,
    ) -> Client:
        if not name.strip():
            raise InvalidError("name must not be empty")
        check_text(name, "name")
        check_text(public_key_pem, "public_key_pem")
        if location is not None:
            check_text(location, "location")
        with self._sessions() as session:
            clash = session.scalars(
                select(Client).where(
                    or_(
                        Client.name == name,
                        and_(Client.node_id.is_not(None), Client.node_id == node_id),
                    )
                    if node_id is not None
                    else Client.name == name
                )
            ).first()
            if clash is not None:
                what = f"name {name!r}" if clash.name == name else f"node id {node_id}"
                raise ConflictError(f"a client with {what} is already enrolled (id {clash.id})")
            client = Client(
                name=name,
                location=location,
                public_key_pem=public_key_pem,
                node_id=node_id,
                status="active",
                enrolled_at=utcnow(),
            )
            session.add(client)
            try:
                session.commit()
            except IntegrityError as exc:
                raise ConflictError(f"client {name!r} or node id {node_id} already exists") from exc
            return client

    def get_client(self, client_id: int) -> Client:
        with self._sessions() as session:
            client = session.get(Client, client_id)
            if client is None:
                raise NotFoundError(f"client {client_id} not found")
            return client

    def set_client_status(self, client_id: int, status: str) -> Client:
        if status not in CLIENT_STATUSES:
            raise InvalidError(f"status must be one of {CLIENT_STATUSES}")
        with self._sessions() as session:
            client = session.get(Client, client_id)
            if client is None:
                raise NotFoundError(f"client {client_id} not found")
            client.status = status
            session.commit()
            return client

    def delete_client(self, client_id: int) -> Client:
        """Remove an enrolment (its client-rounds stay: they are history)."""
        with self._sessions() as session:
            client = session.get(Client, client_id)
            if client is None:
                raise NotFoundError(f"client {client_id} not found")
            session.execute(delete(Client).where(Client.id == client_id))
            session.commit()
            return client

    def list_clients(self, *, status: str | None = None, limit: int = 100, offset: int = 0) -> Page:
        """A page of enrolled clients as rows of the clients table (read-only: no ORM
        objects to build), in id order."""
        c = CLIENTS_TABLE.c
        conditions = [] if status is None else [c.status == status]
        with self._sessions() as session:
            return _page(session, CLIENTS_TABLE, conditions, [c.id], limit, offset)

    def participation(self, node_ids: Sequence[int]) -> dict[int, Participation]:
        """Client-round totals per node id over all runs, from the per-node counters (at
        most `api.models.NODE_SHARDS` rows per node; `api.appends` keeps them with every
        appended round)."""
        ids = sorted(set(node_ids))
        if not ids:
            return {}
        p = NODE_PARTICIPATION_TABLE.c
        if self.engine.dialect.name == "postgresql":
            # one array parameter: the statement's text (and psycopg's parsed form of it)
            # does not depend on the number of ids, as an IN list's would
            wanted: Any = p.node_id == any_(
                bindparam("ids", [u64_to_i64(i) for i in ids], type_=ARRAY(BigInteger))
            )
            big_sum: Any = func.sum  # of NUMERIC: exact
        else:
            wanted = p.node_id.in_(ids)
            # SQLite's sum() of integers fails on overflow; total() is a float that cannot
            big_sum = func.total
        query = (
            select(
                p.node_id,
                func.sum(p.rounds),
                func.sum(p.ok),
                big_sum(p.uplink_bytes),
                big_sum(p.downlink_bytes),
                big_sum(p.num_examples),
                func.max(p.last_round_at),
            )
            .where(wanted)
            .group_by(p.node_id)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return {
            int(node_id): Participation(
                int(n), int(ok), int(n) - int(ok), int(up), int(down), int(examples), last
            )
            for node_id, n, ok, up, down, examples, last in rows
        }

    # ------------------------------------------------------------------ tokens
    def create_token(
        self,
        name: str,
        *,
        scope: str | None = None,
        run_id: int | None = None,
        admin: bool = False,
    ) -> tuple[int, str]:
        """Create a token; return (id, token). Only its SHA-256 digest is stored.

        `scope` is one of `TOKEN_SCOPES` (default ``writer``; ``admin=True`` is the older
        spelling of ``scope="admin"``); `run_id` binds a writer token to that run.
        """
        scope = scope or ("admin" if admin else "writer")
        if admin and scope != "admin":
            raise InvalidError(f"admin=True contradicts scope {scope!r}")
        if scope not in TOKEN_SCOPES:
            raise InvalidError(f"scope must be one of {TOKEN_SCOPES}, got {scope!r}")
        if run_id is not None and scope != "writer":
            raise InvalidError(f"only writer tokens are bound to a run, not {scope} tokens")
        if not name.strip():
            raise InvalidError("token name must not be empty")
        check_text(name, "token name")
        token = secrets.token_urlsafe(32)
        with self._sessions.begin() as session:
            if run_id is not None and session.get(Run, run_id) is None:
                raise NotFoundError(f"run {run_id} not found")
            row = ApiToken(
                name=name,
                token_sha256=hash_token(token),
                scope=scope,
                run_id=run_id,
                created_at=utcnow(),
            )
            session.add(row)
            session.flush()
            return row.id, token

    def check_run_writer(self, token: ApiToken, run_id: int) -> None:
        """Raise `ForbiddenError` unless `token` may append rounds to / finish run `run_id`:
        a writer token bound to that run, or the writer/admin token that created it over
        REST. Runs the ServerApp records in-process have no such token."""
        if token.run_id is not None:
            if token.scope == "writer" and token.run_id == run_id:
                return
        elif token.scope in ("writer", "admin"):
            with self._sessions() as session:
                owner = session.execute(select(Run.owner_token_id).where(Run.id == run_id)).scalar()
            if owner is not None and owner == token.id:
                return
        raise ForbiddenError(f"this token may not write to run {run_id}")

    def verify_token(self, token: str) -> ApiToken | None:
        with self._sessions() as session:
            return session.scalars(
                select(ApiToken).where(
                    ApiToken.token_sha256 == hash_token(token), ApiToken.revoked_at.is_(None)
                )
            ).first()

    def list_tokens(self) -> list[ApiToken]:
        with self._sessions() as session:
            return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))

    def revoke_token(self, token_id: int) -> None:
        if not 1 <= token_id <= INT32_MAX:
            raise NotFoundError(f"no active token with id {token_id}")
        with self.engine.begin() as conn:
            result = conn.execute(
                update(ApiToken)
                .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            if result.rowcount == 0:
                raise NotFoundError(f"no active token with id {token_id}")


def _raise_refusal(conn: Any, run_id: int, record: RoundRecord) -> typing.NoReturn:
    """Why the run's totals UPDATE matched no row: an unknown or closed run, or a byte
    total this round would push past 2^63 - 1."""
    row = conn.execute(select(RUNS_TABLE).where(RUNS_TABLE.c.id == run_id)).first()
    if row is None:
        raise NotFoundError(f"run {run_id} not found")
    if row.status != "running":
        raise ConflictError(f"run {run_id} is {row.status}; rounds can no longer be added")
    over = [n for n in BYTE_FIELDS if getattr(row, f"{n}_total") > MAX_TOTAL - getattr(record, n)]
    raise InvalidError(
        f"run {run_id}'s {over[0] if over else 'byte'} total would pass 2^63 - 1 with this round"
    )


def open_store(database_url: str | None = None, stale_after_s: float | None = None) -> Store:
    """The store at `database_url` (see api.settings), migrated if empty, stale runs closed
    (stale after `stale_after_s`, default ``FEDSQUEEZE_STALE_AFTER_S`` or 24 h)."""
    from api.settings import DEFAULT_STALE_AFTER_S, env_float

    engine = get_engine(database_url)
    ensure_schema(engine)
    store = Store(engine)
    if stale_after_s is None:
        stale_after_s = env_float("FEDSQUEEZE_STALE_AFTER_S", DEFAULT_STALE_AFTER_S)
    store.mark_stale_runs(stale_after_s)
    return store


_open_recorders: weakref.WeakSet[SqlRecorder] = weakref.WeakSet()


def _interrupt_open_runs() -> None:
    for recorder in list(_open_recorders):
        recorder.close("interrupted")


atexit.register(_interrupt_open_runs)


class SqlRecorder(ResumableRecorder):
    """`core.records.ResumableRecorder` writing to the SQL store (SQLite or PostgreSQL).

    Each round is one transaction. Runs this recorder started and did not finish are
    marked ``interrupted`` when the process exits normally; after a hard crash the
    stale-run check of the next start-up does it.

    Its runs have no owner token, so no REST token writes to them unless an operator
    binds one explicitly (``fedsqueeze api token create --scope writer --run ID``). A
    round or finish the store refuses (`StoreError`: a conflicting round, a closed run,
    an invalid record) does not stop the training: it is logged as an error and counted
    in `refused_records`; database failures (the store unreachable) still raise.
    """

    def __init__(self, database_url: str | None = None) -> None:
        self.store = open_store(database_url)
        self.refused_records = 0
        self._open_runs: set[int] = set()
        self._lock = threading.Lock()
        _open_recorders.add(self)

    def start_run(self, info: RunInfo) -> int:
        run_id = self.store.create_run(
            info, recorder_host=socket.gethostname(), recorder_pid=os.getpid()
        )
        with self._lock:
            self._open_runs.add(run_id)
        return run_id

    def _refused(self, what: str, exc: StoreError) -> None:
        with self._lock:
            self.refused_records += 1
            count = self.refused_records
        log.error("%s refused by the store (%d refused so far; training goes on): %s",
                  what, count, exc)  # fmt: skip

    def resume_run(self, run_id: int, flower_run_id: int | None = None) -> int:
        """Reopen run `run_id` for this process (see `Store.resume_run`); return its last
        stored round."""
        last = self.store.resume_run(
            run_id, flower_run_id, recorder_host=socket.gethostname(), recorder_pid=os.getpid()
        )
        with self._lock:
            self._open_runs.add(run_id)
        return last

    @property
    def store_key(self) -> str:
        """Names this store (its URL without password) for the checkpoint folders."""
        return self.store.engine.url.render_as_string(hide_password=True)

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        try:
            self.store.append_round(run_id, record)
        except StoreError as exc:
            self._refused(f"round {record.round} of run {run_id}", exc)

    def finish_run(self, run_id: int, status: str) -> None:
        with self._lock:
            self._open_runs.discard(run_id)
        try:
            self.store.finish_run(run_id, status)
        except StoreError as exc:
            self._refused(f"closing run {run_id} as {status}", exc)

    def close(self, status: str = "interrupted") -> None:
        """Mark the runs this recorder left open as `status`."""
        with self._lock:
            open_runs, self._open_runs = sorted(self._open_runs), set()
        for run_id in open_runs:
            with contextlib.suppress(Exception):
                self.store.finish_run(run_id, status)

    def __enter__(self) -> SqlRecorder:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close("failed" if exc_type is not None else "interrupted")


__all__ = [
    "RUN_STATUSES",
    "ConflictError",
    "InvalidError",
    "NotFoundError",
    "Page",
    "Participation",
    "SqlRecorder",
    "Store",
    "open_store",
]
