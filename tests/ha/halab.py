"""The Patroni lab as the failover test sees it (tests/ha/lab builds it; its lab.json says
where everything is): Patroni's view of the members, the processes to kill, etcd's
leader, databases to make, and URLs for the ledger (through HAProxy, or to the standalone
server beside the cluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psycopg

DEFAULT = Path("/var/tmp/gpuledger-patroni-lab/lab.json")


def lab_path() -> Path:
    return Path(os.environ.get("GPULEDGER_HA_LAB") or DEFAULT)


class Lab:
    def __init__(self, path: Path):
        self.path = path
        self.info = json.loads(path.read_text())
        self.dir = Path(self.info["dir"])
        self.members = self.info["members"]
        self.password = self.info["password"]

    # -- where things are --------------------------------------------------------------

    def file(self, kind: str, name: str) -> Path:
        return self.dir / self.info["layout"][kind].format(name=name)

    def port(self, where: str) -> int:
        """``haproxy`` (the cluster's primary) or ``standalone``."""
        return int(self.info[where]["port"])

    def conninfo(self, where: str, dbname: str = "postgres") -> str:
        return (f"host=127.0.0.1 port={self.port(where)} dbname={dbname} user=postgres "
                f"password={self.password} connect_timeout=3 sslmode=disable")

    def url(self, where: str, dbname: str) -> str:
        """A SQLAlchemy URL without the password (gpuledger reads it from password_file)."""
        return (f"postgresql+psycopg://postgres@127.0.0.1:{self.port(where)}/{dbname}"
                "?connect_timeout=2&sslmode=disable")

    # -- Patroni -------------------------------------------------------------------------

    def cluster(self) -> list[dict]:
        """Patroni's members (name, role, state, timeline) from the first REST API that
        answers; [] when none does."""
        for m in self.members:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{m['api_port']}/cluster",
                                            timeout=1) as r:
                    return json.loads(r.read())["members"]
            except (OSError, ValueError, KeyError):
                continue
        return []

    def leader(self) -> str | None:
        return next((m["name"] for m in self.cluster() if m.get("role") == "leader"), None)

    def healthy(self) -> tuple[bool, str]:
        members = self.cluster()
        roles = sorted(m.get("role", "?") for m in members)
        states = sorted(m.get("state", "?") for m in members)
        ok = (len(members) == len(self.members) and roles.count("leader") == 1 and
              (roles.count("sync_standby") >= 1 or not self.info["synchronous_mode_strict"])
              and all(s in ("running", "streaming") for s in states))
        return ok, f"roles {roles}, states {states}"

    def pids_of(self, name: str) -> tuple[int, int]:
        """(Patroni's pid, its PostgreSQL's postmaster pid) of member ``name``."""
        patroni = int(self.file("patroni_pidfile", name).read_text().split()[0])
        postmaster = int((self.file("data", name) / "postmaster.pid").read_text().split()[0])
        return patroni, postmaster

    def kill_member(self, name: str) -> float:
        """kill -9 the member's Patroni and its postmaster at once (killing the postmaster
        alone only makes Patroni restart it in place); the time of the kill."""
        patroni, postmaster = self.pids_of(name)
        t = time.time()
        os.kill(patroni, signal.SIGKILL)
        os.kill(postmaster, signal.SIGKILL)
        return t

    # -- etcd -----------------------------------------------------------------------------

    def etcd_leader(self) -> str:
        out = subprocess.run(
            ["etcdctl", f"--endpoints={self.info['etcd_endpoints']}", "endpoint", "status",
             "-w", "json"], env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True,
            text=True, timeout=10, check=True).stdout
        for s in json.loads(out):
            st = s["Status"]
            if st["leader"] == st["header"]["member_id"]:
                port = int(s["Endpoint"].rsplit(":", 1)[1])
                return next(e["name"] for e in self.info["etcd"] if e["client_port"] == port)
        raise AssertionError(f"etcd reports no leader: {out}")

    def kill_etcd(self, name: str) -> float:
        pid = int(self.file("etcd_pidfile", name).read_text().split()[0])
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        return t

    # -- databases ------------------------------------------------------------------------

    def create_database(self, where: str, name: str) -> None:
        with psycopg.connect(self.conninfo(where), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")

    def drop_database(self, where: str, name: str) -> None:
        try:
            with psycopg.connect(self.conninfo(where), autocommit=True) as c:
                c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except psycopg.Error:
            pass  # the lab is wiped after the lane anyway
