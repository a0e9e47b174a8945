"""Client participation counters: ``client_participation`` (per node and run).

The clients endpoints read a node's participation from these running totals (a row per
run it took part in) instead of grouping every client-round it ever sent; the store
updates them in the transaction that appends a round. The upgrade backfills them from the
existing client-rounds in one grouped INSERT ... SELECT (SQLite sums with total(), as the
old grouped read did: exact below 2^53, a REAL beyond 2^63); the downgrade drops the
table (the client-rounds it was computed from stay).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_SUM = sa.BigInteger().with_variant(sa.Numeric(precision=38, scale=0), 'postgresql')


def upgrade() -> None:
    op.create_table('client_participation',
    sa.Column('node_id', sa.BigInteger(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('rounds', sa.BigInteger(), nullable=False),
    sa.Column('ok', sa.BigInteger(), nullable=False),
    sa.Column('failed', sa.BigInteger(), nullable=False),
    sa.Column('other', sa.BigInteger(), nullable=False),
    sa.Column('uplink_bytes', BIG_SUM, nullable=False),
    sa.Column('downlink_bytes', BIG_SUM, nullable=False),
    sa.Column('num_examples', BIG_SUM, nullable=False),
    sa.Column('last_round_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'],
                            name=op.f('fk_client_participation_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('node_id', 'run_id', name=op.f('pk_client_participation'))
    )  # fmt: skip
    big_sum = 'total' if op.get_bind().dialect.name == 'sqlite' else 'sum'
    op.execute(
        'INSERT INTO client_participation (node_id, run_id, rounds, ok, failed, other, '
        'uplink_bytes, downlink_bytes, num_examples, last_round_at) '
        'SELECT c.node_id, r.run_id, count(*), '
        "sum(CASE WHEN c.outcome = 'ok' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN c.outcome = 'failed' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN c.outcome IN ('ok', 'failed') THEN 0 ELSE 1 END), "
        f'{big_sum}(c.uplink_bytes), {big_sum}(c.downlink_bytes), {big_sum}(c.num_examples), '
        'max(r.ended_at) '
        'FROM client_rounds AS c JOIN rounds AS r ON r.id = c.round_id '
        'GROUP BY c.node_id, r.run_id'
    )


def downgrade() -> None:
    op.drop_table('client_participation')
