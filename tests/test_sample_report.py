"""docs/sample-report/ is what the reports render now (tests/sample_report.py makes it)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from sample_report import FILES, render_samples

SAMPLES = Path(__file__).resolve().parents[1] / "docs" / "sample-report"
HINT = "run `.venv/bin/python tests/sample_report.py docs/sample-report`"


def png_pixels(data: bytes) -> tuple[bytes, bytes]:
    """(IHDR, the decompressed image data): the picture, whatever zlib compressed it."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, ihdr, idat = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            ihdr = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return ihdr, zlib.decompress(idat)


def test_sample_reports_are_what_the_code_renders(tmp_path):
    written = render_samples(tmp_path)
    assert sorted(p.name for p in written) == sorted(FILES)
    for name in FILES:
        fresh, committed = (tmp_path / name).read_bytes(), (SAMPLES / name).read_bytes()
        if name.endswith(".png"):
            assert png_pixels(fresh) == png_pixels(committed), f"{name} is stale: {HINT}"
        else:
            assert fresh.decode() == committed.decode(), f"{name} is stale: {HINT}"
