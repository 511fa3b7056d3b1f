"""SIA DC-09 framing, CRC, encryption and responses, with no network."""

from __future__ import annotations

from typing import Any, get_args

import pytest
from pydantic import ValidationError

from gateway.config import Centre, GatewayConfig, SiaReceiver
from gateway.transports.sia import (
    ALERT_EVENTS,
    CANCEL_EVENT,
    BadResponse,
    aes_cbc,
    crc16,
    frame,
    message_body,
    parse_response,
    sia_event,
    timestamp,
)
from protocol.messages import StatusState

AT_MS = 1_764_000_000_000  # 2025-11-24 16:00:00 UTC
KEY = b"0123456789ABCDEF"


def body_of(**changes: Any) -> str:
    fields: dict[str, Any] = {
        "format": "SIA-DCS",
        "seq": 1,
        "receiver": None,
        "line": "0",
        "account": "1234",
        "event": ALERT_EVENTS["press"],
        "at_ms": AT_MS,
        "key": None,
    }
    return message_body(**(fields | changes))


def test_crc16_is_crc16_arc() -> None:
    # the published check value of CRC-16/ARC (poly 0x8005 reflected, init 0, no xorout)
    assert crc16(b"123456789") == 0xBB3D
    assert crc16(b"") == 0


def test_timestamp_is_utc_in_dc09_order() -> None:
    assert timestamp(AT_MS) == "16:00:00,11-24-2025"


def test_a_clear_sia_dcs_frame_has_crc_length_and_the_event() -> None:
    body = body_of(seq=7, receiver="12", line="3", account="1a2b")
    assert body == '"SIA-DCS"0007R12L3#1A2B[#1A2B|Nri1/PA001]_16:00:00,11-24-2025'
    line = frame(body)
    assert line.startswith(b"\n") and line.endswith(b"\r")
    crc, length, rest = line[1:5], line[5:9], line[9:-1]
    assert rest == body.encode()
    assert int(length, 16) == len(body)
    assert int(crc, 16) == crc16(body.encode())


def test_adm_cid_writes_qualifier_event_partition_and_zone() -> None:
    body = body_of(format="ADM-CID", event=ALERT_EVENTS["tamper_cleared"])
    assert body == '"ADM-CID"0001L0#1234[#1234|3137 01 001]_16:00:00,11-24-2025'


def test_encrypted_data_is_pad_bar_content_in_whole_blocks_with_a_zero_iv() -> None:
    body = body_of(seq=2, event=CANCEL_EVENT, key=KEY, pad=lambda n: "X" * n)
    head, _, hex_data = body.partition("[")
    assert head == '"*SIA-DCS"0002L0#1234'
    data = bytes.fromhex(hex_data)
    assert len(data) % 16 == 0
    plain = aes_cbc(KEY, data, decrypt=True).decode()
    assert plain.endswith("|#1234|Nri1/OC001]_16:00:00,11-24-2025")
    assert set(plain[: plain.index("|")]) <= {"X"}


def test_every_alert_trigger_and_the_other_events_have_a_code() -> None:
    triggers = {
        "press": "PA",
        "duress": "HA",
        "tamper": "TA",
        "power_loss": "AT",
        "power_restored": "AR",
        "test": "RX",
    }
    for trigger, code in triggers.items():
        event = sia_event("alert", {"trigger": trigger})
        assert event is not None and event.sia_code == code
    assert all(sia_event("alert", {"trigger": t}) for t in ALERT_EVENTS)
    assert sia_event("cancel", {"alert_id": "x"}) == CANCEL_EVENT
    offline = sia_event("status", {"state": "offline"})
    assert offline is not None and (offline.qualifier, offline.cid_event) == ("E", 350)
    battery = sia_event("heartbeat", {"power": "battery"})
    assert battery is not None and battery.sia_code == "AT"
    assert sia_event("rtc", {}) is None


def test_every_status_state_has_its_own_sia_event() -> None:
    # the gateway's own disk states are about no device (no SIA account): they go to the
    # HTTPS centres only (gateway/service.py _site_event); a district outage is for the
    # centres that read it, and a SIA receiver gets each bell's own offline inside it
    # (gateway/supervise.py per_account)
    not_for_sia = ("disk_low", "disk_ok", "district_outage", "district_restored")
    device_states = [s for s in get_args(StatusState) if s not in not_for_sia]
    events = [sia_event("status", {"state": state}) for state in device_states]
    assert None not in events and len(set(events)) == len(events)
    down = sia_event("status", {"state": "secondary_path_down"})
    assert down is not None and (down.sia_code, down.qualifier) == ("LT", "E")


def _answer(body: str) -> bytes:
    return b"\n" + f"{crc16(body.encode()):04X}{len(body):04X}{body}".encode() + b"\r"


def test_responses_ack_nak_with_time_and_duh() -> None:
    ack = parse_response(_answer('"ACK"0007R12L3#1A2B[]'))
    assert (ack.kind, ack.seq, ack.time_ms) == ("ACK", 7, None)
    encrypted_ack = parse_response(_answer('"*ACK"0002L0#1234[0123456789ABCDEF0123456789ABCDEF'))
    assert (encrypted_ack.kind, encrypted_ack.seq) == ("ACK", 2)
    nak = parse_response(_answer('"NAK"0000R0L0A0[]_16:00:00,11-24-2025'))
    assert (nak.kind, nak.time_ms) == ("NAK", AT_MS)
    # pysiaalarm writes line before receiver in a NAK to a message it could not parse
    assert parse_response(_answer('"NAK"0000L0R0A0[]_16:00:00,11-24-2025')).kind == "NAK"
    assert parse_response(_answer('"DUH"0003L0#1234[]')).kind == "DUH"


@pytest.mark.parametrize(
    "line",
    [
        b"\n\r",  # what pysiaalarm sends when our CRC was wrong
        b'\n0000000C"ACK"0001L0[]\r',  # wrong CRC
        _answer('"HELLO"0001L0[]'),
    ],
)
def test_a_response_that_does_not_check_out_is_refused(line: bytes) -> None:
    with pytest.raises(BadResponse):
        parse_response(line)


def test_a_sia_receiver_is_routed_like_a_centre_and_its_key_is_checked() -> None:
    config = GatewayConfig(
        centres=[Centre(name="central", url="https://127.0.0.1/", secret="s" * 16)],
        sia=[SiaReceiver(name="monitoring", port=12128, account="1234", districts=["mapo"])],
    )
    assert config.centres_for("mapo") == ("central", "monitoring")
    assert config.centres_for("gangnam") == ("central",)
    hex_key = SiaReceiver(name="mon", port=1, account="123", key="00" * 16, key_format="hex")
    assert hex_key.aes_key == bytes(16)
    with pytest.raises(ValidationError, match="key must give 16, 24 or 32 bytes"):
        SiaReceiver(name="mon", port=1, account="123", key="short")
    with pytest.raises(ValidationError, match="share a name"):
        GatewayConfig(
            centres=[Centre(name="xyz", url="https://127.0.0.1/", secret="s" * 16)],
            sia=[SiaReceiver(name="xyz", port=1, account="123")],
        )


def test_every_alert_trigger_reaches_a_receiver_and_a_test_press_is_filed_as_a_test() -> None:
    from protocol.messages import Alert

    triggers = get_args(Alert.model_fields["trigger"].annotation)
    assert set(triggers) == set(ALERT_EVENTS)
    test = sia_event("alert", {"trigger": "test"})
    # DC-09 RX / Contact ID 601: a receiver files it as a manual test, never as an alarm
    assert test is not None and (test.sia_code, test.cid_event) == ("RX", 601)
