"""Slurm's syntax, read in one place: hostlists, index lists, durations, TRES and GRES
strings, gres.conf lines, array specs, SLUIDs.

Each reader follows the rule of Slurm's own source, named in its docstring (file and tag);
``tests/test_slurmsyntax.py`` holds them against those rules with generated input. Standard
library only, and nothing here imports SQLAlchemy: the controller hooks import this module
and must stay light. Everything unreadable raises :class:`SlurmSyntaxError` (an
``InvalidInput`` and a ``ValueError``); a list that stands for more entries than its bound
raises :class:`TooLarge` before anything is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidInput

MAX_HOSTS = 65536  # slurm-22-05-8-1 src/common/hostlist.c MAX_RANGE: names in one list
MAX_GPUS = 1024  # GPU indices of one job on one node
MAX_DIGITS = 18  # one number of a list, before int() is asked to read it
SHARED_GRES = ("shard", "mps")  # GPU-backed GRES that hand out a share of a GPU
_NULL = ("(null)", "None assigned", "None", "N/A")


class SlurmSyntaxError(InvalidInput, ValueError):
    """Text in Slurm's syntax that cannot be read."""


class TooLarge(SlurmSyntaxError):
    """A list that stands for more entries than its bound allows."""


def _number(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or len(text) > MAX_DIGITS:
        raise SlurmSyntaxError(f"not a number: {text[:24]!r}")
    return int(text)


# -- SLUIDs ----------------------------------------------------------------------------------

_SLUID = re.compile(r"^[sS][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{13}$")


def sluid(text: str | None) -> str | None:
    """A SLUID as Slurm prints it (``s`` + 13 Crockford base-32 characters, slurm-25-11-7-1
    src/common/sluid.c print_sluid), else None: an unset one (``s0000000000000``), a
    missing field, anything else."""
    text = (text or "").strip()
    if not _SLUID.match(text) or not text[1:].strip("0"):
        return None
    return text


# -- index lists and hostlists ---------------------------------------------------------------

_PART = re.compile(r"[^,]+")  # parts one by one: a long list is never split whole


def expand_indices(text: str | None, limit: int = MAX_GPUS) -> list[int]:
    """``0-1,3`` → ``[0, 1, 3]`` (GPU indices, task ids; empty parts, ``N/A`` and ``(null)``
    skipped). The count is added up range by range BEFORE anything is allocated: a list of
    more than ``limit`` entries raises :class:`TooLarge` without being built."""
    ranges: list[tuple[int, int]] = []
    total = 0
    for m in _PART.finditer(text or ""):
        part = m.group()
        if part in _NULL:
            continue
        lo, _, hi = part.partition("-")
        first, last = _number(lo), _number(hi or lo)
        total += max(0, last - first + 1)
        if total > limit:
            raise TooLarge(f"the list stands for more than {limit} entries")
        ranges.append((first, last))
    out: list[int] = []
    for first, last in ranges:
        out.extend(range(first, last + 1))
    return out


def _split_top(expr: str) -> list[str]:
    """Split on the commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in expr:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p]


def expand_hostlist(text: str | None, limit: int = MAX_HOSTS) -> list[str]:
    """A Slurm host (or file) list, as slurm-22-05-8-1 src/common/hostlist.c expands it:
    ``gpu[01-03,7],login1`` → ``gpu01 gpu02 gpu03 gpu7 login1``; every bracket of a name is
    a range of its own (``rack[1-2]-n[1-2]`` → ``rack1-n1 rack1-n2 rack2-n1 rack2-n2``); a
    range keeps the width of a zero-padded low end. More than ``limit`` names (MAX_RANGE),
    an unbalanced bracket or a range that runs backwards raise :class:`SlurmSyntaxError`."""
    if not text or text in _NULL:
        return []
    if text.count("[") != text.count("]"):
        raise SlurmSyntaxError(f"not a hostlist: {text[:80]!r}")
    out: list[str] = []

    def walk(part: str) -> None:
        lb = part.find("[")
        if lb < 0:
            out.append(part)
            if len(out) > limit:
                raise TooLarge(f"hostlist of more than {limit} names: {text[:80]!r}")
            return
        rb = part.find("]", lb)
        if rb < 0:
            raise SlurmSyntaxError(f"not a hostlist: {text[:80]!r}")
        head, body, tail = part[:lb], part[lb + 1:rb], part[rb + 1:]
        for item in body.split(","):
            lo, dash, hi = item.partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()):
                raise SlurmSyntaxError(f"not a hostlist range: {item!r} in {text[:80]!r}")
            first, last = int(lo), int(hi) if dash else int(lo)
            if last < first or last - first > limit:
                raise SlurmSyntaxError(f"not a hostlist range: {item!r} in {text[:80]!r}")
            width = len(lo) if lo.startswith("0") else 0
            for n in range(first, last + 1):
                walk(f"{head}{n:0{width}d}{tail}")

    for part in _split_top(text):
        walk(part)
    return out


# -- durations -------------------------------------------------------------------------------

_UNLIMITED = ("-1", "infinite", "unlimited")


def _valid_timespec(s: str) -> bool:
    """slurm-22-05-8-1 src/common/parse_time.c _is_valid_timespec."""
    if not s or any(c not in "0123456789-:" for c in s):
        return False
    digit = len([g for g in re.split(r"[-:]", s) if g])
    dash, colon = s.count("-"), s.count(":")
    if not digit or dash > 1 or colon > 2 or (dash and ":" in s.split("-", 1)[0]):
        return False
    need = {1: 3, 2: 4} if dash else {1: 2, 2: 3}
    return digit >= need.get(colon, 0)


def time_str2secs(text: str | None) -> int | None:
    """A time limit in Slurm's syntax → seconds, as slurm-22-05-8-1 src/common/parse_time.c
    time_str2secs reads it: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS`` (``"90"`` is 90 minutes). None for ``-1``/``INFINITE``/``UNLIMITED``;
    :class:`SlurmSyntaxError` for anything else (Slurm's NO_VAL), and for a negative day."""
    s = (text or "").strip()
    if s.lower() in _UNLIMITED:
        return None
    if not _valid_timespec(s) or s.startswith("-"):
        raise SlurmSyntaxError(f"not a Slurm time limit: {text!r}")
    if any(len(g) > MAX_DIGITS for g in re.split(r"[-:]", s)):
        raise SlurmSyntaxError(f"not a Slurm time limit: {text!r}")
    if "-" in s:
        days, _, rest = s.partition("-")
        hms = [int(p) for p in rest.split(":")] if rest else []
        hms += [0] * (3 - len(hms))
        return int(days) * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2]
    parts = [int(p) for p in s.split(":")]
    if len(parts) == 3:
        return parts[0] * 3600 + parts[1] * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)


def time_str2mins(text: str | None) -> int | None:
    """Minutes, as Slurm keeps a job's time limit (parse_time.c time_str2mins: seconds
    rounded up to the next minute); None for unlimited."""
    secs = time_str2secs(text)
    return None if secs is None else (secs + 59) // 60


def time_limit_seconds(text: str) -> int:
    """The seconds of the time limit Slurm gives a job asking ``-t text`` (whole minutes,
    rounded up). A limit of zero or none (``UNLIMITED``) raises: a hold needs a bound."""
    minutes = time_str2mins(text)
    if not minutes:
        raise SlurmSyntaxError(f"time limit must be positive and bounded: {text!r}")
    return minutes * 60


# -- GRES and TRES strings -------------------------------------------------------------------

# A GPU type is any name but a bare number (MIG profiles start with one: 3g.40gb). Items
# separate their parts with ``:`` (``=`` read too, as job_submit.lua always read it).
_TYPE = r"(?!\d+(?:[:=]|$))[A-Za-z0-9][A-Za-z0-9_.+-]*"
_GRES_GPU = re.compile(rf"^(?:gres[:/])?(gpu|shard|mps)(?:[:=]({_TYPE}))?(?:[:=](\d{{1,9}}))?$")
_GPUS = re.compile(rf"^(?:({_TYPE}):)?(\d{{1,9}})$")
# A GRES name: the run of name characters after an optional ``gres:``/``gres/`` (the same
# rule as job_submit.lua's gres_name, so both read one item alike).
_GRES_NAME = re.compile(r"(?:gres[:/])?([A-Za-z0-9_.+-]*)")


def gres_name(item: str) -> str:
    """The GRES name of one request item: ``gres:gpu:h100:2``, ``gres/shard:3`` → gpu, shard
    (the ``gres:`` prefix before 23.11, ``gres/`` from it: slurm-23-11-1-1
    src/interfaces/gres.c gres_prepend_tres_type); ``gpu(x):1`` → gpu (then unreadable)."""
    return _GRES_NAME.match(item).group(1)


def parse_gres(text: str, known: tuple[str, ...] = (), *,
               others: bool = False) -> tuple[int, str | None, str]:
    """A GRES request (``--gres``, TresPerNode) as slurm-22-05-8-1 src/common/gres.c reads
    ``name[:type][:count]``: ``gpu:h100:4`` → (4, "h100", "gpu"); ``gpu:2`` → (2, None,
    "gpu"); ``shard:3`` → (3, None, "shard"): a count per node, its GPU type (lowercase:
    Slurm matches types without case) and which GRES (gpu, shard, mps).

    Other GRES in ``known`` (a site's NIC, say) are ignored — every other GRES with
    ``others`` (Slurm's own request strings, where the site's GRES stand beside the GPUs) —,
    any other name is refused as unknown; two GPU entries of different types, or whole GPUs
    with shares, are refused.
    """
    count, gpu_type, kind = 0, None, None
    for item in (i.strip() for i in text.split(",")):
        name = gres_name(item)
        if name not in ("gpu", *SHARED_GRES):
            if others or name in known:
                continue
            raise SlurmSyntaxError(f"unknown GRES {name!r} in {item!r}: GPU tokens pay for "
                                   "gpu, shard and mps")
        m = _GRES_GPU.match(item)
        if not m:
            raise SlurmSyntaxError(f"cannot read the GPU request {item}")
        if kind and m.group(1) != kind:
            raise SlurmSyntaxError("a job asks for whole GPUs or for shares of one (shard, "
                                   "mps), not both")
        kind = m.group(1)
        typed = (m.group(2) or "").lower()
        if typed and gpu_type and typed != gpu_type:
            raise SlurmSyntaxError(f"one GPU type per job, not {gpu_type} and {typed}")
        gpu_type = typed or gpu_type
        count += int(m.group(3) or 1)
    return count, gpu_type, kind or "gpu"


def parse_gpus(text: str) -> tuple[int, str | None]:
    """``--gpus``/``--gpus-per-node`` (slurm-22-05-8-1 src/common/slurm_opt.c): ``h100:4``
    or ``4`` → (count, lowercase type or None)."""
    m = _GPUS.match(text.strip())
    if not m:
        raise SlurmSyntaxError(f"cannot read the GPU count {text!r} (e.g. 4 or h100:4)")
    return int(m.group(2)), m.group(1).lower() if m.group(1) else None


def gpus_in_tres(tres: str | None) -> dict[str | None, int]:
    """GPU counts by (lowercase) type from a TRES string; untyped GPUs under ``None``.

    ``billing=1,cpu=1,gres/gpu:h100=2,gres/gpu=2,node=1`` → ``{"h100": 2}``;
    ``gres/gpu=2`` alone → ``{None: 2}``; a mixed allocation keeps the typed counts and
    puts any untyped rest under ``None``.
    """
    typed: dict[str | None, int] = {}
    total = 0
    for item in (tres or "").split(","):
        name, _, value = item.partition("=")
        name = name.replace("gres:", "gres/")
        if not name.startswith("gres/gpu") or not value:
            continue
        count = _number(value)
        if name == "gres/gpu":
            total = count
        elif name.startswith("gres/gpu:"):
            gtype = name.split(":", 1)[1].lower()
            typed[gtype] = typed.get(gtype, 0) + count
    rest = total - sum(typed.values())
    if rest > 0:
        typed[None] = rest
    return typed


_GRES_IDX = re.compile(r"gpu(?::([^:(,]+))?(?::\d+)?\(IDX:([^)]*)\)")


def gres_indices(text: str | None) -> dict[int, str | None]:
    """A job's GRES detail per node (``gpu:h100:1(IDX:0),gpu:a100:1(IDX:2)``) → ``{0:
    'h100', 2: 'a100'}`` (slurm-22-05-8-1 src/common/gres.c gres_job_state_str IDX)."""
    out: dict[int, str | None] = {}
    for m in _GRES_IDX.finditer(text or ""):
        gtype = m.group(1)
        if gtype and gtype.isdigit():  # gpu:2(IDX:0-1): a count, not a type
            gtype = None
        for i in expand_indices(m.group(2)):
            out[i] = gtype.lower() if gtype else None
    return out


# -- array specs -----------------------------------------------------------------------------

_ARRAY_ITEM = re.compile(r"^(\d{1,9})(?:-(\d{1,9})(?::(\d{1,9}))?)?$")


def array_size(spec: str) -> int:
    """How many tasks ``--array`` asks for (slurm-22-05-8-1 src/common/slurm_opt.c
    arg_set_array_inx, read by slurmctld's bitstring ``bit_unfmt``): ``0-9`` → 10,
    ``0-9:2`` → 5, ``1,3,5`` → 3, ``0-99%10`` → 100."""
    body = spec.split("%", 1)[0]
    total = 0
    for item in body.split(","):
        m = _ARRAY_ITEM.match(item.strip())
        if not m:
            raise SlurmSyntaxError(f"cannot read the array spec {spec!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        step = int(m.group(3)) if m.group(3) else 1
        if hi < lo or step < 1:
            raise SlurmSyntaxError(f"cannot read the array spec {spec!r}")
        total += (hi - lo) // step + 1
    return total


# -- gres.conf -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GresConfLine:
    """One line of gres.conf (slurm-22-05-8-1 src/common/gres.c _parse_gres_config: keys
    without case, ``#`` starts a comment, ``NodeName=``/``File=``/``MultipleFiles=`` are
    hostlists)."""

    name: str  # lowercase
    gpu_type: str | None  # lowercase
    nodes: tuple[str, ...] | None  # None: every node
    files: tuple[str, ...]
    multiple_files: bool  # MultipleFiles=: one GPU with several device files
    count: int | None

    def gpus(self) -> list[tuple[str, ...]]:
        """The GPUs a ``Name=gpu`` line gives, in index order, each with its device files:
        one per ``File=`` file, one for ``MultipleFiles=``, else ``Count=`` (or one) GPUs
        without files (``AutoDetect`` finds them)."""
        if self.multiple_files:
            return [self.files]
        if self.files:
            return [(f,) for f in self.files]
        return [()] * (self.count if self.count is not None else 1)


def gres_conf(text: str) -> list[GresConfLine]:
    """The lines of a gres.conf that name a GRES (``Name=``)."""
    out: list[GresConfLine] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        f = {k.lower(): v for k, _, v in (w.partition("=") for w in line.split()) if v}
        if "name" not in f:
            continue
        multiple = "multiplefiles" in f
        out.append(GresConfLine(
            name=f["name"].lower(), gpu_type=f["type"].lower() if "type" in f else None,
            nodes=tuple(expand_hostlist(f["nodename"])) if "nodename" in f else None,
            files=tuple(expand_hostlist(f["multiplefiles"] if multiple else f.get("file"))),
            multiple_files=multiple,
            count=int(f["count"]) if f.get("count", "").isdigit() else None))
    return out


def node_gpus(lines: list[GresConfLine], node: str) -> list[tuple[str | None, tuple[str, ...]]]:
    """(type, device files) of each GPU gres.conf gives ``node``; entry i is Slurm's GPU
    index i on it."""
    return [(line.gpu_type, files) for line in lines
            if line.name == "gpu" and (line.nodes is None or node in line.nodes)
            for files in line.gpus()]
