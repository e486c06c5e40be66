"""The burn-down chart: the balance through the month, the projection token by token, when
it runs out and when the main token expires, with a legend — one PNG that mail clients show.

It is drawn at twice its size (``SCALE``): the HTML shows it at ``WIDTH × HEIGHT`` CSS
pixels, so screens with two device pixels per CSS pixel (most phones, HiDPI laptops) get a
sharp image and the others a smooth downscale. Coordinates below are CSS pixels; ``_S``
turns them into the bitmap's.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from itertools import pairwise

from ledger.amounts import fmt_hours

from .png import GLYPH_H, GLYPH_W, Canvas
from .projection import Projection

WIDTH, HEIGHT = 640, 300  # CSS pixels
SCALE = 2  # bitmap pixels per CSS pixel
LEFT, RIGHT, TOP, BOTTOM = 56, 18, 58, 30
WHITE, INK, GRID, LINE, AREA, PROJ, MARK, RED, EXPIRY = range(9)
PALETTE = [(255, 255, 255), (51, 65, 85), (226, 232, 240), (29, 78, 216), (219, 234, 254),
           (217, 119, 6), (148, 163, 184), (220, 38, 38), (124, 58, 237)]
MIN_AHEAD = timedelta(days=7)  # the projection shows at least this far past the month
MAX_AHEAD = timedelta(days=92)  # and at most this far: a later date is marked at the edge
TEXT_W, TEXT_H = GLYPH_W / SCALE, GLYPH_H / SCALE  # one character, in CSS pixels


def nice_step(span: float, ticks: int = 4) -> float:
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def axis_label(hours: float) -> str:
    if hours >= 10_000:
        return f"{hours / 1000:g}k"
    if hours == int(hours):
        return f"{int(hours):,}"
    return f"{hours:g}"


def _S(v: float) -> int:
    return round(v * SCALE)


class _Chart:
    """A canvas addressed in CSS pixels."""

    def __init__(self):
        self.c = Canvas(WIDTH * SCALE, HEIGHT * SCALE, PALETTE)

    def rect(self, x0, y0, x1, y1, colour):
        self.c.rect(_S(x0), _S(y0), _S(x1), _S(y1), colour)

    def line(self, x0, y0, x1, y1, colour, width=1.0, dash=None):
        self.c.line(x0 * SCALE, y0 * SCALE, x1 * SCALE, y1 * SCALE, colour, _S(width),
                    dash=None if dash is None else (_S(dash[0]), _S(dash[1])))

    def dot(self, x, y, colour, size):
        self.c.dot(_S(x), _S(y), colour, _S(size))

    def text(self, x, y, text, colour):
        """Text whose cell's top left is at (x, y)."""
        self.c.text(_S(x), _S(y), text, colour)

    @staticmethod
    def width(text: str) -> float:
        return len(text) * TEXT_W


def domain_end(start: datetime, end: datetime, p: Projection | None) -> datetime:
    """The chart's right edge: a week past the month at least, far enough to show the
    run-out and the main token's expiry, but no more than MAX_AHEAD past the month."""
    if p is None:
        return end
    wanted = [end + MIN_AHEAD] + [t for t in (p.run_out, p.horizon) if t is not None]
    return min(max(wanted), end + MAX_AHEAD)


def legend_items(p: Projection | None) -> list[tuple[str, int, str]]:
    """(what, colour, label) of each mark the chart draws."""
    items = [("line", LINE, "Balance")]
    if p is None:
        return items
    items.append(("dash", PROJ, f"Projection at {fmt_hours(p.rate_per_day)} GPU-h/day"))
    if p.run_out is not None:
        items.append(("dot", RED, f"Runs out {p.run_out.date().isoformat()}"))
    if p.horizon is not None:
        items.append(("vline", EXPIRY, f"Main token expires {p.horizon.date().isoformat()}"))
    return items


def burndown_png(series: list[tuple[datetime, int]], start: datetime, end: datetime,
                 projection: Projection | None = None) -> bytes:
    """PNG of the balance (GPU-seconds) at each point of ``series``, then the projection's
    path (the spendable balance, dropping where a token expires with something left), the
    run-out date and the main token's expiry."""
    ch = _Chart()
    p = projection
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    right = domain_end(start, end, p)
    span_s = (right - start).total_seconds()
    path = list(p.path) if p is not None else []
    top_h = max([b for _, b in series] + [b for _, b in path] + [0]) / 3600
    step = nice_step(top_h if top_h > 0 else 1)
    ymax = step * max(1, math.ceil(top_h / step - 1e-9))

    def px(t: datetime) -> float:
        return x0 + (x1 - x0) * (t - start).total_seconds() / span_s

    def py(amount: float) -> float:
        return y1 - (y1 - y0) * (amount / 3600) / ymax

    _legend(ch, legend_items(p))
    # grid and y labels
    v = 0.0
    while v <= ymax + 1e-9:
        y = py(v * 3600)
        ch.rect(x0, y, x1, y + 0.5, GRID)
        label = axis_label(v)
        ch.text(x0 - 6 - ch.width(label), y - TEXT_H / 2, label, INK)
        v += step
    ch.text(4, TOP - TEXT_H - 6, "GPU-h", INK)
    _x_ticks(ch, start, right, px, y1)
    # balance: area then line
    pts = [(px(t), py(b)) for t, b in series]
    for (ax, ay), (bx, by) in pairwise(pts):
        for xd in range(math.ceil(ax * SCALE), math.floor(bx * SCALE) + 1):
            f = (xd / SCALE - ax) / (bx - ax) if bx > ax else 0
            ch.c.column(xd, round((ay + (by - ay) * f) * SCALE), y1 * SCALE, AREA)
    for (ax, ay), (bx, by) in pairwise(pts):
        ch.line(ax, ay, bx, by, LINE, 2)
    if p is not None:
        _projection(ch, p, px, py, right, (x0, x1, y0, y1))
    if pts:
        ch.dot(pts[-1][0], pts[-1][1], LINE, 6)
    # axes
    ch.rect(x0, y0, x0 + 1, y1 + 1, INK)
    ch.rect(x0, y1, x1, y1 + 1, INK)
    return ch.c.png()


def _legend(ch: _Chart, items: list[tuple[str, int, str]]) -> None:
    """The legend, left to right, wrapping onto a second row when the first is full."""
    x, y = LEFT, 6
    for kind, colour, label in items:
        w = 22 + ch.width(label)
        if x + w > WIDTH - RIGHT and x > LEFT:
            x, y = LEFT, y + TEXT_H + 6
        mid = y + TEXT_H / 2
        if kind == "line":
            ch.line(x, mid, x + 16, mid, colour, 2)
        elif kind == "dash":
            ch.line(x, mid, x + 16, mid, colour, 2, dash=(4, 2))
        elif kind == "dot":
            ch.dot(x + 8, mid, colour, 7)
        else:
            ch.line(x + 8, y, x + 8, y + TEXT_H, colour, 1.5, dash=(2, 2))
        ch.text(x + 22, y, label, INK)
        x += w + 16


def _x_ticks(ch: _Chart, start: datetime, right: datetime, px, y1: float) -> None:
    """Days 1, 8, 15 and 22 of each month over two months or less; 1 and 15 up to five;
    else the first of each month."""
    days = (right - start).days
    marks = (1, 8, 15, 22) if days <= 62 else (1, 15) if days <= 150 else (1,)
    day = start
    while day <= right:
        if day.day in marks:
            x = px(day)
            ch.rect(x, y1, x + 1, y1 + 4, INK)
            label = f"{day.month:02d}-{day.day:02d}"
            ch.text(x - ch.width(label) / 2, y1 + 7, label, INK)
        day += timedelta(days=1)


def _projection(ch: _Chart, p: Projection, px, py, right: datetime, box) -> None:
    _, x1, y0, y1 = box
    # the path, clipped at the right edge
    shown: list[tuple[datetime, int]] = []
    for (ta, ba), (tb, bb) in pairwise(p.path):
        if ta >= right:
            break
        if tb > right:
            f = (right - ta).total_seconds() / (tb - ta).total_seconds()
            tb, bb = right, ba + (bb - ba) * f
        shown += [(ta, ba), (tb, bb)]
    for (ta, ba), (tb, bb) in pairwise(shown):
        if (ta, ba) != (tb, bb):
            ch.line(px(ta), py(ba), px(tb), py(bb), PROJ, 2, dash=(6, 4))
    if p.horizon is not None:
        if p.horizon <= right:
            x = px(p.horizon)
            ch.line(x, y0, x, y1, EXPIRY, 1.5, dash=(4, 3))
        else:
            _edge_arrow(ch, x1, y0 + 8, EXPIRY)
    if p.run_out is not None:
        if p.run_out <= right:
            ch.dot(px(p.run_out), py(0), RED, 9)
        else:
            _edge_arrow(ch, x1, y1 - 8, RED)


def _edge_arrow(ch: _Chart, x: float, y: float, colour: int) -> None:
    """A small triangle at the right edge: the date lies beyond the chart."""
    for i in range(8):
        ch.rect(x - 8 + i, y - (8 - i) / 2, x - 7 + i, y + (8 - i) / 2, colour)
