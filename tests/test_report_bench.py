"""The benchmark's bulk loader writes a valid ledger, and the report adds it up the same way."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report_bench as rb
from ledger import db
from ledger.audit import verify
from ledger.models import Hold
from ledger.queries import account_views
from reports.figures import build


def test_bulk_loaded_month_verifies_and_reports(tmp_path):
    lg, tokens = rb.setup(f"sqlite:///{tmp_path / 'b.db'}", tmp_path / "keys", 4, 400)
    rb.bulk_load(lg, tokens, 400)
    with db.read(lg.engine) as conn:
        v = verify(conn)
        assert v.ok, v.problem
        assert v.rows >= 3 * 400
        charged = conn.execute(select(func.sum(Hold.charged))).scalar()
        site = build(conn, rb.MONTH, rb.MONTH.end + timedelta(days=1))
    assert site.jobs == 400 and site.totals.charged == charged
    views = {v.name: v for v in account_views(lg)}
    for r in site.accounts:
        assert r.statement.reconciles()
        assert r.statement.closing == views[r.account].remaining + views[r.account].pool
        assert r.statement.opening == r.statement.closing + r.statement.charged
        assert r.measure.coverage == 1.0 and 0 < r.measure.efficiency < 1
        assert len(r.worst_jobs) == 10
    rendered = rb.run_reports(lg, tmp_path / "out")
    assert rendered["files"] == 4 * 3 + 2  # html + png + txt per account, site html + txt
