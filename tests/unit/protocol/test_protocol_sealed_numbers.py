"""SMS numbers sealed by the gateway for one device: only its key opens them, and every
sealed value has one length whatever the numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol._b64 import b64url_decode, b64url_encode
from protocol.keys import generate_key
from protocol.sealed_numbers import (
    MAX_NUMBERS,
    SEALED_CHARS,
    BadNumbers,
    open_numbers,
    seal_numbers,
)

KEY = generate_key()
numbers_lists = st.lists(st.from_regex(r"\+?[0-9]{3,16}", fullmatch=True), max_size=MAX_NUMBERS)


@given(numbers_lists)
def test_the_device_opens_what_was_sealed_for_it_and_the_size_tells_nothing(
    numbers: list[str],
) -> None:
    sealed = seal_numbers(numbers, KEY.public_key())
    assert len(sealed) == SEALED_CHARS <= 256  # fits a remote config string
    assert open_numbers(sealed, KEY) == numbers


def test_another_key_or_a_changed_byte_does_not_open() -> None:
    sealed = seal_numbers(["+821012345678"], KEY.public_key())
    with pytest.raises(BadNumbers):
        open_numbers(sealed, generate_key())
    raw = bytearray(b64url_decode(sealed.encode(), "test"))
    raw[-1] ^= 1
    with pytest.raises(BadNumbers):
        open_numbers(b64url_encode(bytes(raw)).decode(), KEY)
    with pytest.raises(BadNumbers):
        open_numbers("not base64url!", KEY)


def test_bad_numbers_are_refused_by_position_never_by_value() -> None:
    with pytest.raises(BadNumbers, match="number 2 of 2") as caught:
        seal_numbers(["+821012345678", "+82 10 1234"], KEY.public_key())
    assert "1234" not in str(caught.value)
    with pytest.raises(BadNumbers, match="at most 8"):
        seal_numbers(["+821012345678"] * (MAX_NUMBERS + 1), KEY.public_key())
