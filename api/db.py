"""Engines, sessions and schema migrations of the round-history store.

SQLite (the embedded default) is opened in WAL mode with foreign keys on, a busy timeout
and ``synchronous=NORMAL`` (a committed round survives a crash of the process; in WAL
mode only a power loss can lose the last commits). PostgreSQL is reached through
psycopg 3; a pooled connection is checked at checkout by polling its socket (the server
closed it or told it something: it is replaced), not by a round trip. The schema is
created and changed only by Alembic (`upgrade`), which `ensure_schema` runs on an empty
database so a newcomer needs no extra step.
"""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from api.settings import resolve_database_url

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


class SchemaError(RuntimeError):
    """The database schema is not at the revision this code expects."""


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_private_file(path: Path) -> None:
    """Create an empty `path` with mode 0600 (its folder 0700 if we create that too),
    unless it exists. SQLite then opens it, and gives its ``-wal`` and ``-shm`` files
    the same mode as the database file."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def make_engine(database_url: str | None = None, **kwargs: Any) -> Engine:
    """A new engine for the URL (see `api.settings.resolve_database_url`)."""
    url = make_url(resolve_database_url(database_url))
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            create_private_file(Path(url.database).expanduser())
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    engine = create_engine(url, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        event.listen(engine, "checkout", _drop_if_closed_by_server)
    return engine


def socket_readable(dbapi_connection: Any) -> bool:
    """Whether the server has closed an idle connection or sent it something (a restart,
    an idle timeout, an administrator's termination): its socket is readable, which a
    poll tells without a round trip. psycopg connections only."""
    if dbapi_connection.closed or dbapi_connection.broken:
        return True
    readable, _, _ = select.select([dbapi_connection.fileno()], [], [], 0)
    return bool(readable)


def _drop_if_closed_by_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Checkout check of a pooled PostgreSQL connection, instead of SQLAlchemy's
    ``pool_pre_ping`` (a ``SELECT 1`` round trip before every use: two of the three round
    trips of a small read). The pool replaces a connection this refuses."""
    if socket_readable(dbapi_connection):
        raise DisconnectionError("the server closed the connection or sent it a message")


def get_engine(database_url: str | None = None) -> Engine:
    """A process-wide engine per URL (created on first use)."""
    url = resolve_database_url(database_url)
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = make_engine(url)
            _engines[url] = engine
        return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option(
        "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
    )
    return cfg


def _run_alembic(engine: Engine, fn: Any, revision: str) -> None:
    cfg = _alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        fn(cfg, revision)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to `revision` (Alembic ``upgrade``)."""
    from alembic import command

    _run_alembic(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Revert the migrations down to `revision` (``base`` empties the database)."""
    from alembic import command

    _run_alembic(engine, command.downgrade, revision)


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    if head is None:
        raise SchemaError("no migrations found in " + str(MIGRATIONS_DIR))
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_schema(engine: Engine) -> None:
    """Migrate an empty database to head; refuse a database at another revision.

    A database that holds tables but no Alembic revision, or an older revision, is not
    touched: the operator runs ``fedsqueeze db upgrade`` (after a backup) instead.
    """
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        tables = set(inspect(engine).get_table_names())
        if tables - {"alembic_version"}:
            raise SchemaError(
                f"database {engine.url.render_as_string(hide_password=True)} has tables "
                f"{sorted(tables)} but no fedsqueeze schema revision; point DATABASE_URL "
                "at an empty database"
            )
        upgrade(engine)
        return
    raise SchemaError(
        f"database schema is at revision {current}, this fedsqueeze expects {head}: "
        "run `fedsqueeze db upgrade`"
    )
