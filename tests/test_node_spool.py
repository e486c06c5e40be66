"""The nodes' one door: a node's record priced by the ledger through the daemon, kept in a
durable spool while the daemon is away, delivered exactly once — under kill -9 of the
epilog and of the daemon."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_settle_logic import DirectClient

from ledger.daemon.client import DaemonUnavailable
from ledger.errors import InvalidInput
from ledger.nodecharge import GpuUse, NodeCharge
from ledger.views import HoldRequest
from slurm_plugin import chargespool

REPO = Path(__file__).resolve().parents[1]
GL = str(Path(sys.executable).parent / "gpuledger")


def bound_hold(ledger, job="500", gpus=40, seconds=600):
    token, _ = ledger.mint("physics", 400_000)
    hold = ledger.reserve(token, HoldRequest(gpus=gpus, seconds=seconds, gpu_type="h100",
                                             user="alice"))
    ledger.bind(hold.id, job, user="alice", account="physics")
    ledger.link_job(hold.id, job, 0, user="alice", account="physics")
    return hold


def node_rec(job="500", node="n1", held_s=100, busy_s=None, **kw) -> NodeCharge:
    usage = GpuUse(index=0, held_ms=held_s * 1000, busy_ms=(busy_s or 0) * 1000,
                   measured=busy_s is not None)
    return NodeCharge(job_id=job, restart=0, node=node, start=1000.0, end=1000.0 + held_s,
                      user="alice", owners=(job,), gpus=(0,), gpu_types={0: "h100"},
                      usage=(usage,), source="agent" if busy_s is not None else "held", **kw)


def charges_by_key(ledger, hold_id) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in ledger.charges(hold_id):
        assert c["key"] not in out, f"charged twice under {c['key']}"
        out[c["key"]] = c["amount"]
    return out


# -- the record: hostile input ------------------------------------------------------------

def test_a_record_round_trips_and_names_its_run():
    rec = node_rec(cluster="alpha")
    assert NodeCharge.from_json(rec.to_json()) == rec
    assert rec.key == "alpha.500.0.n1"
    assert node_rec(sluid="s00000000000AB").key == "-.s00000000000AB.n1"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(v=2), "version"),
    (lambda d: d.update(extra=1), "unknown fields"),
    (lambda d: d.update(job_id="5;rm -rf"), "job_id"),
    (lambda d: d.update(node="../etc"), "node"),
    (lambda d: d.update(start=float("nan")), "start"),
    (lambda d: d.update(end=10.0), "ends before"),
    (lambda d: d.update(restart=-1), "restart"),
    (lambda d: d.update(restart=True), "restart"),
    (lambda d: d.update(owners=["1"] * 9), "owners"),
    (lambda d: d.update(gpus=list(range(100))), "gpus"),
    (lambda d: d["usage"][0].update(busy_ms=-5), "busy_ms"),
    (lambda d: d["usage"][0].update(held_ms=10 ** 20), "held_ms"),
    (lambda d: d["usage"][0].update(measured="yes"), "measured"),
    (lambda d: d["usage"][0].update(uuid="\x1b[2J"), "uuid"),
    (lambda d: d["usage"].append(dict(d["usage"][0])), "twice"),
    (lambda d: d.update(gpu_types={"0": "h100;x"}), "GPU type"),
    (lambda d: d.update(gpu_shards={"x": 4}), "index"),
    (lambda d: d.update(source="trust-me"), "source"),
    (lambda d: d.update(sluid="not a sluid"), "sluid"),
])
def test_a_malformed_or_hostile_record_is_refused_by_name(change, message):
    d = json.loads(node_rec().to_json())
    change(d)
    with pytest.raises(InvalidInput, match=message):
        NodeCharge.from_dict(d)
    with pytest.raises(InvalidInput):
        NodeCharge.from_json(b"\xff{not json")


# -- the daemon's charge op -----------------------------------------------------------------

def test_the_daemon_prices_a_node_record_once(ledger):
    hold = bound_hold(ledger)
    client = DirectClient(ledger)
    first = client.request("charge", record=node_rec().to_json())
    assert first["charged"] == 1 and first["hold"] == hold.id and first["amount"] == 100
    again = client.request("charge", record=node_rec().to_json())
    assert again["charged"] == 0 and "already charged" in again["note"]
    assert charges_by_key(ledger, hold.id) == {f"{hold.id}:500:0:n1": 100}
    # the ledger applies its own policy: the node sends figures, never an amount
    other = client.request("charge", record=node_rec(node="n2", busy_s=10).to_json())
    assert other["amount"] == 100  # "allocated" (the daemon's policy): held time, not busy


def test_a_record_for_another_users_job_charges_nothing(ledger):
    hold = bound_hold(ledger)
    out = DirectClient(ledger).request(
        "charge", record=NodeCharge(**{**node_rec().__dict__, "user": "mallory"}).to_json())
    assert out["charged"] == 0 and out["note"].startswith("REFUSED")
    assert ledger.charges(hold.id) == []


def test_only_root_and_slurm_may_send_charges(sqlite_ledger):
    from ledger.daemon.auth import Peer, Policy
    from ledger.daemon.handlers import Handlers

    bound_hold(sqlite_ledger)
    h = Handlers(sqlite_ledger, Policy("slurm"), accounts=lambda u: frozenset())
    out = h.handle(Peer(1, 1000, 1000, "alice", False),
                   {"op": "charge", "record": node_rec().to_json()})
    assert out["ok"] == 0 and out["reason"] == "forbidden"


# -- the spool --------------------------------------------------------------------------------

def down(_rec):
    raise DaemonUnavailable("cannot reach the gpuledger daemon at /nowhere")


def test_daemon_away_the_record_waits_durably_and_lands_once(sqlite_ledger, tmp_path):
    hold = bound_hold(sqlite_ledger)
    spool = tmp_path / "spool"
    out = chargespool.submit(spool, node_rec(), down)
    assert out.state == "spooled" and "cannot reach" in out.why
    assert chargespool.pending(spool) == ["-.500.0.n1.charge.json"]
    assert (spool.stat().st_mode & 0o777) == 0o700
    assert sqlite_ledger.charges(hold.id) == []
    client = DirectClient(sqlite_ledger)
    deliver = lambda rec: client.request("charge", record=rec.to_json())
    r = chargespool.flush(spool, deliver)
    assert (r.delivered, r.already, r.rejected, r.left) == (1, 0, 0, 0)
    assert chargespool.pending(spool) == []
    assert chargespool.flush(spool, deliver).delivered == 0
    assert charges_by_key(sqlite_ledger, hold.id) == {f"{hold.id}:500:0:n1": 100}


def test_a_lost_answer_is_redelivered_and_charges_nothing_more(sqlite_ledger, tmp_path):
    hold = bound_hold(sqlite_ledger)
    client = DirectClient(sqlite_ledger)

    def commits_then_drops(rec):
        client.request("charge", record=rec.to_json())
        raise DaemonUnavailable("the gpuledger daemon closed the connection")

    spool = tmp_path / "spool"
    assert chargespool.submit(spool, node_rec(), commits_then_drops).state == "spooled"
    r = chargespool.flush(spool, lambda rec: client.request("charge", record=rec.to_json()))
    assert (r.delivered, r.already) == (0, 1)
    assert charges_by_key(sqlite_ledger, hold.id) == {f"{hold.id}:500:0:n1": 100}


def test_flush_stops_at_the_first_record_the_daemon_cannot_take(sqlite_ledger, tmp_path):
    spool = tmp_path / "spool"
    for n in ("n1", "n2", "n3"):
        chargespool.submit(spool, node_rec(node=n), down)
    r = chargespool.flush(spool, down)
    assert (r.delivered, r.left) == (0, 3) and "cannot reach" in r.why
    assert len(chargespool.pending(spool)) == 3


def test_unreadable_forged_or_misnamed_spool_files_are_set_aside(sqlite_ledger, tmp_path):
    hold = bound_hold(sqlite_ledger)
    spool = tmp_path / "spool"
    chargespool.submit(spool, node_rec(), down)
    (spool / "junk.charge.json").write_bytes(b"\x00garbage")
    # a valid record under another run's name: it must not be charged as that run
    (spool / "-.999.0.n9.charge.json").write_text(node_rec(node="n2").to_json())
    os.symlink("/etc/shadow", spool / "link.charge.json")
    client = DirectClient(sqlite_ledger)
    r = chargespool.flush(spool, lambda rec: client.request("charge", record=rec.to_json()))
    assert (r.delivered, r.rejected) == (1, 3)
    assert sorted(os.listdir(spool / "rejected")) == sorted(
        ["junk.charge.json", "-.999.0.n9.charge.json", "link.charge.json"])
    assert charges_by_key(sqlite_ledger, hold.id) == {f"{hold.id}:500:0:n1": 100}


def test_a_record_the_daemon_calls_malformed_is_kept_aside_not_retried(tmp_path):
    from ledger.daemon.client import DaemonError

    def rejects(_rec):
        raise DaemonError("invalid", "node charge record: node is not a valid name")

    spool = tmp_path / "spool"
    out = chargespool.submit(spool, node_rec(), rejects)
    assert out.state == "rejected"
    assert chargespool.pending(spool) == []
    assert chargespool.pending(spool / "rejected") == ["-.500.0.n1.charge.json"]


# -- kill -9: real epilog-side processes and a real daemon ------------------------------------

CHILD = r"""
import sys
from ledger.daemon.client import Client
from ledger.nodecharge import NodeCharge
from slurm_plugin import chargespool
spool, sock, raw = sys.argv[1], sys.argv[2], sys.argv[3]
rec = NodeCharge.from_json(raw)
chargespool.put(__import__("pathlib").Path(spool), rec, durable=False)
sys.stdout.write("P\n"); sys.stdout.flush()
with Client(sock, timeout=5) as c:
    out = chargespool.submit(__import__("pathlib").Path(spool), rec,
                             lambda r: c.request("charge", record=r.to_json()))
sys.stdout.write(out.state + "\n")
"""


def _serve(cfg: Path, sock: Path, log: Path) -> subprocess.Popen:
    if sock.exists():
        sock.unlink()
    proc = subprocess.Popen([GL, "--config", str(cfg), "serve"], stdout=subprocess.DEVNULL,
                            stderr=open(log, "a"))
    for _ in range(200):
        if sock.exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"daemon did not start: {log.read_text()[-2000:]}")


def test_kill_9_of_epilogs_and_of_the_daemon_loses_and_doubles_no_charge(tmp_path, clock):
    from conftest import seeded

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = seeded(url, tmp_path / "keys")
    hold = bound_hold(ledger, gpus=60)
    sock, spool = tmp_path / "gl.sock", tmp_path / "spool"
    cfg = tmp_path / "gpuledger.toml"
    cfg.write_text(f'[database]\nurl = "{url}"\n[keys]\ndir = "{tmp_path / "keys"}"\n'
                   f'[daemon]\nsocket = "{sock}"\nslurm_user = "root"\n'
                   f'[hooks]\nspool_dir = "{spool}"\nlog_file = ""\nsyslog = false\n')
    log = tmp_path / "serve.log"
    daemon = _serve(cfg, sock, log)
    rng = random.Random(7)
    nodes = [f"n{i}" for i in range(48)]
    killed = outcomes = 0
    try:
        for i, node in enumerate(nodes):
            if i in (16, 32):  # the daemon dies mid-way, with whatever it was doing
                daemon.send_signal(signal.SIGKILL)
                daemon.wait()
            if i in (20, 36):
                daemon = _serve(cfg, sock, log)
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(spool), str(sock),
                                      node_rec(node=node).to_json()], cwd=REPO,
                                     stdout=subprocess.PIPE, text=True)
            assert child.stdout.readline() == "P\n"  # spooled: from here a kill loses nothing
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.02))
                child.send_signal(signal.SIGKILL)
                killed += 1
            else:
                outcomes += child.stdout.readline().strip() in ("charged", "spooled")
            child.wait()
        assert killed > 10 and outcomes > 10
        left = len(chargespool.pending(spool))
        flushed = subprocess.run([GL, "--config", str(cfg), "spool", "flush", "--json"],
                                 capture_output=True, text=True, timeout=120)
        assert flushed.returncode == 0, flushed.stderr
        report = json.loads(flushed.stdout)
        assert report["delivered"] + report["already"] == left and report["left"] == 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(10)
    assert chargespool.pending(spool) == []
    got = charges_by_key(ledger, hold.id)
    assert got == {f"{hold.id}:500:0:{n}": 100 for n in nodes}
    assert ledger.verify_journal().ok
