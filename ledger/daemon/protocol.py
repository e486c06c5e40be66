"""The wire format: one request per line, one response per line.

A line is ASCII: space-separated ``key=value`` fields, ending in ``\\n``. Keys are
``[a-z_][a-z0-9_]*`` and appear at most once; values are percent-encoded (every byte
outside ``A-Z a-z 0-9 - . _ ~ : / @ , +`` is ``%XX``) and decode to UTF-8. Requests
carry ``op=<name>``; responses start ``ok=1`` or ``ok=0 reason=<word> message=<text>``.
Structured results for the Python CLI travel as one ``json=<percent-encoded JSON>`` field.
Lua 5.1 builds and parses this with ``string.gsub``/``gmatch`` alone.
"""

from __future__ import annotations

import json
import re

from ..errors import LedgerError

VERSION = 1
_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,31}$")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/@,+")
_UNSAFE = re.compile(r"[^A-Za-z0-9\-._~:/@,+]")  # the complement of _SAFE, as one search
_NOT_PRINTABLE = re.compile(r"[^\x21-\x7e]")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = {b: f"%{b:02X}" for b in range(256)}
_GOOD_KEYS: set[str] = set()  # valid keys seen (the protocol's own are a few dozen)


class ProtocolError(LedgerError):
    """A line that is not a well-formed message."""


def escape(value: object) -> str:
    """Percent-encode a value (str/int/bool/None → text; None → empty)."""
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "1" if value else "0"
    else:
        text = str(value)
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(_escaped, text)


def _escaped(m: re.Match) -> str:
    return "".join(_ESCAPES[b] for b in m.group().encode("utf-8"))


def _good_key(key: str) -> bool:
    """Whether ``key`` is a valid key (the few dozen the code uses are remembered)."""
    if key in _GOOD_KEYS:
        return True
    if not _KEY.match(key):
        return False
    if len(_GOOD_KEYS) < 1024:
        _GOOD_KEYS.add(key)
    return True


def unescape(text: str) -> str:
    if "%" not in text:
        return text
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "%":
            pair = text[i + 1:i + 3]
            if len(pair) != 2 or not all(ord(ch) in _HEX for ch in pair):
                raise ProtocolError("bad percent-escape")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(ord(c))
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("value is not UTF-8") from None


def encode(fields: dict[str, object]) -> bytes:
    """``{"ok": 1, "hold": "h"}`` → ``b"ok=1 hold=h\\n"`` (None values are left out)."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if not _good_key(key):
            raise ProtocolError(f"invalid key {key!r}")
        parts.append(f"{key}={escape(value)}")
    return (" ".join(parts) + "\n").encode("ascii")


def decode(line: bytes | str) -> dict[str, str]:
    """One line (with or without its newline) → fields; ProtocolError when malformed."""
    if isinstance(line, bytes):
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("line is not ASCII") from None
    else:
        text = line
    text = text.removesuffix("\n")
    if not text.strip():
        raise ProtocolError("empty line")
    fields: dict[str, str] = {}
    for part in text.split(" "):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ProtocolError(f"field without '=': {part[:40]!r}")
        if not _good_key(key):
            raise ProtocolError(f"invalid key {key[:40]!r}")
        if key in fields:
            raise ProtocolError(f"duplicate key {key}")
        if _NOT_PRINTABLE.search(value):
            raise ProtocolError(f"control or space character in {key}")
        fields[key] = unescape(value)
    return fields


def with_json(data: object, **extra: object) -> dict[str, object]:
    """An ok response carrying structured data for the Python client."""
    return {"ok": 1, **extra, "json": json.dumps(data, separators=(",", ":"), default=str)}
