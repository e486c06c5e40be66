"""journal_pending: rows committed but not chained yet (group sealing on server databases)

A writer that finds the chain head locked by another writer leaves its journal rows here
instead of queueing on the head; the next writer to take the head chains them before its
own. SQLite's single writer always takes the head, so this table stays empty there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 15:20:00.000000
"""
from alembic import op
import sqlalchemy as sa

from ledger.models import BINARY_COLLATION

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('journal_pending',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True,
              nullable=False),
    sa.Column('ts', sa.BigInteger(), nullable=False),
    sa.Column('kind', sa.String(length=24), nullable=False),
    sa.Column('debit_wallet_id', sa.Integer(), nullable=True),
    sa.Column('credit_wallet_id', sa.Integer(), nullable=True),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=True),
    sa.Column('token_id', sa.String(length=40), nullable=True),
    sa.Column('hold_id', sa.String(length=40), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('data', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_journal_pending')),
    mysql_charset='utf8mb4', mysql_collate=BINARY_COLLATION
    )
    with op.batch_alter_table('journal_pending', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_journal_pending_hold_id'), ['hold_id'],
                              unique=False)
        batch_op.create_index(batch_op.f('ix_journal_pending_token_id'), ['token_id'],
                              unique=False)


def downgrade() -> None:
    if op.get_bind().execute(sa.text("SELECT COUNT(*) FROM journal_pending")).scalar():
        raise RuntimeError("journal_pending holds rows not chained yet: run "
                           "`gpuledger verify` (it chains them) before downgrading")
    op.drop_table('journal_pending')
