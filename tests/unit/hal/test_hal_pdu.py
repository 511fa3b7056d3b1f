"""Korean SMS: SMS-SUBMIT PDUs in UCS-2 (3GPP TS 23.040), whole and concatenated.

The expected PDUs are written out field by field from the rules (device/hal/pdu.py's
docstring lists them), with the code points of the Hangul syllables, not computed by the
code under test; one is also read back by an independent decoder (python-gsmmodem).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from gsmmodem.pdu import Concatenation, decodeSmsPdu

from device.hal.fakes import FakeModem, PtyModem
from device.hal.modem import SerialModem
from device.hal.pdu import read_submit, submit_pdus

NUMBER = "+821012345678"
# 12 digits, international (91); semi-octets swapped: 82 10 12 34 56 78 -> 28 01 21 43 65 87
DA = "0C" + "91" + "280121436587"
# 안 U+C548, 심 U+C2EC, space U+0020, 벨 U+BCA8
TEXT = "안심 벨"
UD = "C548" + "C2EC" + "0020" + "BCA8"
# SMSC 00 (the SIM's); SUBMIT 01; MR 00; DA; PID 00; DCS 08 (UCS-2); UDL 08 octets; UD
WHOLE = "00" + "01" + "00" + DA + "00" + "08" + "08" + UD
# 가 U+AC00 나 U+B098 다 U+B2E4 라 U+B77C: 100 characters need two parts (67 + 33)
LONG = "가나다라" * 25
LONG_UNITS = ["AC00", "B098", "B2E4", "B77C"] * 25


def test_a_short_korean_text_is_one_pdu_with_its_tpdu_length() -> None:
    (pdu,) = submit_pdus(NUMBER, TEXT, reference=9)
    assert pdu.hex == WHOLE
    assert pdu.tpdu_octets == len(WHOLE) // 2 - 1  # AT+CMGS counts the TPDU, not the SMSC


def test_a_national_number_has_type_81_and_an_odd_count_padded_with_f() -> None:
    (pdu,) = submit_pdus("01012345678", TEXT, reference=0)
    # 11 digits (0B), unknown/national (81): 01 01 23 45 67 8F -> 10 10 32 54 76 F8
    assert pdu.hex == "00" + "01" + "00" + "0B81" + "1010325476F8" + "00" + "08" + "08" + UD


def test_a_long_text_goes_in_concatenated_parts_with_one_reference() -> None:
    first, second = submit_pdus(NUMBER, LONG, reference=0x2A)
    # UDHI set (41); UDL = 6 header octets + 67 * 2 = 140 (8C); header 05 00 03 ref total seq
    assert first.hex == (
        "00" + "41" + "00" + DA + "00" + "08" + "8C" + "0500032A0201" + "".join(LONG_UNITS[:67])
    )
    # the rest: 33 characters, 6 + 66 = 72 octets (48)
    assert second.hex == (
        "00" + "41" + "00" + DA + "00" + "08" + "48" + "0500032A0202" + "".join(LONG_UNITS[67:])
    )
    assert (first.tpdu_octets, second.tpdu_octets) == (153, 85)


def test_a_character_outside_the_bmp_is_never_split_between_parts() -> None:
    # 66 + 2 + 5 = 73 UTF-16 units: two parts; the 67th unit is the emoji's first half
    text = "가" * 66 + "\N{GRINNING FACE}" + "나" * 5
    first, second = submit_pdus(NUMBER, text, reference=1)
    assert read_submit(first.hex).text == "가" * 66
    assert read_submit(second.hex).text == "\N{GRINNING FACE}" + "나" * 5


def test_an_independent_decoder_reads_the_parts_back() -> None:
    parts = [decodeSmsPdu(pdu.hex) for pdu in submit_pdus(NUMBER, LONG, reference=7)]
    assert [p["type"] for p in parts] == ["SMS-SUBMIT", "SMS-SUBMIT"]
    assert {p["number"] for p in parts} == {NUMBER}
    assert "".join(p["text"] for p in parts) == LONG
    headers = [p["udh"][0] for p in parts]
    assert all(isinstance(h, Concatenation) for h in headers)
    assert [(h.reference, h.parts, h.number) for h in headers] == [(7, 2, 1), (7, 2, 2)]
    (whole,) = [decodeSmsPdu(pdu.hex) for pdu in submit_pdus(NUMBER, TEXT, reference=0)]
    assert whole["text"] == TEXT and whole["tpdu_length"] == len(WHOLE) // 2 - 1


@pytest.fixture
async def pty() -> AsyncIterator[PtyModem]:
    async with PtyModem() as modem:
        yield modem


async def test_the_driver_sends_each_part_in_pdu_mode(pty: PtyModem) -> None:
    modem = SerialModem(pty.port, timeout_s=2, sms_timeout_s=2)
    try:
        ref = await modem.send_sms(NUMBER, TEXT, mode="pdu")
        assert pty.commands[-1] == f"AT+CMGS={len(WHOLE) // 2 - 1}"
        assert "AT+CMGF=0" in pty.commands
        assert pty.received[-1].raw == WHOLE.encode() + b"\x1a"
        await modem.send_sms(NUMBER, LONG, mode="pdu")
        assert [r.pdu_length for r in pty.received[1:]] == [153, 85]
        assert "".join(r.text for r in pty.received[1:]) == LONG
        # text mode again: the format is switched back before the next SMS
        await modem.send_sms(NUMBER, "ok", mode="text")
        assert pty.commands[-2:] == ["AT+CMGF=1", f'AT+CMGS="{NUMBER}"']
        assert pty.received[-1].text == "ok"
    finally:
        await modem.close()
    assert ref == 1


async def test_the_in_memory_fake_keeps_what_the_modem_would_have_been_given() -> None:
    modem = FakeModem()
    await modem.send_sms(NUMBER, TEXT, mode="pdu")
    (sent,) = modem.sent
    assert sent.text == TEXT and sent.pdus == (WHOLE,)
