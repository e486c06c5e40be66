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
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import InvalidInput, Reason, TokenInvalid

PREFIX = "glt1"
MAX_TOKEN_LENGTH = 4096
SCOPE_KEYS = ("users", "gpu_types", "partitions", "clusters")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_NAME = re.compile(r"^[A-Za-z0-9_.@:+-]{1,64}$")
_TOKEN_ID = re.compile(r"^tok_[0-9a-f]{20}$")


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(10)


def is_token_id(text: str) -> bool:
    return bool(_TOKEN_ID.match(text))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Scopes:
    """Optional restrictions; an empty tuple means "any"."""

    users: tuple[str, ...] = ()
    gpu_types: tuple[str, ...] = ()
    partitions: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict) -> Scopes:
        values = {}
        for key in SCOPE_KEYS:
            items = data.get(key) or ()
            if not isinstance(items, (list, tuple)) or not all(
                isinstance(i, str) and _NAME.match(i) for i in items
            ):
                raise ValueError(f"scope {key} must be a list of names")
            values[key] = tuple(sorted(set(items)))
        return cls(**values)

    @classmethod
    def parse(cls, **lists: str | None) -> Scopes:
        """From CLI-style comma lists (``users="alice,bob"``); validates names."""
        values = {}
        for key in SCOPE_KEYS:
            text = lists.get(key)
            items = [i.strip() for i in (text or "").split(",") if i.strip()]
            for i in items:
                if not _NAME.match(i):
                    raise InvalidInput(f"invalid name in --{key.replace('_', '-')}: {i!r}")
            values[key] = tuple(sorted(set(items)))
        return cls(**values)

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


def _ts(value, name: str) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**40:
        raise _malformed(f"claim {name} is not a timestamp")
    return datetime.fromtimestamp(value, UTC)


def _parse_payload(raw: bytes) -> tuple[dict, Claims]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _malformed("payload is not JSON") from None
    if not isinstance(body, dict):
        raise _malformed("payload is not an object")
    for name, kind in (("tid", str), ("kid", str), ("acct", str), ("face", int)):
        if not isinstance(body.get(name), kind) or isinstance(body.get(name), bool):
            raise _malformed(f"claim {name} is missing or has the wrong type")
    if not is_token_id(body["tid"]):
        raise _malformed("claim tid is not a token id")
    if not 0 < body["face"] <= 2**53:
        raise _malformed("claim face is out of range")
    try:
        scopes = Scopes.from_dict(body.get("scp") or {})
    except ValueError as exc:
        raise _malformed(str(exc)) from None
    parent = body.get("par")
    if parent is not None and not (isinstance(parent, str) and is_token_id(parent)):
        raise _malformed("claim par is not a token id")
    claims = Claims(
        id=body["tid"],
        kid=body["kid"],
        account=body["acct"],
        face=body["face"],
        not_before=_ts(body.get("nbf"), "nbf"),
        expires=_ts(body.get("exp"), "exp"),
        issued=_ts(body.get("iat"), "iat"),
        scopes=scopes,
        parent=parent,
    )
    return body, claims


def decode_unverified(token: str) -> tuple[str, str, bytes, Claims]:
    """Split and parse without checking the signature: (signing input, kid, sig, claims)."""
    if not isinstance(token, str):
        raise _malformed("not a string")
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
    """Checks signatures against known public keys; remembers tokens it has verified."""

    def __init__(self, public_keys: dict[str, Ed25519PublicKey], cache_size: int = 4096):
        self.public_keys = dict(public_keys)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Claims] = OrderedDict()

    def verify(self, token: str) -> Claims:
        if isinstance(token, str):
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
        self._cache[token] = claims
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return claims
