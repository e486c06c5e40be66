"""A small palette-based raster canvas and PNG encoder (zlib only, no imaging library).

Enough for a line chart in an email: rectangles, lines of a given width (solid
or dashed), and text in a built-in 10×20 bitmap font (printable ASCII, reports.glyphs).
"""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache

from . import glyphs

GLYPH_W, GLYPH_H, GLYPH_ASCENT = glyphs.WIDTH, glyphs.HEIGHT, glyphs.ASCENT


class Canvas:
    """``width × height`` pixels, each an index into ``palette`` (RGB triples)."""

    def __init__(self, width: int, height: int, palette: list[tuple[int, int, int]]):
        if not 1 <= len(palette) <= 256:
            raise ValueError("palette must have 1 to 256 colours")
        self.width, self.height, self.palette = width, height, palette
        self.px = bytearray(width * height)  # colour 0 everywhere

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: int) -> None:
        """Fill [x0, x1) × [y0, y1), clipped."""
        x0, x1 = max(0, x0), min(self.width, x1)
        y0, y1 = max(0, y0), min(self.height, y1)
        if x0 >= x1 or y0 >= y1:
            return
        row = bytes([colour]) * (x1 - x0)
        w = self.width
        for y in range(y0, y1):
            self.px[y * w + x0:y * w + x1] = row

    def column(self, x: int, y0: int, y1: int, colour: int) -> None:
        """Fill one column from y0 to y1 (exclusive), clipped: fast strided assignment."""
        if not 0 <= x < self.width:
            return
        y0, y1 = max(0, y0), min(self.height, y1)
        if y0 < y1:
            w = self.width
            self.px[y0 * w + x:y1 * w + x:w] = bytes([colour]) * (y1 - y0)

    def dot(self, x: int, y: int, colour: int, size: int = 1) -> None:
        h = size // 2
        self.rect(x - h, y - h, x - h + size, y - h + size, colour)

    def line(self, x0: float, y0: float, x1: float, y1: float, colour: int, width: int = 1,
             dash: tuple[int, int] | None = None) -> None:
        """Bresenham between two points, ``width`` pixels thick, optionally dashed (on, off)."""
        x0, y0, x1, y1 = round(x0), round(y0), round(x1), round(y1)
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, step = dx + dy, 0
        while True:
            if dash is None or step % (dash[0] + dash[1]) < dash[0]:
                self.dot(x0, y0, colour, width)
            if x0 == x1 and y0 == y1:
                break
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy
            step += 1

    def text(self, x: int, y: int, text: str, colour: int, scale: int = 1) -> None:
        """``text`` with its cell's top left at (x, y); characters outside printable ASCII
        draw as blanks."""
        ink = bytes([colour]) * (GLYPH_W * scale)
        w = self.width
        for ch in text:
            inside = (0 <= x and x + GLYPH_W * scale <= w and 0 <= y
                      and y + GLYPH_H * scale <= self.height)
            for gy, runs in enumerate(_runs(ch)):
                for a, b in runs:
                    if not inside:
                        self.rect(x + a * scale, y + gy * scale, x + b * scale,
                                  y + (gy + 1) * scale, colour)
                        continue
                    for dy in range(scale):
                        off = (y + gy * scale + dy) * w + x
                        self.px[off + a * scale:off + b * scale] = ink[:(b - a) * scale]
            x += GLYPH_W * scale

    @staticmethod
    def text_width(text: str, scale: int = 1) -> int:
        return len(text) * GLYPH_W * scale

    def png(self) -> bytes:
        w = self.width
        raw = b"".join(b"\x00" + bytes(self.px[y * w:(y + 1) * w]) for y in range(self.height))
        palette = b"".join(bytes(c) for c in self.palette)
        return (b"\x89PNG\r\n\x1a\n"
                + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, self.height, 8, 3, 0, 0, 0))
                + _chunk(b"PLTE", palette)
                + _chunk(b"IDAT", zlib.compress(raw, 6))
                + _chunk(b"IEND", b""))


@lru_cache(maxsize=256)
def _runs(ch: str) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per row of ``ch``'s glyph, its runs of ink as (first, past-last) pixel columns."""
    out = []
    for bits in glyphs.rows(ch):
        runs, start = [], None
        for gx in range(GLYPH_W + 1):
            on = gx < GLYPH_W and bits >> (GLYPH_W - 1 - gx) & 1
            if on and start is None:
                start = gx
            elif not on and start is not None:
                runs.append((start, gx))
                start = None
        out.append(tuple(runs))
    return tuple(out)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def read_png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, checking the signature and the IHDR CRC."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    length = struct.unpack(">I", data[8:12])[0]
    body = data[16:16 + length]
    if struct.unpack(">I", data[16 + length:20 + length])[0] != zlib.crc32(b"IHDR" + body):
        raise ValueError("bad IHDR checksum")
    return struct.unpack(">II", body[:8])
