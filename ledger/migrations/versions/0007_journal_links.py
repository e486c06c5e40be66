"""journal the run → hold links made before links were journaled

``gpuledger verify`` holds every run → hold link (an idempotency record of op ``link``,
``ledger.joblinks``) against a ``link`` row of the journal, which ``link_job`` now writes
with it. A link made before this revision has no such row: this revision appends one per
link that lacks it, in key order, to the hash chain (a row of no value whose reason says
this migration recorded it), so that from now on no link escapes the check — neither one
edited nor one inserted afterwards. No schema change.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 09:00:00.000000
"""
import json
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from ledger.facts import LINK_KIND
from ledger.journal import JOURNAL_COLUMNS, canonical_data, micros, row_hash

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

REASON = "recorded by migration 0007: linked before links were journaled"
CHUNK = 500


def _loaded(value):
    return json.loads(value) if isinstance(value, str | bytes) else value


def upgrade() -> None:
    conn = op.get_bind()
    idem = sa.table("idempotency", sa.column("key", sa.String), sa.column("op", sa.String),
                    sa.column("result", sa.Text))
    journal = sa.table("journal", *(sa.column(c) for c in JOURNAL_COLUMNS))
    pending = sa.table("journal_pending", sa.column("kind"), sa.column("data"))
    head_table = sa.table("chain_head", sa.column("id"), sa.column("seq"), sa.column("hash"))
    links = conn.execute(sa.select(idem.c.key, idem.c.result).where(idem.c.op == "link")).all()
    if not links:
        return
    head = sa.select(head_table.c.seq, head_table.c.hash).where(head_table.c.id == 1)
    head = conn.execute(head if conn.dialect.name == "sqlite" else head.with_for_update()).first()
    if head is None:
        raise RuntimeError("links are recorded but the journal has no chain head")
    journaled = set()
    for table in (journal, pending):
        for (data,) in conn.execute(sa.select(table.c.data).where(table.c.kind == LINK_KIND)):
            journaled.add(json.loads(data).get("key"))
    seq, prev = head
    ts = micros(datetime.now(UTC))
    rows = []
    for key, result in sorted(links, key=lambda link: link[0]):
        if key in journaled:
            continue
        result = _loaded(result)
        data = canonical_data({"key": key,
                               "hold": result.get("hold") if isinstance(result, dict) else None})
        seq += 1
        digest = row_hash(prev, seq, ts, LINK_KIND, None, None, 0, None, None, None, REASON,
                          data)
        rows.append(dict(zip(JOURNAL_COLUMNS, (seq, ts, LINK_KIND, None, None, 0, None, None,
                                               None, REASON, data, prev, digest))))
        prev = digest
    for at in range(0, len(rows), CHUNK):
        conn.execute(journal.insert(), rows[at:at + CHUNK])
    if rows:
        conn.execute(head_table.update().where(head_table.c.id == 1).values(seq=seq, hash=prev))


def downgrade() -> None:
    """The journal is append-only: the rows stay (and 0007 again adds none twice)."""
