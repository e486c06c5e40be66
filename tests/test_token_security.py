"""Forged, altered, swapped and malformed tokens are refused with the right reason."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import tokens
from ledger.errors import Reason, Refusal, TokenInvalid
from ledger.views import HoldRequest

REQ = HoldRequest(gpus=1, seconds=60, gpu_type="h100")


def b64(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def parts(token):
    prefix, payload, sig = token.split(".")
    return prefix, json.loads(base64.urlsafe_b64decode(payload + "==")), sig


def refused(ledger, token) -> Reason:
    with pytest.raises(Refusal) as exc:
        ledger.reserve(token, REQ)
    return exc.value.reason


@pytest.fixture
def token(sqlite_ledger):
    return sqlite_ledger.mint("physics", 36000)[0]


def test_valid_token_round_trip(sqlite_ledger, token):
    assert sqlite_ledger.reserve(token, REQ).amount == 60


def test_forged_signature(sqlite_ledger, token):
    prefix, payload, sig = token.split(".")
    other = Ed25519PrivateKey.generate().sign(f"{prefix}.{payload}".encode())
    assert refused(sqlite_ledger, f"{prefix}.{payload}.{b64(other)}") is Reason.BAD_SIGNATURE


def test_payload_swapped_under_valid_signature(sqlite_ledger, token):
    other, _ = sqlite_ledger.mint("chemistry", 3600)
    _, payload, _ = token.split(".")
    prefix, _, sig = other.split(".")
    assert refused(sqlite_ledger, f"{prefix}.{payload}.{sig}") is Reason.BAD_SIGNATURE


def test_face_value_altered(sqlite_ledger, token):
    prefix, body, sig = parts(token)
    body["face"] = 10**9
    assert refused(sqlite_ledger, f"{prefix}.{b64(body)}.{sig}") is Reason.BAD_SIGNATURE


def test_unknown_kid_and_alg_tricks(sqlite_ledger, token):
    prefix, body, sig = parts(token)
    body["kid"] = "nope"
    assert refused(sqlite_ledger, f"{prefix}.{b64(body)}.{sig}") is Reason.UNKNOWN_KEY
    body = parts(token)[1]
    body["alg"] = "none"  # an unknown claim is refused outright, whatever it says
    with pytest.raises(TokenInvalid, match="unknown claim 'alg'") as exc:
        sqlite_ledger.reserve(f"{prefix}.{b64(body)}.{sig}", REQ)
    assert exc.value.reason is Reason.MALFORMED
    # a JWT-style header or another version prefix is not a gpuledger token
    jwt = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(body)}.{sig}"
    assert refused(sqlite_ledger, jwt) is Reason.MALFORMED
    assert refused(sqlite_ledger, "glt2" + token[4:]) is Reason.MALFORMED
    assert refused(sqlite_ledger, f"{prefix}.{b64(body)}.") is Reason.MALFORMED


def test_signed_by_a_key_the_ledger_never_saw_with_same_kid(sqlite_ledger, token):
    prefix, body, _ = parts(token)
    rogue = Ed25519PrivateKey.generate()
    claims = tokens.decode_unverified(token)[3]
    forged = tokens.sign(claims, rogue)
    assert refused(sqlite_ledger, forged) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("glt1", "expected 3"),
    ("glt1.a.b.c", "expected 3"),
    ("glt1.!!!.abc", "bad base64"),
    ("glt1.e30." + "A" * 86, "claim tid"),
    ("glt1." + "A" * 5000, "longer than"),
    ("glt1.bm90IGpzb24." + "A" * 86, "not JSON"),
    ("glt1.WzFd." + "A" * 86, "not an object"),
])
def test_malformed(sqlite_ledger, text, reason):
    with pytest.raises(TokenInvalid) as exc:
        sqlite_ledger.reserve(text, REQ)
    assert exc.value.reason is Reason.MALFORMED and reason in exc.value.message


def test_truncated_tokens_never_verify(sqlite_ledger, token):
    for cut in range(1, len(token), 7):
        with pytest.raises(Refusal):
            sqlite_ledger.reserve(token[:cut], REQ)


def test_valid_signature_unknown_to_ledger(sqlite_ledger, tmp_path, clock):
    from conftest import seeded
    other = seeded(f"sqlite:///{tmp_path / 'other.db'}", tmp_path / "otherkeys", clock)
    # same kid "k1" but a different key: the signature check fails
    foreign, _ = other.mint("physics", 3600)
    assert refused(sqlite_ledger, foreign) is Reason.BAD_SIGNATURE
    # a key both ledgers trust, but a token this ledger never minted
    other.generate_key("shared")
    sqlite_ledger.add_key("shared", [k for k in other.list_keys() if k["kid"] == "shared"][0]
                          ["public_key"])
    foreign, _ = other.mint("physics", 3600, kid="shared")
    assert refused(sqlite_ledger, foreign) is Reason.UNKNOWN_TOKEN


def test_verifier_cache_returns_same_claims(sqlite_ledger, token):
    v = sqlite_ledger.verifier()
    assert v.verify(token) is v.verify(token)
