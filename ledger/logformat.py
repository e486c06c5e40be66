"""One timestamp for every gpuledger log line that is not journald's or syslog's alone:
UTC to the millisecond, ``2026-11-01T12:00:00.123Z`` (the daemon's request log writes the
same as ``ts=``). Under systemd journald adds its own; a log file written without it
(services started directly, their output appended to /var/log/gpuledger) needs this."""

from __future__ import annotations

import logging
import time


class UTCFormatter(logging.Formatter):
    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


def setup(fmt: str = "%(asctime)s %(message)s", level: int = logging.INFO) -> None:
    """Stamped lines on stderr for the root logger, unless something configured it."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(UTCFormatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
