"""Monthly budget reports, the site summary and threshold alerts, sent by email."""

from . import schema  # noqa: F401  (registers the reports' migrations with the ledger's)
