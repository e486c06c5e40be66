"""The TOML configuration: where it lives, what it holds (every section and key, with its
default, check and doc), how it is read and how it is written.

One schema (:data:`SECTIONS`) serves every reader: the daemon and CLI (:func:`load`), the
Slurm hooks (``[hooks]``), the node agent (``[agent]`` and ``[idle]`` of its own file,
:func:`agent_settings`), the reports (``[smtp]``, ``[reports]``), and job_submit.lua, whose
``job_submit.conf`` is rendered from ``[submit]`` (``configfiles.render_submit_conf``).
docs/config.md is ``configfiles.reference`` (a test keeps them in step); ``gpuledger init`` writes
``configfiles.render``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import schema
from .amounts import SECONDS_PER_HOUR, parse_rate
from .errors import ConfigError, InvalidInput
from .idle import IdlePolicy
from .idle import parse as parse_idle
from .limits import Limits
from .schema import setting
from .shares import DEFAULT_GRES_CONF

DEFAULT_PATH = Path("/etc/gpuledger/gpuledger.toml")
ENV_VAR = "GPULEDGER_CONFIG"
POLICIES = ("allocated", "measured")
UNAVAILABLE_MODES = ("reject", "accept")
SUBMIT_CONF = "job_submit.conf"  # beside gpuledger.toml; job_submit.lua reads /etc/gpuledger's


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    """``--config`` wins, then ``$GPULEDGER_CONFIG``, then /etc/gpuledger/gpuledger.toml."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return DEFAULT_PATH


def named_path(explicit: str | os.PathLike | None = None) -> bool:
    """Whether the config path was named (``--config`` or ``$GPULEDGER_CONFIG``)."""
    return bool(explicit) or bool(os.environ.get(ENV_VAR))


# -- checks ----------------------------------------------------------------------------------

def _one_of(*choices: str):
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _between(low: float, high: float, *, low_open: bool = False, unit: str = ""):
    def check(v: float) -> str | None:
        ok = (low < v if low_open else low <= v) and v <= high
        return None if ok else f"must be between {low:g} and {high:g}{unit}"
    return check


def _conf_text(v: str) -> str | None:
    """A value job_submit.conf carries: one line, no ``#`` (the Lua reader's comment)."""
    if "#" in v or any(c < " " for c in v) or v != v.strip():
        return "must be one line without # or surrounding blanks (job_submit.conf carries it)"
    return None


def _accounts(v: tuple[str, ...]) -> str | None:
    from .names import is_account_name

    bad = [a for a in v if not is_account_name(a)]
    return f"names no Slurm account: {', '.join(map(repr, bad))}" if bad else None


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be above 0"


# -- the sections ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TopLevel:
    """Keys outside any table."""

    cluster: str = setting(
        "", kind=schema.STRING, check=_conf_text,
        doc="this Slurm cluster's name, as token cluster scopes and job_submit.lua see it "
            '("": any)')


@dataclass(frozen=True)
class DatabaseConfig:
    """The ledger database (daemon, CLI, hooks that settle)."""

    url: str | None = setting(
        None, kind=schema.STRING, default_doc="(required where the ledger is opened)",
        doc="SQLAlchemy URL: sqlite:///ledger.db (relative to this file), "
            "postgresql+psycopg://user@host/db or mysql+pymysql://user@host/db; "
            "unset on compute nodes (their epilogs send charges to the daemon)")
    password_file: str | None = setting(
        None, kind=schema.STRING, example="/etc/gpuledger/db.password",
        doc="a server's password is read from this file (mode 0600), never put in the URL")
    unavailable_wait: float = setting(
        0.5, kind=schema.NUMBER, check=_between(0, 600, unit=" seconds"),
        doc="seconds a write keeps trying while the database is unreachable, read-only or "
            "failing over (nothing committed), or after a COMMIT whose outcome is unknown; "
            "then it fails as unavailable (keep it under [submit] timeout: job_submit.lua "
            "waits for the daemon's answer)")


@dataclass(frozen=True)
class KeysSection:
    """Ed25519 signing keys (the host that mints tokens; verification needs the ledger only)."""

    dir: str = setting("keys", kind=schema.STRING,
                       doc="directory of <kid>.key files (mode 0600), relative to this file")


@dataclass(frozen=True)
class DaemonConfig:
    """`gpuledger serve`: the socket every hook and job_submit.lua talks to."""

    socket: str = setting("/run/gpuledger/gpuledger.sock", kind=schema.STRING,
                          check=_conf_text, doc="Unix socket of `gpuledger serve`")
    socket_group: str | None = setting(
        None, kind=schema.STRING, example="slurm",
        doc="group owning the socket (mode 0660); unset: 0666 with peer-credential checks")
    privileged_socket: str | None = setting(
        None, kind=schema.STRING, check=_conf_text,
        example="/run/gpuledger/gpuledger-slurm.sock",
        doc="a second socket only root and slurm_user can open; job_submit.lua uses it when set")
    slurm_user: str = setting("slurm", kind=schema.STRING,
                              doc="Slurm's SlurmUser (slurmctld), trusted for holds")
    max_line: int = setting(16384, kind=schema.INTEGER,
                            check=lambda v: None if v >= 256 else "must be at least 256",
                            doc="longest request line (bytes) the daemon reads")
    node_listen: str | None = setting(
        None, kind=schema.STRING, check=_conf_text, example="0.0.0.0:6830",
        doc="host:port where compute nodes' epilogs send charges (TCP, each proven with a "
            "MUNGE credential of root on the node); unset: nodes use this host's socket")
    node_check_address: bool = setting(
        True, kind=schema.BOOLEAN,
        doc="a node's charge must come from the address its node name resolves to")
    fast_reserve: bool = setting(
        False, kind=schema.BOOLEAN,
        doc="answer slurmctld's reserves from memory and write them in batches "
            "(ledger/daemon/fastpath.py)")
    fast_reserve_fresh_s: float = setting(
        2.0, kind=schema.NUMBER, check=_between(0.1, 60),
        doc="how old (s) a token's balance may be to answer a reserve from it")
    fast_reserve_batch_ms: float = setting(
        2.0, kind=schema.NUMBER, check=_between(0, 60_000),
        doc="how long (ms) the writer lets answers gather per transaction")


@dataclass(frozen=True)
class SubmitConfig:
    """job_submit.lua, through the job_submit.conf rendered from this table
    (`gpuledger config render-submit-conf`); the Lua reads nothing else. The daemon reads
    free_accounts too: its job-request reader decides free accounts."""

    socket: str | None = setting(
        None, kind=schema.STRING, check=_conf_text,
        default_doc="[daemon] privileged_socket, else [daemon] socket",
        doc="the daemon socket job_submit.lua connects to")
    timeout: float = setting(
        1.0, kind=schema.NUMBER, check=_between(0, 30, low_open=True, unit=" seconds"),
        doc="seconds for the whole round trip to the daemon (connect, request, reply)")
    on_ledger_unavailable: str = setting(
        "reject", kind=schema.STRING, check=_one_of(*UNAVAILABLE_MODES),
        doc='when the daemon cannot answer: "reject" GPU jobs, or "accept" them marked '
            "deferred (the prolog reserves)")
    free_accounts: tuple[str, ...] = setting(
        (), kind=schema.STRINGS, check=_accounts,
        doc="Slurm accounts whose GPU jobs need no token (the daemon decides from this "
            "list; job_submit.lua, from the same list, only while the daemon cannot answer)")


@dataclass(frozen=True)
class ChargeConfig:
    """How a settled job is charged (epilog, reconciler)."""

    policy: str = setting(
        "allocated", kind=schema.STRING, check=_one_of(*POLICIES),
        doc='"allocated": held GPU time x rate; "measured": per GPU max(busy, floor x held) '
            "x rate")
    floor: str = setting("0.25", kind=schema.DECIMAL,
                         doc='share of held time a GPU is charged at least under "measured"')


@dataclass(frozen=True)
class HooksSection:
    """Prolog, epilog, the controller hooks and `gpuledger reconcile`."""

    state_dir: str = setting("/var/spool/gpuledger/jobs", kind=schema.STRING,
                             doc="per-node prolog records (root's: not under the ledger's "
                                 "data directory, which the daemon's user owns)")
    log_file: str = setting("/var/log/gpuledger/hooks.log", kind=schema.STRING,
                            doc='the hooks\' log file ("": none)')
    syslog: bool = setting(True, kind=schema.BOOLEAN, doc="log to syslog too")
    agent_socket: str | None = setting(None, kind=schema.STRING,
                                       default_doc="[agent] socket's default",
                                       doc="the node agent's socket (NVML)")
    agent_spool: str | None = setting(None, kind=schema.STRING,
                                      default_doc="[agent] spool's default",
                                      doc="the agent's spool, read when the agent is down")
    grace_seconds: int = setting(600, kind=schema.SECONDS,
                                 doc="a pending hold with no Slurm job is voided after this")
    lookback_days: int = setting(30, kind=schema.INTEGER, check=lambda v: None if v > 0
                                 else "must be above 0",
                                 doc="how far back the reconciler asks sacct")
    gres_conf: str = setting(DEFAULT_GRES_CONF, kind=schema.STRING,
                             doc="gres.conf: GPU types and shard counts by index (prolog, daemon)")
    close_wait_seconds: float = setting(
        30.0, kind=schema.NUMBER, check=lambda v: None if v >= 0 else "must be at least 0",
        doc="EpilogSlurmctld waits this long for the nodes' charges")
    spool_dir: str = setting("/var/spool/gpuledger/charges", kind=schema.STRING,
                             doc="a node's charge records wait here while the daemon is away")
    daemon: str | None = setting(
        None, kind=schema.STRING, check=_conf_text, example="ctl1:6830",
        default_doc="[daemon] privileged_socket, else [daemon] socket (this host)",
        doc='where the epilog sends its charges: a socket path, or "host:port" of the '
            "daemon's [daemon] node_listen (MUNGE-authenticated)")


@dataclass(frozen=True)
class AgentSection:
    """`gpuledger agent` on each GPU node, from its own file (agent.toml: this table and
    [idle]; a file without [agent] may hold these keys at its top level)."""

    socket: str = setting("/run/gpuledger/agent.sock", kind=schema.STRING,
                          doc="the agent's socket (prolog, epilog)")
    spool: str = setting("/var/spool/gpuledger/agent", kind=schema.STRING,
                         doc="per-job usage written here, read when the agent is down")
    interval: float = setting(1.0, kind=schema.NUMBER, check=_between(0.05, 3600, unit=" seconds"),
                              doc="seconds between NVML samples")
    gres_conf: str = setting(DEFAULT_GRES_CONF, kind=schema.STRING,
                             doc="gres.conf: this node's GPU devices by Slurm index")
    node_name: str | None = setting(None, kind=schema.STRING,
                                    default_doc="this host's short name",
                                    doc="the node's name in gres.conf")
    devices: tuple | None = setting(
        None, kind=schema.DEVICES, example=["/dev/nvidia0", "GPU-3f2c..."],
        doc="device per Slurm index (overrides gres.conf): file, GPU-/MIG- UUID or list of files")
    mig_minors: str = setting("/proc/driver/nvidia-caps/mig-minors", kind=schema.STRING,
                              doc="NVIDIA's MIG minor numbers (MIG device files to UUIDs)")
    allowed_uids: tuple[int, ...] | None = setting(
        None, kind=schema.INTEGERS, default_doc="root and the agent's own user",
        doc="uids that may talk to the agent's socket")
    keep_finished_days: float = setting(7.0, kind=schema.NUMBER, check=_positive,
                                        doc="days a finished job's usage stays in the spool")


@dataclass(frozen=True)
class SmtpSection:
    """Mail for reports, alerts and idle digests (`gpuledger report send`, ...). Without this
    table only dry runs work."""

    host: str | None = setting(None, kind=schema.STRING, example="smtp.example.org",
                               default_doc="(required to send)", doc="the SMTP server")
    port: int | None = setting(None, kind=schema.INTEGER,
                               check=lambda v: None if 0 < v < 65536
                               else "must be between 1 and 65535",
                               default_doc="587 (starttls), 465 (ssl), 25 (none)",
                               doc="the server's port")
    security: str = setting("starttls", kind=schema.STRING,
                            check=_one_of("starttls", "ssl", "none"),
                            doc="TLS: starttls, ssl (implicit TLS) or none")
    sender: str | None = setting(None, kind=schema.STRING, key="from",
                                 example="gpuledger@example.org",
                                 default_doc="(required to send)",
                                 doc="the From address (one address)")
    user: str | None = setting(None, kind=schema.STRING,
                               doc="login name (needs password_file and TLS)")
    password_file: str | None = setting(None, kind=schema.STRING,
                                        doc="file holding the login's password (mode 0600)")
    ca_file: str | None = setting(None, kind=schema.STRING,
                                  doc="CA bundle to check the server with (else the system's)")
    timeout: float = setting(30.0, kind=schema.NUMBER, check=_positive,
                             doc="seconds per SMTP operation")


def _percents(values: tuple[int, ...]) -> str | None:
    if not values or any(not 0 < v <= 100 for v in values) or len(set(values)) != len(values):
        return "must be one or more different whole percents above 0 and at most 100"
    return None


def _reminder_days(values: tuple[int, ...]) -> str | None:
    if any(not 0 <= v <= 366 for v in values) or len(set(values)) != len(values):
        return "must be different whole numbers of days from 0 to 366"
    return None


@dataclass(frozen=True)
class ReportsSection:
    """Monthly reports (`gpuledger report send`) and budget alerts (`gpuledger alerts send`).
    Each recipient gets one mail per run with everything due to them (every account they
    get reports or alerts for, and the alerts of the tokens scoped to them)."""

    admins: tuple[str, ...] = setting((), kind=schema.STRINGS,
                                      doc="addresses that get every account's report")
    alert_thresholds: tuple[int, ...] = setting(
        (80, 90, 100), kind=schema.INTEGERS, check=_percents,
        doc="alert when a token (or an account, all its tokens) has used this % of its GPU-h")
    expiry_reminders: tuple[int, ...] = setting(
        (30, 14, 7, 0), kind=schema.INTEGERS, check=_reminder_days,
        doc="remind this many days before a token with GPU-h left expires (0: that day)")
    alert_digest_s: int = setting(
        86400, kind=schema.SECONDS,
        check=lambda v: "is more than a week" if v > 7 * 86400 else None,
        doc="a recipient gets at most one alert digest in this time; alerts raised meanwhile "
            "wait for the next run after it (0: one each run)")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) → (host, port); ValueError saying why not."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT with a port from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("must name the address to listen on (127.0.0.1:PORT, [::1]:PORT, "
                         "0.0.0.0:PORT)")
    return host, int(port)


def _listen(v: str) -> str | None:
    if v == "":
        return None
    try:
        parse_listen(v)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class MetricsSection:
    """The daemon's HTTP endpoint: Prometheus metrics at /metrics, /livez and /readyz
    (docs/operations.md). Aggregate figures only, unless per_account says otherwise."""

    listen: str = setting(
        "127.0.0.1:9847", kind=schema.STRING, check=_listen,
        doc='address:port of the endpoint ("": off); loopback by default: set an address '
            "Prometheus reaches (and firewall it) to scrape from another host")
    per_account: bool = setting(
        False, kind=schema.BOOLEAN,
        doc="also expose per-account figures (escrow, token balances, charges by account "
            "name); never per user")
    cache_s: float = setting(
        10.0, kind=schema.NUMBER, check=_between(0, 3600, unit=" seconds"),
        doc="seconds a scrape's database figures are reused (scrapes in between read nothing)")


def _plain_decimal(v: str) -> str | None:
    try:
        parse_rate(v)
    except InvalidInput as exc:
        return f"must be a positive decimal number ({exc})"
    return None


@dataclass(frozen=True)
class LimitsSection:
    """Caps on what one admin command may set: a value with a digit too many is refused,
    naming the cap (raise it here when a larger value is meant)."""

    max_token_hours: int = setting(
        1_000_000, kind=schema.INTEGER, check=lambda v: None if v > 0 else "must be above 0",
        doc="largest face value of a minted token, in GPU-hours at the reference rate")
    max_rate: str = setting("100", kind=schema.DECIMAL, check=_plain_decimal,
                            doc="largest rate of a GPU type (the reference GPU's is 1)")
    max_multiplier: str = setting("10", kind=schema.DECIMAL, check=_plain_decimal,
                                  doc="largest tier multiplier (partition, QOS, off-peak)")

    def limits(self) -> Limits:
        return Limits(max_token=self.max_token_hours * SECONDS_PER_HOUR,
                      max_rate_ppm=parse_rate(self.max_rate),
                      max_multiplier_ppm=parse_rate(self.max_multiplier))


@dataclass(frozen=True)
class Section:
    name: str  # "" for the top level
    cls: type
    optional: bool = False  # absent from the file: None (else the defaults)


SECTIONS = (
    Section("", TopLevel),
    Section("database", DatabaseConfig),
    Section("keys", KeysSection),
    Section("daemon", DaemonConfig),
    Section("submit", SubmitConfig),
    Section("charge", ChargeConfig),
    Section("idle", IdlePolicy),
    Section("hooks", HooksSection),
    Section("agent", AgentSection),
    Section("metrics", MetricsSection),
    Section("smtp", SmtpSection, optional=True),
    Section("reports", ReportsSection),
    Section("limits", LimitsSection),
)
TABLES = {s.name: s for s in SECTIONS if s.name}
TOP_KEYS = {i.key for i in schema.items(TopLevel)}


@dataclass(frozen=True)
class Config:
    path: Path
    database: DatabaseConfig
    keys_dir: Path
    cluster: str | None
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    charge: ChargeConfig = field(default_factory=ChargeConfig)
    idle: IdlePolicy = field(default_factory=IdlePolicy)
    hooks: HooksSection = field(default_factory=HooksSection)
    agent: AgentSection = field(default_factory=AgentSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    smtp: SmtpSection | None = None  # None: no [smtp] table (dry runs only)
    reports: ReportsSection = field(default_factory=ReportsSection)
    limits: LimitsSection = field(default_factory=LimitsSection)

    @property
    def submit_socket(self) -> str:
        """The socket job_submit.lua connects to."""
        return self.submit.socket or self.daemon.privileged_socket or self.daemon.socket


def check_tables(raw: dict, p: Path | str) -> None:
    """Every top-level key is a known key or a known table: else a ConfigError with a hint."""
    unknown = [k for k in raw if k not in TABLES and k not in TOP_KEYS]
    if not unknown:
        return
    tables = [k for k in unknown if isinstance(raw[k], dict)]
    if tables:
        raise ConfigError(f"{p}: {schema.unknown_message('section(s)', tables, TABLES)}")
    raise ConfigError(f"{p}: {schema.unknown_message('top-level key(s)', unknown, TOP_KEYS)}")


def read_toml(p: Path) -> dict:
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"no configuration at {p} (run `gpuledger init`, or pass --config / set ${ENV_VAR})"
        ) from None
    except PermissionError:
        raise ConfigError(f"cannot read {p}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{p} is a directory, not a configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None


def load(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the config file; every problem is a ConfigError naming the file."""
    p = config_path(path)
    return parse(read_toml(p), p)


def parse(raw: dict, p: Path) -> Config:
    check_tables(raw, p)
    top = schema.parse_table(TopLevel, {k: v for k, v in raw.items() if k in TOP_KEYS},
                             f"{p}: top level")
    parsed: dict[str, Any] = {}
    for s in SECTIONS[1:]:
        if s.optional and s.name not in raw:
            continue
        where = f"{p}: [{s.name}]"
        table = raw.get(s.name, {})
        parsed[s.name] = (parse_idle(table, where) if s.cls is IdlePolicy
                          else schema.parse_table(s.cls, table, where))
    keys_dir = Path(parsed.pop("keys").dir)
    if not keys_dir.is_absolute():
        keys_dir = p.parent / keys_dir
    return Config(path=p, keys_dir=keys_dir, cluster=top.cluster or None, **parsed)


def agent_settings(raw: dict, where: str) -> tuple[AgentSection, IdlePolicy]:
    """The node agent's file: its [agent] table (or, without one, its top-level keys other
    than gpuledger.toml's own) and [idle]. Other tables may be there (a shared gpuledger.toml)
    but must be known ones."""
    check_tables(raw, where)
    if "agent" in raw:
        table = raw["agent"]
    else:
        table = {k: v for k, v in raw.items() if k not in TOP_KEYS and not isinstance(v, dict)}
    agent = schema.parse_table(AgentSection, table, f"{where}: [agent]")
    idle = parse_idle(raw.get("idle", {}), f"{where}: [idle]")
    return agent, idle
