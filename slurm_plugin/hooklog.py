"""Logging for the prolog/epilog: ``gpuledger-epilog[JOBID]: …`` to stderr, syslog and a file.

slurmd keeps a hook's stderr only in its own debug log, so every line also goes to syslog
(when /dev/log exists) and to the hooks log file; a log that cannot be opened is skipped, one
in a directory others could write to (or a symlink, or a file with other links) is refused with
a line saying so (``safefs``: root never appends through a planted link).
The handlers sit on the ``gpuledger`` logger, so what the agent client, the usage code and
the ledger log during a hook lands in the same places with the same tag.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

from . import safefs


class _FileHandler(logging.StreamHandler):
    """Lines to a file opened by ``safefs`` (a descriptor, not a path); closing closes it."""

    def close(self) -> None:
        try:
            self.acquire()
            try:
                if self.stream is not None:
                    self.stream.close()
            finally:
                self.release()
        finally:
            super().close()


def setup(name: str, job_id: str | None, log_file: Path | None = None,
          use_syslog: bool = True) -> logging.Logger:
    tag = f"{name}[{job_id or '-'}]"
    log = logging.getLogger("gpuledger")
    for old in log.handlers:
        old.close()
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
            fd = safefs.open_append(log_file, mode=0o640, dir_mode=0o755)
            fh = _FileHandler(os.fdopen(fd, "a", encoding="utf-8", errors="replace"))
            fh.setFormatter(logging.Formatter(f"%(asctime)s {tag}: %(message)s"))
            log.addHandler(fh)
        except safefs.UnsafePath as exc:
            log.error("hook log %s refused (%s); logging to syslog and stderr only",
                      log_file, exc)
        except OSError:
            pass
    hook = logging.getLogger(f"gpuledger.hook.{name}")
    hook.handlers.clear()
    hook.setLevel(logging.NOTSET)
    hook.propagate = True
    return hook
