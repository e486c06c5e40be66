"""Entry of the Slurm hooks: ``python -m slurm_plugin.hookmain HOOK`` (stdlib only).

``slurm_plugin/hooks/gpuledger-hook`` (POSIX sh, installed outside the virtualenv) runs this
and exits 0 whatever happens here, so a missing or half-upgraded install cannot drain a
node. This module adds a second guard for the console scripts ``gpuledger-prolog`` /
``gpuledger-epilog``: it imports nothing beyond the standard library before its
``try``, leaves at once for jobs that cannot be gpuledger's (no token, no GPUs), and turns
any import or runtime failure into a logged exit 0.

Hooks: ``prolog``, ``epilog`` (slurmd, every node, root) and ``prolog-slurmctld``,
``epilog-slurmctld`` (slurmctld, the controller, SlurmUser).
"""

import os
import sys

from .hookcodes import REQUEUE

NODE_HOOKS = ("prolog", "epilog")
CTLD_HOOKS = ("prolog-slurmctld", "epilog-slurmctld")
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # what the sh entry sets; here when PATH has none


def _may_be_ours(env) -> bool:
    return bool(env.get("SLURM_JOB_ID") and (
        env.get("SPANK_GPULEDGER_TOKEN") or env.get("SLURM_JOB_GPUS")))


def _job_id() -> str:
    """SLURM_JOB_ID for a log tag: digits, at most 20 of them, else ``-``."""
    job = os.environ.get("SLURM_JOB_ID", "")
    return job if job.isdigit() and len(job) <= 20 else "-"


def _safe_path() -> None:
    """Drop the empty and relative entries of PATH: they name the working directory, and a
    hook run as root must not find a command there (the sh entry fixes PATH altogether)."""
    entries = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join(p for p in entries if p.startswith("/")) or SAFE_PATH


def _complain(hook: str, why: str) -> None:
    line = f"gpuledger-{hook}[{_job_id()}]: {why}"
    try:
        print(line, file=sys.stderr)
        import syslog

        syslog.openlog(f"gpuledger-{hook}", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR, line)
    except Exception:  # noqa: BLE001 - nothing may escape
        pass


def run(hook: str) -> int:
    if hook not in NODE_HOOKS + CTLD_HOOKS:
        _complain(hook, f"unknown hook {hook!r}; nothing done")
        return 0
    if not _may_be_ours(os.environ):
        return 0
    _safe_path()
    try:
        if hook == "prolog":
            from .prolog import main
        elif hook == "epilog":
            from .epilog import main
        elif hook == "prolog-slurmctld":
            from .ctld import prolog_main as main
        else:
            from .ctld import epilog_main as main
        code = main()
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - a non-zero exit would drain the node
        _complain(hook, f"cannot run ({exc.__class__.__name__}: {exc}); left for "
                  "gpuledger reconcile")
        return 0
    return REQUEUE if hook == "prolog-slurmctld" and code == REQUEUE else 0


def prolog_main() -> None:
    sys.exit(run("prolog"))


def epilog_main() -> None:
    sys.exit(run("epilog"))


def prolog_slurmctld_main() -> None:
    sys.exit(run("prolog-slurmctld"))


def epilog_slurmctld_main() -> None:
    sys.exit(run("epilog-slurmctld"))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else ""))
