"""SMS fallback through the real SerialModem driver, talking to a fake modem on a pty."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device.behaviour import SmsProgress
from device.cli import _check_modem
from device.config import DeviceConfig
from device.hal.fakes import FakeModem, PtyModem
from device.hal.modem import SerialModem
from device.hal.ports import Modem, ModemInfo
from device.outbox import Outbox
from device.sms import MAX_TRIES, UNDELIVERED_FILE, SmsFallback
from protocol.messages import Ack, AckStage, Alert

NUMBERS = ["+820000000001", "+820000000002"]
AFTER_MS = 15_000
UNDELIVERED_MS = 30_000
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


def fallback(
    outbox: Outbox,
    modem: Modem | None,
    clock: Clock,
    *,
    numbers: list[str] = NUMBERS,
    progress: list[tuple[str, SmsProgress]] | None = None,
    undelivered_path: Path | None = None,
    mode: str = "pdu",
) -> SmsFallback:
    config = DeviceConfig.model_validate(
        {
            "device": {"id": "store-0002"},
            "sms": {
                "after_s": AFTER_MS / 1000,
                "undelivered_after_s": UNDELIVERED_MS / 1000,
                "numbers": numbers,
                "mode": mode,
            },
        }
    )
    on_progress = None if progress is None else lambda i, p: progress.append((i, p))
    return SmsFallback(
        config,
        modem,
        outbox,
        clock_ms=clock,
        on_progress=on_progress,
        undelivered_path=undelivered_path,
    )


def acked(sms: SmsFallback, outbox: Outbox, ref: str, stage: AckStage) -> None:
    """As the agent does: the SMS fallback hears the ack before the outbox drops the alert."""
    ack = Ack(ref=ref, stage=stage)
    sms.on_ack(ack)
    if stage == "received":
        outbox.received(ref)


async def test_the_sms_timer_starts_at_the_press_whatever_the_link(
    pty: PtyModem, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    # No link at all here: a black-holed link looks up, so only the press's time counts.
    clock = Clock()
    modem = SerialModem(pty.port, timeout_s=5)
    sms = fallback(outbox, modem, clock)
    clock.now = T0 + AFTER_MS - 1
    await sms.check()
    assert pty.received == []  # not yet due

    clock.now = T0 + AFTER_MS
    with caplog.at_level(logging.DEBUG):
        await sms.check()
    assert [r.number for r in pty.received] == NUMBERS
    text = pty.received[0].text
    # Korean by default (PDU mode): the time in Korea's
    assert "store-0002" in text and "alert-000001" in text and "매장 강도 신고" in text
    assert "2023-11-15 07:13:20 KST" in text
    assert len(text) <= 70 and pty.received[0].part is None  # one SMS, no parts
    for number in NUMBERS:
        assert number not in caplog.text  # personal data stays out of the logs

    # once per alert, also for a fresh agent on the same outbox (after a restart)
    clock.now += 60_000
    await sms.check()
    await fallback(outbox, modem, clock).check()
    assert len(pty.received) == 2
    # the alert itself stays in the outbox until the gateway receives it
    assert outbox.depth() == 2
    await modem.close()


async def test_text_mode_stays_for_modems_that_need_it(pty: PtyModem, outbox: Outbox) -> None:
    clock = Clock()
    clock.now = T0 + AFTER_MS
    modem = SerialModem(pty.port, timeout_s=5)
    await fallback(outbox, modem, clock, mode="text").check()
    text = pty.received[0].text
    assert "store-0002" in text and "alert-000001" in text and "ROBBERY" in text
    assert "2023-11-14 22:13:20 UTC" in text
    assert len(text) <= 160 and text.isascii()
    assert 'AT+CMGS="' + NUMBERS[0] + '"' in pty.commands and "AT+CMGF=0" not in pty.commands
    await modem.close()


async def test_an_error_reply_is_retried_then_given_up(
    pty: PtyModem, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    clock.now = T0 + AFTER_MS
    modem = SerialModem(pty.port, timeout_s=5)
    sms = fallback(outbox, modem, clock)
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
    clock = Clock()
    clock.now = T0 + AFTER_MS
    modem = SerialModem(pty.port, timeout_s=5)
    sms = fallback(outbox, modem, clock)
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
    clock = Clock()
    clock.now = T0 + AFTER_MS
    modem = SerialModem(pty.port, timeout_s=0.3)
    sms = fallback(outbox, modem, clock)
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


# ---- received but not delivered (#14 item 7), once per alert, progress, health ---------------


async def test_received_but_not_delivered_in_time_goes_by_sms_even_with_the_link_up(
    outbox: Outbox,
) -> None:
    clock, modem = Clock(), FakeModem()
    sms = fallback(outbox, modem, clock)
    clock.now = T0 + 2_000
    acked(sms, outbox, "alert-000001", "received")  # the gateway has it: the link works
    clock.now = T0 + UNDELIVERED_MS - 1
    await sms.check()
    assert modem.sent == []  # received in time: only the undelivered rule is left
    clock.now = T0 + UNDELIVERED_MS
    await sms.check()
    assert [m.number for m in modem.sent] == NUMBERS
    assert "alert-000001" in modem.sent[0].text
    clock.now += 60_000
    acked(sms, outbox, "alert-000001", "delivered")  # late: changes nothing
    await sms.check()
    assert len(modem.sent) == 2


async def test_delivered_in_time_means_no_sms(outbox: Outbox) -> None:
    clock, modem = Clock(), FakeModem()
    sms = fallback(outbox, modem, clock)
    clock.now = T0 + 2_000
    acked(sms, outbox, "alert-000001", "received")
    clock.now = T0 + 10_000
    acked(sms, outbox, "alert-000001", "delivered")
    clock.now = T0 + 10 * UNDELIVERED_MS
    await sms.check()
    assert modem.sent == []


async def test_an_alert_goes_by_sms_once_whichever_rule_comes_first(outbox: Outbox) -> None:
    clock, modem = Clock(), FakeModem()
    sms = fallback(outbox, modem, clock)
    clock.now = T0 + AFTER_MS
    await sms.check()  # not received: by SMS
    assert len(modem.sent) == 2
    clock.now = T0 + AFTER_MS + 5_000
    acked(sms, outbox, "alert-000001", "received")  # the link came back
    clock.now = T0 + 3 * UNDELIVERED_MS  # and the centre still has not got it
    await sms.check()
    assert len(modem.sent) == 2


@pytest.mark.parametrize("delivered_before_the_restart", [False, True])
async def test_a_restart_keeps_the_alerts_still_waiting_for_delivered(
    outbox: Outbox, tmp_path: Path, delivered_before_the_restart: bool
) -> None:
    # the outbox forgets an alert at `received`: only the fallback's own file still has it
    clock, modem, path = Clock(), FakeModem(), tmp_path / UNDELIVERED_FILE

    def started() -> SmsFallback:
        return fallback(outbox, modem, clock, undelivered_path=path)

    sms = started()
    clock.now = T0 + 2_000
    acked(sms, outbox, "alert-000001", "received")
    assert outbox.sms_due(clock.now) == []
    if delivered_before_the_restart:
        acked(sms, outbox, "alert-000001", "delivered")
    expected = [] if delivered_before_the_restart else NUMBERS
    clock.now = T0 + UNDELIVERED_MS  # the agent restarted meanwhile: a fresh fallback
    await started().check()
    assert [m.number for m in modem.sent] == expected
    assert all("alert-000001" in m.text for m in modem.sent)
    clock.now += 60_000  # and restarted again: once per alert still
    await started().check()
    assert [m.number for m in modem.sent] == expected


async def test_a_torn_undelivered_file_is_said_and_the_agent_carries_on(
    outbox: Outbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / UNDELIVERED_FILE
    path.write_text('[["alert-000001", "al')  # a power cut mid-write of an older agent
    clock, modem = Clock(), FakeModem()
    with caplog.at_level(logging.ERROR):
        sms = fallback(outbox, modem, clock, undelivered_path=path)
    assert str(path) in caplog.text
    clock.now = T0 + AFTER_MS
    await sms.check()  # the outbox's alert still goes by SMS
    assert len(modem.sent) == 2


async def test_a_number_that_failed_before_received_is_tried_again_while_undelivered(
    outbox: Outbox,
) -> None:
    clock, modem = Clock(), FakeModem()
    sms = fallback(outbox, modem, clock)
    clock.now = T0 + AFTER_MS
    modem.fail_next(1)  # the first number fails, the second gets it
    await sms.check()
    assert [m.number for m in modem.sent] == NUMBERS[1:]
    acked(sms, outbox, "alert-000001", "received")
    clock.now = T0 + UNDELIVERED_MS
    await sms.check()
    assert sorted(m.number for m in modem.sent) == NUMBERS  # each number once


async def test_progress_is_told_once_per_step_and_only_for_what_went_out(
    outbox: Outbox,
) -> None:
    clock, modem = Clock(), FakeModem()
    progress: list[tuple[str, SmsProgress]] = []
    sms = fallback(outbox, modem, clock, progress=progress)
    clock.now = T0 + AFTER_MS
    modem.fail_next(2)  # both numbers fail: trying, not sent
    await sms.check()
    assert progress == [("alert-000001", "trying")]
    await sms.check()  # the retry sends
    assert progress == [("alert-000001", "trying"), ("alert-000001", "sent")]
    await sms.check()
    assert len(progress) == 2


async def test_progress_says_failed_when_every_number_failed_every_try(outbox: Outbox) -> None:
    clock, modem = Clock(), FakeModem()
    progress: list[tuple[str, SmsProgress]] = []
    sms = fallback(outbox, modem, clock, progress=progress)
    clock.now = T0 + AFTER_MS
    modem.fail_next(MAX_TRIES * len(NUMBERS))
    for _ in range(MAX_TRIES + 1):
        await sms.check()
    assert progress == [("alert-000001", "trying"), ("alert-000001", "failed")]


async def test_health_reports_modem_sim_registration_signal_and_numbers(outbox: Outbox) -> None:
    clock = Clock()
    modem = FakeModem(signal=31, registered=False)
    health = await fallback(outbox, modem, clock).health()
    assert (health.modem, health.sim, health.registered, health.signal, health.numbers) == (
        True,
        "ready",
        False,
        100,
        2,
    )
    assert health.faults == ("not_registered",)
    modem.registered = True
    assert (await fallback(outbox, modem, clock).health()).faults == ()
    modem.sim_ready = False
    assert (await fallback(outbox, modem, clock).health()).faults == ("sim_absent",)
    no_modem = await fallback(outbox, None, clock).health()
    assert (no_modem.modem, no_modem.faults) == (False, ("no_modem",))


async def test_a_busy_modem_reports_what_was_known_never_a_guessed_fault(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    modem = FakeModem()
    sms = fallback(outbox, modem, Clock())
    answer = modem.probe
    busy = asyncio.Event()

    async def probe() -> ModemInfo:
        await busy.wait()  # AT+CMGS holds the port for a while
        return await answer()

    monkeypatch.setattr(modem, "probe", probe)
    monkeypatch.setattr("device.sms.PROBE_TIMEOUT_S", 0.01)
    assert await sms.health() is None  # nothing known yet: the gateway judges nothing
    busy.set()
    known = await sms.health()
    assert known is not None and known.faults == ()
    busy.clear()
    assert await sms.health() == known


async def test_health_over_the_real_driver_reads_creg_and_cpin(
    pty: PtyModem, outbox: Outbox
) -> None:
    modem = SerialModem(pty.port, timeout_s=5)
    sms = fallback(outbox, modem, Clock())
    assert (await sms.health()).faults == ()
    pty.script.creg = "0,2"  # searching
    pty.script.sim_ready = False
    health = await sms.health()
    assert (health.registered, health.sim) == (False, "absent")
    assert "AT+CREG?" in pty.commands
    await modem.close()


async def test_no_numbers_is_said_at_start_with_the_fix_and_in_the_health(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    sms = fallback(outbox, FakeModem(), Clock(), numbers=[])
    with caplog.at_level(logging.WARNING):
        await sms.run()  # returns at once: nothing to send to
    assert "no SMS numbers configured" in caplog.text
    assert "ansimi device set-sms-numbers" in caplog.text
    assert (await sms.health()).faults == ("no_numbers",)


async def test_selftest_says_when_the_modem_works_but_nobody_would_get_an_sms() -> None:
    no_numbers = DeviceConfig()
    outcome, text = await _check_modem(FakeModem(), no_numbers)
    assert outcome == "pass" and "ansimi device set-sms-numbers" in text
    with_numbers = DeviceConfig.model_validate({"sms": {"numbers": NUMBERS}})
    outcome, text = await _check_modem(FakeModem(), with_numbers)
    assert outcome == "pass" and "set-sms-numbers" not in text
    outcome, text = await _check_modem(FakeModem(registered=False), with_numbers)
    assert outcome == "fail" and "not registered" in text
