"""Participation totals per node over all runs: ``node_participation``.

``GET /clients`` shows each client's participation summed over every run; with 0003 a page
of 100 nodes summed their ``client_participation`` rows (one per run: 10,000 rows for 100
nodes in 100 runs, ~20 ms of service CPU and as much database time per request). The store
now keeps those sums in at most 8 rows per node (``shard`` = run id mod 8: concurrent
appends to runs of different shards never wait for each other's row locks), updated in
the transaction that appends a round, like the per-run counters.

The upgrade backfills the rows from ``client_participation`` in one grouped
INSERT ... SELECT and adds a trigger: a deleted ``client_participation`` row (its run
deleted, by the foreign key's cascade or by hand) recomputes its node's row of that shard
from the rows that remain, so the per-node rows always sum the per-run ones. SQLite sums with
``total()`` (no error on passing 2^63) and keeps a sum below 2^53 an exact integer (a REAL
beyond, as its own integer addition does past 2^63). The downgrade drops the trigger and
the table (the per-run counters it was computed from stay).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_SUM = sa.BigInteger().with_variant(sa.Numeric(precision=38, scale=0), 'postgresql')
COLUMNS = ('node_id, shard, rounds, ok, failed, other, uplink_bytes, downlink_bytes, '
           'num_examples, last_round_at')  # fmt: skip
SHARDS = 8  # api.models.NODE_SHARDS when this revision was written
TRIGGER = 'client_participation_recount_node'
FUNCTION = 'node_participation_recount'


def _sum(dialect: str, column: str) -> str:
    if dialect != 'sqlite':
        return f'sum({column})'
    # total() never fails on overflow; below 2^53 its value is exact, kept as an integer
    return (f'CASE WHEN abs(total({column})) < 9007199254740992.0 '
            f'THEN CAST(total({column}) AS INTEGER) ELSE total({column}) END')  # fmt: skip


def _totals_select(dialect: str, where: str = '') -> str:
    """The per-node and shard sums of ``client_participation`` (rows matching `where`)."""
    sums = ', '.join(
        _sum(dialect, c)
        for c in ('rounds', 'ok', 'failed', 'other', 'uplink_bytes', 'downlink_bytes',
                  'num_examples')
    )  # fmt: skip
    return (
        f'SELECT node_id, run_id % {SHARDS}, {sums}, max(last_round_at) '
        f'FROM client_participation {where} GROUP BY node_id, run_id % {SHARDS}'
    )


def upgrade() -> None:
    op.create_table('node_participation',
    sa.Column('node_id', sa.BigInteger(), nullable=False),
    sa.Column('shard', sa.Integer(), nullable=False),
    sa.Column('rounds', sa.BigInteger(), nullable=False),
    sa.Column('ok', sa.BigInteger(), nullable=False),
    sa.Column('failed', sa.BigInteger(), nullable=False),
    sa.Column('other', sa.BigInteger(), nullable=False),
    sa.Column('uplink_bytes', BIG_SUM, nullable=False),
    sa.Column('downlink_bytes', BIG_SUM, nullable=False),
    sa.Column('num_examples', BIG_SUM, nullable=False),
    sa.Column('last_round_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('node_id', 'shard', name=op.f('pk_node_participation'))
    )  # fmt: skip
    dialect = op.get_bind().dialect.name
    op.execute(f'INSERT INTO node_participation ({COLUMNS}) {_totals_select(dialect)}')
    same = f'node_id = OLD.node_id AND {{}} = OLD.run_id % {SHARDS}'
    recount = (
        f'DELETE FROM node_participation WHERE {same.format("shard")}; '
        f'INSERT INTO node_participation ({COLUMNS}) '
        f'{_totals_select(dialect, "WHERE " + same.format(f"run_id % {SHARDS}"))};'
    )
    if dialect == 'sqlite':
        op.execute(
            f'CREATE TRIGGER {TRIGGER} AFTER DELETE ON client_participation '
            f'FOR EACH ROW BEGIN {recount} END'
        )
        return
    op.execute(
        f'CREATE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$ '
        f'BEGIN {recount} RETURN NULL; END $$'
    )
    op.execute(
        f'CREATE TRIGGER {TRIGGER} AFTER DELETE ON client_participation '
        f'FOR EACH ROW EXECUTE FUNCTION {FUNCTION}()'
    )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == 'sqlite':
        op.execute(f'DROP TRIGGER IF EXISTS {TRIGGER}')
    else:
        op.execute(f'DROP TRIGGER IF EXISTS {TRIGGER} ON client_participation')
        op.execute(f'DROP FUNCTION IF EXISTS {FUNCTION}()')
    op.drop_table('node_participation')
