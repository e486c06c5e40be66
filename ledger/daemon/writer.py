"""Where the fast path's database work runs: in the daemon (:class:`LocalWriter`) or in a
process of its own (:class:`ProcessWriter`, what ``gpuledger serve`` uses).

The daemon answers slurmctld's reserves from memory in a few tens of microseconds of
Python; writing the answered holds costs about ten times that per hold. In one process
the two share the interpreter lock, and a reply waits behind the writer's batches — the
reserve p99 at the socket is then the writer's, not the answer's. In a process of its own
the writer costs the daemon a pickled batch each way over a pipe.

Both offer the same four calls: ``reserve_many``, ``prices``, ``budgets`` and ``close``.
A call that fails raises :class:`WriterError`; the fast path retries it and then gives the
batch up (its jobs reserve again or are cancelled when they start), as for any database
failure. The writer process ignores SIGTERM and SIGINT — a stopping daemon writes what it
answered through it first — and ends when the daemon's end of the pipe closes, a
``kill -9`` of the daemon included.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
from pathlib import Path

from sqlalchemy import select

from .. import db
from ..models import Token, Wallet

log = logging.getLogger("gpuledger.daemon")
T, W = Token.__table__, Wallet.__table__


class WriterError(Exception):
    """A writer call that did not complete (the database, or the writer process, failed)."""


class Failed(Exception):
    """One item of ``reserve_many`` that was not written: its error's type and message
    (ledger errors do not all pickle as themselves)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return Failed, (self.kind, str(self))


class LocalWriter:
    """The calls run in this process, on ``ledger``."""

    def __init__(self, ledger):
        self.ledger = ledger

    def start(self) -> None:
        pass

    def reserve_many(self, items) -> list:
        """None for each item written, a :class:`Failed` for each that was not (all the
        daemon needs: a written hold's figures are those it answered)."""
        return [Failed(type(r).__name__, str(r)) if isinstance(r, BaseException) else None
                for r in self.ledger.reserve_many(items)]

    def prices(self) -> tuple[dict, object]:
        return self.ledger.rates(), self.ledger.tiers()

    def budgets(self, ids: list[str]) -> list[tuple]:
        """(token id, digest, status, not_before, expires, balance) of each token known."""
        out = []
        with db.read(self.ledger.engine) as conn:
            for at in range(0, len(ids), 500):
                q = (select(T.c.id, T.c.digest, T.c.status, T.c.not_before, T.c.expires,
                            W.c.balance).join(W, W.c.id == T.c.wallet_id)
                     .where(T.c.id.in_(ids[at:at + 500])))
                out.extend((r.id, r.digest, r.status, r.not_before, r.expires, int(r.balance))
                           for r in conn.execute(q))
        return out

    def close(self) -> None:
        pass


class ProcessWriter:
    """The calls run in a child process with its own ledger, built from ``config_path``.
    A child that died is started again at the next call."""

    def __init__(self, config_path: str | Path | None):
        # None: the default config (GPULEDGER_CONFIG, inherited by the child, or /etc)
        self.config_path = None if config_path is None else str(config_path)
        self._lock = threading.Lock()
        self._proc: mp.process.BaseProcess | None = None
        self._conn = None

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(theirs, self.config_path),
                                 name="gpuledger-writer", daemon=True)
        self._proc.start()
        theirs.close()
        self._conn = ours
        try:
            kind, value = ours.recv()  # the child's ledger is up (or why not)
        except (EOFError, OSError):
            kind, value = "error", (f"the writer process ended before it was ready (exit "
                                    f"code {self._proc.join(5) or self._proc.exitcode})")
        if kind != "ok":
            self._stop()
            raise WriterError(value)

    def _call(self, op: str, *args):
        with self._lock:
            try:
                if self._proc is None or not self._proc.is_alive():
                    if self._proc is not None:
                        log.error("gpuledger daemon: the writer process ended (exit code %s); "
                                  "starting another", self._proc.exitcode)
                        self._stop()
                    self._start()
                self._conn.send((op, args))
                kind, value = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._stop()
                raise WriterError(f"the writer process failed: {exc or type(exc).__name__}"
                                  ) from None
        if kind != "ok":
            raise WriterError(value)
        return value

    def reserve_many(self, items) -> list:
        return self._call("reserve_many", list(items))

    def prices(self) -> tuple[dict, object]:
        return self._call("prices")

    def budgets(self, ids: list[str]) -> list[tuple]:
        return self._call("budgets", ids)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()  # the child sees the end of the pipe and exits
            self._conn = None
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._proc = None


def _child(conn, config_path: str | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the daemon stops us, after its last batch
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .. import config as config_mod
    from ..service import Ledger

    try:
        writer = LocalWriter(Ledger.from_config(config_mod.load(config_path)))
    except Exception as exc:  # noqa: BLE001 - reported to the daemon, which logs it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", getattr(writer, op)(*args)))
        except Exception as exc:  # noqa: BLE001 - the daemon retries, then gives the batch up
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
