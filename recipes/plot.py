"""A loss-curve PNG without a plotting library: a small RGB canvas, lines, a 3x5 digit font, and a
PNG encoder (zlib + struct).

    write_loss_curve_png("checkpoints/run/loss.png", steps, losses, "stage1 loss")

The picture has a frame for the axes, the curve, and the first/last step under the x axis and the
lowest/highest loss beside the y axis. The title goes into the PNG's tEXt "Title" chunk (image
viewers show it; the pixel font has digits only). Non-finite losses are left out, breaking the line.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

WHITE, BLACK, GREY, BLUE = (255, 255, 255), (0, 0, 0), (200, 200, 200), (31, 119, 180)

# 3 columns x 5 rows per glyph, one string of "#" and "." per row.
FONT = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", "..#", "..#", "..#"),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
    ".": ("...", "...", "...", "...", ".#."), "-": ("...", "...", "###", "...", "..."),
    "+": ("...", ".#.", "###", ".#.", "..."), "e": ("...", "###", "#.#", "##.", "###"),
    " ": ("...", "...", "...", "...", "..."),
}
GLYPH_W, GLYPH_H, SCALE = 3, 5, 2  # glyphs drawn at 2x: 6 x 10 pixels plus 2 of spacing


class Canvas:
    def __init__(self, width: int, height: int, background=WHITE):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def get(self, x: int, y: int) -> tuple[int, int, int]:
        i = 3 * (y * self.width + x)
        return tuple(self.pixels[i:i + 3])

    def line(self, x0: int, y0: int, x1: int, y1: int, color, thickness: int = 1) -> None:
        """Bresenham's line; thickness widens it by a square brush."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        lo, hi = -(thickness // 2), (thickness - 1) // 2
        while True:
            for ox in range(lo, hi + 1):
                for oy in range(lo, hi + 1):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color=BLACK) -> None:
        """Draw `s` with its top-left corner at (x, y); characters outside the font are skipped."""
        for ch in s:
            glyph = FONT.get(ch)
            if glyph is None:
                continue
            for row, bits in enumerate(glyph):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        for oy in range(SCALE):
                            for ox in range(SCALE):
                                self.set(x + col * SCALE + ox, y + row * SCALE + oy, color)
            x += (GLYPH_W + 1) * SCALE


def text_width(s: str) -> int:
    return len(s) * (GLYPH_W + 1) * SCALE - SCALE if s else 0


def png_bytes(width: int, height: int, rgb: bytes | bytearray, text: dict[str, str] | None = None) -> bytes:
    """Encode 8-bit RGB pixels (rows top to bottom) as a PNG, with optional tEXt chunks."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"expected {width * height * 3} bytes of RGB, got {len(rgb)}")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    stride = width * 3
    raw = b"".join(b"\x00" + bytes(rgb[y * stride:(y + 1) * stride]) for y in range(height))  # filter 0: none
    out = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        out.append(chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace")))
    out += [chunk(b"IDAT", zlib.compress(raw, 9)), chunk(b"IEND", b"")]
    return b"".join(out)


def format_number(v: float) -> str:
    """Short labels for the font: up to 4 significant digits, exponent form when very small/large."""
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.2e}".replace("e-0", "e-").replace("e+0", "e")


def write_loss_curve_png(path: str | Path, steps: Sequence[float], losses: Sequence[float], title: str,
                         width: int = 640, height: int = 400) -> Path:
    """Draw losses against steps and write the PNG atomically (temp file + rename)."""
    if len(steps) != len(losses):
        raise ValueError(f"{len(steps)} steps but {len(losses)} losses")
    points = [(float(s), float(v)) for s, v in zip(steps, losses)]
    finite = [(s, v) for s, v in points if math.isfinite(s) and math.isfinite(v)]
    if not finite:
        raise ValueError("no finite (step, loss) point to plot")
    x_lo, x_hi = min(s for s, _ in finite), max(s for s, _ in finite)
    y_lo, y_hi = min(v for _, v in finite), max(v for _, v in finite)
    if x_hi == x_lo:
        x_hi = x_lo + 1.0
    if y_hi == y_lo:  # a flat curve sits in the middle
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    y_labels = [format_number(y_hi), format_number(y_lo)]

    left = 12 + max(text_width(s) for s in y_labels)
    right, top, bottom = width - 12, 12, height - 12 - GLYPH_H * SCALE - 8
    if right - left < 20 or bottom - top < 20:
        raise ValueError(f"image {width}x{height} is too small for a plot")
    canvas = Canvas(width, height)

    def to_px(s: float, v: float) -> tuple[int, int]:
        x = left + round((s - x_lo) / (x_hi - x_lo) * (right - left))
        y = bottom - round((v - y_lo) / (y_hi - y_lo) * (bottom - top))
        return x, y

    for frac in (0.25, 0.5, 0.75):  # light grid lines
        gy = bottom - round(frac * (bottom - top))
        canvas.line(left, gy, right, gy, GREY)
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    canvas.line(left, top, right, top, BLACK)
    canvas.line(right, top, right, bottom, BLACK)

    previous = None
    for s, v in points:
        if not (math.isfinite(s) and math.isfinite(v)):
            previous = None
            continue
        here = to_px(s, v)
        canvas.line(*(previous or here), *here, BLUE, thickness=2)
        previous = here

    label_y = bottom + 6
    canvas.text(left, label_y, format_number(x_lo))
    last = format_number(max(s for s, _ in finite))
    canvas.text(right - text_width(last), label_y, last)
    canvas.text(left - 6 - text_width(y_labels[0]), top, y_labels[0])
    canvas.text(left - 6 - text_width(y_labels[1]), bottom - GLYPH_H * SCALE, y_labels[1])

    path = Path(path)
    data = png_bytes(width, height, canvas.pixels, {"Title": title})
    tmp = path.with_name(f".tmp_{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
