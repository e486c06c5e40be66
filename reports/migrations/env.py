"""Alembic environment of the reports' tables (their own branch and version table), run
with a connection handed in by ledger.migrate (see reports.schema)."""

from alembic import context

from reports.models import ReportBase

connection = context.config.attributes["connection"]


def include_object(obj, name, type_, reflected, compare_to):
    """Autogenerate compares the reports' own tables only (not the ledger's)."""
    return not (type_ == "table" and reflected and compare_to is None)


context.configure(
    connection=connection,
    target_metadata=ReportBase.metadata,
    version_table=context.config.attributes["version_table"],
    include_object=include_object,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
