"""The real SerialModem driver against PtyModem, an AT-speaking fake on a pseudo-terminal."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device.hal.fakes import PtyModem, PtyScript, ReceivedSms
from device.hal.modem import (
    SMS_MAX_SEPTETS,
    SerialModem,
    parse_cpin,
    parse_creg,
    parse_csq,
    prepare_sms_text,
)
from device.hal.ports import (
    InvalidPhoneNumber,
    ModemError,
    ModemInfo,
    ModemRejected,
    ModemTimeout,
)

NUMBER = "+821098765432"
TEXT = "Emergency bell 7 pressed at Main St 5. Help is needed."
TIMEOUT_S = 0.5


@pytest.fixture
async def pty() -> AsyncIterator[PtyModem]:
    async with PtyModem() as modem:
        yield modem


@pytest.fixture
async def modem(pty: PtyModem) -> AsyncIterator[SerialModem]:
    driver = SerialModem(pty.port, timeout_s=TIMEOUT_S, sms_timeout_s=TIMEOUT_S)
    yield driver
    await driver.close()


async def test_probe_initialises_and_reports(pty: PtyModem, modem: SerialModem) -> None:
    info = await modem.probe()
    assert info == ModemInfo(model="ANSIMI-PTY", ok=True, signal=21, sim="ready", registered=True)
    assert pty.commands[:3] == ["AT", "ATE0", "AT+CMGF=1"]


async def test_probe_without_a_ready_sim_is_not_ok(pty: PtyModem, modem: SerialModem) -> None:
    pty.script.sim_ready = False
    info = await modem.probe()
    assert not info.ok
    assert info.model == "ANSIMI-PTY"
    assert info.sim == "absent"  # +CME ERROR: 10


@pytest.mark.parametrize(
    ("creg", "expected"),
    [
        ("0,1", True),
        ('2,5,"00C3","0012AB"', True),
        ("0,6", True),  # registered for SMS only: exactly what the fallback needs
        ("0,7", True),
        ("0,10", True),  # an LTE modem, CS fallback not preferred: SMS still goes
        ("0,2", False),
        ("0,3", False),
        ("0,8", False),  # emergency calls only
        ("?", None),
    ],
)
def test_creg_registered_at_home_or_roaming_only(creg: str, expected: bool | None) -> None:
    assert parse_creg(creg) == expected


@pytest.mark.parametrize(
    ("cpin", "expected"), [("READY", "ready"), ("SIM PIN", "pin"), ("SIM PUK2", "puk")]
)
def test_cpin_states(cpin: str, expected: str) -> None:
    assert parse_cpin(cpin) == expected


@pytest.mark.parametrize(("csq", "expected"), [("21,0", 21), ("0,99", 0), ("99,99", None)])
async def test_signal_quality(
    pty: PtyModem, modem: SerialModem, csq: str, expected: int | None
) -> None:
    pty.script.csq = csq
    assert await modem.signal_quality() == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("31,0", 31), (" 7 , 3", 7), ("99,99", None), ("40,0", None), ("", None)],
)
def test_parse_csq(value: str, expected: int | None) -> None:
    assert parse_csq(value) == expected


async def test_send_sms_delivers_exact_number_and_text(pty: PtyModem, modem: SerialModem) -> None:
    reference = await modem.send_sms(NUMBER, TEXT)
    assert reference == 1
    # The text is framed by the > prompt and ended by Ctrl-Z, nothing more.
    assert pty.received == [ReceivedSms(NUMBER, TEXT, TEXT.encode() + b"\x1a")]
    assert await modem.send_sms(NUMBER, "second") == 2


@pytest.mark.parametrize(
    "script",
    [
        PtyScript(echo=False),
        PtyScript(honour_ate0=False),
        PtyScript(honour_ate0=False, unsolicited=True),
    ],
    ids=["no-echo", "echo-stays-on", "echo-and-unsolicited"],
)
async def test_echo_and_unsolicited_lines_are_tolerated(script: PtyScript) -> None:
    # A text that, echoed back line by line, would look like the modem's own answers.
    text = "OK\n+CMGS: 99\nERROR"
    async with PtyModem(script) as pty:
        modem = SerialModem(pty.port, timeout_s=TIMEOUT_S, sms_timeout_s=TIMEOUT_S)
        try:
            assert await modem.probe() == ModemInfo("ANSIMI-PTY", True, 21, "ready", True)
            assert await modem.send_sms(NUMBER, text) == 1
            assert await modem.signal_quality() == 21
        finally:
            await modem.close()
        assert pty.received == [ReceivedSms(NUMBER, text, text.encode() + b"\x1a")]


async def test_unsolicited_line_between_commands(pty: PtyModem, modem: SerialModem) -> None:
    await modem.probe()
    pty.inject('+CMTI: "SM",4')
    pty.inject("+CREG: 1")
    await asyncio.sleep(0.05)
    assert await modem.signal_quality() == 21


async def test_error_instead_of_prompt_is_rejected(pty: PtyModem, modem: SerialModem) -> None:
    pty.script.cmgs = "error"
    with pytest.raises(ModemRejected) as caught:
        await modem.send_sms(NUMBER, TEXT)
    assert caught.value.cms_error is None
    assert caught.value.reply == "ERROR"
    assert pty.received == []
    # The modem is still usable afterwards.
    pty.script.cmgs = "ok"
    assert await modem.send_sms(NUMBER, TEXT) == 1


async def test_cms_error_is_rejected_with_its_code(pty: PtyModem, modem: SerialModem) -> None:
    pty.script.cmgs = "cms_error"
    pty.script.cms_error = 500
    with pytest.raises(ModemRejected) as caught:
        await modem.send_sms(NUMBER, TEXT)
    error = caught.value
    assert error.cms_error == 500
    assert error.command.startswith("AT+CMGS")
    assert isinstance(error, ModemError)
    assert isinstance(error, OSError)
    assert pty.port in str(error)
    # Personal data stays out of errors, which end up in logs and bug reports.
    assert NUMBER not in str(error)
    assert NUMBER not in error.command


async def test_cme_error_is_rejected_with_its_code(pty: PtyModem, modem: SerialModem) -> None:
    await modem.probe()
    # With no SIM, AT+CPIN? answers +CME ERROR: 10. probe() turns that into ok=False, so
    # ask the driver's command layer directly.
    pty.script.sim_ready = False
    with pytest.raises(ModemRejected) as caught:
        await modem._run(modem._command, "AT+CPIN?")
    assert caught.value.cme_error == 10
    assert caught.value.cms_error is None


async def test_silent_modem_times_out_within_the_timeout() -> None:
    async with PtyModem(PtyScript(silent=True)) as pty:
        modem = SerialModem(pty.port, timeout_s=TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(ModemTimeout) as caught:
            await modem.probe()
        elapsed = time.monotonic() - started
        await modem.close()
    assert TIMEOUT_S * 0.9 <= elapsed <= TIMEOUT_S + 0.25
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.timeout_s == TIMEOUT_S


async def test_no_prompt_times_out_and_cancels_text_entry(
    pty: PtyModem, modem: SerialModem
) -> None:
    await modem.probe()
    pty.script.cmgs = "silent"
    started = time.monotonic()
    with pytest.raises(ModemTimeout):
        await modem.send_sms(NUMBER, TEXT)
    assert time.monotonic() - started <= TIMEOUT_S + 0.25
    await asyncio.sleep(0.05)
    # ESC, so a late prompt cannot swallow what we send next as SMS text.
    assert pty.raw.endswith(b"\x1b")
    assert pty.received == []


async def test_no_answer_after_the_text_times_out(pty: PtyModem, modem: SerialModem) -> None:
    await modem.probe()
    pty.script.cmgs = "silent_after_text"
    started = time.monotonic()
    with pytest.raises(ModemTimeout):
        await modem.send_sms(NUMBER, TEXT)
    assert time.monotonic() - started <= TIMEOUT_S + 0.25
    # After a timeout the driver initialises the modem again before the next command.
    pty.script.cmgs = "ok"
    pty.commands.clear()
    assert await modem.send_sms(NUMBER, TEXT) == 1
    assert pty.commands[0] == "AT"
    # The unanswered SMS may well have gone out: a retry can duplicate it, never lose it.
    assert len(pty.received) == 2


@pytest.mark.parametrize(
    "number",
    ["", "12", "+", "+1234567890123456789", "010-1234-5678", "+82 10 1234", "١٢٣٤٥", "12;AT"],
)
async def test_invalid_number_is_refused_before_anything_is_written(
    pty: PtyModem, modem: SerialModem, number: str
) -> None:
    with pytest.raises(InvalidPhoneNumber) as caught:
        await modem.send_sms(number, TEXT)
    assert isinstance(caught.value, ValueError)
    if len(number) >= 3:
        assert number not in str(caught.value)
    await asyncio.sleep(0.05)
    assert pty.raw == b""


async def test_commands_run_one_at_a_time(pty: PtyModem, modem: SerialModem) -> None:
    pty.script.reply_delay_s = 0.01
    results = await asyncio.gather(
        modem.signal_quality(),
        modem.send_sms(NUMBER, "one"),
        modem.signal_quality(),
        modem.send_sms(NUMBER, "two"),
        modem.probe(),
    )
    assert results[0] == 21
    assert sorted([results[1], results[3]]) == [1, 2]
    assert [sms.text for sms in pty.received] == ["one", "two"]


async def test_neither_number_nor_text_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "Robbery at counter 2"
    async with PtyModem(PtyScript(honour_ate0=False, unsolicited=True)) as pty:
        modem = SerialModem(pty.port, timeout_s=TIMEOUT_S, sms_timeout_s=TIMEOUT_S)
        with caplog.at_level(logging.DEBUG):
            await modem.probe()
            reference = await modem.send_sms(NUMBER, secret)
            pty.script.cmgs = "cms_error"
            with pytest.raises(ModemRejected):
                await modem.send_sms(NUMBER, secret)
            pty.script.cmgs = "silent"
            with pytest.raises(ModemTimeout):
                await modem.send_sms(NUMBER, secret)
        await modem.close()
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"reference {reference}" in m for m in messages)
    for message in messages:
        assert NUMBER not in message
        assert NUMBER.lstrip("+") not in message
        assert secret not in message


async def test_rs485_on_a_pty_fails_with_the_fix(pty: PtyModem) -> None:
    modem = SerialModem(pty.port, timeout_s=TIMEOUT_S, rs485=True)
    with pytest.raises(ModemError, match="modem_rs485 = false") as caught:
        await modem.probe()
    assert pty.port in str(caught.value)


async def test_missing_port_names_the_port() -> None:
    modem = SerialModem("/dev/ttyANSIMI-missing", timeout_s=TIMEOUT_S)
    with pytest.raises(ModemError, match="/dev/ttyANSIMI-missing") as caught:
        await modem.probe()
    assert "modem_port" in str(caught.value)


# --- the SMS text rule ---


def test_short_ascii_text_is_unchanged() -> None:
    assert prepare_sms_text(TEXT) == TEXT


def test_long_text_is_cut_to_157_and_marked() -> None:
    text = "a" * 200
    assert prepare_sms_text(text) == "a" * 157 + "..."
    assert prepare_sms_text("a" * 160) == "a" * 160


def test_extension_characters_count_twice() -> None:
    assert prepare_sms_text("{" * 80) == "{" * 80
    assert prepare_sms_text("{" * 81) == "{" * 78 + "..."


def test_characters_outside_gsm_become_question_marks() -> None:
    assert prepare_sms_text("비상벨 `ok`\r\nline") == "??? ?ok?\nline"


def septets(text: str) -> int:
    return sum(2 if ch in "^{}\\[~]|" else 1 for ch in text)


@given(st.text(max_size=400))
def test_prepared_text_always_fits_one_sms(text: str) -> None:
    prepared = prepare_sms_text(text)
    assert septets(prepared) <= SMS_MAX_SEPTETS
    assert prepared.isascii()
    assert "\r" not in prepared
    assert prepare_sms_text(prepared) == prepared
