"""The gateway's intake probe: a signed message a gateway sends itself through the broker.

A gateway proves its intake path end to end (broker, subscription, its own session) by
publishing a probe every few seconds on a topic its own uplink subscription must deliver,
and listening for it (gateway/health.py). The rules:

- Topic: ``ansimi/v1/<gateway id>/up/probe``. The gateway id is valid in the device id
  grammar, so the topic is a device-like `up` topic that ``ansimi/v1/+/up/#`` (shared or
  not) delivers. It cannot collide with a device: the site CA never issues a device a
  gateway's id (provisioning refuses the `gw-` prefix), and the broker's ACL lets only the
  identity whose certificate CN is that id write under ``ansimi/v1/<id>/up/``. `probe` is
  not a device message type either: receivers recognise the topic before any device check.
- Payload: a JWS (EdDSA) by the gateway's own key, ``kid`` = the gateway id, over a
  `Probe`: so nobody without the gateway's key can fake one, and a device publishing on
  its own ``up/probe`` is refused (its key is not the gateway's).
- Several instances of one gateway share its id and key: a probe names the `instance`
  (its MQTT client id) that sent it, for logs and metrics only.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from protocol.errors import Malformed, TopicMismatch, clip
from protocol.ids import DeviceId, MessageId, check_id, new_message_id
from protocol.jws import MAX_TOKEN_BYTES, KeyResolver, Signer, verify
from protocol.messages import UInt63
from protocol.topics import PREFIX

PROBE_TYPE: Final = "probe"
_SUFFIX: Final = f"/up/{PROBE_TYPE}"


class Probe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    type: Literal["probe"] = "probe"
    id: MessageId
    gateway: DeviceId
    instance: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    ts: UInt63  # milliseconds since the Unix epoch, the sender's clock


def probe_topic(gateway_id: str) -> str:
    return f"{PREFIX}/{check_id(gateway_id, 'gateway id')}{_SUFFIX}"


def probe_sender(topic: str) -> str | None:
    """The gateway id a probe topic names, or None for any other topic.

    Cheap (no parsing beyond a suffix test for other topics): it runs on every uplink message.
    """
    if not topic.endswith(_SUFFIX):
        return None
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX:
        return None
    return parts[2]


def seal_probe(signer: Signer, instance: str, ts_ms: int) -> bytes:
    probe = Probe(id=new_message_id(), gateway=signer.kid, instance=instance, ts=ts_ms)
    return signer.sign(probe.model_dump_json().encode()).encode()


def open_probe(
    token: str | bytes, resolve: KeyResolver, sender: str, *, max_bytes: int = MAX_TOKEN_BYTES
) -> Probe:
    """Verify a probe that arrived on `sender`'s probe topic; raises ProtocolError if it is
    not one its gateway signed."""
    verified = verify(token, resolve, max_bytes=max_bytes)
    try:
        probe = Probe.model_validate_json(verified.payload, strict=True)
    except ValidationError as exc:
        raise Malformed(f"probe refused: {exc.error_count()} problems") from None
    if not verified.kid == probe.gateway == sender:
        raise TopicMismatch(
            f"probe of {clip(probe.gateway)} signed by {clip(verified.kid)} arrived on the "
            f"probe topic of {clip(sender)}: all three must be the same gateway"
        )
    return probe
