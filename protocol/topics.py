"""MQTT topic names. The broker's ACL keys on them, so they are built and read in one place.

``ansimi/v1/{device_id}/up/{type}`` carries device-to-gateway messages and
``ansimi/v1/{device_id}/down/{type}`` gateway-to-device ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from protocol.errors import Malformed, clip
from protocol.ids import DEVICE_ID_RE, check_id
from protocol.jws import MAX_TOKEN_BYTES
from protocol.messages import DOWN_TYPES, UP_TYPES

PREFIX: Final = "ansimi/v1"
# The largest MQTT packet a site's broker takes (its `max_packet_size`): the largest token
# the gateway reads, plus room for the PUBLISH header, the topic (under 100 bytes) and v5
# properties. A bigger payload is dropped at the broker, never carried to the gateway.
MAX_PACKET_BYTES: Final = MAX_TOKEN_BYTES + 1024
UP_FILTER: Final = f"{PREFIX}/+/up/#"

Direction = Literal["up", "down"]
_DIRECTIONS: Final[dict[str, Direction]] = {"up": "up", "down": "down"}
_TYPES_FOR: Final[dict[str, tuple[str, ...]]] = {"up": UP_TYPES, "down": DOWN_TYPES}
# MQTT shared-subscription group names must not contain '/', '+' or '#'
_GROUP_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Topic:
    device_id: str
    direction: Direction
    type: str


def up_topic(device_id: str, type: str) -> str:
    return _build(device_id, "up", type)


def down_topic(device_id: str, type: str) -> str:
    return _build(device_id, "down", type)


def shared_up_filter(group: str) -> str:
    """The MQTT v5 shared subscription that spreads device traffic over gateway instances."""
    if not _GROUP_RE.fullmatch(group):
        raise Malformed(
            f"shared subscription group {clip(group)} is invalid: use 1 to 64 of A-Z a-z 0-9 _ -"
        )
    return f"$share/{group}/{UP_FILTER}"


def down_filter(device_id: str) -> str:
    return f"{PREFIX}/{check_id(device_id)}/down/#"


def parse_topic(topic: str) -> Topic:
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != "ansimi" or parts[1] != "v1":
        raise Malformed(
            f"topic {clip(topic)} is not of the form {PREFIX}/<device id>/<up|down>/<type>"
        )
    _, _, device_id, direction_text, type_ = parts
    direction = _DIRECTIONS.get(direction_text)
    if direction is None:
        raise Malformed(f"topic {clip(topic)}: direction must be 'up' or 'down'")
    if not DEVICE_ID_RE.fullmatch(device_id):
        # the message names the topic: built only for a refusal, not for every message
        check_id(device_id, f"device id in topic {clip(topic, 60)}")
    if type_ not in _TYPES_FOR[direction]:
        raise Malformed(
            f"topic {clip(topic)}: {clip(type_, 30)} is not a {direction} message type "
            f"(expected one of {', '.join(_TYPES_FOR[direction])})"
        )
    return Topic(device_id, direction, type_)


def _build(device_id: str, direction: Direction, type: str) -> str:
    check_id(device_id)
    if type not in _TYPES_FOR[direction]:
        raise Malformed(
            f"{type!r} is not a {direction} message type "
            f"(expected one of {', '.join(_TYPES_FOR[direction])})"
        )
    return f"{PREFIX}/{device_id}/{direction}/{type}"
