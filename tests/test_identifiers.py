"""Identifiers and keys compare as bytes on every database: case and trailing spaces count.

MariaDB's default collations ignore case and its ``_bin`` ones ignore trailing spaces
(PAD SPACE); the ledger's tables use ``utf8mb4_nopad_bin`` there, from migration 0003
on. PostgreSQL and SQLite compare bytes by default — the same tests show it.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from ledger import db, migrate
from ledger import reserve as reserve_module
from ledger.models import JournalPending
from ledger.service import Ledger
from ledger.settlement import charge_key
from ledger.tiers import Tiers
from ledger.views import HoldRequest

KEYS = ["Job-Key-1", "job-key-1", "job-key-1 "]


def _holds_under_keys(ledger) -> None:
    token, view = ledger.mint("physics", 10_000)
    request = HoldRequest(gpus=1, seconds=60, gpu_type="h100")
    holds = [ledger.reserve(token, request, key=k) for k in KEYS]
    assert len({h.id for h in holds}) == 3
    assert ledger.inspect(view.id).held == 3 * 60
    # and each key still replays its own hold
    assert [ledger.reserve(token, request, key=k).id for k in KEYS] == [h.id for h in holds]


def test_idempotency_keys_differing_in_case_or_trailing_space_are_different_keys(ledger):
    _holds_under_keys(ledger)


def test_node_charges_differing_in_case_are_two_charges(ledger):
    token, _ = ledger.mint("physics", 10_000)
    hold = ledger.reserve(token, HoldRequest(gpus=2, seconds=600, gpu_type="h100"))
    for node in ("gpuA", "gpua"):
        ledger.post(hold.id, 100, key=charge_key(hold.id, "42", 0, node), final=False,
                    cap=True, job_id="42", node=node, restart=0)
    assert sorted(c["node"] for c in ledger.charges(hold.id)) == ["gpuA", "gpua"]
    assert ledger.hold(hold.id).charged == 200
    assert ledger.wallet_balance("system:usage") == 200


def test_rates_differing_in_case_are_two_rates(ledger):
    ledger.set_rate("H100", 3_000_000)
    assert ledger.rates()["h100"] == 1_000_000 and ledger.rates()["H100"] == 3_000_000
    token, _ = ledger.mint("physics", 100_000)
    assert ledger.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="h100")).amount == 60
    assert ledger.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="H100")).amount == 180


def _text_collations(engine) -> set[tuple[str, str, str]]:
    """(table, column, collation) of every text column (JSON documents are longtext, whose
    collation MariaDB fixes at utf8mb4_bin; they are never compared as keys)."""
    with engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT table_name, column_name, collation_name FROM information_schema.columns "
            "WHERE table_schema = DATABASE() AND data_type IN ('char', 'varchar', 'text')"
        )).all())


def _foreign_keys(engine) -> set[tuple[str, str, str]]:
    with engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT constraint_name, table_name, referenced_table_name "
            "FROM information_schema.referential_constraints "
            "WHERE constraint_schema = DATABASE()")).all())


def test_upgrading_an_existing_ledger_makes_its_identifiers_binary(db_url, tmp_path: Path,
                                                                   clock):
    """A ledger created before 0003 (MariaDB tables in the server's case-insensitive
    default) keeps its data, its foreign keys and gets the same byte-wise comparisons."""
    fast = reserve_module._fast_reserve_row
    engine = db.make_engine(db_url)
    try:
        migrate.upgrade(engine, "0002")
        old = Ledger(engine, keys_dir=tmp_path / "keys", clock=clock)
        # today's code on 0002's schema: the tiers (0005) it would read are not there yet,
        # nor the table of rows waiting to be chained (0006), made here for the old code
        JournalPending.__table__.create(engine)
        old.tiers = lambda conn=None: Tiers()
        reserve_module._fast_reserve_row = lambda *a: None
        old.bootstrap()
        old.generate_key("k1")
        old.create_account("physics")
        old.set_rate("h100", 1_000_000)
        token, view = old.mint("physics", 10_000)
        first = old.reserve(token, HoldRequest(gpus=1, seconds=60, gpu_type="h100"),
                            key="job-key-1")
        mariadb = engine.dialect.name in ("mysql", "mariadb")
        if mariadb:
            assert any(c != "utf8mb4_nopad_bin" for _, _, c in _text_collations(engine))
            fks = _foreign_keys(engine)
            assert fks

        reserve_module._fast_reserve_row = fast
        JournalPending.__table__.drop(engine)  # empty: nothing was left pending
        assert migrate.upgrade(engine) == ("0002", migrate.head())

        lg = Ledger(engine, keys_dir=tmp_path / "keys", clock=clock)
        assert lg.hold(first.id).amount == 60 and lg.verify_journal().ok
        request = HoldRequest(gpus=1, seconds=60, gpu_type="h100")
        holds = [lg.reserve(token, request, key=k) for k in KEYS]
        assert holds[1].id == first.id  # the old key replays its hold
        assert len({h.id for h in holds}) == 3 and lg.inspect(view.id).held == 3 * 60
        lg.set_rate("H100", 3_000_000)
        assert lg.rates() == {"H100": 3_000_000, "h100": 1_000_000}
        if mariadb:
            assert {c for _, _, c in _text_collations(engine)} == {"utf8mb4_nopad_bin"}
            with engine.connect() as conn:
                assert conn.execute(text("SELECT @@collation_database")).scalar() == \
                    "utf8mb4_nopad_bin"
            assert fks <= _foreign_keys(engine)  # every foreign key is back
    finally:
        reserve_module._fast_reserve_row = fast
        engine.dispose()
