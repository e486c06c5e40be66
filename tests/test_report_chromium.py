"""An HTML report rendered by headless Chromium: it draws, the chart loads at twice its CSS
size, the figures are there, and on a 420 px wide screen nothing needs a horizontal scroll.

Chromium's own window is never narrower than 500 px here, so the phone check lays the report
out in a 420 px wide frame (its document's viewport is 420 px) and reads the document's
scrollWidth and the right edge of every element from inside it. Screenshots are taken with
``chromium --headless --screenshot`` at 420 px and at a desktop width."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import Clock, need
from report_fixtures import PHYSICS, H, at, seed_month

from reports.chart import HEIGHT, SCALE, WIDTH
from reports.png import read_png_size
from slurm_plugin.climain import cli

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars", "--virtual-time-budget=5000"]
PHONE, DESKTOP = 420, 1280
# what the page reports from inside: its scroll width, its viewport, the right edge of its
# furthest element, and each image's natural and shown size
MEASURE = """<script>addEventListener('load', () => {
  const d = document.documentElement;
  const right = Math.max(...[...document.body.querySelectorAll('*')].map(
      e => e.getBoundingClientRect().right));
  const closing = document.querySelector('[data-figure=closing]');
  const data = {scrollWidth: d.scrollWidth, clientWidth: d.clientWidth,
                scrollHeight: Math.ceil(document.body.getBoundingClientRect().height),
                right: Math.ceil(right),
                closingRight: closing ? Math.ceil(closing.getBoundingClientRect().right) : null,
                images: [...document.images].map(i => [i.naturalWidth, i.naturalHeight,
                                                       i.width, i.height])};
  if (parent !== window) parent.postMessage(JSON.stringify(data), '*');
  else document.body.dataset.measured = JSON.stringify(data);
});</script></body>"""
FRAME = """<!DOCTYPE html><html><body style="margin:0">
<iframe src="{src}" width="{width}" height="2400" style="border:0;display:block"></iframe>
<script>addEventListener('message', e => {{ document.body.dataset.measured = e.data; }});
</script></body></html>"""


@pytest.fixture
def clock():
    return Clock(at(10, 1))


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def measured(tmp_path: Path, page: Path, width: int | None) -> tuple[dict, str]:
    """The page's own figures, laid out in a frame ``width`` px wide (None: the window),
    and the DOM Chromium dumped."""
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", MEASURE))
    target = probe
    if width is not None:
        target = page.with_name(f"frame-{width}-{page.name}")
        target.write_text(FRAME.format(src=probe.name, width=width))
    run = chromium(tmp_path, "--window-size=1280,2400", "--dump-dom", target.as_uri())
    m = re.search(r'data-measured="([^"]*)"', run.stdout)
    assert m, run.stderr[-2000:]
    return json.loads(m.group(1).replace("&quot;", '"')), run.stdout


def screenshot(tmp_path: Path, page: Path, width: int) -> tuple[int, int]:
    shot = tmp_path / f"{page.stem}-{width}.png"
    run = chromium(tmp_path, f"--window-size={width},2400", f"--screenshot={shot}",
                   page.as_uri())
    assert shot.exists(), run.stderr[-2000:]
    data = shot.read_bytes()
    assert len(data) > 20_000  # a blank page compresses to a few hundred bytes
    return read_png_size(data)


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
    page, site = out / "physics-2026-11.html", out / "site-2026-11.html"
    assert (out / "physics-2026-11.png").exists() and site.exists()

    # on a phone: no horizontal scroll, the closing balance on screen
    bundle = write_bundle(sqlite_ledger, out)
    phones = {}
    for report in (page, site, out / "chemistry-2026-11.html", bundle):
        phone = phones[report.name] = measured(tmp_path, report, PHONE)[0]
        assert phone["clientWidth"] == PHONE, phone
        assert phone["scrollWidth"] <= PHONE, (report.name, phone)
        assert phone["right"] <= PHONE, (report.name, phone)
        assert phone["closingRight"] is None or phone["closingRight"] <= PHONE, phone
    assert [i[:2] for i in phones[bundle.name]["images"]] == [[WIDTH * SCALE, HEIGHT * SCALE]] * 2
    # the chart: a bitmap of twice its CSS size, shown at its CSS size on a desktop and
    # scaled down to the column on a phone
    desk, dom = measured(tmp_path, page, None)
    assert desk["images"] == [[WIDTH * SCALE, HEIGHT * SCALE, WIDTH, HEIGHT]]
    (chart,) = phones[page.name]["images"]
    assert chart[:2] == [WIDTH * SCALE, HEIGHT * SCALE] and chart[2] < PHONE

    sizes = {w: screenshot(tmp_path, page, w) for w in (PHONE, DESKTOP)}
    assert sizes == {PHONE: (PHONE, 2400), DESKTOP: (DESKTOP, 2400)}
    print(f"screenshots: {PHONE} px -> {sizes[PHONE]}, {DESKTOP} px -> {sizes[DESKTOP]}; "
          f"page {phones[page.name]['scrollWidth']} x {phones[page.name]['scrollHeight']} px "
          f"on the phone, {desk['scrollWidth']} x {desk['scrollHeight']} px on the desktop")

    closing = f"{PHYSICS['closing'] // H}.000"
    assert f'data-figure="closing">{closing}<' in dom
    assert f'data-figure="opening">{PHYSICS["opening"] // H}.000<' in dom
    assert 'data-figure="charged">25.000<' in dom
    assert "<strong>45.7 %</strong>" in dom
    assert "1001" in dom and "2026-12-20" in dom
    assert re.search(r'data-figure="decision"[^>]*>Lasts until your main token expires '
                     r'\(2027-06-30\), about [0-9.]+ GPU-h spare', dom)



def write_bundle(lg, out: Path) -> Path:
    """Both accounts' reports and the site summary as one mail shows them, its inline
    charts written beside it."""
    from ledger import db
    from reports.bundle import render_bundle
    from reports.figures import build
    from reports.period import Month

    month = Month(2026, 11)
    with db.read(lg.engine) as conn:
        site = build(conn, month, lg.clock())
    r = render_bundle([*site.accounts, site], month, sender="gpuledger@hpc.example",
                      generated=lg.clock())
    html = r.html
    for n, (cid, png, _) in enumerate(r.images):
        (out / f"bundle-{n}.png").write_bytes(png)
        html = html.replace(f"cid:{cid}", f"bundle-{n}.png")
    page = out / "bundle.html"
    page.write_text(html)
    return page
