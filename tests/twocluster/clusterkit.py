"""Two (or more) throwaway Slurm clusters on this host sharing one PostgreSQL ledger.

The harness of ``tests/lanes/twocluster`` (recipe: DESIGN.md "Two clusters and a federation
on one machine", spiked in ../shared/spikes/twocluster/). It never touches the host's own
test cluster (ClusterName ``gpuledger``, /etc/slurm, ports 6817/6818): every cluster here
runs from its own directory under :data:`ROOT` with its own slurm.conf (``SLURM_CONF``),
ports, state/spool/log directories and node name (``slurmd -N``), and shares only munged and
the slurmdbd on 127.0.0.1:6819 (``sacctmgr add cluster``; removed again at the end).

Each cluster has what a site's controller host has: a ``gpuledger serve`` daemon with
``cluster = "<name>"`` and its own sockets and node door (``[daemon] node_listen``), a
gpuledger.toml for the controller, a node gpuledger.toml without ``[database]`` for slurmd's
Prolog/Epilog, job_submit.lua (the project's) with the job_submit.conf rendered by
``gpuledger config render-submit-conf``, and four hook wrappers that set ``GPULEDGER_CONFIG``
and ``SLURM_CONF`` (slurmctld and slurmd hand their hooks an environment of their own) and
exec the project's sh entry (slurm_plugin/hooks/gpuledger-hook). Every daemon writes one
ledger: a PostgreSQL database made for the run and dropped afterwards.

``python tests/twocluster/clusterkit.py down`` stops whatever a killed run left under ROOT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ledger.schema import set_keys, toml_value

BIN = Path(sys.executable).parent
GL = str(BIN / "gpuledger")
ROOT = Path(os.environ.get("GPULEDGER_TWOCLUSTER_DIR", "/tmp/gl-twocluster"))
PG_ADMIN = os.environ.get("GPULEDGER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DB_NAME = "gl_twocluster"
FEDERATION = "gltwofed"
HOST_CLUSTER = "gpuledger"  # the host's own test cluster: never touched, never federated
# A cluster with a backup controller: the veth pair between this host and the backup's
# network namespace, on a documentation range (RFC 5737) that leads nowhere.
VETH = "glbk0"
HOST_ADDR, BACKUP_ADDR = "198.51.100.1", "198.51.100.2"
ACCOUNTS = ("physics", "chemistry")
USERS = ("alice", "bob")
RATES = (("h100", "1.0"), ("a100", "0.6"), ("default", "0.5"))
DONE = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED")

SLURM_CONF = """\
# gpuledger two-cluster lane: cluster {name} (tests/twocluster/clusterkit.py)
ClusterName={name}
{ctld_hosts}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=cred_expire=30
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=10
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
FirstJobId={first_job_id}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,bf_continue
MinJobAge=300
KillWait=5
OverTimeLimit=0
InactiveLimit=0
PrologFlags=Alloc
Prolog={dir}/hooks/gpuledger-prolog
Epilog={dir}/hooks/gpuledger-epilog
PrologSlurmctld={dir}/hooks/gpuledger-prolog-slurmctld
EpilogSlurmctld={dir}/hooks/gpuledger-epilog-slurmctld
JobSubmitPlugins=lua
PlugStackConfig={dir}/etc/plugstack.conf
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={addr}
AccountingStoragePort=6819
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu,gres/gpu:h100
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName={node} NodeHostname={host} NodeAddr={addr} Port={slurmd_port} CPUs=4 RealMemory=500 Gres=gpu:h100:{gpus} State=UNKNOWN
PartitionName=gpu Nodes={node} Default=YES DefaultTime=01:00:00 MaxTime=1-00:00:00 State=UP
PartitionName=short Nodes={node} MaxTime=04:00:00 State=UP
"""


def sh(cmd: list[str], env: dict | None = None, timeout: float = 120, **kw
       ) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                          timeout=timeout, **kw)


def must(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, f"{' '.join(out.args)}: {out.stderr.strip()}{out.stdout[-2000:]}"
    return out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_services() -> str | None:
    """Why this host cannot run the lane (None when it can): root, Slurm's daemons and
    commands, munged, the shared slurmdbd, PostgreSQL."""
    if os.geteuid() != 0:
        return "the two-cluster lane runs as root"
    for cmd in ("slurmctld", "slurmd", "sacctmgr", "sbatch", "munge"):
        if not shutil.which(cmd) and not Path(f"/usr/sbin/{cmd}").exists():
            return f"{cmd} is not installed"
    if sh(["munge", "-n"]).returncode != 0:
        return "munged is not running"
    out = sh(["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"], timeout=30)
    if out.returncode != 0:
        return f"slurmdbd does not answer: {out.stderr.strip()}"
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test",
                             connect_timeout=5):
            pass
    except Exception as exc:  # noqa: BLE001 - any failure means no PostgreSQL here
        return f"PostgreSQL on 127.0.0.1:5432: {exc}"
    return None


# -- the ledger's database --------------------------------------------------------------------


def _pg(sql: str) -> None:
    import psycopg

    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test",
                         autocommit=True) as conn:
        conn.execute(sql)


def create_database() -> str:
    drop_database()
    _pg(f"CREATE DATABASE {DB_NAME}")
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{DB_NAME}"


def drop_database() -> None:
    _pg(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


# -- one cluster ------------------------------------------------------------------------------


def _comm(pid_file: Path) -> tuple[int, str] | None:
    try:
        pid = int(pid_file.read_text().strip())
        return pid, Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None


def _stop_pid(pid_file: Path, comm: str, wait_s: float = 20) -> None:
    """Stop the process a pid file names, only if it is ``comm`` (never a reused pid)."""
    found = _comm(pid_file)
    if not found or found[1] != comm:
        return
    pid = found[0]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


@dataclass
class Cluster:
    """One Slurm cluster under ``ROOT/<name>`` and its gpuledger daemon."""

    name: str
    node: str
    ctld_port: int
    slurmd_port: int
    first_job_id: int
    gpus: int = 2
    backup: bool = False  # a second SlurmctldHost line: a backup controller (see up())
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return ROOT / self.name

    @property
    def backup_host(self) -> str:
        return f"{self.name}-backup"

    @property
    def conf(self) -> Path:
        return self.dir / "etc" / "slurm.conf"

    @property
    def cfg(self) -> Path:
        """The controller's gpuledger.toml (the daemon, the controller hooks, the CLI)."""
        return self.dir / "gpuledger.toml"

    @property
    def node_cfg(self) -> Path:
        return self.dir / "node.toml"

    @property
    def socket(self) -> Path:
        return self.dir / "sock" / "gl.sock"

    @property
    def hook_log(self) -> Path:
        return self.dir / "hooklog" / "hooks.log"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "SLURM_TIME_FORMAT": "standard",
                **extra}

    def run(self, *cmd: str, user: str | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess:
        """A Slurm command against this cluster (as ``user`` when given)."""
        full = list(cmd)
        if user:
            full = ["runuser", "-u", user, "--", "env", f"SLURM_CONF={self.conf}", *full]
        return sh(full, env=self.env(), timeout=timeout)

    def gl(self, *args: str, check: bool = True):
        """``gpuledger`` with this cluster's config: its stdout, or (``check=False``) the
        finished process."""
        out = sh([GL, "--config", str(self.cfg), *args], env=self.env())
        if not check:
            return out
        assert out.returncode == 0, out.stderr + out.stdout[-3000:]
        return out.stdout.strip()

    # -- files --------------------------------------------------------------------------------

    def render(self, host: str, hook_entry: Path, ctld_venv: Path, spank: Path) -> None:
        d = self.dir
        for sub in ("etc", "spool", f"spool/{self.node}", "hooks", "hooklog", "jobs", "sock",
                    "nodespool", "dev"):
            (d / sub).mkdir(parents=True, exist_ok=True)
            (d / sub).chmod(0o755)
        for sub in ("state", "log", "run"):  # slurmctld (SlurmUser) writes here
            (d / sub).mkdir(parents=True, exist_ok=True)
            shutil.chown(d / sub, "slurm", "slurm")
            (d / sub).chmod(0o755)
        d.chmod(0o755)
        addr = HOST_ADDR if self.backup else "127.0.0.1"
        hosts = f"SlurmctldHost={host}({addr})"
        if self.backup:  # the backup: its own host name, network, mounts (start_backup)
            hosts += f"\nSlurmctldHost={self.backup_host}({BACKUP_ADDR})"
        (d / "etc" / "slurm.conf").write_text(SLURM_CONF.format(
            name=self.name, ctld_hosts=hosts, ctld_port=self.ctld_port,
            slurmd_port=self.slurmd_port, dir=d, node=self.node, host=host, gpus=self.gpus,
            first_job_id=self.first_job_id, addr=addr))
        devices = []
        for i in range(self.gpus):  # fake GPUs: character devices (regular files are refused)
            dev = d / "dev" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(195, i))
            devices.append(f"NodeName={self.node} Name=gpu Type=h100 File={dev}")
        (d / "etc" / "gres.conf").write_text("AutoDetect=off\n" + "\n".join(devices) + "\n")
        (d / "etc" / "plugstack.conf").write_text(f"required {spank}\n")
        shutil.copy(REPO / "slurm_plugin" / "lua" / "job_submit.lua", d / "etc" / "job_submit.lua")
        self.hook_log.touch()
        self.hook_log.chmod(0o666)  # the controller hooks run as SlurmUser, the node ones as root
        for hook in ("prolog", "epilog", "prolog-slurmctld", "epilog-slurmctld"):
            ctld = hook.endswith("slurmctld")
            venv = ctld_venv if ctld else BIN.parent
            cfg = self.cfg if ctld else self.node_cfg
            w = d / "hooks" / f"gpuledger-{hook}"
            w.write_text("#!/bin/sh\n"
                         f"# cluster {self.name}: its own gpuledger config and slurm.conf\n"
                         f"GPULEDGER_CONFIG={cfg}\nSLURM_CONF={self.conf}\n"
                         f"GPULEDGER_VENV={venv}\n"
                         "export GPULEDGER_CONFIG SLURM_CONF GPULEDGER_VENV\n"
                         f"exec {hook_entry} {hook}\n")
            w.chmod(0o755)

    def configure_ledger(self, url: str, keys_dir: Path) -> None:
        """This cluster's gpuledger.toml (``gpuledger init`` on the shared database), the
        nodes' file and job_submit.conf."""
        self.gl("init", "--database", url, "--cluster", self.name)
        door = f"127.0.0.1:{free_port()}"
        self.door = door
        self.cfg.write_text(set_keys(self.cfg.read_text(), {
            # every cluster's CLI signs with the one key (the admin host's)
            "keys": {"dir": str(keys_dir)},
            "daemon": {"socket": str(self.socket), "node_listen": door,
                       # the node names here (alpha1, beta1) are in no resolver: the
                       # address check is covered by tests/test_node_door.py
                       "node_check_address": False},
            "hooks": {"state_dir": str(self.dir / "jobs"), "log_file": str(self.hook_log),
                      "grace_seconds": 0, "close_wait_seconds": 15,
                      "gres_conf": str(self.dir / "etc" / "gres.conf"),
                      "spool_dir": str(self.dir / "nodespool")},
        }))
        self.cfg.chmod(0o644)
        self.node_cfg.write_text(node_conf(self.cfg, door))
        self.gl("config", "render-submit-conf", "-o", str(self.dir / "etc" / "job_submit.conf"))

    # -- daemons ------------------------------------------------------------------------------

    def start_daemon(self, name: str = "main", cfg: Path | None = None,
                     sock: Path | None = None) -> subprocess.Popen:
        cfg, sock = cfg or self.cfg, sock or self.socket
        sock.unlink(missing_ok=True)
        log = open(self.dir / f"daemon-{name}.log", "a")  # noqa: SIM115 - the child's copy
        proc = subprocess.Popen([GL, "--config", str(cfg), "serve"], stdout=subprocess.DEVNULL,
                                stderr=log, env=self.env())
        log.close()
        for _ in range(200):
            if sock.exists():
                self.daemons[name] = proc
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"daemon {self.name}/{name} did not start: "
                             + (self.dir / f"daemon-{name}.log").read_text()[-3000:])

    def stop_daemon(self, name: str = "main") -> None:
        proc = self.daemons.pop(name, None)
        if proc and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    # -- Slurm --------------------------------------------------------------------------------

    def register(self) -> None:
        if self.name not in sh(["sacctmgr", "-n", "-P", "show", "cluster",
                                "format=cluster"]).stdout.split():
            must(sh(["sacctmgr", "-i", "add", "cluster", self.name]))
        must(sh(["sacctmgr", "-i", "add", "account", ",".join(ACCOUNTS),
                 f"cluster={self.name}"]))
        for user in USERS:
            must(sh(["sacctmgr", "-i", "add", "user", user, f"account={','.join(ACCOUNTS)}",
                     f"cluster={self.name}", "defaultaccount=physics"]))

    def start_slurm(self) -> None:
        env = self.env(GPULEDGER_JOB_SUBMIT_CONF=str(self.dir / "etc" / "job_submit.conf"))
        must(sh(["/usr/sbin/slurmctld"], env=env))
        self.wait_ctld()
        must(sh(["/usr/sbin/slurmd", "-N", self.node], env=self.env()))
        self.wait_idle()

    def wait_ctld(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run("scontrol", "ping").stdout.count("UP") >= 1:
                return
            time.sleep(0.3)
        raise AssertionError(f"slurmctld of {self.name} did not answer: "
                             + self.tail("log/slurmctld.log"))

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-n", self.node, "-o", "%t").stdout.strip()
            if re.match(r"^(idle|mix|alloc)", state):
                return
            time.sleep(0.3)
        raise AssertionError(f"node {self.node} of {self.name} is {state!r}: "
                             + self.tail(f"log/slurmd-{self.node}.log"))

    def tail(self, rel: str, n: int = 3000) -> str:
        p = self.dir / rel
        return p.read_text(errors="replace")[-n:] if p.exists() else f"({p} missing)"

    def stop_slurm(self) -> None:
        _stop_pid(self.dir / "run" / f"slurmd-{self.node}.pid", "slurmd")
        for pid_file in sorted((self.dir / "run").glob("slurmctld*.pid")) + sorted(
                (self.dir / "backup" / "run").glob("slurmctld*.pid")):
            _stop_pid(pid_file, "slurmctld")
        _stop_pid(self.dir / "backup" / "holder.pid", "sleep", wait_s=5)
        if Path(f"/sys/class/net/{VETH}").exists():
            sh(["ip", "link", "del", VETH])

    # -- a backup controller --------------------------------------------------------------------

    def backup_namespace(self) -> str:
        """The backup controller's host, as a second controller host would be: its own host
        name (UTS namespace) and network (a veth pair: this host is HOST_ADDR, the backup
        BACKUP_ADDR; both controllers listen on SlurmctldPort). Made before either
        controller starts (they reach slurmdbd and each other at these addresses). The pid
        of the process holding the namespaces."""
        b = self.dir / "backup"
        b.mkdir(exist_ok=True)
        holder = subprocess.Popen(["unshare", "--net", "--uts", "--mount",
                                   "--propagation", "private", "sleep", "infinity"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        (b / "holder.pid").write_text(str(holder.pid))
        pid = str(holder.pid)
        for _ in range(50):  # until unshare has exec'ed sleep in the new namespaces
            if _comm(b / "holder.pid") == (holder.pid, "sleep"):
                break
            time.sleep(0.05)
        must(sh(["ip", "link", "add", VETH, "type", "veth", "peer", "name", f"{VETH}p",
                 "netns", pid]))
        must(sh(["ip", "addr", "add", f"{HOST_ADDR}/30", "dev", VETH]))
        must(sh(["ip", "link", "set", VETH, "up"]))
        for cmd in (["ip", "addr", "add", f"{BACKUP_ADDR}/30", "dev", f"{VETH}p"],
                    ["ip", "link", "set", f"{VETH}p", "up"], ["ip", "link", "set", "lo", "up"]):
            must(sh(["nsenter", "-t", pid, "-n", *cmd]))
        must(sh(["nsenter", "-t", pid, "-u", "hostname", self.backup_host]))
        return pid

    def start_backup(self, pid: str) -> None:
        """The backup slurmctld in the namespaces of ``pid`` (backup_namespace), with, in its
        mount namespace, its own run/ and log/ and its own gpuledger.toml (the controller
        hooks' file, naming the backup's daemon; its job_submit.conf too): a daemon per
        controller host, one ledger."""
        b = self.dir / "backup"
        for sub in ("run", "log", "sock"):
            (b / sub).mkdir(parents=True, exist_ok=True)
            (b / sub).chmod(0o755)
            if sub != "sock":
                shutil.chown(b / sub, "slurm", "slurm")
        cfg = b / "gpuledger.toml"
        cfg.write_text(set_keys(self.cfg.read_text(), {"daemon": {
            "socket": str(b / "sock" / "gl.sock"), "node_listen": f"127.0.0.1:{free_port()}"}}))
        cfg.chmod(0o644)
        must(sh([GL, "--config", str(cfg), "config", "render-submit-conf", "-o",
                 str(b / "job_submit.conf")], env=self.env()))
        self.start_daemon("backup", cfg, b / "sock" / "gl.sock")
        for src, dst in ((b / "run", self.dir / "run"), (b / "log", self.dir / "log"),
                         (cfg, self.cfg)):
            must(sh(["nsenter", "-t", pid, "-m", "mount", "--bind", str(src), str(dst)]))
        env = self.env(GPULEDGER_JOB_SUBMIT_CONF=str(b / "job_submit.conf"))
        must(sh(["nsenter", "-t", pid, "-n", "-u", "-m", "/usr/sbin/slurmctld"], env=env))

    def ping(self) -> dict[str, str]:
        """``scontrol ping``: controller → UP/DOWN (primary first)."""
        out = self.run("scontrol", "ping").stdout
        return {m.group(1): m.group(2) for m in
                re.finditer(r"Slurmctld\((?:primary|backup)\) at (\S+) is (\w+)", out)}

    def unregister(self) -> None:
        if self.name == HOST_CLUSTER:  # never the host's cluster
            return
        if self.name in sh(["sacctmgr", "-n", "-P", "show", "cluster",
                            "format=cluster"]).stdout.split():
            sh(["sacctmgr", "-i", "delete", "cluster", self.name])

    # -- jobs ---------------------------------------------------------------------------------

    def sbatch(self, token: str | None, *args: str, user: str = "alice", wrap: str = "sleep 1",
               check: bool = True) -> subprocess.CompletedProcess | str:
        """``sbatch`` as ``user`` on this cluster: the job id, or (``check=False``) the
        finished process (its stderr holds a refusal)."""
        cmd = ["sbatch", "-o", "/dev/null", "--chdir=/tmp",
               *([f"--gpu-token={token}"] if token else []), *args, "--wrap", wrap]
        out = self.run(*cmd, user=user)
        if not check:
            return out
        m = re.search(r"Submitted batch job (\d+)", out.stdout)
        assert m, f"{self.name}: {out.stderr}"
        return m.group(1)

    def squeue(self, job: str | None = None) -> list[dict]:
        cmd = ["squeue", "--json", "--all", "--local"]
        out = self.run(*cmd)
        if out.returncode:
            return []
        jobs = json.loads(out.stdout)["jobs"]
        return [j for j in jobs if job is None or str(j["job_id"]) == str(job)]

    def state(self, job: str) -> str:
        recs = self.squeue(job)
        if recs:
            return str(recs[0]["job_state"])
        acct = self.sacct(job)
        return acct[-1]["state"] if acct else "GONE"

    def admin_comment(self, job: str) -> str:
        recs = self.squeue(job)
        return str(recs[0].get("admin_comment") or "") if recs else ""

    def sacct(self, job: str) -> list[dict]:
        out = self.run("sacct", "-n", "-X", "-D", "-P", "-j", str(job),
                       "-o", "JobIDRaw,State,Cluster,AdminComment,NodeList,ElapsedRaw")
        rows = []
        for line in out.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 6:
                rows.append(dict(zip(("job_id", "state", "cluster", "admin_comment", "nodes",
                                      "elapsed"), parts, strict=True)))
                rows[-1]["state"] = rows[-1]["state"].split(" ")[0]
        return rows

    def wait(self, job: str, states: Iterable[str] = DONE, timeout: float = 120) -> str:
        states = tuple(states)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state(job)
            if state in states:
                return state
            time.sleep(0.3)
        raise AssertionError(f"{self.name} job {job} is {state}, not in {states} after "
                             f"{timeout}s: {self.run('scontrol', 'show', 'job', job).stdout}"
                             f"\nhooks:\n{self.tail('hooklog/hooks.log')}")

    def cancel_all(self) -> None:
        self.run("scancel", "-u", "alice")
        self.run("scancel", "-u", "bob")


def node_conf(cfg: Path, door: str) -> str:
    """A compute node's gpuledger.toml made from the controller's: its cluster, hooks and
    where the daemon's node door is; no [database], [keys] or [daemon] socket secrets."""
    data = tomllib.loads(cfg.read_text())
    hooks = {**data.get("hooks", {}), "daemon": door}
    out = [f"cluster = {toml_value(data.get('cluster', ''))}", "", "[hooks]"]
    out += [f"{k} = {toml_value(v)}" for k, v in hooks.items()]
    return "\n".join(out) + "\n"


# -- what the tests share -----------------------------------------------------------------------


def refusal(out) -> str:
    """The reason sbatch printed for a refused job (``gpu-token: …``)."""
    m = re.search(r"gpu-token: (.*)", out.stderr)
    assert out.returncode != 0 and m, (out.returncode, out.stdout, out.stderr)
    return m.group(1)


def settle(site: Site, jobs: dict[str, list[str]], timeout: float = 180) -> None:
    """Wait for every job to end, then for the holds bound to jobs to close
    (EpilogSlurmctld)."""
    for name, ids in jobs.items():
        for j in ids:
            site[name].wait(j, timeout=timeout)
    ledger = site.ledger()
    deadline = time.monotonic() + 60
    pending: list = []
    while time.monotonic() < deadline:
        pending = [h for h in ledger.holds(state="pending") if h.job_id]
        if not pending:
            return
        time.sleep(0.5)
    raise AssertionError(f"holds still pending: {pending}")


def reconcile(site: Site) -> None:
    """Each cluster's reconciler (its own Slurm, its own holds); nothing left pending."""
    for c in site.clusters.values():
        out = json.loads(c.gl("reconcile", "--json"))
        assert not out["errors"], out
    left = site.ledger().holds(state="pending")
    assert left == [], left


# -- the site ---------------------------------------------------------------------------------


def ctld_venv() -> Path:
    """A virtualenv SlurmUser can run for the controller hooks (stdlib only, tests/
    test_hook_entry.py): the tests' own if slurm can run it, else one on the system Python
    under ROOT that finds this checkout through a .pth file."""
    if sh(["runuser", "-u", "slurm", "--", str(BIN / "python"), "-c", "pass"]).returncode == 0:
        return BIN.parent
    venv = ROOT / "ctld-venv"
    if not (venv / "bin" / "python").exists():
        must(sh(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)]))
    for site in venv.glob("lib/python3*/site-packages"):
        (site / "gpuledger-checkout.pth").write_text(f"{REPO}\n")
    return venv


def build_spank() -> Path:
    """The SPANK plugin (``--gpu-token``), built from this checkout into ROOT."""
    src = ROOT / "spank"
    shutil.copytree(REPO / "slurm_plugin" / "spank", src, dirs_exist_ok=True)
    (src / "gpuledger.so").unlink(missing_ok=True)
    must(sh(["make", "-s", "-C", str(src), "gpuledger.so"]))
    (src / "gpuledger.so").chmod(0o755)
    return src / "gpuledger.so"


class Site:
    """The clusters, their daemons and the one ledger."""

    def __init__(self, clusters: list[Cluster]):
        self.clusters = {c.name: c for c in clusters}
        self.url = ""
        self.federated = False

    def __getitem__(self, name: str) -> Cluster:
        return self.clusters[name]

    @property
    def first(self) -> Cluster:
        return next(iter(self.clusters.values()))

    def up(self) -> None:
        teardown()  # what a killed run left
        ROOT.mkdir(parents=True)
        ROOT.chmod(0o755)
        entry = ROOT / "gpuledger-hook"
        shutil.copy(REPO / "slurm_plugin" / "hooks" / "gpuledger-hook", entry)
        entry.chmod(0o755)
        self.venv, self.spank = ctld_venv(), build_spank()
        self.url = create_database()
        self._save()
        for c in self.clusters.values():
            self._configure(c)
        first = self.first
        first.gl("keys", "generate", "--kid", "k1")
        for account in ACCOUNTS:
            first.gl("account", "create", account)
        for gpu, rate in RATES:
            first.gl("rates", "set", gpu, rate)
        for c in self.clusters.values():
            c.start_daemon()
            c.register()
            c.start_slurm()

    def _save(self) -> None:
        """What teardown() needs to find everything, even after a killed run."""
        (ROOT / "state.json").write_text(json.dumps(
            {"clusters": {c.name: {"node": c.node} for c in self.clusters.values()}}))

    def _configure(self, c: Cluster) -> None:
        c.render(socket.gethostname().split(".")[0], ROOT / "gpuledger-hook", self.venv,
                 self.spank)
        c.configure_ledger(self.url, ROOT / "keys")

    def add(self, c: Cluster) -> Cluster:
        """One more cluster on the same ledger, up (with its backup controller, if any)."""
        self.clusters[c.name] = c
        self._save()
        self._configure(c)
        c.start_daemon()
        c.register()
        pid = c.backup_namespace() if c.backup else None
        c.start_slurm()
        if pid:
            c.start_backup(pid)
        return c

    def ledger(self):
        from ledger import config as config_mod
        from ledger.service import Ledger

        return Ledger.from_config(config_mod.load(self.first.cfg))

    def mint(self, hours: str, account: str = "physics", *opts: str) -> tuple[str, str]:
        token = self.first.gl("token", "mint", "--account", account, "--hours", hours, *opts)
        return token, self.ledger().token_id_of(token)

    def next_job_id(self, name: str) -> int:
        out = self[name].run("scontrol", "show", "config").stdout
        return int(re.search(r"^NEXT_JOB_ID\s*=\s*(\d+)", out, re.MULTILINE).group(1))

    def align_job_ids(self) -> None:
        """Submit (and cancel) CPU jobs on the clusters behind until every next job id is
        the same: the next GPU job on each gets one id, as happens at sites."""
        while True:
            ids = {n: self.next_job_id(n) for n in self.clusters}
            top = max(ids.values())
            behind = [n for n, i in ids.items() if i < top]
            if not behind:
                return
            for n in behind:
                for _ in range(top - ids[n]):
                    job = self[n].sbatch(None, "--hold", wrap="true")
                    self[n].run("scancel", job)

    def federate(self) -> None:
        names = ",".join(self.clusters)
        must(sh(["sacctmgr", "-i", "add", "federation", FEDERATION, f"clusters={names}"]))
        self.federated = True
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ok = all(re.search(r"Sibling:.*Synced:Yes", c.run("scontrol", "show", "fed").stdout)
                     for c in self.clusters.values())
            if ok:
                return
            time.sleep(0.3)
        raise AssertionError("federation never synced: "
                             + self.first.run("scontrol", "show", "fed").stdout)

    def unfederate(self) -> None:
        if FEDERATION in sh(["sacctmgr", "-n", "-P", "show", "federation",
                             "format=federation"]).stdout.split():
            sh(["sacctmgr", "-i", "delete", "federation", FEDERATION])
        self.federated = False

    def down(self) -> None:
        for c in self.clusters.values():
            try:
                c.cancel_all()
            except Exception as exc:  # noqa: BLE001 - tear down whatever is left regardless
                print(f"twocluster: cancelling {c.name}'s jobs: {exc}", file=sys.stderr)
        for c in self.clusters.values():
            for name in list(c.daemons):
                c.stop_daemon(name)
        teardown()


def teardown() -> None:
    """Stop everything under ROOT (by pid file, checked against the process name), delete
    the federation and the clusters from slurmdbd, drop the database, remove ROOT."""
    state = ROOT / "state.json"
    clusters: dict[str, dict] = {name: {"node": f"{name}1"}  # the lane's, if no state.json
                                 for name in ("alpha", "beta", "gamma")}
    if state.exists():
        try:
            clusters = json.loads(state.read_text())["clusters"]
        except (OSError, ValueError, KeyError):
            clusters = {}
    if FEDERATION in sh(["sacctmgr", "-n", "-P", "show", "federation",
                         "format=federation"]).stdout.split():
        sh(["sacctmgr", "-i", "delete", "federation", FEDERATION])
    for name, info in clusters.items():
        c = Cluster(name, info["node"], 0, 0, 1)
        c.stop_slurm()
        c.unregister()
    _kill_daemons()
    if ROOT.exists():
        try:
            drop_database()
        except Exception as exc:  # noqa: BLE001 - PostgreSQL gone: nothing to drop
            print(f"twocluster: dropping {DB_NAME}: {exc}", file=sys.stderr)
        shutil.rmtree(ROOT, ignore_errors=True)


def _kill_daemons() -> None:
    """``gpuledger serve`` processes whose config lies under ROOT (a killed run's)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if "serve" in text and any(a.startswith(str(ROOT) + "/") for a in text):
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


def two_clusters(first_job_id: int | None = None) -> Site:
    """alpha and beta: the same first job id (their ids collide, as at many sites)."""
    first = first_job_id or 1000 + (int(time.time()) // 60) % 50_000 * 100
    return Site([Cluster("alpha", "alpha1", 6837, 6838, first),
                 Cluster("beta", "beta1", 6847, 6848, first)])


if __name__ == "__main__":
    if sys.argv[1:] == ["down"]:
        teardown()
    elif sys.argv[1:] == ["up"]:
        two_clusters().up()
        print(f"up under {ROOT}")
    else:
        sys.exit("usage: clusterkit.py up|down")
