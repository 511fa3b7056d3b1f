"""Typed messages: what travels inside a signed envelope.

Every payload is one JSON object: ``v``, ``id``, ``device``, ``seq``, ``ts``, ``type`` and a
typed ``body``. Models are frozen and refuse unknown fields; every string and integer has a
bound, so a valid message is always small and fits a signed 64-bit database column.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal, TypeAlias, overload

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_core import ErrorDetails

from protocol.errors import Malformed
from protocol.ids import DeviceId, MessageId, new_message_id

PROTOCOL_VERSION: Final = 1

# Signed 64-bit, so every integer fits SQLite INTEGER and PostgreSQL BIGINT unchanged.
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]
UInt63 = Annotated[int, Field(ge=0, lt=2**63)]
Percent = Annotated[int, Field(ge=0, le=100)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- bodies ------------------------------------------------------------------------------


class Alert(_Model):
    bell: Literal["emergency", "doorbell", "store"]
    trigger: Literal[
        "press",
        "long_press",
        "doorbell_ring",
        "tamper",
        "tamper_cleared",
        "duress",
        "power_loss",
        "power_restored",
    ]
    silent: bool = False
    urgent: bool = False
    # presses made while the previous alert was still unacknowledged are folded into one alert
    presses: Annotated[int, Field(ge=1, lt=2**31)] = 1
    linked_to: MessageId | None = None


class Cancel(_Model):
    alert_id: MessageId


class Heartbeat(_Model):
    uptime_s: UInt63
    power: Literal["mains", "battery"]
    battery_pct: Percent | None = None
    link_quality: Percent | None = None
    firmware: Annotated[str, StringConstraints(max_length=64)]
    outbox_depth: UInt63 = 0


# at most this many device ids in one district event: the signed token must stay under
# MAX_TOKEN_BYTES whatever the ids; the count is always complete
MAX_LISTED_DEVICES: Final = 150
_DEVICE_EVENTS = ("online", "offline")


class Status(_Model):
    """A device's connection state, or (made by the gateway) many devices of a district.

    `online`/`offline` are about the envelope's device and carry nothing else.
    `district_outage`: `count` devices of `district` went offline together; `offline` lists
    them. `district_restored`: most are back; `offline` lists those still offline. The
    envelope's device is the one that tripped the outage (events are kept per device).
    Unset fields are left out of the JSON, so the device states keep their bytes.
    """

    state: Literal["online", "offline", "district_outage", "district_restored"]
    district: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    count: UInt63 | None = None
    offline: Annotated[list[DeviceId], Field(max_length=MAX_LISTED_DEVICES)] | None = None

    @model_validator(mode="after")
    def _fields_fit_state(self) -> Status:
        grouped = (self.district, self.count, self.offline)
        if self.state in _DEVICE_EVENTS and any(f is not None for f in grouped):
            raise ValueError(f"a status {self.state} carries no district, count or list")
        if self.state not in _DEVICE_EVENTS and any(f is None for f in grouped):
            raise ValueError(f"a status {self.state} needs district, count and offline")
        return self

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class Rtc(_Model):
    kind: Literal["offer", "answer", "bye"]
    session: MessageId
    # ICE candidates are gathered before the offer/answer is sent, so they ride in the SDP
    sdp: Annotated[str, StringConstraints(max_length=10_000)] | None = None
    reason: Annotated[str, StringConstraints(max_length=200)] | None = None

    @model_validator(mode="after")
    def _sdp_fits_kind(self) -> Rtc:
        # an answer may come without sdp: that is how a refused offer is answered, with reason
        if self.kind == "offer" and self.sdp is None:
            raise ValueError("an rtc offer must carry an sdp")
        if self.kind == "bye" and self.sdp is not None:
            raise ValueError("an rtc bye must not carry an sdp")
        return self


AckStage = Literal["received", "delivered", "acknowledged", "dispatched", "closed"]
# Stages only move forward: a device shows the furthest stage it has seen.
ACK_STAGES: Final[tuple[AckStage, ...]] = (
    "received",
    "delivered",
    "acknowledged",
    "dispatched",
    "closed",
)


class Ack(_Model):
    ref: MessageId
    stage: AckStage


def _not_an_int(value: object) -> object:
    # pydantic would turn an integer too big for Int64 into an approximate float: refuse it
    if isinstance(value, int):
        raise ValueError("integers must fit in 64 bits")
    return value


# Order matters: a JSON true must stay a bool and a JSON 1 an int, not become 1.0.
ArgValue: TypeAlias = (
    bool
    | Int64
    | Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_not_an_int)]
    | Annotated[str, StringConstraints(max_length=256)]
)
ArgName = Annotated[str, StringConstraints(min_length=1, max_length=32)]


class Command(_Model):
    name: Literal["video_start", "video_stop", "selftest", "set_silent", "ping"]
    args: Annotated[dict[ArgName, ArgValue], Field(max_length=16)] = Field(default_factory=dict)


Body: TypeAlias = Alert | Cancel | Heartbeat | Status | Rtc | Ack | Command

# -- envelopes ---------------------------------------------------------------------------


class Envelope(_Model):
    """Fields every message carries; subclasses add ``type`` and ``body``."""

    v: Literal[1] = PROTOCOL_VERSION
    id: MessageId
    # the device the message is about: the sender of "up" messages, the recipient of "down"
    device: DeviceId
    # per signer and device; only grows, so the receiver can refuse replays
    seq: UInt63
    ts: UInt63  # milliseconds since the Unix epoch


class AlertMessage(Envelope):
    type: Literal["alert"] = "alert"
    body: Alert


class CancelMessage(Envelope):
    type: Literal["cancel"] = "cancel"
    body: Cancel


class HeartbeatMessage(Envelope):
    type: Literal["heartbeat"] = "heartbeat"
    body: Heartbeat


class StatusMessage(Envelope):
    type: Literal["status"] = "status"
    body: Status


class RtcMessage(Envelope):
    type: Literal["rtc"] = "rtc"
    body: Rtc


class AckMessage(Envelope):
    type: Literal["ack"] = "ack"
    body: Ack


class CommandMessage(Envelope):
    type: Literal["command"] = "command"
    body: Command


Message = Annotated[
    AlertMessage
    | CancelMessage
    | HeartbeatMessage
    | StatusMessage
    | RtcMessage
    | AckMessage
    | CommandMessage,
    Field(discriminator="type"),
]

MESSAGE_TYPES: Final[tuple[str, ...]] = (
    "alert",
    "cancel",
    "heartbeat",
    "status",
    "rtc",
    "ack",
    "command",
)
UP_TYPES: Final[tuple[str, ...]] = ("alert", "cancel", "heartbeat", "status", "rtc")
DOWN_TYPES: Final[tuple[str, ...]] = ("ack", "command", "rtc")

_ENVELOPE_FOR: Final[dict[type[BaseModel], Callable[..., Message]]] = {
    Alert: AlertMessage,
    Cancel: CancelMessage,
    Heartbeat: HeartbeatMessage,
    Status: StatusMessage,
    Rtc: RtcMessage,
    Ack: AckMessage,
    Command: CommandMessage,
}

_ADAPTER: Final[TypeAdapter[Message]] = TypeAdapter(Message)

# -- wire form ---------------------------------------------------------------------------


def dump_message(msg: Message) -> bytes:
    """Compact JSON; the same model always gives the same bytes (field order is fixed)."""
    return msg.__pydantic_serializer__.to_json(msg)


def parse_message(payload: bytes) -> Message:
    """Validate a payload, refusing anything a different JSON parser could read differently."""
    try:
        # strict: on the wire 1.0 is not an int and "1" is not a number
        msg = _ADAPTER.validate_json(payload, strict=True)
    except ValidationError as exc:
        raise Malformed(f"message refused: {_summarise(exc)}") from None
    # Our own payloads are canonical; only other producers' take the slower duplicate-key
    # check. A payload with a key twice would let a verifier whose parser keeps the first
    # value see a different message than we checked (another "device", say).
    if dump_message(msg) != payload:
        _refuse_duplicate_keys(payload)
    return msg


def _summarise(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first: ErrorDetails = errors[0]
    # keys of refused extra fields come from the sender: keep each path part short
    where = ".".join(str(part)[:40] for part in first["loc"]) or "payload"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first['msg'][:160]}{more}"


def _refuse_duplicate_keys(payload: bytes) -> None:
    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise Malformed(f"message refused: key {key[:40]!r} appears more than once")
            obj[key] = value
        return obj

    try:
        json.loads(payload, object_pairs_hook=pairs_hook)
    except Malformed:
        raise
    except (ValueError, RecursionError):
        # pydantic accepted it, so this is a corner where the two parsers disagree: refuse
        raise Malformed("message refused: payload JSON is ambiguous") from None


# -- construction ------------------------------------------------------------------------


@overload
def build_message(
    body: Alert, *, device: str, seq: int, ts: int, id: str | None = None
) -> AlertMessage: ...
@overload
def build_message(
    body: Cancel, *, device: str, seq: int, ts: int, id: str | None = None
) -> CancelMessage: ...
@overload
def build_message(
    body: Heartbeat, *, device: str, seq: int, ts: int, id: str | None = None
) -> HeartbeatMessage: ...
@overload
def build_message(
    body: Status, *, device: str, seq: int, ts: int, id: str | None = None
) -> StatusMessage: ...
@overload
def build_message(
    body: Rtc, *, device: str, seq: int, ts: int, id: str | None = None
) -> RtcMessage: ...
@overload
def build_message(
    body: Ack, *, device: str, seq: int, ts: int, id: str | None = None
) -> AckMessage: ...
@overload
def build_message(
    body: Command, *, device: str, seq: int, ts: int, id: str | None = None
) -> CommandMessage: ...
def build_message(body: Body, *, device: str, seq: int, ts: int, id: str | None = None) -> Message:
    """Wrap a body in the envelope of its type; a fresh message id unless one is given."""
    try:
        cls = _ENVELOPE_FOR[type(body)]
    except KeyError:
        raise TypeError(f"build_message needs a message body, not {type(body).__name__}") from None
    return cls(id=new_message_id() if id is None else id, device=device, seq=seq, ts=ts, body=body)
