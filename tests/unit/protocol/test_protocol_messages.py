from __future__ import annotations

import contextlib
import json
from typing import Any, get_args

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from protocol_testkit import BODIES, messages, up_messages
from pydantic import ValidationError

from protocol import (
    ACK_STAGES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Ack,
    AckMessage,
    Alert,
    AlertMessage,
    Cancel,
    CancelMessage,
    Command,
    CommandMessage,
    Envelope,
    EscalationMessage,
    HealthMessage,
    Heartbeat,
    HeartbeatMessage,
    Malformed,
    Message,
    Rtc,
    RtcMessage,
    Signer,
    Status,
    StatusMessage,
    SyncMessage,
    build_message,
    dump_message,
    open_envelope,
    open_from_device,
    parse_message,
    parse_topic,
    seal,
    up_topic,
)

KEY = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)


def test_every_type_has_a_strategy() -> None:
    assert set(BODIES) == set(MESSAGE_TYPES)


def test_message_types_match_the_models() -> None:
    envelopes = [
        AlertMessage,
        CancelMessage,
        HeartbeatMessage,
        StatusMessage,
        RtcMessage,
        AckMessage,
        CommandMessage,
        HealthMessage,
        SyncMessage,
        EscalationMessage,
    ]
    assert tuple(cls.model_fields["type"].default for cls in envelopes) == MESSAGE_TYPES
    assert set(get_args(get_args(Message)[0])) == set(envelopes)


@given(messages)
def test_dump_parse_round_trip(msg: Message) -> None:
    payload = dump_message(msg)
    parsed = parse_message(payload)
    assert parsed == msg
    assert type(parsed) is type(msg)
    # canonical: the same model always gives the same bytes
    assert dump_message(parsed) == payload


@given(messages)
def test_seal_open_round_trip(msg: Message) -> None:
    signer = Signer("any-signer", KEY)
    opened = open_envelope(seal(msg, signer), {"any-signer": KEY.public_key()}.__getitem__)
    assert opened.message == msg
    assert opened.kid == "any-signer"


@given(up_messages)
def test_seal_open_from_device_round_trip(msg: Message) -> None:
    token = seal(msg, Signer(msg.device, KEY))
    topic = parse_topic(up_topic(msg.device, msg.type))
    opened = open_from_device(token, {msg.device: KEY.public_key()}.__getitem__, topic)
    assert opened.message == msg
    assert opened.token == token


def test_wire_form_is_stable() -> None:
    msg = build_message(
        Alert(bell="emergency", trigger="press"), device="bell-0001", seq=7, ts=1, id="m" * 8
    )
    assert dump_message(msg) == (
        b'{"v":1,"id":"mmmmmmmm","device":"bell-0001","seq":7,"ts":1,"type":"alert",'
        b'"body":{"bell":"emergency","trigger":"press","silent":false,"urgent":false,'
        b'"presses":1,"linked_to":null}}'
    )


@pytest.mark.parametrize(
    ("body", "cls"),
    [
        (Alert(bell="store", trigger="duress", silent=True), AlertMessage),
        (Cancel(alert_id="a" * 32), CancelMessage),
        (Heartbeat(uptime_s=1, power="mains", firmware="1.0"), HeartbeatMessage),
        (Status(state="offline"), StatusMessage),
        (Rtc(kind="bye", session="s" * 8), RtcMessage),
        (Ack(ref="a" * 32, stage="received"), AckMessage),
        (Command(name="ping"), CommandMessage),
    ],
)
def test_build_message_picks_the_envelope(body: Any, cls: Any) -> None:
    msg = build_message(body, device="bell-0001", seq=1, ts=2)
    assert type(msg) is cls
    assert issubclass(cls, Envelope)
    assert msg.body is body
    assert msg.v == PROTOCOL_VERSION
    assert msg.type in MESSAGE_TYPES
    assert len(msg.id) == 32
    assert build_message(body, device="bell-0001", seq=1, ts=2).id != msg.id


def test_build_message_uses_given_id() -> None:
    msg = build_message(Status(state="online"), device="bell-0001", seq=1, ts=2, id="fixed-id")
    assert msg.id == "fixed-id"


def test_build_message_refuses_non_bodies() -> None:
    with pytest.raises(TypeError, match="message body"):
        build_message("alert", device="bell-0001", seq=1, ts=2)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "fields",
    [
        {"device": "Bell"},
        {"seq": -1},
        {"seq": 2**63},
        {"ts": -1},
        {"id": "short"},
    ],
)
def test_build_message_validates(fields: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {"device": "bell-0001", "seq": 1, "ts": 2} | fields
    with pytest.raises(ValidationError):
        build_message(Status(state="online"), **kwargs)


def test_models_are_frozen() -> None:
    msg = build_message(Status(state="online"), device="bell-0001", seq=1, ts=2)
    with pytest.raises(ValidationError):
        msg.seq = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        msg.body.state = "offline"  # type: ignore[misc]


def test_ack_stages_in_order() -> None:
    assert ACK_STAGES == ("received", "delivered", "acknowledged", "dispatched", "closed")


# -- refusals ----------------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "v": 1,
    "id": "0123456789abcdef",
    "device": "bell-0001",
    "seq": 3,
    "ts": 1_732_460_000_000,
    "type": "alert",
    "body": {"bell": "emergency", "trigger": "press"},
}


def with_(path: str, value: Any) -> bytes:
    """GOOD with one field (dotted path) replaced; the value ... deletes it."""
    obj = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    target = obj
    for name in parents:
        target = target[name]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return json.dumps(obj).encode()


def test_good_baseline_parses() -> None:
    msg = parse_message(json.dumps(GOOD).encode())
    assert isinstance(msg, AlertMessage)
    assert msg.body.presses == 1


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (with_("extra", 1), "extra"),
        (with_("body.extra", 1), "body.extra"),
        (with_("type", "alarm"), "payload"),
        (with_("type", "heartbeat"), "heartbeat.body"),  # the body must match the type
        (with_("type", ...), "payload"),
        (with_("v", 2), "v"),
        (with_("v", "1"), "v"),
        (with_("id", "short"), "id"),
        (with_("id", ...), "id"),
        (with_("device", "Bell-1"), "device"),
        (with_("device", "bell-0001\n"), "device"),
        (with_("seq", "3"), "seq"),  # strict on the wire: no string-to-int coercion
        (with_("seq", 3.0), "seq"),
        (with_("seq", True), "seq"),
        (with_("seq", -1), "seq"),
        (with_("seq", 2**63), "seq"),
        (with_("ts", -1), "ts"),
        (with_("ts", None), "ts"),
        (with_("body.bell", "fire"), "bell"),
        (with_("body.trigger", "boom"), "trigger"),
        (with_("body.presses", 0), "presses"),
        (with_("body.presses", 2**31), "presses"),
        (with_("body.silent", 1), "silent"),
        (with_("body.silent", "true"), "silent"),
        (with_("body.linked_to", "x"), "linked_to"),
        (with_("body", None), "body"),
        (with_("body", []), "body"),
    ],
)
def test_parse_refuses(payload: bytes, where: str) -> None:
    with pytest.raises(Malformed) as info:
        parse_message(payload)
    assert where in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"null",
        b"[]",
        b"{}",
        b'"alert"',
        b"{" * 10_000,
        b"[" * 10_000,
        b'{"v":1,',
        b"\xff\xfe",
        json.dumps(GOOD).encode().replace(b'"seq": 3', b'"seq": 3e999'),
        json.dumps(GOOD).encode().replace(b'"seq": 3', b'"seq": ' + b"9" * 5000),
        b'{"v":1,"id":"\\ud800\\ud800\\ud800"}',
    ],
)
def test_parse_refuses_garbage(payload: bytes) -> None:
    with pytest.raises(Malformed):
        parse_message(payload)


BODY_LIMITS: list[tuple[str, dict[str, Any]]] = [
    ("heartbeat", {"uptime_s": -1, "power": "mains", "firmware": "x"}),
    ("heartbeat", {"uptime_s": 1, "power": "solar", "firmware": "x"}),
    ("heartbeat", {"uptime_s": 1, "power": "mains", "firmware": "x" * 65}),
    ("heartbeat", {"uptime_s": 1, "power": "mains", "firmware": "x", "battery_pct": 101}),
    ("heartbeat", {"uptime_s": 1, "power": "mains", "firmware": "x", "link_quality": -1}),
    ("heartbeat", {"uptime_s": 1, "power": "mains", "firmware": "x", "outbox_depth": -1}),
    ("heartbeat", {"power": "mains", "firmware": "x"}),
    ("status", {"state": "asleep"}),
    ("cancel", {"alert_id": "a/b/c/d/e"}),
    ("rtc", {"kind": "offer", "session": "s" * 8}),  # an offer without sdp offers nothing
    ("rtc", {"kind": "bye", "session": "s" * 8, "sdp": "v=0"}),
    ("rtc", {"kind": "offer", "session": "s" * 8, "sdp": "x" * 12_001}),
    ("rtc", {"kind": "bye", "session": "s" * 8, "reason": "x" * 201}),
    ("rtc", {"kind": "hello", "session": "s" * 8}),
    ("ack", {"ref": "a" * 32, "stage": "seen"}),
    ("command", {"name": "reboot"}),
    ("command", {"name": "ping", "args": {f"k{i}": i for i in range(17)}}),
    ("command", {"name": "ping", "args": {"k": {"nested": 1}}}),
    ("command", {"name": "ping", "args": {"k": [1]}}),
    ("command", {"name": "ping", "args": {"k": None}}),
    ("command", {"name": "ping", "args": {"": 1}}),
    ("command", {"name": "ping", "args": {"k" * 33: 1}}),
    ("command", {"name": "ping", "args": {"k": "v" * 257}}),
    ("command", {"name": "ping", "args": {"k": 2**63}}),
]


@pytest.mark.parametrize(("type_", "body"), BODY_LIMITS)
def test_body_bounds(type_: str, body: dict[str, Any]) -> None:
    payload = json.dumps(GOOD | {"type": type_, "body": body}).encode()
    with pytest.raises(Malformed):
        parse_message(payload)


@pytest.mark.parametrize(
    ("type_", "body"),
    [
        ("heartbeat", {"uptime_s": 2**63 - 1, "power": "battery", "firmware": "x" * 64}),
        ("rtc", {"kind": "offer", "session": "s" * 64, "sdp": "x" * 10_000}),
        ("rtc", {"kind": "answer", "session": "s" * 8, "reason": "busy"}),
        ("command", {"name": "ping", "args": {f"k{i}": i for i in range(16)}}),
        ("command", {"name": "set_silent", "args": {"on": True, "n": 1, "f": 1.5, "s": "x"}}),
    ],
)
def test_body_bounds_inclusive(type_: str, body: dict[str, Any]) -> None:
    parse_message(json.dumps(GOOD | {"type": type_, "body": body}).encode())


def test_command_arg_types_survive() -> None:
    msg = parse_message(
        json.dumps(
            GOOD
            | {"type": "command", "body": {"name": "ping", "args": {"b": True, "i": 1, "f": 1.0}}}
        ).encode()
    )
    assert isinstance(msg, CommandMessage)
    args = msg.body.args
    assert [type(args[k]) for k in "bif"] == [bool, int, float]


def test_duplicate_keys_are_refused() -> None:
    # a parser that keeps the first "device" would read another device than we checked
    payload = json.dumps(GOOD).encode().replace(b'"device"', b'"device": "bell-9999", "device"')
    with pytest.raises(Malformed, match="more than once"):
        parse_message(payload)


def test_nested_duplicate_keys_are_refused() -> None:
    payload = json.dumps(GOOD).encode().replace(b'"bell"', b'"bell": "store", "bell"')
    with pytest.raises(Malformed, match="more than once"):
        parse_message(payload)


def test_non_canonical_json_from_other_producers_is_accepted() -> None:
    reordered = {k: GOOD[k] for k in reversed(GOOD)}
    msg = parse_message(json.dumps(reordered, indent=2).encode())
    assert msg == parse_message(json.dumps(GOOD).encode())


def test_error_summary_does_not_echo_the_payload() -> None:
    payload = with_("x" * 5000, "y" * 5000)
    with pytest.raises(Malformed) as info:
        parse_message(payload)
    assert len(str(info.value)) < 300
    assert "y" * 50 not in str(info.value)


@given(st.binary(max_size=400))
def test_parse_random_bytes_raises_only_malformed(payload: bytes) -> None:
    with contextlib.suppress(Malformed):
        parse_message(payload)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from([*GOOD, "body", "bell", "x"]), inner, max_size=8)
        ),
        max_leaves=20,
    )
)
def test_parse_random_json_raises_only_malformed(value: object) -> None:
    with contextlib.suppress(Malformed):
        parse_message(json.dumps(value).encode())


# What an agent that predates `Heartbeat.secondary` sends, byte for byte (main before #23).
OLD_AGENT_HEARTBEAT = (
    b'{"v":1,"id":"hb-0000001","device":"bell-0001","seq":1,"ts":1,"type":"heartbeat",'
    b'"body":{"uptime_s":1,"power":"mains","battery_pct":null,"link_quality":48,'
    b'"firmware":"0.1","outbox_depth":2}}'
)


def test_an_old_agents_heartbeat_validates_and_keeps_its_exact_bytes() -> None:
    msg = parse_message(OLD_AGENT_HEARTBEAT)
    assert isinstance(msg, HeartbeatMessage) and msg.body.secondary is None
    # what the gateway re-serialises (stores, forwards) is exactly what the agent signed
    assert dump_message(msg) == OLD_AGENT_HEARTBEAT
    body = OLD_AGENT_HEARTBEAT[OLD_AGENT_HEARTBEAT.index(b'{"uptime_s"') : -1]
    assert msg.body.model_dump_json().encode() == body
