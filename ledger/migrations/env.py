"""Alembic environment: always run with a connection handed in by ledger.migrate."""

from alembic import context

from ledger.models import Base
import reports.models  # noqa: F401,E402  (report tables and indexes)

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
