"""docs/sample-report/: the November 2026 reports of the month the report tests seed
(``report_fixtures.seed_month``), rendered by the real code, with token ids drawn from a
fixed sequence so that the files are the same on every run. tests/test_sample_report.py
checks that the committed files are what the code renders now; after changing a report:

    .venv/bin/python tests/sample_report.py docs/sample-report
"""

from __future__ import annotations

import random
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # run as a script
    sys.path.insert(0, str(TESTS))

MONTH = "2026-11"
FILES = [f"{name}-{MONTH}.{ext}" for name in ("physics", "chemistry", "site")
         for ext in ("txt", "html", "png") if (name, ext) != ("site", "png")]


@contextmanager
def fixed_token_ids() -> Iterator[None]:
    rng = random.Random(2026)
    with mock.patch("ledger.token_ops.new_token_id",
                    lambda: "tok_" + "".join(rng.choice("0123456789abcdef") for _ in range(20))):
        yield


def render_samples(out: Path) -> list[Path]:
    """Seed a private SQLite ledger and render every report of November 2026 into ``out``
    as HTML (with its PNG chart) and text, as `gpuledger report render` writes them."""
    from conftest import Clock, seeded
    from report_fixtures import seed_month

    from reports import deliver
    from reports.period import Month

    with tempfile.TemporaryDirectory(prefix="gl-sample-") as tmp:
        clock = Clock()
        ledger = seeded(f"sqlite:///{tmp}/ledger.db", Path(tmp) / "keys", clock)
        try:
            with fixed_token_ids():
                seed_month(ledger, clock)
            site = deliver.load(ledger, Month.parse(MONTH, clock()), None)
            paths = []
            for fmt in ("html", "text"):
                paths += deliver.render_all(site, fmt, out, include_site=True, now=clock())
        finally:
            ledger.engine.dispose()
    return sorted(paths)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR (docs/sample-report)")
    for path in render_samples(Path(sys.argv[1])):
        print(f"wrote {path}")
