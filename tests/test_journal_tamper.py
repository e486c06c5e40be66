"""Raw-SQL tampering with the journal is found, naming the first bad row."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, text, update

from ledger.models import Charge
from ledger.views import HoldRequest

CH = Charge.__table__


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


# -- state outside the journal, and operations that must not trust it ---------------------------

def wallet(ledger, code):
    return ledger.wallet_balance(code)


def test_raised_pending_hold_amount_is_named_and_void_returns_only_the_escrow(busy):
    token, view = busy.mint("physics", 10_000)
    hold = busy.reserve(token, HoldRequest(gpus=1, seconds=600, gpu_type="h100"))
    assert wallet(busy, f"token:{view.id}") == 10_000 - 600
    sql(busy, "UPDATE holds SET amount = amount + 5000 WHERE id = :h", h=hold.id)
    result = busy.verify_journal()
    assert not result.ok
    assert f"hold {hold.id}: amount is 5600 but the journal says 600" in result.problems
    busy.void(hold.id)
    # the void returns what the journal escrowed, not the edited column
    assert wallet(busy, f"token:{view.id}") == 10_000
    assert wallet(busy, "system:escrow") == 0
    after = busy.verify_journal()
    assert not after.ok and not any("paid out" in p for p in after.problems)
    assert f"hold {hold.id}: amount is 5600 but the journal says 600" in after.problems


def test_void_that_paid_out_more_than_escrowed_is_named(busy):
    """A close row that returns more than its hold escrowed (as the old void did after an
    edited amount) is named at its row, even when every balance agrees with the journal."""
    token, view = busy.mint("physics", 10_000)
    other, _ = busy.mint("physics", 10_000)
    hold = busy.reserve(token, HoldRequest(gpus=1, seconds=600, gpu_type="h100"))
    busy.reserve(other, HoldRequest(gpus=1, seconds=900, gpu_type="h100"))  # escrow: 1500
    busy.void(hold.id)
    seq = rows(busy)[-1].seq
    rewrite(busy, seq, amount=900)  # the void row now returns 900 of the 600 escrowed
    sql(busy, "UPDATE wallets SET balance = balance - 300 WHERE code = 'system:escrow'")
    sql(busy, "UPDATE wallets SET balance = balance + 300 WHERE code = :c", c=f"token:{view.id}")
    result = busy.verify_journal()
    assert not result.ok and result.bad_seq == seq
    assert f"hold {hold.id} has paid out 300 GPU-s more than it escrowed (600)" in result.problem


def test_token_moved_to_another_account_is_named_and_revoke_pays_the_minted_pool(busy):
    token, view = busy.mint("physics", 10_000)
    sql(busy, "UPDATE tokens SET account_id = (SELECT id FROM accounts WHERE name = 'chemistry')"
              " WHERE id = :t", t=view.id)
    result = busy.verify_journal()
    assert not result.ok
    assert f"token {view.id}: account is chemistry but the journal says physics" \
        in result.problems
    busy.revoke(view.id, reason="leaked")
    assert wallet(busy, "account:physics") == 10_000
    assert wallet(busy, "account:chemistry") == 0


def test_hold_of_a_moved_token_closes_into_the_minted_pool(busy):
    token, view = busy.mint("physics", 10_000)
    hold = busy.reserve(token, HoldRequest(gpus=1, seconds=600, gpu_type="h100"))
    busy.revoke(view.id, reason="leaked")
    sql(busy, "UPDATE tokens SET account_id = (SELECT id FROM accounts WHERE name = 'chemistry')"
              " WHERE id = :t", t=view.id)
    busy.post(hold.id, 100)
    assert wallet(busy, "account:physics") == 10_000 - 100
    assert wallet(busy, "account:chemistry") == 0


def test_revoke_row_paying_the_wrong_pool_is_named(busy):
    token, view = busy.mint("physics", 10_000)
    busy.revoke(view.id, reason="leaked")
    seq = rows(busy)[-1].seq
    with busy.engine.connect() as conn:
        chem = conn.execute(text("SELECT wallet_id FROM accounts WHERE name = 'chemistry'")).scalar()
    rewrite(busy, seq, credit_wallet_id=chem)
    sql(busy, "UPDATE wallets SET balance = 0 WHERE code = 'account:physics'")
    sql(busy, "UPDATE wallets SET balance = 10000 WHERE code = 'account:chemistry'")
    result = busy.verify_journal()
    assert not result.ok and result.bad_seq == seq
    assert f"revoke of token {view.id} does not pay from the token to the pool of account " \
           "physics" in result.problem


def _wallet_id(ledger, code):
    with ledger.engine.connect() as conn:
        return conn.execute(text("SELECT id FROM wallets WHERE code = :c"), {"c": code}).scalar()


def test_a_burn_that_pays_anything_but_the_issuer_is_named(busy):
    _, view = busy.mint("physics", 10_000)
    busy.revoke(view.id, reason="leaked")
    busy.burn_pool("physics", 4_000, "policy")
    seq = rows(busy)[-1].seq
    rewrite(busy, seq, credit_wallet_id=_wallet_id(busy, f"token:{view.id}"))
    sql(busy, "UPDATE wallets SET balance = 4000 WHERE code = :c", c=f"token:{view.id}")
    sql(busy, "UPDATE wallets SET balance = balance - 4000 WHERE code = 'system:issuance'")
    result = busy.verify_journal()
    assert not result.ok and result.bad_seq == seq
    assert result.problem == (f"row {seq}: burn of account physics's pool does not pay from "
                              "that pool to system:issuance")


def test_value_taken_out_of_a_pool_by_a_mint_not_from_it_is_named(busy):
    _, view = busy.mint("physics", 10_000)
    busy.revoke(view.id, reason="leaked")  # the pool holds 10000
    _, new = busy.mint("physics", 3_000)  # from system:issuance; rewritten to the pool
    seq = rows(busy)[-1].seq
    rewrite(busy, seq, debit_wallet_id=_wallet_id(busy, "account:physics"))
    sql(busy, "UPDATE wallets SET balance = 7000 WHERE code = 'account:physics'")
    sql(busy, "UPDATE wallets SET balance = balance + 3000 WHERE code = 'system:issuance'")
    result = busy.verify_journal()
    assert not result.ok and result.bad_seq == seq
    assert f"row {seq}: mint of token {new.id} is paid from wallet " \
           f"{_wallet_id(busy, 'account:physics')}, not system:issuance" in result.problems


def test_mint_from_the_pool_and_burn_verify(busy):
    _, view = busy.mint("physics", 10_000)
    busy.revoke(view.id, reason="leaked")
    busy.mint("physics", 6_000, from_pool=True)
    first = busy.burn_pool("physics", None, "the rest", key="burn-1")
    assert busy.burn_pool("physics", None, "the rest", key="burn-1") == first  # a retry
    assert first["amount"] == 4_000
    assert busy.verify_journal().ok and busy.pool("physics") == 0


def test_token_status_and_wallet_edits_are_named(busy):
    token, view = busy.mint("physics", 10_000)
    other, oview = busy.mint("physics", 5)
    busy.revoke(view.id, reason="leaked")
    sql(busy, "UPDATE tokens SET status = 'active' WHERE id = :t", t=view.id)
    result = busy.verify_journal()
    assert f"token {view.id}: status is active but the journal says revoked" in result.problems
    with busy.engine.connect() as conn:
        wid = conn.execute(text("SELECT wallet_id FROM tokens WHERE id = :t"), {"t": oview.id}
                           ).scalar()
        pool = conn.execute(text("SELECT wallet_id FROM accounts WHERE name = 'physics'")
                            ).scalar()
    sql(busy, "UPDATE tokens SET wallet_id = :w WHERE id = :t", w=pool, t=oview.id)
    result = busy.verify_journal()
    assert f"token {oview.id}: wallet is {pool} but the journal says {wid}" in result.problems


def test_hold_state_charged_and_token_edits_are_named(busy):
    hold = busy.holds()[0]
    sql(busy, "UPDATE holds SET state = 'pending', charged = charged + 1 WHERE id = :h",
        h=hold.id)
    result = busy.verify_journal()
    assert f"hold {hold.id}: state is pending but the journal says posted" in result.problems
    assert f"hold {hold.id}: charged is {hold.charged + 1} but the journal says {hold.charged}" \
        in result.problems


def test_charges_table_edits_are_named(busy):
    charges = busy.charges(busy.holds()[1].id)
    key = charges[0]["key"]
    with busy.engine.begin() as conn:
        conn.execute(update(CH).where(CH.c.key == key).values(amount=CH.c.amount + 7))
    result = busy.verify_journal()
    assert not result.ok and f"charge {key!r}: hold" in result.problem
    assert any("system:usage holds" in p for p in result.problems)
    with busy.engine.begin() as conn:
        conn.execute(delete(CH).where(CH.c.key == key))
    result = busy.verify_journal()
    assert any(f"charge {key!r} of hold" in p and "missing from the charges table" in p
               for p in result.problems)


def test_deleted_tail_leaving_its_hold_is_named_without_a_head(busy):
    """Deleting the last hold's journal rows, moving the head back and fixing every balance
    still leaves its hold and charge rows without journal rows."""
    token, view = busy.mint("physics", 10_000)
    start = rows(busy)[-1].seq
    hold = busy.reserve(token, HoldRequest(gpus=1, seconds=600, gpu_type="h100"))
    busy.post(hold.id, 250)
    truncate_after(busy, start)
    sql(busy, "UPDATE wallets SET balance = 10000 WHERE code = :c", c=f"token:{view.id}")
    sql(busy, "UPDATE wallets SET balance = balance - 250 WHERE code = 'system:usage'")
    result = busy.verify_journal()
    assert not result.ok
    assert f"hold {hold.id} has no reserve row in the journal" in result.problems


# -- exported heads --------------------------------------------------------------------------------

def exported(ledger, kid="attest1"):
    if kid not in {k["kid"] for k in ledger.attest_keys()}:
        ledger.generate_attest_key(kid)
    result, head = ledger.export_head()
    assert result.ok and head is not None, result.problem
    return head


def stranger(ledger, tmp_path):
    """The same database seen from another host: no keys, no memory of exports."""
    from ledger.service import Ledger
    return Ledger(ledger.engine, keys_dir=tmp_path / "elsewhere", clock=ledger.clock)


def test_rewritten_row_with_every_later_hash_recomputed_is_named_against_the_head(busy, tmp_path):
    head = exported(busy)
    rewrite(busy, 3, reason="rewritten")  # no money moves: every balance still agrees
    result = stranger(busy, tmp_path).verify_journal([("HEAD.json", head)])
    assert not result.ok
    assert any(p.startswith(f"HEAD.json: history rewritten: row {head['seq']} now hashes to ")
               for p in result.problems)
    local = busy.verify_journal()  # the exporting host remembers its last export
    assert not local.ok and "history rewritten" in local.problem
    assert any("history rewritten" in p and "last-head.json" in p for p in local.problems)


def test_deleted_tail_with_head_moved_back_is_named_against_the_head(busy, tmp_path):
    start = rows(busy)[-1].seq
    busy.set_report_to("physics", ["lead@example.org"])
    busy.set_rate("l40s", 400_000)
    head = exported(busy)
    truncate_after(busy, start)  # the attestation key's row and the export's go too
    # the chain alone tells only that a journaled table lost its row: the rate l40s
    alone = stranger(busy, tmp_path).verify_journal()
    assert alone.problems == ["rate l40s: in the rates table but set by no journal row"]
    result = stranger(busy, tmp_path).verify_journal([("HEAD.json", head)])
    assert not result.ok
    assert any(f"HEAD.json: exported at row {head['seq']}" in p and
               f"journal now ends at row {start}: rows were deleted from the end and the head "
               "moved back" in p for p in result.problems)
    assert not busy.verify_journal().ok


def test_replayed_old_head_is_named(busy, tmp_path):
    old = exported(busy)
    busy.set_rate("l40s", 400_000)
    new = exported(busy)
    assert new["seq"] > old["seq"]
    assert busy.verify_journal([("new.json", new)]).ok
    result = stranger(busy, tmp_path).verify_journal([("old.json", old)])
    assert not result.ok
    assert result.problem.startswith(f"old.json: replayed old head: it is the export of row "
                                     f"{old['seq']}")
    assert f"export of row {new['seq']}" in result.problem and "ledger's record" in result.problem
    # history rewritten after the old head, the export records wiped with it: this host's
    # memory of its last export still names both
    truncate_after(busy, old["seq"])
    result = busy.verify_journal([("old.json", old)])
    assert any("old.json: replayed old head" in p and "last-head.json" in p
               for p in result.problems)
    assert any("rows were deleted from the end" in p for p in result.problems)


def test_heads_are_signed_with_an_attestation_key_not_the_minting_key(busy):
    from ledger.errors import KeyError_, LedgerError
    from ledger import attest
    with pytest.raises(KeyError_, match="--purpose attest"):
        busy.export_head()
    busy.generate_attest_key("attest1")
    busy.retire_key("k1")
    (busy.keys_dir / "k1.key").unlink()  # the minting key is gone from this host
    result, head = busy.export_head()
    assert result.ok and head["kid"] == "attest1" and attest.signature_ok(head)
    assert busy.verify_journal([("HEAD.json", head)]).ok
    # the attestation key can neither mint nor verify tokens
    with pytest.raises(LedgerError):
        busy.mint("physics", 10, kid="attest1")
    assert "attest1" not in {k["kid"] for k in busy.list_keys()}
    edited = {**head, "seq": head["seq"] - 1}
    result = busy.verify_journal([("HEAD.json", edited)])
    assert result.problem == "HEAD.json: the signature does not verify (the head file was altered)"


def test_head_signed_by_a_key_unknown_to_the_ledger_is_named(busy, tmp_path):
    from ledger import keys, attest
    head = exported(busy)
    forger = keys.generate(tmp_path / "forger", "attest1")
    body = {k: v for k, v in head.items() if k != "signature"}
    body["public_key"] = keys.public_text(forger)
    from ledger.tokens import b64e, canonical
    forged = {**body, "signature": b64e(forger.sign(canonical(body)))}
    assert attest.signature_ok(forged)
    result = stranger(busy, tmp_path).verify_journal([("HEAD.json", forged)])
    assert result.problem == ("HEAD.json: the public key of attest1 differs from the ledger's "
                              "record of it")


# -- helpers that tamper like someone with write access to the database --------------------------

def rewrite(ledger, seq: int, **changes):
    """Change row ``seq`` and recompute its hash and every later link and hash, and the head."""
    from ledger.journal import row_hash
    with ledger.engine.begin() as conn:
        later = conn.execute(text("SELECT * FROM journal WHERE seq >= :s ORDER BY seq"),
                             {"s": seq}).mappings().all()
        prev = later[0]["prev_hash"]
        for i, r in enumerate(later):
            r = {**r, **(changes if i == 0 else {})}
            digest = row_hash(prev, r["seq"], r["ts"], r["kind"], r["debit_wallet_id"],
                              r["credit_wallet_id"], r["amount"], r["account"], r["token_id"],
                              r["hold_id"], r["reason"], r["data"])
            sets = {**(changes if i == 0 else {}), "prev_hash": prev, "hash": digest}
            conn.execute(text("UPDATE journal SET " + ", ".join(f"{k} = :{k}" for k in sets)
                              + " WHERE seq = :seq"), {**sets, "seq": r["seq"]})
            prev = digest
        conn.execute(text("UPDATE chain_head SET hash = :h WHERE id = 1"), {"h": prev})


def truncate_after(ledger, seq: int):
    """Delete every journal row after ``seq`` and move the head back onto it."""
    with ledger.engine.begin() as conn:
        last = conn.execute(text("SELECT hash FROM journal WHERE seq = :s"), {"s": seq}).scalar()
        conn.execute(text("DELETE FROM journal WHERE seq > :s"), {"s": seq})
        conn.execute(text("UPDATE chain_head SET seq = :s, hash = :h WHERE id = 1"),
                     {"s": seq, "h": last})


def test_closed_hold_edited_back_to_pending_cannot_be_closed_again(busy):
    hold = busy.holds()[0]
    sql(busy, "UPDATE holds SET state = 'pending' WHERE id = :h", h=hold.id)
    before = rows(busy)[-1].seq
    from ledger.errors import StateError
    with pytest.raises(StateError, match=f"hold {hold.id} is already posted"):
        busy.void(hold.id)
    assert rows(busy)[-1].seq == before


def test_retired_attestation_key_signs_nothing_new(busy, tmp_path):
    first = exported(busy, "attest1")
    busy.retire_key("attest1")
    from ledger.errors import KeyError_
    with pytest.raises(KeyError_, match="no head-attestation key on this host"):
        busy.export_head()
    second = exported(busy, "attest2")
    assert (first["kid"], second["kid"]) == ("attest1", "attest2")
    assert busy.verify_journal([("second.json", second)]).ok
    assert [(k["kid"], bool(k["retired"])) for k in busy.attest_keys()] == [
        ("attest1", True), ("attest2", False)]


def test_head_of_another_ledger_is_named(busy, tmp_path):
    from conftest import seeded
    other = seeded(f"sqlite:///{tmp_path / 'other.db'}", tmp_path / "other-keys")
    head = exported(other)
    result = stranger(busy, tmp_path).verify_journal([("other.json", head)])
    assert result.problem == ("other.json: exported from another ledger (or row 1 was "
                              "rewritten): its first row differs")
    other.engine.dispose()


def test_hold_moved_to_another_token_is_named_and_void_returns_to_the_reserving_token(busy):
    token, view = busy.mint("physics", 10_000)
    _, thief = busy.mint("physics", 1)
    hold = busy.reserve(token, HoldRequest(gpus=1, seconds=600, gpu_type="h100"))
    sql(busy, "UPDATE holds SET token_id = :t WHERE id = :h", t=thief.id, h=hold.id)
    result = busy.verify_journal()
    assert f"hold {hold.id}: token is {thief.id} but the journal says {view.id}" \
        in result.problems
    busy.void(hold.id)
    assert wallet(busy, f"token:{view.id}") == 10_000
    assert wallet(busy, f"token:{thief.id}") == 1
