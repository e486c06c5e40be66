"""The token format: ``glt1.<payload>.<signature>``, Ed25519 only.

The payload is canonical JSON (sorted keys, no spaces) in unpadded base64url;
the signature is Ed25519 over the ASCII bytes ``glt1.<payload>``. There is no
algorithm field: version ``glt1`` means Ed25519, and nothing else is accepted.
A token names its signing key (``kid``); verification needs only public keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import InvalidInput, Reason, TokenInvalid
from .names import check_gpu_type, check_slurm_name, check_user_name, is_identifier

PREFIX = "glt1"
MAX_TOKEN_LENGTH = 4096
SCOPE_KEYS = ("users", "gpu_types", "partitions", "clusters")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_TOKEN_ID = re.compile(r"^tok_[0-9a-f]{20}$")


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(10)


def is_token_id(text: str) -> bool:
    return bool(_TOKEN_ID.match(text))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Unpadded base64url, canonical only: one encoding per byte string (no padding, no
    stray bits in the last character), so a token has exactly one spelling."""
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64e(data) != text:
        raise ValueError("not canonical base64url")
    return data


# The rule each scope's names enter by (mint, split): ledger.names, one rule per kind of name.
SCOPE_RULES = {
    "users": check_user_name,
    "gpu_types": check_gpu_type,
    "partitions": lambda name: check_slurm_name(name, "partition"),
    "clusters": lambda name: check_slurm_name(name, "cluster"),
}


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


@dataclass(frozen=True)
class Scopes:
    """Optional restrictions; an empty tuple means "any" (no restriction of that kind).

    "Any" is only ever the absence of a scope: a scope given as an empty list (``--users
    ''``, ``' , '``) is an error wherever scopes enter (:meth:`parse`, :meth:`check`,
    :meth:`from_dict`), never a token for everyone."""

    users: tuple[str, ...] = ()
    gpu_types: tuple[str, ...] = ()
    partitions: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict) -> Scopes:
        """From a token's ``scp`` claim (or the ledger's copy); ValueError when invalid.

        Names here were checked when the token was minted; a signed claim is held to the
        structural rule (:func:`ledger.names.is_identifier`) so tokens minted before a
        stricter name rule still verify. A present but empty list is refused."""
        if not isinstance(data, dict):
            raise ValueError("scopes must be an object")
        unknown = sorted(str(k)[:32] for k in data if k not in SCOPE_KEYS)
        if unknown:
            raise ValueError(f"unknown scope {unknown[0]!r}")
        values = {}
        for key in SCOPE_KEYS:
            items = data.get(key, ())
            if not isinstance(items, (list, tuple)) or not all(
                isinstance(i, str) and is_identifier(i) for i in items
            ):
                raise ValueError(f"scope {key} must be a list of names")
            if key in data and not items:
                raise ValueError(f"scope {key} is an empty list")
            values[key] = tuple(sorted(set(items)))
        return cls(**values)

    @classmethod
    def parse(cls, **lists: str | None) -> Scopes:
        """From CLI-style comma lists (``users="alice,bob"``); None or a missing key means
        no restriction. Every name is checked by its kind's rule (``ledger.names``); a list
        with no names in it (``""``, ``" , "``), an empty name (``"alice,,bob"``) and an
        unknown scope are :class:`InvalidInput`."""
        unknown = sorted(set(lists) - set(SCOPE_KEYS))
        if unknown:
            raise InvalidInput(f"unknown scope {unknown[0]!r} (known: {', '.join(SCOPE_KEYS)})")
        values = {}
        for key in SCOPE_KEYS:
            text = lists.get(key)
            if text is None:
                values[key] = ()
                continue
            if not isinstance(text, str):
                raise InvalidInput(f"{_flag(key)} must be a comma-separated list of names")
            items = [i.strip() for i in text.split(",")]
            if not any(items):
                raise InvalidInput(f"{_flag(key)} is empty: name at least one, or leave it "
                                   "out for no restriction")
            if not all(items):
                raise InvalidInput(f"{_flag(key)} has an empty name: {text!r}")
            values[key] = cls._checked(key, items)
        return cls(**values)

    @staticmethod
    def _checked(key: str, items) -> tuple[str, ...]:
        for i in items:
            try:
                SCOPE_RULES[key](i)
            except InvalidInput as exc:
                raise InvalidInput(f"invalid name in {_flag(key)}: {exc}") from None
        return tuple(sorted(set(items)))

    def check(self) -> Scopes:
        """These scopes, each name checked by its kind's rule: what a library caller built
        by hand enters the ledger by the same rules as :meth:`parse`. A scope must be a
        tuple of names; the empty tuple is "no restriction"."""
        for key in SCOPE_KEYS:
            items = getattr(self, key)
            if not isinstance(items, tuple) or not all(isinstance(i, str) for i in items):
                raise InvalidInput(f"scope {key} must be a tuple of names")
            self._checked(key, items)
        return self

    def to_dict(self) -> dict:
        return {k: list(getattr(self, k)) for k in SCOPE_KEYS if getattr(self, k)}

    def narrowed(self, child: Scopes) -> Scopes:
        """The child's scopes, checked to be no wider than these; missing ones inherit."""
        values = {}
        for key in SCOPE_KEYS:
            mine, theirs = getattr(self, key), getattr(child, key)
            if not theirs:
                values[key] = mine
            elif mine and not set(theirs) <= set(mine):
                wider = ", ".join(sorted(set(theirs) - set(mine)))
                raise InvalidInput(
                    f"scopes can only narrow: {key.replace('_', ' ')} {wider} not allowed "
                    f"by the parent token ({', '.join(mine)})"
                )
            else:
                values[key] = theirs
        return Scopes(**values)


@dataclass(frozen=True)
class Claims:
    """What a token says, once its signature has been verified."""

    id: str
    kid: str
    account: str
    face: int
    not_before: datetime
    expires: datetime
    issued: datetime
    scopes: Scopes = field(default_factory=Scopes)
    parent: str | None = None

    def payload(self) -> dict:
        body = {
            "tid": self.id,
            "kid": self.kid,
            "acct": self.account,
            "face": self.face,
            "nbf": int(self.not_before.timestamp()),
            "exp": int(self.expires.timestamp()),
            "iat": int(self.issued.timestamp()),
        }
        if self.scopes.to_dict():
            body["scp"] = self.scopes.to_dict()
        if self.parent:
            body["par"] = self.parent
        return body


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(claims: Claims, key: Ed25519PrivateKey) -> str:
    payload = b64e(canonical(claims.payload()))
    signing_input = f"{PREFIX}.{payload}".encode("ascii")
    return f"{PREFIX}.{payload}.{b64e(key.sign(signing_input))}"


def digest(token: str) -> str:
    """sha256 of the signed part; the ledger stores it to tie a token id to one payload."""
    return hashlib.sha256(token.rsplit(".", 1)[0].encode("ascii")).hexdigest()


def _malformed(message: str) -> TokenInvalid:
    return TokenInvalid(Reason.MALFORMED, f"malformed token: {message}")


# The claims a payload may carry, and nothing else: an unknown claim could be a restriction
# this version does not know how to enforce, so it is refused rather than ignored.
REQUIRED_CLAIMS = ("tid", "kid", "acct", "face", "nbf", "exp", "iat")
OPTIONAL_CLAIMS = ("scp", "par")
MAX_FACE = 2**53
MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime can hold
_MAX_INT_DIGITS = 20


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _malformed(f"payload repeats the key {dup[:32]!r}")
    return body


def _no_constant(name: str):
    raise _malformed(f"payload contains {name}")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _malformed("payload contains an over-long number")
    return int(text)


def _json_object(raw: bytes) -> dict:
    """The payload as a JSON object; every failure is a :class:`TokenInvalid` (malformed)."""
    try:
        text = raw.decode("ascii")  # canonical payloads are ASCII (non-ASCII is \u-escaped)
    except UnicodeDecodeError:
        raise _malformed("payload is not ASCII JSON") from None
    try:
        body = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                          parse_int=_bounded_int)
    except TokenInvalid:
        raise
    except (ValueError, RecursionError):
        raise _malformed("payload is not JSON") from None
    if not isinstance(body, dict):
        raise _malformed("payload is not an object")
    return body


_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "a list", dict: "an object", type(None): "null"}


def _claim(body: dict, name: str, kind: type):
    value = body.get(name)
    if name not in body:
        raise _malformed(f"claim {name} is missing")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _malformed(f"claim {name} is {_JSON_TYPES[type(value)]}, not {_JSON_TYPES[kind]}")
    return value


def _name_claim(body: dict, name: str) -> str:
    value = _claim(body, name, str)
    if not is_identifier(value):
        raise _malformed(f"claim {name} is not a valid name")
    return value


def _ts(body: dict, name: str) -> datetime:
    value = _claim(body, name, int)
    if not 0 <= value <= MAX_TIMESTAMP:
        raise _malformed(f"claim {name} is not a timestamp between 1970 and 9999")
    return datetime.fromtimestamp(value, UTC)


def _scopes(value) -> Scopes:
    if not isinstance(value, dict):
        raise _malformed(f"claim scp is {_JSON_TYPES[type(value)]}, not an object")
    try:
        return Scopes.from_dict(value)
    except ValueError as exc:
        raise _malformed(f"claim scp: {exc}") from None


def _parse_payload(raw: bytes) -> tuple[dict, Claims]:
    """Strict and total: the claims, or :class:`TokenInvalid` (malformed) saying what is wrong.

    Validation trusts nothing: types, ranges and the set of claims are checked here, before
    any of it is used; the signature is checked by :class:`Verifier` right after."""
    body = _json_object(raw)
    unknown = sorted(set(body) - set(REQUIRED_CLAIMS) - set(OPTIONAL_CLAIMS))
    if unknown:
        raise _malformed(f"unknown claim {unknown[0][:32]!r}")
    token_id = _claim(body, "tid", str)
    if not is_token_id(token_id):
        raise _malformed("claim tid is not a token id")
    kid = _name_claim(body, "kid")
    account = _name_claim(body, "acct")
    face = _claim(body, "face", int)
    if not 0 < face <= MAX_FACE:
        raise _malformed("claim face is out of range")
    not_before, expires, issued = _ts(body, "nbf"), _ts(body, "exp"), _ts(body, "iat")
    scopes = _scopes(body["scp"]) if "scp" in body else Scopes()
    parent = body.get("par")
    if "par" in body and not (isinstance(parent, str) and is_token_id(parent)):
        raise _malformed("claim par is not a token id")
    claims = Claims(id=token_id, kid=kid, account=account, face=face, not_before=not_before,
                    expires=expires, issued=issued, scopes=scopes, parent=parent)
    return body, claims


def decode_unverified(token: str) -> tuple[str, str, bytes, Claims]:
    """Split and parse without checking the signature: (signing input, kid, sig, claims).

    Total: anything that is not a well-formed token raises :class:`TokenInvalid`."""
    if not isinstance(token, str):
        raise _malformed("not a string")
    if len(token) > MAX_TOKEN_LENGTH + 64:  # before any work on it; surrounding blanks allowed
        raise _malformed(f"longer than {MAX_TOKEN_LENGTH} characters")
    token = token.strip()
    if not token:
        raise _malformed("empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise _malformed(f"longer than {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if parts[0] != PREFIX:
        raise _malformed(f"not a gpuledger token (expected prefix {PREFIX}.)")
    if len(parts) != 3:
        raise _malformed(f"expected 3 dot-separated parts, found {len(parts)}")
    try:
        raw = b64d(parts[1])
        sig = b64d(parts[2])
    except (ValueError, binascii.Error):
        raise _malformed("bad base64") from None
    if len(sig) != 64:
        raise _malformed("signature has the wrong length")
    _, claims = _parse_payload(raw)
    return f"{parts[0]}.{parts[1]}", claims.kid, sig, claims


class Verifier:
    """Checks signatures against known public keys; remembers tokens it has verified.

    Thread-safe: the daemon verifies on many threads at once; only the cache is locked."""

    def __init__(self, public_keys: dict[str, Ed25519PublicKey], cache_size: int = 4096):
        self.public_keys = dict(public_keys)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Claims] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, token: str) -> Claims:
        if isinstance(token, str):
            with self._lock:
                cached = self._cache.get(token)
                if cached is not None:
                    self._cache.move_to_end(token)
                    return cached
        signing_input, kid, sig, claims = decode_unverified(token)
        key = self.public_keys.get(kid)
        if key is None:
            raise TokenInvalid(Reason.UNKNOWN_KEY, f"token signed by unknown key {kid[:64]!r}")
        try:
            key.verify(sig, signing_input.encode("ascii"))
        except InvalidSignature:
            raise TokenInvalid(
                Reason.BAD_SIGNATURE, "token signature does not verify (forged or altered)",
                token_id=claims.id,
            ) from None
        with self._lock:
            self._cache[token] = claims
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return claims
