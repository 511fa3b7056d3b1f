from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from protocol_testkit import DEVICE, DEVICE_KEY, GATEWAY

from protocol import (
    MAX_TOKEN_BYTES,
    Ack,
    Alert,
    BadSignature,
    Command,
    Escalation,
    Heartbeat,
    Malformed,
    Message,
    Opened,
    Oversized,
    Rtc,
    Signer,
    Topic,
    TopicMismatch,
    UnknownSigner,
    build_message,
    dump_message,
    open_envelope,
    open_for_device,
    open_from_device,
    parse_topic,
    seal,
)

Resolve = Callable[[str], Ed25519PublicKey]
TS = 1_732_460_000_000


def alert(device: str = DEVICE) -> Message:
    return build_message(Alert(bell="emergency", trigger="press"), device=device, seq=1, ts=TS)


def ack(device: str = DEVICE) -> Message:
    return build_message(Ack(ref="a" * 32, stage="received"), device=device, seq=1, ts=TS)


def sign_json(signer: Signer, obj: dict[str, Any]) -> str:
    return signer.sign(json.dumps(obj, separators=(",", ":")).encode())


def test_seal_and_open(device_signer: Signer, resolve: Resolve) -> None:
    msg = alert()
    token = seal(msg, device_signer)
    assert open_envelope(token, resolve) == Opened(msg, DEVICE, token)
    assert open_from_device(token, resolve) == Opened(msg, DEVICE, token)
    topic = Topic(DEVICE, "up", "alert")
    assert open_from_device(token.encode(), resolve, topic) == Opened(msg, DEVICE, token)


def test_seal_signs_the_canonical_payload(device_signer: Signer) -> None:
    msg = alert()
    payload_b64 = seal(msg, device_signer).split(".")[1]
    assert base64.urlsafe_b64decode(payload_b64 + "==") == dump_message(msg)


def test_device_may_not_speak_for_another(device_signer: Signer, resolve: Resolve) -> None:
    token = seal(alert("bell-0002"), device_signer)
    # the signature itself is fine: any receiver checking only that would be fooled
    assert open_envelope(token, resolve).message.device == "bell-0002"
    with pytest.raises(TopicMismatch, match="signed by 'bell-0001'"):
        open_from_device(token, resolve)


def test_gateway_key_does_not_let_it_speak_as_a_device(
    gateway_signer: Signer, resolve: Resolve
) -> None:
    with pytest.raises(TopicMismatch):
        open_from_device(seal(alert(), gateway_signer), resolve)


def test_device_may_not_send_down_types(resolve: Resolve) -> None:
    signer = Signer(DEVICE, DEVICE_KEY)
    with pytest.raises(TopicMismatch, match="devices send only"):
        open_from_device(seal(ack(), signer), resolve)


def test_escalation_is_the_gateways_alone(
    device_signer: Signer, gateway_signer: Signer, resolve: Resolve
) -> None:
    # a bell that could send its own escalation could fake one to any centre of the chain
    body = Escalation(incident="a" * 32, level=1, to="central", kind="duress", priority=1)
    escalation = build_message(body, device=DEVICE, seq=2, ts=TS)
    with pytest.raises(TopicMismatch, match="devices send only"):
        open_from_device(seal(escalation, device_signer), resolve)
    with pytest.raises(TopicMismatch, match="it sends only"):
        open_for_device(seal(escalation, gateway_signer), resolve, DEVICE)


@pytest.mark.parametrize(
    "topic",
    [
        Topic("bell-0002", "up", "alert"),
        Topic(DEVICE, "up", "heartbeat"),
        Topic(DEVICE, "down", "alert"),
    ],
)
def test_topic_must_match(topic: Topic, device_signer: Signer, resolve: Resolve) -> None:
    with pytest.raises(TopicMismatch, match="topic"):
        open_from_device(seal(alert(), device_signer), resolve, topic)


def test_open_for_device(gateway_signer: Signer, resolve: Resolve) -> None:
    msg = ack()
    token = seal(msg, gateway_signer)
    topic = parse_topic(f"ansimi/v1/{DEVICE}/down/ack")
    opened = open_for_device(token, resolve, DEVICE, topic)
    assert opened.message == msg
    assert opened.kid == GATEWAY


def test_open_for_device_refuses_mail_for_another_device(
    gateway_signer: Signer, resolve: Resolve
) -> None:
    # a command the gateway really signed, for a neighbour, replayed to this device
    cmd = build_message(Command(name="video_start"), device="bell-0002", seq=1, ts=TS)
    with pytest.raises(TopicMismatch, match="addressed to 'bell-0002'"):
        open_for_device(seal(cmd, gateway_signer), resolve, DEVICE)


def test_open_for_device_refuses_up_types(gateway_signer: Signer, resolve: Resolve) -> None:
    with pytest.raises(TopicMismatch):
        open_for_device(seal(alert(), gateway_signer), resolve, DEVICE)


def test_open_for_device_checks_the_topic(gateway_signer: Signer, resolve: Resolve) -> None:
    with pytest.raises(TopicMismatch):
        open_for_device(seal(ack(), gateway_signer), resolve, DEVICE, Topic(DEVICE, "down", "rtc"))


def test_open_for_device_with_a_device_signed_message(
    device_signer: Signer, gateway_signer: Signer
) -> None:
    # the device trusts only the gateway key it was provisioned with
    only_gateway = {GATEWAY: gateway_signer.public_key}.__getitem__
    with pytest.raises(UnknownSigner):
        open_for_device(seal(ack(), device_signer), only_gateway, DEVICE)


GOOD: dict[str, Any] = {
    "v": 1,
    "id": "0123456789abcdef",
    "device": DEVICE,
    "seq": 3,
    "ts": TS,
    "type": "alert",
    "body": {"bell": "emergency", "trigger": "press"},
}


@pytest.mark.parametrize(
    "change",
    [
        {"extra": True},
        {"type": "alarm"},
        {"type": "heartbeat"},
        {"v": 2},
        {"body": {"bell": "emergency", "trigger": "press", "extra": 1}},
    ],
)
def test_signed_but_invalid_payload(
    change: dict[str, Any], device_signer: Signer, resolve: Resolve
) -> None:
    assert open_from_device(sign_json(device_signer, GOOD), resolve).message.id == GOOD["id"]
    with pytest.raises(Malformed):
        open_from_device(sign_json(device_signer, GOOD | change), resolve)


def test_signed_payload_with_a_repeated_device_key(device_signer: Signer, resolve: Resolve) -> None:
    payload = json.dumps(GOOD).replace('"device"', '"device": "bell-0002", "device"')
    with pytest.raises(Malformed, match="more than once"):
        open_from_device(device_signer.sign(payload.encode()), resolve)


def test_signature_is_checked_before_the_payload(device_signer: Signer, resolve: Resolve) -> None:
    head, _, sig = seal(alert(), device_signer).split(".")
    garbage = base64.urlsafe_b64encode(b"not json").rstrip(b"=").decode()
    with pytest.raises(BadSignature):
        open_from_device(f"{head}.{garbage}.{sig}", resolve)


def test_oversized_is_refused_at_both_ends(device_signer: Signer, resolve: Resolve) -> None:
    # 10 000 characters is a valid sdp, but not when each takes 3 bytes of UTF-8
    rtc = Rtc(kind="offer", session="s" * 16, sdp="한" * 10_000)
    msg = build_message(rtc, device=DEVICE, seq=1, ts=TS)
    with pytest.raises(Oversized, match="rtc message"):
        seal(msg, device_signer)
    with pytest.raises(Oversized):
        open_from_device(device_signer.sign(dump_message(msg)), resolve)


def test_max_bytes_reaches_verify(device_signer: Signer, resolve: Resolve) -> None:
    token = seal(alert(), device_signer)
    with pytest.raises(Oversized):
        open_envelope(token, resolve, max_bytes=100)
    with pytest.raises(Oversized):
        open_from_device(token, resolve, max_bytes=100)
    with pytest.raises(Oversized):
        open_for_device(token, resolve, DEVICE, max_bytes=100)


def test_a_typical_heartbeat_is_small(device_signer: Signer) -> None:
    hb = Heartbeat(uptime_s=86_400, power="battery", battery_pct=80, firmware="1.2.3")
    token = seal(build_message(hb, device=DEVICE, seq=10, ts=TS), device_signer)
    assert len(token) < MAX_TOKEN_BYTES // 20


def test_a_long_realistic_sdp_fits(device_signer: Signer, resolve: Resolve) -> None:
    # An SDP at the model's 10 000-character limit, with CRLF line ends (JSON escapes each
    # as two bytes, base64 adds a third), still fits MAX_TOKEN_BYTES
    line = "a=candidate:1 1 udp 2122260223 192.168.100.200 54321 typ host generation 0\r\n"
    sdp = (line * 200)[:10_000]
    msg = build_message(Rtc(kind="offer", session="s" * 64, sdp=sdp), device=DEVICE, seq=1, ts=TS)
    assert open_from_device(seal(msg, device_signer), resolve).message == msg
