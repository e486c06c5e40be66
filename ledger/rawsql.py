"""Hot-path SQL on the driver's own cursor, typed by the models.

Reserve, post and void run a dozen statements each; through SQLAlchemy's execution
machinery each costs 30–60 µs of Python, through the driver's cursor 4–10 µs. The
statements here are written once with ``?`` marks (turned into the driver's paramstyle,
identifiers quoted by the dialect) and their values converted by the column types the
models declare — :class:`~ledger.models.UTCDateTime` and JSON — so a row read or written
here is the row SQLAlchemy would read or write. Driver errors raised here are mapped and
retried by the same rule as SQLAlchemy's (``ledger.db.as_dbapi_error``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

from sqlalchemy import JSON, Connection, Table

from .models import UTCDateTime

FOR_UPDATE = " FOR UPDATE"
INSERT_ROWS = 500  # rows per multi-row INSERT (13 values each for the journal)
_SQL_CACHE: dict[tuple[str, str, str], str] = {}


def raw_sql(conn: Connection):
    """Hot-path SQL written with ``?`` marks, turned into the driver's paramstyle (cached).

    SQLite ignores row locks (``BEGIN IMMEDIATE`` already serialises writers), so
    ``FOR UPDATE`` is dropped there.
    """
    dialect = conn.dialect
    style = dialect.paramstyle
    sqlite = dialect.name == "sqlite"

    def convert(text: str) -> str:
        key = (dialect.name, style, text)
        out = _SQL_CACHE.get(key)
        if out is None:
            out = text.replace(FOR_UPDATE, "") if sqlite else text
            if style in ("format", "pyformat"):
                out = out.replace("%", "%%").replace("?", "%s")
            _SQL_CACHE[key] = out
        return out

    return convert


class JSONText(str):
    """A JSON column's value serialised already: :meth:`Raw.insert` stores this text as it
    is (a charge's journal row carries the digest of exactly what its usage column holds)."""

    @classmethod
    def of(cls, value) -> JSONText:
        return cls(json.dumps(value))


class Record(SimpleNamespace):
    """A row read here: attributes by column name, like a SQLAlchemy Row (``_mapping`` too)."""

    @property
    def _mapping(self) -> dict:
        return vars(self)


def load_time(value):
    """A UTCDateTime column as read by the driver (SQLite gives text) → aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC)


def load_json(value):
    """A JSON column as read by the driver (PostgreSQL parses it; the others give text)."""
    if value is None or not isinstance(value, str | bytes):
        return value
    return json.loads(value)


def _readers(table: Table) -> dict:
    """Column name -> the reader of its values, for the typed columns (cached)."""
    out = _READERS.get(table.name)
    if out is None:
        out = _READERS[table.name] = {
            c.name: load_time if isinstance(c.type, UTCDateTime) else load_json
            for c in table.columns if isinstance(c.type, UTCDateTime | JSON)}
    return out


class Raw:
    """One cursor for the statements of one transaction (``with Raw(conn) as raw:`` where
    no transaction's cursor is at hand)."""

    __slots__ = ("conn", "sql", "sqlite", "cur")

    def __init__(self, conn: Connection):
        self.conn = conn
        self.sql = raw_sql(conn)
        self.sqlite = conn.dialect.name == "sqlite"
        self.cur = conn.connection.driver_connection.cursor()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # -- values in ----------------------------------------------------------------------------

    def time(self, value: datetime | None):
        """An aware datetime as its UTCDateTime column stores it (naive UTC; SQLite: the
        text SQLAlchemy writes, microseconds always present, so text order is time order)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger")
        value = value.astimezone(UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f") if self.sqlite else value

    @staticmethod
    def json(value) -> str:
        """A JSON column's value, serialised as SQLAlchemy's JSON type does (a
        :class:`JSONText` is that already)."""
        return str(value) if isinstance(value, JSONText) else json.dumps(value)

    # -- statements ---------------------------------------------------------------------------

    def run(self, text: str, params=()) -> int:
        self.cur.execute(self.sql(text), params)
        return self.cur.rowcount

    def one(self, text: str, params=()):
        self.cur.execute(self.sql(text), params)
        return self.cur.fetchone()

    def all(self, text: str, params=()) -> list:
        self.cur.execute(self.sql(text), params)
        return list(self.cur.fetchall())

    def record(self, table: Table, text: str, params=()) -> Record | None:
        """One row as a :class:`Record`, its ``table``'s columns typed as the model says."""
        self.cur.execute(self.sql(text), params)
        row = self.cur.fetchone()
        if row is None:
            return None
        names = [d[0] for d in self.cur.description]
        readers = _readers(table)
        values = {}
        for name, value in zip(names, row):
            reader = readers.get(name)
            values[name] = reader(value) if reader is not None else value
        return Record(**values)

    def insert(self, table: Table, values: dict) -> None:
        """INSERT one row; values of UTCDateTime and JSON columns are converted here."""
        readers = _readers(table)
        params = []
        for name, value in values.items():
            kind = readers.get(name)
            if kind is load_time:
                value = self.time(value)
            elif kind is load_json:
                value = self.json(value)
            params.append(value)
        self.cur.execute(self.sql(self._insert_sql(table.name, tuple(values), 1)), params)

    def insert_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        """INSERT rows of plain values, INSERT_ROWS per statement: one round trip each (a
        driver's executemany may take several), under every driver's parameter limit."""
        for at in range(0, len(rows), INSERT_ROWS):
            chunk = rows[at:at + INSERT_ROWS]
            self.cur.execute(self.sql(self._insert_sql(table, columns, len(chunk))),
                             [value for row in chunk for value in row])

    def delete_ids(self, table: str, ids: list[int]) -> None:
        """DELETE the rows with these ids (INSERT_ROWS per statement)."""
        for at in range(0, len(ids), INSERT_ROWS):
            chunk = ids[at:at + INSERT_ROWS]
            self.run(f"DELETE FROM {table} WHERE id IN ({', '.join('?' * len(chunk))})", chunk)

    def _insert_sql(self, table: str, columns: tuple[str, ...], n: int) -> str:
        key = (self.conn.dialect.name, table, columns, n)
        text = _INSERTS.get(key)
        if text is None:
            quote = self.conn.dialect.identifier_preparer.quote
            marks = "(" + ", ".join("?" * len(columns)) + ")"
            text = _INSERTS[key] = (
                f"INSERT INTO {table} ({', '.join(quote(c) for c in columns)}) VALUES " +
                ", ".join([marks] * n))
        return text

    def quote(self, name: str) -> str:
        return self.conn.dialect.identifier_preparer.quote(name)

    def close(self) -> None:
        self.cur.close()


_READERS: dict[str, dict] = {}
_INSERTS: dict[tuple, str] = {}
