"""SMS fallback through the real SerialModem driver, talking to a fake modem on a pty."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device.config import DeviceConfig
from device.hal.fakes import PtyModem
from device.hal.modem import SerialModem
from device.outbox import Outbox
from device.sms import MAX_TRIES, SmsFallback
from protocol.messages import Alert

NUMBERS = ["+820000000001", "+820000000002"]
AFTER_MS = 15_000
T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def pty() -> AsyncIterator[PtyModem]:
    async with PtyModem() as modem:
        yield modem


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    box = Outbox(tmp_path / "outbox.db")
    box.put(
        "alert-000001",
        "alert",
        Alert(bell="store", trigger="press").model_dump_json(),
        T0,
        sms=True,
    )
    # a doorbell ring is not an emergency: never by SMS
    box.put(
        "ring-0000001",
        "alert",
        Alert(bell="doorbell", trigger="doorbell_ring").model_dump_json(),
        T0,
    )
    return box


def fallback(outbox: Outbox, modem: SerialModem, clock: Clock, link: list[bool]) -> SmsFallback:
    config = DeviceConfig.model_validate(
        {"device": {"id": "store-0002"}, "sms": {"after_s": AFTER_MS / 1000, "numbers": NUMBERS}}
    )
    return SmsFallback(config, modem, outbox, link_up=lambda: link[0], clock_ms=clock)


async def test_an_alert_not_received_in_time_while_the_link_is_down_goes_by_sms_once(
    pty: PtyModem, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    clock, link = Clock(), [False]
    modem = SerialModem(pty.port, timeout_s=5)
    sms = fallback(outbox, modem, clock, link)
    clock.now = T0 + AFTER_MS - 1
    await sms.check()
    assert pty.received == []  # not yet due

    clock.now = T0 + AFTER_MS
    link[0] = True
    await sms.check()
    assert pty.received == []  # due, but the link is up: MQTT carries it

    link[0] = False
    with caplog.at_level(logging.DEBUG):
        await sms.check()
    assert [r.number for r in pty.received] == NUMBERS
    text = pty.received[0].text
    assert "store-0002" in text and "alert-000001" in text and "ROBBERY" in text
    assert "2023-11-14 22:13:20 UTC" in text
    assert len(text) <= 160
    for number in NUMBERS:
        assert number not in caplog.text  # personal data stays out of the logs

    # once per alert, also for a fresh agent on the same outbox (after a restart)
    clock.now += 60_000
    await sms.check()
    await fallback(outbox, modem, clock, link).check()
    assert len(pty.received) == 2
    # the alert itself stays in the outbox until the gateway receives it
    assert outbox.depth() == 2
    await modem.close()


async def test_an_error_reply_is_retried_then_given_up(
    pty: PtyModem, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    clock, link = Clock(), [False]
    clock.now = T0 + AFTER_MS
    modem = SerialModem(pty.port, timeout_s=5)
    sms = fallback(outbox, modem, clock, link)
    pty.script.cmgs = "cms_error"
    with caplog.at_level(logging.DEBUG):
        for _ in range(MAX_TRIES):
            await sms.check()
    assert sms.failed == MAX_TRIES * len(NUMBERS) and sms.sent == 0
    assert "+CMS ERROR: 500" in caplog.text
    for number in NUMBERS:
        assert number not in caplog.text
    tried = len(pty.commands)
    pty.script.cmgs = "ok"
    await sms.check()  # given up: no endless retries
    assert len(pty.commands) == tried
    assert sms.sent == 0
    await modem.close()


async def test_a_failed_number_is_retried_while_the_others_are_not_sent_twice(
    pty: PtyModem, outbox: Outbox
) -> None:
    clock, link = Clock(), [False]
    clock.now = T0 + AFTER_MS
    modem = SerialModem(pty.port, timeout_s=5)
    sms = fallback(outbox, modem, clock, link)
    pty.script.cmgs = "error"  # ERROR instead of the > prompt, for every number
    await sms.check()
    assert sms.failed == 2
    pty.script.cmgs = "ok"
    await sms.check()
    assert sorted(r.number for r in pty.received) == NUMBERS
    await sms.check()
    assert len(pty.received) == 2
    await modem.close()


async def test_a_silent_modem_times_out_and_the_agent_carries_on(
    pty: PtyModem, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    clock, link = Clock(), [False]
    clock.now = T0 + AFTER_MS
    modem = SerialModem(pty.port, timeout_s=0.3)
    sms = fallback(outbox, modem, clock, link)
    pty.script.silent = True
    with caplog.at_level(logging.WARNING):
        await sms.check()
    assert sms.failed == 2 and sms.sent == 0
    assert "no answer" in caplog.text
    # the modem comes back: the next check sends
    pty.script.silent = False
    await sms.check()
    assert sorted(r.number for r in pty.received) == NUMBERS
    await modem.close()
