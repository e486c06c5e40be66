"""The daemon's metrics endpoint, read with Prometheus' own text parser after real
operations over the socket: submit decisions, latency, settlements, charges, escrow, the
journal head, the last verify, the spool; /livez and /readyz; its bounds."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemon_helpers import LiveDaemon
from prometheus_client.parser import text_string_to_metric_families

from ledger import db, settlement
from ledger.daemon import endpoint as ep
from ledger.daemon.client import Client
from ledger.daemon.dbmetrics import LedgerFigures
from ledger.daemon.endpoint import Endpoint, Exposition
from ledger.service import Ledger


def free_listener() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple, float]:
    """(sample name, frozenset of labels) -> value, from Prometheus' own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: dict, name: str, **labels) -> float:
    return got[(name, frozenset(labels.items()))]


class Served:
    """A daemon on a temporary socket and its metrics endpoint on a free loopback port."""

    def __init__(self, ledger, *, spool=None, per_account=False, cache_s=0.0, fast=None):
        if fast is not None:
            fast.start()
        self.daemon = LiveDaemon(ledger, fast=fast).start()
        self.fast = fast
        figures = LedgerFigures(ledger, spool=spool, per_account=per_account)
        self.exposition = Exposition(figures, self.daemon.server.instruments, "main",
                                     cache_s=cache_s)
        self.endpoint = Endpoint(self.exposition, free_listener()).start()
        self.port = self.endpoint.address[1]

    def scrape(self) -> dict:
        code, text = get(self.port, "/metrics")
        assert code == 200, text
        return samples(text)

    def close(self):
        self.endpoint.stop()
        if self.fast is not None:
            self.fast.stop()
        self.daemon.close()


def reserve(c: Client, token: str, key: str, gpus: int = 2, **kw) -> dict:
    return c.call("reserve", token=token, gpus=gpus, type="h100", seconds=3600, user="alice",
                  account="physics", key=key, **kw)


def test_metrics_after_real_operations(ledger, clock, tmp_path):
    """Every database it runs on: the figures are what the operations made them."""
    token = ledger.mint("physics", 10 * 3600)[0]
    spool = tmp_path / "spool"
    spool.mkdir()
    for name in ("a.charge.json", "b.charge.json", ".c.charge.json.123", "d.tmp"):
        (spool / name).write_text("{}")
    (spool / "rejected").mkdir()
    (spool / "rejected" / "e.charge.json").write_text("{}")
    s = Served(ledger, spool=str(spool))
    try:
        with Client(s.daemon.path) as c:
            first = reserve(c, token, "k1", partition="gpu", qos="normal", cluster="hpc1")
            second = reserve(c, token, "k2", gpus=1)
            assert first["ok"] == second["ok"] == "1"
            assert reserve(c, token, "k3", gpus=500)["reason"] == "insufficient"
            assert reserve(c, "glt1.garbage", "k4")["reason"] == "malformed"
            assert c.call("nosuch")["reason"] == "bad_request"
            assert c.call("ping")["ok"] == "1"
        settlement.post_node(ledger, first["hold"], "101", 0, "n1", 1800, {"source": "held"})
        settlement.close(ledger, first["hold"], "done")
        ledger.void(second["hold"], reason="cancelled")
        third = ledger.reserve(token, ledger_request(gpus=1, seconds=600))
        result = ledger.verify_journal()
        assert result.ok
        got = s.scrape()
    finally:
        s.close()

    assert value(got, "gpuledger_submit_decisions_total", reason="accepted", process="main") == 2
    assert value(got, "gpuledger_submit_decisions_total", reason="insufficient",
                 process="main") == 1
    assert value(got, "gpuledger_submit_decisions_total", reason="malformed", process="main") == 1
    assert value(got, "gpuledger_request_duration_seconds_count", op="reserve",
                 process="main") == 4
    assert value(got, "gpuledger_request_duration_seconds_count", op="other", process="main") == 1
    assert value(got, "gpuledger_request_duration_seconds_bucket", op="ping", process="main",
                 le="+Inf") == 1
    assert value(got, "gpuledger_settlements_total", outcome="posted") == 1
    assert value(got, "gpuledger_settlements_total", outcome="voided") == 1
    assert value(got, "gpuledger_holds_pending") == 1
    assert value(got, "gpuledger_charged_gpu_seconds_total", cluster="hpc1", partition="gpu",
                 gpu_type="h100", tier="normal") == 1800
    assert value(got, "gpuledger_charges_total", cluster="hpc1", partition="gpu",
                 gpu_type="h100", tier="normal") == 1
    assert value(got, "gpuledger_escrow_held_gpu_seconds") == third.amount == 600
    assert value(got, "gpuledger_usage_gpu_seconds") == 1800
    head_seq = ledger.head()[0]
    assert value(got, "gpuledger_journal_head_sequence") == head_seq == result.head_seq
    assert value(got, "gpuledger_journal_head_timestamp_seconds") == clock.now.timestamp()
    assert value(got, "gpuledger_journal_unchained_rows") == 0
    assert value(got, "gpuledger_verify_last_success") == 1
    assert value(got, "gpuledger_verify_last_head_sequence") == result.head_seq
    assert time.time() - value(got, "gpuledger_verify_last_timestamp_seconds") < 60
    assert value(got, "gpuledger_spool_backlog_records") == 2  # not temporaries, not rejected/
    assert value(got, "gpuledger_database_up") == 1
    assert value(got, "gpuledger_process_up", process="main") == 1
    # nothing per user, and per account only when asked
    assert not any(dict(labels).keys() & {"user", "account"} for _name, labels in got)


def ledger_request(**kw):
    from ledger.views import HoldRequest

    return HoldRequest(**{"gpus": 1, "seconds": 60, "gpu_type": "h100", "account": "physics",
                          "user": "alice", **kw})


def test_per_account_figures_only_when_asked(sqlite_ledger):
    token = sqlite_ledger.mint("physics", 10 * 3600)[0]
    sqlite_ledger.mint("chemistry", 3600)
    hold = sqlite_ledger.reserve(token, ledger_request(gpus=2, seconds=600))
    settlement.post_node(sqlite_ledger, hold.id, "5", 0, "n1", 300, {"source": "held"})
    s = Served(sqlite_ledger, per_account=True)
    try:
        got = s.scrape()
    finally:
        s.close()
    assert value(got, "gpuledger_account_escrow_held_gpu_seconds", account="physics") == 900
    assert value(got, "gpuledger_account_tokens_balance_gpu_seconds",
                 account="physics") == 10 * 3600 - 1200
    assert value(got, "gpuledger_account_tokens_balance_gpu_seconds", account="chemistry") == 3600
    assert value(got, "gpuledger_account_charged_gpu_seconds_total", account="physics") == 300
    assert not any("user" in dict(labels) for _name, labels in got)


def test_readyz_fails_and_metrics_say_so_when_the_database_is_unreachable(sqlite_ledger):
    broken = Ledger(db.make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none"))
    instruments = LiveDaemon(sqlite_ledger).start()
    try:
        exposition = Exposition(LedgerFigures(broken), instruments.server.instruments, "main")
        endpoint = Endpoint(exposition, free_listener()).start()
        port = endpoint.address[1]
        try:
            code, text = get(port, "/readyz")
            assert code == 503 and text.startswith("not ready: database:"), text
            assert get(port, "/livez") == (200, "ok\n")
            code, text = get(port, "/metrics")
            assert code == 200
            got = samples(text)
            assert value(got, "gpuledger_database_up") == 0
            assert ("gpuledger_holds_pending", frozenset()) not in got
            assert get(port, "/nothing")[0] == 404
        finally:
            endpoint.stop()
    finally:
        instruments.close()
        broken.engine.dispose()
    good = Served(sqlite_ledger)
    try:
        assert get(good.port, "/readyz") == (200, "ok\n")
    finally:
        good.close()


def test_the_endpoint_is_bounded_clients_deadline_and_database_reads(sqlite_ledger, monkeypatch):
    monkeypatch.setattr(ep, "DEADLINE", 0.5)
    s = Served(sqlite_ledger, cache_s=60)
    reads = []
    real = s.exposition.figures.database
    monkeypatch.setattr(s.exposition.figures, "database", lambda: reads.append(1) or real())
    idle = []
    try:
        for _ in range(ep.MAX_CLIENTS):  # clients that connect and say nothing
            idle.append(socket.create_connection(("127.0.0.1", s.port)))
        time.sleep(0.1)
        code, text = get(s.port, "/metrics", timeout=2)
        assert (code, text) == (503, "busy\n")
        for conn in idle:  # each is cut at its deadline
            conn.settimeout(3)
            assert conn.recv(100) == b""
        start = time.monotonic()
        first = s.scrape()
        second = s.scrape()
        assert time.monotonic() - start < 5
        assert reads == [1]  # the second scrape got the cached text
        assert value(first, "gpuledger_database_up") == value(second, "gpuledger_database_up")
        with socket.create_connection(("127.0.0.1", s.port)) as conn:
            conn.sendall(b"POST /metrics HTTP/1.0\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.0 405")
    finally:
        for conn in idle:
            conn.close()
        s.close()


def test_fast_path_counters(sqlite_ledger):
    from ledger.daemon.fastpath import FastReserve

    token = sqlite_ledger.mint("physics", 10 * 3600)[0]
    s = Served(sqlite_ledger, fast=FastReserve(sqlite_ledger))
    try:
        with Client(s.daemon.path) as c:
            for i in range(4):
                assert reserve(c, token, f"f{i}")["ok"] == "1"
        s.fast.flush()
        got = s.scrape()
    finally:
        s.close()
    assert value(got, "gpuledger_submit_decisions_total", reason="accepted", process="main") == 4
    answered = value(got, "gpuledger_fast_reserve_answered_holds_total", process="main")
    assert answered == value(got, "gpuledger_fast_reserve_written_holds_total", process="main")
    assert value(got, "gpuledger_fast_reserve_lost_holds_total", process="main") == 0
    assert value(got, "gpuledger_holds_pending") == 4


def test_two_processes_each_count_their_own_and_one_endpoint_shows_both(sqlite_ledger, tmp_path):
    """`gpuledger serve` with a privileged socket: the users' process serves the endpoint
    and fetches the privileged process's counters; each series has its process label."""
    token = sqlite_ledger.mint("physics", 10 * 3600)[0]
    run = Path(tempfile.mkdtemp(prefix="gl-m-"))
    os.chmod(run, 0o755)
    port = free_listener()
    number = port.getsockname()[1]
    port.close()
    cfg = tmp_path / "gpuledger.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "ledger.db"}"\n'
                   f'[keys]\ndir = "{sqlite_ledger.keys_dir}"\n'
                   f'[daemon]\nsocket = "{run / "gl.sock"}"\n'
                   f'privileged_socket = "{run / "glp.sock"}"\n'
                   f'[metrics]\nlisten = "127.0.0.1:{number}"\ncache_s = 0\n')
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", "from ledger.cli import main; main()",
                                 "--config", str(cfg), "serve"], stderr=err)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if get(number, "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        with Client(run / "glp.sock") as c:
            assert reserve(c, token, "p1")["ok"] == "1"
            assert reserve(c, token, "p2", gpus=900)["reason"] == "insufficient"
        with Client(run / "gl.sock") as c:
            assert c.call("ping")["ok"] == "1"
            assert c.call("quote", gpus=1, seconds=60, type="h100")["ok"] == "1"
        got = samples(get(number, "/metrics")[1])
        assert value(got, "gpuledger_submit_decisions_total", reason="accepted",
                     process="privileged") == 1
        assert value(got, "gpuledger_submit_decisions_total", reason="insufficient",
                     process="privileged") == 1
        assert value(got, "gpuledger_request_duration_seconds_count", op="quote",
                     process="users") == 1
        assert ("gpuledger_request_duration_seconds_count",
                frozenset({"op": "quote", "process": "privileged"}.items())) not in got
        assert value(got, "gpuledger_process_up", process="privileged") == 1
        assert value(got, "gpuledger_process_up", process="users") == 1
        assert value(got, "gpuledger_holds_pending") == 1
        assert get(number, "/livez") == (200, "ok\n")
        proc.terminate()
        proc.wait(15)
        lines = log.read_text().splitlines()
        assert lines[-1].split(" ", 1)[1].startswith(f"event=stopped pid={proc.pid}")
        assert all(line.startswith("ts=20") for line in lines if "=" in line.split(" ")[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(run, ignore_errors=True)


def test_metrics_op_is_for_root_and_the_slurm_user_only(sqlite_ledger):
    from ledger.daemon.auth import Peer, Policy
    from ledger.daemon.handlers import Handlers
    from ledger.daemon.instruments import Instruments

    h = Handlers(sqlite_ledger, Policy("slurm"), instruments=Instruments())
    alice = Peer(5, 1001, 1001, "alice", False)
    root = Peer(6, 0, 0, "root", True)
    assert h.handle(alice, {"op": "metrics"})["reason"] == "forbidden"
    assert h.handle(root, {"op": "metrics"})["ok"] == 1


@pytest.mark.parametrize("listen, says", [
    ("9847", "must be HOST:PORT"), ("127.0.0.1:0", "must be HOST:PORT with a port from 1 to"),
    (":9847", "must name the address"), ("127.0.0.1:99999", "must be HOST:PORT with a port")])
def test_a_bad_listen_address_is_a_named_config_error(tmp_path, listen, says):
    from ledger import config
    from ledger.errors import ConfigError

    path = tmp_path / "gpuledger.toml"
    path.write_text(f'[database]\nurl = "sqlite:///x.db"\n[metrics]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError, match=rf"\[metrics\]: listen {says}"):
        config.load(path)


def test_a_taken_port_is_logged_and_the_daemon_serves_on(tmp_path):
    from types import SimpleNamespace

    taken = free_listener()
    events = []
    log = SimpleNamespace(event=lambda **kw: events.append(kw))
    cfg = SimpleNamespace(metrics=SimpleNamespace(listen=f"127.0.0.1:{taken.getsockname()[1]}"))
    try:
        assert ep.bind_or_log(cfg, log) is None
    finally:
        taken.close()
    assert events[0]["event"] == "metrics_failed" and "cannot listen there" in events[0]["error"]
    assert ep.bind_or_log(SimpleNamespace(metrics=SimpleNamespace(listen="")), log) is None
