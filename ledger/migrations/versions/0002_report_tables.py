"""journal indexes by wallet and time (balances as of a date)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 04:57:31.088913

Until the reports had a migration branch of their own, this revision also created the
report tables (``report_sends``, ``alerts``, ``alert_deliveries``); they are now created by
the reports' branch (``reports/migrations``, version table ``reports_alembic_version``),
which adopts them where this revision already made them.
"""
from alembic import op
import sqlalchemy as sa
import ledger.models


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('journal', schema=None) as batch_op:
        batch_op.create_index('ix_journal_credit_wallet_id_ts', ['credit_wallet_id', 'ts'], unique=False)
        batch_op.create_index('ix_journal_debit_wallet_id_ts', ['debit_wallet_id', 'ts'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('journal', schema=None) as batch_op:
        batch_op.drop_index('ix_journal_debit_wallet_id_ts')
        batch_op.drop_index('ix_journal_credit_wallet_id_ts')
