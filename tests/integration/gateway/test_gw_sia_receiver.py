"""The SIA DC-09 bridge against an independent receiver: pysiaalarm's, on a loopback port.

The alerts go through the real outbox (SQLite) and the forwarder, as in the gateway; the
receiver must accept each message (it ACKs only what decrypts, checks its CRC, its
timestamp window and knows the code) and decode the event we meant.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pysiaalarm import SIAAccount, SIAEvent
from pysiaalarm.aio import SIAClient
from test_gw_forward_tls import eventually, gateway_and_phone

from ansimi.broker import Mosquitto, free_port
from gateway.config import ForwardConfig, SiaReceiver
from gateway.forward import Forwarder
from gateway.incidents import KINDS
from gateway.metrics import Metrics
from gateway.store import Delivery, Device, Incoming, SqliteStore
from gateway.transports.sia import SiaBridge, frame
from protocol.clock import wall_ms

ACCOUNT = "1234"
KEY = "0123456789ABCDEF"  # pysiaalarm takes the characters as the AES-128 key bytes


@contextlib.asynccontextmanager
async def pysia_receiver(port: int) -> AsyncIterator[list[SIAEvent]]:
    received: list[SIAEvent] = []

    async def on_event(event: SIAEvent) -> None:
        received.append(event)

    accounts = [SIAAccount(ACCOUNT, KEY), SIAAccount("5678", KEY)]
    client = SIAClient("127.0.0.1", port, accounts, function=on_event)
    await client.async_start()
    try:
        yield received
    finally:
        # pysiaalarm's handler notices our close on its next read: let it, so that stopping
        # the server does not cancel it mid-close (asyncio would log that as an error)
        await asyncio.sleep(0.05)
        await client.async_stop()


def keep(store: SqliteStore, items: list[tuple[str, str, dict[str, Any]]]) -> None:
    now = wall_ms()
    store.database.accept_batch(
        [
            Incoming(
                event_id=f"ev{i:04d}",
                device_id=device,
                seq=i + 1,
                type=kind,
                ts_ms=now,
                body_json=json.dumps(body),
                jws="x.y.z",
                centres=("monitoring",),
            )
            for i, (device, kind, body) in enumerate(items)
        ],
        now,
    )


def forwarder(store: SqliteStore, receiver: SiaReceiver, acked: list[str]) -> Forwarder:
    return Forwarder(
        store,
        [receiver],
        ForwardConfig(backoff_min_s=0.01, backoff_max_s=0.05),
        Metrics(),
        district_of=lambda _device: "mapo",
        on_first_delivery=lambda d: acked.append(d.event_id),
        rng=random.Random(1),
        transports={receiver.name: SiaBridge(receiver)},
    )


def alert(trigger: str) -> dict[str, Any]:
    return {"bell": "emergency", "trigger": trigger, "silent": False}


SCENARIO: list[tuple[str, str, dict[str, Any]]] = [
    ("bell-0001", "alert", alert("press")),
    ("bell-0001", "alert", alert("duress")),
    ("bell-0001", "cancel", {"alert_id": "ev0001"}),
    ("bell-0002", "alert", alert("tamper")),
    ("bell-0002", "alert", alert("power_loss")),
    ("bell-0002", "alert", alert("power_restored")),
]
EXPECTED = [
    (ACCOUNT, "PA"),  # panic
    (ACCOUNT, "HA"),  # duress (hold-up)
    (ACCOUNT, "OC"),  # cancel by user
    ("5678", "TA"),  # tamper
    ("5678", "AT"),  # AC power lost
    ("5678", "AR"),  # AC power restored
]


@pytest.mark.parametrize("fmt", ["SIA-DCS", "ADM-CID"])
async def test_pysiaalarm_accepts_our_encrypted_messages_and_decodes_each_event(
    fmt: str,
) -> None:
    port = free_port()
    store = SqliteStore(":memory:")
    for device in ("bell-0001", "bell-0002"):
        store.database.add_device(Device(device, "k", "bell", "mapo"), now_ms=0)
    keep(store, SCENARIO)
    receiver = SiaReceiver(
        name="monitoring",
        port=port,
        format=fmt,  # type: ignore[arg-type]
        account=ACCOUNT,
        accounts={"bell-0002": "5678"},
        receiver="1",
        line="2",
        key=KEY,
        ack_timeout_s=5.0,
    )
    acked: list[str] = []
    fwd = forwarder(store, receiver, acked)
    async with pysia_receiver(port) as received:
        while await fwd.pump():
            pass
        await fwd.aclose()
    assert store.database.waiting_count() == 0
    assert [(e.account, e.code) for e in received] == EXPECTED
    assert all(e.encrypted and e.valid_message for e in received)
    assert {e.receiver for e in received} == {"R1"} and {e.line for e in received} == {"L2"}
    # a fresh sequence number per message
    assert [e.sequence for e in received] == [f"{n:04d}" for n in range(1, 7)]
    # each event's first delivery is reported (the gateway acks the alerts among them)
    assert sorted(acked) == [f"ev{n:04d}" for n in range(6)]


# Each incident kind: the event that opens it (None: a district outage, which a receiver
# hears as each bell's own offline), then its escalation; what the receiver must file, as
# SIA-DCS letters and as the Contact ID event pysiaalarm decodes from ADM-CID.
KIND_CASES: list[tuple[str, dict[str, Any] | None, str, str]] = [
    ("duress", alert("duress"), "HA", "121"),
    ("store_robbery", {"bell": "store", "trigger": "press", "silent": True}, "HA", "122"),
    ("stalking_urgent", alert("long_press"), "PA", "120"),
    ("stalking", alert("press"), "PA", "120"),
    (
        "doorbell_emergency",
        {"bell": "doorbell", "trigger": "doorbell_ring", "urgent": True},
        "PA",
        "120",
    ),
    ("tamper", alert("tamper"), "TA", "137"),
    ("power_lost", alert("power_loss"), "AT", "301"),
    ("district_outage", None, "YC", "350"),
    ("offline", {"state": "offline"}, "YC", "350"),
    ("doorbell_ring", {"bell": "doorbell", "trigger": "doorbell_ring"}, "UA", "150"),
]


@pytest.mark.parametrize("fmt", ["SIA-DCS", "ADM-CID"])
async def test_each_incident_kind_reaches_the_receiver_as_its_own_code_escalated_or_not(
    fmt: str,
) -> None:
    """A bell offline escalated is communication trouble, not a panic the receiver would
    dispatch on; a silent store robbery a silent hold-up; a duress a duress."""
    assert {kind for kind, *_ in KIND_CASES} == set(KINDS)
    port = free_port()
    store = SqliteStore(":memory:")
    store.database.add_device(Device("bell-0001", "k", "bell", "mapo"), now_ms=0)
    events: list[tuple[str, str, dict[str, Any]]] = []
    expected: list[tuple[str, str]] = []
    for n, (kind, opening, code, cid) in enumerate(KIND_CASES):
        if opening is not None:
            events.append(("bell-0001", "status" if "state" in opening else "alert", opening))
            expected.append((code, cid))
        step = {"incident": f"incident{n:04d}", "level": 1, "to": "monitoring", "kind": kind}
        events.append(("bell-0001", "escalation", {**step, "priority": n + 1}))
        expected.append((code, cid))
    keep(store, events)
    receiver = SiaReceiver(
        name="monitoring",
        port=port,
        format=fmt,
        account=ACCOUNT,
        key=KEY,  # type: ignore[arg-type]
    )
    fwd = forwarder(store, receiver, [])
    async with pysia_receiver(port) as received:
        while await fwd.pump():
            pass
        await fwd.aclose()
    assert store.database.waiting_count() == 0  # every one ACKed: a code the receiver knows
    if fmt == "SIA-DCS":
        assert [e.code for e in received] == [code for code, _ in expected]
    else:
        assert [(e.code, e.event_type) for e in received] == expected


async def test_a_nak_for_our_clock_is_answered_with_the_receivers_time() -> None:
    port = free_port()
    receiver = SiaReceiver(name="monitoring", port=port, account=ACCOUNT, key=KEY)
    # our clock is two minutes slow: outside pysiaalarm's window (40 s back, 20 s ahead)
    bridge = SiaBridge(receiver, clock_ms=lambda: wall_ms() - 120_000)
    delivery = Delivery(
        "ev0001", "monitoring", 0, "bell-0001", "alert", 0, json.dumps(alert("press")), "x"
    )
    async with pysia_receiver(port) as received:
        outcome = await bridge.send(delivery, "mapo")
        await bridge.aclose()
    assert outcome.ok, outcome.error
    assert [e.code for e in received] == ["PA"]  # only the resend was accepted
    assert 115_000 <= bridge.offset_ms <= 125_000  # learnt from the NAK, in whole seconds


async def test_a_receiver_that_is_not_there_leaves_the_alert_waiting() -> None:
    receiver = SiaReceiver(name="monitoring", port=free_port(), account=ACCOUNT, key=KEY)
    bridge = SiaBridge(receiver)
    delivery = Delivery(
        "ev0001", "monitoring", 0, "bell-0001", "alert", 0, json.dumps(alert("press")), "x"
    )
    outcome = await bridge.send(delivery, "mapo")
    assert not outcome.ok and not outcome.permanent
    assert "ConnectionRefusedError" in (outcome.error or "")


async def test_a_connection_the_receiver_closed_while_idle_is_replaced_at_once() -> None:
    """A receiver that hangs up after each answer: the next message still goes first time."""
    answered = 0

    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        line = await reader.readuntil(b"\r")
        seq = line[line.index(b'"', line.index(b'"') + 1) + 1 :][:4].decode()
        writer.write(frame(f'"ACK"{seq}L0#{ACCOUNT}[]'))
        await writer.drain()
        answered += 1
        writer.close()

    server = await asyncio.start_server(one_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bridge = SiaBridge(SiaReceiver(name="monitoring", port=port, account=ACCOUNT))
    delivery = Delivery(
        "ev0001", "monitoring", 0, "bell-0001", "alert", 0, json.dumps(alert("press")), "x"
    )
    try:
        for _ in range(3):
            outcome = await bridge.send(delivery, "mapo")
            assert outcome.ok, outcome.error
            await asyncio.sleep(0.05)  # let the hang-up reach us, as after an idle spell
    finally:
        await bridge.aclose()
        server.close()
        await server.wait_closed()
    assert answered == 3


async def test_the_gateway_bridges_a_pressed_alert_to_the_alarm_receiver(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Over MQTT into the gateway, out of its outbox as SIA DC-09, back as `delivered`."""
    port = free_port()
    receiver = SiaReceiver(name="monitoring", port=port, account=ACCOUNT, key=KEY)
    async with (
        pysia_receiver(port) as received,
        gateway_and_phone(tmp_path, mosquitto, sia=[receiver]) as (gateway, phone),
    ):
        alert_id = await phone.alert()
        await eventually(lambda: phone.stage("delivered") == {alert_id})
        assert [(e.account, e.code) for e in received] == [(ACCOUNT, "PA")]
        assert gateway.store.database.waiting_count() == 0
