"""Bulk seeding of a benchmark store, shared by `benchmarks.api` and `benchmarks.store`:
rows straight through the driver (COPY on PostgreSQL, executemany on SQLite), then ANALYZE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def bulk_insert(conn: Any, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """Insert `rows` (tuples in `columns` order) into `table` on the SQLAlchemy connection
    `conn`, inside its transaction: COPY on PostgreSQL, executemany on SQLite."""
    if not rows:
        return
    raw = conn.connection.driver_connection
    cols = ", ".join(columns)
    if conn.dialect.name == "postgresql":
        with raw.cursor() as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    else:
        cur = raw.cursor()
        cur.executemany(f"INSERT INTO {table} ({cols}) VALUES ({','.join('?' * len(columns))})",
                        rows)  # fmt: skip
        cur.close()


def analyze(engine: Any) -> None:
    """Refresh the planner's statistics after a bulk load (PostgreSQL needs autocommit)."""
    from sqlalchemy import text

    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
        else:
            conn.execute(text("ANALYZE"))
            conn.commit()
