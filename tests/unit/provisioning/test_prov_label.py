"""The QR label: the code intact, and the device id, type and district under it (PNG, SVG)."""

from __future__ import annotations

import string
import struct
import xml.etree.ElementTree as ET
import zlib

import pytest
import segno

from ansimi.districts import SEOUL_DISTRICTS
from provisioning.label import (
    ADVANCE,
    BORDER,
    FONT,
    GLYPH_H,
    GLYPH_W,
    LINE,
    SCALE,
    TEXT_SCALE,
    label_lines,
    label_png,
    label_svg,
)

URL = "https://gateway:8480/enrol#token=abcdefghijklmnopqrstuvwxyz012345"
LINES = label_lines("doorbell-3f2a1c", "doorbell", "gangnam")


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """A strict reader for what label_png writes: signature, CRCs, 8-bit grey, filter 0."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 0)
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[y * (width + 1) : (y + 1) * (width + 1)] for y in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, [row[1:] for row in rows]


def test_the_png_holds_the_code_module_for_module() -> None:
    code = segno.make(URL, error="m")
    width, _height, rows = read_png(label_png(code, LINES))
    size = (len(code.matrix) + 2 * BORDER) * SCALE
    left = (width - size) // 2 + BORDER * SCALE
    for y, modules in enumerate(code.matrix):
        for x, dark in enumerate(modules):
            centre = rows[(BORDER + y) * SCALE + SCALE // 2][left + x * SCALE + SCALE // 2]
            assert centre == (0 if dark else 255), (x, y)


def test_the_png_prints_each_line_under_the_code_centred() -> None:
    code = segno.make(URL, error="m")
    width, height, rows = read_png(label_png(code, LINES))
    qr_px = (len(code.matrix) + 2 * BORDER) * SCALE
    assert height > qr_px
    for n, line in enumerate(LINES):
        top = qr_px + n * LINE * TEXT_SCALE
        band = rows[top : top + GLYPH_H * TEXT_SCALE]
        # the dots inked are exactly the line's glyphs' dots, nothing of another line
        inked = sum(pixel == 0 for row in band for pixel in row) // TEXT_SCALE**2
        assert inked == sum(dot for ch in line for row in FONT[ch] for dot in row), line
        columns = [x for x in range(width) if any(row[x] == 0 for row in band)]
        start = (width - len(line) * ADVANCE * TEXT_SCALE) // 2
        assert start <= columns[0] and columns[-1] < start + len(line) * ADVANCE * TEXT_SCALE
        assert abs((columns[0] + columns[-1]) / 2 - width / 2) <= ADVANCE * TEXT_SCALE


def test_the_font_has_a_distinct_glyph_for_every_character_a_label_can_hold() -> None:
    # ids (protocol/ids.py), device types and district codes, and the lines' own words
    wanted = set(string.ascii_lowercase + string.digits + "-: ")
    wanted |= {ch for district in SEOUL_DISTRICTS for ch in district}
    assert wanted <= FONT.keys()
    for ch, glyph in FONT.items():
        assert len(glyph) == GLYPH_H and all(len(row) == GLYPH_W for row in glyph), ch
    visible = [glyph for ch, glyph in FONT.items() if ch != " "]
    assert len(set(visible)) == len(visible)  # no two letters drawn alike


def test_a_character_without_a_glyph_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'#'"):
        label_png(segno.make(URL), ["bell#1"])


def test_the_svg_nests_the_code_and_has_the_three_lines_as_text() -> None:
    code = segno.make(URL, error="m")
    root = ET.fromstring(label_svg(code, LINES))
    ns = {"svg": "http://www.w3.org/2000/svg"}
    texts = [t.text for t in root.iterfind(".//svg:text", ns)]
    assert texts == ["doorbell-3f2a1c", "type: doorbell", "district: gangnam"]
    (path,) = root.iterfind(".//svg:svg/svg:path", ns)
    assert path.get("d")  # segno's modules, as segno draws them
    assert int(root.get("height", 0)) > (len(code.matrix) + 2 * BORDER) * SCALE
