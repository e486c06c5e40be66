"""idle notices: settlements flagged for idle GPUs, their refund and their digest

Revision ID: r0002
Revises: r0001
Create Date: 2026-12-01 11:30:00
"""
from alembic import op
import sqlalchemy as sa
import ledger.models

from ledger.models import BINARY_COLLATION

revision = 'r0002'
down_revision = 'r0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('idle_notices',
    sa.Column('charge_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('hold_id', sa.String(length=64), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('user', sa.String(length=64), nullable=True),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('node', sa.String(length=64), nullable=True),
    sa.Column('owner', sa.String(length=80), nullable=False),
    sa.Column('held_ms', sa.BigInteger(), nullable=False),
    sa.Column('idle_ms', sa.BigInteger(), nullable=False),
    sa.Column('idle_max_ms', sa.BigInteger(), nullable=False),
    sa.Column('idle_cost', sa.BigInteger(), nullable=False),
    sa.Column('refund', sa.BigInteger(), nullable=False),
    sa.Column('charged_at', ledger.models.UTCDateTime(), nullable=False),
    sa.Column('created_at', ledger.models.UTCDateTime(), nullable=False),
    sa.Column('mailed_to', sa.JSON(), nullable=True),
    sa.Column('mailed_at', ledger.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('charge_id', name=op.f('pk_idle_notices')),
    mysql_charset='utf8mb4', mysql_collate=BINARY_COLLATION
    )
    with op.batch_alter_table('idle_notices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_idle_notices_owner_mailed_at'),
                              ['owner', 'mailed_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('idle_notices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_idle_notices_owner_mailed_at'))
    op.drop_table('idle_notices')
