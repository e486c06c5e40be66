"""Fixtures of the two-cluster lane (tests/lanes/twocluster): clusters alpha and beta on one
PostgreSQL ledger, brought up once for the session and torn down after it, failed or not.

These tests start real Slurm daemons as root; ``pytest tests`` collects them only when
``GPULEDGER_TWOCLUSTER=1`` (the lane sets it; see tests/conftest.py). Under CI=true a host
that cannot run them (no root, munged, slurmdbd or PostgreSQL) fails them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clusterkit

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(available: bool, what: str) -> None:
    """tests/conftest.py's rule: skip by hand, fail under CI=true."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but is not available")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def site():
    why = clusterkit.host_services()
    need(why is None, f"two Slurm clusters on this host ({why})")
    s = clusterkit.two_clusters()
    try:
        s.up()
        yield s
    finally:
        s.down()


@pytest.fixture
def clean(site):
    """Every job of the test cancelled afterwards and every hold it left settled."""
    yield site
    for c in site.clusters.values():
        c.cancel_all()
