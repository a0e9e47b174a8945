"""Token scopes: admin, enrol, writer (optionally bound to one run), reader.

``api_tokens.is_admin`` becomes ``api_tokens.scope`` (admin tokens stay ``admin``, the
others become ``writer``), ``api_tokens.run_id`` binds a writer to one run, and
``runs.owner_token_id`` remembers which token created a run over REST (existing runs have
none, so no token can write to them any more). A downgrade maps ``admin`` back to
is_admin and revokes every token the old schema could not restrict (reader, enrol and
run-bound writer tokens would otherwise become unrestricted writers).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scope', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('run_id', sa.Integer(), nullable=True))
    op.execute(
        "UPDATE api_tokens SET scope = CASE WHEN is_admin THEN 'admin' ELSE 'writer' END"
    )
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.alter_column('scope', existing_type=sa.String(length=16), nullable=False)
        batch_op.create_foreign_key(
            op.f('fk_api_tokens_run_id_runs'), 'runs', ['run_id'], ['id'], ondelete='CASCADE'
        )
        batch_op.drop_column('is_admin')
    # ADD COLUMN in place; never a batch copy of `runs` (see downgrade)
    op.add_column('runs', sa.Column('owner_token_id', sa.Integer(), nullable=True))


def downgrade() -> None:
    # a plain ALTER TABLE (SQLite >= 3.35 has DROP COLUMN): batch mode would copy `runs`
    # and drop the old table, and with foreign keys on that cascades to rounds and tokens
    op.execute('ALTER TABLE runs DROP COLUMN owner_token_id')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('is_admin', sa.Boolean(), nullable=True))
    op.execute("UPDATE api_tokens SET is_admin = (scope = 'admin')")
    op.execute(
        "UPDATE api_tokens SET revoked_at = CURRENT_TIMESTAMP WHERE revoked_at IS NULL "
        "AND (scope IN ('reader', 'enrol') OR run_id IS NOT NULL)"
    )
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.alter_column('is_admin', existing_type=sa.Boolean(), nullable=False)
        batch_op.drop_constraint(op.f('fk_api_tokens_run_id_runs'), type_='foreignkey')
        batch_op.drop_column('run_id')
        batch_op.drop_column('scope')
