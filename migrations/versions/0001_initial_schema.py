"""Initial schema: runs, rounds, client_rounds, clients, api_tokens.

Flower node and run ids (unsigned 64-bit) are kept in signed BIGINT columns (see
api.models.UInt64); timestamps are UTC.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('is_admin', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_api_tokens_token_sha256'))
    )
    op.create_table('clients',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('location', sa.String(length=255), nullable=True),
    sa.Column('public_key_pem', sa.Text(), nullable=False),
    sa.Column('node_id', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('enrolled_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_clients')),
    sa.UniqueConstraint('name', name=op.f('uq_clients_name')),
    sa.UniqueConstraint('node_id', name=op.f('uq_clients_node_id'))
    )
    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('flower_run_id', sa.BigInteger(), nullable=True),
    sa.Column('strategy', sa.String(length=64), nullable=False),
    sa.Column('uplink_compressor', sa.String(length=128), nullable=False),
    sa.Column('downlink_compressor', sa.String(length=128), nullable=False),
    sa.Column('task', sa.String(length=128), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('num_parameters', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('recorder_host', sa.String(length=255), nullable=True),
    sa.Column('recorder_pid', sa.Integer(), nullable=True),
    sa.Column('rounds_done', sa.Integer(), nullable=False),
    sa.Column('last_round', sa.Integer(), nullable=True),
    sa.Column('sampled_total', sa.BigInteger(), nullable=False),
    sa.Column('replied_total', sa.BigInteger(), nullable=False),
    sa.Column('failed_total', sa.BigInteger(), nullable=False),
    sa.Column('uplink_bytes_total', sa.BigInteger(), nullable=False),
    sa.Column('downlink_bytes_total', sa.BigInteger(), nullable=False),
    sa.Column('predicted_uplink_bytes_total', sa.BigInteger(), nullable=False),
    sa.Column('predicted_downlink_bytes_total', sa.BigInteger(), nullable=False),
    sa.Column('best_eval_accuracy', sa.Float(), nullable=True),
    sa.Column('best_eval_round', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index('ix_runs_started_at', ['started_at'], unique=False)
        batch_op.create_index('ix_runs_status_started_at', ['status', 'started_at'], unique=False)
        batch_op.create_index('ix_runs_strategy_started_at', ['strategy', 'started_at'], unique=False)

    op.create_table('rounds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('sampled', sa.Integer(), nullable=False),
    sa.Column('replied', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('uplink_bytes', sa.BigInteger(), nullable=False),
    sa.Column('downlink_bytes', sa.BigInteger(), nullable=False),
    sa.Column('predicted_uplink_bytes', sa.BigInteger(), nullable=False),
    sa.Column('predicted_downlink_bytes', sa.BigInteger(), nullable=False),
    sa.Column('train_loss', sa.Float(), nullable=True),
    sa.Column('eval_loss', sa.Float(), nullable=True),
    sa.Column('eval_accuracy', sa.Float(), nullable=True),
    sa.Column('phase_seconds', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('extra', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_rounds_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rounds')),
    sa.UniqueConstraint('run_id', 'round', name=op.f('uq_rounds_run_id_round'))
    )
    op.create_table('client_rounds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('round_id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.BigInteger(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('uplink_bytes', sa.BigInteger(), nullable=False),
    sa.Column('downlink_bytes', sa.BigInteger(), nullable=False),
    sa.Column('num_examples', sa.BigInteger(), nullable=False),
    sa.Column('local_loss', sa.Float(), nullable=True),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], name=op.f('fk_client_rounds_round_id_rounds'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_client_rounds'))
    )
    with op.batch_alter_table('client_rounds', schema=None) as batch_op:
        batch_op.create_index('ix_client_rounds_node_id', ['node_id'], unique=False)
        batch_op.create_index('ix_client_rounds_round_id', ['round_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('client_rounds', schema=None) as batch_op:
        batch_op.drop_index('ix_client_rounds_round_id')
        batch_op.drop_index('ix_client_rounds_node_id')

    op.drop_table('client_rounds')
    op.drop_table('rounds')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_strategy_started_at')
        batch_op.drop_index('ix_runs_status_started_at')
        batch_op.drop_index('ix_runs_started_at')

    op.drop_table('runs')
    op.drop_table('clients')
    op.drop_table('api_tokens')
