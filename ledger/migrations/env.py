"""Alembic environment of the ledger's own tables: run with a connection handed in by
ledger.migrate. Components with tables of their own (reports) keep their own migrations and
version table (``ledger.migrate.register``)."""

from alembic import context

from ledger.models import Base

connection = context.config.attributes["connection"]


def include_object(obj, name, type_, reflected, compare_to):
    """Autogenerate compares the ledger's own tables only (not the components')."""
    return not (type_ == "table" and reflected and compare_to is None)


context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=context.config.attributes.get("version_table", "alembic_version"),
    include_object=include_object,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
