"""SMS numbers sealed by the gateway for one device, carried in its remote config.

The gateway holds each device's Ed25519 public key. Its X25519 twin (libsodium's
`crypto_sign_ed25519_pk_to_curve25519`) is what the numbers are sealed to, with libsodium's
sealed box (`crypto_box_seal`: an ephemeral X25519 key, XSalsa20-Poly1305): only the device,
converting its own Ed25519 private key the same way, opens them. Using one key for EdDSA and
X25519 is safe (Thormarker, "On using the same key pair for Ed25519 and an X25519 based
KEM", 2021); the device's key never leaves it, as before.

The plaintext is the numbers joined by commas, padded with NULs to one length, so every
sealed value is the same 255 base64url characters and shows neither how many numbers there
are nor how long they are. A value copied into another device's layer does not open there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from nacl.bindings import (
    crypto_box_seal,
    crypto_box_seal_open,
    crypto_sign_ed25519_pk_to_curve25519,
    crypto_sign_ed25519_sk_to_curve25519,
    crypto_sign_seed_keypair,
)
from nacl.exceptions import CryptoError

from protocol._b64 import b64url_decode, b64url_encode
from protocol.errors import ProtocolError

# international form: an optional + then 3 to 16 digits
PHONE_NUMBER: Final = re.compile(r"\+?[0-9]{3,16}")
MAX_NUMBERS: Final = 8
# eight of the longest numbers with their commas: every plaintext is padded to this
_PLAIN_BYTES: Final = MAX_NUMBERS * 17 + MAX_NUMBERS - 1
_SEALED_BYTES: Final = _PLAIN_BYTES + 48  # the sealed box's ephemeral key and tag
SEALED_CHARS: Final = -(-_SEALED_BYTES * 4 // 3)  # base64url without padding: 255


class BadNumbers(ProtocolError, ValueError):
    """Numbers that cannot be sealed, or a sealed value this device cannot open. The message
    names a number by its position only, never by its value."""

    reason = "bad_numbers"


def check_numbers(numbers: Sequence[str]) -> list[str]:
    """The numbers if each is one in international form and there are at most eight."""
    if len(numbers) > MAX_NUMBERS:
        raise BadNumbers(f"{len(numbers)} numbers: at most {MAX_NUMBERS}")
    for position, number in enumerate(numbers, start=1):
        if not isinstance(number, str) or not PHONE_NUMBER.fullmatch(number):
            raise BadNumbers(
                f"number {position} of {len(numbers)} is not in international form "
                "(+ then 3 to 16 digits, no spaces)"
            )
    return list(numbers)


def seal_numbers(numbers: Sequence[str], device_key: Ed25519PublicKey) -> str:
    """The numbers sealed for the device whose public key is `device_key`."""
    plain = ",".join(check_numbers(numbers)).encode().ljust(_PLAIN_BYTES, b"\0")
    raw = device_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    box = crypto_box_seal(plain, crypto_sign_ed25519_pk_to_curve25519(raw))
    return b64url_encode(box).decode("ascii")


def open_numbers(sealed: str, device_key: Ed25519PrivateKey) -> list[str]:
    """The numbers in `sealed`, opened with this device's own key; raises BadNumbers."""
    seed = device_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public, secret = crypto_sign_seed_keypair(seed)
    try:
        box = b64url_decode(sealed.encode("ascii", errors="replace"), "sms numbers")
        plain = crypto_box_seal_open(
            box,
            crypto_sign_ed25519_pk_to_curve25519(public),
            crypto_sign_ed25519_sk_to_curve25519(secret),
        )
    except (ValueError, CryptoError):
        raise BadNumbers("the SMS numbers were not sealed for this device's key") from None
    text = plain.rstrip(b"\0").decode("ascii", errors="replace")
    return check_numbers(text.split(",") if text else [])
