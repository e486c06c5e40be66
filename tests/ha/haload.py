"""The failover test's load: what two clusters' controllers and nodes ask of the ledger,
each answer recorded with its time.

Per cluster (one ``gpuledger serve`` each, standing in for its slurmctld host):

* client threads speak the daemon's protocol as job_submit.lua and the controller hooks
  do: ``reserve`` (with a key, as the Lua sends one), then the job's settlement — a third
  of the jobs are cancelled (``void``), the others run: ``bind`` (PrologSlurmctld), a
  charge of their node posted straight to the ledger as the node's epilog does (``post``
  under the node's charge key), and ``finish`` (EpilogSlurmctld closes the hold).
  Settlement steps are repeated until they are answered OK, as the hooks and the
  reconciler repeat them; submits are not (a refused job is refused).
* one job_submit.lua process (the real script under lua5.1, as slurmctld runs it) submits
  GPU jobs through the same daemon: its answers show what a user sees during the gap.

Every request and its answer is an :class:`Answer`; the test holds the database against
the answers that said OK.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ledger.daemon.client import Client, DaemonUnavailable
from ledger.errors import LedgerError
from ledger.settlement import charge_key

SETTLE_PAUSE_S = 0.2
JOB_SECONDS = 600
CHARGE = 300  # GPU-s each run charges for its one node


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
    """One cluster's controller side: its daemon socket and its load."""

    def __init__(self, name: str, socket: Path, job_base: int, record: Record,
                 epilog_ledger, tokens: list[str], stop: threading.Event,
                 drain: threading.Event):
        self.name, self.socket, self.job_base = name, socket, job_base
        self.record, self.epilog = record, epilog_ledger
        self.tokens, self.stop, self.drain = tokens, stop, drain
        self.threads: list[threading.Thread] = []

    def start(self, clients: int, lua=None, lua_token: str | None = None) -> None:
        for i in range(clients):
            t = threading.Thread(target=self._client, args=(i, self.tokens[i % len(self.tokens)]),
                                 name=f"{self.name}-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        if lua is not None:
            t = threading.Thread(target=self._lua, args=(lua, lua_token),
                                 name=f"{self.name}-lua", daemon=True)
            t.start()
            self.threads.append(t)

    def join(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    # -- one client thread -------------------------------------------------------------

    def _client(self, i: int, token: str) -> None:
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
            if not a.ok:
                time.sleep(0.05)
                continue
            self._settle(client, src, a.hold, job, cancelled=n % 3 == 0)
        client.close()

    def _settle(self, client: Client, src: str, hold: str, job: str, cancelled: bool) -> None:
        if cancelled:
            self._until_ok(lambda: self._call(client, src, "void", hold=hold, job=job,
                                              reason="job cancelled"))
            return
        self._until_ok(lambda: self._call(client, src, "bind", hold=hold, job=job,
                                          user="alice", account="physics"))
        self._until_ok(lambda: self._post(src, hold, job))
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

    def _post(self, src: str, hold: str, job: str) -> Answer:
        """The node's epilog: one charge under the node's key, straight to the ledger."""
        key = charge_key(hold, job, 0, "n1")
        t0 = time.time()
        try:
            self.epilog.post(hold, CHARGE, key=key, final=False, cap=True, job_id=job,
                             node="n1", restart=0)
        except LedgerError as exc:
            return self.record.add(Answer(src, "post", t0, time.time(), False,
                                          type(exc).__name__, str(exc), hold, key, job))
        return self.record.add(Answer(src, "post", t0, time.time(), True, hold=hold, key=key,
                                      job=job))

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
