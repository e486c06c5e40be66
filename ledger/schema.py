"""The machinery of the typed configuration: a section is a frozen dataclass whose fields are
made with :func:`setting` (default, kind, check and a one-line doc); :func:`parse_table` reads
one TOML table into it. The sections themselves are declared in :mod:`ledger.config` (and
``[idle]`` in :mod:`ledger.idle`); docs/config.md and ``gpuledger init``'s file are written
from them.

Every problem is a :class:`ConfigError` naming where it is (``<file>: [section]``) and the
key; an unknown key says which known one it is close to.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass
from fractions import Fraction
from typing import Any

from .errors import ConfigError

Check = Callable[[Any], str | None]  # a problem ("must be ...") or None


@dataclass(frozen=True)
class Kind:
    """A TOML type and how a value of it becomes the setting's Python value."""

    name: str  # as the docs say it
    convert: Callable[[Any], Any]  # raises TypeError for a value of another type


def _only(*types: type, then: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise TypeError
        return then(value)
    return convert


def _list_of(*types: type) -> Callable[[Any], Any]:
    def convert(value: Any) -> tuple:
        if not isinstance(value, list) or any(
                isinstance(v, bool) or not isinstance(v, types) for v in value):
            raise TypeError
        return tuple(value)
    return convert


def _fraction(value: Any) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Fraction)):
        raise TypeError("must be a number")
    try:
        return Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        raise TypeError(f"must be a number, got {value!r}") from None


def _seconds(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError("must be a whole number of seconds ≥ 0")
    return value


def _devices(value: Any) -> tuple:
    if not isinstance(value, list) or not all(
            isinstance(d, str) or isinstance(d, list) and all(isinstance(f, str) for f in d)
            for d in value):
        raise TypeError
    return tuple(tuple(d) if isinstance(d, list) else d for d in value)


STRING = Kind("string", _only(str))
INTEGER = Kind("integer", _only(int))
SECONDS = Kind("integer (seconds, ≥ 0)", _seconds)
NUMBER = Kind("number", _only(int, float, then=float))
BOOLEAN = Kind("boolean", _only(bool))
FRACTION = Kind('number (or a fraction as a string, "1/2")', _fraction)
DECIMAL = Kind('number (or a decimal as a string, "0.25")', _only(int, float, str, then=str))
STRINGS = Kind("list of strings", _list_of(str))
INTEGERS = Kind("list of integers", _list_of(int))
DEVICES = Kind("list of device files or UUIDs (an entry may be a list of files)", _devices)


@dataclass(frozen=True)
class Spec:
    doc: str
    kind: Kind
    check: Check | None = None
    key: str | None = None  # the TOML key, where it is not the attribute's name
    default_doc: str | None = None  # the default in words, where it is not a plain value
    example: Any = None  # shown (commented) in the generated file when the default is unset


def setting(default: Any = MISSING, *, doc: str, kind: Kind, check: Check | None = None,
            key: str | None = None, default_doc: str | None = None, example: Any = None,
            default_factory: Any = MISSING) -> Any:
    """A field of a section: its default, kind, check and one-line doc."""
    meta = {"setting": Spec(doc, kind, check, key, default_doc, example)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Item:
    attr: str
    key: str
    spec: Spec
    default: Any  # MISSING when required (or computed by a factory)


def items(cls: type) -> list[Item]:
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("setting")
        if spec is not None:
            out.append(Item(f.name, spec.key or f.name, spec, f.default))
    return out


def unknown_message(what: str, unknown: Iterable[str], known: Iterable[str]) -> str:
    """``unknown setting(s) a, b (did you mean c?)`` with the known names when none is close."""
    unknown, known = sorted(unknown), sorted(known)
    close = [m[0] for u in unknown if (m := difflib.get_close_matches(u, known, n=1))]
    hint = (f" (did you mean {', '.join(close)}?)" if close
            else f" (known: {', '.join(known)})")
    return f"unknown {what} {', '.join(unknown)}{hint}"


def convert(item: Item, value: Any, where: str) -> Any:
    """One value, type-converted and checked: a ConfigError names ``where`` and the key."""
    try:
        value = item.spec.kind.convert(value)
    except TypeError as exc:
        raise ConfigError(f"{where}: {item.key} " + (
            str(exc) or f"has the wrong type ({type(value).__name__}; wants a "
                        f"{item.spec.kind.name})")) from None
    problem = item.spec.check(value) if item.spec.check else None
    if problem:
        raise ConfigError(f"{where}: {item.key} {problem}")
    return value


def parse_table(cls: type, table: Any, where: str) -> Any:
    """A TOML table as section ``cls``: unknown keys, wrong types and failed checks are
    ConfigErrors; then the section's own ``problem()`` (checks across its keys)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    by_key = {i.key: i for i in items(cls)}
    unknown = set(table) - set(by_key)
    if unknown:
        raise ConfigError(f"{where}: {unknown_message('setting(s)', unknown, by_key)}")
    values = {by_key[k].attr: convert(by_key[k], v, where) for k, v in table.items()}
    obj = cls(**values)
    problem = getattr(obj, "problem", None)
    if problem is not None and (text := problem()):
        raise ConfigError(f"{where}: {text}")
    return obj


# -- text: the generated file and the reference ----------------------------------------------

def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Fraction):
        return str(value.numerator) if value.denominator == 1 else json.dumps(str(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string for the text settings hold


def set_keys(text: str, changes: dict[str, dict[str, Any]]) -> str:
    """A config file's text with ``changes`` (section → key → value) set, its comments kept:
    a key set in its section is replaced, a new one goes right under the section's header,
    a section the file lacks is added at the end. (What `gpuledger init` writes is commented
    defaults under every header; tests and benchmarks point it at their own paths this way.)
    """
    lines = text.splitlines()
    for section, keys in changes.items():
        header = f"[{section}]"
        try:
            start = next(i for i, ln in enumerate(lines) if ln.strip() == header)
        except StopIteration:
            lines += ["", header]
            start = len(lines) - 1
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].lstrip().startswith("[")), len(lines))
        body = [ln for ln in lines[start + 1:end]
                if ln.split("=", 1)[0].strip() not in keys or ln.lstrip().startswith("#")]
        lines[start + 1:end] = [f"{k} = {toml_value(v)}" for k, v in keys.items()] + body
    return "\n".join(lines) + "\n"


def default_text(item: Item) -> str:
    """The default as the reference shows it."""
    if item.spec.default_doc:
        return item.spec.default_doc
    if item.default is MISSING:
        return "(required)"
    if item.default is None:
        return "(unset)"
    return toml_value(item.default)
