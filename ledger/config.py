"""The TOML configuration: where it lives, what it holds, how it is written."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .idle import IdlePolicy
from .idle import parse as parse_idle

DEFAULT_PATH = Path("/etc/gpuledger/gpuledger.toml")
ENV_VAR = "GPULEDGER_CONFIG"
POLICIES = ("allocated", "measured")
UNAVAILABLE_MODES = ("reject", "accept")


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    """``--config`` wins, then ``$GPULEDGER_CONFIG``, then /etc/gpuledger/gpuledger.toml."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return DEFAULT_PATH


@dataclass(frozen=True)
class DatabaseConfig:
    url: str
    password_file: str | None = None


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = "/run/gpuledger/gpuledger.sock"
    socket_group: str | None = None
    privileged_socket: str | None = None
    slurm_user: str = "slurm"
    max_line: int = 16384
    fast_reserve: bool = False
    fast_reserve_fresh_s: float = 2.0
    fast_reserve_batch_ms: float = 2.0


@dataclass(frozen=True)
class SubmitConfig:
    timeout: float = 1.0
    on_ledger_unavailable: str = "reject"
    free_accounts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChargeConfig:
    policy: str = "allocated"
    floor: str = "0.25"
    partitions: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    path: Path
    database: DatabaseConfig
    keys_dir: Path
    cluster: str | None
    daemon: DaemonConfig
    submit: SubmitConfig
    charge: ChargeConfig
    raw: dict[str, Any]
    idle: IdlePolicy = field(default_factory=IdlePolicy)

    def section(self, name: str) -> dict[str, Any]:
        """A raw section for components that own their settings (agent, smtp, reports)."""
        value = self.raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.path}: [{name}] must be a table")
        return value


def _table(raw: dict, name: str, path: Path) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return value


def _get(table: dict, key: str, kind: type | tuple, default: Any, path: Path, section: str) -> Any:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{path}: [{section}] {key} has the wrong type ({type(value).__name__})")
    return value


def load(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the config file; every problem is a ConfigError naming the file."""
    p = config_path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"no configuration at {p} (run `gpuledger init`, or pass --config / set ${ENV_VAR})"
        ) from None
    except PermissionError:
        raise ConfigError(f"cannot read {p}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    return parse(raw, p)


def parse(raw: dict, p: Path) -> Config:
    base = p.parent
    db = _table(raw, "database", p)
    url = _get(db, "url", str, None, p, "database")
    if not url:
        raise ConfigError(f"{p}: [database] url is required")
    pw_file = _get(db, "password_file", str, None, p, "database")
    keys = _table(raw, "keys", p)
    keys_dir = Path(_get(keys, "dir", str, "keys", p, "keys"))
    if not keys_dir.is_absolute():
        keys_dir = base / keys_dir
    d = _table(raw, "daemon", p)
    daemon = DaemonConfig(
        socket=_get(d, "socket", str, DaemonConfig.socket, p, "daemon"),
        socket_group=_get(d, "socket_group", str, None, p, "daemon"),
        privileged_socket=_get(d, "privileged_socket", str, None, p, "daemon") or None,
        slurm_user=_get(d, "slurm_user", str, "slurm", p, "daemon"),
        max_line=_get(d, "max_line", int, DaemonConfig.max_line, p, "daemon"),
        fast_reserve=_get(d, "fast_reserve", bool, False, p, "daemon"),
        fast_reserve_fresh_s=float(_get(d, "fast_reserve_fresh_s", (int, float), 2.0, p,
                                        "daemon")),
        fast_reserve_batch_ms=float(_get(d, "fast_reserve_batch_ms", (int, float), 2.0, p,
                                         "daemon")),
    )
    if not 0.1 <= daemon.fast_reserve_fresh_s <= 60:
        raise ConfigError(f"{p}: [daemon] fast_reserve_fresh_s must be between 0.1 and 60")
    if not 0 <= daemon.fast_reserve_batch_ms <= 60_000:
        raise ConfigError(f"{p}: [daemon] fast_reserve_batch_ms must be between 0 and 60000")
    s = _table(raw, "submit", p)
    submit = SubmitConfig(
        timeout=float(_get(s, "timeout", (int, float), 1.0, p, "submit")),
        on_ledger_unavailable=_get(s, "on_ledger_unavailable", str, "reject", p, "submit"),
        free_accounts=tuple(_get(s, "free_accounts", list, [], p, "submit")),
    )
    if submit.on_ledger_unavailable not in UNAVAILABLE_MODES:
        raise ConfigError(
            f"{p}: [submit] on_ledger_unavailable must be one of {', '.join(UNAVAILABLE_MODES)}"
        )
    if not 0 < submit.timeout <= 30:
        raise ConfigError(f"{p}: [submit] timeout must be between 0 and 30 seconds")
    c = _table(raw, "charge", p)
    charge = ChargeConfig(
        policy=_get(c, "policy", str, "allocated", p, "charge"),
        floor=str(_get(c, "floor", (int, float, str), "0.25", p, "charge")),
        partitions=_get(c, "partitions", dict, {}, p, "charge"),
    )
    if charge.policy not in POLICIES:
        raise ConfigError(f"{p}: [charge] policy must be one of {', '.join(POLICIES)}")
    cluster = _get(raw, "cluster", str, None, p, "top level") or None
    idle = parse_idle(_table(raw, "idle", p), f"{p}: [idle]")
    return Config(
        path=p,
        database=DatabaseConfig(url=url, password_file=pw_file),
        keys_dir=keys_dir,
        cluster=cluster,
        daemon=daemon,
        submit=submit,
        charge=charge,
        raw=raw,
        idle=idle,
    )


TEMPLATE = """\
# gpuledger configuration (TOML). Written by `gpuledger init`; edit freely.

# Name of this Slurm cluster as tokens see it (scope `--clusters`). Empty: any.
cluster = {cluster}

[database]
# SQLAlchemy URL of the ledger. SQLite (the default) suits one host; use
# postgresql+psycopg://user@host/db or mysql+pymysql://user@host/db for several.
url = {url}
# A server password is read from this file (mode 0600), never written in the URL.
# password_file = "/etc/gpuledger/db.password"

[keys]
# Directory of Ed25519 signing keys (<kid>.key, mode 0600). Only the host that
# mints tokens needs private keys; verification reads public keys from the ledger.
dir = "keys"

[daemon]
# Unix socket of `gpuledger serve`; slurmctld (SlurmUser) must reach it.
socket = "/run/gpuledger/gpuledger.sock"
# Group owning the socket (mode 0660 when set, else 0666 with peer-credential checks).
# socket_group = "slurm"
# A second socket only root and the SlurmUser can open (mode 0600, owned by slurm_user).
# Point job_submit.conf's `socket` at it: no flood of users' connections keeps slurmctld out.
# privileged_socket = "/run/gpuledger/gpuledger-slurm.sock"
slurm_user = "slurm"
# Answer slurmctld's reserves from memory and write them in batches a few ms later
# (ledger/daemon/fastpath.py): the submit path stops waiting for a commit. A hold the
# daemon answered but could not write (it died, the token was spent meanwhile) is
# reserved again, or its job cancelled, when the job starts.
# fast_reserve = false
# fast_reserve_fresh_s = 2.0   # how old a token's balance may be to answer from it
# fast_reserve_batch_ms = 2    # how long the writer lets answers gather per transaction

[submit]
# Seconds job_submit.lua waits for the daemon before giving up.
timeout = 1.0
# When the daemon cannot answer: "reject" the GPU job, or "accept" it and
# reserve later in the prolog (nothing is lost either way).
on_ledger_unavailable = "reject"
# Slurm accounts whose GPU jobs need no token.
free_accounts = []

[charge]
# "allocated" = held GPU time x rate; "measured" = per GPU max(busy, floor x held) x rate.
policy = "allocated"
floor = 0.25

# [idle]  (idle GPUs, ledger.idle; the values shown are the defaults)
# threshold_pct = 5        # a GPU below this utilization is idle
# flag_after_s = 3600      # one idle stretch this long flags the job (0: never)
# refund_share = 0         # share of a flagged job's idle cost refunded (0..1)
# cancel_after_s = 0       # the agent cancels a wholly idle job this long after the flag
# user_mail = "{{user}}@example.org"  # digest recipient (else the account's report_to)

# [hooks]  (prolog, epilog and `gpuledger reconcile`; the values shown are the defaults)
# state_dir = "/var/lib/gpuledger/jobs"      # per-node prolog records
# log_file = "/var/log/gpuledger/hooks.log"  # also to syslog (syslog = true)
# agent_socket = "/run/gpuledger/agent.sock" # the node agent (NVML)
# agent_spool = "/var/spool/gpuledger/agent" # read when the agent is down
# grace_seconds = 600                        # a pending hold with no Slurm job is voided after
# lookback_days = 30                         # how far back the reconciler asks sacct
# gres_conf = "/etc/slurm/gres.conf"         # GPU types by index (prolog)
# close_wait_seconds = 30                    # EpilogSlurmctld waits for the nodes' charges
"""


def _toml_str(value: str | None) -> str:
    if value is None:
        return '""'
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(url: str, cluster: str | None = None) -> str:
    return TEMPLATE.format(url=_toml_str(url), cluster=_toml_str(cluster or ""))


def write_new(path: Path, url: str, cluster: str | None = None) -> None:
    """Write a fresh config file (mode 0640); refuses to overwrite an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; edit it or pass another --config") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(render(url, cluster))
