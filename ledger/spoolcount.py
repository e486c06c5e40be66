"""How many charge records wait in a node's spool (``[hooks] spool_dir``, written by the
epilog when the daemon cannot take a charge, delivered by ``gpuledger spool flush``): the
one count the daemon's metrics (``gpuledger_spool_backlog_records``) and ``gpuledger
status`` report, without importing the spool's own code (``slurm_plugin.chargespool``,
a layer above; tests/test_operations_files.py keeps the two in step).

A record is a regular file directly in the spool directory named ``<key>.charge.json``;
a dot-named file is one being written, and ``rejected/`` (records the daemon refused,
kept for an admin) is not a backlog.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

RECORD_SUFFIX = ".charge.json"


def spool_backlog(path: str | os.PathLike) -> int | None:
    """The number of records waiting in ``path``; None when there is no such directory
    (or it cannot be read)."""
    count = 0
    try:
        with os.scandir(Path(path)) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.name.endswith(RECORD_SUFFIX):
                    continue
                try:
                    if stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                        count += 1
                except OSError:
                    continue
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    return count
