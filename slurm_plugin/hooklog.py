"""Logging for the prolog/epilog: ``gpuledger-epilog[JOBID]: …`` to stderr, syslog and a file.

slurmd keeps a hook's stderr only in its own debug log, so every line also goes to syslog
(when /dev/log exists) and to the hooks log file; a log that cannot be opened is skipped.
The handlers sit on the ``gpuledger`` logger, so what the agent client, the usage code and
the ledger log during a hook lands in the same places with the same tag.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path


def setup(name: str, job_id: str | None, log_file: Path | None = None,
          use_syslog: bool = True) -> logging.Logger:
    tag = f"{name}[{job_id or '-'}]"
    log = logging.getLogger("gpuledger")
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    plain = logging.Formatter(f"{tag}: %(message)s")
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(plain)
    log.addHandler(err)
    if use_syslog and os.path.exists("/dev/log"):
        try:
            sl = logging.handlers.SysLogHandler(address="/dev/log",
                                                facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            sl.setFormatter(plain)
            log.addHandler(sl)
        except OSError:
            pass
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file)
            fh.setFormatter(logging.Formatter(f"%(asctime)s {tag}: %(message)s"))
            log.addHandler(fh)
        except OSError:
            pass
    hook = logging.getLogger(f"gpuledger.hook.{name}")
    hook.handlers.clear()
    hook.setLevel(logging.NOTSET)
    hook.propagate = True
    return hook
