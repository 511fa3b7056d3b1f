"""Whole numbers from the network, parsed strictly: ASCII digits only, bounded length.

`str.isdigit()` is true for '²' and '٣', which `int()` then refuses or reads as another
digit; `int()` alone takes '+1', ' 1', '1_000' and Arabic-Indic digits. A header, a query
parameter or a field that crosses the network is parsed here and nowhere else.
"""

from __future__ import annotations

import re
from typing import Final

from protocol.errors import Malformed, clip

__all__ = ["MAX_DIGITS", "Malformed", "parse_whole"]

# 18 digits fit in 63 bits: no number from outside costs a big-integer conversion
MAX_DIGITS: Final = 18
_WHOLE_RE: Final = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")


def parse_whole(text: str | None, what: str, *, low: int = 0, high: int | None = None) -> int:
    """`text` as a whole number in [low, high]; Malformed (a ValueError) saying why if not."""
    if text is None or not _WHOLE_RE.fullmatch(text):
        raise Malformed(
            f"{what} {clip(text)} is not a whole number: use 1 to {MAX_DIGITS} ASCII digits 0-9"
        )
    value = int(text)
    if value < low or (high is not None and value > high):
        bound = f"{low} to {high}" if high is not None else f"at least {low}"
        raise Malformed(f"{what} {value} is out of range: use {bound}")
    return value
