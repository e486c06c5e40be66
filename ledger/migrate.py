"""Schema migrations (Alembic), run programmatically: ``gpuledger init`` / ``db upgrade``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from . import db

MIGRATIONS = Path(__file__).with_name("migrations")


def _alembic(conn) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate to ``revision``; returns (before, after) revision ids."""
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        conn.rollback()
        command.upgrade(_alembic(conn), revision)
        conn.commit()
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after


def current(engine: Engine) -> str | None:
    with db.read(engine) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head() -> str:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def autogenerate(engine: Engine, message: str) -> None:
    """Developer helper: write a new revision from the models' differences."""
    with engine.connect() as conn:
        command.revision(_alembic(conn), message=message, autogenerate=True)
