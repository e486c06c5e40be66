"""The burn-down chart: balance through the month and the projection at the current rate."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from itertools import pairwise

from .png import GLYPH_H, Canvas

WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 62, 16, 22, 30
WHITE, INK, GRID, LINE, AREA, PROJ, MARK, RED = range(8)
PALETTE = [(255, 255, 255), (51, 65, 85), (226, 232, 240), (29, 78, 216), (219, 234, 254),
           (217, 119, 6), (148, 163, 184), (220, 38, 38)]


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


def burndown_png(series: list[tuple[datetime, int]], start: datetime, end: datetime,
                 rate_per_day: int, exhaustion: datetime | None) -> bytes:
    """PNG of the balance (GPU-seconds) at each point, with a dashed projection after the last.

    ``rate_per_day`` is GPU-seconds per day; the projection runs from the last point
    down at that rate, to zero at ``exhaustion`` if that falls inside the chart.
    """
    c = Canvas(WIDTH, HEIGHT, PALETTE)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    domain_end = end + timedelta(days=max(7, (end - start).days // 3)) if rate_per_day > 0 \
        else end
    span_s = (domain_end - start).total_seconds()
    top_h = max([b for _, b in series] + [0]) / 3600
    step = nice_step(top_h if top_h > 0 else 1)
    ymax = step * max(1, math.ceil(top_h / step - 1e-9))

    def px(t: datetime) -> float:
        return x0 + (x1 - x0) * (t - start).total_seconds() / span_s

    def py(amount: float) -> float:
        return y1 - (y1 - y0) * (amount / 3600) / ymax

    # grid and y labels
    v = 0.0
    while v <= ymax + 1e-9:
        y = round(py(v * 3600))
        c.rect(x0, y, x1, y + 1, GRID)
        label = axis_label(v)
        c.text(x0 - 6 - c.text_width(label), y - GLYPH_H // 2, label, INK)
        v += step
    c.text(4, 4, "GPU-h", INK)
    # x ticks: days 1, 8, 15 and 22 of each month shown
    day = start
    while day <= domain_end:
        if day.day in (1, 8, 15, 22):
            x = round(px(day))
            c.rect(x, y1, x + 1, y1 + 4, INK)
            label = f"{day.month:02d}-{day.day:02d}"
            c.text(x - c.text_width(label) // 2, y1 + 8, label, INK)
        day += timedelta(days=1)
    # month end marker
    xe = round(px(end))
    c.line(xe, y0, xe, y1, MARK, 1, dash=(3, 3))
    # balance: area then line
    pts = [(px(t), py(b)) for t, b in series]
    for (ax, ay), (bx, by) in pairwise(pts):
        for x in range(math.ceil(ax), math.floor(bx) + 1):
            f = (x - ax) / (bx - ax) if bx > ax else 0
            c.column(x, round(ay + (by - ay) * f), y1, AREA)
    for (ax, ay), (bx, by) in pairwise(pts):
        c.line(ax, ay, bx, by, LINE, 2)
    # projection
    if series and rate_per_day > 0:
        t_last, b_last = series[-1]
        t_zero = t_last + timedelta(days=b_last / rate_per_day)
        t_stop = min(t_zero, domain_end)
        b_stop = b_last - rate_per_day * (t_stop - t_last).total_seconds() / 86400
        c.line(px(t_last), py(b_last), px(t_stop), py(b_stop), PROJ, 2, dash=(6, 4))
        if exhaustion is not None and t_zero <= domain_end:
            c.dot(round(px(t_zero)), round(py(0)), RED, 7)
    if pts:
        c.dot(round(pts[-1][0]), round(pts[-1][1]), LINE, 6)
    # axes
    c.rect(x0, y0, x0 + 1, y1 + 1, INK)
    c.rect(x0, y1, x1, y1 + 1, INK)
    return c.png()
