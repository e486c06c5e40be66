"""The before/after benchmarks: their command lines, the baseline tree's gpuledger, and the
Lua-level benchmark end to end (tiny: this tree against itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need
from test_daemon_lua import lua_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import baseline


@pytest.mark.parametrize("script", ["submit_bench.py", "lua_submit_bench.py"])
def test_bench_help_names_the_baseline_options(script):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--baseline-tree PATH" in out.stdout and "--baseline-rev REV" in out.stdout


def test_a_trees_gpuledger_runs_that_trees_code(tmp_path):
    out = subprocess.run([*baseline.gpuledger(ROOT), "--help"], capture_output=True, text=True,
                         check=False, timeout=60)
    assert out.returncode == 0 and "Usage:" in out.stdout, out.stderr
    fake = tmp_path / "fake"
    (fake / "ledger").mkdir(parents=True)
    (fake / "ledger" / "__init__.py").write_text("")
    (fake / "slurm_plugin").mkdir()
    (fake / "slurm_plugin" / "__init__.py").write_text("")
    out = subprocess.run([*baseline.gpuledger(fake), "--help"], capture_output=True, text=True,
                         check=False, timeout=60)
    # its own packages or nothing: never this tree's code under the baseline's name
    assert out.returncode != 0 and "AssertionError" in out.stderr, out.stderr


def test_a_baseline_tree_must_be_a_checkout(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lua_submit_bench.py"),
                          "--baseline-tree", str(tmp_path)], capture_output=True, text=True,
                         check=False, timeout=60)
    assert out.returncode != 0 and "is not a gpuledger checkout" in out.stderr


def test_lua_bench_runs_end_to_end():
    need(lua_available(), "lua5.1 with lua-socket")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lua_submit_bench.py"),
                          "--baseline-tree", str(ROOT), "--rounds", "1", "--calls", "20",
                          "--cpu-jobs"], capture_output=True, text=True, check=False,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "this/baseline gpu:" in out.stdout and "request" in out.stdout, out.stdout
