"""The SPANK plugin's Makefile: warnings stop the build only when asked (``WERROR=1``).

Sites build the plugin against their own Slurm's headers (22.05 .. 26.05) with their own
compiler; a warning from a header the project never saw must not fail their install. The
project's own tests and cluster (``tests/cluster/up``) build with ``WERROR=1``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import need

SPANK = Path(__file__).resolve().parents[1] / "slurm_plugin" / "spank"


def dry_run(*args: str) -> str:
    need(shutil.which("make") is not None, "make")
    out = subprocess.run(["make", "-n", "-B", "-C", str(SPANK), "PLUGINDIR=/nowhere", *args],
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_werror_is_off_by_default():
    line = next(ln for ln in dry_run().splitlines() if "gpuledger_spank.c" in ln)
    assert "-Wall" in line and "-Wextra" in line and "-Werror" not in line


@pytest.mark.parametrize("args,werror", [(("WERROR=1",), True), (("WERROR=0",), False),
                                         (("WERROR=",), False)])
def test_werror_when_asked(args, werror):
    line = next(ln for ln in dry_run(*args).splitlines() if "gpuledger_spank.c" in ln)
    assert ("-Werror" in line) is werror


def test_cluster_build_uses_werror():
    up = (Path(__file__).parent / "cluster" / "up").read_text()
    assert 'make -s -C "$repo/slurm_plugin/spank" WERROR=1 install' in up


def test_plugin_builds_without_warnings_here(tmp_path):
    """The project's own build: every warning is an error (needs cc and slurm/spank.h)."""
    have = shutil.which("cc") is not None and Path("/usr/include/slurm/spank.h").exists()
    need(have, "cc and Slurm's headers (apt install gcc libslurm-dev)")
    out = tmp_path / "gpuledger.so"
    subprocess.run(["make", "-B", "-C", str(SPANK), "WERROR=1", f"PLUGINDIR={tmp_path}",
                    "DESTDIR=", "install"], check=True, capture_output=True, text=True)
    assert out.exists()
    subprocess.run(["make", "-C", str(SPANK), "clean"], check=True, capture_output=True)
