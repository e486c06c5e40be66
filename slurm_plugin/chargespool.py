"""A node's durable spool of charge records, and their delivery to the daemon.

The epilog writes its run's record (``ledger.nodecharge.NodeCharge``) here before it asks
the daemon to charge it, and removes it once the daemon has answered: a record is never
only in memory. When the daemon cannot be reached (or the ledger behind it is down), the
file is fsynced and stays; the next epilog on the node and the ``gpuledger spool flush``
timer deliver it later. Delivery is exactly once by the record's run key: the daemon
charges (job, run, node) at most once, so a record delivered twice — a lost answer, two
flushers at once, a kill -9 between the charge and the unlink — charges nothing the second
time and is then removed. A record the daemon rejects as malformed is moved to
``rejected/`` and logged: retrying cannot help, and it is kept for an admin.
The directory is checked like every other root-written path (``safefs``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ledger.daemon.client import DaemonError, DaemonUnavailable
from ledger.errors import InvalidInput, LedgerError
from ledger.nodecharge import NodeCharge
from ledger.spoolcount import RECORD_SUFFIX as SUFFIX
from ledger.spoolcount import spool_backlog

from . import safefs

REJECTED = "rejected"
PERMANENT = frozenset({"invalid", "bad_request"})  # the record itself is wrong
MAX_RECORD = 256 * 1024

log = logging.getLogger("gpuledger.hook.spool")

Deliver = Callable[[NodeCharge], dict]


@dataclass(frozen=True)
class Outcome:
    state: str  # "charged" | "already" | "spooled" | "rejected"
    answer: dict | None = None
    why: str = ""


def file_name(rec: NodeCharge) -> str:
    return rec.key + SUFFIX


def put(spool: Path, rec: NodeCharge, *, durable: bool) -> str:
    """Write the record (its key names the file). ``durable``: fsync it and the directory
    (a record kept for later); else only the page cache, enough for a process killed mid-way."""
    name = file_name(rec)
    safefs.write_atomic(spool, name, rec.to_json().encode(), mode=0o600, create=True,
                        dir_mode=0o700, fsync=durable)
    return name


def make_durable(spool: Path, name: str) -> None:
    with safefs.SafeDir(spool) as d:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(d.fd)


def remove(spool: Path, name: str) -> None:
    with safefs.SafeDir(spool) as d:
        d.unlink(name)


def send(rec: NodeCharge, deliver: Deliver) -> Outcome:
    """One delivery attempt: charged, already charged, rejected for good, or still to do."""
    try:
        answer = deliver(rec)
    except DaemonUnavailable as exc:
        return Outcome("spooled", why=str(exc))
    except DaemonError as exc:
        if exc.reason in PERMANENT:
            return Outcome("rejected", why=f"{exc.reason}: {exc}")
        return Outcome("spooled", why=f"{exc.reason}: {exc}")
    except LedgerError as exc:  # a typed answer we did not expect (a refusal): keep it
        return Outcome("spooled", why=f"{exc.__class__.__name__}: {exc}")
    state = "charged" if str(answer.get("charged", "0")) == "1" else "already"
    return Outcome(state, answer)


def submit(spool: Path, rec: NodeCharge, deliver: Deliver) -> Outcome:
    """The epilog's path: spool, deliver, forget — or keep it durably for later."""
    name = put(spool, rec, durable=False)
    out = send(rec, deliver)
    if out.state == "spooled":
        make_durable(spool, name)
    elif out.state == "rejected":
        _reject(spool, name)
    else:
        remove(spool, name)
    return out


@dataclass
class FlushReport:
    delivered: int = 0
    already: int = 0
    rejected: int = 0
    left: int = 0
    why: str = ""


def pending(spool: Path) -> list[str]:
    """Spooled record files, oldest first (a missing spool: none)."""
    try:
        with safefs.SafeDir(spool) as d:
            names = [n for n in d.names() if n.endswith(SUFFIX) and not n.startswith(".")]
            return sorted(names, key=lambda n: (d.lstat(n).st_mtime_ns, n))
    except FileNotFoundError:
        return []


def backlog(spool: Path) -> int:
    """How many records wait for delivery (``ledger.spoolcount``: the one count)."""
    return spool_backlog(spool) or 0


def flush(spool: Path, deliver: Deliver, *, limit: int | None = None,
          deadline: float | None = None, logger: logging.Logger | None = None) -> FlushReport:
    """Deliver spooled records, oldest first, until the daemon is away again, ``limit``
    records or ``deadline`` (monotonic) is reached."""
    lg = logger or log
    report = FlushReport()
    names = pending(spool)
    for i, name in enumerate(names):
        if (limit is not None and i >= limit) or (deadline is not None
                                                  and time.monotonic() > deadline):
            report.left = len(names) - i
            break
        try:
            with safefs.SafeDir(spool) as d:
                raw = d.read(name, limit=MAX_RECORD)
        except safefs.UnsafePath as exc:
            lg.error("spooled record %s refused (%s): moved to %s/", name, exc, REJECTED)
            _reject(spool, name)
            report.rejected += 1
            continue
        if raw is None:  # delivered by another flusher meanwhile
            continue
        try:
            rec = NodeCharge.from_json(raw)
            if file_name(rec) != name:
                raise InvalidInput(f"its key is {rec.key}, not the file's name")
        except InvalidInput as exc:
            lg.error("spooled record %s is unreadable (%s): moved to %s/", name, exc, REJECTED)
            _reject(spool, name)
            report.rejected += 1
            continue
        out = send(rec, deliver)
        if out.state == "spooled":
            report.left = len(names) - i
            report.why = out.why
            break
        if out.state == "rejected":
            lg.error("daemon rejected spooled record %s (%s): moved to %s/", name, out.why,
                     REJECTED)
            _reject(spool, name)
            report.rejected += 1
            continue
        remove(spool, name)
        if out.state == "charged":
            report.delivered += 1
            lg.info("delivered spooled charge %s: %s GPU-s on hold %s", rec.key,
                    out.answer.get("amount"), out.answer.get("hold"))
        else:
            report.already += 1
            lg.info("spooled charge %s was charged before (%s)", rec.key,
                    out.answer.get("note") or "already charged")
    return report


def _reject(spool: Path, name: str) -> None:
    """Move a record to ``rejected/`` (kept for an admin, never retried)."""
    with safefs.SafeDir(spool) as d:
        try:
            os.mkdir(REJECTED, 0o700, dir_fd=d.fd)
        except FileExistsError:
            pass
        with safefs.SafeDir(d.path / REJECTED):
            pass  # checks it: a directory, root's, not a symlink
        try:
            os.rename(name, f"{REJECTED}/{name}", src_dir_fd=d.fd, dst_dir_fd=d.fd)
        except FileNotFoundError:
            pass
