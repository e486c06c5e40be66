"""The nodes' TCP door: a charge is served only with a fresh MUNGE credential of root over
its very record, from the address its node resolves to; nothing else gets through.
Needs munged (the cluster's; started by tests/cluster/up and .ci/run)."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from conftest import need
from test_node_spool import bound_hold, charges_by_key, node_rec

from ledger.daemon import munge
from ledger.daemon.auth import Policy
from ledger.daemon.client import DaemonError
from ledger.daemon.handlers import Handlers
from ledger.daemon.nodedoor import NodeDoor, TcpClient, node_addresses, node_client
from ledger.daemon.protocol import decode, encode


def munged() -> bool:
    try:
        munge.decode(munge.encode(b"probe"))
        return True
    except munge.MungeError:
        return False


@pytest.fixture
def door(sqlite_ledger):
    need(munged(), "munged")
    d = NodeDoor(Handlers(sqlite_ledger, Policy("slurm"), accounts=lambda u: frozenset()),
                 "127.0.0.1:0")
    d.start()
    yield d
    d.stop()


def here() -> str:
    """A node name that resolves to the address munged puts in this host's credentials."""
    addr = munge.decode(munge.encode(b"where")).addr
    for name in (socket.gethostname(), "localhost"):
        if addr in node_addresses(name):
            return name
    pytest.fail(f"no name of this host resolves to munge's address {addr}")


def raw(d: NodeDoor, line: bytes) -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(line)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return decode(buf)


def test_a_node_charges_through_the_door_once(sqlite_ledger, door):
    hold = bound_hold(sqlite_ledger)
    node = here()
    with node_client(f"127.0.0.1:{door.port}") as c:
        assert isinstance(c, TcpClient)
        first = c.request("charge", record=node_rec(node=node).to_json())
        again = c.request("charge", record=node_rec(node=node).to_json())
    assert first["charged"] == "1" and again["charged"] == "0"
    assert charges_by_key(sqlite_ledger, hold.id) == {f"{hold.id}:500:0:{node}": 100}


def test_forged_replayed_or_borrowed_credentials_are_refused(sqlite_ledger, door):
    hold = bound_hold(sqlite_ledger)
    node = here()
    record = node_rec(node=node).to_json()
    cred = munge.encode(munge.digest(record.encode()))
    line = encode({"op": "charge", "record": record, "cred": cred})
    assert raw(door, line)["ok"] == "1"
    replayed = raw(door, line)
    assert replayed["reason"] == "forbidden" and "Replayed" in replayed["message"]
    forged = raw(door, encode({"op": "charge", "record": record,
                               "cred": cred[:-12] + "AAAAAAAAAAA:"}))
    assert forged["reason"] == "forbidden"
    other = node_rec(node=node, held_s=500).to_json()
    borrowed = raw(door, encode({"op": "charge", "record": other,
                                 "cred": munge.encode(munge.digest(record.encode()))}))
    assert borrowed["reason"] == "forbidden" and "not over this record" in borrowed["message"]
    no_cred = raw(door, encode({"op": "charge", "record": other}))
    assert no_cred["reason"] == "forbidden"
    assert charges_by_key(sqlite_ledger, hold.id) == {f"{hold.id}:500:0:{node}": 100}


def test_a_credential_of_another_uid_or_another_host_is_refused(sqlite_ledger, door, tmp_path):
    bound_hold(sqlite_ledger)
    node = here()
    record = node_rec(node=node).to_json()
    need(shutil.which("munge") is not None and shutil.which("setpriv") is not None,
         "the munge and setpriv commands")
    cred = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "munge"], input=munge.digest(record.encode()),
                          capture_output=True, check=True).stdout.decode().strip()
    out = raw(door, encode({"op": "charge", "record": record, "cred": cred}))
    assert out["reason"] == "forbidden" and "not uid 65534" in out["message"]
    # root's credential, but the record claims a node that is not this host
    elsewhere = node_rec(node="n-elsewhere-7").to_json()
    out = raw(door, encode({"op": "charge", "record": elsewhere,
                            "cred": munge.encode(munge.digest(elsewhere.encode()))}))
    assert out["reason"] == "forbidden" and "does not resolve" in out["message"]


@pytest.mark.parametrize("line, reason", [
    (b"op=reserve token=x gpus=1 seconds=60\n", "forbidden"),
    (b"op=bind hold=h job=1\n", "forbidden"),
    (b"\x00\xff garbage\n", "bad_request"),
    (b"op=charge record=%7Bnot-json cred=x\n", "forbidden"),
])
def test_the_door_serves_nothing_else(door, line, reason):
    assert raw(door, line)["reason"] == reason


def test_an_endless_line_is_cut_off(door):
    out = raw(door, b"op=charge record=" + b"a" * 200_000 + b"\n")
    assert out["reason"] == "bad_request" and "too long" in out["message"]


def test_no_munged_means_the_record_waits(sqlite_ledger, door, tmp_path):
    from slurm_plugin import chargespool

    c = TcpClient(f"127.0.0.1:{door.port}", munge_socket=str(tmp_path / "no-munged.sock"))
    out = chargespool.submit(tmp_path / "spool", node_rec(node=here()),
                             lambda rec: c.request("charge", record=rec.to_json()))
    assert out.state == "spooled" and "cannot prove this node" in out.why


def test_a_daemon_refusal_reaches_the_node_typed(sqlite_ledger, door):
    with TcpClient(f"127.0.0.1:{door.port}") as c, pytest.raises(DaemonError) as err:
        c.request("charge", record=node_rec(node="bad name!").to_json())
    assert err.value.reason in ("invalid", "forbidden")
