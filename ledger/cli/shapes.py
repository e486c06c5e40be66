"""The JSON contract of the CLI: what each command's ``--json`` prints, as data.

A *shape* is a type written as text, the way docs/cli-json.md shows it:

* ``string``, ``integer``, ``number``, ``boolean``, ``timestamp`` (RFC 3339, UTC, whole
  seconds, ``Z``: ``2027-06-30T23:59:59Z``), ``object`` (free-form, e.g. a journal row's
  event data);
* ``T?``: T or ``null``;
* ``list of T``, ``map of T`` (an object with any keys, each value a T);
* the name of an object declared with :func:`obj` (``token``, ``hold``, ...).

Objects are declared once (a field list: name, shape, meaning; a name ending in ``?`` may be
absent) and named by the commands that print them. :func:`check` says how a value departs
from a shape (a missing or an unknown key, a string where a number belongs, a time in
another format); docs/cli-json.md is :func:`reference` (tests/test_cli_json.py keeps both
in step with the commands).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..views import iso as rfc3339  # noqa: F401  (the one timestamp format)

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
SCALARS = ("string", "integer", "number", "boolean", "timestamp", "object")


@dataclass(frozen=True)
class Field:
    name: str
    shape: str
    doc: str
    optional: bool = False  # may be absent (not the same as null)


@dataclass(frozen=True)
class Obj:
    name: str
    doc: str
    fields: tuple[Field, ...]


OBJECTS: dict[str, Obj] = {}


def obj(name: str, doc: str, fields: list[tuple[str, str, str]]) -> str:
    """Declare object ``name`` (fields: (name, shape, meaning); ``name?`` may be absent);
    returns the name, the shape to print it by."""
    parsed = tuple(Field(n.rstrip("?"), s, d, n.endswith("?")) for n, s, d in fields)
    known = OBJECTS.get(name)
    if known is not None and known.fields != parsed:
        raise ValueError(f"JSON object {name!r} is declared twice, differently")
    OBJECTS[name] = Obj(name, doc, parsed)
    for f in parsed:
        _parse(f.shape)  # a typo in a shape fails at import, not in a test much later
    return name


def _parse(shape: str) -> tuple[str, str | None]:
    """(kind, inner): kind is a scalar, 'nullable', 'list', 'map' or 'object:NAME'."""
    s = shape.strip()
    if s.endswith("?"):
        return "nullable", s[:-1]
    for prefix in ("list of ", "map of "):
        if s.startswith(prefix):
            return prefix.split()[0], s[len(prefix):]
    if s in SCALARS:
        return s, None
    if re.fullmatch(r"[a-z][a-z0-9-]*", s):
        return "object:" + s, None
    raise ValueError(f"not a JSON shape: {shape!r}")


def check(value, shape: str, where: str = "$") -> list[str]:
    """Every way ``value`` departs from ``shape`` (empty: it matches)."""
    kind, inner = _parse(shape)
    if kind == "nullable":
        return [] if value is None else check(value, inner, where)
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {_type(value)}"]
        return [p for i, v in enumerate(value) for p in check(v, inner, f"{where}[{i}]")]
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {_type(value)}"]
        return [p for k, v in value.items() for p in check(v, inner, f"{where}.{k}")]
    if kind.startswith("object:"):
        return _check_obj(value, kind[7:], where)
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "timestamp": isinstance(value, str) and bool(TIMESTAMP.match(value)),
        "object": isinstance(value, dict),
    }[kind]
    return [] if ok else [f"{where}: expected {kind}, got {_type(value)} {value!r:.60}"]


def _check_obj(value, name: str, where: str) -> list[str]:
    spec = OBJECTS.get(name)
    if spec is None:
        return [f"{where}: no JSON object {name!r} is declared"]
    if not isinstance(value, dict):
        return [f"{where}: expected object {name}, got {_type(value)}"]
    fields = {f.name: f for f in spec.fields}
    problems = [f"{where}: {k!r} is not a field of {name}" for k in value if k not in fields]
    for f in spec.fields:
        if f.name in value:
            problems += check(value[f.name], f.shape, f"{where}.{f.name}")
        elif not f.optional:
            problems.append(f"{where}: {name} lacks field {f.name!r}")
    return problems


def _type(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def objects_in(shape: str) -> list[str]:
    """The objects a shape names, directly or through its fields (each once, in order)."""
    seen: list[str] = []

    def walk(s: str) -> None:
        kind, inner = _parse(s)
        if inner is not None:
            return walk(inner)
        if kind.startswith("object:") and kind[7:] not in seen:
            seen.append(kind[7:])
            for f in OBJECTS[kind[7:]].fields:
                walk(f.shape)

    walk(shape)
    return seen


def shown(shape: str) -> str:
    """A shape for the docs: object names as links to their sections."""
    kind, inner = _parse(shape)
    if kind == "nullable":
        return shown(inner) + "?"
    if kind in ("list", "map"):
        return f"{kind} of {shown(inner)}"
    if kind.startswith("object:"):
        return f"[{kind[7:]}](#{kind[7:]})"
    return kind
