"""Raw-SQL tampering with the journal is found, naming the first bad row."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from ledger.views import HoldRequest


@pytest.fixture
def busy(ledger):
    token, _ = ledger.mint("physics", 36000)
    for i in range(4):
        hold = ledger.reserve(token, HoldRequest(gpus=1, seconds=600, gpu_type="h100"))
        ledger.post(hold.id, 100 + i)
    assert ledger.verify_journal().ok
    return ledger


def sql(ledger, statement, **params):
    with ledger.engine.begin() as conn:
        conn.execute(text(statement), params)


def rows(ledger):
    with ledger.engine.connect() as conn:
        return conn.execute(text("SELECT seq, amount, kind FROM journal ORDER BY seq")).all()


def test_edit_amount(busy):
    seq = [r.seq for r in rows(busy) if r.kind == "charge"][1]
    sql(busy, "UPDATE journal SET amount = amount - 1 WHERE seq = :s", s=seq)
    result = busy.verify_journal()
    assert not result.ok and result.bad_seq == seq and "edited" in result.problem


def test_edit_reason_text(busy):
    sql(busy, "UPDATE journal SET reason = 'x' WHERE seq = 3")
    result = busy.verify_journal()
    assert result.bad_seq == 3 and "edited" in result.problem


def test_delete_middle_row(busy):
    sql(busy, "DELETE FROM journal WHERE seq = 9")
    result = busy.verify_journal()
    assert not result.ok and result.bad_seq == 10 and "deleted" in result.problem


def test_delete_last_row(busy):
    last = rows(busy)[-1].seq
    sql(busy, "DELETE FROM journal WHERE seq = :s", s=last)
    result = busy.verify_journal()
    assert not result.ok and result.bad_seq == last and "chain head" in result.problem


def test_reorder_rows(busy):
    # swap the contents of rows 8 and 9 but keep their seq numbers
    sql(busy, "UPDATE journal SET seq = -1 WHERE seq = 8")
    sql(busy, "UPDATE journal SET seq = 8 WHERE seq = 9")
    sql(busy, "UPDATE journal SET seq = 9 WHERE seq = -1")
    result = busy.verify_journal()
    assert not result.ok and result.bad_seq == 8


def test_insert_row(busy):
    with busy.engine.connect() as conn:
        r = conn.execute(text("SELECT * FROM journal WHERE seq = 7")).mappings().one()
    sql(busy, "UPDATE journal SET seq = seq + 1000 WHERE seq >= 7")
    sql(busy, "UPDATE journal SET seq = seq - 999 WHERE seq >= 1007")
    cols = ", ".join(r.keys())
    values = ", ".join(f":{k}" for k in r.keys())
    sql(busy, f"INSERT INTO journal ({cols}) VALUES ({values})", **{**dict(r), "amount": 1})
    result = busy.verify_journal()
    assert not result.ok and result.bad_seq == 7


def test_balance_edit_without_journal(busy):
    sql(busy, "UPDATE wallets SET balance = balance + 5 WHERE code = 'system:usage'")
    result = busy.verify_journal()
    assert not result.ok and "system:usage" in result.problem


def test_rehashed_edit_is_caught_by_the_next_link(busy):
    """Recomputing an edited row's own hash still breaks the following row's link."""
    from ledger.journal import row_hash
    with busy.engine.connect() as conn:
        r = conn.execute(text("SELECT * FROM journal WHERE seq = 5")).mappings().one()
    new = row_hash(r["prev_hash"], r["seq"], r["ts"], r["kind"], r["debit_wallet_id"],
                   r["credit_wallet_id"], r["amount"] + 1, r["account"], r["token_id"],
                   r["hold_id"], r["reason"], r["data"])
    sql(busy, "UPDATE journal SET amount = amount + 1, hash = :h WHERE seq = 5", h=new)
    result = busy.verify_journal()
    assert not result.ok and result.bad_seq == 6 and "link" in result.problem
