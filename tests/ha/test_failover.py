"""Database failover with nothing lost: the ledger on PostgreSQL under Patroni (3 members,
synchronous replication in strict mode, etcd, HAProxy on Patroni's ``/primary``), under a
steady load of submits and settlements from two clusters' daemons, while the primary is
killed (``kill -9`` of its PostgreSQL and its Patroni at once), then the etcd leader.

Asserted: every operation answered OK — reserve (the daemon's and job_submit.lua's),
void, bind, the node's charge, the close — is in the ledger exactly once afterwards (lost
and doubled both 0); every node charge the daemon could not take waited in the node's
spool and landed afterwards, once, and no spool is left with a record; no wallet below
zero; ``gpuledger verify`` passes; submits during the
gap fail closed with the ledger's reason (the daemon: ``unavailable``, "the ledger database
is unavailable …"; job_submit.lua: "the GPU ledger is unavailable (…); job refused"); no
answer was an internal error. Reported (``GPULEDGER_HA_REPORT``, default
``<tmp>/failover.json``): the outage window, the write gap around the etcd leader's death,
the commit latency synchronous replication adds (p50/p99, beside the standalone server,
one client, same run), latency under load, the counts.

Needs the lab (tests/ha/lab up; lab.json from ``GPULEDGER_HA_LAB``) and lua5.1 with
lua-socket; tests/lanes/patroni runs it. The lab is left degraded (one member and one etcd
member dead): ``tests/ha/lab up`` starts them again.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from commitlatency import RawCommits, interleaved, summary
from conftest import need
from halab import Lab, lab_path
from haload import JOB_SECONDS, Cluster, Record
from sqlalchemy import text
from test_daemon_lua import Lua, lua_available

from ledger import config, configfiles, migrate
from ledger.daemon.client import Client, DaemonUnavailable
from ledger.schema import set_keys
from ledger.service import Ledger
from ledger.views import HoldRequest
from slurm_plugin import chargespool

pytestmark = pytest.mark.timeout(900)

WARM_S = 10  # load before the primary is killed
AFTER_RECOVERY_S = 8  # load after writes are back, before the etcd leader is killed
AFTER_ETCD_S = 12  # load after the etcd leader is killed
RECOVERY_LIMIT_S = 150  # writes must be back within this after the kill
DRAIN_S = 90  # settlements of jobs started before the stop finish within this
SUBMITTERS, SETTLERS = 2, 3  # threads per cluster (besides job_submit.lua and the flusher)
LATENCY_BLOCKS, LATENCY_PER_BLOCK = 8, 25
GL = str(Path(sys.executable).with_name("gpuledger"))
CLEAR_DAEMON = re.compile(r"^the ledger database (is unavailable|is read-only|may or may not)")
CLEAR_LUA = "gpu-token: the GPU ledger is unavailable ("


@pytest.fixture(scope="module")
def lab():
    path = lab_path()
    need(path.is_file(), f"the Patroni lab ({path}: build it with tests/ha/lab up)")
    lab = Lab(path)
    ok, why = lab.healthy()
    need(ok, f"a healthy Patroni lab ({why}: tests/ha/lab up starts what died)")
    need(lua_available(), "lua5.1 with lua-socket (apt install lua5.1 lua-socket)")
    return lab


class Site:
    """One ledger database on the lab (``haproxy``: the Patroni cluster, or
    ``standalone``), its config files for two clusters, and a Ledger in this process."""

    def __init__(self, lab: Lab, where: str, root: Path, keys: Path):
        self.lab, self.where = lab, where
        self.db = f"gl_ha_{uuid.uuid4().hex[:10]}"
        lab.create_database(where, self.db)
        root.mkdir(parents=True)
        self.password_file = root / "db.password"
        self.password_file.write_text(lab.password + "\n")
        self.password_file.chmod(0o600)
        self.root, self.keys = root, keys
        self.configs: dict[str, Path] = {}
        self.ledger = self.open("site")
        migrate.upgrade(self.ledger.engine)
        self.ledger.bootstrap()

    def config(self, cluster: str) -> Path:
        if cluster not in self.configs:
            path = self.root / f"{cluster}.toml"
            text_ = configfiles.render(self.lab.url(self.where, self.db), cluster)
            path.write_text(set_keys(text_, {
                "database": {"password_file": str(self.password_file)},
                "keys": {"dir": str(self.keys)},
                "daemon": {"socket": str(self.root / f"{cluster}.sock"), "slurm_user": "root"},
                "hooks": {"log_file": "", "syslog": False}}))
            self.configs[cluster] = path
        return self.configs[cluster]

    def open(self, cluster: str) -> Ledger:
        return Ledger.from_config(config.load(self.config(cluster)))

    def close(self) -> None:
        self.ledger.engine.dispose()
        self.lab.drop_database(self.where, self.db)


def seed(site: Site, first: bool) -> None:
    lg = site.ledger
    if first:
        lg.generate_key("k1")
    else:
        from ledger import keys as keys_mod
        lg.add_key("k1", keys_mod.public_text(keys_mod.load_private(site.keys, "k1")))
    lg.create_account("physics")
    lg.set_rate("h100", 1_000_000)
    lg.set_rate("default", 1_000_000)


def daemon(site: Site, cluster: str, logs: Path) -> subprocess.Popen:
    cfg = site.config(cluster)
    sock = site.root / f"{cluster}.sock"
    log = open(logs / f"daemon-{cluster}.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([GL, "--config", str(cfg), "serve"], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.log = log
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"daemon {cluster} exited: {(logs / f'daemon-{cluster}.log').read_text()}")
        try:
            with Client(sock, timeout=2) as c:
                if c.call("ping").get("ok") == "1":
                    return proc
        except DaemonUnavailable:
            time.sleep(0.1)
    raise AssertionError(f"daemon {cluster} did not answer")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    proc.log.close()


def latency(lab: Lab, ha: Site, solo: Site) -> dict:
    """Commit latency, one client, Patroni (synchronous) beside the standalone server."""
    sides = {}
    raw = {"patroni": RawCommits(lab.conninfo("haproxy", ha.db)),
           "standalone": RawCommits(lab.conninfo("standalone", solo.db))}
    try:
        ms = interleaved(raw, LATENCY_BLOCKS, LATENCY_PER_BLOCK)
    finally:
        for r in raw.values():
            r.close()
    sides["insert_commit"] = {k: summary(v) for k, v in ms.items()}
    ops = {}
    for name, site in (("patroni", ha), ("standalone", solo)):
        token, _ = site.ledger.mint("physics", 10_000 * JOB_SECONDS)
        req = HoldRequest(gpus=1, seconds=JOB_SECONDS, gpu_type="h100", account="physics")
        counter = iter(range(10**9))
        ops[name] = (lambda lg=site.ledger, t=token, r=req, c=counter:
                     lg.reserve(t, r, key=f"lat-{next(c)}"))
    ms = interleaved(ops, LATENCY_BLOCKS, LATENCY_PER_BLOCK)
    sides["ledger_reserve"] = {k: summary(v) for k, v in ms.items()}
    for kind in sides.values():
        kind["added_p50_ms"] = round(kind["patroni"]["p50_ms"] - kind["standalone"]["p50_ms"], 3)
        kind["added_p99_ms"] = round(kind["patroni"]["p99_ms"] - kind["standalone"]["p99_ms"], 3)
    return sides


def first_ok_after(record: Record, cluster: str, t: float) -> float | None:
    """When the first submit sent after ``t`` was answered OK (a write, committed)."""
    times = [a.t1 for a in record.snapshot() if a.ok and a.op == "reserve"
             and a.source.startswith(cluster + "/") and a.t0 > t]
    return min(times) if times else None


def widest_gap(answers, start: float, end: float) -> float:
    """The longest time between two OK answers in [start, end] (s)."""
    times = sorted(a.t1 for a in answers if a.ok and start <= a.t1 <= end)
    return max((b - a for a, b in itertools.pairwise(times)), default=end - start)


def test_failover_loses_and_doubles_nothing(lab, tmp_path):
    out = Path(os.environ.get("GPULEDGER_HA_REPORT") or tmp_path / "failover.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent / "logs"  # the daemons' logs, beside the report
    logs.mkdir(exist_ok=True)
    keys = tmp_path / "keys"
    ha = Site(lab, "haproxy", tmp_path / "ha", keys)
    solo = Site(lab, "standalone", tmp_path / "solo", keys)
    procs: list[subprocess.Popen] = []
    luas: list[Lua] = []
    report: dict = {"lab": {k: lab.info[k] for k in ("ttl", "synchronous_mode_strict")}}
    try:
        seed(ha, first=True)
        seed(solo, first=False)
        report["commit_latency"] = latency(lab, ha, solo)

        lg = ha.ledger
        tight, tight_view = lg.mint("physics", 30 * JOB_SECONDS)  # both clusters spend it
        minted = {tight_view.id: 30 * JOB_SECONDS}
        record, halt, drain = Record(), threading.Event(), threading.Event()
        clusters = []
        for i, name in enumerate(("alpha", "beta")):
            procs.append(daemon(ha, name, logs))
            ample = [lg.mint("physics", 10_000 * JOB_SECONDS) for _ in range(SUBMITTERS - 1)]
            lua_token, lua_view = lg.mint("physics", 10_000 * JOB_SECONDS)
            minted.update({v.id: 10_000 * JOB_SECONDS for _, v in ample + [(0, lua_view)]})
            (tmp_path / name).mkdir()
            lua = Lua(tmp_path / name, socket=ha.root / f"{name}.sock", timeout=1.0,
                      cluster=name)
            luas.append(lua)
            spool = tmp_path / name / "spool"
            spool.mkdir(mode=0o700)
            c = Cluster(name, ha.root / f"{name}.sock", (i + 1) * 10_000_000, record, spool,
                        [tight] + [t for t, _ in ample], halt, drain)
            c.start(SUBMITTERS, SETTLERS, lua, lua_token)
            clusters.append(c)

        timeline: list[tuple[float, str | None, list[str]]] = []
        watching = threading.Event()

        def watch():
            while not watching.is_set():
                members = lab.cluster()
                timeline.append((time.time(),
                                 next((m["name"] for m in members if m.get("role") == "leader"),
                                      None),
                                 [m["name"] for m in members if m.get("role") == "sync_standby"]))
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(WARM_S)

        old = lab.leader()
        assert old is not None
        t_kill = lab.kill_member(old)
        recovered: dict[str, float] = {}
        while len(recovered) < len(clusters):
            assert time.time() - t_kill < RECOVERY_LIMIT_S, (
                f"no write answered OK within {RECOVERY_LIMIT_S} s of killing {old}")
            for c in clusters:
                t = first_ok_after(record, c.name, t_kill)
                if t is not None:
                    recovered.setdefault(c.name, t)
            time.sleep(0.2)
        time.sleep(AFTER_RECOVERY_S)

        etcd = lab.etcd_leader()
        t_etcd = lab.kill_etcd(etcd)
        time.sleep(AFTER_ETCD_S)
        t_stop = time.time()
        halt.set()
        drained = all(c.join(DRAIN_S) for c in clusters)
        drain.set()
        for c in clusters:
            c.join(15)
        watching.set()
        for lua in luas:
            lua.close()
        luas.clear()
        for p in procs:
            stop(p)
        procs.clear()

        answers = record.snapshot()
        report.update(run(lab, ha, answers, timeline, old, t_kill, recovered, etcd, t_etcd,
                          t_stop, minted))
        report["drained"] = drained
        report["counts"]["flusher_deliveries"] = dict(sum((c.flushed for c in clusters),
                                                          Counter()))
        report["counts"]["left_in_spools"] = sum(chargespool.backlog(c.spool) for c in clusters)
        report["counts"]["commits_replayed_after_unknown_outcome"] = sum(
            (logs / f"daemon-{c.name}.log").read_text().count("COMMIT outcome unknown")
            for c in clusters)
        verify = subprocess.run([GL, "--config", str(ha.config("alpha")), "verify"],
                                capture_output=True, text=True, timeout=300, check=False)
        report["verify"] = verify.stdout.strip().splitlines()[-3:]
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nfailover report: {out}\n" + json.dumps(report, indent=1))

        # -- what must hold --------------------------------------------------------------
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert drained, "settlements did not finish within the drain"
        counts = report["counts"]
        assert counts["lost"] == {}, counts["lost"]
        assert counts["doubled"] == {}, counts["doubled"]
        assert counts["overdrawn_wallets"] == 0
        assert counts["left_in_spools"] == 0, "node charges never landed"
        assert counts["internal_errors"] == 0, report["unclear_gap_answers"]
        gap = report["gap_submits"]
        assert gap["daemon_refused"] + gap["lua_refused"] > 0, "no submit fell in the gap"
        assert report["unclear_gap_answers"] == [], report["unclear_gap_answers"]
    finally:
        for lua in luas:
            lua.close()
        for p in procs:
            stop(p)
        ha.close()
        solo.close()


def run(lab, ha: Site, answers, timeline, old, t_kill, recovered, etcd, t_etcd, t_stop,
        minted) -> dict:
    """The database held against the answers; the figures."""
    lg = ha.ledger
    lg.seal_pending()
    with lg.engine.connect() as conn:
        def rows(sql: str):
            return conn.execute(text(sql)).all()

        holds = {r.id: r for r in rows("SELECT id, state, job_id FROM holds")}
        per_kind = Counter((r.kind, r.hold_id) for r in rows(
            "SELECT kind, hold_id FROM journal WHERE hold_id IS NOT NULL"))
        charges = Counter((r.job_id, r.restart, r.node) for r in rows(
            "SELECT job_id, restart, node FROM charges"))
        idem = {r.key: r.result for r in rows(
            "SELECT \"key\", result FROM idempotency WHERE op = 'reserve'")}
        overdrawn = conn.execute(text("SELECT count(*) FROM wallets WHERE balance < 0 "
                                      "AND NOT allow_negative")).scalar()
        token_balances = dict(rows("SELECT t.id, w.balance FROM tokens t "
                                   "JOIN wallets w ON w.id = t.wallet_id"))
    ok = [a for a in answers if a.ok]
    lost: dict[str, list] = {}
    doubled: dict[str, list] = {}

    def miss(kind, what):
        lost.setdefault(kind, []).append(what)

    for a in ok:
        h = holds.get(a.hold)
        if a.op == "reserve":
            if h is None:
                miss("reserve", a.hold)
            elif a.key is not None and _result(idem.get(a.key)).get("id") != a.hold:
                miss("reserve_key", a.key)
        elif a.op == "void" and (h is None or h.state != "voided"):
            miss("void", a.hold)
        elif a.op == "bind" and (h is None or h.job_id != a.job or per_kind[("bind", a.hold)] != 1):
            miss("bind", a.hold)
        elif a.op == "charge" and charges[(a.job, 0, "n1")] != 1:
            miss("charge", a.key)  # charged then, or spooled and flushed later: once
        elif a.op == "finish" and a.state == "closed" and (h is None or h.state != "posted"):
            miss("finish", a.hold)
    for (kind, hold), n in per_kind.items():
        limit = {"reserve": 1, "void": 1, "release": 1, "bind": 1, "link": 1, "charge": 1}
        if n > limit.get(kind, n):
            doubled.setdefault(kind, []).append(hold)
    for run_node, n in charges.items():
        if n > 1:
            doubled.setdefault("charge_run_node", []).append(run_node)
    spooled = [a for a in answers if a.op == "charge" and a.state == "spooled"]
    for a in spooled:  # each must have landed afterwards, once
        if charges[(a.job, 0, "n1")] != 1:
            miss("spooled_charge", a.key)

    answered = {a.hold for a in ok if a.op == "reserve"} | {
        _result(r).get("id") for k, r in idem.items() if k.startswith("lat-")}
    unanswered = [h for h in holds if h not in answered]
    in_gap = [a for a in answers if a.op == "reserve" and t_kill <= a.t0 <= max(recovered.values())]
    refused = [a for a in in_gap if not a.ok]
    unclear = [{"source": a.source, "reason": a.reason, "message": a.message[:200]}
               for a in refused
               if not (a.source.endswith("/lua") and a.message.startswith(CLEAR_LUA))
               and not (a.reason == "unavailable" and CLEAR_DAEMON.match(a.message))
               and a.reason != "no_answer"
               and a.reason not in ("insufficient", "exhausted")]
    promoted = next(((t - t_kill, leader) for t, leader, _ in timeline
                     if t > t_kill and leader not in (None, old)), (None, None))
    before = [a for a in ok if a.op == "reserve" and a.t1 < t_kill and not a.source.endswith("/lua")]
    last_ok = max((a.t1 for a in ok if a.op == "reserve" and a.t1 < t_kill), default=t_kill)
    return {
        "killed": {"member": old, "at": t_kill, "etcd_leader": etcd,
                   "etcd_at_s_after_member": round(t_etcd - t_kill, 1)},
        "outage": {
            "new_leader": promoted[1],
            "promoted_after_s": None if promoted[0] is None else round(promoted[0], 1),
            "first_ok_after_kill_s": {c: round(t - t_kill, 2) for c, t in recovered.items()},
            "window_s (last OK before kill to first OK after)": {
                c: round(t - last_ok, 2) for c, t in recovered.items()},
            "widest_ok_gap_around_etcd_kill_s": round(
                widest_gap(answers, t_etcd - 1, min(t_stop, t_etcd + AFTER_ETCD_S)), 2),
        },
        "load_reserve_latency_before_kill": summary([a.ms for a in before]) if before else None,
        "gap_submits": {
            "daemon_refused": sum(1 for a in refused if not a.source.endswith("/lua")),
            "lua_refused": sum(1 for a in refused if a.source.endswith("/lua")),
            "ok": sum(1 for a in in_gap if a.ok),
            "reasons": dict(Counter(a.reason for a in refused)),
            "examples": sorted({a.message[:160] for a in refused})[:6],
        },
        "unclear_gap_answers": unclear[:20],
        "counts": {
            "answers": dict(Counter(f"{a.op}:{'ok' if a.ok else a.reason}" for a in answers)),
            "lost": lost, "doubled": doubled,
            "present_never_answered_ok": len(unanswered),
            "charges_spooled_by_the_epilog": len(spooled),
            "overdrawn_wallets": overdrawn,
            "internal_errors": sum(1 for a in answers if a.reason == "internal"),
            "tokens_below_zero": sum(1 for t in minted if token_balances.get(t, 0) < 0),
        },
    }


def _result(value) -> dict:
    """An idempotency record's result (JSON: a dict from the driver, or its text)."""
    if isinstance(value, str):
        return json.loads(value)
    return value or {}
