"""Group commit: the write operations that several threads ask for at once share one
transaction and one durable commit.

On SQLite every commit is an fsync of the write-ahead log and there is one writer at a
time, so a daemon settling the jobs of many nodes at once would queue them commit by
commit — on a disk that does 1,200 fsyncs a second that is at most 600 reserve+post
lifecycles a second, whatever the CPU. Here the threads that arrive while a transaction
is committing wait together; the first of them leads the next transaction, which runs each
waiting operation in a SAVEPOINT of its own and commits them all once. Nothing about an
operation changes but when its commit happens:

- each operation gets its own outcome: a refusal (any :class:`LedgerError`) rolls back to
  its savepoint — its writes and its postings — and reaches only its caller;
- a caller returns only after the commit that made its operation durable;
- anything else going wrong in a shared transaction (a driver error, a bug, a failed
  commit) runs the operations again one transaction each, so each caller gets the error
  its own operation causes, as without grouping;
- one thread alone runs its operation in a transaction of its own, as before.

Used on SQLite only. On PostgreSQL and MariaDB writers run side by side and group sealing
(``ledger.journal``) already keeps them off the chain head; a shared transaction there
would hold one operation's row locks until the others are done and could deadlock with
another process's batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import LedgerError
from .journal import Tx

MAX_BATCH = 64  # operations per shared transaction: bounds what one caller waits behind


class _Job:
    __slots__ = ("_wake", "done", "error", "fn", "lead", "value")

    def __init__(self, fn: Callable[[Tx], object]):
        self.fn = fn
        self.done = False  # it has its outcome
        self.lead = False  # it was handed the lead of the next transaction
        self.value: object = None
        self.error: BaseException | None = None
        self._wake = threading.Lock()  # held until the job is done or handed the lead
        self._wake.acquire()

    def wait(self) -> None:
        self._wake.acquire()

    def wake(self) -> None:
        self._wake.release()

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.value


class GroupCommit:
    """Leader/follower batching of write operations (see the module's docstring).

    ``transaction(fn)`` is the ledger's: it runs ``fn(tx)`` in one write transaction,
    sealed and committed, and returns its result — one job's, or a batch's in savepoints
    (:func:`run_in_savepoints`). A waiting thread is woken once: when its job is done, or
    when it is handed the lead of the next transaction (no herd of waiters woken per
    commit)."""

    def __init__(self, transaction: Callable[[Callable[[Tx], object]], object],
                 max_batch: int = MAX_BATCH):
        self._transaction = transaction
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        self._leading = False
        self._leader: int | None = None  # the thread running the current transaction
        self.batches = 0  # transactions committed by this group (for benchmarks and tests)
        self.grouped = 0  # operations that shared one with another

    def submit(self, fn: Callable[[Tx], object]):
        if self._leader == threading.get_ident():
            # an operation asking for a write from inside its own transaction would wait
            # for itself; without grouping it would wait on SQLite's lock, then fail
            raise RuntimeError("a ledger write was started inside another write's transaction")
        job = _Job(fn)
        with self._lock:
            if self._leading:
                self._queue.append(job)
            else:
                self._leading = job.lead = True
        if not job.lead:
            job.wait()
            if job.done:
                return job.outcome()
        with self._lock:  # leading: this job and those that queued behind the last commit
            batch = [job] + self._queue[:self.max_batch - 1]
            del self._queue[:len(batch) - 1]
        heir = None
        self._leader = threading.get_ident()
        try:
            self._lead(batch)
        finally:
            self._leader = None
            with self._lock:
                if self._queue:
                    heir = self._queue.pop(0)
                    heir.lead = True
                else:
                    self._leading = False
            for other in batch[1:]:
                other.wake()
            if heir is not None:
                heir.wake()
        return job.outcome()

    def _lead(self, batch: list[_Job]) -> None:
        """Give every job of ``batch`` its outcome, whatever happens."""
        try:
            if len(batch) == 1:
                self._alone(batch[0])
                return
            try:
                self._transaction(lambda tx: run_in_savepoints(tx, batch))
            except Exception:  # noqa: BLE001 - each job gets its own error, alone, below
                # Not a refusal (those stay inside their savepoint): the shared transaction
                # failed as a whole. Each operation runs again by itself.
                for job in batch:
                    job.value = job.error = None
                    self._alone(job)
                return
            self.batches += 1
            self.grouped += len(batch)
            for job in batch:
                job.done = True
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: no follower waits on
            for job in batch:
                if not job.done:
                    job.error, job.done = exc, True
            raise

    def _alone(self, job: _Job) -> None:
        try:
            job.value = self._transaction(job.fn)
        except Exception as exc:  # noqa: BLE001 - the caller's own error, raised in its thread
            job.error = exc
        job.done = True
        self.batches += 1


def run_in_savepoints(tx: Tx, batch: list[_Job]) -> None:
    """Run each job of ``batch`` in its own savepoint of ``tx``'s transaction: a refusal
    (``LedgerError``) undoes that job's writes and postings and becomes its outcome; a
    job's postings are applied (and its overdrafts found) before its savepoint is left."""
    raw = tx.raw
    for job in batch:
        mark = tx.mark()
        raw.run("SAVEPOINT gl_job")
        try:
            job.value = job.fn(tx)
            tx.flush()
        except LedgerError as exc:
            raw.run("ROLLBACK TO SAVEPOINT gl_job")
            raw.run("RELEASE SAVEPOINT gl_job")
            tx.restore(mark)
            job.value, job.error = None, exc
        else:
            raw.run("RELEASE SAVEPOINT gl_job")
            job.error = None
