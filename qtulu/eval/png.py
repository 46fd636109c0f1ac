"""A bar chart as a PNG, with no plotting library: a small RGB raster, a 5x7 bitmap font, zlib.

matplotlib is not a dependency of qtulu (with pillow, fonttools and the rest it adds ~25 MB to every
install for one chart per metric in `qtulu eval compare`); this writer draws what that needs: title,
bars with their values, a 0-100 scale and numbered model names.
"""

from __future__ import annotations

import struct
import zlib

# 5x7 glyphs, one byte per column, bit 0 = top row (the classic 5x7 LCD font)
FONT = {
    " ": (0, 0, 0, 0, 0),
    "0": (0x3E, 0x51, 0x49, 0x45, 0x3E),
    "1": (0x00, 0x42, 0x7F, 0x40, 0x00),
    "2": (0x42, 0x61, 0x51, 0x49, 0x46),
    "3": (0x21, 0x41, 0x45, 0x4B, 0x31),
    "4": (0x18, 0x14, 0x12, 0x7F, 0x10),
    "5": (0x27, 0x45, 0x45, 0x45, 0x39),
    "6": (0x3C, 0x4A, 0x49, 0x49, 0x30),
    "7": (0x01, 0x71, 0x09, 0x05, 0x03),
    "8": (0x36, 0x49, 0x49, 0x49, 0x36),
    "9": (0x06, 0x49, 0x49, 0x29, 0x1E),
    "A": (0x7C, 0x12, 0x11, 0x12, 0x7C),
    "B": (0x7F, 0x49, 0x49, 0x49, 0x36),
    "C": (0x3E, 0x41, 0x41, 0x41, 0x22),
    "D": (0x7F, 0x41, 0x41, 0x22, 0x1C),
    "E": (0x7F, 0x49, 0x49, 0x49, 0x41),
    "F": (0x7F, 0x09, 0x09, 0x09, 0x01),
    "G": (0x3E, 0x41, 0x49, 0x49, 0x7A),
    "H": (0x7F, 0x08, 0x08, 0x08, 0x7F),
    "I": (0x00, 0x41, 0x7F, 0x41, 0x00),
    "J": (0x20, 0x40, 0x41, 0x3F, 0x01),
    "K": (0x7F, 0x08, 0x14, 0x22, 0x41),
    "L": (0x7F, 0x40, 0x40, 0x40, 0x40),
    "M": (0x7F, 0x02, 0x0C, 0x02, 0x7F),
    "N": (0x7F, 0x04, 0x08, 0x10, 0x7F),
    "O": (0x3E, 0x41, 0x41, 0x41, 0x3E),
    "P": (0x7F, 0x09, 0x09, 0x09, 0x06),
    "Q": (0x3E, 0x41, 0x51, 0x21, 0x5E),
    "R": (0x7F, 0x09, 0x19, 0x29, 0x46),
    "S": (0x46, 0x49, 0x49, 0x49, 0x31),
    "T": (0x01, 0x01, 0x7F, 0x01, 0x01),
    "U": (0x3F, 0x40, 0x40, 0x40, 0x3F),
    "V": (0x1F, 0x20, 0x40, 0x20, 0x1F),
    "W": (0x3F, 0x40, 0x38, 0x40, 0x3F),
    "X": (0x63, 0x14, 0x08, 0x14, 0x63),
    "Y": (0x07, 0x08, 0x70, 0x08, 0x07),
    "Z": (0x61, 0x51, 0x49, 0x45, 0x43),
    ".": (0x00, 0x60, 0x60, 0x00, 0x00),
    ",": (0x00, 0x50, 0x30, 0x00, 0x00),
    "-": (0x08, 0x08, 0x08, 0x08, 0x08),
    "_": (0x40, 0x40, 0x40, 0x40, 0x40),
    ":": (0x00, 0x36, 0x36, 0x00, 0x00),
    "/": (0x20, 0x10, 0x08, 0x04, 0x02),
    "%": (0x23, 0x13, 0x08, 0x64, 0x62),
    "(": (0x00, 0x1C, 0x22, 0x41, 0x00),
    ")": (0x00, 0x41, 0x22, 0x1C, 0x00),
    "@": (0x32, 0x49, 0x79, 0x41, 0x3E),
    "+": (0x08, 0x08, 0x3E, 0x08, 0x08),
    "=": (0x14, 0x14, 0x14, 0x14, 0x14),
    "#": (0x14, 0x7F, 0x14, 0x7F, 0x14),
    "?": (0x02, 0x01, 0x51, 0x09, 0x06),
}
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (210, 210, 210)


class Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(WHITE * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.w, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.h, max(y0, y1))
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            start = 3 * (y * self.w + x0)
            self.px[start : start + len(row)] = row

    def text(self, x: int, y: int, s: str, scale: int = 2, color=BLACK) -> None:
        for ch in s.upper():
            cols = FONT.get(ch, FONT["?"])
            for cx, bits in enumerate(cols):
                for cy in range(7):
                    if bits >> cy & 1:
                        self.rect(x + cx * scale, y + cy * scale, x + (cx + 1) * scale, y + (cy + 1) * scale, color)
            x += 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w : 3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )


def text_width(s: str, scale: int = 2) -> int:
    return 6 * scale * len(s)


def bar_chart(title: str, values: list[tuple[str, float | None]]) -> bytes:
    """Bars for values in percent (0-100; None = not measured), numbered, with a legend of names."""
    bar, gap, left, top, plot_h = 48, 24, 60, 50, 240
    legend_h = 22 * len(values) + 10
    width = max(
        left + len(values) * (bar + gap) + gap,
        text_width(title) + 40,
        max((text_width(f"{i + 1} {n}") for i, (n, _) in enumerate(values)), default=0) + 40,
    )
    height = top + plot_h + 40 + legend_h
    c = Canvas(width, height)
    c.text(20, 15, title)
    base = top + plot_h
    for pct in (0, 25, 50, 75, 100):
        y = base - plot_h * pct // 100
        c.rect(left - 4, y, width - 10, y + 1, GREY if pct else BLACK)
        c.text(left - 8 - text_width(str(pct), 1), y - 3, str(pct), scale=1)
    for i, (_, v) in enumerate(values):
        x = left + gap + i * (bar + gap)
        color = PALETTE[i % len(PALETTE)]
        if v is not None:
            h = int(round(plot_h * max(0.0, min(v, 100.0)) / 100))
            c.rect(x, base - h, x + bar, base, color)
            label = f"{v:.1f}"
            c.text(x + (bar - text_width(label, 1)) // 2, base - h - 10, label, scale=1)
        else:
            c.text(x + (bar - text_width("N/A", 1)) // 2, base - 10, "N/A", scale=1)
        c.text(x + (bar - text_width(str(i + 1))) // 2, base + 8, str(i + 1))
    for i, (name, _) in enumerate(values):
        y = base + 40 + 22 * i
        c.rect(20, y, 34, y + 14, PALETTE[i % len(PALETTE)])
        c.text(42, y, f"{i + 1} {name}")
    return c.png()


def read_png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])
