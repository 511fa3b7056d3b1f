"""The enrolment label: the QR code, and under it the device id, type and district.

segno draws the code but no text, and Pillow (with its own native libraries) would be a
dependency of every install for three short lines on a label. The PNG is composed here
instead: the code's modules and a small 5x7 bitmap font for the characters a device id,
a type and a district can hold (protocol/ids.py: a-z, 0-9 and '-'), written as an 8-bit
greyscale PNG with zlib. The SVG nests segno's code and adds `<text>` lines, which a label
printer's driver renders in its own monospace font.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final
from xml.sax.saxutils import escape

import segno

SCALE: Final = 8  # pixels a QR module
BORDER: Final = 4  # modules of quiet zone (ISO/IEC 18004 asks for 4)
TEXT_SCALE: Final = 3  # pixels a font dot: 15x21-pixel letters, readable at 300 dpi
GLYPH_W: Final = 5
GLYPH_H: Final = 7
ADVANCE: Final = GLYPH_W + 1  # dots from one letter to the next
LINE: Final = GLYPH_H + 3  # dots from one line to the next
BLACK: Final = 0
WHITE: Final = 255

# 5x7 glyphs, one string of five dots a row, top row first ("#" is ink)
_FONT_ROWS: Final[dict[str, tuple[str, ...]]] = {
    " ": (".....",) * 7,
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    ":": (".....", "..#..", "..#..", ".....", "..#..", "..#..", "....."),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "a": (".....", ".....", ".###.", "....#", ".####", "#...#", ".####"),
    "b": ("#....", "#....", "####.", "#...#", "#...#", "#...#", "####."),
    "c": (".....", ".....", ".###.", "#....", "#....", "#...#", ".###."),
    "d": ("....#", "....#", ".####", "#...#", "#...#", "#...#", ".####"),
    "e": (".....", ".....", ".###.", "#...#", "#####", "#....", ".###."),
    "f": ("..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."),
    "g": (".....", ".####", "#...#", "#...#", ".####", "....#", ".###."),
    "h": ("#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"),
    "i": ("..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."),
    "j": ("...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##.."),
    "k": ("#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."),
    "l": (".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "m": (".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"),
    "n": (".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"),
    "o": (".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."),
    "p": (".....", ".....", "####.", "#...#", "####.", "#....", "#...."),
    "q": (".....", ".....", ".####", "#...#", ".####", "....#", "....#"),
    "r": (".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."),
    "s": (".....", ".....", ".####", "#....", ".###.", "....#", "####."),
    "t": (".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."),
    "u": (".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"),
    "v": (".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "w": (".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."),
    "x": (".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
    "y": (".....", ".....", "#...#", "#...#", ".####", "....#", ".###."),
    "z": (".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"),
}
FONT: Final[dict[str, tuple[tuple[bool, ...], ...]]] = {
    ch: tuple(tuple(dot == "#" for dot in row) for row in rows) for ch, rows in _FONT_ROWS.items()
}


def label_lines(device_id: str, kind: str, district: str) -> list[str]:
    return [device_id, f"type: {kind}", f"district: {district}"]


def label_png(code: segno.QRCode, lines: list[str]) -> bytes:
    """The code, then each line centred under it, as a greyscale PNG."""
    missing = sorted({ch for line in lines for ch in line} - FONT.keys())
    if missing:
        raise ValueError(f"no glyph for {''.join(missing)!r} on the label")
    modules = code.matrix
    qr_px = (len(modules) + 2 * BORDER) * SCALE
    text_px = max(len(line) for line in lines) * ADVANCE * TEXT_SCALE + 2 * BORDER * SCALE
    width = max(qr_px, text_px)
    height = qr_px + len(lines) * LINE * TEXT_SCALE + BORDER * SCALE
    pixels = [bytearray([WHITE]) * width for _ in range(height)]
    left = (width - qr_px) // 2 + BORDER * SCALE
    for y, row in enumerate(modules):
        for x, dark in enumerate(row):
            if dark:
                _fill(pixels, left + x * SCALE, (BORDER + y) * SCALE, SCALE)
    for n, line in enumerate(lines):
        top = qr_px + n * LINE * TEXT_SCALE
        start = (width - len(line) * ADVANCE * TEXT_SCALE) // 2
        for i, ch in enumerate(line):
            for gy, glyph_row in enumerate(FONT[ch]):
                for gx, ink in enumerate(glyph_row):
                    if ink:
                        x = start + (i * ADVANCE + gx) * TEXT_SCALE
                        _fill(pixels, x, top + gy * TEXT_SCALE, TEXT_SCALE)
    return _png(width, height, pixels)


def _fill(pixels: list[bytearray], x: int, y: int, size: int) -> None:
    for row in pixels[y : y + size]:
        row[x : x + size] = bytes([BLACK]) * size


def _png(width: int, height: int, pixels: list[bytearray]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    # 8-bit greyscale (colour type 0), each row after filter byte 0 (none)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def label_svg(code: segno.QRCode, lines: list[str]) -> bytes:
    """The code (segno's own SVG, nested), then each line as text, centred."""
    qr_px = (len(code.matrix) + 2 * BORDER) * SCALE
    font_px = GLYPH_H * TEXT_SCALE
    # a monospace letter is about 0.6 of the font size wide
    text_px = int(max(len(line) for line in lines) * font_px * 0.6) + 2 * BORDER * SCALE
    width = max(qr_px, text_px)
    height = qr_px + len(lines) * LINE * TEXT_SCALE + BORDER * SCALE
    inline = code.svg_inline(scale=SCALE, border=BORDER)
    texts = "".join(
        f'<text x="{width // 2}" y="{qr_px + (n + 1) * LINE * TEXT_SCALE - 3 * TEXT_SCALE}" '
        f'text-anchor="middle" font-family="monospace" font-size="{font_px}">'
        f"{escape(line)}</text>"
        for n, line in enumerate(lines)
    )
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
        f'<rect width="{width}" height="{height}" fill="#fff"/>'
        f'<g transform="translate({(width - qr_px) // 2} 0)">{inline}</g>{texts}</svg>'
    ).encode()
