"""Base64url without padding (RFC 7515 section 2), strict on the way in.

The standard library's url-safe decoder skips characters outside the alphabet and ignores
set bits after the last full byte, so several texts decode to the same bytes. A signature
segment with a flipped trailing character would then still verify. Only the one canonical
spelling is accepted here.
"""

from __future__ import annotations

import binascii
from typing import Final

from protocol.errors import Malformed

_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_TO_URL: Final = bytes.maketrans(b"+/", b"-_")
# '+', '/' and '=' belong to other base64 flavours; turning them into '!' lets
# a2b_base64(strict_mode=True) refuse them in the same C pass that checks everything else.
_FROM_URL: Final = bytes.maketrans(b"-_+/=", b"+/!!!")
_PAD: Final = (b"", b"", b"==", b"=")
# The last character of a 2- or 3-character tail carries 4 or 2 unused bits; canonical
# text has them zero, i.e. the character's index is a multiple of 16 or 4.
_CANONICAL_LAST: Final[tuple[frozenset[int], ...]] = (
    frozenset(_ALPHABET),
    frozenset(),
    frozenset(_ALPHABET[::16]),
    frozenset(_ALPHABET[::4]),
)


def b64url_encode(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URL).rstrip(b"=")


def b64url_decode(text: bytes, what: str) -> bytes:
    """Decode canonical unpadded base64url; ``what`` names the field in the Malformed message."""
    tail = len(text) & 3
    if tail == 1:
        raise Malformed(f"{what} is not base64url: {len(text)} characters cannot encode bytes")
    try:
        data = binascii.a2b_base64(text.translate(_FROM_URL) + _PAD[tail], strict_mode=True)
    except binascii.Error:
        raise Malformed(
            f"{what} is not base64url: use the url-safe alphabet (A-Z a-z 0-9 - _) "
            "without '=' padding or whitespace"
        ) from None
    if tail and text[-1] not in _CANONICAL_LAST[tail]:
        raise Malformed(f"{what} is not canonical base64url: its unused trailing bits are set")
    return data
