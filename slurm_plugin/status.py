"""``gpuledger status``: is each part of gpuledger on this host healthy, and if not, why.

One line per component — the daemon (its sockets answer), the database (a read succeeds),
the metrics endpoint (``/readyz``), the node agent (answers, NVML works), the systemd
timers (active, last run succeeded), the last ``gpuledger verify``, the charge spool's
backlog — each OK, FAIL or SKIP (not on this host, or not checkable by this user), and
exit 1 when any FAILs. What is not installed on a host is skipped, not failed: a
controller has no agent, a node no daemon; systemd decides what is installed where it
runs (an enabled unit that does not answer FAILs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass

import click

from ledger import verifyrecord
from ledger.cli.context import pass_app
from ledger.cli.output import echo_json, json_output
from ledger.cli.shapes import obj
from ledger.config import Config, parse_listen
from ledger.errors import LedgerError
from ledger.spoolcount import spool_backlog

TIMEOUT = 5.0  # s any one check may take
TIMERS = ("gpuledger-reconcile", "gpuledger-verify", "gpuledger-spool-flush",
          "gpuledger-report", "gpuledger-alerts", "gpuledger-idle")
VERIFY_MAX_AGE = 2 * 86400  # s: the verify timer runs daily; older than two days is stale
OK, FAIL, SKIP = "OK", "FAIL", "SKIP"


@dataclass
class Check:
    name: str
    status: str  # OK | FAIL | SKIP
    detail: str


def _within(fn: Callable[[], str], seconds: float = TIMEOUT) -> str:
    """``fn()``'s result, or TimeoutError when it takes longer than ``seconds``."""
    out: list = []

    def run():
        try:
            out.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out.append(("error", exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if not out:
        raise TimeoutError(f"no answer within {seconds:g} s")
    kind, value = out[0]
    if kind == "error":
        raise value
    return value


class Systemd:
    """What systemd says about gpuledger's units, through ``systemctl``."""

    def __init__(self, systemctl: str | None = None):
        self.systemctl = systemctl or shutil.which("systemctl")

    def available(self) -> bool:
        if not self.systemctl:
            return False
        try:
            state = subprocess.run([self.systemctl, "is-system-running"], check=False,
                                   capture_output=True, text=True,
                                   timeout=TIMEOUT).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return False
        return state not in ("", "offline", "unknown")

    def show(self, unit: str) -> dict[str, str]:
        """The unit's properties (``LoadState=not-found`` for one not installed)."""
        try:
            res = subprocess.run([self.systemctl, "show", "--no-pager", unit], check=False,
                                 capture_output=True, text=True, timeout=TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        props = {}
        for line in res.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                props[key] = value
        return props

    def installed(self, unit: str) -> dict[str, str] | None:
        props = self.show(unit)
        return props if props.get("LoadState") == "loaded" else None


def check_daemon(cfg: Config, systemd: Systemd | None, expect: bool = False) -> list[Check]:
    """The daemon's sockets on this host, and the way this host's epilog reaches it
    (``[hooks] daemon``: a node's ``host:port`` of the daemon's node door)."""
    from ledger.daemon.nodedoor import is_address, node_client

    def ping(where: str) -> str:
        start = time.perf_counter()
        with node_client(where, timeout=TIMEOUT) as c:
            resp = c.call("ping")
        if resp.get("ok") != "1":
            raise LedgerError(f"answered {resp.get('reason')}: {resp.get('message')}")
        return f"{where} answered in {(time.perf_counter() - start) * 1000:.1f} ms"

    unit = systemd.installed("gpuledger.service") if systemd else None
    places = [("daemon", cfg.daemon.socket)]
    if cfg.daemon.privileged_socket:
        places.append(("daemon (slurmctld socket)", cfg.daemon.privileged_socket))
    if cfg.hooks.daemon and cfg.hooks.daemon not in {w for _n, w in places}:
        places.append(("daemon (from this node)", cfg.hooks.daemon))
    out = []
    for name, where in places:
        remote = is_address(where)
        if not remote and not os.path.exists(where) and unit is None and not expect:
            out.append(Check(name, SKIP, f"no daemon on this host (no socket at {where})"))
            continue
        if name == "daemon (slurmctld socket)" and os.geteuid() != 0:
            out.append(Check(name, SKIP, f"{where} is for root and the Slurm user"))
            continue
        try:
            out.append(Check(name, OK, ping(where)))
        except LedgerError as exc:
            state = f" (gpuledger.service is {unit.get('ActiveState')})" if unit and not remote \
                else ""
            out.append(Check(name, FAIL, f"{exc}{state}"))
    return out


def check_database(cfg: Config) -> Check:
    from sqlalchemy import select

    from ledger import db
    from ledger.models import ChainHead

    def read() -> str:
        engine = db.make_engine(db.resolve_url(cfg))
        try:
            with db.read(engine) as conn:
                head = conn.execute(select(ChainHead.__table__.c.seq)).scalar()
        finally:
            engine.dispose()
        return f"{engine.url.render_as_string(hide_password=True)}: journal head {head or 0}"

    try:
        return Check("database", OK, _within(read))
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return Check("database", FAIL, " ".join(str(exc).split()) or type(exc).__name__)


def check_metrics(cfg: Config) -> Check:
    if not cfg.metrics.listen:
        return Check("metrics", SKIP, "off ([metrics] listen is empty)")
    host, port = parse_listen(cfg.metrics.listen)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return Check("metrics", OK, f"{url}: {resp.read(200).decode().strip()}")
    except urllib.error.HTTPError as exc:
        return Check("metrics", FAIL, f"{url}: {exc.code} {exc.read(300).decode().strip()}")
    except (OSError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check("metrics", FAIL, f"{url}: {getattr(reason, 'strerror', None) or reason}")


def check_agent(cfg: Config, systemd: Systemd | None, expect: bool = False) -> Check:
    from .agent import client as agent_client

    path = cfg.hooks.agent_socket or cfg.agent.socket
    unit = systemd.installed("gpuledger-agent.service") if systemd else None
    if not os.path.exists(path) and unit is None and not expect:
        return Check("agent", SKIP, f"no agent on this host (no socket at {path})")
    try:
        reply = agent_client.request({"op": "status"}, path, timeout=TIMEOUT)
    except agent_client.AgentUnreachable as exc:
        state = f" (gpuledger-agent.service is {unit.get('ActiveState')})" if unit else ""
        return Check("agent", FAIL, f"{exc}{state}")
    if not reply.get("ok"):
        return Check("agent", FAIL, f"{path}: {reply.get('error') or 'refused'}")
    nvml = reply.get("nvml")
    gpus = reply.get("gpus") or []
    if nvml != "ok":
        return Check("agent", FAIL, f"{path}: NVML: {nvml}")
    return Check("agent", OK, f"{path}: NVML ok, {len(gpus)} GPU(s), "
                              f"{len(reply.get('jobs') or [])} job(s)")


def check_timers(systemd: Systemd | None) -> list[Check]:
    if systemd is None:
        return [Check("timers", SKIP, "no systemd here (cron runs the jobs: see its log)")]
    out = []
    for name in TIMERS:
        timer = systemd.installed(f"{name}.timer")
        if timer is None:
            continue
        service = systemd.show(f"{name}.service")
        if timer.get("ActiveState") != "active":
            out.append(Check(name, FAIL, f"{name}.timer is {timer.get('ActiveState')} "
                                         f"({timer.get('UnitFileState') or 'unknown'})"))
            continue
        result = service.get("Result", "")
        last = timer.get("LastTriggerUSec") or "never"
        if result not in ("", "success"):
            out.append(Check(name, FAIL, f"last run failed ({result}, exit status "
                                         f"{service.get('ExecMainStatus', '?')}) at {last}; "
                                         f"journalctl -u {name}.service"))
        else:
            out.append(Check(name, OK, f"active; last run {last}: succeeded"
                             if last != "never" else "active; not run yet"))
    return out or [Check("timers", SKIP, "no gpuledger timers installed on this host")]


def check_verify(cfg: Config, now: float | None = None) -> Check:
    last = verifyrecord.last(cfg.keys_dir)
    if last is None:
        return Check("verify", SKIP, "no verify recorded on this host (gpuledger verify; "
                                     "gpuledger-verify.timer runs it daily)")
    age = (time.time() if now is None else now) - last.at
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last.at))
    if not last.ok:
        return Check("verify", FAIL, f"the last verify ({when}) failed: {last.problem}")
    if age > VERIFY_MAX_AGE:
        return Check("verify", FAIL, f"the last verify ran {age / 3600:.0f} h ago ({when}); "
                                     f"is gpuledger-verify.timer running?")
    return Check("verify", OK, f"{when}: {last.rows} journal rows sound, head {last.head_seq}")


def check_spool(cfg: Config) -> Check | None:
    """The charge spool's backlog, where this host has one (a node: ``[hooks] spool_dir``).
    Records waiting are not a failure by themselves (the flush timer delivers them; its own
    line says whether it runs)."""
    where = cfg.hooks.spool_dir
    backlog = spool_backlog(where)
    if backlog is None:
        return None
    rejected = spool_backlog(os.path.join(where, "rejected")) or 0
    if rejected:
        return Check("spool", FAIL, f"{backlog} charge record(s) waiting in {where}; "
                                    f"{rejected} rejected by the daemon in {where}/rejected "
                                    f"(see the hooks' log)")
    return Check("spool", OK, f"{backlog} charge record(s) waiting in {where}")


EXPECTABLE = ("daemon", "agent")


def checks(cfg: Config, systemd: Systemd | None = None,
           expect: frozenset[str] = frozenset()) -> list[Check]:
    """Every check, in order. ``expect``: components that must be on this host (absent is
    a FAIL, not a SKIP) — where systemd is not there to say what is installed."""
    if systemd is None:
        probe = Systemd()
        systemd = probe if probe.available() else None
    out = check_daemon(cfg, systemd, "daemon" in expect)
    out.append(check_database(cfg))
    out.append(check_metrics(cfg))
    out.append(check_agent(cfg, systemd, "agent" in expect))
    out += check_timers(systemd)
    out.append(check_verify(cfg))
    spool = check_spool(cfg)
    if spool is not None:
        out.append(spool)
    return out


STATUS_CHECK = obj("status-check", "One component's health.", [
    ("name", "string", "daemon, database, metrics, agent, spool, a timer, …"),
    ("status", "string", "OK, FAIL or SKIP (not on this host)"),
    ("detail", "string", "what was found"),
])
STATUS = obj("status", "Whether this host's parts are healthy (exit status 1 when not).", [
    ("healthy", "boolean", "no component failed"),
    ("components", "list of status-check", "each component"),
])


@click.command("status")
@json_output(STATUS)
@click.option("--expect", multiple=True, type=click.Choice(EXPECTABLE),
              help="A component that must run on this host: absent is a failure, not a skip "
                   "(repeatable; systemd's installed units say so where it runs).")
@pass_app
def status(app, as_json, expect):
    """Whether the daemon, the database, the metrics endpoint, the agent and the timers on
    this host are healthy: one line each, exit 1 when any is not."""
    results = checks(app.config, expect=frozenset(expect))
    failed = [c.name for c in results if c.status == FAIL]
    if as_json:
        echo_json({"healthy": not failed, "components": [asdict(c) for c in results]})
    else:
        width = max(len(c.name) for c in results)
        for c in results:
            click.echo(f"{c.name:<{width}}  {c.status:<4}  {c.detail}")
    if failed:  # the Error: line in both modes (the JSON contract)
        click.echo(f"Error: not healthy: {', '.join(failed)}", err=True)
        raise SystemExit(1)
