"""Monthly budget reports, the site summary and threshold alerts, sent by email."""
