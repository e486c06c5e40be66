"""identifiers and keys compare as bytes on MariaDB: every text column utf8mb4_nopad_bin

MariaDB's default collations ignore case (and accents), and its ``_bin`` ones are PAD
SPACE: under either, idempotency keys ``Job-Key-1``, ``job-key-1`` and ``job-key-1 ``
were one key, node charge keys of ``gpuA`` and ``gpua`` one charge, rates ``H100`` and
``h100`` one rate. ``utf8mb4_nopad_bin`` (MariaDB 10.2 and later, 11.x included)
compares the bytes, trailing spaces too — as PostgreSQL and SQLite do by default, so
there is nothing to change on those.

Every table of the ledger's database is converted, whichever migration created it, and
the database's default becomes the same, so tables created later are binary as well.
MariaDB refuses to change a column a foreign key uses, so the foreign keys are dropped
around the conversion and created again as they were.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 03:20:00.000000
"""
import sqlalchemy as sa
from alembic import op

from ledger.models import BINARY_COLLATION

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name not in ("mysql", "mariadb"):
        return  # PostgreSQL and SQLite compare text as bytes already
    inspector = sa.inspect(bind)
    tables = inspector.get_table_names()
    foreign_keys = {t: inspector.get_foreign_keys(t) for t in tables}
    for table, keys in foreign_keys.items():
        for fk in keys:
            op.drop_constraint(fk["name"], table, type_="foreignkey")
    op.execute(f"ALTER DATABASE CHARACTER SET utf8mb4 COLLATE {BINARY_COLLATION}")
    for table in tables:
        op.execute(f"ALTER TABLE `{table}` CONVERT TO CHARACTER SET utf8mb4 "
                   f"COLLATE {BINARY_COLLATION}")
    for table, keys in foreign_keys.items():
        for fk in keys:
            op.create_foreign_key(fk["name"], table, fk["referred_table"],
                                  fk["constrained_columns"], fk["referred_columns"],
                                  **fk.get("options", {}))


def downgrade() -> None:
    # Nothing to undo: every version of the ledger means identifiers to compare as bytes,
    # and a case-insensitive collation could not hold the keys a binary one let in.
    pass
