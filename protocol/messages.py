"""Typed messages: what travels inside a signed envelope.

Every payload is one JSON object: ``v``, ``id``, ``device``, ``seq``, ``ts``, ``type`` and a
typed ``body``. Models are frozen and refuse unknown fields; every string and integer has a
bound, so a valid message is always small and fits a signed 64-bit database column.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal, TypeAlias, get_args, overload

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
from protocol.remote_config import ConfigPatch

PROTOCOL_VERSION: Final = 1

# Signed 64-bit, so every integer fits SQLite INTEGER and PostgreSQL BIGINT unchanged.
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]
UInt63 = Annotated[int, Field(ge=0, lt=2**63)]
Percent = Annotated[int, Field(ge=0, le=100)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# What a device is: an emergency bell, a doorbell with a camera, a store's panic bell. The
# one definition for the device, the gateway's records, provisioning and the simulator.
DeviceKind = Literal["bell", "doorbell", "store"]
DEVICE_KINDS: Final[tuple[DeviceKind, ...]] = ("bell", "doorbell", "store")

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
        # a test press (scheduled or asked for by the gateway): travels the whole path to the
        # centres and back as `delivered`, marked as a test everywhere, never escalated
        "test",
    ]
    silent: bool = False
    urgent: bool = False
    # presses made while the previous alert was still unacknowledged are folded into one alert
    presses: Annotated[int, Field(ge=1, lt=2**31)] = 1
    linked_to: MessageId | None = None


class Cancel(_Model):
    alert_id: MessageId


# AT+CPIN? as one word: READY, a PIN or PUK wanted, no SIM (+CME ERROR: 10), another error.
# One definition for the modem driver and the heartbeat: a state the driver can report
# must always make a valid heartbeat.
SimState = Literal["ready", "pin", "puk", "absent", "error", "unknown"]


class SecondaryPath(_Model):
    """The SMS path's health, as the device found it for this heartbeat.

    From the modem's AT+CPIN? (sim), AT+CREG? (registered) and AT+CSQ (signal, 0..100 like
    `link_quality`), and the count of SMS numbers configured (never the numbers).
    """

    modem: bool  # a modem is configured and answered
    sim: SimState = "unknown"
    registered: bool | None = None
    signal: Percent | None = None
    numbers: Annotated[int, Field(ge=0, le=8)] = 0

    @property
    def faults(self) -> tuple[str, ...]:
        """Why an SMS could not go out now; empty when the path works."""
        if not self.modem:
            return ("no_modem",) if self.numbers else ("no_modem", "no_numbers")
        faults = []
        if self.sim != "ready":
            faults.append(f"sim_{self.sim}")
        if self.registered is False:
            faults.append("not_registered")
        if not self.numbers:
            faults.append("no_numbers")
        return tuple(faults)


ConfigHash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class Heartbeat(_Model):
    uptime_s: UInt63
    power: Literal["mains", "battery"]
    battery_pct: Percent | None = None
    link_quality: Percent | None = None
    firmware: Annotated[str, StringConstraints(max_length=64)]
    outbox_depth: UInt63 = 0
    # Absent from agents that predate it (the gateway then judges nothing), and left out of
    # the JSON when None, so their heartbeats serialise to exactly the bytes they signed.
    secondary: SecondaryPath | None = Field(default=None, exclude_if=lambda v: v is None)
    # the hash of the remote config it runs (protocol/remote_config.py); absent as above
    config_hash: ConfigHash | None = Field(default=None, exclude_if=lambda v: v is None)


# A device signs online/offline (its last will). The gateway signs the others about what it
# derives: the secondary path's changes from heartbeats (gateway/secondary.py), its own disk
# (gateway/health.py) and mass outages (gateway/supervise.py); a device may never send
# those (protocol/envelope.py refuses them: GATEWAY_STATES).
StatusState = Literal[
    "online",
    "offline",
    "secondary_path_down",
    "secondary_path_up",
    "disk_low",
    "disk_ok",
    "district_outage",
    "district_restored",
    # maintenance: the device's test press did not complete; `stage` says where it stopped
    "test_failed",
    # a certificate (the device's, or the site CA's / the gateway's own, about the gateway)
    # within the warning days of expiry and not renewed (gateway/certwatch.py)
    "cert_expiring",
]
# where a test press stopped: `link` no `received` (device, network, broker, gateway intake),
# `centre` received but not `delivered` (routing or the centres)
TestStage = Literal["link", "centre"]


# at most this many device ids in one district event: the signed token must stay under
# MAX_TOKEN_BYTES whatever the ids; the count is always complete
MAX_LISTED_DEVICES: Final = 150
_GROUPED_STATES = ("district_outage", "district_restored")


class Status(_Model):
    """A device's connection state, or one the gateway derives and signs itself.

    `online`/`offline` are about the envelope's device and carry nothing else; so do the
    gateway's `secondary_path_*` (from heartbeats) and `disk_*` (its own disk).
    `district_outage`: `count` devices of `district` went offline together; `offline` lists
    them. `district_restored`: most are back; `offline` lists those still offline. The
    envelope's device is the one that tripped the outage (events are kept per device).
    Unset fields are left out of the JSON, so the other states keep their bytes.
    """

    state: StatusState
    district: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    count: UInt63 | None = None
    offline: Annotated[list[DeviceId], Field(max_length=MAX_LISTED_DEVICES)] | None = None
    stage: TestStage | None = None

    @model_validator(mode="after")
    def _fields_fit_state(self) -> Status:
        if (self.state == "test_failed") != (self.stage is not None):
            raise ValueError("a status test_failed, and only it, carries the stage it stopped at")
        grouped = (self.district, self.count, self.offline)
        if self.state not in _GROUPED_STATES and any(f is not None for f in grouped):
            raise ValueError(f"a status {self.state} carries no district, count or list")
        if self.state in _GROUPED_STATES and any(f is None for f in grouped):
            raise ValueError(f"a status {self.state} needs district, count and offline")
        return self

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


# what a device may say about itself (its last will); every other state is the gateway's,
# derived so that a state added to StatusState is refused from devices by default
DEVICE_STATES: Final[tuple[str, ...]] = ("online", "offline")
GATEWAY_STATES: Final[tuple[str, ...]] = tuple(
    s for s in get_args(StatusState) if s not in DEVICE_STATES
)

# What a status tells of its bell's link, down (True) or up (False): a district outage is
# its bells offline until the district is restored. The gateway's incidents and a
# receiver's cards read it alike; the other states tell nothing of the link.
LINK_DOWN_OF_STATE: Final[dict[str, bool]] = {
    "offline": True,
    "online": False,
    "district_outage": True,
    "district_restored": False,
}


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
    # update: args `version` and `url` of a release bundle (device/update.py)
    name: Literal[
        "video_start",
        "video_stop",
        "selftest",
        "set_silent",
        "ping",
        "test_press",
        "set_config",
        "update",
    ]
    args: Annotated[dict[ArgName, ArgValue], Field(max_length=16)] = Field(default_factory=dict)
    # set_config: the whole remote part of the device's config (not a delta of the last one),
    # left out of the JSON when None so other commands keep the bytes they always had
    config: ConfigPatch | None = Field(default=None, exclude_if=lambda v: v is None)


class Health(_Model):
    """Something a device found wrong with itself, or put right: news for a person.

    Kept by the device until `received`, kept and forwarded by the gateway like an alert.
    """

    event: Literal[
        "clock_corrected",
        "outbox_recovered",
        "storage_failed",
        "storage_restored",
        # a set_config the device refused (detail: why); one it runs on trial (detail: its
        # hash), confirmed once the gateway acknowledges this report `received`; one that
        # failed its trial (detail: `<hash> <reason>: ...`, reason `not_confirmed` or
        # `restarted`). `config_rolled_back` (detail: `back to <hash>`) is what agents sent
        # for a failure before config_applied existed: still taken from them
        "config_refused",
        "config_applied",
        "config_failed",
        "config_rolled_back",
        # agent updates (device/update.py): a new version runs (detail: the version) and
        # is proving itself; an update that failed or rolled back (detail: version reason:
        # what happened)
        "update_installed",
        "update_failed",
    ]
    # clock_corrected: the device's clock minus the gateway's, before the correction
    skew_ms: Int64 | None = None
    # outbox_recovered: entries imported from the damaged outbox (the rest were unreadable)
    salvaged: UInt63 | None = None
    # what went wrong, as the device's storage said it; no personal data
    detail: Annotated[str, StringConstraints(max_length=200)] | None = None


SyncReason = Literal["clock", "sequence"]


class Sync(_Model):
    """The gateway's signed answer to a verified message it could not take as it was.

    The envelope's `ts` is the gateway's clock. The rule is in `protocol.replay`.
    """

    ref: MessageId  # the device's message that prompted it
    reason: SyncReason
    next_seq: UInt63  # the device's next uplink sequence number must be at least this


class Escalation(_Model):
    """An incident nobody acknowledged in time, told to the next centre of the chain.

    Signed by the gateway about the bell (the envelope's device); a device may never send
    it (GATEWAY_TYPES, refused by protocol/envelope.py). docs/incidents.md has the rules.
    """

    incident: MessageId
    level: Annotated[int, Field(ge=1, le=64)]  # the chain's step, 1 = first
    to: Annotated[str, StringConstraints(min_length=1, max_length=64)]  # the centre's name
    kind: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    priority: Annotated[int, Field(ge=1, le=1000)]


Body: TypeAlias = (
    Alert | Cancel | Heartbeat | Status | Rtc | Ack | Command | Health | Sync | Escalation
)

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


class HealthMessage(Envelope):
    type: Literal["health"] = "health"
    body: Health


class SyncMessage(Envelope):
    type: Literal["sync"] = "sync"
    body: Sync


class EscalationMessage(Envelope):
    type: Literal["escalation"] = "escalation"
    body: Escalation


Message = Annotated[
    AlertMessage
    | CancelMessage
    | HeartbeatMessage
    | StatusMessage
    | RtcMessage
    | AckMessage
    | CommandMessage
    | HealthMessage
    | SyncMessage
    | EscalationMessage,
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
    "health",
    "sync",
    "escalation",
)
UP_TYPES: Final[tuple[str, ...]] = ("alert", "cancel", "heartbeat", "status", "rtc", "health")
DOWN_TYPES: Final[tuple[str, ...]] = ("ack", "command", "rtc", "sync")
# signed by the gateway for the centres only: neither up nor down, so a device can neither
# send one (open_from_device) nor be sent one (open_for_device)
GATEWAY_TYPES: Final[tuple[str, ...]] = ("escalation",)

_ENVELOPE_FOR: Final[dict[type[BaseModel], Callable[..., Message]]] = {
    Alert: AlertMessage,
    Cancel: CancelMessage,
    Heartbeat: HeartbeatMessage,
    Status: StatusMessage,
    Rtc: RtcMessage,
    Ack: AckMessage,
    Command: CommandMessage,
    Health: HealthMessage,
    Sync: SyncMessage,
    Escalation: EscalationMessage,
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
@overload
def build_message(
    body: Health, *, device: str, seq: int, ts: int, id: str | None = None
) -> HealthMessage: ...
@overload
def build_message(
    body: Sync, *, device: str, seq: int, ts: int, id: str | None = None
) -> SyncMessage: ...
@overload
def build_message(
    body: Escalation, *, device: str, seq: int, ts: int, id: str | None = None
) -> EscalationMessage: ...
def build_message(body: Body, *, device: str, seq: int, ts: int, id: str | None = None) -> Message:
    """Wrap a body in the envelope of its type; a fresh message id unless one is given."""
    try:
        cls = _ENVELOPE_FOR[type(body)]
    except KeyError:
        raise TypeError(f"build_message needs a message body, not {type(body).__name__}") from None
    return cls(id=new_message_id() if id is None else id, device=device, seq=seq, ts=ts, body=body)
