"""The ledger's and the reports' schemas migrate on their own branches and version tables;
databases migrated before the split upgrade cleanly, on each database."""

from __future__ import annotations

from sqlalchemy import create_engine, inspect, text

from ledger import db, migrate
from reports.models import ReportBase
from reports.schema import SCHEMA, VERSION_TABLE

REPORT_TABLES = {"alerts", "report_sends", "alert_deliveries", "idle_notices"}
BEFORE_SPLIT = ("alerts", "report_sends", "alert_deliveries")  # what old 0002 created


def _versions(engine, table):
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text(f"SELECT version_num FROM {table}"))]


def test_fresh_database_gets_both_branches(db_url):
    engine = db.make_engine(db_url)
    before, after = migrate.upgrade(engine)
    assert (before, after) == (None, migrate.head())
    assert _versions(engine, "alembic_version") == [migrate.head()]
    assert _versions(engine, VERSION_TABLE) == [migrate.head(SCHEMA)]
    tables = set(inspect(engine).get_table_names())
    assert REPORT_TABLES <= tables
    assert migrate.upgrade(engine) == (migrate.head(), migrate.head())  # a no-op again
    engine.dispose()


def test_database_migrated_before_the_split_upgrades_cleanly(db_url):
    """A ledger at 0002 from before the split (report tables made by the ledger's revision,
    one version table) keeps its tables and rows, and gets the reports' version table."""
    engine = db.make_engine(db_url)
    migrate._upgrade(engine, migrate.LEDGER, "0002")
    with engine.begin() as conn:  # what the old revision 0002 created besides the indexes
        ReportBase.metadata.create_all(
            conn, tables=[ReportBase.metadata.tables[t] for t in BEFORE_SPLIT])
        conn.execute(text("INSERT INTO report_sends (kind, scope, period, recipient, status, "
                          "attempts, updated_at) VALUES ('report', 'physics', '2026-11', "
                          "'lead@physics.example', 'sent', 1, '2026-12-01 00:00:00')"))
    assert not inspect(engine).has_table(VERSION_TABLE)
    migrate.upgrade(engine)
    assert _versions(engine, "alembic_version") == [migrate.head()]
    assert _versions(engine, VERSION_TABLE) == [migrate.head(SCHEMA)]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT recipient FROM report_sends")).scalars().all() == [
            "lead@physics.example"]
    engine.dispose()


def test_ledger_alone_migrates_without_the_reports(tmp_path):
    """The ledger's own branch creates no report table; only a registered component does."""
    engine = create_engine(f"sqlite:///{tmp_path / 'l.db'}")
    migrate._upgrade(engine, migrate.LEDGER, "head")
    tables = set(inspect(engine).get_table_names())
    assert not tables & REPORT_TABLES and VERSION_TABLE not in tables
    assert {"journal", "holds", "charges"} <= tables
    engine.dispose()


def test_migrations_build_what_the_models_say(db_url):
    """Both branches at head leave nothing for autogenerate to add, drop or change (tables,
    columns, types, nullability, indexes) — the migrations and the models are one schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import MetaData

    from ledger.models import Base

    both = MetaData()
    for md in (Base.metadata, ReportBase.metadata):
        for table in md.tables.values():
            table.to_metadata(both)
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True,
            "include_name": lambda name, kind, parent: not (
                kind == "table" and name in ("alembic_version", VERSION_TABLE))})
        diffs = compare_metadata(ctx, both)
    engine.dispose()
    assert diffs == []
