"""report tables: send log, alerts, alert deliveries

Revision ID: r0001
Revises:
Create Date: 2026-12-01 03:10:00

The first revision of the reports' own branch. Ledgers migrated before the branch existed
already have these tables (the ledger's revision 0002 used to create them): they are
adopted as they are.
"""
from alembic import op
import sqlalchemy as sa
import ledger.models


revision = 'r0001'
down_revision = None
branch_labels = ('reports',)
depends_on = None


def upgrade() -> None:
    have = set(sa.inspect(op.get_bind()).get_table_names())
    if 'alerts' not in have:
        op.create_table('alerts',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('account', sa.String(length=64), nullable=False),
        sa.Column('subject', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('threshold', sa.Integer(), nullable=False),
        sa.Column('figures', sa.JSON(), nullable=False),
        sa.Column('created_at', ledger.models.UTCDateTime(), nullable=False),
        sa.Column('closed_at', ledger.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_alerts')),
        sa.UniqueConstraint('account', 'subject', 'kind', 'threshold', name=op.f('uq_alerts_account_subject_kind_threshold'))
        )
        with op.batch_alter_table('alerts', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_alerts_account'), ['account'], unique=False)
    if 'report_sends' not in have:
        op.create_table('report_sends',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('scope', sa.String(length=64), nullable=False),
        sa.Column('period', sa.String(length=16), nullable=False),
        sa.Column('recipient', sa.String(length=254), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('message_id', sa.String(length=254), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('updated_at', ledger.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_report_sends')),
        sa.UniqueConstraint('kind', 'scope', 'period', 'recipient', name=op.f('uq_report_sends_kind_scope_period_recipient'))
        )
    if 'alert_deliveries' not in have:
        op.create_table('alert_deliveries',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('alert_id', sa.Integer(), nullable=False),
        sa.Column('recipient', sa.String(length=254), nullable=False),
        sa.Column('message_id', sa.String(length=254), nullable=True),
        sa.Column('sent_at', ledger.models.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['alert_id'], ['alerts.id'], name=op.f('fk_alert_deliveries_alert_id_alerts')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_alert_deliveries')),
        sa.UniqueConstraint('alert_id', 'recipient', name=op.f('uq_alert_deliveries_alert_id_recipient'))
        )


def downgrade() -> None:
    op.drop_table('alert_deliveries')
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alerts_account'))
    op.drop_table('alerts')
    op.drop_table('report_sends')
