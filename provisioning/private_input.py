"""A device's personal data as the installer types it: from stdin (JSON) or prompts.

Never from arguments: a command line lands in the shell's history and in `ps`. The shape
is the gateway's (POST /admin/devices/{id}/private): address, floor, location {lat, lon},
phones [{role, name, number}], notes. The gateway checks every field and names the one it
refuses; this only turns what was typed into that shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from siteca.errors import ProvisioningError

PHONE_ROLES: Final = ("victim", "guardian", "other")
EXAMPLE: Final = (
    '{"address": "...", "floor": "3", "location": {"lat": 37.56, "lon": 126.97}, '
    '"phones": [{"role": "victim", "number": "+821012345678"}]}'
)


class PrivateInputError(ProvisioningError, ValueError):
    """What was typed cannot be a device's personal data; the message shows the shape."""


def from_json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PrivateInputError(
            f"stdin is not JSON ({exc.msg}, line {exc.lineno}): send one object like {EXAMPLE}"
        ) from None
    if not isinstance(data, dict) or not data:
        raise PrivateInputError(f"stdin holds no JSON object with fields: send one like {EXAMPLE}")
    return data


Prompt = Callable[[str, str], str]  # (question, default) -> answer


def from_prompts(ask: Prompt) -> dict[str, Any]:
    """Ask for each field in turn; empty answers leave a field out."""
    data: dict[str, Any] = {}
    for field in ("address", "floor"):
        answer = ask(field, "").strip()
        if answer:
            data[field] = answer
    lat, lon = ask("latitude (e.g. 37.5665)", "").strip(), ask("longitude", "").strip()
    if lat or lon:
        try:
            data["location"] = {"lat": float(lat), "lon": float(lon)}
        except ValueError:
            raise PrivateInputError(
                f"location {lat!r}, {lon!r}: give both as decimal degrees (37.5665, 126.978)"
            ) from None
    phones: list[dict[str, str]] = []
    while len(phones) < 10:
        number = ask("phone number (empty when done)", "").strip()
        if not number:
            break
        role = ask(f"whose ({'/'.join(PHONE_ROLES)})", "guardian").strip()
        if role not in PHONE_ROLES:
            raise PrivateInputError(f"role {role!r}: one of {', '.join(PHONE_ROLES)}")
        phones.append({"role": role, "name": ask("name", "").strip(), "number": number})
    if phones:
        data["phones"] = phones
    if not data:
        raise PrivateInputError("nothing was entered: the gateway's record was left as it was")
    return data
