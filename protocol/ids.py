"""Identifier grammars: devices and signers, and message ids.

One grammar for device ids and signer ids (``kid``), because a device signs as itself and
its id also becomes an MQTT topic level, a certificate CN and a file name: lowercase letters,
digits and hyphens only, so none of those places needs escaping.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Final

from pydantic import StringConstraints

from protocol.errors import Malformed, clip

DEVICE_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{2,63}$"
DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)
MESSAGE_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{8,64}$"
MESSAGE_ID_RE: Final = re.compile(MESSAGE_ID_PATTERN)

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
MessageId = Annotated[str, StringConstraints(pattern=MESSAGE_ID_PATTERN)]

_ID_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def check_id(value: str, what: str = "device id") -> str:
    """Return ``value`` if it is a valid device/signer id, else raise Malformed saying why."""
    # fullmatch, not match: "$" alone would accept a trailing newline
    if isinstance(value, str) and DEVICE_ID_RE.fullmatch(value):
        return value
    raise Malformed(f"{what} {clip(value)} is invalid: {_id_problem(value)}")


def _id_problem(value: object) -> str:
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not 3 <= len(value) <= 64:
        return f"must be 3 to 64 characters long, not {len(value)}"
    bad = sorted({c for c in value if c not in _ID_CHARS})
    if bad:
        shown = "".join(bad[:10])
        return f"only a-z, 0-9 and '-' are allowed (found {shown!r}); use lowercase"
    return "must not start with '-'"


def new_message_id() -> str:
    return uuid.uuid4().hex
