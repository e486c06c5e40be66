"""The daemon on a live Unix socket: peer credentials, limits, restarts, fuzzing."""

from __future__ import annotations

import json
import pwd
import socket
import time
from pathlib import Path

import pytest
from conftest import need
from daemon_helpers import LiveDaemon, as_user, cli_as
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.daemon.client import Client
from ledger.daemon.protocol import decode

HAVE_USERS = all(_u in {p.pw_name for p in pwd.getpwall()} for _u in ("alice", "bob"))
MEMBERS = {"alice": frozenset({"physics"}), "bob": frozenset({"chemistry"})}


@pytest.fixture
def daemon(sqlite_ledger):
    d = LiveDaemon(sqlite_ledger, accounts=lambda u: MEMBERS.get(u, frozenset())).start()
    yield d
    d.close()


@pytest.fixture
def token(sqlite_ledger):
    return sqlite_ledger.mint("physics", 10 * 3600)[0]


def reserve_fields(token, key="k1", **kw):
    return {"token": token, "gpus": 2, "type": "h100", "seconds": 3600, "user": "alice",
            "account": "physics", "key": key, **kw}


def test_ping_hello_and_reserve_over_socket(daemon, token, sqlite_ledger):
    with Client(daemon.path) as c:
        assert c.call("ping") == {"ok": "1"}
        hello = c.call("hello")
        assert hello["user"] == "root" and hello["privileged"] == "1"
        resp = c.call("reserve", **reserve_fields(token))
    assert resp["ok"] == "1" and resp["amount"] == "7200"
    assert sqlite_ledger.hold(resp["hold"]).amount == 7200
    for _ in range(100):  # the log line is written just after the reply
        log = daemon.log.getvalue()
        if "op=reserve" in log:
            break
        time.sleep(0.01)
    assert "op=reserve peer=root" in log and f"hold={resp['hold']}" in log and " us=" in log
    assert token not in log  # the token itself is never logged


def test_socket_is_reachable_by_everyone_and_creds_decide(daemon):
    assert daemon.path.stat().st_mode & 0o777 == 0o666


def test_peer_credentials_of_an_ordinary_user(daemon, token):
    need(HAVE_USERS, "local users alice and bob (tests/cluster/up creates them)")
    def as_alice():
        with Client(daemon.path) as c:
            return [c.call("hello"), c.call("reserve", **reserve_fields(token)),
                    c.call("balance", user="bob"), c.call("quote", gpus=1, seconds=60,
                                                          type="h100")]

    hello, reserve, other, quote = as_user("alice", as_alice)
    assert hello["user"] == "alice" and hello["privileged"] == "0"
    assert reserve["reason"] == "forbidden"
    assert other["reason"] == "forbidden"
    assert quote["ok"] == "1" and quote["user"] == "alice" and quote["amount"] == "60"


def test_user_commands_as_alice_and_bob(daemon, sqlite_ledger, token):
    need(HAVE_USERS, "local users alice and bob (tests/cluster/up creates them)")
    bob_token = sqlite_ledger.mint("chemistry", 3600)[0]
    with Client(daemon.path) as c:
        c.call("reserve", **reserve_fields(token, key="a"))
        c.call("reserve", **reserve_fields(bob_token, key="b", user="bob", account="chemistry",
                                           gpus=1))
    env = {"GPULEDGER_CONFIG": "/nonexistent/gpuledger.toml"}
    sock = ["--socket", str(daemon.path)]
    alice = cli_as("alice", ["balance", *sock, "--json"], env)
    assert alice["code"] == 0, alice["output"]
    data = json.loads(alice["output"])
    assert [t["account"] for t in data["tokens"]] == ["physics"]
    bob = json.loads(cli_as("bob", ["jobs", *sock, "--json"], env)["output"])
    assert [h["user"] for h in bob["holds"]] == ["bob"]
    table = cli_as("alice", ["jobs", *sock], env)
    assert "2 x h100 x 1:00:00" in table["output"] and "7200" not in table["output"]
    quote = cli_as("alice", ["quote", *sock, "--gres=gpu:h100:4", "-t", "2:00:00",
                             "--token", token], env)
    assert quote["code"] == 0 and "8.000 GPU-h" in quote["output"] and "yes" in quote["output"]
    too_big = cli_as("alice", ["quote", *sock, "--gres=gpu:h100:4", "-t", "4:00:00",
                               "--token", token], env)
    assert too_big["code"] == 1 and "covers      no" in too_big["output"]
    nosy = cli_as("bob", ["balance", *sock, "--user", "alice"], env)
    assert nosy["code"] == 1 and "may only ask about themselves" in nosy["output"]


def test_quote_reads_sbatchs_options_as_job_submit_does(daemon, token):
    """gpuledger quote turns its options into the fields sbatch gives Slurm; the daemon reads
    them with job_submit's reader: -N, --gpus, --gpus-per-node, --array, shares, refusals."""
    env = {"GPULEDGER_CONFIG": "/nonexistent/gpuledger.toml"}
    sock = ["--socket", str(daemon.path)]

    def quote(*args):
        out = cli_as("alice", ["quote", *sock, *args], env)
        return out["code"], out["output"]

    code, out = quote("--gpus-per-node=h100:2", "-N", "3", "-t", "30")
    assert code == 0 and "6 x h100 x 0:30:00" in out and "3.000 GPU-h" in out, out
    code, out = quote("--gpus=a100:2", "-t", "1:00:00", "--array", "0-3")
    assert code == 0 and "4 tasks x 2 x a100 x 1:00:00" in out, out
    code, out = quote("--gres=gpu:h100:1,nic:1", "-t", "60", "--json")
    assert code == 0 and json.loads(out)["amount"] == 3600, out
    code, out = quote("--gres=shrad:2", "-t", "10")
    assert code == 1 and "--gres=shrad:2 asks for no GPU" in out, out
    code, out = quote("--gres=gpu:1,shard:1", "-t", "10")
    assert code == 1 and "not both" in out, out
    code, out = quote("--gres=gpu:1", "-t", "10", "--array", "x-1")
    assert code == 1 and "cannot read the array spec" in out, out


def test_default_socket_from_env(daemon, monkeypatch):
    from ledger.daemon.client import socket_path

    monkeypatch.setenv("GPULEDGER_SOCKET", str(daemon.path))
    assert socket_path(None, "/nonexistent.toml") == str(daemon.path)
    monkeypatch.delenv("GPULEDGER_SOCKET")
    # a config named (--config, $GPULEDGER_CONFIG) that does not exist is an error, not
    # a silent answer from the default socket; an unreadable default config falls back
    from ledger.errors import ConfigError

    with pytest.raises(ConfigError, match="no configuration at /nonexistent.toml"):
        socket_path(None, "/nonexistent.toml")
    monkeypatch.setenv("GPULEDGER_CONFIG", "/nonexistent.toml")
    with pytest.raises(ConfigError, match="no configuration at /nonexistent.toml"):
        socket_path(None, None)
    monkeypatch.delenv("GPULEDGER_CONFIG")
    monkeypatch.setattr("ledger.config.DEFAULT_PATH", Path("/nonexistent/gpuledger.toml"))
    assert socket_path(None, None) == "/run/gpuledger/gpuledger.sock"


def test_overlong_line_is_refused_and_closed(sqlite_ledger):
    d = LiveDaemon(sqlite_ledger, max_line=256).start()
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(d.path))
        s.settimeout(10)
        try:  # root may send up to 64 KiB (a node's charge record); this is longer
            s.sendall(b"op=ping x=" + b"a" * 70_000)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered and closed before reading it all
        data = s.recv(4096)
        assert decode(data)["reason"] == "too_long" and "65536" in decode(data)["message"]
        assert s.recv(4096) == b""  # closed
        with Client(d.path) as c:
            assert c.call("ping")["ok"] == "1"
    finally:
        d.close()


def test_restart_loses_no_reservation_and_replays_by_key(sqlite_ledger, token):
    d = LiveDaemon(sqlite_ledger).start()
    with Client(d.path) as c:
        first = c.call("reserve", **reserve_fields(token, key="restart-1"))
    d.stop()
    d2 = LiveDaemon(sqlite_ledger)
    d2.path = d.path  # same socket path; the stale socket file is replaced
    d2.start()
    try:
        with Client(d.path) as c:
            again = c.call("reserve", **reserve_fields(token, key="restart-1"))
        assert again["hold"] == first["hold"]
        assert [h.id for h in sqlite_ledger.holds()] == [first["hold"]]
    finally:
        d2.close()
        d.close()


def test_second_daemon_on_a_live_socket_is_refused(daemon, sqlite_ledger):
    from ledger.errors import ConfigError

    other = LiveDaemon(sqlite_ledger)
    other.path = daemon.path
    with pytest.raises(ConfigError, match="already listening"):
        other.start()


# -- fuzzing -----------------------------------------------------------------------------------

OPS = st.sampled_from(["reserve", "resize", "void", "quote", "balance", "jobs", "hello", "ping",
                       "", "x", "RESERVE"])
JUNK = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=40)
FIELD = st.tuples(st.sampled_from(["token", "gpus", "seconds", "type", "tasks", "user",
                                   "account", "hold", "key", "uid", "state", "op", "Bad", "9"]),
                  st.one_of(JUNK, st.integers(-5, 10**15).map(str),
                            st.just("glt1.e30.AAAA"), st.just("%"), st.just("%G1")))


def structured_line():
    def build(op, fields, enc):
        parts = [f"op={op}"] + [f"{k}={v}" for k, v in fields]
        text = " ".join(parts)
        return text.encode("utf-8", "replace") if enc else encode_loose(text)
    return st.builds(build, OPS, st.lists(FIELD, max_size=8), st.booleans())


def encode_loose(text: str) -> bytes:
    return text.encode("latin-1", "replace")


LINES = st.one_of(st.binary(max_size=600), structured_line(),
                  st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))


def test_fuzz_10000_lines_daemon_answers_or_closes_never_dies_never_writes(sqlite_ledger,
                                                                            token):
    d = LiveDaemon(sqlite_ledger, max_line=512).start()
    before = (sqlite_ledger.head(), sqlite_ledger.totals(), len(sqlite_ledger.holds()))
    sent = {"lines": 0, "closed": 0}
    conn = {"c": None}

    def client():
        if conn["c"] is None:
            conn["c"] = Client(d.path, timeout=5)
        return conn["c"]

    @given(st.lists(LINES, min_size=20, max_size=20))
    @settings(max_examples=520, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def batch(lines):
        for raw in lines:
            line = raw.replace(b"\n", b" ") + b"\n"
            c = client()
            try:
                resp = c.raw(line)
            except Exception:  # noqa: BLE001 - the daemon closed the connection
                sent["closed"] += 1
                conn["c"] = None
                sent["lines"] += 1
                continue
            sent["lines"] += 1
            assert resp["ok"] in ("0", "1")
            if resp["ok"] == "0":
                assert resp["reason"] and "message" in resp
            if len(line) > 513:
                assert resp["reason"] == "too_long"
                conn["c"] = None

    try:
        batch()
        assert sent["lines"] >= 10_000
        with Client(d.path) as c:
            assert c.call("ping") == {"ok": "1"}
        after = (sqlite_ledger.head(), sqlite_ledger.totals(), len(sqlite_ledger.holds()))
        assert after == before
        assert "internal" not in d.log.getvalue()
    finally:
        if conn["c"]:
            conn["c"].close()
        d.close()
