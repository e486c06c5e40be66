"""The reports' tables have their own migration branch (``reports/migrations``) and version
table, registered with the ledger's migrations on import: ``gpuledger init`` / ``db upgrade``
migrate them after the ledger's tables."""

from __future__ import annotations

from pathlib import Path

from ledger import migrate

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "reports_alembic_version"

migrate.register("reports", MIGRATIONS, VERSION_TABLE)
SCHEMA = next(s for s in migrate.components() if s.name == "reports")
