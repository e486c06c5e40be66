"""The failover test's load: what two clusters' controllers and nodes ask of the ledger,
each answer recorded with its time.

Per cluster (one ``gpuledger serve`` each, standing in for its slurmctld host):

* submitter and settler threads speak the daemon's protocol as job_submit.lua and the controller hooks
  do: ``reserve`` (with a key, as the Lua sends one), then, in a settler, the job's
  settlement — a third
  of the jobs are cancelled (``void``), the others run: ``bind`` (PrologSlurmctld), the
  node's record of the run handed to the daemon through the node's durable spool as the
  epilog does (``charge``: ``slurm_plugin.chargespool.submit``; a record the daemon cannot
  take waits in the spool, and a flusher thread — the ``gpuledger spool flush`` timer —
  delivers it later), and ``finish`` (EpilogSlurmctld closes the hold once the node has
  charged). Controller steps are repeated until they are answered OK, as the hooks and
  the reconciler repeat them; submits are not (a refused job is refused).
* one job_submit.lua process (the real script under lua5.1, as slurmctld runs it) submits
  GPU jobs through the same daemon: its answers show what a user sees during the gap.

Every request and its answer is an :class:`Answer`; the test holds the database against
the answers that said OK.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ledger.daemon.client import Client, DaemonUnavailable
from ledger.nodecharge import GpuUse, NodeCharge
from slurm_plugin import chargespool

SETTLE_PAUSE_S = 0.2
FLUSH_EVERY_S = 0.5
JOB_SECONDS = 600
RAN_S = 300  # each run held its one GPU this long: the node charges 300 GPU-s at rate 1
RUNNING_S = 1.0  # between bind and epilog: jobs are running when the primary dies
SUBMIT_PAUSE_S = 0.05
BACKLOG = 12  # reserved jobs waiting to be settled beyond this are cancelled


@dataclass
class Answer:
    source: str  # "alpha/1" (a client thread), "alpha/lua"
    op: str  # reserve | void | bind | post | finish
    t0: float  # sent (epoch s)
    t1: float  # answered, or given up
    ok: bool
    reason: str = ""
    message: str = ""
    hold: str | None = None
    key: str | None = None
    job: str | None = None
    state: str | None = None  # finish: closed | none | waiting | open

    @property
    def ms(self) -> float:
        return (self.t1 - self.t0) * 1000


class Record:
    def __init__(self):
        self._lock = threading.Lock()
        self.answers: list[Answer] = []

    def add(self, a: Answer) -> Answer:
        with self._lock:
            self.answers.append(a)
        return a

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)


class Cluster:
    """One cluster's controller side: its daemon socket and its load. Submitters and the
    jobs' settlement run in threads of their own, so that submits go on while settlements
    wait for the database (slurmctld keeps taking jobs while others end)."""

    def __init__(self, name: str, socket: Path, job_base: int, record: Record, spool: Path,
                 tokens: list[str], stop: threading.Event, drain: threading.Event):
        self.name, self.socket, self.job_base = name, socket, job_base
        self.record, self.spool = record, spool
        self.tokens, self.stop, self.drain = tokens, stop, drain
        self.jobs: queue.Queue = queue.Queue()  # (hold, job, n) reserved, to settle
        self.submitters: list[threading.Thread] = []
        self.settlers: list[threading.Thread] = []
        self.flushed = Counter()  # what the flusher's deliveries found: charged | already

    def start(self, submitters: int, settlers: int, lua=None, lua_token: str | None = None
              ) -> None:
        def spawn(into, target, name, *args):
            t = threading.Thread(target=target, args=args, name=f"{self.name}-{name}",
                                 daemon=True)
            t.start()
            into.append(t)

        for i in range(submitters):
            spawn(self.submitters, self._submitter, f"submit{i}", i,
                  self.tokens[i % len(self.tokens)])
        if lua is not None:
            spawn(self.submitters, self._lua, "lua", lua, lua_token)
        for i in range(settlers):
            spawn(self.settlers, self._settler, f"settle{i}", i)
        self.flusher = threading.Thread(target=self._flusher, name=f"{self.name}-flush",
                                        daemon=True)
        self.flusher.start()

    def join(self, timeout: float) -> bool:
        """Wait for the submitters (they stop with ``stop``), then for every reserved job to
        be settled (the flusher ends with the drain); False when that took longer."""
        end = time.monotonic() + timeout
        for t in self.submitters + self.settlers:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self.submitters + self.settlers)

    # -- submitters and settlers --------------------------------------------------------

    def _submitter(self, i: int, token: str) -> None:
        src = f"{self.name}/{i}"
        client = Client(self.socket, timeout=2.0)
        n = 0
        while not self.stop.is_set():
            n += 1
            key = f"{self.name}-{i}-{n}"
            job = str(self.job_base + i * 100_000 + n)
            a = self._call(client, src, "reserve", key=key, job=job, token=token, gpus=1,
                           seconds=JOB_SECONDS, type="h100", user="alice", account="physics",
                           partition="gpu", cluster=self.name)
            if a.ok:
                self.jobs.put((a.hold, job, n))
            time.sleep(SUBMIT_PAUSE_S)
        client.close()

    def _settler(self, i: int) -> None:
        src = f"{self.name}/settle{i}"
        client = Client(self.socket, timeout=2.0)
        while not self.drain.is_set():
            try:
                hold, job, n = self.jobs.get(timeout=0.2)
            except queue.Empty:
                if self.stop.is_set() and all(not t.is_alive() for t in self.submitters):
                    break
                continue
            # a third of the jobs are cancelled; so is any beyond what the settlers can
            # run (a queue that only grows would never drain)
            cancelled = n % 3 == 0 or self.jobs.qsize() > BACKLOG
            self._settle(client, src, hold, job, cancelled)
        client.close()

    def _settle(self, client: Client, src: str, hold: str, job: str, cancelled: bool) -> None:
        if cancelled:
            self._until_ok(lambda: self._call(client, src, "void", hold=hold, job=job,
                                              reason="job cancelled"))
            return
        self._until_ok(lambda: self._call(client, src, "bind", hold=hold, job=job,
                                          user="alice", account="physics"))
        time.sleep(RUNNING_S)
        self._epilog(src, job)  # charged now, or spooled and flushed later
        self._until_ok(lambda: self._call(client, src, "finish", hold=hold, job=job,
                                          nodes="n1"),
                       done=lambda a: a.ok and a.state in ("closed", "none"))

    def _until_ok(self, attempt, done=lambda a: a.ok) -> None:
        """Repeat a settlement step until it is answered OK, or the drain ends."""
        while True:
            a = attempt()
            if done(a) or self.drain.is_set():
                return
            time.sleep(SETTLE_PAUSE_S)

    def _call(self, client: Client, src: str, op: str, *, key: str | None = None,
              job: str | None = None, hold: str | None = None, **fields) -> Answer:
        t0 = time.time()
        wire = dict(fields)
        if key is not None:
            wire["key"] = key
        if hold is not None:
            wire["hold"] = hold
        if op in ("bind", "finish"):
            wire["job"] = job
        try:
            resp = client.call(op, **wire)
        except DaemonUnavailable as exc:
            return self.record.add(Answer(src, op, t0, time.time(), False, "no_answer",
                                          str(exc), hold, key, job))
        ok = resp.get("ok") == "1"
        return self.record.add(Answer(
            src, op, t0, time.time(), ok, "" if ok else resp.get("reason", "?"),
            resp.get("message", ""), resp.get("hold") or hold, key, job, resp.get("state")))

    # -- the node: its epilog and its spool ----------------------------------------------

    def _deliver(self, client: Client):
        return lambda rec: client.request("charge", record=rec.to_json())

    def _epilog(self, src: str, job: str) -> Answer:
        """The node's epilog: its record of the run into the spool, then to the daemon."""
        end = time.time()
        rec = NodeCharge(job_id=job, restart=0, node="n1", start=end - RAN_S, end=end,
                         user="alice", partition="gpu", owners=(job,), gpus=(0,),
                         gpu_types={0: "h100"}, usage=(GpuUse(index=0, held_ms=RAN_S * 1000),),
                         source="held", cluster=self.name)
        with Client(self.socket, timeout=2.0) as node:
            out = chargespool.submit(self.spool, rec, self._deliver(node))
        ok = out.state in ("charged", "already")
        return self.record.add(Answer(src, "charge", end, time.time(), ok,
                                      "" if ok else out.state, out.why, key=rec.key, job=job,
                                      state=out.state))

    def _flusher(self) -> None:
        """``gpuledger spool flush`` on a timer: spooled records, oldest first."""
        with Client(self.socket, timeout=2.0) as node:
            while not self.drain.is_set():
                report = chargespool.flush(self.spool, self._deliver(node))
                # "already": the epilog's own delivery got there first (a record is in the
                # spool from before it is sent), or the flusher's earlier answer was lost
                self.flushed.update(charged=report.delivered, already=report.already)
                time.sleep(FLUSH_EVERY_S)

    # -- job_submit.lua ------------------------------------------------------------------

    def _lua(self, lua, token: str) -> None:
        src = f"{self.name}/lua"
        while not self.stop.is_set():
            t0 = time.time()
            r = lua.submit(token=token, tres_per_node="gres:gpu:1", time_limit=10)
            comment = r.get("admin_comment", "")
            if r["rc"] == 0 and comment.startswith("gpuledger:hold="):
                hold = comment.split(";")[0].split("=", 1)[1]
                self.record.add(Answer(src, "reserve", t0, time.time(), True, hold=hold))
            else:
                self.record.add(Answer(src, "reserve", t0, time.time(), False, "refused",
                                       r.get("user", ""), job=str(r["rc"])))
            time.sleep(0.05)
