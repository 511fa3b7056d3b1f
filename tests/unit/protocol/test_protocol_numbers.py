"""Whole numbers from the network: ASCII digits only, bounded."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import Malformed
from protocol.numbers import MAX_DIGITS, parse_whole

# each passes str.isdigit(), or int(), or both; none is a plain ASCII whole number
HOSTILE = ["²", "٣", "१२", "+1", "-1", " 1", "1 ", "1_000", "0x10", "1e3", "", "1\n", "1.0"]


@pytest.mark.parametrize("text", HOSTILE)
def test_anything_but_ascii_digits_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(Malformed, match=r"limit .* is not a whole number"):
        parse_whole(text, "limit")


def test_none_and_too_many_digits_are_refused() -> None:
    with pytest.raises(Malformed):
        parse_whole(None, "limit")
    with pytest.raises(Malformed):
        parse_whole("9" * (MAX_DIGITS + 1), "limit")


def test_bounds_are_checked() -> None:
    assert parse_whole("0", "n") == 0
    with pytest.raises(Malformed, match="out of range: use 1 to 10"):
        parse_whole("11", "n", low=1, high=10)
    with pytest.raises(Malformed, match="at least 5"):
        parse_whole("4", "n", low=5)


@given(st.integers(min_value=0, max_value=10**MAX_DIGITS - 1))
def test_every_ascii_whole_number_reads_back(value: int) -> None:
    assert parse_whole(str(value), "n") == value


@given(st.text(max_size=20))
def test_any_text_parses_or_is_malformed_never_another_error(text: str) -> None:
    try:
        value = parse_whole(text, "n")
    except Malformed:
        return
    assert text.isascii() and str(value) == text.lstrip("0").rjust(1, "0")
