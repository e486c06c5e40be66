"""holds of GPU shares: the GRES (gpu, shard, mps), shares per node, shares per GPU priced

A hold pays for whole GPUs (``gres='gpu'``, ``share=1``) or for shares of GPUs
(``shard``/``mps``): ``per_node`` shares on each node, priced at ``share`` shares per GPU
(the smallest shard count of the candidate GPUs, 100 for MPS). Existing holds are whole GPUs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 06:40:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('holds', schema=None) as batch_op:
        batch_op.add_column(sa.Column('gres', sa.String(length=8), server_default='gpu',
                                      nullable=False))
        batch_op.add_column(sa.Column('per_node', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('share', sa.Integer(), server_default='1',
                                      nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('holds', schema=None) as batch_op:
        batch_op.drop_column('share')
        batch_op.drop_column('per_node')
        batch_op.drop_column('gres')
