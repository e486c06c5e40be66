"""Schema migrations (Alembic), run programmatically: ``gpuledger init`` / ``db upgrade``.

The ledger's tables have their own migrations (``ledger/migrations``, version table
``alembic_version``). A component with tables of its own (the reports) keeps its own
migration branch and version table and registers it here (:func:`register`); the ledger
knows nothing of it. :func:`upgrade` migrates the ledger first, then every registered
component to its head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine

from . import db
from .errors import InvalidInput

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"


@dataclass(frozen=True)
class Schema:
    """A migration branch: its scripts and the table that records its revision."""

    name: str
    location: Path
    version_table: str


LEDGER = Schema("ledger", MIGRATIONS, VERSION_TABLE)
_COMPONENTS: dict[str, Schema] = {}


def register(name: str, location: Path, version_table: str) -> None:
    """Add a component's migrations (idempotent); upgrade() runs them after the ledger's."""
    if version_table == VERSION_TABLE:
        raise ValueError("a component needs a version table of its own")
    _COMPONENTS[name] = Schema(name, Path(location), version_table)


def components() -> list[Schema]:
    return list(_COMPONENTS.values())


def _alembic(conn, schema: Schema = LEDGER) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(schema.location))
    cfg.attributes["connection"] = conn
    cfg.attributes["version_table"] = schema.version_table
    return cfg


def _revision(conn, schema: Schema) -> str | None:
    return MigrationContext.configure(
        conn, opts={"version_table": schema.version_table}).get_current_revision()


def _upgrade(engine: Engine, schema: Schema, revision: str) -> tuple[str | None, str]:
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
        before = _revision(conn, schema)
        conn.rollback()
        command.upgrade(_alembic(conn, schema), revision)
        conn.commit()
        after = _revision(conn, schema)
    return before, after


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the ledger to ``revision`` (and, at head, every registered component);
    returns the ledger's (before, after) revision ids. An unknown ``revision`` is an
    InvalidInput naming the known ones, before anything runs."""
    check_revision(revision)
    result = _upgrade(engine, LEDGER, revision)
    if revision == "head":
        for schema in components():
            _upgrade(engine, schema, "head")
    return result


def revisions(schema: Schema = LEDGER) -> list[str]:
    """The schema's revision ids, oldest first."""
    return [r.revision for r in reversed(list(ScriptDirectory(str(schema.location))
                                              .walk_revisions()))]


def check_revision(revision: str, schema: Schema = LEDGER) -> None:
    try:
        found = ScriptDirectory(str(schema.location)).get_revision(revision)
    except CommandError:
        found = None
    if found is None and revision != "head":
        raise InvalidInput(f"unknown schema revision {revision!r} (this version knows "
                           f"{', '.join(revisions(schema))}; `head` is the newest)")


def current(engine: Engine, schema: Schema = LEDGER) -> str | None:
    with db.read(engine) as conn:
        return _revision(conn, schema)


def head(schema: Schema = LEDGER) -> str:
    return ScriptDirectory(str(schema.location)).get_current_head()


def autogenerate(engine: Engine, message: str, schema: Schema = LEDGER) -> None:
    """Developer helper: write a new revision from the models' differences."""
    with engine.connect() as conn:
        command.revision(_alembic(conn, schema), message=message, autogenerate=True)
