"""An HTML report rendered by headless Chromium: it draws, the chart loads, the figures are there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import Clock, need
from report_fixtures import PHYSICS, H, at, seed_month

from reports.png import read_png_size
from slurm_plugin.climain import cli

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars", "--window-size=720,2200", "--virtual-time-budget=5000"]


@pytest.fixture
def clock():
    return Clock(at(10, 1))


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_html_report_in_headless_chromium(sqlite_ledger, clock, tmp_path):
    need(shutil.which("chromium") or shutil.which("chromium-browser"), "chromium")
    seed_month(sqlite_ledger, clock)
    conf = tmp_path / "gpuledger.toml"
    url = sqlite_ledger.engine.url.render_as_string(hide_password=False)
    conf.write_text(f'[database]\nurl = "{url}"\n[keys]\ndir = "{tmp_path / "keys"}"\n')
    out = tmp_path / "html"
    res = CliRunner().invoke(cli, ["--config", str(conf), "report", "render", "--month",
                                   "2026-11", "--format", "html", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    page = out / "physics-2026-11.html"
    assert (out / "physics-2026-11.png").exists() and (out / "site-2026-11.html").exists()

    shot = tmp_path / "shot.png"
    run = chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    assert shot.exists(), run.stderr[-2000:]
    data = shot.read_bytes()
    assert len(data) > 20_000  # a blank page compresses to a few hundred bytes
    assert read_png_size(data) == (720, 2200)

    # A test-only copy with a script that reports whether the chart image decoded.
    probe = out / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>", "<script>addEventListener('load', () => { document.body.dataset.chart = "
                   "document.images[0].naturalWidth + 'x' + document.images[0].naturalHeight;"
                   "});</script></body>"))
    run = chromium(tmp_path, "--dump-dom", probe.as_uri())
    dom = run.stdout
    assert 'data-chart="640x260"' in dom, run.stderr[-2000:]
    closing = f"{PHYSICS['closing'] // H}.000"
    assert f'data-figure="closing">{closing}<' in dom
    assert f'data-figure="opening">{PHYSICS["opening"] // H}.000<' in dom
    assert 'data-figure="charged">25.000<' in dom
    assert "<strong>45.7 %</strong>" in dom
    assert "1001" in dom and "2026-12-20" in dom
