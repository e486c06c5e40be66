"""The idempotency records: what a key stored, and the fingerprint of a request's fields.

Every retried write carries its key; the ledger stores (op, fingerprint, result) under it
once (``ledger.service``), and the job links are such records (``ledger.joblinks``).
"""

from __future__ import annotations

import hashlib
import json

from .rawsql import Raw, load_json


def idempotency_row(raw: Raw, key: str) -> tuple[str, str, dict] | None:
    """(op, fingerprint, result) stored under ``key``, or None."""
    row = raw.one("SELECT op, fingerprint, result FROM idempotency WHERE " + raw.quote("key") +
                  " = ?", (key,))
    return None if row is None else (row[0], row[1], load_json(row[2]))


_FINGERPRINT = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(fields: dict) -> str:
    text = _FINGERPRINT.encode(fields)
    return hashlib.sha256(text.encode()).hexdigest()
