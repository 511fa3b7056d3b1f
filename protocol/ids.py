"""Identifier grammars: devices and signers, and message ids.

Every id that comes from outside (a topic level, a URL path segment, a JSON field) is
checked against these grammars at the boundary, before it reaches a URL, a path or SQL.

One grammar for device ids and signer ids (``kid``), because a device signs as itself and
its id also becomes an MQTT topic level, a certificate CN and a file name: lowercase letters,
digits and hyphens only, so none of those places needs escaping.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import Annotated, Final

from pydantic import StringConstraints

from protocol.errors import Malformed, clip

DEVICE_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{2,63}$"
DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)
MESSAGE_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{8,64}$"
MESSAGE_ID_RE: Final = re.compile(MESSAGE_ID_PATTERN)
# an agent release's version (protocol/release.py): dotted numbers, safe as a path segment
VERSION_PATTERN: Final = r"^[0-9]{1,6}(\.[0-9]{1,6}){0,3}$"
VERSION_RE: Final = re.compile(VERSION_PATTERN)
# a procedure step's name (docs/incidents.md), as configured and as in a path
STEP_NAME_PATTERN: Final = r"^[a-z][a-z0-9_]{0,31}$"
STEP_NAME_RE: Final = re.compile(STEP_NAME_PATTERN)

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
MessageId = Annotated[str, StringConstraints(pattern=MESSAGE_ID_PATTERN)]

_ID_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")

# The grammar of each id a route may take in its path, by the parameter's name. An HTTP
# boundary (gateway/api.py, console/web.py) refuses a route whose parameter is not named
# here, so a new route cannot take an id nobody checks.
PATH_ID_GRAMMARS: Final[dict[str, re.Pattern[str]]] = {
    "device_id": DEVICE_ID_RE,
    "event_id": MESSAGE_ID_RE,
    "viewer_id": MESSAGE_ID_RE,
    "incident_id": MESSAGE_ID_RE,
    "step": STEP_NAME_RE,
    # a district's code (ansimi/districts.py checks it is one)
    "district": STEP_NAME_RE,
    "version": VERSION_RE,
}


def check_id(value: str, what: str = "device id") -> str:
    """Return ``value`` if it is a valid device/signer id, else raise Malformed saying why."""
    # fullmatch, not match: "$" alone would accept a trailing newline
    if isinstance(value, str) and DEVICE_ID_RE.fullmatch(value):
        return value
    raise Malformed(f"{what} {clip(value)} is invalid: {_id_problem(value)}")


def check_path_id(name: str, value: str) -> str:
    """`value` of path parameter `name`, if its grammar accepts it; Malformed if not.

    KeyError for a parameter with no grammar: a programming error, caught when the
    routes are set up (see `unchecked_path_params`).
    """
    grammar = PATH_ID_GRAMMARS[name]
    if isinstance(value, str) and grammar.fullmatch(value):
        return value
    if grammar is DEVICE_ID_RE:
        check_id(value, name.replace("_", " "))
    if grammar is STEP_NAME_RE:
        raise Malformed(
            f"{name.replace('_', ' ')} {clip(value)} is invalid: use 1 to 32 of a-z, 0-9 and"
            " '_', starting with a letter"
        )
    raise Malformed(
        f"{name.replace('_', ' ')} {clip(value)} is invalid: use 8 to 64 of A-Z, a-z, 0-9, "
        "'_' and '-'"
    )


def unchecked_path_params(names: Iterable[str], also: Iterable[str] = ()) -> list[str]:
    """The parameter names among `names` with no id grammar (and not in `also`)."""
    allowed = PATH_ID_GRAMMARS.keys() | set(also)
    return sorted(n for n in names if n not in allowed)


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
