"""A signed statement of the journal's head, for publishing or off-site comparison."""

from __future__ import annotations

from datetime import UTC, datetime

from . import keys
from .journal import VerifyResult
from .tokens import b64e, canonical


def signed_head(ledger, result: VerifyResult) -> dict:
    kid = ledger.active_kid()
    key = keys.load_private(ledger.keys_dir, kid)
    body = {"seq": result.head_seq, "hash": result.head_hash,
            "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"), "kid": kid}
    return {**body, "alg": "Ed25519", "signature": b64e(key.sign(canonical(body)))}
