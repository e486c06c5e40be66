"""The operators' files agree with what they describe: each systemd unit's Documentation=
names a document that ships; the Grafana dashboard is valid JSON whose every metric the
endpoint serves; docs/operations.md names every metric; the logrotate rules parse."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jinja2
from conftest import need
from test_metrics import Served, reserve

from ledger import settlement
from ledger.daemon.client import Client
from ledger.daemon.fastpath import FastReserve

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "slurm_plugin" / "systemd"
DOC_PREFIX = "file:///opt/gpuledger/venv/share/doc/gpuledger/"  # the roles rewrite the venv
METRIC = re.compile(r"\bgpuledger_[a-z0-9_]+")


def shipped_docs() -> dict[str, Path]:
    """share/doc/gpuledger's files, as pyproject.toml installs them with the package."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    files = data["tool"]["setuptools"]["data-files"]["share/doc/gpuledger"]
    return {Path(f).name: ROOT / f for f in files}


def test_every_units_documentation_ships_with_the_package():
    shipped = shipped_docs()
    units = sorted(UNITS.glob("gpuledger*.*"))
    assert {u.name for u in units} >= {"gpuledger.service", "gpuledger-agent.service",
                                       "gpuledger-verify.timer", "gpuledger-reconcile.timer"}
    for unit in units:
        lines = [ln for ln in unit.read_text().splitlines() if ln.startswith("Documentation=")]
        assert len(lines) == 1, f"{unit.name}: one Documentation= line"
        for url in lines[0].removeprefix("Documentation=").split():
            assert url.startswith(DOC_PREFIX), f"{unit.name}: {url}"
            name = url.removeprefix(DOC_PREFIX)
            assert name in shipped, f"{unit.name}: {name} is not installed by pyproject.toml"
            assert shipped[name].is_file(), f"{unit.name}: {shipped[name]} does not exist"
    for path in shipped.values():
        assert path.is_file(), path


def full_output(ledger, tmp_path) -> str:
    """The endpoint's text after reserves (fast path), refusals, a charge, a verify and
    with a spool and the per-account figures on: every metric it can serve."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "r1.charge.json").write_text("{}")
    token = ledger.mint("physics", 10 * 3600)[0]
    s = Served(ledger, spool=str(spool), per_account=True, fast=FastReserve(ledger))
    try:
        with Client(s.daemon.path) as c:
            held = reserve(c, token, "a1")
            assert held["ok"] == "1"
            assert reserve(c, token, "a2", gpus=900)["reason"] == "insufficient"
            assert c.call("ping")["ok"] == "1"
        s.fast.flush()
        settlement.post_node(ledger, held["hold"], "7", 0, "n1", 100, {"source": "held"})
        settlement.close(ledger, held["hold"], "done")
        assert ledger.verify_journal().ok
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics", timeout=10) as r:
            return r.read().decode()
    finally:
        s.close()


def test_the_grafana_dashboard_queries_only_metrics_the_endpoint_serves(sqlite_ledger, tmp_path):
    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", "") for v in dash["templating"]["list"]
              if isinstance(v.get("query"), str)]
    assert len(exprs) >= 12
    served = set(re.findall(r"^(gpuledger_[a-z0-9_]+)", full_output(sqlite_ledger, tmp_path),
                            re.MULTILINE))
    queried = {m for e in exprs for m in METRIC.findall(e)}
    assert queried and queried <= served, sorted(queried - served)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_operations_md_names_every_metric_the_endpoint_serves(sqlite_ledger, tmp_path):
    text = full_output(sqlite_ledger, tmp_path)
    families = set(re.findall(r"^# TYPE (gpuledger_[a-z0-9_]+) (\w+)", text, re.MULTILINE))
    doc = (ROOT / "docs" / "operations.md").read_text()
    named = set(METRIC.findall(doc))
    assert len(families) >= 25
    for name, kind in families:
        assert name in named, f"docs/operations.md does not name {name}"
        # Prometheus' naming: counters end in _total, amounts in base units
        assert (kind == "counter") == name.endswith("_total"), (name, kind)
        assert not re.search(r"_(ms|milliseconds|microseconds|hours|minutes)(_|$)", name), name


def test_the_logrotate_rules_parse(tmp_path):
    need(shutil.which("logrotate") is not None, "logrotate")
    template = ROOT / "ansible/roles/gpuledger_controller/templates/logrotate.j2"
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "hooks.log").write_text("x\n")
    rules = tmp_path / "gpuledger"
    rules.write_text(jinja2.Template(template.read_text()).render(
        ansible_managed="Ansible managed", gpuledger_log_dir=str(logs)))
    rules.chmod(0o644)
    r = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(rules)],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"rotating pattern: {logs}/*.log" in r.stdout + r.stderr
    assert "copytruncate" in rules.read_text()


def test_the_metrics_count_the_spool_as_the_spool_does(tmp_path):
    """ledger.spoolcount (the daemon's gauge, `gpuledger status`) counts what
    slurm_plugin.chargespool leaves for delivery, without importing it."""
    from ledger.nodecharge import NodeCharge
    from ledger.spoolcount import RECORD_SUFFIX, spool_backlog
    from slurm_plugin import chargespool

    assert chargespool.SUFFIX == RECORD_SUFFIX
    spool = tmp_path / "charges"
    assert spool_backlog(spool) is None
    for job in ("11", "12", "13"):
        chargespool.put(spool, NodeCharge(job_id=job, restart=0, node="n1", start=1.0, end=2.0),
                        durable=False)
    (spool / "rejected").mkdir(mode=0o700)
    (spool / ".partial.charge.json").write_text("{}")
    assert spool_backlog(spool) == chargespool.backlog(spool) == 3
