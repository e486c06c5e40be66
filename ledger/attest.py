"""Signed statements of the journal's head, and checking today's chain against them.

Heads are signed with a dedicated head-attestation key (``gpuledger keys generate
--purpose attest``), never with a token-minting key: the host that exports heads
needs no power to mint, and heads keep being signed after minting keys retire.
The attestation key's public half is recorded in the journal (an
``attest_key_add`` event) and embedded in every export, so an export can be
checked on its own and against the ledger.

An exported head must stay a prefix of the chain: the row at its ``seq`` must
still have its ``hash``. The newest export is remembered twice — as a
``head_export`` event in the journal and in ``last-head.json`` in this host's
keys directory, out of reach of someone who can only write the database — so
an older head presented instead of it is named as a replay.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from . import keys
from .audit import VerifyResult
from .errors import InvalidInput, KeyError_
from .tokens import b64d, b64e, canonical

FORMAT = "gpuledger-head/1"
PURPOSE = "head-attestation"
LAST_EXPORT = "last-head.json"
_FIELDS = ("format", "purpose", "ledger", "seq", "hash", "at", "kid", "public_key", "alg")


def sign_head(kid: str, private, result: VerifyResult, now: datetime | None = None) -> dict:
    body = {"format": FORMAT, "purpose": PURPOSE, "ledger": result.first_hash,
            "seq": result.head_seq, "hash": result.head_hash,
            "at": (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
            "kid": kid, "public_key": keys.public_text(private), "alg": "Ed25519"}
    return {**body, "signature": b64e(private.sign(canonical(body)))}


def parse_head(text: str, label: str) -> dict:
    """An exported head's JSON, its shape checked (not yet its signature)."""
    try:
        head = json.loads(text)
    except ValueError:
        raise InvalidInput(f"{label} is not JSON (expected a head written by "
                           "`gpuledger verify --export-head`)") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise InvalidInput(f"{label} is not an exported head ({FORMAT})")
    if head.get("purpose") != PURPOSE or head.get("alg") != "Ed25519":
        raise InvalidInput(f"{label} is not a head attestation signed with Ed25519")
    if not isinstance(head.get("seq"), int) or head["seq"] < 0 or \
            not isinstance(head.get("hash"), str) or not isinstance(head.get("signature"), str):
        raise InvalidInput(f"{label} has no valid seq, hash and signature")
    return head


def read_head(path: str | os.PathLike) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    return parse_head(text, str(path))


def signature_ok(head: dict) -> bool:
    try:
        public = keys.public_from_text(head.get("public_key") or "")
        public.verify(b64d(head["signature"]), canonical({k: head.get(k) for k in _FIELDS}))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def check_head(result: VerifyResult, head: dict, label: str,
               local_keys: dict[str, str]) -> None:
    """Fail ``result`` for every way ``head`` does not fit today's chain (prefix, key)."""
    seq, want = head["seq"], head["hash"]
    if not signature_ok(head):
        result.fail(f"{label}: the signature does not verify (the head file was altered)")
        return
    if seq and result.rows and head.get("ledger") not in (None, result.first_hash):
        result.fail(f"{label}: exported from another ledger (or row 1 was rewritten): its "
                    "first row differs", 1)
    elif seq > result.rows:
        result.fail(f"{label}: exported at row {seq} ({head.get('at')}) but the journal now "
                    f"ends at row {result.rows}: rows were deleted from the end and the head "
                    "moved back", result.rows + 1)
    elif seq and result.hashes.get(seq) != want:
        result.fail(f"{label}: history rewritten: row {seq} now hashes to "
                    f"{result.hashes.get(seq)}, the head exported {head.get('at')} says {want}",
                    seq)
    kid, public = head.get("kid"), head.get("public_key")
    if local_keys.get(kid, public) != public:
        result.fail(f"{label}: signed with a key {kid} other than this host's {kid}")
    if kid not in result.attest_keys:
        result.fail(f"{label}: signed by {kid}, which is not a head-attestation key recorded "
                    "in the ledger")
    elif result.attest_keys[kid] != public:
        result.fail(f"{label}: the public key of {kid} differs from the ledger's record of it")


def check_replay(result: VerifyResult, heads: list[tuple[str, dict]],
                 remembered: tuple[str, dict] | None) -> None:
    """An --against head older than an export already seen is a replayed old head."""
    seen = [(e.get("seq", -1), e.get("at"), f"the ledger's record of it (row {e['row']})")
            for e in result.exports if isinstance(e.get("seq"), int)]
    if remembered is not None:
        seen.append((remembered[1]["seq"], remembered[1].get("at"), remembered[0]))
    if not seen:
        return
    newest = max(seen, key=lambda s: s[0])
    for label, head in heads:
        if head["seq"] < newest[0]:
            result.fail(f"{label}: replayed old head: it is the export of row {head['seq']} "
                        f"({head.get('at')}), but the export of row {newest[0]} ({newest[1]}) "
                        f"was already seen in {newest[2]}; check against the newest head",
                        head["seq"])


# -- this host's attestation keys and memory -------------------------------------------------

def signing_key(keys_dir: Path | None, result: VerifyResult, retired: set[str]):
    """(kid, private key) of the newest unretired attestation key whose private half is here."""
    for kid in reversed(list(result.attest_keys)):
        if kid in retired or keys_dir is None or not keys.private_path(keys_dir, kid).exists():
            continue
        private = keys.load_private(keys_dir, kid)
        if keys.public_text(private) != result.attest_keys[kid]:
            raise KeyError_(f"{keys.private_path(keys_dir, kid)} does not match the ledger's "
                            f"public key of {kid}")
        return kid, private
    raise KeyError_("no head-attestation key on this host (run `gpuledger keys generate "
                    "--purpose attest`); heads are never signed with a token-minting key")


def local_publics(keys_dir: Path | None, kids) -> dict[str, str]:
    """Public halves of the attestation keys whose private files are on this host."""
    out = {}
    for kid in kids:
        try:
            if keys_dir is not None and keys.private_path(keys_dir, kid).exists():
                out[kid] = keys.public_text(keys.load_private(keys_dir, kid))
        except (KeyError_, InvalidInput):
            continue
    return out


def remembered(keys_dir: Path | None) -> tuple[str, dict] | None:
    """The last head this host exported, or None."""
    if keys_dir is None:
        return None
    path = keys_dir / LAST_EXPORT
    if not path.exists():
        return None
    return str(path), read_head(path)


def remember(keys_dir: Path, head: dict) -> None:
    path = keys_dir / LAST_EXPORT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(head, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
