"""Reserves answered from memory, written in batches off the reply path (``[daemon]
fast_reserve = true``).

slurmctld asks one reserve at a time, inside its job write lock; a reserve that waits for
its own database commit costs every submission that commit. Here the daemon decides a
reserve from what it knows of the token — its balance as last read, less what it has
answered since and not yet written — and answers at once with a new hold id; a writer
thread writes the answered holds, many per transaction (``Ledger.reserve_many``), within a
few milliseconds. The database stays the authority:

* Only a token the daemon has read recently (``fresh_s``) is answered from memory, and only
  when that balance covers the hold; anything else — a first request, a refusal, a bad
  GRES, an unpriced type — takes the synchronous path, so every refusal is the ledger's.
* The writer re-checks each hold as ``reserve`` does (token live, digest, scopes, balance
  under lock). A hold it cannot write — the token was spent, revoked or expired by
  another writer in between, or the daemon died before writing it — does not exist: its
  job carries a hold id the ledger does not know, and PrologSlurmctld reserves for it
  when it starts, or cancels it (``slurm_plugin.ctld``). No path overdraws a token (the
  database refuses that) or runs a GPU job unpaid.
* Every other operation first waits for the queue to be written (``flush``), so a
  resize, void or bind always finds the hold it names.
* At most ``max_backlog`` answers wait to be written: beyond that the synchronous path
  (which waits for the writer) takes over, so the answers never run ahead of the
  database by more than a few batches — nor does what a crash can leave unwritten.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from ..errors import InvalidInput, LedgerError, Refusal
from ..reserve import ReserveItem, new_hold_id
from ..liveness import Liveness, liveness
from ..names import check_account_name
from ..pricing import RateCandidates, hold_cost, hold_rate
from ..tokens import digest
from ..views import HoldRequest
from .writer import LocalWriter

log = logging.getLogger("gpuledger.daemon")
KEEP_ANSWERS = 20_000  # idempotency keys answered from memory, remembered for replays
RETRIES = 5  # writes of one batch before its holds are given up (their jobs reserve at start)


@dataclass
class Budget:
    """What the daemon knows of one token: as read, and what it answered since."""

    digest: str
    status: str
    not_before: datetime | None
    expires: datetime | None
    balance: int
    read_at: float  # monotonic
    inflight: int = 0  # answered, not yet written
    used_at: float = 0.0


class FastReserve:
    """The in-memory reserve decision and its writer thread (one per daemon process)."""

    def __init__(self, ledger, *, fresh_s: float = 2.0, batch: int = 64,
                 delay_s: float = 0.002, max_backlog: int = 256, clock=time.monotonic,
                 writer=None):
        self.ledger = ledger
        # where the holds are written and the budgets read (ledger.daemon.writer)
        self.writer = writer if writer is not None else LocalWriter(ledger)
        self.fresh_s = fresh_s
        self.batch = batch
        self.max_backlog = max_backlog
        self.delay_s = delay_s
        self.clock = clock
        self._cond = threading.Condition()
        self._queue: list[tuple[ReserveItem, str, int]] = []  # item, token id, amount
        self._writing = 0
        self._budgets: dict[str, Budget] = {}
        self._wanted: set[str] = set()
        self._answers: OrderedDict[str, tuple[str, HoldRequest, dict]] = OrderedDict()
        self._prices: tuple[float, dict, object] | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.answered = self.written = self.lost = 0

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> None:
        self.writer.start()
        self._refresh(force=True)
        self._thread = threading.Thread(target=self._run, name="gpuledger-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what was answered, then stop the writer."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self.writer.close()

    # -- the reply path ---------------------------------------------------------------------

    def answer(self, token: str, request: HoldRequest, key: str | None) -> dict | None:
        """The answer to a reserve from memory, or None: take the synchronous path. A
        token that can never pay (forged, expired, out of scope) raises its Refusal."""
        if key is not None:
            with self._cond:
                seen = self._answers.get(key)
                if seen is not None:  # a replay: the same answer; other fields: the ledger's
                    return dict(seen[2]) if seen[:2] == (token, request) else None
        claims = self.ledger.check(token, request)  # signature, validity, scopes: the token's own
        if request.account is not None:
            check_account_name(request.account)
        now = self.clock()
        try:
            share = self.ledger.hold_share(request)
        except (Refusal, InvalidInput):
            return None  # the synchronous path says why
        with self._cond:
            if self._stopping or self._prices is None or now - self._prices[0] > self.fresh_s:
                return None
            if len(self._queue) + self._writing >= self.max_backlog:
                return None  # the writer is behind: the synchronous path waits for it
            _, rates, tiers = self._prices
            b = self._budgets.get(claims.id)
            if b is None or now - b.read_at > self.fresh_s or b.digest != digest(token.strip()):
                self._want(claims.id)
                self._cond.notify_all()
                return None
            if liveness(b.status, b.not_before, b.expires, self.ledger.clock()) \
                    is not Liveness.ACTIVE:
                return None
            rate = hold_rate(request.gpu_type, RateCandidates.from_rates(rates, request.gpu_type))
            if rate is None:
                return None
            multiplier = tiers.hold_ppm(request.partitions, request.qos)
            amount = hold_cost(request.gpus, request.seconds, request.tasks, rate, share,
                               multiplier)
            if amount > b.balance - b.inflight:
                return None
            b.inflight += amount
            b.used_at = now
            hold_id = new_hold_id()
            self._queue.append((ReserveItem(hold_id, token, request, key), claims.id, amount))
            self.answered += 1
            out = {"hold": hold_id, "token_id": claims.id, "amount": amount, "rate": rate}
            if key is not None:
                self._answers[key] = (token, request, out)
                while len(self._answers) > KEEP_ANSWERS:
                    self._answers.popitem(last=False)
            self._cond.notify_all()
            return dict(out)

    def learn(self, token_id: str) -> None:
        """A token the synchronous path just reserved for: read it for the next reserves."""
        with self._cond:
            self._want(token_id)
            self._cond.notify_all()

    def _want(self, token_id: str) -> None:
        if len(self._wanted) < 10_000:
            self._wanted.add(token_id)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every answered hold is written (or given up); False on timeout."""
        deadline = self.clock() + timeout
        with self._cond:
            while self._queue or self._writing:
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- the writer -------------------------------------------------------------------------

    def _run(self) -> None:
        last_refresh = self.clock()
        while True:
            with self._cond:
                if not self._queue and not self._stopping and not self._wanted:
                    self._cond.wait(self.fresh_s / 4)
                if self._stopping and not self._queue:
                    return
            if self._queue:
                time.sleep(self.delay_s)  # let the next few answers join this transaction
                self._write_batch()
            if self._wanted or self.clock() - last_refresh >= self.fresh_s / 2:
                try:
                    self._refresh()
                    last_refresh = self.clock()
                except Exception as exc:  # noqa: BLE001 - stale budgets fall back to the sync path
                    log.error("gpuledger daemon: cannot read token balances: %s", exc)
                    time.sleep(min(self.fresh_s / 4, 0.5))

    def _write_batch(self) -> None:
        with self._cond:
            batch, self._queue = self._queue[:self.batch], self._queue[self.batch:]
            self._writing += len(batch)
        results: list = []
        for attempt in range(RETRIES):
            try:
                results = self.writer.reserve_many([item for item, _, _ in batch])
                break
            except Exception as exc:  # noqa: BLE001 - the database is down: try again, then give up
                if attempt == RETRIES - 1:
                    results = [exc] * len(batch)
                    break
                time.sleep(0.05 * 2 ** attempt)
        written: dict[str, int] = {}  # token id -> what this batch took from it
        failed: set[str] = set()
        for (item, token_id, amount), result in zip(batch, results):
            if isinstance(result, BaseException):
                self.lost += 1
                failed.add(token_id)
                log.error("gpuledger daemon: hold %s answered for token %s could not be written "
                          "(%s: %s); its job reserves again or is cancelled when it starts",
                          item.hold_id, token_id,
                          getattr(result, "kind", type(result).__name__), result)
            else:
                self.written += 1
                written[token_id] = written.get(token_id, 0) + amount
        with self._cond:
            for _item, token_id, amount in batch:
                b = self._budgets.get(token_id)
                if b is not None:
                    b.inflight -= amount
            # The balance as the database now has it after this batch, without reading it
            # back (the budgets are read between batches, on this thread): other writers'
            # spending shows at the next refresh, and every write is checked again anyway.
            for token_id, amount in written.items():
                b = self._budgets.get(token_id)
                if b is not None:
                    b.balance -= amount
            for token_id in failed:  # read again before answering for it from memory
                self._want(token_id)
                b = self._budgets.get(token_id)
                if b is not None:
                    b.read_at = float("-inf")
            self._writing -= len(batch)
            self._cond.notify_all()

    def _refresh(self, force: bool = False) -> None:
        """Re-read the prices and the budgets in use (and those asked for)."""
        now = self.clock()
        with self._cond:
            ids = {t for t, b in self._budgets.items() if now - b.used_at < 60 * self.fresh_s
                   or now - b.read_at < self.fresh_s} | self._wanted
            self._wanted = set()
        rates, tiers = self.writer.prices()
        fresh = self._read(ids)
        with self._cond:
            self._prices = (now, rates, tiers)
            for token_id in list(self._budgets):
                if token_id not in ids and not self._budgets[token_id].inflight:
                    del self._budgets[token_id]
            for token_id, b in fresh.items():
                old = self._budgets.get(token_id)
                if old is not None:
                    # answers given while reading: still in flight, counted on top
                    b.inflight, b.used_at = old.inflight, old.used_at
                else:
                    b.used_at = now
                self._budgets[token_id] = b

    def _read(self, ids: set[str]) -> dict[str, Budget]:
        """Budgets as the database has them now, read after what was queued is written:
        a token's balance already net of every hold written for it."""
        if not ids:
            return {}
        now = self.clock()
        return {token_id: Budget(dig, status, not_before, expires, balance, now)
                for token_id, dig, status, not_before, expires, balance
                in self.writer.budgets(sorted(ids))}


__all__ = ["Budget", "FastReserve", "LedgerError"]
