"""tiers: rate multipliers by partition, QOS and off-peak window; a hold's QOS and multiplier

``multipliers`` holds one row per tier (``kind`` partition | qos | offpeak, ``name`` the
partition, the QOS or the window ``HH:MM-HH:MM``, ``zone`` the site's time zone for
windows). A hold records the job's QOS and the multiplier it was priced at (1.0 for every
hold before tiers).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 07:00:00.000000
"""
from alembic import op
import sqlalchemy as sa
import ledger.models

from ledger.models import BINARY_COLLATION

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('multipliers',
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('multiplier_ppm', sa.BigInteger(), nullable=False),
    sa.Column('zone', sa.String(length=64), nullable=True),
    sa.Column('updated_at', ledger.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'name', name=op.f('pk_multipliers')),
    mysql_charset='utf8mb4', mysql_collate=BINARY_COLLATION
    )
    with op.batch_alter_table('holds', schema=None) as batch_op:
        batch_op.add_column(sa.Column('qos', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('multiplier_ppm', sa.BigInteger(),
                                      server_default='1000000', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('holds', schema=None) as batch_op:
        batch_op.drop_column('multiplier_ppm')
        batch_op.drop_column('qos')
    op.drop_table('multipliers')
