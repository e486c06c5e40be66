"""Hostile token payloads, signed and unsigned: always a typed refusal, never ``internal``.

Each crafted case below crashed the parser (a traceback in the CLI, ``reason=internal``
from the daemon) or slipped through it before the claims schema was checked strictly.
The property tests throw arbitrary payloads at the parser, the ledger and the daemon's
request handler, signed with the ledger's real key and unsigned.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import keys, tokens
from ledger.daemon.auth import Peer, Policy
from ledger.daemon.handlers import Handlers
from ledger.errors import Reason, Refusal, TokenInvalid
from ledger.views import HoldRequest

REQ = HoldRequest(gpus=1, seconds=60, gpu_type="h100", account="physics", user="alice")
ROOT = Peer(1, 0, 0, "root", True)
ALICE = Peer(3, 1001, 1001, "alice", False)
TID = "tok_" + "0" * 20
GOOD = {"tid": TID, "kid": "k1", "acct": "physics", "face": 3600, "nbf": 0,
        "exp": 4_000_000_000, "iat": 0}
TOKEN_REASONS = {Reason.MALFORMED, Reason.BAD_SIGNATURE, Reason.UNKNOWN_KEY}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def body(**changes) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def unsigned(raw: bytes) -> str:
    return f"glt1.{b64(raw)}.{'A' * 86}"


def signed(ledger, raw: bytes) -> str:
    key = keys.load_private(ledger.keys_dir, "k1")
    head = f"glt1.{b64(raw)}"
    return f"{head}.{b64(key.sign(head.encode('ascii')))}"


# (payload bytes, what the refusal says): each used to raise something other than
# TokenInvalid, or was accepted although it is not a token this ledger could have minted.
CRAFTED = [
    (body(exp=2**39), "claim exp is not a timestamp"),
    (body(nbf=2**40 - 1), "claim nbf is not a timestamp"),
    (body(iat=-1), "claim iat is not a timestamp"),
    (body(scp=["users"]), "claim scp is a list, not an object"),
    (body(scp="alice"), "claim scp is a string, not an object"),
    (body(scp=7), "claim scp is an integer, not an object"),
    (body(scp={"users": 0}), "scope users must be a list of names"),
    (body(scp={"users": "alice"}), "scope users must be a list of names"),
    (body(scp={"users": [["alice"]]}), "scope users must be a list of names"),
    (body(scp={"accounts": ["physics"]}), "unknown scope 'accounts'"),
    (body(face=1.5), "claim face is a number, not an integer"),
    (body(face=True), "claim face is a boolean, not an integer"),
    (body(face=2**60), "claim face is out of range"),
    (body(exp="2030-01-01"), "claim exp is a string, not an integer"),
    (body(acct=["physics"]), "claim acct is a list, not a string"),
    (body(acct="x" * 200), "claim acct is not a valid name"),
    (body(kid={"k": 1}), "claim kid is an object, not a string"),
    (body(kid=""), "claim kid is not a valid name"),
    (body(tid=None), "claim tid is null, not a string"),
    (body(par=5), "claim par is not a token id"),
    (body(par=None), "claim par is not a token id"),
    (body(alg="none"), "unknown claim 'alg'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "exp"}).encode(), "claim exp is missing"),
    (body()[:-1] + b', "face": 1}', "repeats the key 'face'"),
    (body()[:-1] + b', "scp": {"users": ["a"], "users": ["b"]}}', "repeats the key 'users'"),
    (body()[:-1].replace(b'"face": 3600', b'"face": NaN') + b"}", "contains NaN"),
    (body()[:-1].replace(b'"face": 3600', b'"face": Infinity') + b"}", "contains Infinity"),
    (body()[:-1].replace(b'"face": 3600', b'"face": 1e999') + b"}", "face is a number"),
    (body()[:-1].replace(b'"face": 3600', b'"face": ' + b"9" * 2000) + b"}", "over-long number"),
    (b"[" * 1400 + b"]" * 1400, "not JSON"),  # nested past the recursion limit
    (b'{"scp": ' + b"[" * 1300 + b"]" * 1300 + b"}", "not JSON"),
    (json.dumps(GOOD).encode("utf-16"), "not ASCII JSON"),
    (json.dumps({**GOOD, "acct": "phys\u00efcs"}, ensure_ascii=False).encode(), "not ASCII JSON"),
    (b'{"tid": "\xff\xfe"}', "not ASCII JSON"),
    (b"", "not JSON"),
    (b"null", "not an object"),
]


@pytest.mark.parametrize("raw,message", CRAFTED, ids=[m for _, m in CRAFTED])
def test_crafted_payloads_are_malformed_signed_or_not(sqlite_ledger, raw, message):
    for token in (unsigned(raw), signed(sqlite_ledger, raw)):
        with pytest.raises(TokenInvalid) as exc:
            sqlite_ledger.reserve(token, REQ)
        assert exc.value.reason is Reason.MALFORMED
        assert exc.value.message.startswith("malformed token: ")
        assert message in exc.value.message


@pytest.mark.parametrize("text,message", [
    ("glt1." + b64(body()) + "=." + "A" * 86, "bad base64"),  # padding is not allowed
    ("glt1." + b64(body()) + "." + "A" * 85 + "B", "bad base64"),  # stray bits: a 2nd spelling
    ("glt1." + b64(body()) + "." + "A" * 85, "bad base64"),
    ("glt1." + b64(body()) + "." + "A" * 84, "signature has the wrong length"),
    (" " * 100_000 + "glt1.e30." + "A" * 86, "longer than"),
    ("glt1." + "A" * 10**6, "longer than"),
    ("glt1.\u00e9.x", "bad base64"),
])
def test_crafted_token_strings_are_malformed(sqlite_ledger, text, message):
    with pytest.raises(TokenInvalid) as exc:
        sqlite_ledger.check(text, REQ)
    assert exc.value.reason is Reason.MALFORMED and message in exc.value.message


def test_a_canonical_token_still_verifies_and_one_spelling_only(sqlite_ledger):
    token, _ = sqlite_ledger.mint("physics", 3600)
    assert sqlite_ledger.check(token, REQ).account == "physics"
    head, payload, sig = token.split(".")
    # flip an unused low bit of the signature's last character: same bytes, other spelling
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    i = alphabet.index(sig[-1])
    twin = f"{head}.{payload}.{sig[:-1]}{alphabet[i ^ 1]}"
    with pytest.raises(TokenInvalid, match="bad base64"):
        sqlite_ledger.check(twin, REQ)


def test_cli_prints_one_line_for_a_crafted_token(tmp_path):
    from click.testing import CliRunner

    from slurm_plugin.climain import cli

    config = tmp_path / "gpuledger.toml"
    runner = CliRunner()
    assert runner.invoke(cli, ["--config", str(config), "init"]).exit_code == 0
    for raw, message in CRAFTED[:5]:
        res = runner.invoke(cli, ["--config", str(config), "token", "inspect", unsigned(raw)])
        assert res.exit_code == 1 and res.exception is not None, res.output
        assert res.output == f"Error: malformed token: {message}" + (
            " between 1970 and 9999\n" if "timestamp" in message else "\n")


# -- properties --------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
CLAIM = st.sampled_from(list(GOOD) + ["scp", "par", "alg", ""])


@st.composite
def payloads(draw) -> bytes:
    """Mostly near-valid claim sets with one to three claims replaced, removed or added."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return json.dumps(draw(JSON)).encode()
    claims = dict(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(CLAIM)
        if draw(st.booleans()):
            claims.pop(name, None)
        else:
            claims[name] = draw(JSON | st.sampled_from(
                [2**39, 2**63, -(2**63), 253402300800, 0, {"users": ["alice"]},
                 {"users": "alice"}, ["alice"], TID, "physics", "k1"]))
    text = json.dumps(claims, allow_nan=True)
    if kind == 5 and claims:  # a key repeated by hand, which json.dumps cannot produce
        first = next(iter(claims))
        text = text[:-1] + f', {json.dumps(first)}: {json.dumps(draw(JSON))}}}'
    return text.encode()


def _typed(call) -> object:
    """Run ``call``; a Refusal is fine (returned), anything else that escapes fails the test."""
    try:
        return call()
    except Refusal as exc:
        return exc


@given(raw=payloads(), sign_it=st.booleans())
@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_any_payload_gets_a_typed_refusal_never_internal(sqlite_ledger, raw, sign_it):
    token = signed(sqlite_ledger, raw) if sign_it else unsigned(raw)
    handlers = Handlers(sqlite_ledger, Policy("slurm"), accounts=lambda u: frozenset())

    parsed = _typed(lambda: tokens.decode_unverified(token))
    verified = _typed(lambda: sqlite_ledger.verifier().verify(token))
    if isinstance(parsed, Refusal):
        assert parsed.reason is Reason.MALFORMED and verified.reason is Reason.MALFORMED
    elif isinstance(verified, Refusal):
        assert verified.reason in TOKEN_REASONS
        assert sign_it is False or verified.reason is Reason.UNKNOWN_KEY
    checked = _typed(lambda: sqlite_ledger.check(token, REQ))
    reserved = _typed(lambda: sqlite_ledger.reserve(token, REQ, key=None))
    # the ledger never minted these, so nothing may be held
    assert isinstance(checked, (Refusal, tokens.Claims))
    assert isinstance(reserved, Refusal)

    fields = {"token": token, "gpus": "1", "seconds": "60", "type": "h100", "account": "physics",
              "user": "alice"}
    for peer, op in ((ROOT, "reserve"), (ALICE, "quote")):
        resp = handlers.handle(peer, {"op": op, **fields})
        if op == "reserve":
            assert resp["ok"] == 0
        if resp["ok"] == 0:
            assert resp["reason"] != "internal", resp
            assert Reason(resp["reason"])  # a token reason the job_submit plugin knows
    assert sqlite_ledger.holds() == []
