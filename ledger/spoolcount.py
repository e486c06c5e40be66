"""How many charge records wait in a node's spool: the one interface between the spool
(written by the epilog when the ledger cannot take a charge, drained when it can) and
what reports it (the daemon's ``gpuledger_spool_backlog_records``, ``gpuledger status``).

A record is a regular file directly in the spool directory whose name does not start with
``.`` (a file being written is a dot-named temporary, renamed into place when whole) and
does not end in ``.tmp``. Subdirectories (for instance one for records given up) are not
counted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def spool_backlog(path: str | os.PathLike) -> int | None:
    """The number of records waiting in ``path``; None when there is no such directory
    (or it cannot be read)."""
    count = 0
    try:
        with os.scandir(Path(path)) as it:
            for entry in it:
                if entry.name.startswith(".") or entry.name.endswith(".tmp"):
                    continue
                try:
                    if stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                        count += 1
                except OSError:
                    continue
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    return count
