"""The safe recipe: seal a message, open a token, with the checks a receiver must not forget.

``open_from_device`` is what the gateway calls on every incoming message; ``open_for_device``
is what a device calls on what the gateway sends it. Replay checks need the receiver's state
and clock, so they live in ``protocol.replay`` and run after opening.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import Oversized, TopicMismatch
from protocol.jws import MAX_TOKEN_BYTES, KeyResolver, Signer, verify
from protocol.messages import (
    DOWN_TYPES,
    GATEWAY_STATES,
    UP_TYPES,
    Message,
    StatusMessage,
    dump_message,
    parse_message,
)
from protocol.topics import Topic


@dataclass(frozen=True, slots=True)
class Opened:
    message: Message
    kid: str
    token: str  # the original JWS, kept so it can be forwarded and re-checked downstream


def seal(message: Message, signer: Signer) -> str:
    token = signer.sign(dump_message(message))
    if len(token) > MAX_TOKEN_BYTES:
        # better to fail at the sender, where someone can shorten it, than be dropped unread
        raise Oversized(
            f"{message.type} message {message.id} seals to {len(token)} bytes, over the "
            f"{MAX_TOKEN_BYTES}-byte limit receivers accept; send less (a shorter sdp?)"
        )
    return token


def open_envelope(
    token: str | bytes, resolve: KeyResolver, *, max_bytes: int = MAX_TOKEN_BYTES
) -> Opened:
    verified = verify(token, resolve, max_bytes=max_bytes)
    return Opened(parse_message(verified.payload), verified.kid, verified.token)


def open_from_device(
    token: str | bytes,
    resolve: KeyResolver,
    topic: Topic | None = None,
    *,
    max_bytes: int = MAX_TOKEN_BYTES,
) -> Opened:
    """Open a device-to-gateway message: a device may only speak for itself, on its own topic."""
    opened = open_envelope(token, resolve, max_bytes=max_bytes)
    msg = opened.message
    if opened.kid != msg.device:
        raise TopicMismatch(
            f"{msg.type} message {msg.id} is about device {msg.device!r} but signed by "
            f"{opened.kid!r}; a device may only send messages about itself"
        )
    if msg.type not in UP_TYPES:
        raise TopicMismatch(
            f"device {msg.device!r} sent a {msg.type!r} message; devices send only "
            f"{', '.join(UP_TYPES)}"
        )
    if isinstance(msg, StatusMessage) and msg.body.state in GATEWAY_STATES:
        raise TopicMismatch(
            f"device {msg.device!r} sent a status {msg.body.state!r}: a state only the"
            " gateway reports"
        )
    if topic is not None:
        _match_topic(opened, topic, "up")
    return opened


def open_for_device(
    token: str | bytes,
    resolve: KeyResolver,
    device_id: str,
    topic: Topic | None = None,
    *,
    max_bytes: int = MAX_TOKEN_BYTES,
) -> Opened:
    """Open a gateway-to-device message on device ``device_id``.

    ``resolve`` should know only the gateway keys the device was provisioned with; the check
    on ``device`` stops a message the gateway signed for one device being replayed to another.
    """
    opened = open_envelope(token, resolve, max_bytes=max_bytes)
    msg = opened.message
    if msg.device != device_id:
        raise TopicMismatch(
            f"{msg.type} message {msg.id} is addressed to {msg.device!r}, not to this "
            f"device {device_id!r}"
        )
    if msg.type not in DOWN_TYPES:
        raise TopicMismatch(
            f"a {msg.type!r} message came from the gateway; it sends only {', '.join(DOWN_TYPES)}"
        )
    if topic is not None:
        _match_topic(opened, topic, "down")
    return opened


def _match_topic(opened: Opened, topic: Topic, direction: str) -> None:
    msg = opened.message
    if topic.direction != direction or topic.device_id != msg.device or topic.type != msg.type:
        raise TopicMismatch(
            f"{msg.type} message {msg.id} for device {msg.device!r} arrived on "
            f"{topic.direction} topic of device {topic.device_id!r}, type {topic.type!r}; "
            "the topic must name the same device, direction and type"
        )
